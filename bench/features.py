"""Issue 30's training features measured on the built-in world: masked loss, aspect-ratio buckets, EMA, the Huber
loss and several concepts in one run (the experiments: bench/features_plans.py).

    python -m bench features masks|buckets|ema|huber|concepts --seeds 0 1 2 [--steps N] [--eval_images K]
                             [--work DIR] [--out DIR] [--jobs J] [--arms A ...] [--dry]
    python -m bench features report [--out DIR]      # the markdown again, from the rows

Every arm is a `python -m trainer train` process on trainer/world/assets/tiny-world-sd with the demo's recipe
(pivotal tuning, captions naming each picture's place, prior preservation from the base model's "a star <place>"
class images, lr 1e-4, batch 2, torch AdamW on a CPU) plus the arm's flags; arms differ in nothing else. The
class images are drawn once per experiment (training seed 0's) and shared by every arm and seed.
Each model is scored as trainer.world.evaluate does (the paper's DINO, CLIP-I, CLIP-T, PRES, DIV and our PLACE,
the judge's): image k of every prompt from seed 10000 + k for every arm and seed, so the arms are compared image for
image; each row carries its 95% bootstrap interval over images, the markdown also the mean ± std over seeds.

Measures beyond those (bench.features_plans):
- LEAK (masks): share of the samples of prompts naming a place other than the beach (snow, space, grass) that the
  judge's zero-shot place classifier (trainer.world.place) sees on the beach; PLACE_OTHER: share showing the place
  named. The beach of every training picture leaks into other places when the loss sees the background.
- CUT (buckets): share of the [V] samples in which the subject runs into the image border: at least 4 pixels of the
  subject's colour (warm saturated: R > 140, R - G > 80, R - B > 100; features_plans.subject_pixels) in the
  outer 2-pixel frame of the 64 px image. On the real pictures: 0 of the 5 whole pictures, 4 of 5 centre crops of
  the long ones' views (tests/test_features_bench.py).
- ms/step: median of the run's step-log intervals (every 10 steps, the first left out); train s: wall time of the
  arm's `dbtrain train` processes (loading, class images already drawn, steps, export).

Recipe and budget (measured on the 2-core CPU of this machine): a 300-step run of the demo's recipe takes 52-55 s
with one torch thread (~150 ms/step, plus loading and export), sampling and scoring ~0.2-0.25 s per image with one
thread. Two runs go side by side (--jobs 2, one thread each), then the scoring with one thread (--eval_threads: on a
shared CPU, two threads where one core is busy wait on each other and run several times slower). On a machine
shared with other work everything takes longer (the ema rows: 27 minutes at a load of 6 to 12).
Defaults, so that each experiment with 3 seeds takes at most ~12 minutes on this machine alone (estimates:
masks ~8, buckets ~5, ema ~4, huber ~5, concepts ~9 minutes):
- the demo's 300 steps per run (fewer leave the identifier hardly learnt), its 50 class images, 20 sampling steps;
- images per prompt: masks 16 (4 prompts + "a star"; 9 models), buckets, ema and huber 20 (the demo's; 3 prompts +
  "a star"), concepts 12 (12 models); a 95% interval on DINO is then about +-0.03 to 0.04;
- concepts: 300 steps for each single-subject run, 2 x 300 for the --concepts run (as many rows of each subject).
`--dry` prints the plan (every command line) and runs nothing; `--steps 3 --eval_images 2` is a smoke run.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from bench.features_plans import EXPERIMENTS, Config

OUT = Path(__file__).resolve().parent / "results" / "features"
MARKER = ".bench-features.json"


def _device_name(device) -> str:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores"


def parser() -> argparse.ArgumentParser:
    from trainer.options.sampling import LEARNING_RATE, NUM_CLASS_IMAGES, SAMPLE_STEPS

    p = argparse.ArgumentParser(prog="python -m bench features", description=__doc__.split("\n")[0])
    p.add_argument("experiment", choices=sorted(EXPERIMENTS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds")
    p.add_argument("--steps", type=int, default=None, help="training steps of each run (default: the experiment's)")
    p.add_argument("--eval_images", type=int, default=None, help="images per prompt (default: the experiment's)")
    p.add_argument("--learning_rate", type=float, default=LEARNING_RATE)
    p.add_argument("--num_class_images", type=int, default=NUM_CLASS_IMAGES)
    p.add_argument("--sample_steps", type=int, default=SAMPLE_STEPS, help="denoising steps of class images and samples")
    p.add_argument("--arms", nargs="+", default=None, help="a subset of the experiment's arms (default: all)")
    p.add_argument("--buckets", default="auto", help="buckets: --aspect_ratio_buckets of the buckets arm")
    p.add_argument("--jobs", type=int, default=2, help="training runs side by side (each with --threads threads)")
    p.add_argument("--threads", type=int, default=1, help="torch threads of each training run")
    p.add_argument("--eval_threads", type=int, default=1, help="torch threads of the sampling and scoring")
    p.add_argument("--work", default=None, help="folder for data and models: new, or this experiment's earlier one "
                                                "(its finished runs are reused); default /tmp/dbtrain-features/<exp>")
    p.add_argument("--out", default=str(OUT), help="folder of <experiment>.jsonl and .md")
    p.add_argument("--device", default=None, help="training and sampling device (default: cuda if available)")
    p.add_argument("--dry", action="store_true", help="print the plan (every command line); run nothing")
    return p


def parse(argv: list[str]):
    p = parser()
    a = p.parse_args(argv)
    exp = EXPERIMENTS[a.experiment]
    a.steps = a.steps or exp.steps
    a.eval_images = a.eval_images or exp.eval_images
    a.arms = a.arms or list(exp.arms)
    known = exp.arms + exp.optional_arms
    bad = [x for x in a.arms if x not in known]
    if bad:
        p.error(f"--arms: {bad[0]!r} is not an arm of {a.experiment}; choose from " + ", ".join(map(repr, known)))
    if min(a.steps, a.jobs, a.threads, a.eval_threads) < 1 or a.eval_images < 2:
        p.error("--steps, --jobs, --threads and --eval_threads must be >= 1 and --eval_images >= 2")
    a.work = Path(a.work or Path("/tmp/dbtrain-features") / a.experiment)
    a.argv = argv
    return a


def plan_of(a):
    """(experiment, its data folders, {seed: Plan}); nothing written with a.dry."""
    exp = EXPERIMENTS[a.experiment]
    cfg = Config(a.steps, a.learning_rate, a.num_class_images, a.sample_steps, a.device, a.buckets)
    data = exp.prepare(a.work / "data", write=not a.dry)
    return exp, data, {seed: exp.plan(seed, a.work, data, cfg, a.arms) for seed in a.seeds}


def show(plans: dict) -> str:
    lines = []
    for seed, plan in plans.items():
        for run in plan.runs:
            lines.append(f"# seed {seed}, run {run.name}\npython -m trainer train {shlex.join(run.args)}")
        for s in plan.scored:
            lines.append(f"# seed {seed}: score {s.arm} / {s.model}: {s.path} on "
                         + "; ".join(t.format(V=s.subject.word, C=s.subject.noun) for t in s.subject.templates))
    return "\n".join(lines)


def _claim(a) -> None:
    """A new or empty --work, or one of this experiment's with the same class images (its finished runs of the same
    command lines are reused)."""
    work, mark = a.work, a.work / MARKER
    mine = {"experiment": a.experiment, "class images": [a.num_class_images, a.sample_steps]}
    if work.exists() and any(work.iterdir()):
        theirs = json.loads(mark.read_text()) if mark.is_file() else {}
        if theirs.get("experiment") != a.experiment:
            raise SystemExit(f"--work {work} is not empty and not a `bench features {a.experiment}` folder; pass a "
                             f"new one")
        if theirs.get("class images", mine["class images"])[1] != a.sample_steps:
            raise SystemExit(f"--work {work} holds class images drawn with other --sample_steps; pass a new --work")
    work.mkdir(parents=True, exist_ok=True)
    mark.write_text(json.dumps(mine) + "\n")


def draw_class_images(plans: dict, device) -> None:
    """Each class folder once (the first seed's run's options: its seeds draw the images), "a <noun> <place>" for
    every place of the world and "a <noun>" in turn with their caption files, as the demo's."""
    import torch

    from trainer.core.class_images import generate_class_images
    from trainer.options import train as train_options
    from trainer.options.sampling import DEMO_CLASS_IMAGES
    from trainer.world import demo
    from trainer.world.place import PLACES

    done = set()
    for args, noun in next(iter(plans.values())).class_sets:
        opts = train_options.parse(args)
        if opts.prior.class_data_dir in done:
            continue
        done.add(opts.prior.class_data_dir)
        prompts = [f"a {noun} {p}" for p in PLACES] + [f"a {noun}"] * demo.CLASS_KINDS[DEMO_CLASS_IMAGES]
        made = generate_class_images(opts, torch.device(device), torch.float32, prompts=prompts)
        print(f"class images in {opts.prior.class_data_dir}: {made} drawn", flush=True)


