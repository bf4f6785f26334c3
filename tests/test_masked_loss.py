"""Masked loss and robust losses as the trainer wires them: masks from --mask_dir or the alpha channel, through
the pixels' own resize/crop/flip, at the latents' resolution with --mask_min / --mask_normalization; a train_step
whose mask is zero changes nothing and trains no pixel outside the mask; huber c per row from t (kohya)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from test_buckets import BUCKETS, _fresh_notes, _one_thread, batches, comps, image_set, opts, write_images  # noqa: F401
from trainer.core import masks as masking
from trainer.core.step import huber_c, setup, train_step
from trainer.errors import UserError
from trainer.families import family_of
from trainer.methods import method_for
from trainer.world import MODEL_DIR


def red_masks(inst, folder):
    """Each image's mask = its red channel (so the mask of a view must equal the view's red channel)."""
    folder.mkdir(parents=True, exist_ok=True)
    for f in sorted(inst.glob("*.png")):
        Image.open(f).getchannel("R").save(folder / (f"{f.stem}.bmp" if f.stem == "img0" else f"{f.stem}.png"))
    return folder


# ----------------------------------------------------------------------------- finding and reading masks

def test_masks_come_from_mask_dir_or_alpha(tmp_path, capsys):
    inst = write_images(tmp_path / "inst", [(40, 30), (30, 40)])
    a = np.full((20, 24, 4), 200, np.uint8)
    a[..., 3] = 0
    a[5:15, 6:18, 3] = 255
    Image.fromarray(a).save(inst / "see-through.png")  # no mask file: its alpha is its mask
    mdir = tmp_path / "masks"
    mdir.mkdir()
    Image.new("L", (40, 30), 128).save(mdir / "img0.jpg")  # any image suffix; img1 has no mask
    (mdir / "img1.txt").write_text("not a mask")
    files = sorted(inst.glob("*.png"))
    got = masking.load_masks(files, [Image.open(f).size for f in files], [mdir] * 3)
    assert [m is None for m in got] == [False, True, False]
    assert np.asarray(got[0]).mean() == pytest.approx(128, abs=1)
    alpha = np.asarray(got[2])
    assert alpha.shape == (20, 24) and alpha[10, 10] == 255 and alpha[0, 0] == 0
    err = capsys.readouterr().err
    assert "dbtrain: note: masked loss: 2 of 3 instance images have masks (1 from the image's alpha channel)" in err
    # a mask of another size than its image: one line naming both files and sizes
    Image.new("L", (40, 30), 255).save(mdir / "img1.png")
    with pytest.raises(UserError, match=r"mask .*masks/img1\.png is 40x30 but its image .*inst/img1\.png is 30x40"
                       ) as e:
        masking.load_masks(files, [Image.open(f).size for f in files], [mdir] * 3)
    assert "\n" not in str(e.value)


def test_mask_floor_and_mean_normalization():
    m = torch.zeros(8, 8)
    m[:, :4] = 1.0  # left half
    m[0, 4] = 1.0   # one more pixel: that latent averages it (area)
    lat = masking.to_latent(m, (4, 4), 0.0, "none")
    assert lat.shape == (1, 1, 4, 4)
    assert lat[0, 0, :, :2].eq(1).all() and lat[0, 0, 1:, 2:].eq(0).all() and lat[0, 0, 0, 2] == 0.25
    floored = masking.to_latent(m, (4, 4), 0.2, "none")
    torch.testing.assert_close(floored, 0.2 + 0.8 * lat)
    normal = masking.to_latent(m, (4, 4), 0.2, "mean")
    torch.testing.assert_close(normal, floored / floored.mean())
    assert normal.mean().item() == pytest.approx(1.0)
    assert masking.to_latent(torch.zeros(8, 8), (4, 4), 0.0, "mean").eq(0).all()  # no subject: stays zero


# ----------------------------------------------------------------------------- masks follow the pixels

@pytest.mark.parametrize("bucketed", [False, True])
def test_mask_follows_each_views_crop_and_flip(comps, tmp_path, monkeypatch, bucketed):  # noqa: F811
    """Random crops and flips of non-square images (each view encoded when drawn): every instance row's mask is
    the area average of that view's red channel, at the latents' resolution; class rows weigh 1."""
    inst = write_images(tmp_path / "inst", [(100, 64), (60, 90), (90, 64)])  # no view without a crop
    cls_dir = write_images(tmp_path / "cls", [(64, 64)])
    extra = ("--aspect_ratio_buckets", BUCKETS) if bucketed else ()
    cfg = opts(inst, "--mask_dir", str(red_masks(inst, tmp_path / "m")), "--masked_loss", "--random_flip",
               "--train_batch_size", "2", *extra)
    s, c = image_set(inst, cfg), image_set(cls_dir, cfg)
    b = batches(cfg, comps, s, c)
    encoded, log = [], []
    real, real_draw = b._encode, s.draw
    monkeypatch.setattr(b, "_encode", lambda px: (encoded.append(px), real(px))[1])
    monkeypatch.setattr(s, "draw", lambda i, gen, size=None: (log.append(real_draw(i, gen, size)), log[-1])[1])
    flips = set()
    for step in range(6):
        encoded.clear()
        log.clear()
        batch = b.make(step, 0)
        assert batch.mask.shape == (4, 1, *batch.latents.shape[-2:])
        assert len(encoded) >= 2  # the two instance rows' random crops first (then class rows' crops at a bucket)
        for row, px in enumerate(encoded[:2]):
            red = (px[0, 0] + 1) / 2  # the view's red channel in [0, 1]
            want = F.interpolate(red[None, None], size=batch.latents.shape[-2:], mode="area")
            torch.testing.assert_close(batch.mask[row:row + 1], want, atol=1e-5, rtol=0)
        assert batch.mask[2:].eq(1).all()
        flips.update(f for _, f in log)
    assert flips == {False, True}


# ----------------------------------------------------------------------------- the step

def _run(tmp_path, *extra):
    inst = tmp_path / "inst"
    cfg = opts(inst, "--masked_loss", "--train_batch_size", "2", "--optimizer", "adamw", "--adam_weight_decay", "0",
               "--learning_rate", "1e-2", "--max_train_steps", "3", "--kernels", "off", "--device", "cpu", *extra)
    fresh = family_of(MODEL_DIR).load_components(MODEL_DIR)  # (trained in place: its own copy)
    b = batches(cfg, fresh, image_set(inst, cfg))
    return setup(cfg, method_for(cfg), fresh, b, torch.device("cpu"))


def _pred_grads(run) -> list:
    grads = []

    def hook(module, args, out):
        out.sample.register_hook(grads.append)

    run.unet.register_forward_hook(hook)
    return grads


def test_a_zero_mask_trains_nothing_and_a_half_mask_only_its_half(tmp_path):
    inst = write_images(tmp_path / "inst", [(64, 64), (64, 64)])
    black = tmp_path / "black"
    black.mkdir()
    for k in range(2):
        Image.new("L", (64, 64), 0).save(black / f"img{k}.png")
    run = _run(tmp_path, "--mask_dir", str(black))
    before = [p.detach().clone() for p in run.params]
    grads = _pred_grads(run)
    res = train_step(run, 0)
    assert res.loss == 0.0 and grads[0].eq(0).all()
    assert all(torch.equal(a, p) for a, p in zip(before, run.params))
    # the left half white: the prediction's gradient is zero on the right half of the latents only
    half = tmp_path / "half"
    half.mkdir()
    for k in range(2):
        m = Image.new("L", (64, 64), 0)
        m.paste(255, (0, 0, 32, 64))
        m.save(half / f"img{k}.png")
    run = _run(tmp_path, "--mask_dir", str(half))
    before = [p.detach().clone() for p in run.params]
    grads = _pred_grads(run)
    res = train_step(run, 0)
    assert res.loss > 0 and grads[0][..., 8:].eq(0).all() and grads[0][..., :8].abs().gt(0).any()
    assert any(not torch.equal(a, p) for a, p in zip(before, run.params))
    assert inst.is_dir()


def test_huber_c_schedules_are_kohyas():
    from diffusers import DDPMScheduler

    abar = DDPMScheduler.from_pretrained(MODEL_DIR, subfolder="scheduler").alphas_cumprod.float()
    t = torch.tensor([0, 1, 250, 500, 999])

    class T:
        huber_c, huber_schedule = 0.1, "constant"

    assert huber_c(T, t, abar).tolist() == pytest.approx([0.1] * 5)
    T.huber_schedule = "exponential"
    want = [math.exp(math.log(0.1) / 1000 * k) for k in t.tolist()]  # 1 at t=0, ~huber_c at t=T
    assert huber_c(T, t, abar).tolist() == pytest.approx(want, rel=1e-5)
    T.huber_schedule = "snr"
    want = [(1 - 0.1) / (1 + math.sqrt((1 - a) / a)) ** 2 + 0.1 for a in abar[t].double().tolist()]
    assert huber_c(T, t, abar).tolist() == pytest.approx(want, rel=1e-5)


def test_the_step_passes_mask_loss_type_and_per_row_c(tmp_path, monkeypatch):
    import dbkernels

    write_images(tmp_path / "inst", [(64, 64), (64, 64)])
    seen = []
    real = dbkernels.diffusion_loss

    def loss(*a, **kw):
        seen.append((a[3], kw))
        return real(*a, **kw)

    monkeypatch.setattr(dbkernels, "diffusion_loss", loss)
    run = _run(tmp_path, "--loss_type", "huber", "--huber_schedule", "snr", "--huber_c", "0.2")
    res = train_step(run, 0)
    assert math.isfinite(res.loss)
    t, kw = seen[0]
    assert res.loss_options.keys() == {"mask", "loss_type", "huber_c"}  # (for the log's instance / prior terms)
    assert all(res.loss_options[k] is kw[k] for k in res.loss_options)
    assert kw["loss_type"] == "huber" and kw["mask"].shape == (2, 1, 16, 16) and kw["mask"].eq(1).all()
    torch.testing.assert_close(kw["huber_c"], huber_c(run.opts.training, t, run.alphas_cumprod))
    assert kw["huber_c"].shape == (2,)
