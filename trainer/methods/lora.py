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
import shutil
from pathlib import Path

import torch

from trainer.errors import UserError
from trainer.families import family_of
from trainer.formats import diffusers_folder, kohya_lora, outdir
from trainer.formats.embedding_files import file_stem
from trainer.methods.base import (Method, Trainable, frozen_dtype, result_name, train_mode_text_encoder,
                                  write_single_file)
from trainer.methods.outputs import LORA_FILE as DIFFUSERS_FILE

# diffusers' train_dreambooth_lora.py targets; add_k_proj/add_v_proj exist only in some UNets
UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_k_proj", "add_v_proj")
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
# kohya's conv_dim ("LoCon"): the 3x3 convs of the resnets and of the down/up-samplers
CONV_PATTERN = r".*(resnets\.\d+\.conv[12]|(down|up)samplers\.\d+\.conv)"


class Lora(Method):
    name = "lora"
    saved = "the LoRA weights"

    def weights_dtype(self, opts, device):
        """The frozen base in half precision where it can be (bf16 with --weights_dtype bf16)."""
        return torch.bfloat16 if opts.memory.weights_dtype == "bf16" else frozen_dtype(opts, device)

    def prepare(self, opts, comps, device, weights_dtype) -> Trainable:
        """Freeze the base, add the adapters (with --train_text_encoder on every text encoder's q/k/v/out_proj)."""
        train_te = opts.training.train_text_encoder
        for enc in comps.text_encoders if train_te else []:
            train_mode_text_encoder(opts, enc, device, weights_dtype)
            if opts.memory.gradient_checkpointing:  # the frozen embeddings would cut the gradient to the adapters
                enc.enable_input_require_grads()
        unet = comps.unet
        unet.requires_grad_(False)
        encoders = comps.named_text_encoders
        for enc in encoders.values():
            enc.requires_grad_(False)
        lo = opts.lora
        conv = (lo.lora_conv_rank or lo.lora_rank) if lo.lora_conv else None
        unet.add_adapter(lora_config(lo.lora_rank, lo.lora_alpha, lo.lora_dropout, UNET_TARGETS, conv))
        params = _fp32_adapters(unet)
        models = {"unet_lora": LoraWeights(unet)}
        for name, enc in encoders.items() if train_te else ():
            _inject(enc, lora_config(lo.lora_rank, lo.lora_alpha, lo.lora_dropout, TEXT_TARGETS))
            params += _fp32_adapters(enc)
            models[f"{name}_lora"] = LoraWeights(enc)
        return Trainable(params=params, models=models)

    def save(self, run, out: Path, step: int) -> None:
        encoders = {n[: -len("_lora")]: m.module for n, m in run.trainable.models.items() if n != "unet_lora"}
        export_lora(run.opts, run.unet, encoders, out, step, run.identifier)
        if run.opts.checkpoints.save_single_file:
            print(f"single file: {out / write_single_file(run.opts, out, out / DIFFUSERS_FILE)}")

    def record(self, opts, run) -> dict:
        """`dbtrain sample --model OUT` = the base model + this LoRA."""
        return {"method": "lora", "lora": DIFFUSERS_FILE, "lora_rank": opts.lora.lora_rank,
                "base_model": str(Path(opts.model.pretrained_model_name_or_path).resolve())}


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


def peft_state(module: torch.nn.Module) -> dict:
    from peft import get_peft_model_state_dict

    return {k: v.detach().float().contiguous() for k, v in get_peft_model_state_dict(module).items()}


def metadata(opts, identifier: str | None, step: int, out: Path) -> dict:
    """The kohya file's small header: base model, rank, alpha, steps, identifier (kohya's ss_* names)."""
    lo = opts.lora
    base = Path(opts.model.pretrained_model_name_or_path)
    te_cfg = base / "text_encoder" / "config.json"
    v2 = te_cfg.is_file() and json.loads(te_cfg.read_text()).get("hidden_act") == "gelu"  # OpenCLIP's
    sched = base / "scheduler" / "scheduler_config.json"
    v_pred = sched.is_file() and json.loads(sched.read_text()).get("prediction_type") == "v_prediction"
    conv = (lo.lora_conv_rank or lo.lora_rank) if lo.lora_conv else None
    alpha = lo.lora_alpha if lo.lora_alpha is not None else lo.lora_rank
    meta = kohya_lora.kohya_metadata(rank=lo.lora_rank, alpha=alpha, base_model=base.resolve().name, v2=v2,
                                     v_pred=v_pred, steps=step, identifier=identifier, name=out.resolve().name,
                                     conv_rank=conv, conv_alpha=lo.lora_alpha if lo.lora_alpha is not None else conv)
    meta = family_of(base).lora_header(meta)
    meta["dbtrain_base_model"] = str(base.resolve())
    return meta


def kohya_name(out: Path) -> str:
    return f"{file_stem(result_name(out), 'lora')}.safetensors"  # (raw/: the run's name)


def export_lora(opts, unet, text_encoders: dict, out: Path, step: int, identifier: str | None) -> list[str]:
    """Write both LoRA files into `out` (staged, then moved in; see diffusers_folder.install); returns their names.
    text_encoders: {component name: encoder} of the encoders whose adapters trained.

    The diffusers file keeps peft's names (`unet.<module>.lora_A.weight`), which diffusers' loader reads
    as it reads its own scripts' files; the header holds each adapter's config (rank, alpha, patterns).
    The kohya file has the family's names (SDXL: lora_te1_ / lora_te2_ and its base-model version)."""
    family = family_of(opts.model.pretrained_model_name_or_path)
    parts = {"unet": peft_state(unet), **{n: peft_state(e) for n, e in text_encoders.items()}}
    need = 2 * sum(t.numel() * 4 for sd in parts.values() for t in sd.values()) + outdir.MB
    outdir.require_space(out, need, "the LoRA weights")
    tmp = diffusers_folder.staging(out)
    name = kohya_name(out)
    try:
        tmp.mkdir(parents=True)
        modules = {"unet": unet, **dict.fromkeys(family.text_encoder_names), **text_encoders}
        family.save_lora_weights(tmp, parts, modules)
        state = family.kohya_names(kohya_lora.to_kohya(parts, alpha=opts.lora.lora_alpha))
        kohya_lora.save_kohya_lora(tmp / name, state, metadata(opts, identifier, step, out))
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise outdir.failed_write(out, "the LoRA weights", e, need) from e
    diffusers_folder.install(out, tmp)
    return [DIFFUSERS_FILE, name]
