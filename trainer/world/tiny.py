"""The built-in tiny text-to-image model of the procedural world, and how it was made.

    python -m trainer.world.tiny pretrain [--work DIR] [--device cuda]

trains, from scratch and from nothing but `trainer.world.scenes`:
  1. vae    an AutoencoderKL (64x64 RGB <-> 16x16x4 latents), on scenes with and without patterns
            (random 32x32 crops: it is convolutional, and a crop costs a quarter);
  2. unet   a UNet2DConditionModel with cross-attention and a CLIPTextModel (own BPE vocabulary,
            rare words kept for identifiers), jointly, on the pattern-free base world only;
  2b. unet2 the same, going on from stage 2 with a shorter weight average (EMA); unet3 longer;
  2c. unet4 (--unet4_steps, off by default) patterned objects too, never a striped star (scenes.HELD_OUT);
  3. judge  the CLIP-style judge of `trainer.world.judge`;
then writes the diffusers folder `trainer/world/assets/tiny-world-sd` (StableDiffusionPipeline loads it)
and `trainer/world/assets/tiny-world-judge`. Each stage keeps its result in --work, so a stopped run
goes on from the last finished stage. Everything is seeded; on one machine a rerun gives the
same weights.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import time
from pathlib import Path

from trainer.formats.io import normal_permissions
from trainer.world import JUDGE_DIR, MODEL_DIR, scenes
from trainer.world.tiny_sd import write_tokenizer_files


# Rare words: in the vocabulary as whole tokens, never in a caption, so their embeddings are
# untrained - what DreamBooth wants of an identifier.
RARE_WORDS = ("sks", "zwx", "qlo", "vyt", "ohw")
MAX_TOKENS = 16


def vocabulary() -> tuple[str, ...]:
    words = ["a"] + sorted(scenes.SIZES) + sorted(scenes.COLORS) + list(scenes.TEXTURES) + list(scenes.SHAPES)
    for ctx in scenes.CONTEXTS:
        words += ctx.split()
    seen: list[str] = []
    for w in words + ["photo", "of"] + list(RARE_WORDS):  # rare words last: the highest ids
        if w not in seen:
            seen.append(w)
    return tuple(seen)


def make_tokenizer(folder: Path):
    from transformers import CLIPTokenizer

    write_tokenizer_files(folder, vocabulary())
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=MAX_TOKENS)


def new_text_encoder(vocab_size: int, seed: int):
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    return CLIPTextModel(CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        max_position_embeddings=MAX_TOKENS, bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1, projection_dim=64))


def new_vae(seed: int):
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
                         up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(16, 32, 64),
                         latent_channels=4, layers_per_block=1, norm_num_groups=8, sample_size=scenes.SIZE)


def new_unet(seed: int):
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    # 16x16 latents; cross-attention at 16x16 and 8x8; 8-wide heads (4 heads at 32 channels).
    return UNet2DConditionModel(
        sample_size=scenes.SIZE // 4, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64, 128),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=64, attention_head_dim=8, norm_num_groups=16)


def new_scheduler(sampler: bool = False):
    """SD's noise schedule. sampler=True: DPM-Solver++ over it (the shipped folder's sampler, good
    in 15-20 steps); training always uses the DDPM forward process of the same betas."""
    from diffusers import DDPMScheduler, DPMSolverMultistepScheduler

    if sampler:
        return DPMSolverMultistepScheduler.from_config(new_scheduler().config)
    return DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         prediction_type="epsilon", clip_sample=False, steps_offset=1)


def images_to_tensor(images):
    import numpy as np
    import torch

    arr = np.stack([np.asarray(im, dtype=np.uint8) for im in images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def _lr(step: int, total: int, base: float, warmup: int = 100) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    return base * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def _log(stage: str, step: int, total: int, loss: float, t0: float) -> None:
    print(f"[{stage}] step {step}/{total} loss {loss:.4f} ({time.time() - t0:.0f}s)", flush=True)


# --------------------------------------------------------------------------------------------
def train_vae(work: Path, device, steps: int, seed: int, n: int = 20000) -> Path:
    import torch

    out = work / "vae"
    if (out / "config.json").is_file():
        return out
    imgs = images_to_tensor(im for im, _ in scenes.dataset(n, seed=seed + 1, p_texture=0.5))
    vae = new_vae(seed).to(device)
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    t0 = time.time()
    crop = scenes.SIZE // 2
    for step in range(steps):
        for grp in opt.param_groups:
            grp["lr"] = _lr(step, steps, 1e-3)
        # Random 32x32 crops: the VAE is convolutional, and a crop costs a quarter of an image.
        x = imgs[torch.randint(0, n, (64,), generator=g)]
        i, j = torch.randint(0, scenes.SIZE - crop + 1, (2,), generator=g).tolist()
        x = x[:, :, i:i + crop, j:j + crop].contiguous().to(device)
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=g).to(device)
        rec = vae.decode(z).sample
        # L1 keeps edges and stripes sharper than MSE alone; a small KL keeps the latents tame.
        loss = (rec - x).abs().mean() + (rec - x).square().mean() + 1e-6 * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            _log("vae", step, steps, loss.item(), t0)
    # SD scales latents to about unit variance; measure ours.
    with torch.no_grad():
        z = torch.cat([vae.encode(imgs[k:k + 256].to(device)).latent_dist.mean.cpu() for k in range(0, min(2048, n), 256)])
    vae.register_to_config(scaling_factor=float(1.0 / z.std()))
    vae.cpu().save_pretrained(out)
    return out


def _encode_base_world(vae, n: int, seed: int, device, p_texture: float = 0.0):
    import torch

    drawn = scenes.scenes(n, seed=seed, p_texture=p_texture, hold_out=True)
    means, stds = [], []
    with torch.no_grad():
        for k in range(0, n, 500):
            x = images_to_tensor(scenes.render(s, seed=scenes.render_seed(seed, k + j))
                                 for j, s in enumerate(drawn[k:k + 500])).to(device)
            post = vae.encode(x).latent_dist
            means.append(post.mean.cpu())
            stds.append(post.std.cpu())
    return drawn, torch.cat(means), torch.cat(stds)


def train_unet(work: Path, device, steps: int, seed: int, n: int = 40000, batch: int = 64, *, lr: float = 5e-4,
               init: str | None = None, name: str = "unet", ema_max: float = 0.999, salt: int = 0,
               p_texture: float = 0.0) -> Path:
    """UNet + text encoder on the base world. init: a previous stage's result to go on from
    (then the text encoder is averaged too, so the exported pair stays matched). p_texture: the share
    of patterned objects (never a striped star: scenes.HELD_OUT)."""
    import copy

    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    out = work / name
    if (out / "unet" / "config.json").is_file():
        return out
    vae = AutoencoderKL.from_pretrained(work / "vae").to(device).eval()
    sf = vae.config.scaling_factor
    print(f"[{name}] rendering and encoding {n} scenes of the base world", flush=True)
    drawn, means, stds = _encode_base_world(vae, n, seed + 2 + (salt if p_texture else 0), device, p_texture)
    del vae
    tok = make_tokenizer(work / "tokenizer")
    if init:
        text_encoder = CLIPTextModel.from_pretrained(work / init / "text_encoder").to(device)
        unet = UNet2DConditionModel.from_pretrained(work / init / "unet").to(device)
    else:
        text_encoder = new_text_encoder(len(tok), seed).to(device)
        unet = new_unet(seed).to(device)
    ema = copy.deepcopy(unet).eval().requires_grad_(False)
    ema_te = copy.deepcopy(text_encoder).eval().requires_grad_(False) if init else text_encoder
    sched = new_scheduler()
    alphas = sched.alphas_cumprod.to(device)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
    g = torch.Generator().manual_seed(seed + salt)  # salt: each stage sees other batches and noise
    rng = random.Random(seed + salt)
    t0 = time.time()
    for step in range(steps):
        for grp in opt.param_groups:
            grp["lr"] = _lr(step, steps, lr)
        idx = torch.randint(0, n, (batch,), generator=g)
        # 10% empty captions: the unconditional model that classifier-free guidance needs.
        caps = ["" if rng.random() < 0.1 else drawn[i].partial_caption(rng) for i in idx.tolist()]
        ids = tok(caps, padding="max_length", max_length=MAX_TOKENS, truncation=True,
                  return_tensors="pt").input_ids.to(device)
        z0 = (means[idx] + stds[idx] * torch.randn(means[idx].shape, generator=g)).to(device) * sf
        noise = torch.randn(z0.shape, generator=g).to(device)
        t = torch.randint(0, 1000, (batch,), generator=g).to(device)
        a = alphas[t].view(-1, 1, 1, 1)
        zt = a.sqrt() * z0 + (1 - a).sqrt() * noise
        pred = unet(zt, t, text_encoder(ids)[0]).sample
        snr = a.flatten() / (1 - a.flatten())
        w = torch.clamp(snr, max=5.0) / snr  # min-SNR-5: faster convergence for a short schedule
        loss = (w * (pred - noise).square().mean(dim=(1, 2, 3))).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(ema_max, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), unet.parameters()):
                pe.lerp_(p, 1 - decay)
            if init:
                for pe, p in zip(ema_te.parameters(), text_encoder.parameters()):
                    pe.lerp_(p, 1 - decay)
        if step % 50 == 0 or step == steps - 1:
            _log(name, step, steps, loss.item(), t0)
        if step and step % 500 == 0:  # a look at the way
            ema.save_pretrained(work / f"{name}-partial" / "unet")
            ema_te.save_pretrained(work / f"{name}-partial" / "text_encoder")
    tmp = work / f"{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    ema.cpu().save_pretrained(tmp / "unet")
    ema_te.cpu().save_pretrained(tmp / "text_encoder")
    os.replace(tmp, out)
    return out


def train_judge(work: Path, device, steps: int, seed: int, n: int = 20000, batch: int = 96) -> Path:
    """Stage 3: the CLIP-style judge of trainer.world.judge, trained contrastively on captions and
    SimCLR-style on two views of each image."""
    import torch
    import torch.nn.functional as F

    from trainer.world.judge import Judge, _augment

    out = work / "judge"
    if (out / "judge.safetensors").is_file():
        return out
    drawn = scenes.scenes(n, seed=seed + 3, p_texture=0.5)
    imgs = images_to_tensor(scenes.render(s, seed=scenes.render_seed(seed + 3, k)) for k, s in enumerate(drawn))
    tok = make_tokenizer(work / "judge-tokenizer")
    torch.manual_seed(seed + 3)
    judge = Judge(len(tok)).to(device)
    judge.tokenizer = tok
    opt = torch.optim.AdamW(judge.parameters(), lr=1e-3, weight_decay=1e-2)
    g = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    t0 = time.time()
    for step in range(steps):
        for grp in opt.param_groups:
            grp["lr"] = _lr(step, steps, 1e-3)
        idx = torch.randint(0, n, (batch,), generator=g)
        x = imgs[idx]
        caps = [drawn[i].partial_caption(rng, 0.3, 0.15, 0.15, 0.15) for i in idx.tolist()]
        views = torch.cat([_augment(x, g), _augment(x, g)]).to(device)
        pooled, _ = judge.image(views)
        # CLIP: image <-> caption. Identical captions in a batch count as matches.
        ci = F.normalize(judge.clip_image(pooled[:batch]), dim=-1)
        ct = judge.text_embeddings(caps)
        same = torch.tensor([[a == b for b in caps] for a in caps], device=device, dtype=torch.float32)
        target = same / same.sum(1, keepdim=True)
        logits = judge.logit_scale.exp().clamp(max=100) * ci @ ct.T
        clip_loss = 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))
        # SimCLR: two views of one image attract, all other images repel.
        z = F.normalize(judge.ssl(pooled), dim=-1)
        sim = z @ z.T / 0.1
        sim.fill_diagonal_(float("-inf"))
        pair = torch.cat([torch.arange(batch, 2 * batch), torch.arange(batch)]).to(device)
        ssl_loss = F.cross_entropy(sim, pair)
        loss = clip_loss + ssl_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == steps - 1:
            _log("judge", step, steps, loss.item(), t0)
    judge.cpu().save(out)
    return out


def assemble(work: Path, dest: Path) -> Path:
    """The diffusers folder of the built-in model, from the stage results in `work`."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    tok = make_tokenizer(work / "tokenizer")
    last = next(work / n for n in ("unet4", "unet3", "unet2", "unet") if (work / n / "unet").is_dir())
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL.from_pretrained(work / "vae"),
        text_encoder=CLIPTextModel.from_pretrained(last / "text_encoder"), tokenizer=tok,
        unet=UNet2DConditionModel.from_pretrained(last / "unet"), scheduler=new_scheduler(True),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(tmp, safe_serialization=True)
    (tmp / "WORLD.json").write_text(json.dumps({
        "what": "tiny text-to-image model of trainer.world.scenes (python -m trainer.world.tiny pretrain)",
        "resolution": scenes.SIZE, "class_of_demo_subject": scenes.SUBJECT_CLASS, "rare_words": RARE_WORDS,
    }, indent=1))
    normal_permissions(tmp)  # (safetensors writes owner-only files)
    if dest.exists():
        shutil.rmtree(dest)
    os.replace(tmp, dest)
    return dest


