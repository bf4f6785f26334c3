"""SDXL pieces the training loop calls: folder checks, the two-encoder prompt, time ids, loading.

  is_sdxl(folder) / check_sdxl_folder(folder)       torch-free; bad folders are one-line UserErrors
  load_sdxl_components(folder) -> SDXLComponents    tokenizers, both text encoders, VAE, UNet, DDPM scheduler
  encode_prompt_sdxl(tokenizers, encoders, prompts, device) -> (prompt_embeds [B, L, d1+d2], pooled [B, p2])
  crop_geometry(width, height, resolution, crop_xy) -> (original_size, crop_top_left), as data.to_tensor crops
  add_time_ids(original_size, crop_top_left, target_size, dtype, device) -> [6]; time_ids_batch -> [B, 6]
  draw_view(image_set, i, gen) -> ImageSet.tensor's (pixels, flipped) plus that view's geometry
  vae_dtype(vae, wanted)                              float32 where SDXL's VAE would overflow in float16
What loop.py / export / sample call so that they stay one code path for SD1/SD2 and SDXL:
  text_side(comps), cat_embeddings(picked), added_cond(pooled, views, res), unet_kwargs(batch, dtype)
  load_pipeline(folder)          StableDiffusionXLPipeline for SDXL, else StableDiffusionPipeline
  merge_lora_sdxl(folder, file)  the four models with a LoRA merged in (--save_single_file of a LoRA run)
  save_embedding_sdxl / load_embedding_sdxl / load_embedding   clip_l + clip_g Textual Inversion files

The UNet's call per batch (as diffusers' train_dreambooth_lora_sdxl.py does):
  unet(noisy, t, prompt_embeds, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
with time_ids [B, 6] stacked from add_time_ids per image (class images generated at the training
resolution: original = target = (res, res), crop (0, 0)).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from trainer.errors import UserError

SDXL_PIPELINES = ("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline",
                  "StableDiffusionXLInpaintPipeline")


def _json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _present(index: dict, name: str) -> bool:
    """model_index.json lists the component with a class ([lib, cls]; a refiner has [null, null])."""
    entry = index.get(name)
    return isinstance(entry, list) and len(entry) == 2 and entry[1] is not None


def is_sdxl(folder) -> bool:
    """Whether `folder` is an SDXL diffusers folder (base or refiner): model_index.json's pipeline class,
    or, for a folder without one, a UNet with SDXL's added text/time conditioning."""
    d = Path(folder)
    name = _json(d / "model_index.json").get("_class_name", "")
    if name:
        return name in SDXL_PIPELINES or name.startswith("StableDiffusionXL")
    return _json(d / "unet" / "config.json").get("addition_embed_type") == "text_time"


def check_sdxl_folder(folder, what: str = "--pretrained_model_name_or_path") -> Path:
    """The folder if it is a complete SDXL base model, else a UserError saying what to pass instead."""
    d = Path(folder)
    if not d.is_dir():
        raise UserError(f"{what} {d} is not a folder (a local diffusers SDXL folder is required)")
    index = _json(d / "model_index.json")
    unet = _json(d / "unet" / "config.json")
    refiner = index.get("requires_aesthetics_score") is True or (
        index and not _present(index, "text_encoder") and _present(index, "text_encoder_2"))
    if refiner:
        raise UserError(f"{what} {d} is an SDXL refiner (only text_encoder_2, aesthetic-score conditioning); "
                        "pass the SDXL base model folder (e.g. stable-diffusion-xl-base-1.0)")
    missing = [p for p in ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "unet", "vae")
               if not (d / p).is_dir()] + ([] if (d / "scheduler/scheduler_config.json").is_file() else ["scheduler"])
    if missing:
        raise UserError(f"{what} {d} is an SDXL folder without {', '.join(missing)}; download the whole "
                        "base model folder (both text encoders and both tokenizers)")
    if unet.get("in_channels", 4) != 4:
        raise UserError(f"{what} {d}: its UNet takes {unet.get('in_channels')} input channels (an inpainting "
                        "model); pass the SDXL base model folder")
    return d


# ------------------------------------------------------------------ time ids and crops

def resized_size(width: int, height: int, resolution: int) -> tuple[int, int]:
    """(width, height) after trainer.data.to_tensor's resize: the short side to `resolution`."""
    scale = resolution / min(width, height)
    return max(resolution, round(width * scale)), max(resolution, round(height * scale))


