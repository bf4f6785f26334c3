"""Benchmark suite `train`: one DreamBooth training step, our trainer vs the stock recipe.

Both run on the real SD1.5 architecture (UNet, VAE, CLIP ViT-L text encoder built
from their configs with random weights: timing does not depend on weights) at
512x512, batch 1 instance + 1 class image:

* ours-fast     our trainer's train_step (trainer/core/step.py, the code `dbtrain` runs):
                kernels on, adamw8bit, bf16 autocast over fp32 master weights,
                cached latents and prompt embeddings
* ours-lowmem   the same with pure-bf16 weights, --step_in_backward and gradient
                checkpointing
* stock-fast    diffusers' train_dreambooth.py step reproduced here: fp32 weights under
                fp16 autocast + GradScaler, SDPA attention, bitsandbytes AdamW8bit (torch
                AdamW if bitsandbytes is missing: see extras.optimizer), VAE and text
                encoder run every step, two F.mse_loss terms
* stock-lowmem  the same with gradient checkpointing
* ours-lora     LoRA DreamBooth (rank 4 on the UNet's attention; the text encoder's with +te): the frozen
                base in bf16, fp32 adapters, adamw8bit, bf16 autocast, cached latents/embeddings
* ours-lora-lowmem  the same with gradient checkpointing and the step inside backward
* stock-lora    diffusers' train_dreambooth_lora.py step: the frozen base in fp16, fp32 adapters (rank 4,
                its default), fp16 autocast + GradScaler, torch AdamW, VAE and text encoder every step

each with and without text-encoder training, under a memory cap (default 24 GB, an
RTX 3090). Rows: ms/step (p20/p50/p80 over the timed steps) and peak allocated bytes.
A setting that does not fit the cap is reported as OOM and gets no row.
"""
from __future__ import annotations

import argparse
import contextlib
import tempfile
from pathlib import Path

import torch

from . import common

ARCH_DIR = Path(__file__).resolve().parents[1] / "trainer" / "memory" / "arch_configs"

OP = "train"
SETTINGS = ("ours-fast", "ours-lowmem", "stock-fast", "stock-lowmem", "ours-lora", "ours-lora-lowmem", "stock-lora")
LORA_RANK = 4
SDXL_SETTINGS = ("ours-lowmem", "ours-lora", "ours-lora-lowmem", "stock-lora")

SD15_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280, 1280),
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                 cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32)
SD15_VAE = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512),
                latent_channels=4, layers_per_block=2, norm_num_groups=32, sample_size=512)
SD15_TEXT = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                 num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)
# --quick (CPU smoke): the same code on a tiny architecture
TINY_UNET = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                 attention_head_dim=4, norm_num_groups=8)
TINY_VAE = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
                up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(16, 32, 32), latent_channels=4,
                layers_per_block=1, norm_num_groups=8, sample_size=32)
TINY_TEXT = dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=4, max_position_embeddings=77, projection_dim=32)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--settings", default=None, help=f"comma list of {', '.join(SETTINGS)} (default: all; "
                   "sdxl: its own default list)")
    p.add_argument("--text-encoder", default="off,on", help="train the text encoder: off, on or both")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 10; --quick 2)")
    p.add_argument("--memory-cap-gb", type=float, default=24.0, help="emulate a card of this size (CUDA)")
    p.add_argument("--resolution", type=int, default=None, help="default 512, sdxl 1024 (--quick 32)")
    p.add_argument("--arch", default="sd15", choices=["sd15", "sdxl"],
                   help="sd15; sdxl: SDXL 1.0's architecture (trainer/memory/arch_configs/sdxl.json), settings "
                        f"{','.join(SDXL_SETTINGS)} by default (the full stock recipes need > 24 GB there)")


