"""A diffusers SD folder <-> the original single-file checkpoint (what A1111 and ComfyUI load).

The single file holds the three models under the original (CompVis / Stability) names:
  model.diffusion_model.*           the UNet (input_blocks / middle_block / output_blocks)
  first_stage_model.*               the VAE (encoder.down.N.block.M, mid.attn_1 as 1x1 convs)
  cond_stage_model.transformer.*    SD1: OpenAI CLIP, the transformers names with text_model.
  cond_stage_model.model.*          SD2: OpenCLIP, q/k/v fused into attn.in_proj_weight/bias
The conversion is one table of prefix renames built from the UNet/VAE configs, read in
both directions; the only reshapes are the VAE mid-block attention (linear <-> 1x1 conv)
and OpenCLIP's fused in_proj (split <-> concatenated).

SD1 or SD2 text layout: OpenCLIP (SD2) uses GELU, OpenAI CLIP (SD1) quick-GELU, which is
how a diffusers folder tells them apart (`text_layout()`).

v-prediction: A1111 reads a `<name>.yaml` next to the file if there is one, otherwise for
SD2-shaped files it runs the UNet once to guess; ComfyUI's SDXL-class loader reads an empty
`v_pred` tensor in the file, its SD2 loader guesses from a weight's spread.
So a v-prediction model gets the `v_pred` key, `modelspec.prediction_type: v` in the header
(Stability's ModelSpec name) and `<name>.yaml`, the original config with parameterization: v
(`ldm_config`); diffusers reads the scheduler from `config=`. ComfyUI's SD1/SD2 loaders read
none of these (for SD1-shaped v models its ModelSamplingDiscrete node says v_prediction).
"""
from __future__ import annotations

import json
from pathlib import Path

from trainer.errors import UserError

UNET = "model.diffusion_model."
VAE = "first_stage_model."
CLIP = "cond_stage_model.transformer."  # + text_model.<transformers name>
OPENCLIP = "cond_stage_model.model."
V_PRED_KEY = "v_pred"
SOURCE_WEIGHTS = ("diffusion_pytorch_model.safetensors", "model.safetensors",
                  "diffusion_pytorch_model.safetensors.index.json", "model.safetensors.index.json")

# inside one UNet resnet: diffusers name -> original name
_UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_OPENCLIP_LAYER = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
                   "self_attn.out_proj": "attn.out_proj"}
_OPENCLIP_TOP = {"embeddings.token_embedding.weight": "token_embedding.weight",
                 "embeddings.position_embedding.weight": "positional_embedding",
                 "final_layer_norm.weight": "ln_final.weight", "final_layer_norm.bias": "ln_final.bias"}


# ------------------------------------------------------------------ the rename tables

def unet_table(config) -> list[tuple[str, str, dict]]:
    """(diffusers prefix, original prefix, renames inside) for every UNet block of this config."""
    cfg = dict(config)
    if cfg.get("addition_embed_type") or cfg.get("class_embed_type") or cfg.get("num_class_embeds"):
        raise UserError("single-file export supports SD1.x/SD2.x UNets only (this one has extra embeddings, "
                        "e.g. SDXL)")
    return unet_block_table(cfg)


