"""Aspect-ratio buckets (trainer.core.buckets): kohya's nearest-ratio assignment, views that cover the bucket,
batches of one bucket with class rows viewed at it, refused buckets, SDXL's time ids, and a bitwise resume.

The built-in tiny model (64 px, VAE and UNet each halve twice: bucket sides must be multiples of 16)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from cli_helpers import one_line_error, run_cli, train_until_interrupt
from trainer import cli
from trainer.core import buckets as bucketing
from trainer.core import images as data
from trainer.core.batches import Batches
from trainer.errors import UserError
from trainer.families import family_of
from trainer.families import sdxl
from trainer.families.sd import StableDiffusion
from trainer.options import train as config
from trainer.world import MODEL_DIR

BUCKETS = "64,64;48,80;80,48"  # (h, w): square, wide, tall


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: more threads only wait on each other on a shared CPU
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _fresh_notes(monkeypatch):
    monkeypatch.setattr(data, "_said", set())  # notes are said once per process; each test anew


@pytest.fixture(scope="module")
def comps():
    return family_of(MODEL_DIR).load_components(MODEL_DIR)


def picture(w: int, h: int, k: int = 0, alpha: bool = False) -> Image.Image:
    """A w x h picture whose red channel has structure everywhere (a ramp, a disc): crops and flips show."""
    a = np.zeros((h, w, 4 if alpha else 3), np.uint8)
    a[..., 0] = np.linspace(0, 255, w, dtype=np.float32)[None, :].astype(np.uint8)
    a[..., 1] = 40 * k
    a[..., 2] = np.linspace(255, 0, h, dtype=np.float32)[:, None].astype(np.uint8)
    if alpha:
        a[..., 3] = 255
    im = Image.fromarray(a)
    ImageDraw.Draw(im).ellipse((w // 5, h // 4, w // 2, h // 2 + 5), fill=(250, 10, 90) + ((0,) if alpha else ()))
    return im


def write_images(folder: Path, sizes, *, alpha: bool = False) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for k, (w, h) in enumerate(sizes):
        picture(w, h, k, alpha).save(folder / f"img{k}.png")
    return folder


def opts(inst: Path, *extra, out: Path | None = None):
    return config.parse(["--pretrained_model_name_or_path", str(MODEL_DIR), "--instance_data_dir", str(inst),
                         "--instance_prompt", "a photo of [V] star", "--output_dir", str(out or inst.parent / "out"),
                         "--resolution", "64", "--seed", "7", *extra])


def image_set(folder: Path, cfg) -> data.ImageSet:
    return data.ImageSet(data.list_images(folder, "instance image"), cfg.data.resolution,
                         center_crop=cfg.data.center_crop, random_flip=cfg.data.random_flip)


def batches(cfg, comps, inst, cls=None, family=None, **kw) -> Batches:
    prompts = {"inst": "a photo of sks star", "cls": "a photo of star"}
    return Batches(cfg, family or family_of(MODEL_DIR), comps, inst, cls, prompts, torch.device("cpu"),
                   torch.float32, **kw)


def record_draws(monkeypatch, images: data.ImageSet, log: list, which: str) -> None:
    """Each draw of `images` appended to log as (which, i, size, crop_xy, flip)."""
    real = images.draw

    def draw(i, gen, size=None):
        crop, flip = real(i, gen, size)
        log.append((which, i, size, crop, flip))
        return crop, flip

    monkeypatch.setattr(images, "draw", draw)


# ----------------------------------------------------------------------------- assignment and views

def test_each_image_goes_to_the_bucket_of_nearest_aspect_ratio():
    sizes = [(64, 64), (128, 32), (80, 48), (48, 80), (32, 128)]  # auto_buckets(64, 16): (h, w)
    images = [(64, 64), (100, 60), (60, 100), (300, 70), (70, 50), (65, 50), (50, 60), (40, 200)]  # (w, h)
    # w/h 1 -> square; 1.67 -> 48x80 (w/h 1.67); 0.6 -> 80x48; 4.3 -> 32x128 (4); 1.4 -> 48x80 (|1.4-1.67| < 0.4);
    # 1.3 -> square (kohya compares the ratios themselves: |1.3-1| < |1.3-1.67|; log-ratios would say 48x80);
    # 0.83 -> square; 0.2 -> 128x32 (0.25)
    assert bucketing.Buckets(sizes, images).of_image == [0, 3, 2, 4, 3, 0, 0, 1]
    b = bucketing.Buckets(sizes, images)
    assert b.members == {0: [0, 5, 6], 3: [1, 4], 2: [2], 4: [3], 1: [7]} and b.used == [0, 1, 2, 3, 4]
    assert b.summary() == ("buckets: 64x64: 3 image(s), 128x32: 1 image(s), 80x48: 1 image(s), 48x80: 2 image(s), "
                           "32x128: 1 image(s)")


def test_a_view_covers_the_bucket_then_crops_and_flips(tmp_path):
    """120x60 at the 48x80 bucket: resized by max(80/120, 48/60) = 0.8 to 96x48, a 48x80 crop; the geometry is
    ((orig h, w), (top, left), bucket) with the left edge of the mirrored image after a flip (diffusers' SDXL)."""
    write_images(tmp_path / "i", [(120, 60)])
    s = data.ImageSet(data.list_images(tmp_path / "i", "i"), 64, center_crop=False, random_flip=True)
    src = np.asarray(s.images[0].resize((96, 48), Image.BILINEAR), dtype=np.float32) / 127.5 - 1
    for crop, left in (((0.0, 0.5), 0), ((1.0, 0.2), 16), ((0.5, 0.9), 8)):
        for flip in (False, True):
            px = s.pixels(0, crop, flip, (48, 80))
            want = src[:, left:left + 80]
            want = want[:, ::-1] if flip else want
            assert px.shape == (3, 48, 80)
            np.testing.assert_array_equal(px.permute(1, 2, 0).numpy(), want)
            assert s.geometry(0, crop, flip, (48, 80)) == ((60, 120), (0, 16 - left if flip else left), (48, 80))
    assert not s.cacheable(0, (48, 80)) and not s.cacheable(0, (64, 64))
    # an image of the bucket's own aspect ratio has nothing to crop: one fixed view, no crop drawn
    write_images(tmp_path / "j", [(100, 60)])
    t = data.ImageSet(data.list_images(tmp_path / "j", "j"), 64, center_crop=False, random_flip=False)
    assert t.cacheable(0, (48, 80)) and t.draw(0, torch.Generator().manual_seed(0), (48, 80)) == (None, False)
    assert t.fixed_view(0, False, (48, 80)).shape == (3, 48, 80)


def test_buckets_the_unet_cannot_take_are_refused(comps, tmp_path, capsys):
    """96x40 gives 24x10 latents: the tiny UNet halves latents twice, 10 is not a multiple of 4."""
    inst = write_images(tmp_path / "inst", [(64, 64)])
    with pytest.raises(UserError, match=r"bucket 96x40 .* --bucket_reso_steps"):
        batches(opts(inst, "--aspect_ratio_buckets", "64,64;96,40"), comps, image_set(inst, opts(inst)))
    code, _, err = run_cli(["train", "--pretrained_model_name_or_path", str(MODEL_DIR), "--instance_data_dir",
                            str(inst), "--instance_prompt", "a photo of [V] star", "--output_dir", str(tmp_path / "o"),
                            "--resolution", "64", "--enable_bucket", "--bucket_reso_steps", "8", "--max_train_steps",
                            "1", "--device", "cpu"], capsys)
    one_line_error(code, err, "bucket", "--bucket_reso_steps", "multiple of 16")


# ----------------------------------------------------------------------------- batches

def test_a_batch_is_one_bucket_and_class_rows_are_viewed_at_it(comps, tmp_path, monkeypatch, capsys):
    inst = write_images(tmp_path / "inst", [(64, 64), (100, 60), (120, 70), (60, 100), (70, 70)])
    cls_dir = write_images(tmp_path / "cls", [(64, 64)] * 3)
    cfg = opts(inst, "--aspect_ratio_buckets", BUCKETS, "--random_flip", "--train_batch_size", "3")
    s, c = image_set(inst, cfg), image_set(cls_dir, cfg)
    b = batches(cfg, comps, s, c)
    assert "dbtrain: note: buckets: 64x64: 2 image(s), 48x80: 2 image(s), 80x48: 1 image(s)" in capsys.readouterr().err
    assert b.buckets.of_image == [0, 1, 1, 2, 0]
    # cached: the square images at 64x64, 100x60 at 48x80 and 60x100 at 80x48 (their own ratios), class images at
    # every used bucket
    # where nothing is cropped (the square class images at 64x64); each with and without flip
    assert sorted(k[:3] for k in b.cache if k[3]) == [("cls", 0, (64, 64)), ("cls", 1, (64, 64)),
                                                       ("cls", 2, (64, 64)), ("inst", 0, (64, 64)),
                                                       ("inst", 1, (48, 80)), ("inst", 3, (80, 48)),
                                                       ("inst", 4, (64, 64))]
    log = []
    record_draws(monkeypatch, s, log, "inst")
    record_draws(monkeypatch, c, log, "cls")
    seen = set()
    for step in range(12):
        log.clear()
        batch = b.make(step, 0)
        bucket = b.buckets.size_of(log[0][1])
        assert [w for w, *_ in log] == ["inst"] * 3 + ["cls"] * 3
        assert all(size == bucket for _, _, size, *_ in log)  # every row, class rows too, at the first row's bucket
        assert all(b.buckets.size_of(i) == bucket for w, i, *_ in log if w == "inst")
        assert batch.latents.shape == (6, 4, bucket[0] // 4, bucket[1] // 4)
        seen.add(bucket)
    assert seen == {(64, 64), (48, 80), (80, 48)}


def test_batches_without_buckets_draw_as_before(comps, tmp_path):
    """No buckets: the draws and latents of the code before buckets (a replay of its per-row draw order)."""
    inst = write_images(tmp_path / "inst", [(64, 64), (100, 60), (60, 100)])
    cfg = opts(inst, "--random_flip", "--train_batch_size", "2")
    s = image_set(inst, cfg)
    b = batches(cfg, comps, s)
    from trainer.core.batches import step_seed

    for step in range(4):
        batch = b.make(step, 0)
        gen = torch.Generator().manual_seed(step_seed(7, step, 0))
        for row in range(2):
            i = int(torch.randint(0, 3, (), generator=gen))
            flip = bool(torch.randint(0, 2, (), generator=gen))
            if i == 0:  # square: the cached view
                mean, std = b.cache[("inst", 0, flip)]
            else:
                crop = (float(torch.rand((), generator=gen)), float(torch.rand((), generator=gen)))
                px = data.to_tensor(s.images[i], 64, crop_xy=crop, flip=flip)
                mean, std = b._encode(px[None])
            eps = torch.randn(mean.shape, generator=gen)
            assert torch.equal(batch.latents[row:row + 1], (mean + std * eps) * b.scale)


class _SDWithTimeIds(StableDiffusion):
    """SD's text side with SDXL's time ids: the tiny SD model stands in for an SDXL one here."""

    unet_conditions = sdxl.StableDiffusionXL.unet_conditions


def test_sdxl_time_ids_of_bucketed_rows(comps, tmp_path, monkeypatch):
    """Per row: the image's real size, the crop's top-left in the resized image (mirrored after a flip) and the
    bucket as the target size; class rows (square, 64x64) at the batch's bucket."""
    inst = write_images(tmp_path / "inst", [(120, 70), (60, 100), (100, 60)])
    cls_dir = write_images(tmp_path / "cls", [(64, 64)] * 2)
    cfg = opts(inst, "--aspect_ratio_buckets", BUCKETS, "--random_flip", "--train_batch_size", "2")
    s, c = image_set(inst, cfg), image_set(cls_dir, cfg)
    b = batches(cfg, comps, s, c, family=_SDWithTimeIds())
    log = []
    record_draws(monkeypatch, s, log, "inst")
    record_draws(monkeypatch, c, log, "cls")
    buckets_seen = set()
    for step in range(8):
        log.clear()
        ids = b.make(step, 0).conditions["time_ids"]
        assert ids.shape == (4, 6) and ids.dtype == torch.float32
        for row, (which, i, (th, tw), crop, flip) in enumerate(log):
            w, h = (s if which == "inst" else c).images[i].size
            scale = max(tw / w, th / h)
            nw, nh = max(tw, round(w * scale)), max(th, round(h * scale))
            fx, fy = crop if crop is not None else (0.5, 0.5)
            left, top = round((nw - tw) * fx), round((nh - th) * fy)
            left = nw - tw - left if flip else left
            assert ids[row].tolist() == [h, w, top, left, th, tw], (step, row)
            buckets_seen.add((th, tw))
    assert buckets_seen == {(48, 80), (80, 48)}


# ----------------------------------------------------------------------------- resume

def test_bucketed_batches_depend_only_on_the_step(comps, tmp_path):
    """Every draw from the step's generator: a fresh Batches making the steps in another order, after other use
    of torch's global generator, gives the same rows (what a resumed run relies on)."""
    inst = write_images(tmp_path / "inst", [(64, 64), (100, 60), (120, 70), (110, 64), (60, 100)])
    cls_dir = write_images(tmp_path / "cls", [(64, 64)] * 2)
    cfg = opts(inst, "--aspect_ratio_buckets", BUCKETS, "--random_flip", "--train_batch_size", "3")
    first = batches(cfg, comps, image_set(inst, cfg), image_set(cls_dir, cfg))
    made = {step: first.make(step, 0).latents for step in range(8)}
    torch.manual_seed(1234)
    torch.rand(17)
    again = batches(cfg, comps, image_set(inst, cfg), image_set(cls_dir, cfg))
    for step in reversed(range(8)):
        assert torch.equal(again.make(step, 0).latents, made[step]), step


def test_resume_with_buckets_is_bitwise(tmp_path, monkeypatch):
    """Interrupted at step 3 and resumed from checkpoint-2: the same UNet as the uninterrupted run (random crops
    and flips at several buckets, every draw from the step's seed)."""
    from safetensors.torch import load_file

    inst = write_images(tmp_path / "inst", [(64, 64), (100, 60), (120, 70), (60, 100)])

    def argv(out):
        return ["--pretrained_model_name_or_path", str(MODEL_DIR), "--instance_data_dir", str(inst),
                "--instance_prompt", "a photo of [V] star", "--output_dir", str(out), "--resolution", "64",
                "--aspect_ratio_buckets", BUCKETS, "--random_flip", "--train_batch_size", "2",
                "--max_train_steps", "4", "--checkpointing_steps", "2", "--learning_rate", "1e-3", "--seed", "5",
                "--device", "cpu", "--kernels", "off", "--optimizer", "adamw", "--log_every", "1"]

    assert cli.main(["train", *argv(tmp_path / "whole")]) == 0
    train_until_interrupt(monkeypatch, argv(tmp_path / "cut"), at_step=3)
    assert (tmp_path / "cut" / "checkpoint-2").is_dir()
    assert cli.main(["train", *argv(tmp_path / "cut"), "--resume_from_checkpoint", "latest"]) == 0
    a = load_file(tmp_path / "whole" / "unet" / "diffusion_pytorch_model.safetensors")
    b = load_file(tmp_path / "cut" / "unet" / "diffusion_pytorch_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
