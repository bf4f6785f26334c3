"""LoRA DreamBooth: low-rank adapters (peft, as diffusers' train_dreambooth_lora.py) on a frozen base.

The same training loop as full DreamBooth; only what trains and what is saved differ. The base
weights stay frozen in half precision on a GPU (the autocast dtype) and never get gradients;
the adapters are fp32. Why peft and not our own adapter layer: it is what diffusers' own
`load_lora_weights` builds on, its LoRA Linear adds one small matmul pair per layer (what ours
would do), and it saves the adapter state in the names diffusers and kohya converters expect.

Saved: `pytorch_lora_weights.safetensors` (diffusers' format, loads with
`pipeline.load_lora_weights(output_dir)`) and `<name>.safetensors` in kohya's format
(A1111 / ComfyUI), with a small metadata header.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING

from trainer.errors import UserError
from trainer.families.sdxl import is_sdxl

if TYPE_CHECKING:
    import torch

DIFFUSERS_FILE = "pytorch_lora_weights.safetensors"
# diffusers' train_dreambooth_lora.py targets; add_k_proj/add_v_proj exist only in some UNets
UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_k_proj", "add_v_proj")
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
# kohya's conv_dim ("LoCon"): the 3x3 convs of the resnets and of the down/up-samplers
CONV_PATTERN = r".*(resnets\.\d+\.conv[12]|(down|up)samplers\.\d+\.conv)"


def _pattern(names) -> str:
    return r".*\.(" + "|".join(re.escape(n) for n in names) + ")"


def lora_config(rank: int, alpha: float | None, dropout: float, targets, conv_rank: int | None = None):
    from peft import LoraConfig

    pattern = _pattern(targets)
    kw = {}
    if conv_rank:
        pattern = f"{pattern}|{CONV_PATTERN}"
        # peft matches these keys against the end of each module name
        kw["rank_pattern"] = {r"resnets\.\d+\.conv[12]": conv_rank, r"(down|up)samplers\.\d+\.conv": conv_rank}
        if alpha is None:
            kw["alpha_pattern"] = dict.fromkeys(kw["rank_pattern"], conv_rank)
    return LoraConfig(r=rank, lora_alpha=rank if alpha is None else alpha, lora_dropout=dropout,
                      init_lora_weights="gaussian", target_modules=pattern, **kw)


class LoraWeights:
    """A model's adapter weights as one checkpoint item (save_pretrained / load_pretrained / state_dict)."""

    FILE = "adapter.safetensors"

    def __init__(self, module: torch.nn.Module):
        self.module = module

    def state_dict(self) -> dict:
        from peft import get_peft_model_state_dict

        return get_peft_model_state_dict(self.module)

    def save_pretrained(self, folder, safe_serialization: bool = True) -> None:
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().contiguous() for k, v in self.state_dict().items()}, folder / self.FILE)

    def load_pretrained(self, folder) -> None:
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        path = Path(folder) / self.FILE
        if not path.is_file():
            raise UserError(f"checkpoint folder {folder} has no {self.FILE}")
        state = load_file(path)
        mine = self.state_dict()
        if set(state) != set(mine) or any(state[k].shape != mine[k].shape for k in state):
            raise UserError(f"{path} holds adapters of another rank or targets; resume with the LoRA options it "
                            f"was made with, or choose a new --output_dir")
        set_peft_model_state_dict(self.module, state)


