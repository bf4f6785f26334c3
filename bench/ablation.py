"""The paper's prior-preservation ablation, in miniature, on the built-in world.

    python -m bench ablation --seeds 0 1 2 --out bench/results/ablation/prior-ablation

For each training seed: the demo's DreamBooth run with and without prior preservation (same
recipe and seed; only the class term differs), scored on the demo's prompts with the same
sampling seeds (image k of every prompt from seed EVAL_SEED + k); the base model once, on the
prompts without the identifier. Every row carries its 95% bootstrap interval over images (the
spread of the sampling); the markdown also gives the mean and spread over training seeds.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from trainer.world import demo
from trainer.world import scenes


def _device_name(device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name()
    return (f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores, "
            f"{torch.get_num_threads()} threads")


def markdown(rows: list[dict], seeds: list[int]) -> str:
    from trainer.world.metrics import METRICS, fmt

    head = ["| model | seed | " + " | ".join(METRICS) + " |", "|---|---|" + "---:|" * len(METRICS)]
    lines = list(head)
    for r in rows:
        lines.append(f"| {r['model']} | {'-' if r['seed'] is None else r['seed']} | "
                     + " | ".join(fmt(r[k], r['intervals'][k]) for k in METRICS) + " |")
    means = list(head)
    for name in ("base", "with prior preservation", "without prior preservation"):
        sel = [r for r in rows if r["model"] == name]
        if not sel:
            continue
        cells = [f"{np.mean([r[k] for r in sel]):.3f} ± {np.std([r[k] for r in sel]):.3f}" for k in METRICS]
        means.append(f"| {name} | {'all' if name != 'base' else '-'} | " + " | ".join(cells) + " |")
    return ("Per training seed, mean [95% bootstrap interval over images]:\n\n" + "\n".join(lines) +
            f"\n\nMean ± std over training seeds {seeds}:\n\n" + "\n".join(means) + "\n")


def main(argv: list[str] | None = None) -> int:
    from trainer.world.metrics import Scorer
    from trainer.options.sampling import EVAL_IMAGES, EVAL_SEED
    from trainer.world.tiny import MODEL_DIR

    p = argparse.ArgumentParser(prog="python -m bench ablation", description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds")
    p.add_argument("--steps", type=int, default=demo.STEPS)
    p.add_argument("--learning_rate", type=float, default=demo.LEARNING_RATE)
    p.add_argument("--eval_images", type=int, default=EVAL_IMAGES)
    p.add_argument("--out", default="bench/results/ablation/prior-ablation",
                   help="prefix of the .jsonl and .md written")
    p.add_argument("--work", default="ablation-runs",
                   help="folder for the trained models: new, or a stopped ablation's (its finished models are reused)")
    p.add_argument("--device", default=None)
    a = p.parse_args(argv)
    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    work = Path(a.work)
    if not (work / "subject").is_dir():  # else: a stopped ablation, whose finished models are reused
        demo.check_out(work)
    subject = demo.write_subject(work / "subject", captions=True)
    real = scenes.subject_images(5)
    scorer = Scorer(device=device)
    kw = {"num_images": a.eval_images, "seed": EVAL_SEED}
    t0 = time.time()
    ev = demo.score_model(MODEL_DIR, scorer, real, device, with_identifier=False, **kw)
    rows = [{"model": "base", "seed": None, **ev.metrics, "intervals": ev.intervals,
             "place_by_prompt": ev.place_by_prompt}]
    write(a, rows, device, t0, argv)
    for seed in a.seeds:
        for name, prior in (("with prior preservation", True), ("without prior preservation", False)):
            out = work / f"seed{seed}-{'prior' if prior else 'noprior'}"
            if demo._trained(out / "model"):
                trained = out / "model"
            else:
                kw_train = dict(prior=prior, steps=a.steps, lr=a.learning_rate, num_class_images=demo.NUM_CLASS_IMAGES,
                                seed=seed, device=a.device, **demo.recipe_extras())
                if prior and demo.DEMO_CLASS_IMAGES:  # the demo's captioned class images, drawn as the demo does
                    demo.draw_class_images(demo.train_args(MODEL_DIR, subject, out, **kw_train), a.device)
                trained = demo.dreambooth(MODEL_DIR, subject, out, resume=(out / "model").exists(), **kw_train)
            ev = demo.score_model(trained, scorer, real, device, **kw)
            rows.append({"model": name, "seed": seed, **ev.metrics, "intervals": ev.intervals,
                         "place_by_prompt": ev.place_by_prompt})
            write(a, rows, device, t0, argv)  # after every row: a stopped ablation leaves what it measured
        print(f"seed {seed} done at {time.time() - t0:.0f}s", flush=True)
    return 0


def write(a, rows: list[dict], device, t0: float, argv) -> None:
    from trainer.world.metrics import METRICS
    from trainer.options.sampling import EVAL_SEED

    meta = {"steps": a.steps, "learning_rate": a.learning_rate, "eval_images": a.eval_images, "eval_seed": EVAL_SEED,
            "metrics": list(METRICS), "device": _device_name(device), "torch": torch.__version__,
            "seconds": round(time.time() - t0),
            "command": "python -m bench ablation " + " ".join(sys.argv[1:] if argv is None else argv)}
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.with_suffix(".jsonl"), "w") as f:
        for r in rows:
            f.write(json.dumps({**r, **meta}) + "\n")
    text = (f"{a.steps} steps, lr {a.learning_rate}, {a.eval_images} images per prompt (seeds {EVAL_SEED} + k), "
            f"prompts {', '.join(demo.DEFAULT_PROMPTS)} and 'a {{C}}'; device {meta['device']}; "
            f"`{meta['command']}`.\n\n" + markdown(rows, sorted({r['seed'] for r in rows if r['seed'] is not None})))
    out.with_suffix(".md").write_text(text)
    print(text, flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