def crop_geometry(width: int, height: int, resolution: int, crop_xy=None, *, flip: bool = False):
    """((orig_h, orig_w), (crop_top, crop_left)) of trainer.data.to_tensor's view of a width x height image.

    Same arithmetic as to_tensor: the short side resized to `resolution`, a resolution-square crop at the
    relative position crop_xy (None: centered). With flip, the crop's left edge is given in the mirrored
    resized image, as diffusers' train_dreambooth_lora_sdxl.py does (it flips before cropping).
    """
    nw, nh = resized_size(width, height, resolution)
    fx, fy = (0.5, 0.5) if crop_xy is None else crop_xy
    left, top = int(round((nw - resolution) * fx)), int(round((nh - resolution) * fy))
    if flip:
        left = nw - resolution - left
    return (height, width), (top, left)


def view_geometry(image_set, i: int, crop_xy=None, flip: bool = False):
    """crop_geometry of image i of a trainer.data.ImageSet for the crop it drew (None for its cached
    center-cropped views: ImageSet.cacheable(i))."""
    w, h = image_set.images[i].size
    return crop_geometry(w, h, image_set.resolution, None if image_set.cacheable(i) else crop_xy, flip=flip)


def draw_view(image_set, i: int, gen):
    """ImageSet.tensor(i, gen) with the view's geometry: (pixels, flipped, (original_size, crop_top_left)).

    Draws from `gen` exactly as ImageSet.tensor does (flip, then the crop's x and y), so the loop can call
    this instead and get the same pixels and random stream (tests/test_sdxl.py checks that).
    """
    import torch

    from trainer.core.images import to_tensor

    flip = bool(torch.randint(0, 2, (), generator=gen)) if image_set.random_flip else False
    if image_set.cacheable(i):
        return image_set.fixed_view(i, flip), flip, view_geometry(image_set, i, None, flip)
    crop = (float(torch.rand((), generator=gen)), float(torch.rand((), generator=gen)))
    pixels = to_tensor(image_set.images[i], image_set.resolution, crop_xy=crop, flip=flip,
                       resample=image_set.resample)
    return pixels, flip, view_geometry(image_set, i, crop, flip)


def time_ids_batch(geometries, resolution: int, dtype=None, device=None):
    """[B, 6] time ids for a batch of (original_size, crop_top_left) views, all trained at resolution^2."""
    import torch

    return torch.stack([add_time_ids(o, c, (resolution, resolution), dtype, device) for o, c in geometries])


def add_time_ids(original_size, crops_coords_top_left, target_size, dtype=None, device=None):
    """SDXL's micro-conditioning of one image: [orig_h, orig_w, crop_top, crop_left, target_h, target_w]."""
    import torch

    ids = list(original_size) + list(crops_coords_top_left) + list(target_size)
    if len(ids) != 6:
        raise ValueError(f"add_time_ids: expected (h, w) pairs, got {original_size}, {crops_coords_top_left}, "
                         f"{target_size}")
    return torch.tensor(ids, dtype=dtype or torch.float32, device=device)


# ------------------------------------------------------------------ the text encoders

def encode_prompt_sdxl(tokenizers, text_encoders, prompts, device=None):
    """(prompt_embeds [B, L, d1 + d2], pooled [B, p2]) as StableDiffusionXLPipeline.encode_prompt gives for
    the positive prompt: each encoder's penultimate hidden states, concatenated; the second encoder's
    projected pooled output. Gradients flow (no no_grad here): the caller decides for text-encoder training.
    """
    import torch

    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    states, pooled = [], None
    for tok, enc in zip(tokenizers, text_encoders):
        ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids
        out = enc(ids.to(device if device is not None else enc.device), output_hidden_states=True)
        if pooled is None and out[0].ndim == 2:  # CLIPTextModelWithProjection: text_embeds first
            pooled = out[0]
        states.append(out.hidden_states[-2])
    if pooled is None:
        raise ValueError("encode_prompt_sdxl: no encoder returned a pooled projection (text_encoder_2 must be "
                         "a CLIPTextModelWithProjection)")
    embeds = torch.cat(states, dim=-1).to(dtype=text_encoders[-1].dtype)
    return embeds, pooled


# ------------------------------------------------------------------ loading

@dataclass
class SDXLComponents:
    unet: object
    vae: object
    text_encoder: object
    text_encoder_2: object
    tokenizer: object
    tokenizer_2: object
    noise_scheduler: object
    prediction_type: str

    @property
    def tokenizers(self):
        return [self.tokenizer, self.tokenizer_2]

    @property
    def text_encoders(self):
        return [self.text_encoder, self.text_encoder_2]