def seed_work(model: Path, work: Path) -> None:
    """A model folder's parts as finished stages (vae, unet3) of `work`; stages already there are kept."""
    for src, dst in (("vae", "vae"), ("unet", "unet3/unet"), ("text_encoder", "unet3/text_encoder")):
        if not (model / src / "config.json").is_file():
            from trainer.errors import UserError

            raise UserError(f"--from_model {model}: no {src}/config.json (expected a diffusers Stable Diffusion "
                            f"folder such as {MODEL_DIR})")
        if not (work / dst).exists():
            shutil.copytree(model / src, work / dst)


def pretrain(argv: list[str]) -> int:
    import torch

    p = argparse.ArgumentParser(prog="python -m trainer.world.tiny pretrain",
                                description="Train the built-in tiny model and judge from scratch.")
    p.add_argument("--work", default="tiny-pretrain-work", help="stage results (a stopped run goes on from here)")
    p.add_argument("--device", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vae_steps", type=int, default=1500)
    p.add_argument("--unet_steps", type=int, default=1500)
    p.add_argument("--unet2_steps", type=int, default=1200,
                   help="second UNet stage: goes on from the first with a short EMA (0: skip)")
    p.add_argument("--unet3_steps", type=int, default=5500,
                   help="third UNet stage: goes on from the second at a lower rate, longer EMA (0: skip)")
    p.add_argument("--unet4_steps", type=int, default=0,
                   help="fourth UNet stage, not in the shipped model: patterns (30%% of objects; never a striped "
                        "star) on every shape and in every place, going on from the third (0: skip; 1500 tried)")
    p.add_argument("--judge_steps", type=int, default=600)
    p.add_argument("--images", type=int, default=20000, help="VAE and judge training images")
    p.add_argument("--scenes", type=int, default=40000, help="base-world scenes for the UNet")
    p.add_argument("--stages", default="vae,unet,unet2,unet3,unet4,judge,export")
    p.add_argument("--from_model", metavar="DIR", help="start the work folder from this model folder's VAE, UNet "
                   "and text encoder as the finished stages vae and unet3 (e.g. the shipped model, to run unet4 "
                   "alone)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    p.add_argument("--dest", default=str(MODEL_DIR), help="where the model folder goes")
    p.add_argument("--judge_dest", default=str(JUDGE_DIR), help="where the judge folder goes")
    a = p.parse_args(argv)
    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.set_num_threads(a.threads or os.cpu_count() or 1)
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    if a.from_model:
        seed_work(Path(a.from_model), work)
    stages = a.stages.split(",")
    if "vae" in stages:
        train_vae(work, device, a.vae_steps, a.seed, a.images)
    if "unet" in stages:
        train_unet(work, device, a.unet_steps, a.seed, a.scenes)
    if "unet2" in stages and a.unet2_steps:
        # The first stage's EMA (0.999) averages over most of a short run; this one keeps 200 steps.
        train_unet(work, device, a.unet2_steps, a.seed, a.scenes, lr=5e-4, init="unet", name="unet2", ema_max=0.995,
                   salt=7)
    if "unet3" in stages and a.unet3_steps:
        prev = "unet2" if a.unet2_steps else "unet"
        train_unet(work, device, a.unet3_steps, a.seed, a.scenes, lr=4e-4, init=prev, name="unet3", ema_max=0.999,
                   salt=11)
    if "unet4" in stages and a.unet4_steps:
        prev = next(n for n, k in (("unet3", a.unet3_steps), ("unet2", a.unet2_steps), ("unet", 1)) if k)
        train_unet(work, device, a.unet4_steps, a.seed, a.scenes, lr=3e-4, init=prev, name="unet4", ema_max=0.998,
                   salt=13, p_texture=0.3)
    if "judge" in stages:
        train_judge(work, device, a.judge_steps, a.seed, a.images)
    if "export" in stages:
        print(f"wrote {assemble(work, Path(a.dest))}")
        from trainer.world.judge import Judge

        Judge.load(work / "judge").save(Path(a.judge_dest))
        print(f"wrote {a.judge_dest}")
    return 0


def main(argv: list[str] | None = None) -> int:
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] != "pretrain":
        print("usage: python -m trainer.world.tiny pretrain [--help]")
        return 2
    from trainer.errors import UserError

    try:
        return pretrain(argv[1:])
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
