"""`dbtrain estimate`: the peak GPU memory of one training step, computed on the CPU.

The trainer's own step (loop.setup + loop.train_step) runs once on fake tensors
(torch's FakeTensorMode: shapes, dtypes and storages, no data, no arithmetic), with the
models built from their configs (trainer/arch_configs/*.json, or a model folder's
config.json files; weights are never read). trainer.memtrack counts every live storage,
so the result is the peak of the tensors the step holds, by phase and by category; an
allowance for what fake tensors cannot see (CUDA context, library workspaces, the
caching allocator's rounding and fragmentation) is added on top (ALLOWANCE below).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from trainer.options import train as config
from trainer.errors import UserError

ARCH_DIR = Path(__file__).with_name("arch_configs")
ARCHES = ("sd15", "sd21", "sdxl")
CARDS_GIB = (8, 12, 16, 24)
GIB = 1 << 30
MIB = 1 << 20

# What fake tensors do not see, and the numbers used for it (bytes):
# - the CUDA context and torch's loaded kernels: 500 MiB, the usual size with lazy module loading (CUDA >= 11.7,
#   torch's default); it is part of what nvidia-smi shows and of what a card has to hold.
# - cuBLAS workspace: 32 MiB (torch's default CUBLAS_WORKSPACE_CONFIG on sm_90, 4 MiB x 8 elsewhere).
# - cuDNN convolution workspace: 256 MiB, a bound we assume for the SD UNet's 3x3 convolutions at batch 2.
# - the caching allocator rounds every block up to 512 B (computed exactly from the storages at the peak).
# - fragmentation: 10% of the step's churn (activations + temporaries at the peak); weights, gradients and
#   optimizer states are long-lived blocks allocated once. Assumed, not measured (no GPU here): `bench train`
#   on a GPU writes the estimate beside the measured peak to calibrate it.
ALLOWANCE = {"cuda_context": 500 * MIB, "cublas_workspace": 32 * MIB, "cudnn_workspace": 256 * MIB}
FRAGMENTATION = 0.10
ROUND = 512

# (applies to the run?, what differs on the GPU)
DIFFERENCES = (
    (lambda c: c.mixed_precision != "no",
     "autocast's op lists differ between CPU (this run) and CUDA: a few ops (norms, softmax) may keep another "
     "dtype on the GPU"),
    (lambda c: c.mixed_precision == "fp16",
     "GradScaler: modelled as a scaled loss and an in-place unscale (its inf checks need values)"),
    (lambda c: c.optimizer in ("adamw8bit", "bnb8bit"),
     "AdamW8bit: the fake run creates its states but skips the update, which the CUDA kernel does in place "
     "(no temporaries besides a small launch table)"),
    (lambda c: c.optimizer == "adamw",
     "torch AdamW: the fake run uses the fused step for fp32 weights and foreach otherwise, as the trainer and "
     "torch pick on a GPU"),
    (lambda c: c.kernels,
     "Triton attention: its backward's fp32 row sums (batch x heads x tokens x 4 B, one layer at a time) are "
     "not seen"),
    (lambda c: not getattr(c, "stock_recipe", False),
     "latents and prompt embeddings are cached as the trainer does for square or center-cropped images: the VAE "
     "(and frozen text encoders) are not on the GPU during the steps; random crops would keep the VAE there"),
)


# ---------------------------------------------------------------- flags (no torch)

def build_parser() -> argparse.ArgumentParser:
    p = config.build_parser()
    p.prog = "dbtrain estimate"
    p.description = ("Peak GPU memory of one training step of `dbtrain train` with these flags, computed on the "
                     "CPU with fake tensors (no GPU, no weights).")
    for act in p._actions:  # the data flags do not matter here
        if act.dest in ("instance_data_dir", "instance_prompt", "class_prompt", "class_data_dir"):
            act.help = argparse.SUPPRESS
    g = config.option_adder(p.add_argument_group("estimate"))
    g("--arch", default=None, metavar="|".join(ARCHES),
      help="a model built from the configs shipped in trainer/arch_configs (instead of "
           "--pretrained_model_name_or_path, whose config.json files are read, never its weights)")
    g("--json", action="store_true", help="print one JSON object")
    g("--world_size", type=int, default=1, metavar="N",
      help="one rank of N under torchrun (its share of the global batch; with --shard the rank holding the "
           "largest share of the optimizer state and gradients)")
    return p


def parse(argv: list[str]) -> argparse.Namespace:
    parser = build_parser()
    parser.set_defaults(instance_data_dir="-", instance_prompt="a photo of [V]", class_prompt="a photo",
                        class_data_dir="-")
    config.config_file_defaults(parser, argv)
    cfg = parser.parse_args(argv)
    if cfg.arch is not None and cfg.arch not in ARCHES:
        raise UserError(f"--arch must be one of {', '.join(ARCHES)}, got {cfg.arch!r}")
    if cfg.arch and cfg.pretrained_model_name_or_path:
        raise UserError("give --arch or --pretrained_model_name_or_path, not both")
    if cfg.world_size < 1:
        raise UserError(f"--world_size must be >= 1, got {cfg.world_size}")
    if cfg.shard and cfg.world_size < 2:
        raise UserError("--shard splits the optimizer state over torchrun's ranks: give --world_size N (N >= 2) "
                        "for the memory of one of them")
    if not cfg.arch and not cfg.pretrained_model_name_or_path:
        raise UserError("give --arch sd15|sd21|sdxl or --pretrained_model_name_or_path DIR (its configs are read)")
    if not cfg.pretrained_model_name_or_path:
        cfg.pretrained_model_name_or_path = "-"
    config.check(cfg)
    notes = getattr(config, "flag_notes", None)
    if notes is not None and hasattr(notes, "apply"):  # diffusers' flags mapped onto ours, as dbtrain train does
        import contextlib

        with contextlib.redirect_stdout(sys.stderr):  # --json keeps stdout to one object
            notes.apply(cfg, UserError)
    if cfg.arch is None:
        model_configs(cfg.pretrained_model_name_or_path)  # the folder and its configs, before torch
    else:
        cfg.pretrained_model_name_or_path = None
    return cfg


def _read_json(path: Path, what: str) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as e:
        raise UserError(f"{what}: {path} is missing") from e
    except (OSError, ValueError) as e:
        raise UserError(f"{what}: {path} is not readable JSON ({e})") from e


def model_configs(folder=None, arch: str | None = None) -> dict:
    """{"unet", "vae", "text_encoder": [..], "scheduler"} configs of an arch or a model folder (SDXL: two text
    encoder configs, CLIPTextModel's and CLIPTextModelWithProjection's)."""
    if arch is not None:
        return _read_json(ARCH_DIR / f"{arch}.json", f"--arch {arch}")
    root = Path(folder)
    if not root.is_dir():
        raise UserError(f"model folder {root} does not exist")
    where = f"--pretrained_model_name_or_path {root}"
    from trainer.families.sdxl import check_sdxl_folder, is_sdxl

    xl = is_sdxl(root)
    if xl:  # a refiner or an incomplete folder: the same one line as dbtrain train
        check_sdxl_folder(root)
    encoders = ("text_encoder", "text_encoder_2") if xl else ("text_encoder",)
    out = {"unet": _read_json(root / "unet" / "config.json", where),
           "text_encoder": [_read_json(root / e / "config.json", where) for e in encoders],
           "scheduler": _read_json(root / "scheduler" / "scheduler_config.json", where)}
    vae = root / "vae" / "config.json"
    out["vae"] = _read_json(vae, where) if vae.is_file() else {}
    return out


# ---------------------------------------------------------------- running the step

def run(args) -> dict:
    res = estimate(args)
    print(json.dumps(res) if args.json else report(res), flush=True)
    return res


def estimate(cfg, comps=None, *, fake: bool = True) -> dict:
    """Track one training step; returns the result dict (see report). comps: real components to run on
    (tests: the real step tracked the same way); otherwise fake ones built from the configs."""
    import time

    from trainer.distributed import data_parallel as distributed
    from trainer.memory import tracker as memtrack

    t0 = time.perf_counter()
    # torchrun: one rank's step (dbtrain train's preflight: this run's ranks), collectives left out
    world = world_size(cfg)
    with distributed.simulated(world, shard=bool(getattr(cfg, "shard", False))):
        if comps is None:
            confs = model_configs(cfg.pretrained_model_name_or_path, getattr(cfg, "arch", None))
            tracked = memtrack.track_step(cfg, confs=confs, fake=fake)
        else:
            tracked = memtrack.track_step(cfg, comps=comps, fake=fake)
        tracked["world_size"], tracked["rank"] = world, distributed.rank()
    return summarize(cfg, tracked, time.perf_counter() - t0)


def summarize(cfg, t: dict, seconds: float) -> dict:
    peak_phase = max(t["phases"], key=lambda ph: t["phases"][ph]["peak_bytes"])
    at_peak = t["phases"][peak_phase]
    tracked = at_peak["peak_bytes"]
    churn = at_peak["by_category"]["activations"] + at_peak["by_category"]["temporaries"]
    allowance = dict(ALLOWANCE, allocator_rounding=at_peak["rounding_bytes"],
                     fragmentation=int(FRAGMENTATION * churn))
    predicted = tracked + sum(allowance.values())
    fits = [g for g in CARDS_GIB if predicted <= g * GIB]
    return {"peak_bytes": predicted, "tracked_peak_bytes": tracked, "peak_phase": peak_phase,
            "by_category": at_peak["by_category"], "phases": t["phases"], "allowance_bytes": allowance,
            "fits_gib": fits, "smallest_card_gib": fits[0] if fits else None,
            "params": t["params"], "trainable_params": t["trainable_params"],
            "notes": t["notes"] + [n for applies, n in DIFFERENCES if applies(cfg)],
            "options": options_of(cfg), "seconds": round(seconds, 1),
            "world_size": t.get("world_size", 1), "rank": t.get("rank", 0),
            "device": "estimate (fake tensors, CPU)"}


def options_of(cfg) -> dict:
    keys = ("resolution", "train_batch_size", "with_prior_preservation", "train_text_encoder", "mixed_precision",
            "optimizer", "weights_dtype", "gradient_checkpointing", "step_in_backward", "kernels",
            "gradient_accumulation_steps", "shard")
    out = {k: getattr(cfg, k) for k in keys if hasattr(cfg, k)}
    out["model"] = getattr(cfg, "arch", None) or str(cfg.pretrained_model_name_or_path)
    out["world_size"] = world_size(cfg)
    if getattr(cfg, "lora_rank", None):
        out["lora_rank"] = cfg.lora_rank
    if getattr(cfg, "stock_recipe", False):
        out["stock_recipe"] = True
    return out


def world_size(cfg) -> int:
    """The ranks estimated for: --world_size, or in dbtrain train's preflight this run's own."""
    from trainer.distributed import data_parallel as distributed

    return getattr(cfg, "world_size", None) or distributed.world()


def _gb(n: int) -> str:
    return f"{n / GIB:6.2f} GiB"


def report(r: dict) -> str:
    o = r["options"]
    rows = o["train_batch_size"] * (2 if o["with_prior_preservation"] else 1)
    lines = [f"dbtrain estimate: {o['model']} at {o['resolution']} px, {rows} row(s) per step, "
             f"{r['trainable_params'] / 1e6:.1f}M of {r['params'] / 1e6:.1f}M parameters trained "
             f"({r['seconds']:.0f} s on the CPU)",
             *([f"one rank of {r['world_size']} under torchrun (rank {r['rank']}): {o['train_batch_size']} of the "
                f"{r['world_size'] * o['train_batch_size']} instance rows of a step" +
                (", its share of the optimizer state and gradients (--shard)" if o.get("shard") else
                 ", a whole copy of the optimizer state and gradients (--shard splits them)")]
               if r.get("world_size", 1) > 1 else []),
             f"peak of the tracked tensors: {_gb(r['tracked_peak_bytes'])} in {r['peak_phase']}"]
    for k, v in r["by_category"].items():
        lines.append(f"  {k:<16}{_gb(v)}")
    lines.append("by phase (peak of each):")
    for ph, d in r["phases"].items():
        lines.append(f"  {ph:<16}{_gb(d['peak_bytes'])}")
    lines.append("allowance for what fake tensors do not see:")
    for k, v in r["allowance_bytes"].items():
        lines.append(f"  {k:<19}{_gb(v)}")
    fits = r["fits_gib"]
    lines.append(f"predicted peak: {_gb(r['peak_bytes']).strip()} ({r['peak_bytes']} bytes): "
                 + (f"fits a {fits[0]} GB card" if fits else f"does not fit a {CARDS_GIB[-1]} GB card"))
    lines.append("where the GPU run differs from this estimate:")
    lines += [f"  - {n}" for n in r["notes"]]
    return "\n".join(lines)


# ---------------------------------------------------------------- dbtrain train on a GPU

_last: dict = {}


def predicted_peak(cfg) -> dict:
    """The estimate of this run's step (cached per option set), for the run log beside the measured peak."""
    key = json.dumps(options_of(cfg), sort_keys=True, default=str)
    if key not in _last:
        _last[key] = estimate(cfg)
    return _last[key]


