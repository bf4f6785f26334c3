"""FABRIC (trainer.fabric.sampling, trainer.fabric.attention) on CPU with the built-in tiny model.

- the attention equals a dense implementation of the paper's formula (P*w / sum(P*w) over
  cat(own, reference) keys), liked references in the conditional half, disliked in the
  unconditional half, on the reference backend, the Triton kernels (interpreter) and the
  SDPA fallback (head dim 4);
- only self-attention layers are touched;
- without feedback (or with weight 0) the sampler gives the plain StableDiffusionPipeline's
  images exactly (same seeds and scheduler);
- the schedule window: which steps get max vs min weight, and which steps run a reference pass;
- the references enter the UNet as sqrt(abar) z0 + sqrt(1 - abar) eps with DPM-Solver++,
  DDIM and Euler, and the sampler runs with each;
- bad input: one clear line (missing / unreadable image, bad settings, rounds without a
  target), a note for a resized image and one note for an SDPA-only head dim.
"""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

from diffusers.models.attention_processor import Attention  # noqa: E402

import dbkernels  # noqa: E402
from trainer.commands import fabric as fabric_command
from trainer.fabric import sampling as fabric
from trainer.options import fabric as fabric_options
from trainer.options.sampling import BUILTIN_MODEL
from trainer.world import scenes
from trainer.errors import UserError
from trainer.fabric.attention import (FabricAttnProcessor, FabricController, Group, fabric_attention, install,
                                      self_attention_layers)

MODEL = BUILTIN_MODEL
REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------ the attention

def dense_fabric(attn, x, pos, neg, w, neg_scale):
    """The paper's formula, one image at a time, full probability matrix: keys/values of
    cat(own tokens, references); P = softmax(q k^T * scale); P' = P*w / sum(P*w)."""
    b = x.shape[0] // 2
    h = attn.heads
    outs = []
    for i in range(x.shape[0]):
        refs, wr = (neg, w * neg_scale) if i < b else (pos, w)
        own = x[i]
        ctx = torch.cat([own] + [r for r in refs]) if len(refs) else own
        weights = torch.ones(ctx.shape[0], dtype=torch.float64)
        weights[own.shape[0]:] = wr
        q = attn.to_q(own).double()
        k, v = attn.to_k(ctx).double(), attn.to_v(ctx).double()
        d = q.shape[-1] // h
        q, k, v = (t.view(t.shape[0], h, d).transpose(0, 1) for t in (q, k, v))
        p = torch.softmax(q @ k.transpose(-1, -2) * attn.scale, dim=-1)
        p = p * weights
        p = p / p.sum(-1, keepdim=True)
        o = (p @ v).transpose(0, 1).reshape(own.shape[0], h * d).float()
        outs.append(attn.to_out[0](o))
    return torch.stack(outs)


