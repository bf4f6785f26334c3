"""LoRA files: peft/diffusers names <-> the kohya names A1111 and ComfyUI load, and merging.

kohya (sd-scripts) names a LoRA module by its diffusers/transformers module path with
dots made underscores, under one prefix per model:
  lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight
  lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight      (SD1/SD2)
  lora_te1_... / lora_te2_...                                               (SDXL's two)
  <name>.alpha                                                              (a scalar)
lora_down is peft's lora_A, lora_up is lora_B; a 3x3 conv LoRA (kohya's conv_dim) keeps
the same shapes in both (down: r x in x 3 x 3, up: out x r x 1 x 1). The weight update is
W += scale * alpha / rank * up @ down. The text-encoder names keep `text_model.`, which
transformers 5 no longer has in CLIPTextModel's own names, because the UIs expect it.

kohya -> module path is ambiguous from the string alone (underscores inside names), so
the reverse direction resolves names against the target model's module list.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

from trainer.errors import UserError

PREFIXES = {"unet": "lora_unet", "text_encoder": "lora_te", "text_encoder_2": "lora_te2"}
_PEFT = re.compile(r"^(?P<module>.+)\.lora_(?P<which>A|B)(?:\.[^.]+)?\.weight$")


def _te_path(module: str) -> str:
    """The text-encoder module path as kohya/A1111 name it (with transformers 4's text_model.)."""
    if module.startswith("text_model.") or module == "text_projection":
        return module
    return "text_model." + module


def kohya_name(component: str, module: str, *, sdxl: bool = False) -> str:
    if component == "unet":
        path = module
    elif component in ("text_encoder", "text_encoder_2"):
        path = _te_path(module)
    else:
        raise ValueError(f"unknown component {component!r}")
    prefix = "lora_te1" if (sdxl and component == "text_encoder") else PREFIXES[component]
    return f"{prefix}_{path.replace('.', '_')}"


def peft_pairs(sd: dict) -> dict[str, dict]:
    """{module path: {'down': lora_A, 'up': lora_B}} from a peft LoRA state dict."""
    out: dict[str, dict] = {}
    for k, v in sd.items():
        k = k.removeprefix("base_model.model.")  # a peft.get_peft_model wrapper's names
        m = _PEFT.match(k)
        if not m:
            raise UserError(f"not a peft LoRA weight name: {k!r}")
        out.setdefault(m["module"], {})["down" if m["which"] == "A" else "up"] = v
    for mod, p in out.items():
        if set(p) != {"down", "up"}:
            raise UserError(f"LoRA module {mod} has only its {next(iter(p))} weight")
    return out


def _alpha_for(component: str, module: str, rank: int, alpha, alphas: dict | None) -> float:
    if alphas and f"{component}.{module}" in alphas:
        return float(alphas[f"{component}.{module}"])
    return float(rank if alpha is None else alpha)


def to_kohya(parts: dict[str, dict], *, alpha=None, alphas: dict | None = None) -> dict:
    """peft LoRA state dicts {'unet': sd, 'text_encoder': sd, 'text_encoder_2': sd} -> a kohya dict.

    alpha: every module's alpha (None: its rank, i.e. scale 1, which is what diffusers assumes
    for a file without alphas); alphas: {'unet.<module path>': alpha} per-module values.
    """
    import torch

    sdxl = "text_encoder_2" in parts
    out = {}
    for comp, sd in parts.items():
        for mod, p in peft_pairs(sd).items():
            name = kohya_name(comp, mod, sdxl=sdxl)
            rank = p["down"].shape[0]
            out[f"{name}.lora_down.weight"] = p["down"]
            out[f"{name}.lora_up.weight"] = p["up"]
            out[f"{name}.alpha"] = torch.tensor(_alpha_for(comp, mod, rank, alpha, alphas))
    return out


def is_kohya(sd: dict) -> bool:
    return any(k.startswith(("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")) for k in sd)


def kohya_module_table(modules: dict, *, sdxl: bool | None = None) -> dict[str, tuple[str, str]]:
    """kohya name -> (component, module path) for every module of {'unet': model, 'text_encoder': ...}."""
    sdxl = ("text_encoder_2" in modules) if sdxl is None else sdxl
    table = {}
    for comp, model in modules.items():
        for name, _ in model.named_modules():
            if name:
                table[kohya_name(comp, name, sdxl=sdxl)] = (comp, name)
                if comp == "text_encoder":  # a kohya file may say lora_te or lora_te1
                    table[kohya_name(comp, name, sdxl=not sdxl)] = (comp, name)
    return table


def from_kohya(kohya_sd: dict, modules: dict) -> tuple[dict, dict]:
    """A kohya dict -> ({component: {module: {'down', 'up', 'alpha'}}}, kohya names not in the model).

    Names resolve against `modules` ({'unet': UNet, 'text_encoder': CLIPTextModel, ...}),
    since the underscores alone do not say where a module name ends.
    """
    table = kohya_module_table(modules)
    parts: dict[str, dict] = {}
    unknown = []
    for k, v in kohya_sd.items():
        name, _, field = k.partition(".")
        if field not in ("lora_down.weight", "lora_up.weight", "alpha"):
            if field in ("dora_scale",) or "hada" in field or "lokr" in field:
                raise UserError(f"{k}: only plain LoRA (lora_down/lora_up/alpha) is supported, not LyCORIS/DoRA")
            raise UserError(f"{k}: not a kohya LoRA weight name")
        if name not in table:
            unknown.append(name)
            continue
        comp, mod = table[name]
        key = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}[field]
        parts.setdefault(comp, {}).setdefault(mod, {})[key] = v
    return parts, sorted(set(unknown))


