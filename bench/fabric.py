"""FABRIC measured on the built-in world: the paper's simulated-user experiment in miniature, and cost.

    python -m bench fabric quality --users 16     # rounds of simulated feedback vs none
    python -m bench fabric cost                   # time / peak memory per image vs plain sampling
    python -m bench fabric report                 # fabric.md + grid PNG from the JSONL rows
    python -m bench fabric all --users 16         # the three above

quality: a target image rendered by trainer/scenes.py (a big red star in the snow), the prompt
"a star", `--rounds` rounds of `--num_images` images. In the FABRIC arm each round the simulated
user likes the image closest to the target and dislikes the farthest (the judge's CLIP-like
image embedding) and the next round uses all feedback so far; the baseline arm draws the same
rounds with the same seeds and no feedback. Every user (experiment) has its own seeds. Rows:
one per (user, arm, round) with the similarity of every image to the target, by the CLIP-like
embedding the user picks with and the DINO-like one it never sees.

cost: images of "a star" per pass, `--steps` steps, the feedback window over every step, n
references (half liked, half disliked) for n in `--refs`, against diffusers'
StableDiffusionPipeline on the same seeds. Time: median (p20, p80) over `--repeats`; peak
memory: the process's peak resident set above its size before the call (VmHWM, reset through
/proc/self/clear_refs), and the reference cache FABRIC holds.

Rows go to <out>/quality.jsonl and <out>/cost.jsonl (replaced by a new run of that part); report
writes <out>/fabric.md and <out>/rounds.png from them; nothing is edited by hand.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from trainer.options.spec import HelpFormatter, option_adder

OUT = Path(__file__).resolve().parent / "results" / "fabric"
PROMPT = "a star"
TARGET = ("star", "red", "big", "in the snow")


def target_scene():
    from trainer.world import scenes

    shape, color, size, context = TARGET
    return scenes.Scene(shape, color, size, context, 0.5, 0.5, 0.0)


def target_image():
    from trainer.world import scenes

    return scenes.render(target_scene(), seed=0)


def _env() -> dict:
    import torch

    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parent).stdout.strip()
    except OSError:
        sha = ""
    return {"git": sha, "torch": torch.__version__, "device": "cpu", "cpu": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(), "load_avg_1min": os.getloadavg()[0],
            "time": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def _write_rows(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


# ------------------------------------------------------------------ quality

def quality(a) -> list[dict]:
    import torch

    from trainer.fabric.sampling import load_pipeline, simulated_rounds, target_similarity
    from trainer.world.metrics import Scorer

    torch.set_num_threads(a.threads)
    pipe = load_pipeline(a.model, "cpu")
    scorer = Scorer(a.judge)
    target = target_image()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    target.save(out / "target.png")
    settings = dict(steps=a.steps, guidance_scale=a.guidance_scale, feedback_start=a.feedback_start,
                    feedback_end=a.feedback_end, min_weight=a.min_weight, max_weight=a.max_weight,
                    neg_scale=a.neg_scale)
    rows, env = [], _env()
    samples = out / "samples"
    for u in range(a.users):
        for arm, fb in (("fabric", True), ("baseline", False)):
            t0 = time.perf_counter()
            rounds = simulated_rounds(pipe, PROMPT, target, scorer, rounds=a.rounds, num_images=a.num_images,
                                      seed=1000 * u, feedback=fb, note=None, **settings)
            for r in rounds:
                dino = target_similarity(scorer, r["images"], target, "dino")
                rows.append({"experiment": "fabric-simulated-user", "user": u, "arm": arm, "round": r["round"],
                             "seeds": r["seeds"], "n_liked": r["n_liked"], "n_disliked": r["n_disliked"],
                             "similarity_clip": r["similarity"], "similarity_dino": dino,
                             "seconds": r["seconds"], "prompt": PROMPT, "target": target_scene().caption(),
                             "model": Path(a.model).name, "settings": settings, **env})
                if u < a.keep_images:
                    d = samples / f"user{u}-{arm}-round{r['round']}"
                    d.mkdir(parents=True, exist_ok=True)
                    for k, im in enumerate(r["images"]):
                        im.save(d / f"{k}.png")
            print(f"user {u} {arm}: {time.perf_counter() - t0:.1f} s, mean similarity per round "
                  + " ".join(f"{sum(r['similarity']) / len(r['similarity']):.3f}" for r in rounds), flush=True)
        _write_rows(out / "quality.jsonl", rows)  # after every user, so a stopped run keeps what it did
    return rows


# ------------------------------------------------------------------ cost

def _mem_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _trim() -> None:
    """Give freed heap memory back to the OS (glibc keeps it resident otherwise, hiding the next peak)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _measure(fn) -> tuple[float, int]:
    """(seconds, peak resident bytes above the size before the call)."""
    import gc

    gc.collect()
    _trim()
    ok = _reset_peak()
    before = _mem_kb("VmRSS")
    t0 = time.perf_counter()
    fn()
    dt = time.perf_counter() - t0
    peak = _mem_kb("VmHWM") - before if ok else -1
    return dt, peak * 1024