def _finished(folder: Path, args: list[str]) -> bool:
    """The run is trained already, with these arguments (a run of other options: an error, never reused)."""
    from trainer.world import demo

    record = folder / "bench-time.json"
    if not (demo._trained(folder) and record.is_file()):
        return False
    if json.loads(record.read_text()).get("args") != args:
        raise RuntimeError(f"{folder} holds a run of other options (its bench-time.json); pass a new --work")
    return True


def train_one(run, folder: Path, threads: int) -> None:
    """One `python -m trainer train` process; its output in <run>.log beside the model, its wall time in the model's
    bench-time.json. A failed run stops the experiment with the log's end."""
    if _finished(folder, run.args):
        print(f"{folder} is trained already", flush=True)
        return
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    folder.parent.mkdir(parents=True, exist_ok=True)
    log = folder.parent / f"{run.name}.log"
    print(f"training {folder} ...", flush=True)
    t0 = time.time()
    with open(log, "w") as f:
        code = subprocess.run([sys.executable, "-m", "trainer", "train", *run.args], stdout=f, stderr=subprocess.STDOUT,
                              env=env).returncode
    seconds = time.time() - t0
    if code != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
        raise RuntimeError(f"`python -m trainer train` of {folder} exited with {code}; {log} ends:\n{tail}")
    (folder / "bench-time.json").write_text(json.dumps({"seconds": round(seconds, 1), "args": run.args}) + "\n")
    print(f"trained {folder} in {seconds:.0f} s", flush=True)


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name).strip("-") or "model"


