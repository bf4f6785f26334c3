"""Stable Diffusion 1.x / 2.x: one CLIP text encoder, epsilon or v-prediction (a local diffusers folder).

The default family: a folder no other family claims is read as this one.
"""
from __future__ import annotations

from pathlib import Path

from trainer.errors import UserError
from trainer.families.base import WEIGHT_FILES, Components, Family, check_finite, loading, read_json, variant_name
from trainer.formats import embedding_files, safe_load, single_file
from trainer.formats.io import check_new_file

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def encode_prompt(tokenizer, text_encoder, prompts: list[str], device, max_length: int | None = None,
                  attention_mask: bool = False):
    """The text encoder's last hidden states of the prompts, padded to max_length (diffusers'
    --tokenizer_max_length; not given: the tokenizer's) and with the padding mask when asked
    (--text_encoder_use_attention_mask). Gradients flow."""
    tok = tokenizer(prompts, padding="max_length", truncation=True, return_tensors="pt",
                    max_length=max_length or tokenizer.model_max_length)
    mask = tok.attention_mask.to(device) if attention_mask else None
    return text_encoder(tok.input_ids.to(device), attention_mask=mask)[0]


def prediction_type(root: Path) -> str:
    pred = read_json(root / "scheduler" / "scheduler_config.json").get("prediction_type", "epsilon")
    if pred not in PREDICTION_TYPES:
        raise UserError(f"{root}/scheduler: unsupported prediction_type {pred!r}")
    return pred