def load_sdxl_components(folder, *, vae_path=None, variant: str | None = None) -> SDXLComponents:
    """The SDXL base model's parts, on the CPU in the stored dtype (variant weights as float32).

    The noise scheduler is DDPMScheduler.from_pretrained(folder, subfolder="scheduler") whatever class the
    folder ships (SDXL's is Euler), as diffusers' training scripts do: training uses the DDPM forward process.

    vae_path: an fp16-safe VAE to use instead of the folder's own (diffusers' scripts call the flag
    --pretrained_vae_model_name_or_path), a local folder holding an AutoencoderKL (config.json + weights,
    e.g. a download of madebyollin/sdxl-vae-fp16-fix); its config has force_upcast false, so vae_dtype()
    then lets it run in float16. SDXL's own VAE overflows in float16 and is kept in float32.
    """
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    root = check_sdxl_folder(folder)
    kw = {"variant": variant} if variant else {}
    pred = _json(root / "scheduler" / "scheduler_config.json").get("prediction_type", "epsilon")
    if pred not in ("epsilon", "v_prediction", "sample"):
        raise UserError(f"{root}/scheduler: unsupported prediction_type {pred!r}")
    if vae_path is not None:
        vp = Path(vae_path)
        if not (vp / "config.json").is_file():
            raise UserError(f"--pretrained_vae_model_name_or_path {vp} is not a diffusers AutoencoderKL folder "
                            "(no config.json)")
        vae = AutoencoderKL.from_pretrained(vp)
    else:
        vae = AutoencoderKL.from_pretrained(root, subfolder="vae", **kw)
    comps = SDXLComponents(
        unet=UNet2DConditionModel.from_pretrained(root, subfolder="unet", **kw),
        vae=vae,
        text_encoder=CLIPTextModel.from_pretrained(root, subfolder="text_encoder", **kw),
        text_encoder_2=CLIPTextModelWithProjection.from_pretrained(root, subfolder="text_encoder_2", **kw),
        tokenizer=CLIPTokenizer.from_pretrained(root, subfolder="tokenizer"),
        tokenizer_2=CLIPTokenizer.from_pretrained(root, subfolder="tokenizer_2"),
        noise_scheduler=DDPMScheduler.from_pretrained(root, subfolder="scheduler"),
        prediction_type=pred)
    if variant:
        for m in (comps.unet, comps.vae, comps.text_encoder, comps.text_encoder_2):
            m.float()
    return comps


def vae_dtype(vae, wanted):
    """The dtype to run `vae` in when the run wants `wanted`: float32 instead of float16 when the VAE's
    config says force_upcast (SDXL's original VAE: its activations overflow float16 and decode to NaN).
    bfloat16 has float32's range and is kept. To encode in float16, pass an fp16-safe VAE folder
    (load_sdxl_components(vae_path=...), diffusers' --pretrained_vae_model_name_or_path)."""
    import torch

    if wanted == torch.float16 and getattr(vae.config, "force_upcast", False):
        return torch.float32
    return wanted


# ------------------------------------------------------------------ what the loop, export and sample call

def text_side(comps):
    """(tokenizers, text encoders) of loaded components: one of each for SD1/SD2, two for SDXL."""
    encoders = [e for e in (comps.text_encoder, getattr(comps, "text_encoder_2", None)) if e is not None]
    tokenizers = [t for t in (comps.tokenizer, getattr(comps, "tokenizer_2", None)) if t is not None]
    return tokenizers, encoders


def cat_embeddings(picked):
    """torch.cat of cached per-prompt embeddings: tensors (SD1/SD2) or (prompt_embeds, pooled) pairs (SDXL)."""
    import torch

    if isinstance(picked[0], tuple):
        return tuple(torch.cat(parts) for parts in zip(*picked))
    return torch.cat(picked)


def added_cond(pooled, geometries, resolution: int, device=None) -> dict:
    """The SDXL UNet's added_cond_kwargs for a batch: the pooled prompt embeddings and [B, 6] time ids from
    each row's (original_size, crop_top_left) view (float32: sizes such as 1651 are not exact in bfloat16)."""
    return {"text_embeds": pooled, "time_ids": time_ids_batch(geometries, resolution, device=device)}


def unet_kwargs(batch, dtype) -> dict:
    """The extra UNet arguments of a loop.Batches.make() batch: {} for SD1/SD2 (3 items); for SDXL
    added_cond_kwargs with the pooled embeddings in the weights' dtype (the time ids stay float32)."""
    if len(batch) < 4:
        return {}
    added = batch[3]
    return {"added_cond_kwargs": {"text_embeds": added["text_embeds"].to(dtype), "time_ids": added["time_ids"]}}