def supported(cfg) -> bool:
    """Runs the estimate covers: DreamBooth (full or LoRA) on an SD 1.x/2.x or SDXL UNet; not Textual Inversion."""
    return getattr(cfg, "train_unet", True) and not getattr(cfg, "train_text_embedding", False)


def log_fields(cfg) -> dict:
    """For the run log beside torch.cuda.max_memory_allocated: the tracked peak plus the allocator's 512 B
    rounding (what max_memory_allocated counts) and the predicted peak with the whole allowance, in GiB."""
    if not supported(cfg):
        return {}
    r = predicted_peak(cfg)
    return {"estimated_allocated_gb": round((r["tracked_peak_bytes"] + r["allowance_bytes"]["allocator_rounding"])
                                            / GIB, 3),
            "estimated_peak_gb": round(r["peak_bytes"] / GIB, 3)}


def preflight(cfg, device) -> str | None:
    """On a GPU: a one-line warning when the estimate exceeds the free memory, naming options that would
    make it fit; None when it fits (or on a CPU, or for runs the estimate does not cover)."""
    if getattr(device, "type", str(device)) != "cuda" or not supported(cfg):
        return None
    import torch

    free, _total = torch.cuda.mem_get_info(device)
    try:
        r = predicted_peak(cfg)
    except Exception as e:  # noqa: BLE001 - advisory only: the run itself says what is wrong, if anything
        return f"note: no memory estimate for this run ({type(e).__name__}: {str(e)[:120]})"
    # this process's CUDA context already counts as used, so it is not in what must still be free
    need = r["peak_bytes"] - ALLOWANCE["cuda_context"]
    if need <= free:
        return None
    picked, left = [], need
    for flag, b in savings(r, cfg):
        if left <= free:
            break
        picked.append(flag)
        left -= b
    hint = (f"; {' '.join(picked)} would bring it to about {left / GIB:.1f} GiB" if picked and left <= free
            else f"; even {' '.join(picked)} would leave about {left / GIB:.1f} GiB" if picked else "")
    return (f"warning: this run is estimated to need {need / GIB:.1f} GiB of GPU memory but {free / GIB:.1f} GiB "
            f"are free{hint} (dbtrain estimate shows the breakdown)")


