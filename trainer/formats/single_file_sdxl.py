"""A diffusers SDXL folder <-> the original (Stability generative-models) single-file checkpoint.

The file holds four models under sgm's names:
  model.diffusion_model.*                              the UNet: single_file's SD block table, the same
                                                       input_blocks/middle_block/output_blocks numbering
                                                       (SDXL's level 0 has no attention, deeper levels hold
                                                       transformer_blocks.N), plus label_emb.0.{0,2} =
                                                       add_embedding.linear_{1,2} (the pooled text + time ids)
  first_stage_model.*                                  the VAE, as for SD
  conditioner.embedders.0.transformer.text_model.*    CLIP-L (text_encoder), transformers' names
  conditioner.embedders.1.model.*                      OpenCLIP bigG (text_encoder_2): SD2's OpenCLIP names
                                                       (fused attn.in_proj), and text_projection stored as
                                                       [width, projection] (x @ P), the transpose of
                                                       transformers' Linear weight
Diffusers' from_single_file(OUT, config=DIR) reads it back. logit_scale (CLIP's contrastive temperature)
is not written: diffusers has no such weight and SDXL never uses it.
v-prediction: the empty `v_pred` tensor ComfyUI's SDXL loader reads, and modelspec.prediction_type: v;
zero-terminal-SNR schedules (rescale_betas_zero_snr) also get ComfyUI's empty `ztsnr` tensor.
"""
from __future__ import annotations

import json
from pathlib import Path

from trainer.errors import UserError
from trainer.formats import single_file as sf

CLIP_L = "conditioner.embedders.0.transformer."
CLIP_G = "conditioner.embedders.1.model."
_LABEL_EMB = [("add_embedding.linear_1", "label_emb.0.0", {}), ("add_embedding.linear_2", "label_emb.0.2", {})]


def unet_table_sdxl(config) -> list[tuple[str, str, dict]]:
    cfg = dict(config)
    if cfg.get("addition_embed_type") != "text_time" or cfg.get("class_embed_type") or cfg.get("num_class_embeds"):
        raise UserError("SDXL single-file export needs an SDXL UNet (addition_embed_type text_time)")
    return sf.unet_block_table(cfg) + _LABEL_EMB


def _reprefix(sd: dict, old: str, new: str) -> dict:
    return {new + k[len(old):]: v for k, v in sd.items() if k.startswith(old)}


# ------------------------------------------------------------------ diffusers -> original

def text_g_to_original(sd: dict) -> dict:
    """text_encoder_2 (CLIPTextModelWithProjection) in OpenCLIP bigG's names under conditioner.embedders.1."""
    sd = dict(sd)
    proj = sd.pop("text_projection.weight")
    layers = {k.split(".layers.")[1].split(".")[0] for k in sd if ".layers." in k}
    if len(layers) == 23:  # single_file would pad it as SD2's 24-block ViT-H; no SDXL encoder is that deep
        raise UserError("text_encoder_2 with 23 layers is not an SDXL OpenCLIP-bigG encoder")
    out = _reprefix(sf.text_to_original(sd, "openclip"), sf.OPENCLIP, CLIP_G)
    out[CLIP_G + "text_projection"] = proj.t().contiguous()
    return out


def single_file_state_dict_sdxl(unet, vae, text_encoder, text_encoder_2, *, v_prediction: bool = False,
                                zero_snr: bool = False) -> dict:
    """One state dict in sgm's layout from the four models (modules, or (state_dict, config) pairs)."""
    import torch

    usd, ucfg = sf._sd_and_config(unet)
    vsd, vcfg = sf._sd_and_config(vae)
    t1, _ = sf._sd_and_config(text_encoder)
    t2, _ = sf._sd_and_config(text_encoder_2)
    out = {sf.UNET + k: v for k, v in sf._apply(unet_table_sdxl(ucfg), usd, "SDXL UNet").items()}
    out.update(sf.vae_to_original(vsd, vcfg))
    out.update(_reprefix(sf.text_to_original(t1, "clip"), sf.CLIP, CLIP_L))
    out.update(text_g_to_original(t2))
    if v_prediction:
        out[sf.V_PRED_KEY] = torch.tensor([])
    if zero_snr:
        out["ztsnr"] = torch.tensor([])
    return out


# ------------------------------------------------------------------ original -> diffusers

def diffusers_state_dicts_sdxl(single_file_sd: dict, unet_config, vae_config) -> dict:
    """{'unet', 'vae', 'text_encoder', 'text_encoder_2'} state dicts; the text encoders' keys without
    transformers' optional `text_model.` level (as single_file.text_from_original gives them)."""
    from trainer.formats.safe_load import require_finite

    require_finite(single_file_sd, "the single-file checkpoint")
    inner = {k[len(sf.UNET):]: v for k, v in single_file_sd.items() if k.startswith(sf.UNET)}
    t2 = sf.text_from_original(_reprefix(single_file_sd, CLIP_G, sf.OPENCLIP), "openclip")
    proj = single_file_sd.get(CLIP_G + "text_projection")
    if proj is None:
        raise UserError(f"not an SDXL base checkpoint: no {CLIP_G}text_projection")
    t2["text_projection.weight"] = proj.t().contiguous()
    return {"unet": sf._apply(unet_table_sdxl(unet_config), inner, "SDXL UNet", reverse=True),
            "vae": sf.vae_from_original(single_file_sd, vae_config),
            "text_encoder": sf.text_from_original(_reprefix(single_file_sd, CLIP_L, sf.CLIP), "clip"),
            "text_encoder_2": t2}


# ------------------------------------------------------------------ whole checkpoints

def header_sdxl(model_dir, *, half: bool, extra: dict | None = None) -> dict:
    return sf.modelspec(model_dir, "stable-diffusion-xl-v1-base", sf.prediction_type(model_dir), half=half,
                        extra=extra)


def save_single_file_sdxl(model_dir, out, *, components, half: bool = False, metadata: dict | None = None) -> Path:
    """Write `components` = (unet, vae, text_encoder, text_encoder_2) of the SDXL base folder `model_dir` (its
    own weights, or e.g. the trained models) as one sgm-layout .safetensors file; the folder gives the
    configs and the scheduler's prediction type."""
    from trainer.formats.io import check_new_file, write_new_safetensors

    check_new_file(out)
    sched = json.loads((Path(model_dir) / "scheduler/scheduler_config.json").read_text())
    models = components
    if len(models) != 4:
        raise ValueError("save_single_file_sdxl: components = (unet, vae, text_encoder, text_encoder_2)")
    sd = single_file_state_dict_sdxl(*models, v_prediction=sched.get("prediction_type") == "v_prediction",
                                     zero_snr=bool(sched.get("rescale_betas_zero_snr")))
    dtype = "half" if half else "float"
    sd = {k: (getattr(v, dtype)() if v.is_floating_point() else v).detach().to("cpu") for k, v in sd.items()}
    sf.require_written_finite(sd, out, half)
    return write_new_safetensors(out, sd, header_sdxl(model_dir, half=half, extra=metadata))
