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

import dataclasses
import json
from pathlib import Path
from typing import Callable

from trainer.errors import UserError
from trainer.families import family_of
from trainer.memory.differences import DIFFERENCES
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

def run(opts: EstimateOptions, card_gb: float | None = None) -> dict:
    """Estimate, and for a run that does not fit the card (--card_gb; not given: the largest common card) the
    flags that make it fit; prints the report (or one JSON object) and returns the result."""
    res = estimate(opts)
    res.update(fit_card(opts, res, card_gb if card_gb is not None else opts.train.memory.card_gb))
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
    if t.ema.use_ema:
        out["ema"] = f"{t.ema.ema_device or 'gpu'} {t.ema.ema_dtype}"
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
    peak = f"predicted peak: {_gb(r['peak_bytes']).strip()} ({r['peak_bytes']} bytes): "
    if r.get("card_gb") is not None:
        lines.append(peak + (f"fits the {_card(r['card_gb'])} GB card, {r['margin_bytes'] / GIB:.2f} GiB to spare"
                             if r["fits_card"] else f"does not fit the {_card(r['card_gb'])} GB card "
                             f"({-r['margin_bytes'] / GIB:.2f} GiB over)"))
    else:
        lines.append(peak + (f"fits a {fits[0]} GB card" if fits else f"does not fit a {CARDS_GIB[-1]} GB card"))
    if r.get("plan"):
        lines += plan_lines(r["plan"], r["peak_bytes"])
    lines.append("where the GPU run differs from this estimate:")
    lines += [f"  - {n}" for n in r["notes"]]
    return "\n".join(lines)


def _card(gb: float) -> str:
    return f"{gb:.3g}"


def _step_lines(steps: list[dict], card: int) -> list[str]:
    width = max(len(s["flag"]) for s in steps)
    return [f"  {s['flag']:<{width}}  {_gb(s['peak_bytes'])}{'  fits' if s['peak_bytes'] <= card else ''}  "
            f"({s['cost']})" for s in steps]


def plan_lines(p: dict, peak: int) -> list[str]:
    """The plan of a run that does not fit: the flags in order, each with the predicted peak of the run so far."""
    card, name = int(p["card_gb"] * GIB), _card(p["card_gb"])
    out = []
    if p["steps"]:
        out.append(f"to fit the {name} GB card, add in this order (each line: the predicted peak with the flags so "
                   f"far, from {_gb(peak).strip()}):")
        out += _step_lines(p["steps"], card)
    if p["fits"]:
        flags = " ".join(f for f in p["flags"] if not f.startswith("without "))
        dropped = [f[len("without "):] for f in p["flags"] if f.startswith("without ")]
        out.append(f"so: {flags}" + (f" and leave out {' '.join(dropped)}" if dropped else "")
                   + f" ({_gb(p['steps'][-1]['peak_bytes']).strip()}, "
                   f"{(card - p['steps'][-1]['peak_bytes']) / GIB:.2f} GiB to spare)")
    else:
        out.append(f"nothing dbtrain has makes it fit the {name} GB card"
                   + (" with the whole model" if p.get("alternative") else "")
                   + f": the smallest predicted peak is {_gb(p['smallest_peak_bytes']).strip()}")
    alt = p.get("alternative")
    if alt:
        out.append(f"alternative: LoRA instead of the whole model" + (" fits:" if alt["fits"] else " (does not fit "
                                                                      "either):"))
        out += _step_lines(alt["steps"], card)
    return out


# ---------------------------------------------------------------- what makes a run fit a card

def _with(train, concern: str, **changes):
    """A copy of TrainOptions `train` with fields of one concern changed (the run's own options stay as they are)."""
    return dataclasses.replace(train, **{concern: dataclasses.replace(getattr(train, concern), **changes)})


@dataclasses.dataclass(frozen=True)
class Lever:
    """One memory option of dbtrain: whether it applies to a run yet, the run with it, and what it costs."""

    flag: str            # as the user adds it
    applies: Callable    # TrainOptions -> bool: not on yet, and allowed with the run's other options
    apply: Callable      # TrainOptions -> TrainOptions with it
    guess: Callable      # (by_category at the peak, trainable params) -> bytes it might save: only orders the tries
    cost: str            # what it costs: the same training (slower / lower precision), or what it changes


