"""A tiny Stable-Diffusion-format model folder, built locally (no downloads).

Random weights, the real component classes (UNet2DConditionModel with cross-attention,
AutoencoderKL, CLIPTextModel, a CLIPTokenizer with its own byte-level BPE vocabulary,
DDPMScheduler), saved with StableDiffusionPipeline.save_pretrained so that every code
path that loads a real SD folder loads this one. Tests and smoke runs use it.
"""
from __future__ import annotations

import json
from pathlib import Path

from trainer.formats.io import normal_permissions

# Whole-word tokens of the vocabulary (everything else is spelled out in bytes).
# The short rare-looking ones are what `--identifier auto` can pick.
WORDS = ("a", "photo", "of", "dog", "cat", "toy", "on", "the", "in", "beach", "snow", "red", "blue",
         "table", "sks", "zwx", "qlo", "vyt")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable-character table."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1))
    chars = keep[:]
    extra = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(keep, map(chr, chars)))


def write_tokenizer_files(folder: Path, words=WORDS) -> int:
    """vocab.json + merges.txt for a CLIPTokenizer; returns the vocabulary size."""
    symbols = list(_bytes_to_unicode().values())
    vocab_list = symbols + [s + "</w>" for s in symbols]
    merges: list[tuple[str, str]] = []
    for word in words:
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:  # merge left to right: ((w o) r) d</w>
            pair = (parts[0], parts[1])
            if pair not in merges:
                merges.append(pair)
            parts = [parts[0] + parts[1]] + parts[2:]
    for a, b in merges:
        if a + b not in vocab_list:
            vocab_list.append(a + b)
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab_list)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n")
    return len(vocab_list)


def build_tiny_sd(path, *, seed: int = 0, prediction_type: str = "epsilon", sample_size: int = 32,
                  cross_attention_dim: int = 32, sd2_style: bool = False):
    """Write a tiny SD model folder at `path` and return the path.

    Images are sample_size x sample_size pixels; the VAE downsamples 4x (SD's does 8x),
    which keeps CPU runs fast. sd2_style=True builds SD2.x's variant: an OpenCLIP-style
    text encoder (GELU, written with OpenCLIP's names in a single file) and linear
    proj_in/proj_out in the UNet's transformers (use_linear_projection).
    """
    import tempfile

    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    path = Path(path)
    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as tmp:
        vocab_size = write_tokenizer_files(Path(tmp))
        tokenizer = CLIPTokenizer(str(Path(tmp) / "vocab.json"), str(Path(tmp) / "merges.txt"),
                                  model_max_length=16)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=cross_attention_dim, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=16, bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1, projection_dim=cross_attention_dim,
        **({"hidden_act": "gelu"} if sd2_style else {})))
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
                        up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(16, 32, 32),
                        latent_channels=4, layers_per_block=1, norm_num_groups=8, sample_size=sample_size)
    unet = UNet2DConditionModel(
        sample_size=sample_size // 4, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=cross_attention_dim,
        attention_head_dim=4, norm_num_groups=8,  # 4 heads: head dim 8 at 32 channels
        **({"use_linear_projection": True} if sd2_style else {}))
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                              beta_schedule="scaled_linear", prediction_type=prediction_type,
                              clip_sample=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(path, safe_serialization=True)
    normal_permissions(path)  # (safetensors writes owner-only files)
    return path


def main(argv=None) -> int:
    """python -m trainer.world.tiny_sd OUT [--subject DIR]: the tiny model (and demo subject images)."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m trainer.world.tiny_sd",
                                description="Write a tiny random-weight SD model folder (no downloads).")
    p.add_argument("out", help="folder to write the model to")
    p.add_argument("--subject", default=None, help="also write the demo subject's images to this folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prediction_type", default="epsilon", choices=["epsilon", "v_prediction", "sample"])
    a = p.parse_args(argv)
    if Path(a.out).exists() and any(Path(a.out).iterdir()):
        print(f"python -m trainer.world.tiny_sd: {a.out} exists and is not empty; choose another folder")
        return 2
    build_tiny_sd(a.out, seed=a.seed, prediction_type=a.prediction_type)
    print(f"wrote a tiny SD model to {a.out}")
    if a.subject:
        from trainer.world.scenes import subject_images

        folder = Path(a.subject)
        folder.mkdir(parents=True, exist_ok=True)
        for k, im in enumerate(subject_images(5, seed=a.seed)):
            im.save(folder / f"subject-{k}.png")
        print(f"wrote 5 subject images to {folder}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