def unet_block_table(config) -> list[tuple[str, str, dict]]:
    """unet_table without the check for added embeddings: the blocks SD1.x, SD2.x and SDXL share
    (single_file_sdxl adds SDXL's label_emb)."""
    cfg = dict(config)
    per = cfg["layers_per_block"]
    if not isinstance(per, int):
        raise UserError("single-file export needs one layers_per_block for every UNet block")
    n = len(cfg["block_out_channels"])
    up_attn = ["CrossAttn" in t for t in cfg["up_block_types"]]
    t = [("time_embedding.linear_1", "time_embed.0", {}), ("time_embedding.linear_2", "time_embed.2", {}),
         ("conv_in", "input_blocks.0.0", {}), ("conv_norm_out", "out.0", {}), ("conv_out", "out.2", {})]
    for i in range(n):
        for j in range(per):
            k = 1 + i * (per + 1) + j
            t += [(f"down_blocks.{i}.resnets.{j}", f"input_blocks.{k}.0", _UNET_RESNET),
                  (f"down_blocks.{i}.attentions.{j}", f"input_blocks.{k}.1", {})]
        if i < n - 1:
            t.append((f"down_blocks.{i}.downsamplers.0.conv", f"input_blocks.{1 + i * (per + 1) + per}.0.op", {}))
    t += [("mid_block.resnets.0", "middle_block.0", _UNET_RESNET), ("mid_block.attentions.0", "middle_block.1", {}),
          ("mid_block.resnets.1", "middle_block.2", _UNET_RESNET)]
    for i in range(n):
        for j in range(per + 1):
            k = i * (per + 1) + j
            t += [(f"up_blocks.{i}.resnets.{j}", f"output_blocks.{k}.0", _UNET_RESNET),
                  (f"up_blocks.{i}.attentions.{j}", f"output_blocks.{k}.1", {})]
        if i < n - 1:  # the upsampler sits after the last resnet (and its attention, if any)
            t.append((f"up_blocks.{i}.upsamplers.0.conv",
                      f"output_blocks.{i * (per + 1) + per}.{2 if up_attn[i] else 1}.conv", {}))
    return t


def vae_table(config) -> list[tuple[str, str, dict]]:
    """The same for the VAE; the decoder's up blocks are numbered the other way round."""
    n = len(config["down_block_types"])
    m = len(config["up_block_types"])
    t = [("encoder.conv_norm_out", "encoder.norm_out", {}), ("decoder.conv_norm_out", "decoder.norm_out", {})]
    for side in ("encoder", "decoder"):
        t += [(f"{side}.mid_block.resnets.0", f"{side}.mid.block_1", _VAE_RESNET),
              (f"{side}.mid_block.resnets.1", f"{side}.mid.block_2", _VAE_RESNET),
              (f"{side}.mid_block.attentions.0", f"{side}.mid.attn_1", _VAE_ATTN)]
        for p in ("conv_in", "conv_out"):
            t.append((f"{side}.{p}", f"{side}.{p}", {}))
    for i in range(n):
        t += [(f"encoder.down_blocks.{i}.resnets", f"encoder.down.{i}.block", {}),
              (f"encoder.down_blocks.{i}.downsamplers.0.conv", f"encoder.down.{i}.downsample.conv", {})]
    for i in range(m):
        t += [(f"decoder.up_blocks.{i}.resnets", f"decoder.up.{m - 1 - i}.block", {}),
              (f"decoder.up_blocks.{i}.upsamplers.0.conv", f"decoder.up.{m - 1 - i}.upsample.conv", {})]
    t += [("quant_conv", "quant_conv", {}), ("post_quant_conv", "post_quant_conv", {})]
    return t


def _rename_inside(rest: str, renames: dict) -> str:
    for a, b in renames.items():
        if rest == a or rest.startswith(a + "."):
            return b + rest[len(a):]
    return rest


def _apply(table, sd: dict, what: str, reverse: bool = False) -> dict:
    """Rename every key of `sd` by the longest matching prefix of `table` (either direction)."""
    pairs = []
    for d, o, inner in table:
        if reverse:
            pairs.append((o, d, {b: a for a, b in inner.items()}))
        else:
            pairs.append((d, o, inner))
    pairs.sort(key=lambda p: -len(p[0]))
    out = {}
    for key, value in sd.items():
        for src, dst, inner in pairs:
            if key.startswith(src + "."):
                rest = key[len(src) + 1:]
                rest = _rename_inside(rest, inner)
                out[f"{dst}.{rest}"] = value
                break
        else:
            raise UserError(f"{what}: no single-file name for {key!r}; this architecture is not SD1.x/SD2.x")
    return out