# ------------------------------------------------------------------ diffusers-format files

def diffusers_alphas(metadata: dict | None, path=None) -> dict:
    """{component: (default alpha, {pattern: alpha}, rslora)} from diffusers' lora_adapter_metadata header."""
    raw = (metadata or {}).get("lora_adapter_metadata")
    if not raw:
        return {}
    try:
        meta = json.loads(raw)
    except ValueError:
        raise UserError(f"LoRA file {path or ''}: its lora_adapter_metadata header is not valid JSON; the file is "
                        "damaged") from None
    if not isinstance(meta, dict):
        return {}
    out = {}
    for comp in ("unet", "text_encoder", "text_encoder_2"):
        if f"{comp}.lora_alpha" in meta or f"{comp}.r" in meta:
            out[comp] = (meta.get(f"{comp}.lora_alpha", meta.get(f"{comp}.r")), meta.get(f"{comp}.alpha_pattern") or {},
                         bool(meta.get(f"{comp}.use_rslora")))
    return out


def _module_alpha(comp: str, module: str, rank: int, table: dict) -> float:
    """The kohya alpha that gives peft's scale for this module (alpha/rank, or alpha/sqrt(rank) with rsLoRA)."""
    if comp not in table:
        return float(rank)  # no header: diffusers loads such a file with alpha = rank
    alpha, pattern, rslora = table[comp]
    for pat, a in pattern.items():  # peft matches a pattern against the end of the module path
        if re.match(rf"(.*\.)?({pat})$", module):
            alpha = a
            break
    return float(alpha) * math.sqrt(rank) if rslora else float(alpha)


# diffusers' older names (its example scripts still write them with convert_state_dict_to_diffusers) -> peft's
_OLD_NAMES = ((".lora_linear_layer.down.weight", ".lora_A.weight"), (".lora_linear_layer.up.weight", ".lora_B.weight"),
              (".lora.down.weight", ".lora_A.weight"), (".lora.up.weight", ".lora_B.weight"))


def peft_name(key: str) -> str:
    for old, new in _OLD_NAMES:
        if key.endswith(old):
            return key[: -len(old)] + new
    return key


def split_diffusers(sd: dict) -> dict[str, dict]:
    """A diffusers LoRA file's dict ('unet.<module>.lora_A.weight', or the older '.lora.down.weight' /
    '.lora_linear_layer.down.weight') -> {component: peft dict}."""
    parts: dict[str, dict] = {}
    for k, v in sd.items():
        comp, _, rest = peft_name(k).partition(".")
        if comp not in PREFIXES or not _PEFT.match(rest):
            raise UserError(f"not a diffusers/peft LoRA file: unexpected weight {k!r} (a kohya file starts "
                            "with lora_unet_ / lora_te_)")
        parts.setdefault(comp, {})[rest] = v
    return parts


