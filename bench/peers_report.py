"""bench/results/peers/peers.md from the rows of `python -m bench peers` (nothing edited by hand)."""
from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

from bench.fabric import _ci95

METRICS = ("DINO", "CLIP-I", "CLIP-T", "PRES", "DIV")
NAMES = {"ti": "Textual Inversion", "lora": "LoRA DreamBooth, rank 4", "full": "full DreamBooth"}


def _read(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.is_file() else []


def _t95(xs: list[float]) -> str:
    """mean ± half-width of the 95% t-interval over seeds."""
    m, h = _ci95(xs)
    return f"{m:.3f}" if len(xs) < 2 else f"{m:.3f} ± {h:.3f}"


def transforms_table(rows: list[dict]) -> list[str]:
    out = ["| script | views compared | bitwise equal | largest difference |", "|---|---|---|---|"]
    for script in sorted({r["script"] for r in rows}):
        mine = [r for r in rows if r["script"] == script]
        worst = max((r["max_abs_diff"] or 0.0) for r in mine)
        out.append(f"| {script} | {len(mine)} | {sum(r['equal'] for r in mine)} | {worst:g} |")
    return out


def train_tables(rows: list[dict]) -> list[str]:
    ok = [r for r in rows if r.get("exit_code") == 0]
    failed = [r for r in rows if r.get("exit_code") != 0]
    seeds = sorted({r["seed"] for r in ok})
    out = [f"Means over training seeds {seeds}, ± the 95% t-interval over seeds; steps/s and peak RSS: median "
           f"over seeds. The ratio column is dbtrain's steps/s over diffusers', per seed (min-max).", "",
           "| method | side | steps/s | ratio | peak RSS (MiB) | " + " | ".join(METRICS) + " |",
           "|---|---|---|---|---|" + "---|" * len(METRICS)]
    for method in ("ti", "lora", "full"):
        for side in ("dbtrain", "diffusers"):
            mine = [r for r in ok if r["method"] == method and r["side"] == side]
            if not mine:
                continue
            ratio = ""
            if side == "dbtrain":
                pairs = [(r["steps_per_s"], t["steps_per_s"]) for r in mine for t in ok
                         if t["method"] == method and t["side"] == "diffusers" and t["seed"] == r["seed"]]
                rs = [x / y for x, y in pairs if x and y]
                ratio = f"{min(rs):.2f}-{max(rs):.2f}x" if rs else ""
            rate = statistics.median(r["steps_per_s"] for r in mine if r["steps_per_s"])
            rss = statistics.median(r["peak_rss_bytes"] for r in mine) / 2**20
            out.append(f"| {NAMES[method]} | {side} | {rate:.2f} | {ratio} | {rss:.0f} | "
                       + " | ".join(_t95([r[k] for r in mine]) for k in METRICS) + " |")
    out += ["", "Per seed, DINO with its 95% bootstrap interval over images, and whether the two sides' intervals "
            "overlap:", "", "| method | seed | dbtrain | diffusers | overlap |", "|---|---|---|---|---|"]
    for method in ("ti", "lora", "full"):
        for seed in seeds:
            two = {r["side"]: r for r in ok if r["method"] == method and r["seed"] == seed}
            if len(two) < 2:
                continue
            a, b = two["dbtrain"]["ci95"]["DINO"], two["diffusers"]["ci95"]["DINO"]
            cell = lambda r, ci: f"{r['DINO']:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"  # noqa: E731
            out.append(f"| {NAMES[method]} | {seed} | {cell(two['dbtrain'], a)} | {cell(two['diffusers'], b)} | "
                       f"{'yes' if a[0] <= b[1] and b[0] <= a[1] else 'no'} |")
    if failed:
        out += ["", "Runs that failed: " + ", ".join(f"{r['method']} {r['side']} seed {r['seed']} (exit "
                                                      f"{r['exit_code']})" for r in failed)]
    return out


def adapters_lines(rows: list[dict]) -> list[str]:
    out = []
    for r in rows:
        same = not (r["only_dbtrain"] or r["only_diffusers"] or r["shapes_differ"])
        out.append(f"- seed {r['seed']}: dbtrain {r['modules_dbtrain']} adapted modules, diffusers "
                   f"{r['modules_diffusers']}; " + ("the same modules with the same shapes" if same else
                   f"only dbtrain: {r['only_dbtrain'][:5]}, only diffusers: {r['only_diffusers'][:5]}, shapes differ: "
                   f"{r['shapes_differ'][:5]}") + (f"; the trained update's norm (all modules' B @ A): dbtrain "
                   f"{r['update_norm']['dbtrain']:.2f}, diffusers {r['update_norm']['diffusers']:.2f}"
                   if "update_norm" in r else ""))
    return out


def fabric_table(rows: list[dict]) -> list[str]:
    out = ["| side | liked images | images | ms per image (median) | peak RSS above start (MiB) | similarity to the "
           "liked image, CLIP-like | DINO-like |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['side']} | {r['liked']} | {r['images']} | {r['ms_per_image_p50']:.1f} | "
                   f"{r['peak_rss_above_start_bytes'] / 2**20:.1f} | {r['similarity_clip'][0]:.3f} ± "
                   f"{r['similarity_clip'][1]:.3f} | {r['similarity_dino'][0]:.3f} ± {r['similarity_dino'][1]:.3f} |")
    moved = []
    for side in ("dbtrain", "diffusers"):
        two = {r["liked"]: r for r in rows if r["side"] == side}
        if len(two) == 2:
            (m1, h1), (m0, h0) = two[1]["similarity_clip"], two[0]["similarity_clip"]
            moved.append(f"{side} {m1 - m0:+.3f} ± {math.hypot(h1, h0):.3f}")
    return out + (["", "Moved toward the liked image (CLIP-like, with minus without; ± the two half-widths "
                   "combined in quadrature): " + ", ".join(moved)] if moved else [])


def write_report(out: Path) -> str:
    t, tr, ad, fa = (_read(out / f"{n}.jsonl") for n in ("transforms", "train", "adapters", "fabric"))
    first = next(iter(t + tr + fa), {})
    lines = ["# dbtrain against diffusers' example scripts", "",
             f"`python -m bench peers --diffusers_examples DIR` (rows: `{out}/*.jsonl`, with their commands). "
             f"Device: {first.get('device', '?')}; torch {first.get('torch', '?')}, diffusers "
             f"{first.get('diffusers', '?')}, example scripts of diffusers {first.get('examples_version', '?')}; "
             f"dbtrain {first.get('git', '?')}. The built-in tiny model and subject (64 px).", ""]
    if t:
        lines += ["## The first batch: training views against the scripts' own dataset code", "",
                  "Each picture's view for the same draw (the script's random crop offset given to ours; "
                  "textual_inversion.py's flip both ways), ours read from the same command line plus "
                  "`--diffusers_defaults`.", ""] + transforms_table(t) + [""]
    if tr:
        lines += ["## Training: the same command line, as the script and as dbtrain (+ --diffusers_defaults)", ""]
        lines += train_tables(tr) + [""]
    if ad:
        lines += ["## LoRA files: the modules that carry adapters", "",
                  "Both sides make the adapters with peft's LoraConfig(r=rank, lora_alpha=rank, "
                  "init_lora_weights='gaussian') on the same target names; the saved files of the train part, "
                  "compared module by module (diffusers' lora.down/lora.up read as lora_A/lora_B):", ""]
        lines += adapters_lines(ad) + [""]
    if fa:
        s = fa[0]["settings"]
        lines += ["## FABRIC: `dbtrain fabric`'s sampler and diffusers' community FabricPipeline", "",
                  f"Prompt \"{s['prompt']}\", {s['resolution']} px, {s['steps']} {s['scheduler']} steps, guidance "
                  f"{s['guidance']}, feedback window {s['feedback_start']}-{s['feedback_end']}, weights "
                  f"{s['min_weight']}-{s['max_weight']}, one liked image (the world's target scene) or none, "
                  f"{fa[0].get('images_per_call', '?')} images a call, the sides' calls interleaved. Similarity: "
                  "cosine of each image's judge embedding with the liked image's, mean ± 95% t-interval over "
                  "images.", ""]
        lines += fabric_table(fa) + [""]
    text = "\n".join(lines)
    (out / "peers.md").parent.mkdir(parents=True, exist_ok=True)
    (out / "peers.md").write_text(text)
    return text