def load_pipeline(folder, *, vae_path=None, class_images: bool = False, **kw):
    """The pipeline of a diffusers folder: StableDiffusionXLPipeline for SDXL (class images without the
    invisible watermark, which would become part of the prior), else StableDiffusionPipeline without the
    safety checker. vae_path: a VAE folder to use instead of the folder's own (fp16-safe SDXL VAEs)."""
    if vae_path and "vae" not in kw:
        from diffusers import AutoencoderKL

        kw["vae"] = AutoencoderKL.from_pretrained(vae_path)
    if is_sdxl(folder):
        from diffusers import StableDiffusionXLPipeline

        if class_images:
            kw["add_watermarker"] = False
        return StableDiffusionXLPipeline.from_pretrained(folder, **kw)
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False, **kw)


def merge_lora_sdxl(model_dir, lora_file, scale: float = 1.0):
    """(unet, vae, text_encoder, text_encoder_2) of an SDXL folder with a LoRA file (kohya or diffusers
    names, adapters on the UNet and either text encoder) merged in: W += scale * alpha/rank * up @ down."""
    from trainer.formats.kohya_lora import lora_updates, merge_into, read_lora
    from trainer.formats.single_file_sdxl import load_components_sdxl

    unet, vae, te, te2 = load_components_sdxl(check_sdxl_folder(model_dir, "--model"))
    modules = {"unet": unet, "text_encoder": te, "text_encoder_2": te2}
    sd, meta = read_lora(lora_file)
    merge_into(modules, lora_updates(sd, meta, modules), scale)
    return unet, vae, te, te2


# ------------------------------------------------------------------ Textual Inversion files

EMBEDDING_KEYS = ("clip_l", "clip_g")  # the SDXL embedding file's tensors (diffusers' advanced script, A1111)


def save_embedding_sdxl(path, new_l, new_g, step: int | None = None):
    """An SDXL embedding file: clip_l [n, d1] and clip_g [n, d2] (the rows of NewTokenEmbedding new_l / new_g),
    with the placeholder in the header; written to a temporary name and renamed."""
    import os

    from safetensors.torch import save_file

    path = Path(path)
    state = {k: e.rows.detach().float().cpu().contiguous() for k, e in zip(EMBEDDING_KEYS, (new_l, new_g))}
    meta = {"dbtrain.placeholder": new_l.placeholder, "vectors": str(state["clip_l"].shape[0])}
    if step is not None:
        meta["step"] = str(step)
    tmp = path.with_name("." + path.name + ".tmp")
    save_file(state, str(tmp), metadata=meta)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
    return path


def is_embedding_sdxl(path) -> bool:
    try:
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            return set(EMBEDDING_KEYS) <= set(f.keys())
    except Exception:  # noqa: BLE001 - not a safetensors file: not ours to read here
        return False


def load_embedding_sdxl(pipe, path, token: str | None = None) -> str:
    """Load an SDXL embedding file (clip_l, clip_g) into both text encoders of an SDXL pipeline, as diffusers
    documents it (load_textual_inversion per encoder); returns the token to write in prompts (the placeholder
    the file records, else <file stem> as A1111 names embeddings)."""
    from safetensors import safe_open

    path = Path(path)
    if getattr(pipe, "text_encoder_2", None) is None:
        raise UserError(f"{path} is an SDXL embedding (clip_l / clip_g); load it with an SDXL model")
    if not is_embedding_sdxl(path):
        raise UserError(f"{path}: not an SDXL embedding (an SDXL model needs a file with clip_l and clip_g rows; "
                        "SD 1.x / 2.x embeddings do not fit its two text encoders)")
    with safe_open(str(path), "pt") as f:
        rows = {k: f.get_tensor(k).float() for k in EMBEDDING_KEYS}
        token = token or (f.metadata() or {}).get("dbtrain.placeholder") or f"<{path.stem}>"
    for key, enc, tok in (("clip_l", pipe.text_encoder, pipe.tokenizer),
                          ("clip_g", pipe.text_encoder_2, pipe.tokenizer_2)):
        dim = enc.get_input_embeddings().weight.shape[1]
        if rows[key].ndim != 2 or rows[key].shape[1] != dim:
            raise UserError(f"{path}: {key} has shape {tuple(rows[key].shape)}, this model's encoder takes width {dim}")
        try:
            pipe.load_textual_inversion({token: rows[key].to(enc.dtype)}, token=token, text_encoder=enc, tokenizer=tok)
        except ValueError as e:
            raise UserError(f"{path}: {str(e).splitlines()[0]}") from e
    return token


def load_embedding(pipe, path) -> str:
    """Any embedding file into a pipeline: SDXL pipelines take clip_l/clip_g files (load_embedding_sdxl), others
    trainer.embeddings.load_embedding_into's formats."""
    if getattr(pipe, "text_encoder_2", None) is not None:
        return load_embedding_sdxl(pipe, path)
    from trainer.methods.embeddings import load_embedding_into

    return load_embedding_into(pipe, path)