def _vae_resnet_inner(sd: dict, reverse: bool) -> dict:
    """nin_shortcut <-> conv_shortcut inside the VAE's down/up block resnets (numbered lists)."""
    a, b = ("nin_shortcut", "conv_shortcut") if reverse else ("conv_shortcut", "nin_shortcut")
    return {k.replace(f".{a}.", f".{b}."): v for k, v in sd.items()}


# ------------------------------------------------------------------ the three models

def unet_to_original(sd: dict, config) -> dict:
    return {UNET + k: v for k, v in _apply(unet_table(config), sd, "UNet").items()}


def unet_from_original(sd: dict, config) -> dict:
    inner = {k[len(UNET):]: v for k, v in sd.items() if k.startswith(UNET)}
    return _apply(unet_table(config), inner, "UNet", reverse=True)


def vae_to_original(sd: dict, config) -> dict:
    out = _vae_resnet_inner(_apply(vae_table(config), sd, "VAE"), reverse=False)
    for k, v in out.items():
        if ".mid.attn_1." in k and k.endswith(".weight") and v.ndim == 2:
            out[k] = v[:, :, None, None]  # the original attention uses 1x1 convs
    return {VAE + k: v for k, v in out.items()}


def vae_from_original(sd: dict, config) -> dict:
    inner = {k[len(VAE):]: v for k, v in sd.items() if k.startswith(VAE)}
    out = _apply(vae_table(config), _vae_resnet_inner(inner, reverse=True), "VAE", reverse=True)
    for k, v in out.items():
        if ".mid_block.attentions.0." in k and v.ndim == 4:
            out[k] = v[:, :, 0, 0]
    return out


def _te_names(sd: dict) -> dict:
    """Text-encoder keys without transformers' optional `text_model.` level (it moved in transformers 5)."""
    return {(k[len("text_model."):] if k.startswith("text_model.") else k): v for k, v in sd.items()}


def text_to_original(sd: dict, layout: str) -> dict:
    sd = _te_names(sd)
    sd.pop("embeddings.position_ids", None)
    if layout == "clip":
        return {CLIP + "text_model." + k: v for k, v in sd.items()}
    out = {}
    qkv: dict[str, dict] = {}
    for k, v in sd.items():
        if k in _OPENCLIP_TOP:
            out[OPENCLIP + _OPENCLIP_TOP[k]] = v
            continue
        parts = k.split(".")
        if parts[:2] != ["encoder", "layers"]:
            raise UserError(f"text encoder: no OpenCLIP name for {k!r}")
        i, rest = parts[2], ".".join(parts[3:])
        head = f"{OPENCLIP}transformer.resblocks.{i}."
        if rest.split(".")[1] in ("q_proj", "k_proj", "v_proj") and rest.startswith("self_attn."):
            qkv.setdefault(head + "attn.in_proj_" + rest.split(".")[-1], {})[rest.split(".")[1][0]] = v
            continue
        out[head + _rename_inside(rest, _OPENCLIP_LAYER)] = v
    import torch

    for k, parts in qkv.items():
        out[k] = torch.cat([parts["q"], parts["k"], parts["v"]], 0)
    layers = {k.split(".")[4] for k in out if ".resblocks." in k}
    if len(layers) == 23:  # SD2's ViT-H minus its unused last block: fill in what strict loaders look for
        out.update(_openclip_unused(out))
    return out


def _openclip_unused(out: dict) -> dict:
    """OpenCLIP-H's block 23, text_projection and logit_scale, which SD2 never runs (it takes the
    penultimate block's output) and diffusers drops: a copy of block 22, the identity and 1 (as
    kohya's sd-scripts does), so that loaders which want every key of the full model find them."""
    import torch

    head = f"{OPENCLIP}transformer.resblocks."
    extra = {k.replace(head + "22.", head + "23."): v.clone() for k, v in out.items() if k.startswith(head + "22.")}
    width = out[OPENCLIP + "ln_final.weight"].shape[0]
    dtype = out[OPENCLIP + "ln_final.weight"].dtype
    extra[OPENCLIP + "text_projection"] = torch.eye(width, dtype=dtype)
    extra[OPENCLIP + "logit_scale"] = torch.tensor(1.0, dtype=dtype)
    return extra


