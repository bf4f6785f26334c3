"""A tiny SDXL-format model folder, built locally (no downloads), like trainer/world/tiny_sd.py for SD1.

Random weights, the real component classes and the real SDXL wiring:
  text_encoder     CLIPTextModel (OpenAI CLIP-L style: quick-GELU), hidden 32
  text_encoder_2   CLIPTextModelWithProjection (OpenCLIP bigG style: GELU), hidden 48, projection 40
  tokenizer(_2)    CLIPTokenizers with tiny_sd's vocabulary; tokenizer_2 pads with "!" as SDXL's does
  unet             UNet2DConditionModel with addition_embed_type="text_time": cross_attention_dim
                   32 + 48 (both encoders' hidden states concatenated), projection_class_embeddings_input_dim
                   40 + 6 * addition_time_embed_dim (the pooled embedding + 6 time ids); SDXL's block
                   layout (level 0 without attention, transformer depth per level, linear proj_in/out)
  vae              AutoencoderKL, 4x downsampling (SDXL's does 8x), force_upcast and scaling_factor as SDXL's
  scheduler        EulerDiscreteScheduler, as the SDXL base folder ships
saved with StableDiffusionXLPipeline.save_pretrained (about 2 MB). The two hidden sizes differ on
purpose: diffusers' single-file loader tells the two encoders apart by width, as with the real ones.

refiner=True writes the SDXL refiner's layout instead (StableDiffusionXLImg2ImgPipeline, only
text_encoder_2/tokenizer_2, requires_aesthetics_score, 5 time ids): the bad input the trainer refuses.
"""
from __future__ import annotations

from pathlib import Path

from trainer.formats.io import normal_permissions

HIDDEN_1, HIDDEN_2, PROJECTION_2, TIME_DIM = 32, 48, 40, 8


def _text_encoder(cls, vocab_size, hidden, projection, act, max_len):
    from transformers import CLIPTextConfig

    return cls(CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=3,
        num_attention_heads=4, max_position_embeddings=max_len, bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1, projection_dim=projection, hidden_act=act))


def build_tiny_sdxl(path, *, seed: int = 0, sample_size: int = 32, prediction_type: str = "epsilon",
                    refiner: bool = False, max_length: int = 77, head_dim: int | None = None):
    """Write a tiny SDXL model folder at `path` (sample_size x sample_size images) and return the path.
    head_dim=64: UNet channels 64/128/128 with 1/2/2 heads, the head dim of the real SDXL's attention (what our
    fused attention kernels are tuned for); default: channels 16/32/32, head dim 8."""
    import tempfile

    import torch
    from diffusers import (AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLImg2ImgPipeline,
                           StableDiffusionXLPipeline, UNet2DConditionModel)
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from trainer.world.tiny_sd import write_tokenizer_files

    path = Path(path)
    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as tmp:
        vocab_size = write_tokenizer_files(Path(tmp))
        files = (str(Path(tmp) / "vocab.json"), str(Path(tmp) / "merges.txt"))
        tokenizer = CLIPTokenizer(*files, model_max_length=max_length)
        tokenizer_2 = CLIPTokenizer(*files, model_max_length=max_length, pad_token="!")
    text_encoder = _text_encoder(CLIPTextModel, vocab_size, HIDDEN_1, HIDDEN_1, "quick_gelu", max_length)
    text_encoder_2 = _text_encoder(CLIPTextModelWithProjection, vocab_size, HIDDEN_2, PROJECTION_2, "gelu",
                                   max_length)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
                        up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(16, 32, 32),
                        latent_channels=4, layers_per_block=1, norm_num_groups=8, sample_size=sample_size,
                        scaling_factor=0.13025, force_upcast=True)
    n_time = 5 if refiner else 6  # the refiner's time ids: original size, crop, aesthetic score
    unet = UNet2DConditionModel(
        sample_size=sample_size // 4, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(16, 32, 32) if head_dim is None else (head_dim, 2 * head_dim, 2 * head_dim),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 1, 2),
        attention_head_dim=(2, 4, 4) if head_dim is None else (1, 2, 2),  # (diffusers' name for the head count)
        use_linear_projection=True, norm_num_groups=8,
        cross_attention_dim=HIDDEN_2 if refiner else HIDDEN_1 + HIDDEN_2,
        addition_embed_type="text_time", addition_time_embed_dim=TIME_DIM,
        projection_class_embeddings_input_dim=PROJECTION_2 + n_time * TIME_DIM)
    scheduler = EulerDiscreteScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                       beta_schedule="scaled_linear", prediction_type=prediction_type,
                                       steps_offset=1, timestep_spacing="leading", interpolation_type="linear")
    if refiner:
        pipe = StableDiffusionXLImg2ImgPipeline(
            vae=vae, text_encoder=None, text_encoder_2=text_encoder_2, tokenizer=None, tokenizer_2=tokenizer_2,
            unet=unet, scheduler=scheduler, requires_aesthetics_score=True, force_zeros_for_empty_prompt=False,
            add_watermarker=False)
    else:
        pipe = StableDiffusionXLPipeline(
            vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
            tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler, add_watermarker=False)
    pipe.save_pretrained(path, safe_serialization=True)
    normal_permissions(path)  # (safetensors writes owner-only files)
    return path


def main(argv=None) -> int:
    """python -m trainer.world.tiny_sdxl OUT [--refiner]: the tiny SDXL model folder."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m trainer.world.tiny_sdxl",
                                description="Write a tiny random-weight SDXL model folder (no downloads).")
    p.add_argument("out", help="folder to write the model to")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prediction_type", default="epsilon", choices=["epsilon", "v_prediction", "sample"])
    p.add_argument("--refiner", action="store_true", help="the SDXL refiner's layout (only text_encoder_2)")
    p.add_argument("--head_dim", type=int, default=None, help="attention head size (64: SDXL 1.0's; not given: 8)")
    a = p.parse_args(argv)
    if Path(a.out).exists() and any(Path(a.out).iterdir()):
        print(f"python -m trainer.world.tiny_sdxl: {a.out} exists and is not empty; choose another folder")
        return 2
    build_tiny_sdxl(a.out, seed=a.seed, prediction_type=a.prediction_type, refiner=a.refiner, head_dim=a.head_dim)
    print(f"wrote a tiny SDXL {'refiner ' if a.refiner else ''}model to {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