def make_layer(channels, heads, seed=0):
    torch.manual_seed(seed)
    attn = Attention(query_dim=channels, heads=heads, dim_head=channels // heads)
    with torch.no_grad():
        for p in attn.parameters():
            p.normal_(0, 0.5)
    return attn.eval()


def run_processor(attn, x, pos, neg, w, neg_scale, backend="dbkernels"):
    """The sampler's route: cache [liked, disliked], groups from fabric.batch_groups, processor call."""
    notes = []
    ctrl = FabricController(note=notes.append, backend=backend)
    proc = FabricAttnProcessor(ctrl, "layer", original=None)
    ctrl.cache["layer"] = torch.cat([pos, neg])
    ctrl.groups = fabric.batch_groups(x.shape[0] // 2, pos.shape[0], True, True, w, neg_scale, True)
    ctrl.mode = "inject"
    with torch.no_grad():
        return proc(attn, x), notes


@pytest.mark.parametrize("backend", ["dbkernels", "sdpa"])
@pytest.mark.parametrize("channels,heads,length", [(64, 8, 16), (48, 3, 9), (32, 8, 12)])
def test_fabric_attention_is_the_papers_formula(channels, heads, length, backend):
    """Head dims 8 and 16 (dbkernels.attention, reference backend) and 4 (SDPA fallback, one note);
    backend "sdpa": SDPA with the broadcast bias mask for every head dim, no note."""
    attn = make_layer(channels, heads)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, length, channels, generator=g)          # CFG batch: 2 uncond, 2 cond
    pos = torch.randn(2, length, channels, generator=g)        # liked
    neg = torch.randn(1, length, channels, generator=g)        # disliked
    got, notes = run_processor(attn, x, pos, neg, 0.7, 0.5, backend)
    with torch.no_grad():
        want = dense_fabric(attn, x, pos, neg, 0.7, 0.5)
        swapped = dense_fabric(attn, x, neg, pos, 0.7, 0.5)    # liked/disliked in the wrong halves
    scale = want.abs().max()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-6 * scale)  # fp32 against the fp64 formula
    assert (got - swapped).abs().max() > 1e-2 * scale
    d = channels // heads
    if d % 8 and backend == "dbkernels":
        assert len(notes) == 1 and f"head dim {d}" in notes[0] and "SDPA" in notes[0]
    else:
        assert notes == []


def test_fabric_attention_triton_kernel(cpu_triton):
    attn = make_layer(32, 2)  # D = 16
    g = torch.Generator().manual_seed(2)
    x, pos, neg = (torch.randn(n, 8, 32, generator=g) for n in (2, 2, 1))
    with dbkernels.force_backend("triton"):
        got, _ = run_processor(attn, x, pos, neg, 0.8, 0.33)
    with torch.no_grad():
        want = dense_fabric(attn, x, pos, neg, 0.8, 0.33)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-6 * want.abs().max())


def test_per_reference_weights_and_zero_weight():
    attn = make_layer(32, 4)
    g = torch.Generator().manual_seed(3)
    x, refs = torch.randn(1, 10, 32, generator=g), torch.randn(2, 10, 32, generator=g)
    with torch.no_grad():
        both = fabric_attention(attn, x, [Group(0, 1, refs, [0.5, 0.0])])
        first = fabric_attention(attn, x, [Group(0, 1, refs[:1], 0.5)])
        none = fabric_attention(attn, x, [Group(0, 1, None, 0.0)])
        plain = attn(x)
    torch.testing.assert_close(both, first)   # weight 0 = the reference is absent
    torch.testing.assert_close(none, plain, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="weight"):
        fabric_attention(attn, x, [Group(0, 1, refs, [1.0, -1.0])])


def test_only_self_attention_layers_are_touched():
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(MODEL, subfolder="unet")
    before = {n: type(p) for n, p in unet.attn_processors.items()}
    restore = install(unet, FabricController())
    after = unet.attn_processors
    changed = {n for n in after if isinstance(after[n], FabricAttnProcessor)}
    assert changed == {n + ".processor" for n in self_attention_layers(unet)}
    assert changed and all(n.endswith("attn1.processor") for n in changed)
    assert all(type(after[n]) is before[n] for n in after if n not in changed)  # attn2 untouched
    restore()
    assert {n: type(p) for n, p in unet.attn_processors.items()} == before


# ------------------------------------------------------------------ the sampler

@pytest.fixture(scope="module")
def pipe():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the tiny model is faster on one thread than on two shared ones
    yield fabric.load_pipeline(MODEL, "cpu")
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    img = scenes.render(scenes.Scene("star", "red", "big", "in the snow", 0.5, 0.5, 0.0), seed=0)
    path = tmp_path_factory.mktemp("fabric") / "target.png"
    img.save(path)
    return path


def arrays(images):
    return [np.asarray(im) for im in images]