def text_from_original(sd: dict, layout: str) -> dict:
    """Text-encoder keys as transformers 5's CLIPTextModel names them (no `text_model.`)."""
    if layout == "clip":
        head = CLIP + "text_model."
        return {k[len(head):]: v for k, v in sd.items() if k.startswith(head)}
    top = {b: a for a, b in _OPENCLIP_TOP.items()}
    layer = {b: a for a, b in _OPENCLIP_LAYER.items()}
    out = {}
    for k, v in sd.items():
        if not k.startswith(OPENCLIP):
            continue
        k = k[len(OPENCLIP):]
        if k in top:
            out[top[k]] = v
        elif k.startswith("transformer.resblocks."):
            parts = k.split(".")
            i, rest = parts[2], ".".join(parts[3:])
            head = f"encoder.layers.{i}."
            if rest.startswith("attn.in_proj_"):
                kind = rest.rsplit("_", 1)[-1]
                for name, chunk in zip("qkv", v.chunk(3, 0)):
                    out[f"{head}self_attn.{name}_proj.{kind}"] = chunk.clone()
            else:
                out[head + _rename_inside(rest, layer)] = v
        # text_projection / logit_scale of a full OpenCLIP model: SD2 does not use them
    if "encoder.layers.23.layer_norm1.weight" in out and "encoder.layers.24.layer_norm1.weight" not in out:
        out = {k: v for k, v in out.items() if not k.startswith("encoder.layers.23.")}  # SD2: penultimate
    return out


# ------------------------------------------------------------------ whole checkpoints

def text_layout(text_encoder_config) -> str:
    """'clip' (SD1, OpenAI CLIP: quick-GELU) or 'openclip' (SD2, OpenCLIP ViT-H: GELU)."""
    act = dict(text_encoder_config).get("hidden_act", "quick_gelu")
    return "openclip" if act == "gelu" else "clip"


def _sd_and_config(m):
    if isinstance(m, tuple):
        return m
    return m.state_dict(), m.config


def single_file_state_dict(unet, vae, text_encoder, *, layout: str | None = None,
                           v_prediction: bool = False) -> dict:
    """One state dict in the original layout from the three models (modules, or (state_dict, config))."""
    import torch

    usd, ucfg = _sd_and_config(unet)
    vsd, vcfg = _sd_and_config(vae)
    tsd, tcfg = _sd_and_config(text_encoder)
    layout = layout or text_layout(tcfg if isinstance(tcfg, dict) else tcfg.to_dict())
    out = {**unet_to_original(usd, ucfg), **vae_to_original(vsd, vcfg), **text_to_original(tsd, layout)}
    if v_prediction:
        out[V_PRED_KEY] = torch.tensor([])  # ComfyUI reads its presence (SDXL-class files)
    return out


def diffusers_state_dicts(single_file_sd: dict, unet_config, vae_config, *, layout: str | None = None) -> dict:
    """{'unet', 'vae', 'text_encoder'} state dicts in diffusers / transformers names (a NaN/inf tensor in the
    checkpoint: one line naming it)."""
    from trainer.formats.safe_load import require_finite

    require_finite(single_file_sd, "the single-file checkpoint")
    if layout is None:
        layout = "openclip" if any(k.startswith(OPENCLIP) for k in single_file_sd) else "clip"
    return {"unet": unet_from_original(single_file_sd, unet_config),
            "vae": vae_from_original(single_file_sd, vae_config),
            "text_encoder": text_from_original(single_file_sd, layout)}


def require_written_finite(sd: dict, out_path, half: bool) -> None:
    """A checkpoint with a NaN/inf tensor is never written (it would draw black pictures); with --half a finite
    value past float16's range turns inf, said as such."""
    from trainer.formats.safe_load import first_non_finite

    bad = first_non_finite(sd)
    if bad is not None:
        why = " (finite in float32, past float16's range: export without --half)" if half else ""
        raise UserError(f"{out_path} was not written: tensor {bad} holds NaN or inf values{why}; the model is "
                        "damaged or a merged LoRA broke it")