# Same training, in the order tried when the guesses tie: each keeps what trains and on which images.
SAME_TRAINING = (
    Lever("--gradient_checkpointing", lambda t: not t.memory.gradient_checkpointing,
          lambda t: _with(t, "memory", gradient_checkpointing=True), lambda c, n: int(0.7 * c["activations"]),
          "the same training, about 20-30% slower steps (activations recomputed in backward)"),
    Lever("--mixed_precision bf16", lambda t: t.memory.mixed_precision == "no",
          lambda t: _with(t, "memory", mixed_precision="bf16"), lambda c, n: c["activations"] // 3,
          "bf16 autocast (an Ampere or newer GPU; older ones: --mixed_precision fp16)"),
    Lever("--optimizer adamw8bit", lambda t: t.optim.optimizer == "adamw",
          lambda t: _with(t, "optim", optimizer="adamw8bit"), lambda c, n: max(0, c["optimizer_state"] - 2 * n),
          "8-bit AdamW states (2 B per trained parameter instead of 8)"),
    Lever("--optimizer adamw4bit", lambda t: t.optim.optimizer == "adamw8bit",
          lambda t: _with(t, "optim", optimizer="adamw4bit"),
          lambda c, n: max(0, c["optimizer_state"] - int(1.07 * n)),
          "4-bit AdamW states (about 1.06 B per trained parameter instead of 2.03)"),
    Lever("--step_in_backward", lambda t: (not t.memory.step_in_backward and
                                           t.optim.optimizer in ("adamw8bit", "adamw4bit") and
                                           t.training.gradient_accumulation_steps == 1 and
                                           t.memory.mixed_precision != "fp16"),
          lambda t: _with(t, "memory", step_in_backward=True), lambda c, n: c["gradients"],
          "the same update, applied in backward so that no full set of gradients is held"),
    Lever("--weights_dtype bf16", lambda t: (t.memory.weights_dtype != "bf16" and not t.uses_lora and
                                             t.memory.mixed_precision == "bf16"),
          lambda t: _with(t, "memory", weights_dtype="bf16"), lambda c, n: c["weights"] // 2 + c["gradients"] // 2,
          "bf16 master weights with stochastic rounding (no fp32 copy)"),
    Lever("--ema_device cpu", lambda t: t.ema.use_ema and t.ema.ema_device != "cpu",
          lambda t: _with(t, "ema", ema_device="cpu"), lambda c, n: c.get("ema", 0),
          "the same average, kept in host memory: the weights are copied to the CPU and averaged there each step"),
    # together: bf16 autocast alone over fp32 weights adds its bf16 copies of them (it can raise the peak)
    Lever("--mixed_precision bf16 --weights_dtype bf16",
          lambda t: t.memory.weights_dtype != "bf16" and not t.uses_lora and t.memory.mixed_precision == "no",
          lambda t: _with(t, "memory", weights_dtype="bf16", mixed_precision="bf16"),
          lambda c, n: c["weights"] // 2 + c["gradients"] // 2 + c["activations"] // 3,
          "bf16 autocast and bf16 master weights with stochastic rounding (an Ampere or newer GPU)"),
)
# What changes the recipe: tried only when the same training cannot fit, the text encoder last.
RECIPE_CHANGES = (
    Lever("--train_batch_size 1", lambda t: t.training.train_batch_size > 1,
          lambda t: _with(t, "training", train_batch_size=1), lambda c, n: 0,
          "changes the recipe: fewer images a step (raise --max_train_steps to see as many)"),
    Lever("without --train_text_encoder", lambda t: t.training.train_text_encoder,
          lambda t: _with(t, "training", train_text_encoder=False), lambda c, n: 0,
          "changes what trains, the last resort: the text encoder stays frozen, only the UNet learns"),
)
LORA_RANK = 16  # the alternative to full fine-tuning: LoRA adapters of this rank (guide/lora.md)


class _Estimates:
    """The estimate of each variant of one run, each computed once (the same fake step as the run's own)."""

    def __init__(self, opts: EstimateOptions, first: dict):
        self.opts, self.done = opts, {self.key(opts.train): first}

    @staticmethod
    def key(train) -> str:
        return json.dumps(train.to_dict(), sort_keys=True, default=str)

    def __call__(self, train) -> dict:
        k = self.key(train)
        if k not in self.done:
            self.done[k] = estimate(dataclasses.replace(self.opts, train=train))
        return self.done[k]


def _ladder(est: _Estimates, train, levers, card: int, picked: list) -> tuple:
    """Add levers one at a time, the one with the biggest guessed saving first, each followed by the real
    estimate, until the run fits `card` bytes; returns (train, its result)."""
    r = est(train)
    while r["peak_bytes"] > card:
        left = [lv for lv in levers if lv.applies(train)]
        if not left:
            break
        lever = max(left, key=lambda lv: lv.guess(r["by_category"], r["trainable_params"]))
        train = lever.apply(train)
        r = est(train)
        picked.append(lever)
    return train, r


def _steps(est: _Estimates, train, levers: list) -> list[dict]:
    """The predicted peak after each lever of the list, in order (each the real estimate of the run so far)."""
    out = []
    for lv in levers:
        train = lv.apply(train)
        out.append({"flag": lv.flag, "peak_bytes": est(train)["peak_bytes"], "cost": lv.cost})
    return out