@pytest.mark.parametrize("scheduler", [None, "DDIMScheduler"])
def test_no_feedback_is_the_plain_pipeline(pipe, target, scheduler):
    sched = fabric.make_scheduler(pipe, scheduler)
    own = pipe.scheduler
    pipe.scheduler = sched
    try:
        gens = [torch.Generator().manual_seed(s) for s in (5, 6)]
        plain = pipe("a star", num_images_per_prompt=2, num_inference_steps=6, guidance_scale=5.0,
                     generator=gens).images
    finally:
        pipe.scheduler = own
    ours = fabric.fabric_sample(pipe, "a star", seeds=[5, 6], steps=6, guidance_scale=5.0, scheduler=sched)
    zero = fabric.fabric_sample(pipe, "a star", liked=[target], seeds=[5, 6], steps=6, guidance_scale=5.0,
                                scheduler=sched, max_weight=0.0, min_weight=0.0)
    fed = fabric.fabric_sample(pipe, "a star", liked=[target], seeds=[5, 6], steps=6, guidance_scale=5.0,
                               scheduler=sched)
    for a, b in zip(arrays(plain), arrays(ours.images)):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(arrays(plain), arrays(zero.images)):
        np.testing.assert_array_equal(a, b)
    assert zero.stats["reference_passes"] == 0
    assert fed.stats["reference_passes"] > 0
    assert any((a != b).any() for a, b in zip(arrays(plain), arrays(fed.images)))


@pytest.mark.parametrize("n,start,end,window", [
    (20, 0.0, 0.8, range(0, 16)),      # the reference defaults
    (10, 0.33, 0.66, range(3, 7)),     # the community pipeline's: round(3.3) = 3, round(6.6) = 7
    (5, 0.1, 0.5, range(1, 3)),        # halves round up: 0.5 -> 1, 2.5 -> 3
    (8, 0.0, 0.0, range(0, 0)),
])
def test_schedule_window(n, start, end, window):
    w = fabric.feedback_schedule(n, start, end, min_weight=0.05, max_weight=0.8)
    assert [i for i, x in enumerate(w) if x == 0.8] == list(window)
    assert all(x == 0.05 for i, x in enumerate(w) if i not in window)


def test_sampler_runs_reference_passes_in_the_window_only(pipe, target):
    res = fabric.fabric_sample(pipe, "a star", liked=[target], disliked=[target], seeds=[0], steps=10,
                               guidance_scale=5.0, feedback_start=0.2, feedback_end=0.6)
    assert res.stats["feedback_steps"] == [2, 3, 4, 5]
    assert res.weights == fabric.feedback_schedule(10, 0.2, 0.6)
    # min_weight > 0: every step has references
    res = fabric.fabric_sample(pipe, "a star", liked=[target], seeds=[0], steps=4, guidance_scale=5.0,
                               feedback_start=0.5, feedback_end=1.0, min_weight=0.1)
    assert res.stats["feedback_steps"] == [0, 1, 2, 3]
    # the cache: one (n_refs, L, C) fp32 tensor per attn1 layer and nothing else; 1 reference, latents 16x16:
    # 3 layers of 32 channels x 256 tokens, 3 of 64 x 64, the mid block's 128 x 16
    assert res.stats["cache_bytes"] == 4 * (3 * 32 * 256 + 3 * 64 * 64 + 128 * 16)


