"""What a model family is: the interface every family module implements, and what they share.

A family is one kind of diffusers text-to-image folder (SD 1.x/2.x, SDXL). Everything that differs
between kinds lives behind `Family`: recognising and checking a folder, loading its parts, encoding
prompts, the UNet's extra inputs, the VAE's dtype quirks, its pipeline class, and its files (LoRA,
single-file checkpoints, embeddings). The training loop, the methods and the commands call these
and never ask which family they have.
"""
from __future__ import annotations

import contextlib
import json
import pickle
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

from trainer.errors import UserError

WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin", "model.safetensors",
                "pytorch_model.bin", "diffusion_pytorch_model.safetensors.index.json", "model.safetensors.index.json")


def read_json(path: Path) -> dict:
    """A JSON file's object, {} when it is missing or unreadable (the checks say what is wrong)."""
    try:
        out = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    return out if isinstance(out, dict) else {}


def variant_name(file: str, variant: str | None) -> str:
    """diffusers' file name of a weight variant: model.safetensors -> model.fp16.safetensors."""
    if not variant:
        return file
    stem, dot, ext = file.partition(".")
    return f"{stem}.{variant}.{ext}"


def _reason(e: BaseException) -> str:
    """The cause of a failed load in a few words: the innermost message of the exception chain that says more
    than diffusers' generic "Unable to load weights" (e.g. the unpickler's refusal or the header error)."""
    chain, seen = [], set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        chain.append(e)
        e = e.__cause__ or e.__context__
    for err in reversed(chain):
        if isinstance(err, pickle.UnpicklingError) or "weights_only" in str(err):
            return "it is a pickle that would run code or build objects other than tensors; refused"
    text = next((str(err) for err in reversed(chain) if str(err).strip()), type(chain[0]).__name__)
    line = " ".join(text.strip().split("\n")[0].split())
    return (line[:240] + "...") if len(line) > 240 else line


@contextlib.contextmanager
def loading(folder, component: str | None = None):
    """Inside: loading a model folder (or one component subfolder); any failure to load a damaged file becomes
    one UserError naming the folder (torch-free checks catch most before, see check_folder)."""
    where = Path(folder) / component if component else Path(folder)
    try:
        yield
    except UserError:
        raise
    except (MemoryError, RecursionError):
        raise
    except Exception as e:  # noqa: BLE001 - diffusers/transformers/safetensors raise every kind for a bad file
        named = re.search(re.escape(str(where)) + r"/([\w.\-]+(?:/[\w.\-]+)?)", _chain_text(e))
        if named:  # a whole pipeline: the message names the file that failed
            where = where / named.group(1)
        reason = _reason(e)
        if reason.startswith("it is a pickle"):
            raise UserError(f"{where} does not load ({reason}); dbtrain never runs code from a model folder: use "
                            f"its .safetensors weights") from e
        raise UserError(f"{where} does not load ({type(e).__name__}: {reason}); the file is damaged or not what "
                        f"diffusers expects: restore it from the model's download") from e


def _chain_text(e: BaseException) -> str:
    out, seen = [], set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        out.append(str(e))
        e = e.__cause__ or e.__context__
    return "\n".join(out)


def check_finite(modules: dict, folder) -> None:
    """UserError naming the first weight of {component: module} that holds NaN or inf (a damaged or diverged
    model must not be sampled or trained from silently). One pass over the weights, cheap next to loading."""
    from trainer.formats.safe_load import first_non_finite

    for comp, module in modules.items():
        if module is None or not hasattr(module, "state_dict"):
            continue
        bad = first_non_finite(module.state_dict())
        if bad is not None:
            raise UserError(f"{Path(folder) / comp}: weight {bad} holds NaN or inf values; the model is damaged "
                            f"or came from a run that diverged, it is not used")


@dataclass
class Components:
    """A base model's parts as the training loop uses them (text_encoder_2 / tokenizer_2: SDXL's second)."""

    unet: object
    vae: object
    text_encoder: object
    tokenizer: object
    noise_scheduler: object
    prediction_type: str
    text_encoder_2: object = None
    tokenizer_2: object = None

    @property
    def tokenizers(self) -> list:
        return [t for t in (self.tokenizer, self.tokenizer_2) if t is not None]

    @property
    def text_encoders(self) -> list:
        return [e for e in (self.text_encoder, self.text_encoder_2) if e is not None]

    @property
    def named_text_encoders(self) -> dict:
        """{pipeline component name: text encoder}, first to last."""
        return {n: e for n, e in (("text_encoder", self.text_encoder), ("text_encoder_2", self.text_encoder_2))
                if e is not None}


