"""`dbtrain estimate`: the peak GPU memory of one training step, computed on the CPU.

The trainer's own step (trainer.core.step's setup and train_step) runs once on fake tensors
(torch's FakeTensorMode: shapes, dtypes and storages, no data, no arithmetic), with the
models built from their configs (trainer/memory/arch_configs/*.json, or a model folder's
config.json files; weights are never read). trainer.memory.tracker counts every live storage,
so the result is the peak of the tensors the step holds, by phase and by category; an
allowance for what fake tensors cannot see (CUDA context, library workspaces, the
caching allocator's rounding and fragmentation) is added on top (ALLOWANCE below).
"""
from __future__ import annotations

import json
from pathlib import Path

from trainer.errors import UserError
from trainer.families import family_of
from trainer.options.estimate import EstimateOptions

ARCH_DIR = Path(__file__).with_name("arch_configs")
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
DIFFERENCES = (  # of an EstimateOptions
    (lambda c: c.train.memory.mixed_precision != "no",
     "autocast's op lists differ between CPU (this run) and CUDA: a few ops (norms, softmax) may keep another "
     "dtype on the GPU"),
    (lambda c: c.train.memory.mixed_precision == "fp16",
     "GradScaler: modelled as a scaled loss and an in-place unscale (its inf checks need values)"),
    (lambda c: c.train.optim.optimizer in ("adamw8bit", "bnb8bit"),
     "AdamW8bit: the fake run creates its states but skips the update, which the CUDA kernel does in place "
     "(no temporaries besides a small launch table)"),
    (lambda c: c.train.optim.optimizer == "adamw",
     "torch AdamW: the fake run uses the fused step for fp32 weights and foreach otherwise, as the trainer and "
     "torch pick on a GPU"),
    (lambda c: c.train.training.kernels,
     "Triton attention: its backward's fp32 row sums (batch x heads x tokens x 4 B, one layer at a time) are "
     "not seen"),
    (lambda c: not c.stock_recipe,
     "latents and prompt embeddings are cached as the trainer does for square or center-cropped images: the VAE "
     "(and frozen text encoders) are not on the GPU during the steps; random crops would keep the VAE there"),
)


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
    family = family_of(root)
    family.check_layout(root)  # an SDXL refiner or an incomplete folder: the same one line as dbtrain train
    encoders = family.text_encoder_names
    out = {"unet": _read_json(root / "unet" / "config.json", where),
           "text_encoder": [_read_json(root / e / "config.json", where) for e in encoders],
           "scheduler": _read_json(root / "scheduler" / "scheduler_config.json", where)}
    vae = root / "vae" / "config.json"
    out["vae"] = _read_json(vae, where) if vae.is_file() else {}
    return out


# ---------------------------------------------------------------- running the step

def run(opts: EstimateOptions) -> dict:
    res = estimate(opts)
    print(json.dumps(res) if opts.json else report(res), flush=True)
    return res


def estimate(opts: EstimateOptions, comps=None, *, fake: bool = True) -> dict:
    """Track one training step; returns the result dict (see report). comps: real components to run on
    (tests: the real step tracked the same way); otherwise fake ones built from the configs."""
    import time

    from trainer.distributed import data_parallel as distributed
    from trainer.memory import fake_step

    t0 = time.perf_counter()
    # torchrun: one rank's step (dbtrain train's preflight: this run's ranks), collectives left out
    world = world_size(opts)
    with distributed.simulated(world, shard=opts.train.distributed.shard):
        if comps is None:
            confs = model_configs(opts.train.model.pretrained_model_name_or_path, opts.arch)
            tracked = fake_step.track_step(opts, confs=confs, fake=fake)
        else:
            tracked = fake_step.track_step(opts, comps=comps, fake=fake)
        tracked["world_size"], tracked["rank"] = world, distributed.rank()
    return summarize(opts, tracked, time.perf_counter() - t0)


def summarize(opts: EstimateOptions, t: dict, seconds: float) -> dict:
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
            "notes": t["notes"] + [n for applies, n in DIFFERENCES if applies(opts)],
            "options": options_of(opts), "seconds": round(seconds, 1),
            "world_size": t.get("world_size", 1), "rank": t.get("rank", 0),
            "device": "estimate (fake tensors, CPU)"}


def options_of(opts: EstimateOptions) -> dict:
    t = opts.train
    out = {"resolution": t.data.resolution, "train_batch_size": t.training.train_batch_size,
           "with_prior_preservation": t.prior.with_prior_preservation,
           "train_text_encoder": t.training.train_text_encoder, "mixed_precision": t.memory.mixed_precision,
           "optimizer": t.optim.optimizer, "weights_dtype": t.memory.weights_dtype,
           "gradient_checkpointing": t.memory.gradient_checkpointing, "step_in_backward": t.memory.step_in_backward,
           "kernels": t.training.kernels, "gradient_accumulation_steps": t.training.gradient_accumulation_steps,
           "shard": t.distributed.shard}
    out["model"] = opts.arch or str(t.model.pretrained_model_name_or_path)
    out["world_size"] = world_size(opts)
    if t.lora.lora_rank:
        out["lora_rank"] = t.lora.lora_rank
    if opts.stock_recipe:
        out["stock_recipe"] = True
    return out