def diffusers_to_kohya(sd: dict, metadata: dict | None = None) -> dict:
    """A diffusers-format LoRA (pytorch_lora_weights.safetensors) as a kohya dict, alphas from its header."""
    parts = split_diffusers(sd)
    table = diffusers_alphas(metadata)
    alphas = {}
    for comp, psd in parts.items():
        for mod, p in peft_pairs(psd).items():
            alphas[f"{comp}.{mod}"] = _module_alpha(comp, mod, p["down"].shape[0], table)
    return to_kohya(parts, alphas=alphas)


def read_lora(path) -> tuple[dict, dict]:
    """(tensors, header metadata) of a LoRA file: .safetensors, or a pickle (.pt) read weights only as every
    pickle is (trainer.formats.safe_load: one that would run code is refused, saying so). Every tensor and
    alpha must be finite: a NaN/inf LoRA would be merged into black pictures without a word."""
    import torch
    from safetensors import safe_open

    from trainer.formats import safe_load

    path = Path(path)
    problem = safe_load.safetensors_problem(path) if path.is_file() else None
    if problem is not None and problem.startswith("is a"):  # a pickle / zip: not a safetensors file at all
        try:
            sd, meta = safe_load.load_tensors(path), {}
        except UserError as e:
            raise UserError(f"LoRA file {path} is a pickle, not a .safetensors file: {e}") from None
        if not isinstance(sd, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                               for k, v in sd.items()):
            raise UserError(f"LoRA file {path} is a pickle that holds no flat dict of named tensors; "
                            "pass the LoRA as a .safetensors file")
    elif problem is not None:
        raise UserError(f"cannot read LoRA file {path}: it {problem}")
    else:
        try:
            with safe_open(str(path), framework="pt") as f:
                sd, meta = {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
        except Exception as e:  # a broken or non-safetensors file: say which
            raise UserError(f"cannot read LoRA file {path}: {e}") from None
    safe_load.require_finite(sd, f"LoRA file {path}", "weight")
    for comp, (alpha, pattern, _) in diffusers_alphas(meta, path).items():
        for a in (alpha, *(pattern.values() if isinstance(pattern, dict) else [pattern])):
            if not isinstance(a, (int, float)) or not math.isfinite(a):
                raise UserError(f"LoRA file {path}: {comp}'s lora_alpha is {a!r} in its header, it must be a finite "
                                "number; the file is damaged")
    return sd, meta


def lora_updates(sd: dict, metadata: dict | None, modules: dict) -> list[tuple[str, str, object, object, float]]:
    """[(component, module, down, up, alpha)] for a kohya or diffusers LoRA on these modules."""
    if is_kohya(sd):
        parts, unknown = from_kohya(sd, modules)
        if unknown:
            raise UserError(f"the LoRA has {len(unknown)} module(s) this model does not have (e.g. {unknown[0]}); "
                            "it was made for another architecture")
        out = []
        for comp, mods in parts.items():
            for mod, p in mods.items():
                if "down" not in p or "up" not in p:
                    raise UserError(f"LoRA module {mod} lacks its lora_down or lora_up weight")
                rank = p["down"].shape[0]
                alpha = float(p["alpha"]) if "alpha" in p else float(rank)
                if not math.isfinite(alpha):
                    raise UserError(f"LoRA module {mod} has alpha {alpha}; it must be a finite number")
                out.append((comp, mod, p["down"], p["up"], alpha))
        return out
    parts = split_diffusers(sd)
    table = diffusers_alphas(metadata)
    out = []
    for comp, psd in parts.items():
        if comp not in modules:
            raise UserError(f"the LoRA has {comp} weights but the model has no {comp}")
        for mod, p in peft_pairs(psd).items():
            out.append((comp, mod, p["down"], p["up"], _module_alpha(comp, mod, p["down"].shape[0], table)))
    return out


# ------------------------------------------------------------------ merge

def _find(named: dict, mod: str):
    """The module at `mod`, also across transformers 4/5's `text_model.` level."""
    for cand in (mod, mod.removeprefix("text_model."), "text_model." + mod):
        if cand in named:
            return named[cand]
    return None


def merge_into(modules: dict, updates, scale: float = 1.0) -> int:
    """W += scale * alpha/rank * up @ down for every update, in place; returns how many weights changed."""
    import torch

    named = {comp: dict(m.named_modules()) for comp, m in modules.items()}
    n = 0
    with torch.no_grad():
        for comp, mod, down, up, alpha in updates:
            layer = _find(named.get(comp, {}), mod)
            if layer is None or not hasattr(layer, "weight"):
                raise UserError(f"the LoRA targets {comp}.{mod}, which this model does not have; "
                                "it was made for another architecture")
            w = layer.weight
            rank = down.shape[0]
            ok = (up.shape[0] == w.shape[0] and down.shape[1] == w.shape[1] and up.shape[1] == rank
                  and tuple(down.shape[2:]) == tuple(w.shape[2:]) and all(s == 1 for s in up.shape[2:]))
            if not ok:
                raise UserError(f"the LoRA for {comp}.{mod} has shapes down {tuple(down.shape)} / up "
                                f"{tuple(up.shape)}, the model's weight is {tuple(w.shape)}; it was made for "
                                "another architecture")
            delta = (scale * alpha / rank * (up.flatten(1).float() @ down.flatten(1).float())).reshape(w.shape)
            merged = w + delta.to(w.dtype)
            if not bool(torch.isfinite(merged).all()):  # checked before the weight is written
                raise UserError(f"merging the LoRA into {comp}.{mod}.weight gives NaN or inf values (alpha {alpha:g}, "
                                f"scale {scale:g}); the LoRA is damaged or far too strong, nothing is written")
            w.copy_(merged)
            n += 1
    return n


def merge_lora(modules: dict, lora_file, scale: float = 1.0) -> dict:
    """A LoRA file (kohya or diffusers format) merged, in place, into {'unet': ..., 'text_encoder': ...}
    (other entries, e.g. the VAE, are passed through); returns the modules."""
    modules = dict(modules)
    sd, meta = read_lora(lora_file)
    targets = {k: v for k, v in modules.items() if k in PREFIXES}
    merge_into(targets, lora_updates(sd, meta, targets), scale)
    return modules


def save_kohya_lora(path, state: dict, metadata: dict | None = None) -> Path:
    """Write a kohya dict to a new <name>.safetensors (atomic, never over an existing file).

    metadata: kohya's header names where they exist (ss_network_dim, ss_network_alpha,
    ss_base_model_version, ss_sd_model_name, ss_max_train_steps, ss_output_name,
    ss_tag_frequency, ...); values become strings, dicts JSON.
    """
    from trainer.formats.io import write_new_safetensors

    from trainer.formats.safe_load import require_finite

    require_finite(state, f"kohya LoRA {path}", "weight")  # never written: the file would draw black pictures
    meta = {"ss_network_module": "networks.lora"}
    for k, v in (metadata or {}).items():
        meta[k] = json.dumps(v) if isinstance(v, (dict, list)) else str(v)
    return write_new_safetensors(path, {k: v.contiguous() for k, v in state.items()}, meta)


def kohya_metadata(*, rank, alpha, base_model: str = "", v2: bool = False, v_pred: bool = False,
                   steps: int | None = None, identifier: str | None = None, name: str = "",
                   conv_rank: int | None = None, conv_alpha: float | None = None) -> dict:
    """The header kohya's trainer writes, for the fields we know (names from sd-scripts)."""
    meta = {"ss_network_dim": rank, "ss_network_alpha": alpha, "ss_sd_model_name": base_model,
            "ss_base_model_version": ("sd_v2" if v2 else "sd_v1") + ("_v" if v_pred else ""),
            "ss_v2": str(bool(v2)), "ss_output_name": name,
            "modelspec.sai_model_spec": "1.0.0",
            "modelspec.architecture": ("stable-diffusion-v2-768-v" if v_pred else "stable-diffusion-v2-512")
            if v2 else "stable-diffusion-v1",
            "modelspec.implementation": "diffusers", "modelspec.title": name}
    meta["modelspec.architecture"] += "/lora"
    if steps is not None:
        meta["ss_max_train_steps"] = steps
        meta["ss_steps"] = steps
    if identifier:
        meta["ss_tag_frequency"] = {"dbtrain": {identifier: 1}}  # A1111 shows these as the LoRA's words
        meta["modelspec.trigger_phrase"] = identifier
    if conv_rank:
        meta["ss_network_args"] = {"conv_dim": str(conv_rank), "conv_alpha": str(conv_alpha or conv_rank)}
    return meta