def build_sdxl_components(quick: bool, device: torch.device, tmp: Path):
    """trainer.families.base.Components of SDXL with random weights: SDXL 1.0's configs (--quick: the tiny SDXL
    folder)."""
    import json

    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from trainer.families import SDXL
    from trainer.families.base import Components
    from trainer.world.tiny_sd import write_tokenizer_files

    if quick:
        from trainer.world.tiny_sdxl import build_tiny_sdxl

        comps = SDXL.load_components(build_tiny_sdxl(tmp / "tiny-sdxl"))
        for m in (comps.unet, comps.vae, comps.text_encoder, comps.text_encoder_2):
            m.to(device)
        return comps
    confs = json.loads((ARCH_DIR / "sdxl.json").read_text())
    write_tokenizer_files(tmp / "tok")  # ids stay small; the encoders' cost does not depend on them
    toks = [CLIPTokenizer(str(tmp / "tok" / "vocab.json"), str(tmp / "tok" / "merges.txt"), model_max_length=77)
            for _ in range(2)]
    kws = [{k: v for k, v in c.items() if k not in ("architectures", "model_type")} for c in confs["text_encoder"]]
    with torch.device(device):
        torch.manual_seed(0)
        unet = UNet2DConditionModel.from_config(confs["unet"])
        vae = AutoencoderKL.from_config(confs["vae"])
        te, te2 = CLIPTextModel(CLIPTextConfig(**kws[0])), CLIPTextModelWithProjection(CLIPTextConfig(**kws[1]))
    return Components(unet=unet, vae=vae, text_encoder=te, text_encoder_2=te2, tokenizer=toks[0],
                               tokenizer_2=toks[1], noise_scheduler=DDPMScheduler.from_config(confs["scheduler"]),
                               prediction_type="epsilon")


