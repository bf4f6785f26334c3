"""SDXL: SD with two text encoders (CLIP ViT-L and OpenCLIP bigG), pooled embeddings and time ids.

What differs from trainer.families.sd, as diffusers' train_dreambooth_lora_sdxl.py does it:
  prompts   each encoder's penultimate hidden states, concatenated [B, L, d1 + d2]; the second
            encoder's projected pooled output [B, p2]
  UNet      unet(noisy, t, prompt_embeds, added_cond_kwargs={"text_embeds": pooled, "time_ids": ids}),
            ids [B, 6] = (original h, w, crop top, left, target h, w) of each row's view (class
            images generated at the training resolution: original = target = (res, res), crop (0, 0));
            target = the training square, or with aspect-ratio buckets the batch's bucket
  VAE       SDXL's own overflows in float16: float32 unless the VAE is fp16-safe (force_upcast false)
  folders   a refiner (text_encoder_2 only, aesthetic-score conditioning) is refused
  files     StableDiffusionXLPipeline's LoRA file; kohya's lora_te1_/lora_te2_ names and SDXL header;
            the sgm single-file layout; embeddings with clip_l and clip_g rows
"""
from __future__ import annotations

from pathlib import Path

from trainer.errors import UserError
from trainer.families.base import WEIGHT_FILES, Components, check_finite, loading, read_json
from trainer.families.sd import StableDiffusion, prediction_type
from trainer.formats import embedding_files, safe_load, single_file_sdxl
from trainer.formats.io import check_new_file

PIPELINES = ("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline", "StableDiffusionXLInpaintPipeline")


def is_sdxl(folder) -> bool:
    """Whether `folder` is an SDXL diffusers folder (base or refiner): model_index.json's pipeline class,
    or, for a folder without one, a UNet with SDXL's added text/time conditioning."""
    d = Path(folder)
    name = read_json(d / "model_index.json").get("_class_name", "")
    if name and isinstance(name, str):  # (not a string: custom code, which check_folder refuses)
        return name in PIPELINES or name.startswith("StableDiffusionXL")
    return read_json(d / "unet" / "config.json").get("addition_embed_type") == "text_time"


def _present(index: dict, name: str) -> bool:
    """model_index.json lists the component with a class ([lib, cls]; a refiner has [null, null])."""
    entry = index.get(name)
    return isinstance(entry, list) and len(entry) == 2 and entry[1] is not None


def check_sdxl_folder(folder, what: str = "--pretrained_model_name_or_path") -> Path:
    """The folder if it is a complete SDXL base model, else a UserError saying what to pass instead."""
    d = Path(folder)
    if not d.is_dir():
        raise UserError(f"{what} {d} is not a folder (a local diffusers SDXL folder is required)")
    index = read_json(d / "model_index.json")
    unet = read_json(d / "unet" / "config.json")
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
    safe_load.check_model_files(d, StableDiffusionXL.components(SDXL), WEIGHT_FILES)  # damaged files, custom code
    return d


def add_time_ids(original_size, crops_coords_top_left, target_size, dtype=None, device=None):
    """SDXL's micro-conditioning of one image: [orig_h, orig_w, crop_top, crop_left, target_h, target_w]."""
    import torch

    ids = list(original_size) + list(crops_coords_top_left) + list(target_size)
    if len(ids) != 6:
        raise ValueError(f"add_time_ids: expected (h, w) pairs, got {original_size}, {crops_coords_top_left}, "
                         f"{target_size}")
    return torch.tensor(ids, dtype=dtype or torch.float32, device=device)


def time_ids_batch(geometries, resolution: int, dtype=None, device=None):
    """[B, 6] time ids for a batch of (original_size, crop_top_left) views trained at resolution^2, or of
    (original_size, crop_top_left, target_size) views (aspect-ratio buckets: the target is the row's bucket)."""
    import torch

    square = (resolution, resolution)
    return torch.stack([add_time_ids(g[0], g[1], g[2] if len(g) > 2 else square, dtype, device) for g in geometries])