def world_size(opts: EstimateOptions) -> int:
    """The ranks estimated for: --world_size, or in dbtrain train's preflight this run's own."""
    from trainer.distributed import data_parallel as distributed

    return opts.world_size or distributed.world()


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


def predicted_peak(opts: EstimateOptions) -> dict:
    """The estimate of a run's step (cached per option set), for the run log beside the measured peak."""
    key = json.dumps(options_of(opts), sort_keys=True, default=str)
    if key not in _last:
        _last[key] = estimate(opts)
    return _last[key]


def supported(opts: EstimateOptions) -> bool:
    """Runs the estimate covers: DreamBooth (full or LoRA) on an SD 1.x/2.x or SDXL UNet; not Textual Inversion."""
    return opts.train.trains_unet and not opts.train.embedding.train_text_embedding


def log_fields(opts: EstimateOptions) -> dict:
    """For the run log beside torch.cuda.max_memory_allocated: the tracked peak plus the allocator's 512 B
    rounding (what max_memory_allocated counts) and the predicted peak with the whole allowance, in GiB."""
    if not supported(opts):
        return {}
    r = predicted_peak(opts)
    return {"estimated_allocated_gb": round((r["tracked_peak_bytes"] + r["allowance_bytes"]["allocator_rounding"])
                                            / GIB, 3),
            "estimated_peak_gb": round(r["peak_bytes"] / GIB, 3)}


def preflight(opts: EstimateOptions, device) -> str | None:
    """On a GPU: a one-line warning when the estimate exceeds the free memory, naming options that would
    make it fit; None when it fits (or on a CPU, or for runs the estimate does not cover)."""
    if getattr(device, "type", str(device)) != "cuda" or not supported(opts):
        return None
    import torch

    free, _total = torch.cuda.mem_get_info(device)
    try:
        r = predicted_peak(opts)
    except Exception as e:  # noqa: BLE001 - advisory only: the run itself says what is wrong, if anything
        return f"note: no memory estimate for this run ({type(e).__name__}: {str(e)[:120]})"
    # this process's CUDA context already counts as used, so it is not in what must still be free
    need = r["peak_bytes"] - ALLOWANCE["cuda_context"]
    if need <= free:
        return None
    picked, left = [], need
    for flag, b in savings(r, opts.train):
        if left <= free:
            break
        picked.append(flag)
        left -= b
    hint = (f"; {' '.join(picked)} would bring it to about {left / GIB:.1f} GiB" if picked and left <= free
            else f"; even {' '.join(picked)} would leave about {left / GIB:.1f} GiB" if picked else "")
    return (f"warning: this run is estimated to need {need / GIB:.1f} GiB of GPU memory but {free / GIB:.1f} GiB "
            f"are free{hint} (dbtrain estimate shows the breakdown)")


def savings(r: dict, train) -> list[tuple[str, int]]:
    """(flag, bytes it saves, roughly) for the memory options this run (TrainOptions) does not use yet, biggest
    first."""
    cat, n = r["by_category"], r["trainable_params"]
    memory, optimizer = train.memory, train.optim.optimizer
    out = []
    if optimizer == "adamw":
        out.append(("--optimizer adamw8bit", max(0, cat["optimizer_state"] - 2 * n)))
    if not memory.gradient_checkpointing:  # most saved activations are recomputed in backward instead
        out.append(("--gradient_checkpointing", int(0.7 * cat["activations"])))
    if (not memory.step_in_backward and train.training.gradient_accumulation_steps == 1
            and memory.mixed_precision != "fp16"):
        out.append(("--step_in_backward" + ("" if optimizer == "adamw8bit" else " (needs adamw8bit)"),
                    cat["gradients"]))
    if memory.weights_dtype != "bf16" and not train.uses_lora:
        out.append(("--weights_dtype bf16", cat["weights"] // 2 + cat["gradients"] // 2))
    if memory.mixed_precision == "no":
        out.append(("--mixed_precision bf16", cat["activations"] // 3))
    return sorted(out, key=lambda x: -x[1])


def preflight_of_run(opts, device) -> str | None:
    """preflight of a run about to train (its TrainOptions): dbtrain train's check before the first step."""
    return preflight(EstimateOptions.of_run(opts), device)


def log_fields_of_run(opts) -> dict:
    """log_fields of a run about to train (its TrainOptions), for its log lines."""
    return log_fields(EstimateOptions.of_run(opts))