def cost(a) -> list[dict]:
    import torch

    from trainer.fabric.sampling import fabric_sample, load_pipeline

    torch.set_num_threads(a.threads)
    pipe = load_pipeline(a.model, "cpu")
    seeds = list(range(a.num_images))
    pool = _reference_images(pipe, max(a.refs), a.steps)
    env = _env()
    rows = []

    def plain():
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        with torch.no_grad():
            pipe(PROMPT, num_images_per_prompt=len(seeds), num_inference_steps=a.steps,
                 guidance_scale=a.guidance_scale, generator=gens)

    configs = [("diffusers StableDiffusionPipeline", 0, plain)]
    for backend in a.attention:
        for n in a.refs:
            liked, disliked = pool[:n - n // 2], pool[n - n // 2:n]
            stats = {}

            def run(liked=liked, disliked=disliked, stats=stats, backend=backend):
                res = fabric_sample(pipe, PROMPT, liked, disliked, seeds=seeds, steps=a.steps,
                                    guidance_scale=a.guidance_scale, feedback_start=0.0, feedback_end=1.0,
                                    note=None, attention=backend)
                stats.update(res.stats)
            configs.append((f"fabric, {backend} ({len(liked)} liked, {len(disliked)} disliked)", n, run, stats))
    for cfg in configs:
        name, n, fn = cfg[:3]
        fn()  # warm-up
        times, peaks = [], []
        for _ in range(a.repeats):
            dt, peak = _measure(fn)
            times.append(dt)
            peaks.append(peak)
        q = statistics.quantiles(times, n=5) if len(times) > 1 else [times[0]] * 4
        per = 1000.0 / len(seeds)
        row = {"experiment": "fabric-cost", "provider": name, "references": n, "images": len(seeds),
               "steps": a.steps, "resolution": 64, "dtype": "fp32",
               "ms_per_image": {"p20": q[0] * per, "p50": statistics.median(times) * per, "p80": q[3] * per},
               "peak_rss_bytes": max(peaks), "repeats": a.repeats, "model": Path(a.model).name, **env}
        if len(cfg) > 3:
            row["cache_bytes"] = cfg[3].get("cache_bytes", 0)
            row["reference_passes"] = cfg[3].get("reference_passes", 0)
        rows.append(row)
        print(f"{name}: {row['ms_per_image']['p50']:.1f} ms/image, peak +{row['peak_rss_bytes'] / 2**20:.1f} MiB",
              flush=True)
    _write_rows(Path(a.out) / "cost.jsonl", rows)
    return rows


def _reference_images(pipe, n: int, steps: int):
    """n feedback images: the base model's own drawings of world scenes (seeded)."""
    import torch

    from trainer.world import scenes

    prompts = [s.caption() for s in scenes.scenes(n, seed=7)]
    if not prompts:
        return []
    gens = [torch.Generator().manual_seed(100 + k) for k in range(n)]
    with torch.no_grad():
        return pipe(prompts, num_inference_steps=steps, guidance_scale=5.0, generator=gens).images


# ------------------------------------------------------------------ report

def _ci95(xs: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% t-interval."""
    m = statistics.fmean(xs)
    if len(xs) < 2:
        return m, float("nan")
    try:
        from scipy.stats import t

        crit = float(t.ppf(0.975, len(xs) - 1))
    except ImportError:
        crit = 1.96
    return m, crit * statistics.stdev(xs) / math.sqrt(len(xs))


def _fmt(m: float, h: float) -> str:
    return f"{m:.3f} ± {h:.3f}"


def quality_table(rows: list[dict], key: str, stat: str = "mean") -> list[str]:
    users = sorted({r["user"] for r in rows})
    rounds = sorted({r["round"] for r in rows})
    pick = (lambda v: statistics.fmean(v)) if stat == "mean" else max
    val = {(r["user"], r["arm"], r["round"]): pick(r[key]) for r in rows}
    lines = ["| round | feedback so far (liked + disliked) | no feedback | FABRIC | FABRIC - no feedback (paired) |",
             "|---:|---:|---:|---:|---:|"]
    for rd in rounds:
        us = [u for u in users if (u, "fabric", rd) in val and (u, "baseline", rd) in val]
        if not us:
            continue
        b = [val[(u, "baseline", rd)] for u in us]
        f = [val[(u, "fabric", rd)] for u in us]
        nfb = next(r["n_liked"] + r["n_disliked"] for r in rows if r["arm"] == "fabric" and r["round"] == rd)
        lines.append(f"| {rd} | {nfb} | {_fmt(*_ci95(b))} | {_fmt(*_ci95(f))} | "
                     f"{_fmt(*_ci95([x - y for x, y in zip(f, b)]))} |")
    return lines


def cost_table(rows: list[dict]) -> list[str]:
    plain = next((r for r in rows if r["provider"].startswith("diffusers")), None)
    lines = ["| provider | references | ms / image p50 (p20-p80) | vs plain | peak RSS above start | reference cache |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        t = r["ms_per_image"]
        ratio = f"{t['p50'] / plain['ms_per_image']['p50']:.2f}x" if plain else ""
        cache = f"{r['cache_bytes'] / 2**10:.0f} KiB" if "cache_bytes" in r else "-"
        lines.append(f"| {r['provider']} | {r['references']} | {t['p50']:.0f} ({t['p20']:.0f}-{t['p80']:.0f}) | "
                     f"{ratio} | {r['peak_rss_bytes'] / 2**20:.1f} MiB | {cache} |")
    return lines


def rounds_grid(out: Path, user: int = 0) -> Path | None:
    """Target, then per round: the no-feedback images | the FABRIC images, for one user."""
    from PIL import Image, ImageDraw

    samples = out / "samples"
    dirs = sorted(samples.glob(f"user{user}-fabric-round*"), key=lambda p: int(p.name.split("round")[-1]))
    if not dirs:
        return None
    n = len(list(dirs[0].glob("*.png")))
    size, pad, label = 64, 8, 14
    w = size + pad + n * size + pad + n * size
    grid = Image.new("RGB", (w, label + len(dirs) * size), "white")
    draw = ImageDraw.Draw(grid)
    draw.text((0, 1), "target", fill="black")
    draw.text((size + pad, 1), "no feedback", fill="black")
    draw.text((size + 2 * pad + n * size, 1), "FABRIC (simulated user)", fill="black")
    grid.paste(Image.open(out / "target.png").convert("RGB"), (0, label))
    for rd, d in enumerate(dirs):
        base = samples / d.name.replace("-fabric-", "-baseline-")
        for k in range(n):
            grid.paste(Image.open(base / f"{k}.png").convert("RGB"), (size + pad + k * size, label + rd * size))
            grid.paste(Image.open(d / f"{k}.png").convert("RGB"), (size + 2 * pad + n * size + k * size,
                                                                   label + rd * size))
    path = out / "rounds.png"
    grid.save(path)
    return path


def report(a) -> str:
    out = Path(a.out)
    q, c = _read_rows(out / "quality.jsonl"), _read_rows(out / "cost.jsonl")
    lines = ["# FABRIC on the built-in world", "",
             "Generated by `python -m bench fabric` from quality.jsonl and cost.jsonl; never edited by hand.",
             ""]
    if q:
        s = q[0]
        users = len({r["user"] for r in q})
        lines += [f"## Simulated user: similarity to the target ({users} users, mean ± 95% t-interval)", "",
                  f"Target: {s['target']} (trainer/scenes.py, `target.png`); prompt \"{s['prompt']}\"; "
                  f"{len(q[0]['seeds'])} images a round; {s['settings']['steps']} DPM-Solver++ steps, guidance "
                  f"{s['settings']['guidance_scale']}; FABRIC window [{s['settings']['feedback_start']}, "
                  f"{s['settings']['feedback_end']}), weights {s['settings']['min_weight']}/"
                  f"{s['settings']['max_weight']}, neg_scale {s['settings']['neg_scale']}. Each round the user "
                  f"likes the image closest to the target and dislikes the farthest by the judge's CLIP-like "
                  f"embedding; the next round uses all feedback so far. No feedback: the same seeds, no "
                  f"references. Round 0 has no feedback in either arm (identical images).", "",
                  "### Mean cosine similarity of a round's images to the target, CLIP-like embedding "
                  "(the one the user picks with)", ""]
        lines += quality_table(q, "similarity_clip") + [""]
        lines += ["### The same, DINO-like embedding (self-supervised; the user never sees it)", ""]
        lines += quality_table(q, "similarity_dino") + [""]
        lines += ["### Best image of each round, CLIP-like embedding", ""]
        lines += quality_table(q, "similarity_clip", stat="max") + [""]
        lines += ["`rounds.png`: user 0, the target, then one row per round: no feedback | FABRIC.", "",
                  f"Run: {s['time']}, git {s['git']}, torch {s['torch']}, CPU, {s['threads']} thread(s), "
                  f"1-min load average at the start {s['load_avg_1min']:.1f} (other jobs share this machine).", ""]
    if c:
        s = c[0]
        lines += ["## Cost per image on CPU (built-in model, 64x64, fp32)", "",
                  f"{s['images']} images of \"{PROMPT}\" per call, {s['steps']} steps, CFG, the feedback window over "
                  f"every step (the worst case), median of {s['repeats']} calls after a warm-up. Peak RSS: the "
                  f"process's resident-set peak above its size before the call (VmHWM).", ""]
        lines += cost_table(c) + [""]
        lines += [f"Run: {s['time']}, git {s['git']}, torch {s['torch']}, {s['threads']} thread(s), 1-min load "
                  f"average {s['load_avg_1min']:.1f}.", ""]
    grid = rounds_grid(out) if q else None
    text = "\n".join(lines)
    (out / "fabric.md").write_text(text)
    print(text)
    if grid:
        print(f"wrote {grid}")
    return text


# ------------------------------------------------------------------ CLI

def build_parser() -> argparse.ArgumentParser:
    from trainer.options.fabric import FEEDBACK_END, FEEDBACK_START, MAX_WEIGHT, MIN_WEIGHT, NEG_SCALE
    from trainer.options.sampling import BUILTIN_MODEL

    p = argparse.ArgumentParser(prog="python -m bench fabric", formatter_class=HelpFormatter,
                                description="FABRIC measured on the built-in world (quality, cost, report).")
    p.add_argument("what", choices=("quality", "cost", "report", "all"))
    a = option_adder(p)
    a("--out", default=str(OUT), metavar="DIR", help="where the rows, tables and images go")
    a("--model", default=str(BUILTIN_MODEL), metavar="DIR", help="the model")
    a("--judge", default=None, metavar="DIR", help="judge folder (not given: the built-in one)")
    a("--users", type=int, default=16, help="simulated users (independent experiments, own seeds)")
    a("--rounds", type=int, default=4, help="rounds per user")
    a("--num_images", type=int, default=4, help="images per round (cost: per call)")
    a("--steps", type=int, default=20, help="denoising steps")
    a("--guidance_scale", type=float, default=5.0, help="classifier-free guidance")
    a("--feedback_start", type=float, default=FEEDBACK_START, help="FABRIC window start")
    a("--feedback_end", type=float, default=FEEDBACK_END, help="FABRIC window end")
    a("--min_weight", type=float, default=MIN_WEIGHT, help="weight outside the window")
    a("--max_weight", type=float, default=MAX_WEIGHT, help="weight inside the window")
    a("--neg_scale", type=float, default=NEG_SCALE, help="disliked weight factor")
    a("--keep_images", type=int, default=1, help="users whose images are saved under samples/")
    a("--refs", type=int, nargs="+", default=[0, 2, 4, 8], help="reference counts for cost")
    a("--attention", nargs="+", default=["dbkernels", "sdpa"], choices=("dbkernels", "sdpa"),
      help="FABRIC attention backends for cost")
    a("--repeats", type=int, default=5, help="timed calls per cost configuration")
    a("--threads", type=int, default=1, help="torch CPU threads")
    return p


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    if a.what in ("quality", "all"):
        quality(a)
    if a.what in ("cost", "all"):
        cost(a)
    report(a)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