class StableDiffusion(Family):
    name = "sd"
    label = "SD 1.x/2.x"
    text_encoder_names = ("text_encoder",)
    tokenizer_names = ("tokenizer",)

    def matches(self, folder) -> bool:
        return True  # the default: last in trainer.families.FAMILIES

    # ------------------------------------------------------------------ folders
    def components(self) -> tuple[str, ...]:
        """The subfolders a complete folder has."""
        return ("unet", "vae", "text_encoder", "tokenizer", "scheduler")

    def check_folder(self, folder, *, variant: str | None = None, what: str = "model folder") -> Path:
        root = Path(folder)
        if not root.is_dir():
            raise UserError(f"model folder {root} does not exist (a local diffusers folder is required; "
                            f"nothing is downloaded)")
        missing = []
        for comp in self.components():
            d = root / comp
            if not d.is_dir():
                missing.append(comp)
            elif comp.startswith("tokenizer"):
                if not (d / "vocab.json").is_file() and not (d / "tokenizer.json").is_file():
                    missing.append(f"{comp} (vocab.json)")
            elif comp == "scheduler":
                if not (d / "scheduler_config.json").is_file():
                    missing.append("scheduler (scheduler_config.json)")
            elif not (d / "config.json").is_file() or not any((d / variant_name(f, variant)).is_file()
                                                                for f in WEIGHT_FILES):
                missing.append(f"{comp} (config.json + {variant + ' ' if variant else ''}weights)")
        if missing:
            hint = ""
            if not variant:  # only variant files there (e.g. an fp16-only download): say which flag loads them
                found = sorted({f.name.split(".")[1] for comp in ("unet", "vae", *self.text_encoder_names)
                                for f in (root / comp).glob("*.*.safetensors") if (root / comp).is_dir()})
                hint = f"; it has {'/'.join(found)} variant weights: add --variant {found[0]}" if found else ""
            raise UserError(f"model folder {root} is missing: {', '.join(missing)}{hint}")
        # damaged files, wrongly typed configs and custom code: one line naming the file, before anything loads
        safe_load.check_model_files(root, self.components(), [variant_name(f, variant) for f in WEIGHT_FILES])
        return root

    def check_export_source(self, folder) -> Path:
        """A folder `dbtrain export` can write as one file (torch-free)."""
        return single_file.check_source_folder(folder)

    # ------------------------------------------------------------------ loading
    def load_components(self, folder, *, variant=None, vae=None, tokenizer=None) -> Components:
        """The parts, on the CPU; --variant weights as float32. The noise scheduler is the DDPM forward process
        of the model's own beta schedule, whatever sampler the folder ships, as diffusers' scripts train."""
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        root = self.check_folder(folder, variant=variant)
        kw = {"variant": variant} if variant else {}
        with loading(root, "scheduler"):
            noise_scheduler = DDPMScheduler.from_pretrained(root, subfolder="scheduler")
        pred = prediction_type(root)
        with loading(root, "unet"):
            unet = UNet2DConditionModel.from_pretrained(root, subfolder="unet", **kw)
        with loading(*((vae,) if vae else (root, "vae"))):
            vae_model = AutoencoderKL.from_pretrained(vae) if vae else AutoencoderKL.from_pretrained(
                root, subfolder="vae", **kw)
        with loading(root, "text_encoder"):
            text_encoder = CLIPTextModel.from_pretrained(root, subfolder="text_encoder", **kw)
        with loading(*((tokenizer,) if tokenizer else (root, "tokenizer"))):
            tok = (CLIPTokenizer.from_pretrained(tokenizer) if tokenizer else
                   CLIPTokenizer.from_pretrained(root, subfolder="tokenizer"))
        comps = Components(unet=unet, vae=vae_model, text_encoder=text_encoder, tokenizer=tok,
                           noise_scheduler=noise_scheduler, prediction_type=pred)
        check_finite({"unet": unet, "text_encoder": text_encoder}, root)
        check_finite({"": vae_model}, vae or root / "vae")
        if variant:  # e.g. fp16 files: train from fp32 copies, as from the plain files (the loop picks its dtypes)
            for m in (comps.unet, comps.vae, comps.text_encoder):
                m.float()
        return comps

    def load_models(self, folder, dtype=None) -> tuple:
        from diffusers import AutoencoderKL, UNet2DConditionModel

        d = Path(folder)
        kw = {"torch_dtype": dtype} if dtype is not None else {}
        models = {}
        for name, cls in (("unet", UNet2DConditionModel), ("vae", AutoencoderKL)):
            with loading(d, name):
                models[name] = cls.from_pretrained(d, subfolder=name, **kw)
        for cls, name in zip(self.text_encoder_classes(), self.text_encoder_names):
            with loading(d, name):
                models[name] = cls.from_pretrained(d, subfolder=name, **({"dtype": dtype} if dtype is not None else {}))
        check_finite(models, d)
        return tuple(models.values())

    def text_encoder_classes(self) -> tuple:
        from transformers import CLIPTextModel

        return (CLIPTextModel,)

    def load_pipeline(self, folder, *, vae_path=None, class_images: bool = False, **kw):
        """StableDiffusionPipeline without the safety checker (vae_path: a VAE folder instead of the model's)."""
        from diffusers import StableDiffusionPipeline

        return self._pipeline(StableDiffusionPipeline, folder, vae_path, kw, safety_checker=None,
                              requires_safety_checker=False)

    def _pipeline(self, cls, folder, vae_path, kw: dict, **extra):
        """cls.from_pretrained(folder) with the components in `kw` instead of the folder's; a damaged file is one
        line naming its folder, and the parts read from files are checked finite (those passed in are the
        caller's)."""
        if vae_path and "vae" not in kw:
            from diffusers import AutoencoderKL

            with loading(vae_path):
                kw["vae"] = AutoencoderKL.from_pretrained(vae_path)
            check_finite({"": kw["vae"]}, vae_path)
        safe_load.check_model_files(folder, [c for c in self.components() if c not in kw],  # (kw's: the caller's)
                                    [variant_name(f, kw.get("variant")) for f in WEIGHT_FILES])
        with loading(folder):
            pipe = cls.from_pretrained(folder, **kw, **extra)
        check_finite({n: m for n, m in pipe.components.items() if n not in kw}, folder)
        return pipe

    # ------------------------------------------------------------------ the training step
    def encode_prompt(self, tokenizers, encoders, prompts, device, *, max_length=None, attention_mask=False):
        return encode_prompt(tokenizers[0], encoders[0], prompts, device, max_length, attention_mask), None

    # ------------------------------------------------------------------ files
    def save_lora_weights(self, folder, parts: dict, modules: dict) -> None:
        from diffusers import StableDiffusionPipeline
        from diffusers.training_utils import _collate_lora_metadata

        StableDiffusionPipeline.save_lora_weights(
            folder, unet_lora_layers=parts["unet"], text_encoder_lora_layers=parts.get("text_encoder"),
            safe_serialization=True, **_collate_lora_metadata(modules))

    def merge_lora(self, folder, lora_file, scale: float = 1.0) -> tuple:
        from trainer.formats import kohya_lora

        unet, vae, te = self.load_models(folder)
        kohya_lora.merge_lora({"unet": unet, "vae": vae, "text_encoder": te}, lora_file, scale=scale)
        return unet, vae, te

    def save_single_file(self, folder, out, *, half: bool = False, metadata: dict | None = None,
                         components=None) -> Path:
        self.check_export_source(folder)
        check_new_file(out)  # before the models load
        return single_file.save_single_file(folder, out, half=half, metadata=metadata,
                                            components=components or self.load_models(folder))

    def embedding_files(self, rows: list, placeholder: str, step: int, *, stem: str, a1111: bool = True,
                        checkpoint_name: str | None = None) -> dict:
        """{file name: write(path)} of new token rows: diffusers' <stem>.safetensors, and with a1111 the A1111 /
        ComfyUI <name>.safetensors (emb_params) and <name>.pt (string_to_param)."""
        (t,) = rows
        files = {f"{stem}.safetensors": lambda p: embedding_files.save_diffusers(p, placeholder, t)}
        if a1111:
            short = embedding_files.a1111_name(placeholder)
            files[short + ".safetensors"] = lambda p: embedding_files.save_a1111_safetensors(p, t, short, step)
            files[short + ".pt"] = lambda p: embedding_files.save_a1111_pt(p, t, short, step, checkpoint_name)
        return files

    def load_embedding(self, pipe, path) -> str:
        return embedding_files.load_into(pipe, path)


SD = StableDiffusion()