def _fp32_adapters(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    params = [p for p in module.parameters() if p.requires_grad]
    for p in params:  # peft puts adapters in the base layer's dtype; the master copy trains in fp32
        p.data = p.data.float()
    return params


def _inject(module, config) -> None:
    """peft's adapters into a transformers model without its add_adapter (transformers >= 5.24 asks for a newer
    peft than diffusers needs)."""
    from peft import inject_adapter_in_model

    inject_adapter_in_model(config, module, adapter_name="default")
    module.peft_config = {"default": config}  # what peft's state-dict helpers and diffusers' metadata read


def add_adapters(cfg, unet, te, *, train_text_encoder: bool, te2=None) -> tuple[list, dict]:
    """Freeze the base, add the adapters; (trainable fp32 parameters, checkpoint items). te2: SDXL's second
    text encoder (adapters on both encoders' q/k/v/out_proj with --train_text_encoder)."""
    unet.requires_grad_(False)
    encoders = {"text_encoder": te, "text_encoder_2": te2}
    for enc in encoders.values():
        if enc is not None:
            enc.requires_grad_(False)
    conv = (cfg.lora_conv_rank or cfg.lora_rank) if cfg.lora_conv else None
    unet.add_adapter(lora_config(cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, UNET_TARGETS, conv))
    params = _fp32_adapters(unet)
    models = {"unet_lora": LoraWeights(unet)}
    for name, enc in encoders.items() if train_text_encoder else ():
        if enc is not None:
            _inject(enc, lora_config(cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, TEXT_TARGETS))
            params += _fp32_adapters(enc)
            models[f"{name}_lora"] = LoraWeights(enc)
    return params, models


def peft_state(module: torch.nn.Module) -> dict:
    from peft import get_peft_model_state_dict

    return {k: v.detach().float().contiguous() for k, v in get_peft_model_state_dict(module).items()}


def metadata(cfg, identifier: str | None, step: int, out: Path) -> dict:
    """The kohya file's small header: base model, rank, alpha, steps, identifier (kohya's ss_* names)."""
    from trainer.formats.kohya_lora import kohya_metadata

    base = Path(cfg.pretrained_model_name_or_path)
    te_cfg = base / "text_encoder" / "config.json"
    v2 = te_cfg.is_file() and json.loads(te_cfg.read_text()).get("hidden_act") == "gelu"  # OpenCLIP's
    sched = base / "scheduler" / "scheduler_config.json"
    v_pred = sched.is_file() and json.loads(sched.read_text()).get("prediction_type") == "v_prediction"
    conv = (cfg.lora_conv_rank or cfg.lora_rank) if cfg.lora_conv else None
    alpha = cfg.lora_alpha if cfg.lora_alpha is not None else cfg.lora_rank
    meta = kohya_metadata(rank=cfg.lora_rank, alpha=alpha, base_model=base.resolve().name, v2=v2, v_pred=v_pred,
                          steps=step, identifier=identifier, name=out.resolve().name, conv_rank=conv,
                          conv_alpha=cfg.lora_alpha if cfg.lora_alpha is not None else conv)
    if is_sdxl(base):  # kohya's / modelspec's names for SDXL base LoRAs
        meta.update(ss_base_model_version="sdxl_base_v1-0", ss_v2="False",
                    **{"modelspec.architecture": "stable-diffusion-xl-v1-base/lora"})
    meta["dbtrain_base_model"] = str(base.resolve())
    return meta


def kohya_name(out: Path) -> str:
    from trainer.core.export import file_stem

    return f"{file_stem(out.resolve().name, 'lora')}.safetensors"


def export_lora(cfg, unet, te, out: Path, step: int, identifier: str | None, te2=None) -> list[str]:
    """Write both LoRA files into `out` (staged, then moved in; see export.install); returns their names.

    The diffusers file keeps peft's names (`unet.<module>.lora_A.weight`), which diffusers' loader reads
    as it reads its own scripts' files; the header holds each adapter's config (rank, alpha, patterns).
    SDXL (te2: its second text encoder's adapters): StableDiffusionXLPipeline.save_lora_weights, and kohya's
    lora_te1_ / lora_te2_ names."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from diffusers.training_utils import _collate_lora_metadata

    from trainer.formats import outdir
    from trainer.core.export import install, staging
    from trainer.formats import kohya_lora

    parts = {"unet": peft_state(unet)}
    if te is not None:
        parts["text_encoder"] = peft_state(te)
    if te2 is not None:
        parts["text_encoder_2"] = peft_state(te2)
    sdxl = is_sdxl(cfg.pretrained_model_name_or_path)
    need = 2 * sum(t.numel() * 4 for sd in parts.values() for t in sd.values()) + outdir.MB
    outdir.require_space(out, need, "the LoRA weights")
    tmp = staging(out)
    name = kohya_name(out)
    try:
        tmp.mkdir(parents=True)
        kw = {"text_encoder_2_lora_layers": parts.get("text_encoder_2")} if sdxl else {}
        modules = {"unet": unet, "text_encoder": te, **({"text_encoder_2": te2} if sdxl else {})}
        (StableDiffusionXLPipeline if sdxl else StableDiffusionPipeline).save_lora_weights(
            tmp, unet_lora_layers=parts["unet"], text_encoder_lora_layers=parts.get("text_encoder"),
            safe_serialization=True, **kw, **_collate_lora_metadata(modules))
        # (to_kohya names SDXL's encoders lora_te1_/lora_te2_ when text_encoder_2 is among the parts)
        kparts = {**parts, "text_encoder_2": parts.get("text_encoder_2", {})} if sdxl else parts
        kohya_lora.save_kohya_lora(tmp / name, kohya_lora.to_kohya(kparts, alpha=cfg.lora_alpha),
                                   metadata(cfg, identifier, step, out))
    except OSError as e:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        raise outdir.failed_write(out, "the LoRA weights", e, need) from e
    install(out, tmp)
    return [DIFFUSERS_FILE, name]


# --- using a LoRA: `dbtrain sample|eval --lora FILE [--lora_scale S]`, or a LoRA output folder as --model ---

def lora_files_of(model, given=None) -> list[Path]:
    """The LoRA files to apply: a LoRA output folder's own file first, then those given."""
    files = []
    own = Path(model) / DIFFUSERS_FILE
    if own.is_file() and not (Path(model) / "model_index.json").is_file():
        files.append(own)
    for f in given or []:
        f = Path(f)
        if f.is_dir() and (f / DIFFUSERS_FILE).is_file():
            f = f / DIFFUSERS_FILE
        if not f.is_file():
            raise UserError(f"--lora {f}: no such file (a .safetensors LoRA, or a dbtrain LoRA output folder)")
        files.append(f)
    return files


def apply_loras(pipe, files, scale: float = 1.0, say=print) -> None:
    """Merge each LoRA file (kohya or diffusers names) into the pipeline's weights at `scale` (our merge, the
    same W += scale * alpha/rank * up @ down as diffusers' fuse_lora); a file made for another model is one
    clear line."""
    from trainer.formats import kohya_lora

    modules = {"unet": pipe.unet, "text_encoder": pipe.text_encoder}
    if getattr(pipe, "text_encoder_2", None) is not None:  # SDXL
        modules["text_encoder_2"] = pipe.text_encoder_2
    for f in files:
        sd, meta = kohya_lora.read_lora(f)
        try:  # (a failed merge ends the command: the half-merged pipeline is never used)
            n = kohya_lora.merge_into(modules, kohya_lora.lora_updates(sd, meta, modules), scale)
        except UserError as e:
            raise UserError(f"--lora {f}: {e}") from None
        say(f"LoRA {f}: {n} weights merged at scale {scale:g}")