def savings(r: dict, cfg) -> list[tuple[str, int]]:
    """(flag, bytes it saves, roughly) for the memory options this run does not use yet, biggest first."""
    cat, n = r["by_category"], r["trainable_params"]
    lora = bool(getattr(cfg, "lora_rank", None))
    out = []
    if cfg.optimizer == "adamw":
        out.append(("--optimizer adamw8bit", max(0, cat["optimizer_state"] - 2 * n)))
    if not cfg.gradient_checkpointing:  # most saved activations are recomputed in backward instead
        out.append(("--gradient_checkpointing", int(0.7 * cat["activations"])))
    if not cfg.step_in_backward and cfg.gradient_accumulation_steps == 1 and cfg.mixed_precision != "fp16":
        out.append(("--step_in_backward" + ("" if cfg.optimizer == "adamw8bit" else " (needs adamw8bit)"),
                    cat["gradients"]))
    if cfg.weights_dtype != "bf16" and not lora:
        out.append(("--weights_dtype bf16", cat["weights"] // 2 + cat["gradients"] // 2))
    if cfg.mixed_precision == "no":
        out.append(("--mixed_precision bf16", cat["activations"] // 3))
    return sorted(out, key=lambda x: -x[1])


if __name__ == "__main__":
    sys.exit(0 if run(parse(sys.argv[1:])) else 1)