def check_source_folder(model_dir) -> Path:
    """A diffusers SD 1.x/2.x folder that can be written as one file (unet, vae, text_encoder, scheduler
    configs); torch-free, for the CLI. SDXL folders are trainer.families.sdxl's."""
    d = Path(model_dir)
    if not d.is_dir():
        raise UserError(f"--model {d} is not a folder")
    missing = [p for p in ("unet/config.json", "vae/config.json", "text_encoder/config.json",
                           "scheduler/scheduler_config.json") if not (d / p).is_file()]
    if missing and (d / "pytorch_lora_weights.safetensors").is_file():
        raise UserError(f"--model {d} holds a LoRA, not a model: pass the base model as --model and this folder "
                        "as --lora (with --merge, or --kohya)")
    if missing:
        raise UserError(f"--model {d} is not a diffusers Stable Diffusion folder (no {missing[0]})")
    from trainer.formats.safe_load import check_model_files, read_config

    cfg = read_config(d / "unet/config.json")
    if cfg.get("addition_embed_type"):
        raise UserError(f"--model {d} is an SDXL-style model; single-file export supports SD1.x and SD2.x")
    check_model_files(d, ("unet", "vae", "text_encoder", "scheduler"), SOURCE_WEIGHTS)  # damaged files, custom code
    return d


def prediction_type(model_dir) -> str:
    return json.loads((Path(model_dir) / "scheduler/scheduler_config.json").read_text()).get(
        "prediction_type", "epsilon")


def header(model_dir, *, half: bool, extra: dict | None = None) -> dict:
    pred = prediction_type(model_dir)
    te_cfg = json.loads((Path(model_dir) / "text_encoder/config.json").read_text())
    sd2 = text_layout(te_cfg) == "openclip"
    arch = "stable-diffusion-v2-768-v" if sd2 and pred == "v_prediction" else (
        "stable-diffusion-v2-512" if sd2 else "stable-diffusion-v1")
    return modelspec(model_dir, arch, pred, half=half, extra=extra)


def modelspec(model_dir, architecture: str, prediction_type: str, *, half: bool, extra: dict | None = None) -> dict:
    """The file header: Stability's modelspec fields (what UIs show) and ours."""
    meta = {"modelspec.sai_model_spec": "1.0.0", "modelspec.architecture": architecture,
            "modelspec.implementation": "https://github.com/Stability-AI/generative-models",
            "modelspec.prediction_type": "v" if prediction_type == "v_prediction" else "epsilon",
            "modelspec.title": Path(model_dir).resolve().name,
            "dbtrain.source": "diffusers folder", "dbtrain.dtype": "float16" if half else "float32"}
    meta.update(extra or {})
    return meta