def test_reference_pass_in_chunks_is_the_same(pipe, target):
    """More references than main-pass rows: the reference pass splits (bounded activations), same result."""
    refs = [target, Image_open(target).rotate(90), Image_open(target).transpose(0)]
    kw = dict(seeds=[3], steps=3, guidance_scale=5.0, feedback_end=1.0, output_type="latent")
    one = fabric.fabric_sample(pipe, "a star", refs[:2], refs[2:], ref_batch_size=8, **kw)
    split = fabric.fabric_sample(pipe, "a star", refs[:2], refs[2:], **kw)  # default: 2 rows -> 2 calls a step
    assert one.stats["reference_unet_calls"] == 3 and split.stats["reference_unet_calls"] == 6
    torch.testing.assert_close(one.images[0], split.images[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["DPMSolverMultistepScheduler", "DDIMScheduler", "EulerDiscreteScheduler"])
def test_references_enter_the_unet_at_the_training_noise_level(pipe, name):
    sched = fabric.make_scheduler(pipe, None if name == "DPMSolverMultistepScheduler" else name)
    assert type(sched).__name__ == name
    sched.set_timesteps(8)
    g = torch.Generator().manual_seed(0)
    z0, eps = torch.randn(3, 4, 16, 16, generator=g), torch.randn(3, 4, 16, 16, generator=g)
    abar = pipe.scheduler.alphas_cumprod
    basis = torch.stack([z0.flatten(), eps.flatten()], dim=1).double()
    for t in sched.timesteps:  # 0-d tensors, as the denoising loop hands them out
        z = fabric.noised_references(sched, z0, eps, t)
        alpha, beta = torch.linalg.lstsq(basis, z.flatten().double()[:, None]).solution.flatten().tolist()
        torch.testing.assert_close(z, (alpha * z0 + beta * eps).float(), rtol=1e-5, atol=1e-5)
        # the variance-preserving input the UNet was trained on: alpha^2 + beta^2 = 1 ...
        assert abs(alpha ** 2 + beta ** 2 - 1) < 1e-4, (float(t), alpha, beta)
        # ... at this timestep's noise level (Euler interpolates sigma between integer timesteps)
        lo, hi = abar[int(np.floor(float(t)))], abar[min(999, int(np.ceil(float(t))))]
        assert min(lo, hi) - 1e-4 <= alpha ** 2 <= max(lo, hi) + 1e-4, (float(t), alpha ** 2, float(lo))
        sched.step(torch.zeros_like(z0), t, z0)  # advance the scheduler as the denoising loop does


@pytest.mark.parametrize("name", [None, "DDIMScheduler", "EulerDiscreteScheduler"])
def test_sampler_with_each_scheduler(pipe, target, name):
    kw = dict(seeds=[1], steps=5, guidance_scale=5.0, scheduler=name)
    fed = fabric.fabric_sample(pipe, "a star", liked=[target], disliked=[target], **kw)
    base = fabric.fabric_sample(pipe, "a star", **kw)
    a, b = np.asarray(fed.images[0]).astype(float), np.asarray(base.images[0]).astype(float)
    assert fed.stats["reference_passes"] == 4 and np.abs(a - b).mean() > 0.5


def test_feedback_pulls_toward_the_liked_image(pipe, target):
    """A strong liked reference makes the images more like it (judge embeddings) on the built-in model."""
    from trainer.world.metrics import Scorer

    scorer = Scorer()
    kw = dict(seeds=list(range(4)), steps=10, guidance_scale=5.0)
    base = fabric.fabric_sample(pipe, "a star", **kw)
    fed = fabric.fabric_sample(pipe, "a star", liked=[target], max_weight=1.0, feedback_end=1.0, **kw)
    tgt = Image_open(target)
    s0 = np.mean(fabric.target_similarity(scorer, base.images, tgt))
    s1 = np.mean(fabric.target_similarity(scorer, fed.images, tgt))
    assert s1 > s0 + 0.05, (s0, s1)


def Image_open(path):
    from PIL import Image

    return Image.open(path).convert("RGB")


# ------------------------------------------------------------------ bad input

def one_line(e):
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_bad_feedback_images(pipe, target, tmp_path):
    with pytest.raises(UserError) as e:
        fabric.fabric_sample(pipe, "a star", liked=[tmp_path / "nope.png"], seeds=[0], steps=2)
    assert "nope.png" in one_line(e) and "does not exist" in one_line(e)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png at all")
    with pytest.raises(UserError) as e:
        fabric.fabric_sample(pipe, "a star", disliked=[bad], seeds=[0], steps=2)
    assert "bad.png" in one_line(e)
    for kw in (dict(feedback_start=0.9, feedback_end=0.1), dict(max_weight=-1.0), dict(neg_scale=float("nan"))):
        with pytest.raises(UserError) as e:
            fabric.fabric_sample(pipe, "a star", liked=[target], seeds=[0], steps=2, **kw)
        one_line(e)


def test_resized_image_and_sdpa_head_dim_notes(pipe, target, tmp_path):
    big = tmp_path / "big.png"
    Image_open(target).resize((96, 80)).save(big)
    printed = []
    res = fabric.fabric_sample(pipe, "a star", liked=[big], seeds=[0, 1], steps=4, guidance_scale=5.0,
                               note=printed.append)
    assert len(res.images) == 2 and res.images[0].size == (64, 64)
    resized = [n for n in res.notes if "resized" in n]
    assert len(resized) == 1 and "big.png" in resized[0] and "96x80" in resized[0] and "64x64" in resized[0]
    # 3 attn1 layers of head dim 4, 4 steps: said once
    sdpa = [n for n in res.notes if "head dim 4" in n]
    assert len(sdpa) == 1 and "SDPA" in sdpa[0]
    assert printed == res.notes and all("\n" not in n for n in printed)


# ------------------------------------------------------------------ CLI

def test_cli_writes_images_grid_and_settings(target, tmp_path):
    out = tmp_path / "out"
    assert fabric_command.run(["--prompt", "a star", "--liked", str(target), "--disliked", str(target),
                        "--num_images", "2", "--steps", "3", "--guidance_scale", "5", "--out", str(out),
                        "--scheduler", "DDIMScheduler", "--device", "cpu"]) == 0
    assert sorted(p.name for p in out.iterdir()) == [".dbtrain-lock", ".dbtrain-run.json", "000.png", "001.png", "fabric.json", "grid.png"]
    rec = json.loads((out / "fabric.json").read_text())
    assert rec["scheduler"] == "DDIMScheduler" and rec["settings"]["max_weight"] == 0.8
    assert rec["stats"]["reference_passes"] == 2 and rec["seeds"] == [0, 1]


def test_cli_rounds_with_the_simulated_user(target, tmp_path):
    out = tmp_path / "rounds"
    fabric_command.run(["--prompt", "a star", "--rounds", "2", "--auto_feedback", str(target), "--num_images", "2",
                 "--steps", "2", "--guidance_scale", "5", "--out", str(out), "--device", "cpu"])
    rec = json.loads((out / "fabric.json").read_text())
    r0, r1 = rec["rounds"]
    assert (r0["n_liked"], r0["n_disliked"], r1["n_liked"], r1["n_disliked"]) == (0, 0, 1, 1)
    assert r1["seeds"] == [2, 3] and (out / "round-1" / "001.png").is_file()
    assert r0["similarity"][r0["liked_now"][0]] == max(r0["similarity"])
    assert r0["similarity"][r0["disliked_now"][0]] == min(r0["similarity"])


def test_cli_bad_input_is_one_line(target, tmp_path):
    cases = [
        (["--liked", str(tmp_path / "missing.png")], "missing.png"),
        (["--rounds", "3"], "--auto_feedback"),
        (["--feedback_start", "1.5"], "--feedback_start"),
        (["--model", str(tmp_path)], "missing"),
        (["--auto_feedback", str(target), "--num_images", "1"], "likes_per_round"),
    ]
    for extra, word in cases:
        with pytest.raises(UserError) as e:
            fabric_command.run(["--prompt", "a star", "--out", str(tmp_path / "o")] + extra)
        assert word in one_line(e)


def test_help_is_light():
    code = ("import sys, trainer.fabric, trainer.commands.fabric; "
            "print('torch' in sys.modules, 'diffusers' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert r.stdout.split() == ["False", "False"]
    assert "--neg_scale" in fabric_options.build_parser().format_help()