def ms_per_step(folder: Path) -> float | None:
    """Median over the step log's intervals, the first (warm-up) left out."""
    path = folder / "logs" / "train_log.jsonl"
    if not path.is_file():
        return None
    ms = [json.loads(x)["ms_per_step"] for x in path.read_text().splitlines() if x.strip()]
    ms = [m for m in ms[1:] or ms if m is not None]
    return float(np.median(ms)) if ms else None


def interval(values: np.ndarray, n_boot: int = 1000, seed: int = 0) -> list[float]:
    """95% percentile bootstrap interval of the mean over images."""
    if values.size == 0:
        return [float("nan")] * 2
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, values.size, size=(n_boot, values.size))].mean(1)
    return [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))]


def run(a) -> int:
    import torch

    if not a.dry:
        _claim(a)
    exp, data, plans = plan_of(a)
    if a.dry:
        print(show(plans))
        return 0
    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.set_num_threads(a.eval_threads)  # on a shared CPU, more threads than free cores wait on each other
    t_start = time.time()
    draw_class_images(plans, device)
    print(f"class images ready at {time.time() - t_start:.0f} s", flush=True)
    folders = {(seed, r.name): Path(r.args[r.args.index("--output_dir") + 1])
               for seed, p in plans.items() for r in p.runs}
    with ThreadPoolExecutor(max_workers=a.jobs) as pool:  # threads: each waits on its own process
        try:
            for f in [pool.submit(train_one, r, folders[(seed, r.name)], a.threads)
                      for seed, p in plans.items() for r in p.runs]:
                f.result()
        except RuntimeError as e:  # a failed run: the others not started, the running ones finish
            pool.shutdown(cancel_futures=True)
            print(f"error: {e}", file=sys.stderr)
            return 1
    print(f"training done at {time.time() - t_start:.0f} s", flush=True)
    rows = score_all(a, exp, plans, folders, device, t_start)
    print(report_text(rows))
    return 0


