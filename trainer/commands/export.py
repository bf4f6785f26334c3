"""`dbtrain export`: a model folder as one .safetensors file (A1111/ComfyUI), and LoRA formats.

  dbtrain export --model DIR --single_file OUT.safetensors [--half]      (SD1.x, SD2.x and SDXL folders)
  dbtrain export --model DIR --lora FILE [--lora_scale S] --merge --single_file OUT.safetensors [--half]
  dbtrain export --model DIR --lora FILE [--lora_scale S] --merge --output_dir NEWDIR
  dbtrain export --lora pytorch_lora_weights.safetensors --kohya OUT.safetensors [--model DIR]
SDXL folders take all four: --merge uses trainer.sdxl.merge_lora_sdxl (UNet and both text encoders), --kohya
writes kohya's SDXL names (lora_unet_, lora_te1_, lora_te2_; ss_base_model_version sdxl_base_v1-0).

parse() checks the flags and the paths without importing torch; run() does the work.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

from trainer.options.train import HelpFormatter
from trainer.errors import UserError

DIFFUSERS_LORA = "pytorch_lora_weights.safetensors"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dbtrain export", formatter_class=HelpFormatter,
        description="Write a diffusers SD1.x/SD2.x/SDXL folder (a dbtrain output folder is one) as a single-file "
                    "checkpoint for A1111/ComfyUI, merge a LoRA into it, or convert a diffusers LoRA to kohya's "
                    "format.")
    p.add_argument("--model", default=None, help="a diffusers Stable Diffusion folder (or a dbtrain output folder)")
    p.add_argument("--single_file", default=None, metavar="OUT.safetensors",
                   help="write the model as one original-layout checkpoint (a new file)")
    p.add_argument("--half", action="store_true", help="store the single file in float16 (half the size)")
    p.add_argument("--lora", default=None, metavar="FILE",
                   help="a LoRA .safetensors file, kohya or diffusers format (or a folder holding "
                        f"{DIFFUSERS_LORA})")
    p.add_argument("--lora_scale", type=float, default=1.0, help="strength of the merged LoRA (default 1.0)")
    p.add_argument("--merge", action="store_true",
                   help="merge --lora into --model's weights (for UIs without LoRA support)")
    p.add_argument("--output_dir", default=None, metavar="NEWDIR",
                   help="with --merge: also write the merged model as a diffusers folder (new or empty)")
    p.add_argument("--kohya", default=None, metavar="OUT.safetensors",
                   help="write --lora in kohya's format (lora_unet_/lora_te_ names, SDXL: lora_te1_/lora_te2_; "
                        "alphas, ss_* header)")
    return p


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
    kind = ""
    if model:
        from trainer.families.sdxl import is_sdxl

        kind = f"; --model {model} is an {'SDXL' if is_sdxl(model) else 'SD1.x/SD2.x'} model, pass a LoRA made for it"
    raise UserError(f"--lora {p} is not a readable .safetensors LoRA file ({why}){kind}")


def _check_new_dir(path: str) -> Path:
    from trainer.formats import outdir

    d = Path(path)
    if d.exists():
        if not d.is_dir() or any(d.iterdir()):
            raise UserError(f"--output_dir {d} exists and is not an empty folder; choose a new one")
    else:
        outdir.check_creatable(d, "--output_dir")
    return d


def parse(argv: list[str]) -> argparse.Namespace:
    from trainer.formats.io import check_new_file
    from trainer.formats.single_file import check_model_folder

    a = build_parser().parse_args(argv)
    if not (a.single_file or a.kohya or a.output_dir):
        raise UserError("say what to write: --single_file OUT.safetensors, --kohya OUT.safetensors (with --lora), "
                        "or --merge --output_dir NEWDIR")
    if a.kohya and (a.merge or a.single_file or a.output_dir):
        raise UserError("--kohya converts a LoRA file on its own; run --merge / --single_file as another command")
    if a.kohya and not a.lora:
        raise UserError("--kohya needs --lora FILE (a diffusers-format LoRA to convert)")
    if a.lora and not a.kohya and not a.merge:
        raise UserError("--lora with --single_file/--output_dir needs --merge (the LoRA merged into the weights)")
    if a.merge and not a.lora:
        raise UserError("--merge needs --lora FILE")
    if a.output_dir and not a.merge:
        raise UserError("--output_dir writes a merged model: add --lora FILE --merge")
    if (a.single_file or a.merge) and not a.model:
        raise UserError("--model DIR is needed (the diffusers folder to export)")
    import math

    if not math.isfinite(a.lora_scale):
        raise UserError(f"--lora_scale must be a finite number, got {a.lora_scale}")
    if a.model:
        a.model = str(check_model_folder(a.model))
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
    return a


# ------------------------------------------------------------------ the work (torch from here on)

def _run_record(lora: Path) -> dict:
    """The config of the dbtrain run that wrote `lora` (its marker next to it), or {}."""
    from trainer.formats.outdir import read_marker

    rec = read_marker(lora.parent) or {}
    cfg = rec.get("config")
    return cfg if isinstance(cfg, dict) else {}


def _is_sdxl_lora(a, parts: dict, run: dict) -> bool:
    """Whether the LoRA is for SDXL: --model says so; else a second text encoder's adapters or the base model
    recorded by the dbtrain run that wrote it."""
    from trainer.families.sdxl import is_sdxl

    if a.model:
        return is_sdxl(a.model)
    base = run.get("pretrained_model_name_or_path")
    return "text_encoder_2" in parts or bool(base and Path(str(base)).is_dir() and is_sdxl(base))


def _to_kohya(a) -> None:
    from trainer.formats import kohya_lora as kl

    lora = Path(a.lora)
    sd, meta = kl.read_lora(lora)
    if kl.is_kohya(sd):
        raise UserError(f"--lora {lora} is already in kohya's format")
    state = kl.diffusers_to_kohya(sd, meta)
    run = _run_record(lora)
    xl = _is_sdxl_lora(a, kl.split_diffusers(sd), run)
    if xl:  # kohya's SDXL names: lora_te1_ for the first encoder also when the file has no second one
        state = {("lora_te1_" + k[len("lora_te_"):] if k.startswith("lora_te_") else k): v for k, v in state.items()}
    if a.model:  # names and shapes checked against the model the LoRA is for
        if xl:
            from trainer.formats.single_file_sdxl import load_components_sdxl

            unet, _, te, te2 = load_components_sdxl(a.model)
            probe = {"unet": unet, "text_encoder": te, "text_encoder_2": te2}
        else:
            from trainer.formats.single_file import load_components

            unet, _, te = load_components(a.model)
            probe = {"unet": unet, "text_encoder": te}
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
    header = kl.kohya_metadata(
        rank=one(ranks), alpha=one(alphas), base_model=Path(str(base)).name if base else "",
        v2=te_cfg.get("hidden_act") == "gelu" and not xl, v_pred=v_pred, steps=run.get("max_train_steps"),
        identifier=ident, name=Path(a.kohya).stem, conv_rank=one(conv), conv_alpha=one(conv_alpha))
    if xl:  # kohya's / modelspec's names for SDXL base LoRAs (as trainer.lora.metadata writes them)
        header.update(ss_base_model_version="sdxl_base_v1-0", ss_v2="False",
                      **{"modelspec.architecture": "stable-diffusion-xl-v1-base/lora"})
    kl.save_kohya_lora(a.kohya, state, header)
    print(f"wrote {a.kohya}: {len(downs)} LoRA modules, rank {header['ss_network_dim']}, "
          f"alpha {header['ss_network_alpha']} (kohya format{', SDXL' if xl else ''}: A1111, ComfyUI)")


def _write_folder(a, parts) -> None:
    """The merged model as a diffusers folder: saved beside NEWDIR, then renamed into place.
    parts: (unet, vae, text_encoder) or, SDXL, (unet, vae, text_encoder, text_encoder_2)."""
    out = Path(a.output_dir)
    tmp = out.parent / f".{out.name}.tmp-export-{os.getpid()}"
    try:
        if len(parts) == 4:
            from diffusers import StableDiffusionXLPipeline

            unet, vae, te, te2 = parts
            pipe = StableDiffusionXLPipeline.from_pretrained(a.model, unet=unet, vae=vae, text_encoder=te,
                                                             text_encoder_2=te2)
        else:
            from diffusers import StableDiffusionPipeline

            unet, vae, te = parts
            pipe = StableDiffusionPipeline.from_pretrained(a.model, unet=unet, vae=vae, text_encoder=te,
                                                           safety_checker=None, requires_safety_checker=False)
        pipe.save_pretrained(tmp, safe_serialization=True)
        if out.exists():
            out.rmdir()  # checked empty in parse(); rmdir refuses if something appeared since
        os.rename(tmp, out)
    except OSError as e:
        raise UserError(f"could not write --output_dir {out}: {e}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"wrote the merged model to {out} (diffusers folder)")


def run(a) -> None:
    if a.kohya:
        _to_kohya(a)
        return
    from trainer.formats import single_file as sf

    from trainer.families.sdxl import is_sdxl, merge_lora_sdxl

    components = None
    if a.merge:
        if is_sdxl(a.model):  # UNet and both text encoders; kohya (lora_te1_/lora_te2_) or diffusers names
            components = merge_lora_sdxl(a.model, a.lora, scale=a.lora_scale)
        else:
            from trainer.formats.kohya_lora import merge_lora

            unet, vae, te = sf.load_components(a.model)
            merge_lora({"unet": unet, "vae": vae, "text_encoder": te}, a.lora, scale=a.lora_scale)
            components = (unet, vae, te)
        print(f"merged {a.lora} (scale {a.lora_scale}) into {a.model}")
        if a.output_dir:
            _write_folder(a, components)
    if a.single_file:
        meta = {"dbtrain.merged_lora": Path(a.lora).name, "dbtrain.lora_scale": a.lora_scale} if a.merge else {}
        out = sf.save_single_file(a.model, a.single_file, half=a.half, metadata=meta, components=components)
        size = out.stat().st_size / 2**20
        print(f"wrote {out} ({size:.1f} MiB, {'float16' if a.half else 'float32'}; single-file layout for "
              "A1111/ComfyUI)")