class Family(ABC):
    """The interface (see the module docstring); trainer.families.sd implements it for SD 1.x / 2.x."""

    name = ""
    label = ""  # in messages: "SD 1.x/2.x", "SDXL"
    text_encoder_names: tuple[str, ...] = ()  # pipeline component names, first to last
    tokenizer_names: tuple[str, ...] = ()

    @abstractmethod
    def matches(self, folder) -> bool:
        """Whether `folder` is this family's (torch-free; a half-complete folder may match, then check_folder says
        what is missing)."""
        ...

    def check_layout(self, folder, what: str = "--pretrained_model_name_or_path") -> None:
        """UserError when the folder's subfolders are not a usable model of this family (torch-free, configs
        only: weights are not looked at)."""

    @abstractmethod
    def check_export_source(self, folder) -> Path:
        """A folder `dbtrain export` can write as one file, or a one-line UserError (torch-free)."""
        ...

    @abstractmethod
    def check_folder(self, folder, *, variant: str | None = None, what: str = "model folder") -> Path:
        """The folder, or a one-line UserError naming what is missing or what to pass instead (torch-free)."""
        ...

    def check_options(self, opts) -> None:
        """UserError for training options this family cannot do (torch-free)."""

    @abstractmethod
    def load_components(self, folder, *, variant=None, vae=None, tokenizer=None) -> Components:
        """The parts the loop trains with, on the CPU; vae / tokenizer: folders replacing the model's own."""
        ...

    @abstractmethod
    def load_models(self, folder, dtype=None) -> tuple:
        """(unet, vae, *text encoders) of a folder, what its single-file checkpoint holds."""
        ...

    @abstractmethod
    def encode_prompt(self, tokenizers, encoders, prompts, device, *, max_length=None, attention_mask=False):
        """(prompt embeddings [B, L, D], pooled [B, P] or None) of the encoders' outputs (gradients flow)."""
        ...

    def unet_conditions(self, pooled, views, resolution: int, device) -> dict:
        """The UNet's extra inputs of a batch beyond the prompt embeddings ({} when none); views: each row's
        ((original h, w), (crop top, left)), with aspect-ratio buckets ((original h, w), (crop top, left),
        (bucket h, w)) (trainer.core.images.ImageSet.geometry); resolution: the target size of 2-item views."""
        return {}

    def unet_kwargs(self, conditions: dict, dtype) -> dict:
        """unet_conditions as keyword arguments of the UNet's call, in the weights' dtype where it matters."""
        return {}

    def vae_dtype(self, vae, wanted):
        """The dtype to run `vae` in when the run wants `wanted`."""
        return wanted

    @abstractmethod
    def load_pipeline(self, folder, *, vae_path=None, class_images: bool = False, **kw):
        """The folder's diffusers pipeline (kw: components to use instead of its own, dtype, variant)."""
        ...

    @abstractmethod
    def save_lora_weights(self, folder, parts: dict, modules: dict) -> None:
        """diffusers' pytorch_lora_weights.safetensors of peft state dicts {component name: state}."""
        ...

    def kohya_names(self, state: dict) -> dict:
        """A kohya LoRA state dict with this family's component prefixes (lora_unet_, lora_te_, ...)."""
        return state

    def lora_header(self, meta: dict) -> dict:
        """kohya's header of a LoRA for this family (base-model version names), from the common fields."""
        return meta

    @abstractmethod
    def merge_lora(self, folder, lora_file, scale: float = 1.0) -> tuple:
        """load_models(folder) with a LoRA file (kohya or diffusers names) merged in."""
        ...

    @abstractmethod
    def save_single_file(self, folder, out, *, half: bool = False, metadata: dict | None = None,
                         components=None) -> Path:
        """The folder (or `components`, load_models' tuple) as one original-layout .safetensors (a new file)."""
        ...

    @abstractmethod
    def embedding_files(self, rows: list, placeholder: str, step: int, *, stem: str, a1111: bool = True,
                        checkpoint_name: str | None = None) -> dict:
        """{file name: write(path)} of new token rows (one [n, dim] tensor per text encoder): <stem>.safetensors
        in diffusers' format, and with a1111 the files A1111 / ComfyUI load."""
        ...

    @abstractmethod
    def load_embedding(self, pipe, path) -> str:
        """An embedding file into a pipeline of this family; the token to write in prompts."""
        ...

    @abstractmethod
    def text_encoder_classes(self) -> tuple:
        """The transformers classes of the text encoders, first to last (the memory estimate builds them)."""
        ...