def ldm_config(model_dir) -> dict | None:
    """The original (ldm) model config of this folder, what A1111 reads from a `<name>.yaml` beside a
    checkpoint; None if the UNet cannot be written that way (per-block head widths that differ)."""
    d = Path(model_dir)
    u, v, s, t = (json.loads((d / f).read_text()) for f in (
        "unet/config.json", "vae/config.json", "scheduler/scheduler_config.json", "text_encoder/config.json"))
    ch = u["block_out_channels"]
    heads = u.get("num_attention_heads") or u["attention_head_dim"]  # diffusers' SD configs name heads so
    unet = {"use_checkpoint": False, "use_fp16": False, "image_size": u["sample_size"], "in_channels": u["in_channels"],
            "out_channels": u["out_channels"], "model_channels": ch[0],
            "attention_resolutions": [2 ** i for i, b in enumerate(u["down_block_types"]) if "CrossAttn" in b],
            "num_res_blocks": u["layers_per_block"], "channel_mult": [c // ch[0] for c in ch],
            "transformer_depth": u.get("transformer_layers_per_block") or 1, "context_dim": u["cross_attention_dim"],
            "use_linear_in_transformer": bool(u.get("use_linear_projection")), "legacy": False}
    if isinstance(heads, int):
        unet["num_heads"] = heads
    else:
        width = {c // h for c, h in zip(ch, heads)}
        if len(width) != 1:
            return None
        unet.update(num_heads=-1, num_head_channels=width.pop())
    vch = v["block_out_channels"]
    sd2 = text_layout(t) == "openclip"
    cond = ({"target": "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder",
             "params": {"freeze": True, "layer": "penultimate"}} if sd2 else
            {"target": "ldm.modules.encoders.modules.FrozenCLIPEmbedder"})
    params = {"linear_start": s.get("beta_start", 0.00085), "linear_end": s.get("beta_end", 0.012),
              "num_timesteps_cond": 1, "log_every_t": 200, "timesteps": s.get("num_train_timesteps", 1000),
              "first_stage_key": "jpg", "cond_stage_key": "txt", "image_size": u["sample_size"],
              "channels": u["in_channels"], "cond_stage_trainable": False, "conditioning_key": "crossattn",
              "monitor": "val/loss_simple_ema", "scale_factor": v.get("scaling_factor", 0.18215), "use_ema": False,
              "unet_config": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": unet},
              "first_stage_config": {"target": "ldm.models.autoencoder.AutoencoderKL", "params": {
                  "embed_dim": v["latent_channels"], "monitor": "val/rec_loss",
                  "ddconfig": {"double_z": True, "z_channels": v["latent_channels"], "resolution": 256,
                               "in_channels": v["in_channels"], "out_ch": v["out_channels"], "ch": vch[0],
                               "ch_mult": [c // vch[0] for c in vch], "num_res_blocks": v["layers_per_block"],
                               "attn_resolutions": [], "dropout": 0.0},
                  "lossconfig": {"target": "torch.nn.Identity"}}},
              "cond_stage_config": cond}
    if s.get("prediction_type") == "v_prediction":
        params = {"parameterization": "v", **params}
    return {"model": {"base_learning_rate": 1.0e-4, "target": "ldm.models.diffusion.ddpm.LatentDiffusion",
                      "params": params}}


def yaml_path(out_path) -> Path:
    return Path(out_path).with_suffix(".yaml")


def save_single_file(model_dir, out_path, *, components, half: bool = False, metadata: dict | None = None) -> Path:
    """Write `components` = (unet, vae, text_encoder) of the SD1.x/SD2.x folder `model_dir` (its own weights,
    or e.g. trained or merged ones) as one original-layout .safetensors file; the folder gives the configs and
    the scheduler's prediction type. A v-prediction model also gets `<name>.yaml` (see the module doc)."""
    from trainer.formats.io import check_new_file, write_new_safetensors

    check_new_file(out_path)
    v_pred = prediction_type(model_dir) == "v_prediction"
    if v_pred and yaml_path(out_path).exists():
        raise UserError(f"{yaml_path(out_path)} already exists (a v-prediction checkpoint gets its config there); "
                        "choose another output name")
    unet, vae, te = components
    sd = single_file_state_dict(unet, vae, te, v_prediction=v_pred)
    if half:
        sd = {k: (v.half() if v.is_floating_point() else v) for k, v in sd.items()}
    else:
        sd = {k: (v.float() if v.is_floating_point() else v) for k, v in sd.items()}
    sd = {k: v.detach().to("cpu") for k, v in sd.items()}
    require_written_finite(sd, out_path, half)
    out = write_new_safetensors(out_path, sd, header(model_dir, half=half, extra=metadata))
    cfg = ldm_config(model_dir) if v_pred else None
    if cfg is not None:  # A1111 reads <name>.yaml first; without it, it guesses v-prediction only for SD2 shapes
        import yaml

        y = yaml_path(out)
        try:
            with open(y, "x") as f:  # "x": never over a file that appeared meanwhile
                f.write(yaml.safe_dump(cfg, sort_keys=False))
        except FileExistsError:
            raise UserError(f"{y} appeared while writing; {out} was written without its config") from None
    return out
