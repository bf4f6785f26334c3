"""The paper's prior-preservation ablation, in miniature, on the built-in world.

    python -m trainer.ablation --seeds 0 1 2 --out bench/results/ablation/prior-ablation

For each seed: the demo's DreamBooth run with and without prior preservation (same steps,
learning rate and seed; only the class term differs), then the metrics of both models on the
same prompts and sampling seeds, and of the base model. Writes one JSONL row per
(model, seed) and a markdown table of the means.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from . import demo
from .world import scenes


def main(argv: list[str] | None = None) -> int:
    from .metrics import METRICS, Scorer
    from .world.tiny import MODEL_DIR

    p = argparse.ArgumentParser(prog="python -m trainer.ablation", description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=demo.STEPS)
    p.add_argument("--learning_rate", type=float, default=demo.LEARNING_RATE)
    p.add_argument("--eval_images", type=int, default=8)
    p.add_argument("--out", default="bench/results/ablation/prior-ablation", help="prefix of the .jsonl and .md written")
    p.add_argument("--work", default="ablation-runs", help="folder for the trained models (must be new)")
    p.add_argument("--device", default=None)
    a = p.parse_args(argv)
    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    work = Path(a.work)
    demo.check_out(work)
    subject = demo.write_subject(work / "subject")
    real = scenes.subject_images(5)
    scorer = Scorer(device=device)
    rows = []
    kw = {"num_images": a.eval_images}
    for seed in a.seeds:
        kw["seed"] = 10_000 + seed
        t0 = time.time()
        base, _ = demo.score_model(MODEL_DIR, scorer, real, device, **kw)
        rows.append({"model": "base", "seed": seed, **base})
        for name, prior in (("with prior preservation", True), ("without prior preservation", False)):
            out = work / f"seed{seed}-{'prior' if prior else 'noprior'}"
            trained = demo.dreambooth(MODEL_DIR, subject, out, prior=prior, steps=a.steps, lr=a.learning_rate,
                                      num_class_images=demo.NUM_CLASS_IMAGES, seed=seed, device=a.device)
            m, _ = demo.score_model(trained, scorer, real, device, **kw)
            rows.append({"model": name, "seed": seed, **m})
        print(f"seed {seed} done in {time.time() - t0:.0f}s", flush=True)
    meta = {"steps": a.steps, "learning_rate": a.learning_rate, "eval_images": a.eval_images,
            "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
            "torch": torch.__version__, "command": "python -m trainer.ablation " + " ".join(sys.argv[1:] if argv is None else argv)}
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.with_suffix(".jsonl"), "w") as f:
        for r in rows:
            f.write(json.dumps({**r, **meta}) + "\n")
    lines = ["| model | " + " | ".join(METRICS) + " |", "|---|" + "---:|" * len(METRICS)]
    for name in ("base", "with prior preservation", "without prior preservation"):
        vals = [[r[k] for r in rows if r["model"] == name] for k in METRICS]
        lines.append(f"| {name} | " + " | ".join(f"{np.mean(v):.3f} ± {np.std(v):.3f}" for v in vals) + " |")
    text = (f"Mean ± std over seeds {a.seeds}; {a.steps} steps, lr {a.learning_rate}, {a.eval_images} images "
            f"per prompt; device {meta['device']}.\n\n" + "\n".join(lines) + "\n")
    out.with_suffix(".md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