def added_cond(pooled, geometries, resolution: int, device=None) -> dict:
    """The SDXL UNet's added_cond_kwargs for a batch: the pooled prompt embeddings and [B, 6] time ids from
    each row's (original_size, crop_top_left[, target_size]) view (float32: sizes such as 1651 are not exact in
    bfloat16)."""
    return {"text_embeds": pooled, "time_ids": time_ids_batch(geometries, resolution, device=device)}


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


class StableDiffusionXL(StableDiffusion):
    name = "sdxl"
    label = "SDXL"
    text_encoder_names = ("text_encoder", "text_encoder_2")
    tokenizer_names = ("tokenizer", "tokenizer_2")
    UNSUPPORTED = ("tokenizer_name", "tokenizer_max_length", "text_encoder_use_attention_mask")

    def matches(self, folder) -> bool:
        return is_sdxl(folder)

    def components(self) -> tuple[str, ...]:
        return super().components() + ("text_encoder_2", "tokenizer_2")

    def check_layout(self, folder, what: str = "--pretrained_model_name_or_path") -> None:
        check_sdxl_folder(folder, what)

    def check_folder(self, folder, *, variant: str | None = None, what: str = "model folder") -> Path:
        if Path(folder).is_dir():  # a refiner or a folder without the second encoder: said as such
            self.check_layout(folder, what)
        return super().check_folder(folder, variant=variant, what=what)

    def check_export_source(self, folder) -> Path:
        return check_sdxl_folder(folder, "--model")

    def check_options(self, opts) -> None:
        given = {"tokenizer_name": opts.model.tokenizer_name, "tokenizer_max_length": opts.data.tokenizer_max_length,
                 "text_encoder_use_attention_mask": opts.data.text_encoder_use_attention_mask}
        for flag in self.UNSUPPORTED:
            if given[flag]:
                raise UserError(f"--{flag} is not supported for SDXL models (two tokenizers and text encoders, "
                                f"used as the model ships them); leave it out")

    def load_components(self, folder, *, variant=None, vae=None, tokenizer=None) -> Components:
        """The SDXL base model's parts, on the CPU in the stored dtype (variant weights as float32). vae: an
        fp16-safe VAE folder (diffusers' --pretrained_vae_model_name_or path, e.g. a download of
        madebyollin/sdxl-vae-fp16-fix): its config has force_upcast false, so vae_dtype then lets it run in
        float16; SDXL's own VAE overflows in float16 and is kept in float32."""
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

        root = check_sdxl_folder(folder)
        kw = {"variant": variant} if variant else {}
        pred = prediction_type(root)
        if vae is not None:
            vp = Path(vae)
            if not (vp / "config.json").is_file():
                raise UserError(f"--pretrained_vae_model_name_or_path {vp} is not a diffusers AutoencoderKL folder "
                                "(no config.json)")
            with loading(vp):
                vae_model = AutoencoderKL.from_pretrained(vp)
            check_finite({"": vae_model}, vp)
        else:
            with loading(root, "vae"):
                vae_model = AutoencoderKL.from_pretrained(root, subfolder="vae", **kw)
        parts = {}
        for name, cls, extra in (("unet", UNet2DConditionModel, kw), ("text_encoder", CLIPTextModel, kw),
                                 ("text_encoder_2", CLIPTextModelWithProjection, kw), ("tokenizer", CLIPTokenizer, {}),
                                 ("tokenizer_2", CLIPTokenizer, {}), ("noise_scheduler", DDPMScheduler, {})):
            sub = "scheduler" if name == "noise_scheduler" else name
            with loading(root, sub):
                parts[name] = cls.from_pretrained(root, subfolder=sub, **extra)
        check_finite({n: parts[n] for n in ("unet", "text_encoder", "text_encoder_2")} | (
            {} if vae is not None else {"vae": vae_model}), root)
        comps = Components(vae=vae_model, prediction_type=pred, **parts)
        if variant:
            for m in (comps.unet, comps.vae, comps.text_encoder, comps.text_encoder_2):
                m.float()
        return comps

    def text_encoder_classes(self) -> tuple:
        from transformers import CLIPTextModel, CLIPTextModelWithProjection

        return (CLIPTextModel, CLIPTextModelWithProjection)

    def load_pipeline(self, folder, *, vae_path=None, class_images: bool = False, **kw):
        """StableDiffusionXLPipeline; for class images without the invisible watermark (it would become part of
        the prior)."""
        from diffusers import StableDiffusionXLPipeline

        extra = {"add_watermarker": False} if class_images else {}
        return self._pipeline(StableDiffusionXLPipeline, folder, vae_path, kw, **extra)

    # ------------------------------------------------------------------ the training step
    def encode_prompt(self, tokenizers, encoders, prompts, device, *, max_length=None, attention_mask=False):
        return encode_prompt_sdxl(tokenizers, encoders, prompts, device)

    def unet_conditions(self, pooled, views, resolution: int, device) -> dict:
        return added_cond(pooled, views, resolution, device)

    def unet_kwargs(self, conditions: dict, dtype) -> dict:
        return {"added_cond_kwargs": {"text_embeds": conditions["text_embeds"].to(dtype),
                                      "time_ids": conditions["time_ids"]}}

    def vae_dtype(self, vae, wanted):
        """float32 instead of float16 when the VAE's config says force_upcast (SDXL's original VAE: its
        activations overflow float16 and decode to NaN); bfloat16 has float32's range and is kept."""
        import torch

        if wanted == torch.float16 and getattr(vae.config, "force_upcast", False):
            return torch.float32
        return wanted

    # ------------------------------------------------------------------ files
    def save_lora_weights(self, folder, parts: dict, modules: dict) -> None:
        from diffusers import StableDiffusionXLPipeline
        from diffusers.training_utils import _collate_lora_metadata

        StableDiffusionXLPipeline.save_lora_weights(
            folder, unet_lora_layers=parts["unet"], text_encoder_lora_layers=parts.get("text_encoder"),
            text_encoder_2_lora_layers=parts.get("text_encoder_2"), safe_serialization=True,
            **_collate_lora_metadata(modules))

    def kohya_names(self, state: dict) -> dict:
        """kohya names the first text encoder of an SDXL LoRA lora_te1_ (the second lora_te2_)."""
        return {("lora_te1_" + k[len("lora_te_"):] if k.startswith("lora_te_") else k): v for k, v in state.items()}

    def lora_header(self, meta: dict) -> dict:
        """kohya's / modelspec's names for SDXL base LoRAs."""
        return {**meta, "ss_base_model_version": "sdxl_base_v1-0", "ss_v2": "False",
                "modelspec.architecture": "stable-diffusion-xl-v1-base/lora"}

    def merge_lora(self, folder, lora_file, scale: float = 1.0) -> tuple:
        """The four models with a LoRA (kohya or diffusers names, adapters on the UNet and either text encoder)
        merged in: W += scale * alpha/rank * up @ down."""
        from trainer.formats.kohya_lora import lora_updates, merge_into, read_lora

        unet, vae, te, te2 = self.load_models(check_sdxl_folder(folder, "--model"))
        modules = {"unet": unet, "text_encoder": te, "text_encoder_2": te2}
        sd, meta = read_lora(lora_file)
        merge_into(modules, lora_updates(sd, meta, modules), scale)
        return unet, vae, te, te2

    def save_single_file(self, folder, out, *, half: bool = False, metadata: dict | None = None,
                         components=None) -> Path:
        check_sdxl_folder(folder, "--model")
        check_new_file(out)  # before the models load
        return single_file_sdxl.save_single_file_sdxl(folder, out, half=half, metadata=metadata,
                                                      components=components or self.load_models(folder))

    def embedding_files(self, rows: list, placeholder: str, step: int, *, stem: str, a1111: bool = True,
                        checkpoint_name: str | None = None) -> dict:
        """Both files hold clip_l and clip_g (the diffusers-named one and, with a1111, <name>.safetensors)."""
        names = [f"{stem}.safetensors"] + ([embedding_files.a1111_name(placeholder) + ".safetensors"] if a1111 else [])
        return {n: (lambda p: embedding_files.save_sdxl(p, *rows, placeholder, step)) for n in names}

    def load_embedding(self, pipe, path) -> str:
        return embedding_files.load_sdxl_into(pipe, path)


SDXL = StableDiffusionXL()
