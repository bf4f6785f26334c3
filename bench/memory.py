"""Benchmark suite `memory`: peak GPU memory of DreamBooth steps, estimated on the CPU (dbtrain estimate).

    python -m bench memory [--out DIR] [--arch sd15,sd21,sdxl] [--only NAME,...]
    python -m bench memory --calibrate RESULTS/train.jsonl   # each GPU-measured peak beside its estimate

Every row is an estimate, not a measurement: trainer.memory.estimate runs the trainer's own step
on fake tensors (device "estimate (fake tensors, CPU)"), adds its stated allowance, and
compares the predicted peak with the project's targets: SD1.5 full DreamBooth at 512 with
prior preservation, batch 1+1, UNet only <= 6 GB, with text-encoder training <= 8 GB;
SDXL (issue 19) full UNet at 1024, same batch, <= 16 GB (GB = 10^9 bytes). Settings:

* stock-*   diffusers' train_dreambooth.py: fp32 weights under fp16 autocast (GradScaler),
            torch AdamW (foreach) or bitsandbytes 8-bit, SDPA attention, VAE and frozen
            text encoder resident in fp16, the VAE encoding each step's images (tracked),
            gradient checkpointing off/on
* ours-*    dbtrain train: bf16 autocast and our kernels, then each memory option alone
            (adamw8bit, gradient checkpointing, bf16 weights, step in backward) and the
            best combination; LoRA for comparison
* SDXL      diffusers has only LoRA for SDXL DreamBooth (train_dreambooth_lora_sdxl.py: fp16
            frozen base, fp32 rank-4 adapters, torch AdamW, VAE resident in float32 and
            encoding each step's 1024 px images, text encoders freed after encoding the
            fixed prompts): stock-lora4(-gc); the full-UNet stock rows apply
            train_dreambooth.py's recipe to SDXL (VAE in float32) for reference

Rows go to <out>/memory.jsonl (replaced when the run completes; rows so far are in
memory.jsonl.partial while it runs) and a table to <out>/memory.md.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "bench" / "results" / "memory"
OP = "memory"
GB = 10 ** 9
GIB = 1 << 30
# prior preservation, batch 1+1: SD1.5 at 512 (both), SDXL's full UNet at 1024 (issue 19)
TARGETS = {"sd15": {"unet": 6 * GB, "unet+te": 8 * GB}, "sdxl": {"unet": 16 * GB}}
# issue 32, with AdamW4bit: SD1.5 at 512 with its text encoder <= 4.5 GB, SDXL at 1024 with both <= 12 GB
SETTING_TARGETS = {("sd15", "ours-best-4bit+te"): int(4.5 * GB), ("sdxl", "ours-best-4bit+te"): 12 * GB}
STOCK = ["--mixed_precision", "fp16", "--weights_dtype", "fp32", "--kernels", "off"]
OURS = ["--mixed_precision", "bf16"]
BEST = OURS + ["--gradient_checkpointing", "--weights_dtype", "bf16", "--step_in_backward"]

# (name, flags, stock recipe, what it is)
SETTINGS = (
    ("stock-adamw", STOCK + ["--optimizer", "adamw"], True, "diffusers' recipe, torch AdamW"),
    ("stock-adamw-gc", STOCK + ["--optimizer", "adamw", "--gradient_checkpointing"], True,
     "diffusers' recipe, torch AdamW, gradient checkpointing"),
    ("stock-bnb8bit", STOCK + ["--optimizer", "bnb8bit"], True, "diffusers' recipe, bitsandbytes AdamW8bit"),
    ("stock-bnb8bit-gc", STOCK + ["--optimizer", "bnb8bit", "--gradient_checkpointing"], True,
     "diffusers' recipe, bitsandbytes AdamW8bit, gradient checkpointing"),
    ("stock-adamw-gc+te", STOCK + ["--optimizer", "adamw", "--gradient_checkpointing", "--train_text_encoder"],
     True, "diffusers' recipe with text-encoder training, torch AdamW, gradient checkpointing"),
    ("stock-bnb8bit-gc+te", STOCK + ["--optimizer", "bnb8bit", "--gradient_checkpointing",
                                     "--train_text_encoder"], True,
     "diffusers' recipe with text-encoder training, bitsandbytes AdamW8bit, gradient checkpointing"),
    ("ours-adamw", OURS + ["--optimizer", "adamw"], False, "ours: bf16 autocast, kernels, fused torch AdamW"),
    ("ours-adamw8bit", OURS, False, "ours + AdamW8bit"),
    ("ours-adamw-gc", OURS + ["--optimizer", "adamw", "--gradient_checkpointing"], False,
     "ours + gradient checkpointing"),
    ("ours-adamw-bf16w", OURS + ["--optimizer", "adamw", "--weights_dtype", "bf16"], False,
     "ours + bf16 weights (no fp32 master copy)"),
    ("ours-adamw8bit-sib", OURS + ["--step_in_backward"], False, "ours + AdamW8bit + step in backward"),
    ("ours-best", BEST, False, "ours, all options: AdamW8bit, checkpointing, bf16 weights, step in backward"),
    ("ours-best+te", BEST + ["--train_text_encoder"], False, "ours, all options, with text-encoder training"),
    ("ours-best-4bit", BEST + ["--optimizer", "adamw4bit"], False,
     "ours, all options with AdamW4bit: checkpointing, bf16 weights, step in backward"),
    ("ours-best-4bit+te", BEST + ["--optimizer", "adamw4bit", "--train_text_encoder"], False,
     "ours, all options with AdamW4bit, with text-encoder training (SDXL: both encoders)"),
    ("ours-lora4-gc+te", OURS + ["--lora_rank", "4", "--gradient_checkpointing", "--train_text_encoder"], False,
     "ours, LoRA rank 4 on UNet and text encoder, checkpointing"),
    # SDXL only (not in the SD1.5/SD2.1 rows)
    ("stock-lora4", STOCK + ["--lora_rank", "4", "--optimizer", "adamw"], True,
     "diffusers' train_dreambooth_lora_sdxl.py: fp16 frozen base, fp32 LoRA rank 4 on the UNet, torch AdamW"),
    ("stock-lora4-gc", STOCK + ["--lora_rank", "4", "--optimizer", "adamw", "--gradient_checkpointing"], True,
     "diffusers' train_dreambooth_lora_sdxl.py with --gradient_checkpointing"),
    ("ours-adamw8bit-gc", OURS + ["--gradient_checkpointing"], False, "ours + AdamW8bit + gradient checkpointing"),
    ("ours-lora4-gc", OURS + ["--lora_rank", "4", "--gradient_checkpointing"], False,
     "ours, LoRA rank 4 on the UNet, checkpointing"),
    # torchrun (issue 20): one rank's memory; --shard splits the optimizer state and gradients (ZeRO-2)
    ("ours-adamw-gc-x2", OURS + ["--optimizer", "adamw", "--gradient_checkpointing", "--world_size", "2"], False,
     "ours + checkpointing, torch AdamW: one rank of 2, data parallel (whole state on each)"),
    ("ours-adamw-gc-x2-shard", OURS + ["--optimizer", "adamw", "--gradient_checkpointing", "--world_size", "2",
                                       "--shard"], False, "the same with --shard: one rank of 2"),
    ("ours-adamw-gc-x4-shard", OURS + ["--optimizer", "adamw", "--gradient_checkpointing", "--world_size", "4",
                                       "--shard"], False, "the same with --shard: one rank of 4"),
    ("ours-adamw8bit-gc-x2-shard", OURS + ["--gradient_checkpointing", "--world_size", "2", "--shard"], False,
     "ours + AdamW8bit + checkpointing, --shard: one rank of 2"),
    ("ours-best-x2-shard", BEST + ["--world_size", "2", "--shard"], False, "ours, all options, --shard: one rank of 2"),
    ("ours-best-x4-shard", BEST + ["--world_size", "4", "--shard"], False, "ours, all options, --shard: one rank of 4"),
)
SHARD = ("ours-adamw-gc-x2", "ours-adamw-gc-x2-shard", "ours-adamw-gc-x4-shard", "ours-adamw8bit-gc-x2-shard",
         "ours-best-x2-shard", "ours-best-x4-shard")
ARCH_RES = {"sd15": 512, "sd21": 768, "sdxl": 1024}
XL_ONLY = ("stock-lora4", "stock-lora4-gc", "ours-adamw8bit-gc", "ours-lora4-gc")
ARCH_SETTINGS = {
    "sd15": tuple(n for n, *_ in SETTINGS if n not in XL_ONLY),  # (the torchrun rows too)
    "sd21": ("stock-adamw-gc", "stock-bnb8bit-gc", "ours-best", "ours-best+te"),
    "sdxl": ("stock-lora4", "stock-lora4-gc", "stock-adamw-gc", "stock-bnb8bit-gc", "ours-adamw", "ours-adamw8bit",
             "ours-adamw-gc", "ours-adamw-bf16w", "ours-adamw8bit-sib", "ours-adamw8bit-gc", "ours-best",
             "ours-best+te", "ours-best-4bit", "ours-best-4bit+te", "ours-lora4-gc", "ours-lora4-gc+te", *SHARD),
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default=str(DEFAULT_OUT), help="folder of memory.jsonl and memory.md")
    p.add_argument("--arch", default="sd15,sd21,sdxl",
                   help="comma list of sd15, sd21, sdxl (sd21, sdxl: their own subsets of the settings)")
    p.add_argument("--only", default=None, help="comma list of setting names (default: all)")
    p.add_argument("--calibrate", default=None, metavar="TRAIN_JSONL",
                   help="rows of `bench train` measured on a GPU: write each measured peak beside the estimate of "
                        "the same setting to <out>/calibration.jsonl and .md")


def _cfg(arch: str, flags: list[str], stock: bool):
    from trainer.options.estimate import parse

    argv = ["--arch", arch, "--resolution", str(ARCH_RES[arch]), "--with_prior_preservation",
            "--train_batch_size", "1", *flags]
    cfg = parse(argv)
    cfg.stock_recipe = stock
    return cfg, argv


def make_row(arch: str, name: str, what: str, argv: list[str], cfg, r: dict) -> dict:
    from trainer.memory import estimate

    train = cfg.train
    target_key = "unet+te" if train.training.train_text_encoder else "unet"
    if train.uses_lora and arch == "sdxl":  # issue 19's target is for the full UNet
        target_key = None
    target = SETTING_TARGETS.get((arch, name), TARGETS.get(arch, {}).get(target_key))
    over = r["peak_bytes"] - target if target is not None else None
    extras = {"estimate": True, "arch": arch, "resolution": train.data.resolution, "rows_per_step": 2,
              "what": what, "flags": argv, "stock_recipe": cfg.stock_recipe,
              "tracked_peak_bytes": r["tracked_peak_bytes"], "peak_phase": r["peak_phase"],
              "by_category": r["by_category"], "phases": {k: v["peak_bytes"] for k, v in r["phases"].items()},
              "allowance_bytes": r["allowance_bytes"], "fits_gib": r["fits_gib"],
              "trainable_params": r["trainable_params"], "params": r["params"], "notes": r["notes"],
              "target": target_key if target is not None else None, "target_bytes": target,
              "meets_target": (over <= 0) if over is not None else None,
              "over_target_bytes": max(0, over) if over is not None else None,
              "estimate_seconds": r["seconds"], "world_size": r.get("world_size", 1), "rank": r.get("rank", 0),
              "shard": train.distributed.shard}
    if over is not None and over > 0:  # what would close the gap, from the breakdown
        extras["would_help"] = [{"flag": f, "saves_bytes": b} for f, b in estimate.savings(r, train) if b > 0]
    res = train.data.resolution
    return {"op": OP, "provider": name, "shape": [2, 4, res // 8, res // 8],
            "dtype": train.memory.mixed_precision, "mode": "train_step", "variant": arch,
            "ms_p20": None, "ms_p50": None, "ms_p80": None, "gbps": None, "frac_peak_bw": None,
            "tflops": None, "frac_peak_flops": None, "peak_bytes": r["peak_bytes"], "launches": None,
            "device": r["device"], "device_type": "estimate", "torch": _torch_version(), "triton": None,
            "cuda": None, "git_sha": _git_sha(), "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "run_id": None, "extras": extras}


def _torch_version():
    import torch

    return torch.__version__


def _git_sha() -> str | None:
    import subprocess

    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def table(rows: list[dict]) -> str:
    lines = ["# Peak GPU memory of one DreamBooth step (estimates)", "",
             "Estimated on the CPU with `dbtrain estimate` (the trainer's own step on fake tensors, plus the "
             "allowance in trainer/memory/estimate.py); not measured on a GPU. Prior preservation, batch 1+1. "
             "Targets: SD1.5 at 512, UNet only <= 6 GB, with text-encoder training <= 8 GB; SDXL at 1024, full "
             "UNet <= 16 GB (issue 19; GB = 10^9 B); with AdamW4bit, SD1.5 with its text encoder <= 4.5 GB and SDXL with both "
             "<= 12 GB (issue 32). Regenerate: `python -m bench memory` (`--only NAME,...`: those rows, the others "
             "kept).", "",
             "| model | setting | predicted peak | GB | weights | grads | opt. state | activations | temp. "
             "| smallest card | target | what |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        e, c = r["extras"], r["extras"]["by_category"]
        tgt = "-"
        if e["target_bytes"] is not None:
            tgt = ("meets" if e["meets_target"] else f"over by {e['over_target_bytes'] / GB:.2f} GB") + \
                f" ({e['target_bytes'] / GB:g} GB)"
            helps = [h["flag"] for h in e.get("would_help", []) if h["saves_bytes"] >= GB // 10]
            if helps:
                tgt += "; would help: " + ", ".join(helps)
        card = f"{e['fits_gib'][0]} GB" if e["fits_gib"] else "> 24 GB"
        lines.append(f"| {e['arch']}@{e['resolution']} | {r['provider']} | {r['peak_bytes'] / GIB:.2f} GiB | "
                     f"{r['peak_bytes'] / GB:.2f} | " + " | ".join(f"{c[k] / GIB:.2f}" for k in (
                         "weights", "gradients", "optimizer_state", "activations", "temporaries"))
                     + f" | {card} | {tgt} | {e['what']} |")
    lines += ["", "Category columns in GiB, at the peak phase. Where a row misses its target, the options that "
              "would lower it (by >= 0.1 GB each) are named, biggest saving first; the JSONL row's extras.would_help "
              "has the bytes.", ""]
    return "\n".join(lines)


def _merged(path: Path, new: list[dict]) -> list[dict]:
    """The rows of `path` with `new` in place of those of the same (model, setting), in the order of ARCH_RES and
    SETTINGS."""
    key = lambda r: (r["variant"], r["provider"])  # noqa: E731
    rows = {key(r): r for r in (json.loads(x) for x in path.read_text().splitlines() if x.strip())}
    rows.update({key(r): r for r in new})
    arch_order, name_order = list(ARCH_RES), [n for n, *_ in SETTINGS]
    rank = lambda k: (arch_order.index(k[0]) if k[0] in arch_order else 99,  # noqa: E731
                      name_order.index(k[1]) if k[1] in name_order else 999)
    return [rows[k] for k in sorted(rows, key=rank)]


def run_all(opts) -> int:
    from trainer.memory import estimate

    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    only = set(opts.only.split(",")) if opts.only else None
    partial = out / "memory.jsonl.partial"
    partial.write_text("")
    rows = []
    for arch in [a.strip() for a in opts.arch.split(",") if a.strip()]:
        if arch not in ARCH_RES:
            print(f"--arch: unknown {arch!r} (sd15, sd21, sdxl)", file=sys.stderr)
            return 2
        for name, flags, stock, what in SETTINGS:
            if (only and name not in only) or name not in ARCH_SETTINGS[arch]:
                continue
            cfg, argv = _cfg(arch, flags, stock)
            r = estimate.estimate(cfg)
            row = make_row(arch, name, what, argv, cfg, r)
            rows.append(row)
            with open(partial, "a") as f:
                f.write(json.dumps(row, allow_nan=False) + "\n")
            e = row["extras"]
            print(f"{arch} {name:22s} {r['peak_bytes'] / GB:6.2f} GB predicted ({r['seconds']:.0f} s)"
                  + (f"  target {'met' if e['meets_target'] else 'missed'}" if e["target_bytes"] else ""),
                  flush=True)
    if only and (out / "memory.jsonl").is_file():  # --only: the other settings' rows stay as they were
        rows = _merged(out / "memory.jsonl", rows)
        partial.write_text("".join(json.dumps(r, allow_nan=False) + "\n" for r in rows))
    tmp = out / "memory.md.tmp"
    tmp.write_text(table(rows))
    os.replace(tmp, out / "memory.md")
    os.replace(partial, out / "memory.jsonl")
    print(f"{len(rows)} row(s) in {out / 'memory.jsonl'}, table {out / 'memory.md'}")
    return 0


# bench train's settings (bench/train.py) as dbtrain flags; the stock ones are diffusers' recipes
TRAIN_SETTINGS = {
    "ours-fast": (OURS, False),
    "ours-lowmem": (BEST, False),
    "stock-fast": (STOCK, True),
    "stock-lowmem": (STOCK + ["--gradient_checkpointing"], True),
    "ours-lora": (OURS + ["--lora_rank", "4"], False),
    "ours-lora-lowmem": (OURS + ["--lora_rank", "4", "--step_in_backward", "--gradient_checkpointing"], False),
    "stock-lora": (STOCK + ["--lora_rank", "4", "--optimizer", "adamw"], True),
}


def calibrate(opts) -> int:
    """Each `bench train` row measured on a GPU beside the estimate of the same setting: how far off the
    estimate is, so every GPU run calibrates it."""
    from trainer.memory import estimate
    from trainer.options.estimate import parse

    rows = [json.loads(x) for x in Path(opts.calibrate).read_text().splitlines() if x.strip()]
    rows = [r for r in rows if r.get("op") == "train" and r.get("device_type") == "cuda" and r.get("peak_bytes")]
    if not rows:
        print(f"--calibrate {opts.calibrate}: no `bench train` rows measured on a GPU", file=sys.stderr)
        return 2
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    lines = ["| setting | GPU | resolution | measured peak GiB | estimated allocated GiB | error |",
             "|---|---|---|---|---|---|"]
    done = []
    for r in rows:
        e = r.get("extras", {})
        setting = e.get("setting", r["provider"])
        if setting not in TRAIN_SETTINGS:
            continue
        flags, stock = TRAIN_SETTINGS[setting]
        if stock and "bitsandbytes" in str(e.get("optimizer", "")) and "--optimizer" not in flags:
            flags = flags + ["--optimizer", "bnb8bit"]
        elif stock and "--optimizer" not in flags:
            flags = flags + ["--optimizer", "adamw"]
        argv = ["--arch", e.get("arch", "sd15"), "--resolution", str(e.get("resolution", 512)),
                "--with_prior_preservation", "--train_batch_size", "1", *flags]
        argv += ["--train_text_encoder"] if e.get("train_text_encoder") else []
        cfg = parse(argv)
        cfg.stock_recipe = stock
        est = estimate.estimate(cfg)
        allocated = est["tracked_peak_bytes"] + est["allowance_bytes"]["allocator_rounding"]
        err = allocated / r["peak_bytes"] - 1
        done.append({"setting": setting, "train_text_encoder": bool(e.get("train_text_encoder")),
                     "device": r["device"], "git_sha_measured": r.get("git_sha"),
                     "measured_peak_bytes": r["peak_bytes"],
                     "estimated_allocated_bytes": allocated, "estimated_peak_bytes": est["peak_bytes"],
                     "relative_error": round(err, 4), "flags": argv})
        lines.append(f"| {r['variant']} | {r['device']} | {e.get('resolution')} | {r['peak_bytes'] / GIB:.2f} | "
                     f"{allocated / GIB:.2f} | {err:+.1%} |")
        print(lines[-1], flush=True)
    with open(out / "calibration.jsonl", "w") as f:
        for d in done:
            f.write(json.dumps(d) + "\n")
    (out / "calibration.md").write_text(
        "# The estimate against GPU-measured peaks (bench train)\n\nmeasured: torch.cuda.max_memory_allocated over "
        "the timed steps; estimated: the tracked peak plus the allocator's rounding (the CUDA context, library "
        "workspaces and fragmentation are not in max_memory_allocated). Regenerate: `python -m bench memory "
        f"--calibrate {opts.calibrate}`.\n\n" + "\n".join(lines) + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench memory", description=__doc__.strip().splitlines()[0])
    add_arguments(p)
    opts = p.parse_args(argv)
    return calibrate(opts) if opts.calibrate else run_all(opts)


if __name__ == "__main__":
    sys.exit(main())