def plan(opts: EstimateOptions, first: dict, card_gb: float) -> dict:
    """The smallest list of dbtrain's memory options found that makes the run fit a card of `card_gb` GiB:
    the same-training options first (greedy: biggest guessed saving first, each checked by the real estimate,
    then any that the fit does not need dropped again), the recipe changes only if those are not enough; LoRA
    as the alternative when the full model does not fit with the same training."""
    card, est = int(card_gb * GIB), _Estimates(opts, first)
    base, picked = opts.train, []
    train, r = _ladder(est, base, SAME_TRAINING, card, picked)
    if r["peak_bytes"] > card:
        train, r = _ladder(est, train, RECIPE_CHANGES, card, picked)
    if r["peak_bytes"] <= card:  # drop what the fit does not need (the last one added is needed)
        for lv in list(picked[:-1]):
            rest = [x for x in picked if x is not lv]
            t = base
            for x in rest:
                t = x.apply(t) if t is not None and x.applies(t) else None  # (8-bit states before the step in backward)
            if t is not None and est(t)["peak_bytes"] <= card:
                picked = rest
    steps = _steps(est, base, picked)
    first_fit = next((i for i, st in enumerate(steps) if st["peak_bytes"] <= card), None)
    steps = steps if first_fit is None else steps[:first_fit + 1]
    fits = first_fit is not None
    out = {"card_gb": card_gb, "flags": [s["flag"] for s in steps], "steps": steps, "fits": fits,
           "smallest_peak_bytes": min([first["peak_bytes"]] + [s["peak_bytes"] for s in steps])}
    same_fits = fits and {st["flag"] for st in steps} <= {lv.flag for lv in SAME_TRAINING}
    if not same_fits and not base.uses_lora and base.trains_unet and not base.embedding.train_text_embedding:
        lora = [Lever(f"--lora_rank {LORA_RANK}", lambda t: True, lambda t: _with(t, "lora", lora_rank=LORA_RANK),
                      lambda c, n: 0, "LoRA adapters instead of the whole model (guide/lora.md)")]
        alt: list = []
        _ladder(est, lora[0].apply(base), SAME_TRAINING, card, alt)
        alt_steps = _steps(est, base, lora + alt)
        out["alternative"] = {"flags": [s["flag"] for s in alt_steps], "steps": alt_steps,
                              "fits": alt_steps[-1]["peak_bytes"] <= card}
        out["smallest_peak_bytes"] = min(out["smallest_peak_bytes"], alt_steps[-1]["peak_bytes"])
    return out


def gpu_card_gb(train) -> float | None:
    """The memory of the GPU a run (TrainOptions) would train on, in GiB; None without one (or --device cpu)."""
    import torch

    dev = train.distributed.device
    if (dev and str(dev).startswith("cpu")) or not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_properties(torch.device(dev or "cuda")).total_memory / GIB


def fit_card(opts: EstimateOptions, r: dict, card_gb: float | None) -> dict:
    """The fields the card adds to a result: the card, whether it fits and the margin, and for a run that
    does not fit the plan. No card given: none is named, and only a run beyond the largest common card
    gets a plan (for that card)."""
    target = card_gb if card_gb is not None else (None if r["fits_gib"] else CARDS_GIB[-1])
    if target is None:
        return {"card_gb": None}
    margin = int(target * GIB) - r["peak_bytes"]
    out = {"card_gb": card_gb, "plan_card_gb": target, "fits_card": margin >= 0, "margin_bytes": margin}
    if margin < 0:
        out["plan"] = plan(opts, r, target)
    return out


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
            f"are free{hint} (--estimate_only prints the breakdown and the flags that fit this card)")


def savings(r: dict, train) -> list[tuple[str, int]]:
    """(flag, bytes it saves, roughly) for the memory options this run (TrainOptions) does not use yet, biggest
    first."""
    cat, n = r["by_category"], r["trainable_params"]
    memory, optimizer = train.memory, train.optim.optimizer
    out = []
    if optimizer == "adamw":
        out.append(("--optimizer adamw8bit", max(0, cat["optimizer_state"] - 2 * n)))
    if optimizer == "adamw8bit":
        out.append(("--optimizer adamw4bit", max(0, cat["optimizer_state"] - int(1.07 * n))))
    if not memory.gradient_checkpointing:  # most saved activations are recomputed in backward instead
        out.append(("--gradient_checkpointing", int(0.7 * cat["activations"])))
    if (not memory.step_in_backward and train.training.gradient_accumulation_steps == 1
            and memory.mixed_precision != "fp16"):
        out.append(("--step_in_backward" + ("" if optimizer in ("adamw8bit", "adamw4bit") else " (needs adamw8bit)"),
                    cat["gradients"]))
    if memory.weights_dtype != "bf16" and not train.uses_lora:
        out.append(("--weights_dtype bf16", cat["weights"] // 2 + cat["gradients"] // 2))
    if memory.mixed_precision == "no":
        out.append(("--mixed_precision bf16", cat["activations"] // 3))
    if cat.get("ema"):
        out.append(("--ema_device cpu", cat["ema"]))
    return sorted(out, key=lambda x: -x[1])


def preflight_of_run(opts, device) -> str | None:
    """preflight of a run about to train (its TrainOptions): dbtrain train's check before the first step."""
    return preflight(EstimateOptions.of_run(opts), device)


def log_fields_of_run(opts) -> dict:
    """log_fields of a run about to train (its TrainOptions), for its log lines."""
    return log_fields(EstimateOptions.of_run(opts))