def score_all(a, exp, plans: dict, folders: dict, device, t_start: float) -> list[dict]:
    """A row per scored model, written (with the markdown) after each."""
    import torch

    from trainer.methods.outputs import load_pipeline
    from trainer.options.sampling import EVAL_SEED, GUIDANCE
    from trainer.world.evaluate import evaluate
    from trainer.world import demo
    from trainer.world.metrics import Scorer

    scorer = Scorer(device=device)
    meta = {"experiment": a.experiment, "steps": a.steps, "learning_rate": a.learning_rate,
            "num_class_images": a.num_class_images, "eval_images": a.eval_images, "sample_steps": a.sample_steps,
            "guidance": GUIDANCE, "eval_seed": EVAL_SEED, "jobs": a.jobs, "threads": a.threads,
            "eval_threads": a.eval_threads,
            "device": _device_name(device), "torch": torch.__version__,
            "command": "python -m bench features " + shlex.join(a.argv)}
    rows = []
    for seed, plan in plans.items():
        for s in plan.scored:
            ev = evaluate(load_pipeline(s.path, device), scorer, s.subject.real, s.subject.word, s.subject.noun,
                          templates=s.subject.templates, num_images=a.eval_images, steps=a.sample_steps,
                          guidance=GUIDANCE, seed=EVAL_SEED)
            extra = exp.measure(scorer, s.subject, {p: ims for p, ims in ev.samples.items() if p in ev.place_by_prompt})
            grid = a.work / f"seed{seed}" / f"samples-{_slug(s.arm)}-{_slug(s.model)}.png"  # to look at
            demo.grid([(f"seed {seed}, {s.arm} / {s.model}", ev.samples)], per_row=min(8, a.eval_images)).save(grid)
            runs = [folders[(seed, name)] for name in s.runs]
            times = [json.loads((f / "bench-time.json").read_text())["seconds"] for f in runs]
            steps_ms = [m for m in (ms_per_step(f) for f in runs) if m is not None]
            row = {"arm": s.arm, "model": s.model, "seed": seed, "subject": s.subject.name, **ev.metrics,
                   **{k: float(v.mean()) if v.size else float("nan") for k, v in extra.items()},
                   "intervals": {**ev.intervals, **{k: interval(v) for k, v in extra.items()}},
                   "place_by_prompt": ev.place_by_prompt, "train_s": round(sum(times), 1),
                   "ms_per_step": float(np.median(steps_ms)) if steps_ms else None,
                   "train_commands": ["python -m trainer train " + shlex.join(r.args) for r in plan.runs
                                      if r.name in s.runs],
                   **meta, "seconds": round(time.time() - t_start)}
            rows.append(row)
            print(f"seed {seed} {s.arm} {s.model}: " + ", ".join(f"{k} {row[k]:.3f}" for k in
                                                                 ("DINO", "PLACE", "PRES", *exp.extras))
                  + f" (at {row['seconds']} s)", flush=True)
            write(Path(a.out), a.experiment, rows)  # after every row: a stopped experiment keeps what it measured
    return rows