def build_components(quick: bool, device: torch.device, tmp: Path):
    """trainer.families.base.Components of SD 1.5 with random weights (built straight on the device)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from trainer.families.base import Components
    from trainer.world.tiny_sd import write_tokenizer_files

    write_tokenizer_files(tmp / "tok")  # ids stay small; the text encoder's cost does not depend on them
    tokenizer = CLIPTokenizer(str(tmp / "tok" / "vocab.json"), str(tmp / "tok" / "merges.txt"), model_max_length=77)
    with torch.device(device):
        torch.manual_seed(0)
        unet = UNet2DConditionModel(**(TINY_UNET if quick else SD15_UNET))
        vae = AutoencoderKL(**(TINY_VAE if quick else SD15_VAE))
        te = CLIPTextModel(CLIPTextConfig(**(TINY_TEXT if quick else SD15_TEXT)))
    sched = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                          beta_schedule="scaled_linear")
    return Components(unet=unet, vae=vae, text_encoder=te, tokenizer=tokenizer, noise_scheduler=sched,
                      prediction_type="epsilon")


def write_images(folder: Path, n: int, res: int, seed: int) -> Path:
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for k in range(n):
        Image.fromarray(rng.integers(0, 255, (res, res, 3), dtype=np.uint8)).save(folder / f"{k}.png")
    return folder


def trainer_config(setting: str, train_te: bool, res: int, device: torch.device, data: Path):
    """The dbtrain options of one setting (the parser's defaults otherwise)."""
    from trainer.options.train import TrainOptions, build_parser

    cuda = device.type == "cuda"
    argv = ["--pretrained_model_name_or_path", "unused", "--instance_data_dir", str(data / "inst"),
            "--instance_prompt", "a photo of sks dog", "--with_prior_preservation", "--class_prompt",
            "a photo of dog", "--class_data_dir", str(data / "cls"), "--resolution", str(res),
            "--center_crop", "--max_train_steps", "1000", "--mixed_precision", "bf16" if cuda else "no"]
    if setting == "ours-lowmem":
        argv += ["--weights_dtype", "bf16", "--step_in_backward", "--gradient_checkpointing"]
    if setting.startswith("ours-lora"):
        argv += ["--lora_rank", str(LORA_RANK), "--learning_rate", "1e-4"]
        if setting == "ours-lora-lowmem":
            argv += ["--step_in_backward", "--gradient_checkpointing"]
    if train_te:
        argv += ["--train_text_encoder"]
    return TrainOptions.from_flags(vars(build_parser().parse_args(argv)))


def ours_step(setting, train_te, comps, res, device, data):
    from trainer.core.batches import Batches
    from trainer.core.images import ImageSet, list_images
    from trainer.core.step import setup, train_step
    from trainer.families import family_with_text_encoders
    from trainer.methods import method_for

    cfg = trainer_config(setting, train_te, res, device, data)
    family = family_with_text_encoders(len(comps.text_encoders))
    half = torch.bfloat16 if cfg.memory.mixed_precision == "bf16" else None
    inst = ImageSet(list_images(data / "inst", "instance image"), res, center_crop=True, random_flip=False)
    cls = ImageSet(list_images(data / "cls", "class image"), res, center_crop=True, random_flip=False)
    batches = Batches(cfg, family, comps, inst, cls, {"inst": cfg.data.instance_prompt, "cls": cfg.prior.class_prompt},
                      device, half or torch.float32)
    run = setup(cfg, method_for(cfg), comps, batches, device)
    state = {"step": 0}

    def step():
        train_step(run, state["step"])
        state["step"] += 1

    memory, rank = cfg.memory, cfg.lora.lora_rank
    return step, {"optimizer": cfg.optim.optimizer, "weights_dtype": memory.weights_dtype, "lora_rank": rank,
                  "frozen_dtype": str(run.weights_dtype) if rank else None,
                  "gradient_checkpointing": memory.gradient_checkpointing, "step_in_backward": memory.step_in_backward}


def _stock_update(loss, scaler, optimizer, params) -> None:
    """backward, clip at 1.0 and step, with the fp16 GradScaler where the scripts use one (accelerate's)."""
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def stock_step(setting, train_te, comps, res, device, data):
    """diffusers examples/dreambooth/train_dreambooth.py, one step, as that script does it."""
    import torch.nn.functional as F

    from trainer.core.images import list_images, open_rgb, to_tensor

    cuda = device.type == "cuda"
    weight_dtype = torch.float16 if cuda else torch.float32
    unet, vae, te, tok, sched = comps.unet, comps.vae, comps.text_encoder, comps.tokenizer, comps.noise_scheduler
    unet.to(device, torch.float32).train()
    vae.to(device, weight_dtype).requires_grad_(False)
    te.to(device, torch.float32 if train_te else weight_dtype).requires_grad_(train_te)
    if setting == "stock-lowmem":
        unet.enable_gradient_checkpointing()
        if train_te:
            (getattr(te, "activation_checkpointing_enable", None) or te.gradient_checkpointing_enable)()
    params = list(unet.parameters()) + (list(te.parameters()) if train_te else [])
    opt_name = "bitsandbytes AdamW8bit"
    try:
        import bitsandbytes as bnb

        optimizer = bnb.optim.AdamW8bit(params, lr=5e-6, weight_decay=1e-2)
    except ImportError:
        optimizer, opt_name = torch.optim.AdamW(params, lr=5e-6, weight_decay=1e-2), "torch AdamW (no bitsandbytes)"
    scaler = torch.amp.GradScaler(device.type) if cuda else None
    pixels = torch.stack([to_tensor(open_rgb(f), res, crop_xy=None, flip=False)
                          for f in list_images(data / "inst", "i")[:1] + list_images(data / "cls", "c")[:1]])
    ids = tok(["a photo of sks dog", "a photo of dog"], padding="max_length", max_length=tok.model_max_length,
              truncation=True, return_tensors="pt").input_ids.to(device)
    pixels = pixels.to(device)
    alphas = sched.alphas_cumprod.to(device)
    autocast = torch.autocast(device.type, dtype=weight_dtype) if cuda else contextlib.nullcontext()

    def step():
        latents = vae.encode(pixels.to(weight_dtype)).latent_dist.sample() * vae.config.scaling_factor
        noise = torch.randn_like(latents)
        t = torch.randint(0, sched.config.num_train_timesteps, (latents.shape[0],), device=device)
        a = alphas[t].sqrt().flatten()[:, None, None, None]
        s = (1 - alphas[t]).sqrt().flatten()[:, None, None, None]
        noisy = (a * latents + s * noise).to(latents.dtype)  # DDPMScheduler.add_noise
        emb = te(ids)[0]
        with autocast:
            pred = unet(noisy, t, emb).sample
        pred_i, pred_p = torch.chunk(pred, 2, dim=0)
        tgt_i, tgt_p = torch.chunk(noise, 2, dim=0)
        loss = F.mse_loss(pred_i.float(), tgt_i.float()) + F.mse_loss(pred_p.float(), tgt_p.float())
        _stock_update(loss, scaler, optimizer, params)

    return step, {"optimizer": opt_name, "weights_dtype": "fp32", "autocast": str(weight_dtype),
                  "gradient_checkpointing": setting == "stock-lowmem"}


def stock_lora_step(setting, train_te, comps, res, device, data):
    """diffusers examples/dreambooth/train_dreambooth_lora.py, one step, as that script does it (defaults:
    rank 4, torch AdamW, lr 5e-4; --mixed_precision fp16 on a GPU)."""
    import torch.nn.functional as F
    from peft import LoraConfig

    from trainer.core.images import list_images, open_rgb, to_tensor

    cuda = device.type == "cuda"
    weight_dtype = torch.float16 if cuda else torch.float32
    unet, vae, te, tok, sched = comps.unet, comps.vae, comps.text_encoder, comps.tokenizer, comps.noise_scheduler
    xl = getattr(comps, "text_encoder_2", None) is not None  # train_dreambooth_lora_sdxl.py
    encoders = [te] + ([comps.text_encoder_2] if xl else [])
    for m in (unet, vae, *encoders):
        m.requires_grad_(False)
    unet.to(device, weight_dtype)
    vae.to(device, torch.float32 if xl else weight_dtype)  # SDXL's VAE in fp32 (no fp16-fix VAE given)
    for enc in encoders:
        enc.to(device, weight_dtype)
    unet.add_adapter(LoraConfig(r=LORA_RANK, lora_alpha=LORA_RANK, init_lora_weights="gaussian",
                                target_modules=["to_k", "to_q", "to_v", "to_out.0", "add_k_proj", "add_v_proj"]))
    if train_te:
        from trainer.methods.lora import _inject

        for enc in encoders:
            _inject(enc, LoraConfig(r=LORA_RANK, lora_alpha=LORA_RANK, init_lora_weights="gaussian",
                                    target_modules=["q_proj", "k_proj", "v_proj", "out_proj"]))
    params = [p for m in (unet, *encoders) for p in m.parameters() if p.requires_grad]
    for p in params:  # diffusers' cast_training_params(..., dtype=torch.float32)
        p.data = p.data.float()
    unet.train()
    optimizer = torch.optim.AdamW(params, lr=5e-4, weight_decay=1e-2)
    scaler = torch.amp.GradScaler(device.type) if cuda else None
    pixels = torch.stack([to_tensor(open_rgb(f), res, crop_xy=None, flip=False)
                          for f in list_images(data / "inst", "i")[:1] + list_images(data / "cls", "c")[:1]])
    ids = tok(["a photo of sks dog", "a photo of dog"], padding="max_length", max_length=tok.model_max_length,
              truncation=True, return_tensors="pt").input_ids.to(device)
    pixels = pixels.to(device, vae.dtype)
    alphas = sched.alphas_cumprod.to(device)
    autocast = torch.autocast(device.type, dtype=weight_dtype) if cuda else contextlib.nullcontext()
    prompts = ["a photo of sks dog", "a photo of dog"]

    def text():
        if not xl:
            return te(ids)[0], {}
        from trainer.families.sdxl import encode_prompt_sdxl

        emb, pooled = encode_prompt_sdxl([comps.tokenizer, comps.tokenizer_2], encoders, prompts, device)
        time_ids = torch.tensor([[res, res, 0, 0, res, res]] * 2, device=device, dtype=emb.dtype)
        return emb, {"added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids}}

    cached = None
    if xl and not train_te:  # the script encodes the prompts once and frees the text encoders
        with torch.no_grad(), autocast:
            cached = text()
        for enc in encoders:
            enc.to("cpu")

    def step():
        with autocast:
            latents = vae.encode(pixels).latent_dist.sample().to(weight_dtype) * vae.config.scaling_factor
            noise = torch.randn_like(latents)
            t = torch.randint(0, sched.config.num_train_timesteps, (latents.shape[0],), device=device)
            a = alphas[t].sqrt().flatten()[:, None, None, None]
            s = (1 - alphas[t]).sqrt().flatten()[:, None, None, None]
            noisy = (a * latents + s * noise).to(latents.dtype)
            emb, kw = cached if cached is not None else text()
            pred = unet(noisy, t, emb, **kw).sample
            pred_i, pred_p = torch.chunk(pred, 2, dim=0)
            tgt_i, tgt_p = torch.chunk(noise, 2, dim=0)
            loss = F.mse_loss(pred_i.float(), tgt_i.float()) + F.mse_loss(pred_p.float(), tgt_p.float())
        _stock_update(loss, scaler, optimizer, params)

    return step, {"optimizer": "torch AdamW", "frozen_dtype": str(weight_dtype), "lora_rank": LORA_RANK,
                  "autocast": str(weight_dtype), "gradient_checkpointing": False}


def _measure(step, device, warmup: int, steps: int):
    for _ in range(warmup):
        step()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        for _ in range(steps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        peak = torch.cuda.max_memory_allocated(device)
    else:
        import time

        for _ in range(steps):
            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) * 1000)
        peak = None
    return tuple(common.quantiles(times)), peak


def run(opts: argparse.Namespace, writer: common.ResultWriter) -> int:
    device: torch.device = opts.device
    chosen = opts.settings or ",".join(SDXL_SETTINGS if opts.arch == "sdxl" else SETTINGS)
    settings = [s.strip() for s in chosen.split(",") if s.strip()]
    bad = [s for s in settings if s not in SETTINGS]
    if bad:
        raise ValueError(f"--settings: unknown {bad}; choose from {list(SETTINGS)}")
    te_modes = {"off": [False], "on": [True], "off,on": [False, True], "on,off": [False, True],
                "both": [False, True]}.get(opts.text_encoder.replace(" ", ""))
    if te_modes is None:
        raise ValueError("--text-encoder must be off, on or both")
    res = opts.resolution or (32 if opts.quick else 1024 if opts.arch == "sdxl" else 512)
    steps = opts.steps or (2 if opts.quick else 10)
    env = common.environment(device)
    from trainer.commands import quiet_libraries as _quiet_libraries

    _quiet_libraries()
    if device.type == "cuda" and opts.memory_cap_gb:
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, opts.memory_cap_gb * 2**30 / total), device)
    print(f"[bench {OP}] device={env['device']} git={env['git_sha']} resolution={res} "
          f"cap={opts.memory_cap_gb} GB settings={','.join(settings)}")
    table = []
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp)
        write_images(data / "inst", 4, res, 0)
        write_images(data / "cls", 4, res, 1)
        for train_te in te_modes:
            for setting in settings:
                comps = (build_sdxl_components if opts.arch == "sdxl" else build_components)(opts.quick, device, data)
                make = (ours_step if setting.startswith("ours") else stock_lora_step if setting == "stock-lora"
                        else stock_step)
                label = f"{setting}{' +te' if train_te else ''}"
                try:
                    step, extras = make(setting, train_te, comps, res, device, data)
                    ms, peak = _measure(step, device, warmup=1 if opts.quick else 3, steps=steps)
                except torch.cuda.OutOfMemoryError:
                    print(f"  {label}: OOM under the {opts.memory_cap_gb} GB cap")
                    table.append((label, "OOM", "-"))
                    continue
                finally:
                    del comps
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                extras.update({"setting": setting, "train_text_encoder": train_te, "resolution": res, "arch": opts.arch,
                               "memory_cap_gb": opts.memory_cap_gb, "batch": "1 instance + 1 class"})
                writer.write(common.make_row(op=OP, provider=setting, shape=[2, 3, res, res],
                                             dtype="mixed", mode="train_te" if train_te else "unet",
                                             variant=label, ms=ms, env=env, peak_mem=peak, extras=extras))
                table.append((label, f"{ms[1]:.1f}", f"{peak / 2**30:.2f}" if peak is not None else "-"))
    print(common.render_table(["setting", "ms/step p50", "peak GB"], table))
    return 0
