"""`dbtrain export`: a model folder as one .safetensors file (A1111/ComfyUI), and LoRA formats.

  dbtrain export --model DIR --single_file OUT.safetensors [--half]      (SD1.x, SD2.x and SDXL folders)
  dbtrain export --model DIR --lora FILE [--lora_scale S] --merge --single_file OUT.safetensors [--half]
  dbtrain export --model DIR --lora FILE [--lora_scale S] --merge --output_dir NEWDIR
  dbtrain export --lora pytorch_lora_weights.safetensors --kohya OUT.safetensors [--model DIR]
Every family takes all four (SDXL: the UNet and both text encoders merged; kohya's SDXL names lora_unet_,
lora_te1_, lora_te2_ and ss_base_model_version sdxl_base_v1-0). The flags, the files they name and the free
space the outputs need are checked before torch is imported. Every output is written under a temporary name
of this process and moved into place; a write that fails (a full disk) is one line and leaves nothing, and
the files get the user's normal permissions (umask).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from trainer.commands import quiet_libraries
from trainer.errors import UserError
from trainer.families import FAMILIES, SD, family_of
from trainer.formats import io, outdir
from trainer.formats.io import check_new_file
from trainer.options.export import DIFFUSERS_LORA, ExportOptions
from trainer.options.export import parse as parse_flags


def _lora_file(path: str) -> Path:
    p = Path(path)
    if p.is_dir():
        if not (p / DIFFUSERS_LORA).is_file():
            raise UserError(f"--lora {p} is a folder without {DIFFUSERS_LORA}; pass the LoRA file itself")
        p = p / DIFFUSERS_LORA
    if not p.is_file():
        raise UserError(f"--lora {p} does not exist")
    if p.suffix != ".safetensors":
        raise UserError(f"--lora {p}: only .safetensors LoRA files are read (pickled .pt/.ckpt files can run code)")
    return p


def _check_safetensors(p: Path, model: str | None) -> None:
    """A .safetensors file starts with its header's length (8 bytes, little-endian) and that JSON header;
    checked here, before torch, so a wrong file is one line naming what --model is."""
    why = None
    try:
        with open(p, "rb") as f:
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            if n <= 0 or n > 100 * 2**20:
                why = "no safetensors header"
            else:
                json.loads(f.read(n))
    except OSError as e:
        why = f"cannot read it: {e.strerror}"
    except ValueError:
        why = "its header is not valid JSON"
    if why is None:
        return
    kind = f"; --model {model} is an {family_of(model).label} model, pass a LoRA made for it" if model else ""
    raise UserError(f"--lora {p} is not a readable .safetensors LoRA file ({why}){kind}")


def _check_new_dir(path: str) -> Path:
    d = Path(path)
    if d.exists():
        if not d.is_dir() or any(d.iterdir()):
            raise UserError(f"--output_dir {d} exists and is not an empty folder; choose a new one")
    else:
        outdir.check_creatable(d, "--output_dir")
    return d


_WEIGHTS = ("unet", "vae", "text_encoder", "text_encoder_2")  # what a single file or a merged folder holds


def _model_numel(model: Path) -> int:
    """Elements in the weights of --model's components, from the .safetensors headers (torch-free); a variant
    (name.fp16.safetensors) counts only where the component has no plain file, pickles as half precision."""
    total = 0
    for comp in _WEIGHTS:
        files = sorted((model / comp).glob("*.safetensors"))
        plain = [f for f in files if f.name.count(".") == 1]
        total += sum(outdir.safetensors_numel(f) or f.stat().st_size // 2 for f in plain or files)
        if not files:
            total += sum(f.stat().st_size // 2 for f in (model / comp).glob("*.bin"))
    return total


def _check_space(a: ExportOptions) -> None:
    """Room for every output, before a model loads (outdir.NoSpace's one line; as `dbtrain train` checks)."""
    if a.single_file:
        need = _model_numel(Path(a.model)) * (2 if a.half else 4) + outdir.MB
        outdir.require_space(Path(a.single_file).parent, need, f"--single_file {a.single_file}")
    if a.output_dir:  # the merged folder holds the weights as --model stores them, plus its small files
        model = Path(a.model)
        need = sum(f.stat().st_size for comp in _WEIGHTS for f in (model / comp).glob("*") if f.is_file()) + outdir.MB
        outdir.require_space(a.output_dir, need, f"--output_dir {a.output_dir}")
    if a.kohya:  # the same tensors under other names, plus an alpha per module
        need = 2 * Path(a.lora).stat().st_size + outdir.MB
        outdir.require_space(Path(a.kohya).parent, need, f"--kohya {a.kohya}")


def check(a: ExportOptions) -> ExportOptions:
    """The files and folders the flags name (torch-free): --model is a folder export can write, --lora a
    readable .safetensors file, the outputs new, and room for them."""
    if a.model:
        a.model = str(family_of(a.model).check_export_source(a.model))
    if a.lora:
        a.lora = str(_lora_file(a.lora))
        _check_safetensors(Path(a.lora), a.model)
    for flag, out in (("--single_file", a.single_file), ("--kohya", a.kohya)):
        if out:
            check_new_file(out, flag)
    if a.single_file and a.kohya and Path(a.single_file).resolve() == Path(a.kohya).resolve():
        raise UserError("--single_file and --kohya name the same file")
    if a.output_dir:
        _check_new_dir(a.output_dir)
    _check_space(a)
    return a


def parse(argv: list[str]) -> ExportOptions:
    return check(parse_flags(argv))


def run(argv: list[str]) -> None:
    a = parse(argv)
    quiet_libraries()
    export(a)


# ------------------------------------------------------------------ the work (torch from here on)

def _run_record(lora: Path) -> dict:
    """The options of the dbtrain run that wrote `lora` (its marker next to it), or {}."""
    rec = outdir.read_marker(lora.parent) or {}
    cfg = rec.get("config")
    return cfg if isinstance(cfg, dict) else {}


def _lora_family(a, parts: dict, run: dict):
    """The family the LoRA is for: --model's; else the base model recorded by the dbtrain run that wrote it, or
    the one whose text encoders the file has adapters for."""
    if a.model:
        return family_of(a.model)
    base = run.get("pretrained_model_name_or_path")
    by_base = family_of(base) if base and Path(str(base)).is_dir() else SD
    return next(f for f in (by_base, *FAMILIES) if set(parts) <= {"unet", *f.text_encoder_names})


def _to_kohya(a) -> None:
    from trainer.formats import kohya_lora as kl

    lora = Path(a.lora)
    sd, meta = kl.read_lora(lora)
    if kl.is_kohya(sd):
        raise UserError(f"--lora {lora} is already in kohya's format")
    run = _run_record(lora)
    family = _lora_family(a, kl.split_diffusers(sd), run)
    state = family.kohya_names(kl.diffusers_to_kohya(sd, meta))  # SDXL: lora_te1_ also without a second encoder
    if a.model:  # names and shapes checked against the model the LoRA is for
        unet, _, *encoders = family.load_models(a.model)
        probe = {"unet": unet, **dict(zip(family.text_encoder_names, encoders))}
        updates = kl.lora_updates(state, None, probe)
        kl.merge_into(probe, [(c, m, d * 0, u, al) for c, m, d, u, al in updates])  # shapes only, adds zero
    downs = {k: v for k, v in state.items() if k.endswith(".lora_down.weight")}
    conv_names = {k[:-len(".lora_down.weight")] for k, v in downs.items() if v.ndim == 4 and v.shape[-1] > 1}
    # kohya's header: network_dim/alpha for the linear (and 1x1) layers, the 3x3 convs' in ss_network_args
    ranks = sorted({v.shape[0] for k, v in downs.items() if k[:-len(".lora_down.weight")] not in conv_names})
    alphas = sorted({float(v) for k, v in state.items() if k.endswith(".alpha") and k[:-6] not in conv_names})
    conv = sorted({downs[n + ".lora_down.weight"].shape[0] for n in conv_names})
    conv_alpha = sorted({float(state[n + ".alpha"]) for n in conv_names})
    te_cfg = json.loads((Path(a.model) / "text_encoder/config.json").read_text()) if a.model else {}
    base = a.model or run.get("pretrained_model_name_or_path", "")
    v_pred = False
    if a.model:
        from trainer.formats.single_file import prediction_type

        v_pred = prediction_type(a.model) == "v_prediction"
    ident = run.get("identifier") or run.get("instance_prompt")
    one = lambda xs: (xs[0] if len(xs) == 1 else "Dynamic") if xs else None  # noqa: E731 (kohya's word)
    header = family.lora_header(kl.kohya_metadata(  # (SDXL: its base-model version, as trainer.methods.lora writes)
        rank=one(ranks), alpha=one(alphas), base_model=Path(str(base)).name if base else "",
        v2=te_cfg.get("hidden_act") == "gelu", v_pred=v_pred, steps=run.get("max_train_steps"),
        identifier=ident, name=Path(a.kohya).stem, conv_rank=one(conv), conv_alpha=one(conv_alpha)))
    kl.save_kohya_lora(a.kohya, state, header)
    print(f"wrote {a.kohya}: {len(downs)} LoRA modules, rank {header['ss_network_dim']}, "
          f"alpha {header['ss_network_alpha']} (kohya format{'' if family is SD else ', ' + family.label}: A1111, "
          f"ComfyUI)")


def _write_folder(a, parts) -> None:
    """The merged model as a diffusers folder: saved beside NEWDIR under a name of this process
    (`.NEWDIR.tmp-export-<pid>`; those of processes that are gone are removed), then renamed into place.
    parts: family.load_models' (unet, vae, *text encoders)."""
    from trainer.formats.diffusers_folder import model_bytes

    family = family_of(a.model)
    out = Path(a.output_dir)
    prefix = f".{out.name}.tmp-export-"
    io.remove_stale(out.parent, prefix)
    tmp = out.parent / f"{prefix}{os.getpid()}"
    io.remove(tmp)
    pipe = family.load_pipeline(a.model, **dict(zip(("unet", "vae", *family.text_encoder_names), parts)))
    need = model_bytes(a.model, pipe)
    outdir.require_space(out.parent, need, f"--output_dir {out}")
    try:
        with io.one_line_write_errors(out.parent, f"--output_dir {out.name}", need, tmp):
            pipe.save_pretrained(tmp, safe_serialization=True)
        io.normal_permissions(tmp)
        try:
            if out.exists():
                out.rmdir()  # checked empty in parse(); rmdir refuses if something appeared since
            os.rename(tmp, out)
        except OSError as e:
            raise UserError(f"could not write --output_dir {out}: {e.strerror or e}; nothing was written") from None
    finally:
        io.remove(tmp)
    print(f"wrote the merged model to {out} (diffusers folder)")


def export(a: ExportOptions) -> None:
    if a.kohya:
        _to_kohya(a)
        return
    family = family_of(a.model)
    components = None
    if a.merge:  # UNet and every text encoder; kohya (lora_te_, lora_te1_/lora_te2_) or diffusers names
        components = family.merge_lora(a.model, a.lora, scale=a.lora_scale)
        print(f"merged {a.lora} (scale {a.lora_scale}) into {a.model}")
        if a.output_dir:
            _write_folder(a, components)
    if a.single_file:
        meta = {"dbtrain.merged_lora": Path(a.lora).name, "dbtrain.lora_scale": a.lora_scale} if a.merge else {}
        out = family.save_single_file(a.model, a.single_file, half=a.half, metadata=meta, components=components)
        size = out.stat().st_size / 2**20
        print(f"wrote {out} ({size:.1f} MiB, {'float16' if a.half else 'float32'}; single-file layout for "
              "A1111/ComfyUI)")