def write(out: Path, experiment: str, rows: list[dict]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / f"{experiment}.jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    (out / f"{experiment}.md").write_text(report_text(rows))


# ---------------------------------------------------------------- markdown from the rows

def _cell(v, ci=None, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return "-"
    if ci is None or any(x is None or np.isnan(x) for x in ci):
        return f"{v:.{digits}f}"
    return f"{v:.{digits}f} [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]"


def report_text(rows: list[dict]) -> str:
    from trainer.world.metrics import METRICS

    exp = EXPERIMENTS[rows[0]["experiment"]]
    r0 = rows[0]
    cols = list(exp.extras) + list(METRICS)
    head = "| arm | model | seed | " + " | ".join(cols) + " | ms/step | train s |"
    rule = "|---|---|---:|" + "---:|" * (len(cols) + 2)
    per_seed = [head, rule]
    for r in rows:
        per_seed.append(f"| {r['arm']} | {r['model']} | {r['seed']} | "
                        + " | ".join(_cell(r.get(k), r["intervals"].get(k)) for k in cols)
                        + f" | {_cell(r['ms_per_step'], digits=0)} | {r['train_s']:.0f} |")
    means = [head.replace("| seed |", "| seeds |"), rule]
    for arm, model in dict.fromkeys((r["arm"], r["model"]) for r in rows):
        sel = [r for r in rows if (r["arm"], r["model"]) == (arm, model)]
        cells = []
        for k in cols + ["ms_per_step", "train_s"]:
            v = np.array([np.nan if r.get(k) is None else r[k] for r in sel], dtype=float)
            digits = 0 if k in ("ms_per_step", "train_s") else 3
            cells.append("-" if np.isnan(v).all() else f"{np.nanmean(v):.{digits}f} ± {np.nanstd(v):.{digits}f}")
        means.append(f"| {arm} | {model} | {len(sel)} | " + " | ".join(cells) + " |")
    commands = "; ".join(f"`{c}`" for c in dict.fromkeys(r["command"] for r in rows))
    seeds = sorted({r["seed"] for r in rows})
    examples = dict.fromkeys(c for r in rows for c in r["train_commands"])
    return (f"# bench features {exp.name}\n\n{(exp.__doc__ or '').strip()}\n\n"
            f"{r0['steps']} steps per run (the demo's recipe and the arm's flags), lr {r0['learning_rate']}, "
            f"{r0['num_class_images']} class images; {r0['eval_images']} images per prompt (image k from seed "
            f"{r0['eval_seed']} + k), {r0['sample_steps']} DPM-Solver++ steps, guidance {r0['guidance']}; training "
            f"seeds {seeds}; {r0['jobs']} run(s) side by side with {r0['threads']} thread(s) each"
            + (f", scored with {r0['eval_threads']} thread(s)" if "eval_threads" in r0 else "") + f"; device "
            f"{r0['device']}, torch {r0['torch']}.\nRegenerate: {commands} (the markdown alone: "
            f"`python -m bench features report`).\n\nRead: {exp.reading}.\n\n"
            f"Mean ± std over training seeds:\n\n" + "\n".join(means) +
            "\n\nPer training seed, mean [95% bootstrap interval over images]:\n\n" + "\n".join(per_seed) +
            "\n\nThe training command lines of the first seed:\n\n" +
            "\n".join(f"    {c}" for c in examples if f"--seed {seeds[0]} " in c + " ") + "\n")


def report(out: Path) -> int:
    files = sorted(out.glob("*.jsonl"))
    for f in files:
        rows = [json.loads(x) for x in f.read_text().splitlines() if x.strip()]
        if rows and rows[0].get("experiment") in EXPERIMENTS:
            f.with_suffix(".md").write_text(report_text(rows))
            print(f"wrote {f.with_suffix('.md')}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "report":
        p = argparse.ArgumentParser(prog="python -m bench features report")
        p.add_argument("--out", default=str(OUT), help="folder of the <experiment>.jsonl rows")
        return report(Path(p.parse_args(argv[1:]).out))
    return run(parse(argv))


if __name__ == "__main__":
    raise SystemExit(main())
