"""The recipe search of issue 15: which demo recipe shows DreamBooth's point on the built-in world.

    python -m bench recipes --recipes demo-default captions ... --out bench/results/demo/recipes

Each recipe is the demo's `dbtrain train` run with some levers changed (learning rate, steps,
prior weight, class-image count, text-encoder training, per-image captions, class images of every place with
their captions). Each trained model
and the base model are scored on "[V] star <place>" for every place of the world (the base model
on "a star <place>"), and on "a star", with 95% bootstrap intervals over images. One JSONL row
per recipe (appended, so runs in parallel processes add up) and a markdown table of all rows.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

from trainer.world import scenes
from trainer.world.place import PLACES

# captions + pivotal tuning from "orange" (the demo's flags since issue 15, written out: the demo's may change)
PIVOTAL = ("--caption_extension", ".txt", "--train_text_embedding", "--initializer_token", "orange")


def _token_lr(lr: str, token_lr: str, classes: str = "places+plain", frac1: bool = False,
              num_class_images: int | None = None) -> tuple:
    """A RECIPES entry: pivotal from "orange" (PIVOTAL) with the token at its own learning rate."""
    what = {"places+plain": "places+plain class images", "places+halfplain": "class images half of the 6 places, "
            "half plain 'a star'"}[classes]
    if num_class_images:
        what = f"{num_class_images} {what}"
    what = f"pivotal from 'orange', {what}, lr {lr}, the token's lr {token_lr}" + (" for all the steps" if frac1
                                                                                  else "")
    kw = {"lr": float(lr), "class_places": classes, **({"num_class_images": num_class_images} if num_class_images
                                                        else {})}
    flags = PIVOTAL + ("--text_embedding_lr", token_lr) + (("--text_embedding_frac", "1") if frac1 else ())
    return what, kw, flags, True


# name -> (what changes, demo.train_args keywords, extra dbtrain train flags, caption files?)
RECIPES = {
    "demo-default": ("the demo until now: lr 2e-4, 300 steps, prior weight 1, 50 class images", {}, (), False),
    "no-prior": ("demo-default without prior preservation", {"prior": False}, (), False),
    "lr1e-4": ("lr 1e-4", {"lr": 1e-4}, (), False),
    "lr1e-4-600": ("lr 1e-4, 600 steps", {"lr": 1e-4, "steps": 600}, (), False),
    "lr5e-5-600": ("lr 5e-5, 600 steps", {"lr": 5e-5, "steps": 600}, (), False),
    "150steps": ("150 steps", {"steps": 150}, (), False),
    "prior2": ("prior loss weight 2", {}, ("--prior_loss_weight", "2"), False),
    "class100": ("100 class images", {"num_class_images": 100}, (), False),
    "te": ("also trains the text encoder", {}, ("--train_text_encoder",), False),
    "captions": ("per-image captions 'a [V] star <its place>'", {}, ("--caption_extension", ".txt"), True),
    "captions-no-prior": ("captions, no prior preservation", {"prior": False}, ("--caption_extension", ".txt"), True),
    "captions-te": ("captions + text encoder", {}, ("--caption_extension", ".txt", "--train_text_encoder"), True),
    "captions-lr1e-4": ("captions, lr 1e-4", {"lr": 1e-4}, ("--caption_extension", ".txt"), True),
    "captions-600": ("captions, 600 steps", {"steps": 600}, ("--caption_extension", ".txt"), True),
    "captions-150": ("captions, 150 steps", {"steps": 150}, ("--caption_extension", ".txt"), True),
    "captions-lr5e-5": ("captions, lr 5e-5", {"lr": 5e-5}, ("--caption_extension", ".txt"), True),
    "captions-lr5e-5-600": ("captions, lr 5e-5, 600 steps", {"lr": 5e-5, "steps": 600}, ("--caption_extension", ".txt"),
                            True),
    "captions-lr2e-5-600": ("captions, lr 2e-5, 600 steps", {"lr": 2e-5, "steps": 600}, ("--caption_extension", ".txt"),
                            True),
    "captions-te-lr1e-4": ("captions + text encoder, lr 1e-4", {"lr": 1e-4},
                           ("--caption_extension", ".txt", "--train_text_encoder"), True),
    "captions-prior2": ("captions, prior weight 2", {}, ("--caption_extension", ".txt", "--prior_loss_weight", "2"),
                        True),
    # issue 15, second round: every lever's learning rate written out (the demo's default may change)
    "captions-te-lr5e-5": ("captions + text encoder, lr 5e-5", {"lr": 5e-5},
                           ("--caption_extension", ".txt", "--train_text_encoder"), True),
    "captions-te-lr7e-5": ("captions + text encoder, lr 7e-5", {"lr": 7e-5},
                           ("--caption_extension", ".txt", "--train_text_encoder"), True),
    # class images: the base model's "a star <place>" for all 6 places (in space too), each with its caption
    "places-lr1e-4": ("captions, place-captioned class images, lr 1e-4", {"lr": 1e-4, "class_places": "places"},
                      ("--caption_extension", ".txt"), True),
    "places-te-lr1e-4": ("captions + text encoder, place-captioned class images, lr 1e-4",
                         {"lr": 1e-4, "class_places": "places"},
                         ("--caption_extension", ".txt", "--train_text_encoder"), True),
    "places-lr2e-4": ("captions, place-captioned class images, lr 2e-4", {"lr": 2e-4, "class_places": "places"},
                      ("--caption_extension", ".txt"), True),
    "places-te-lr2e-4": ("captions + text encoder, place-captioned class images, lr 2e-4",
                         {"lr": 2e-4, "class_places": "places"},
                         ("--caption_extension", ".txt", "--train_text_encoder"), True),
    "places-te-lr1e-4-400": ("captions + text encoder, place-captioned class images, lr 1e-4, 400 steps",
                             {"lr": 1e-4, "steps": 400, "class_places": "places"},
                             ("--caption_extension", ".txt", "--train_text_encoder"), True),
    "places+plain-te-lr1e-4": ("captions + text encoder, class images of the 6 places and plain 'a star', lr 1e-4",
                               {"lr": 1e-4, "class_places": "places+plain"},
                               ("--caption_extension", ".txt", "--train_text_encoder"), True),
    "places+plain-te-lr2e-4": ("captions + text encoder, class images of the 6 places and plain 'a star', lr 2e-4",
                               {"lr": 2e-4, "class_places": "places+plain"},
                               ("--caption_extension", ".txt", "--train_text_encoder"), True),
    "places-te-lr1e-4-prior2-400": ("captions + text encoder, place-captioned class images, lr 1e-4, prior weight 2, "
                                    "400 steps", {"lr": 1e-4, "steps": 400, "class_places": "places"},
                                    ("--caption_extension", ".txt", "--train_text_encoder", "--prior_loss_weight", "2"),
                                    True),
    "places-te-lr1e-4-class100": ("captions + text encoder, 100 place-captioned class images, lr 1e-4",
                                  {"lr": 1e-4, "num_class_images": 100, "class_places": "places"},
                                  ("--caption_extension", ".txt", "--train_text_encoder"), True),
    "places-te-lr1.5e-4": ("captions + text encoder, place-captioned class images, lr 1.5e-4",
                           {"lr": 1.5e-4, "class_places": "places"},
                           ("--caption_extension", ".txt", "--train_text_encoder"), True),
    "places-te-lr1e-4-prior05": ("captions + text encoder, place-captioned class images, lr 1e-4, prior weight 0.5",
                                 {"lr": 1e-4, "class_places": "places"},
                                 ("--caption_extension", ".txt", "--train_text_encoder", "--prior_loss_weight", "0.5"),
                                 True),
    # pivotal tuning (PIVOTAL): [V] is a new token <sks>, started from the word "orange" (the base model draws
    # orange stars in every place), trained with the UNet for the first half of the steps; the text encoder is
    # otherwise frozen
    "pivotal-orange-lr1e-4": ("pivotal tuning (new token from 'orange'), captions, place-captioned class images, "
                              "lr 1e-4", {"lr": 1e-4, "class_places": "places"},
                              PIVOTAL, True),
    "pivotal-orange-plain-lr1e-4": ("pivotal tuning (new token from 'orange'), captions, class images of the 6 "
                                    "places and plain 'a star', lr 1e-4", {"lr": 1e-4, "class_places": "places+plain"},
                                    PIVOTAL, True),
    "pivotal-orange-plain-prior1.5-lr1e-4": ("pivotal tuning (new token from 'orange'), captions, class images of "
                                             "the 6 places and plain 'a star', prior weight 1.5, lr 1e-4",
                                             {"lr": 1e-4, "class_places": "places+plain"},
                                             PIVOTAL + ("--prior_loss_weight", "1.5"), True),
    "pivotal-orange-prior2-lr1e-4": ("pivotal tuning (new token from 'orange'), captions, place-captioned class "
                                     "images, prior weight 2, lr 1e-4", {"lr": 1e-4, "class_places": "places"},
                                     PIVOTAL + ("--prior_loss_weight", "2"), True),
    # issue 15, third round: the new token's own learning rate (--text_embedding_lr); Textual Inversion's is ~5e-3
    "pivotal-plain-telr1e-3": _token_lr("1e-4", "1e-3"),
    "pivotal-plain-telr5e-3": _token_lr("1e-4", "5e-3"),
    "pivotal-plain-telr5e-3-lr5e-5": _token_lr("5e-5", "5e-3"),
    "pivotal-plain-telr5e-3-frac1": _token_lr("1e-4", "5e-3", frac1=True),
    "pivotal-plain-telr1e-2-lr5e-5": _token_lr("5e-5", "1e-2"),
    "pivotal-plain-telr5e-3-lr7e-5": _token_lr("7e-5", "5e-3"),
    "pivotal-halfplain-telr5e-3": _token_lr("1e-4", "5e-3", classes="places+halfplain"),
    "pivotal-plain-telr5e-3-class100": _token_lr("1e-4", "5e-3", num_class_images=100),
}


TEMPLATES = tuple(f"a {{V}} {{C}} {p}" for p in PLACES)


def table(rows: list[dict]) -> str:
    """Markdown: one row per recipe run, every metric with its 95% interval, PLACE of the unseen place."""
    from trainer.world.metrics import METRICS, fmt

    unseen = [p for p in PLACES if p not in scenes.SUBJECT_CONTEXTS]
    head = ("| recipe | what changed | " + " | ".join(METRICS) + " | " + " | ".join(f"PLACE {p}" for p in unseen) +
            " | train s |")
    lines = [head, "|---|---|" + "---:|" * (len(METRICS) + len(unseen) + 1)]
    for r in rows:
        by_place = {k.split(scenes.SUBJECT_CLASS + " ", 1)[-1]: v for k, v in r["place_by_prompt"].items()}
        lines.append(f"| {r['recipe']} (seed {r['seed']}) | {r['what']} | " +
                     " | ".join(fmt(r["metrics"][k], r["intervals"][k]) for k in METRICS) + " | " +
                     " | ".join(f"{by_place.get(p, float('nan')):.2f}" for p in unseen) + f" | {r['train_s']:.0f} |")
    return "\n".join(lines) + "\n"


def _space(r: dict, key: str = "place_by_prompt") -> float:
    return next((v for k, v in (r.get(key) or {}).items() if k.endswith(" in space")), float("nan"))


def targets_table(rows: list[dict]) -> str:
    """Issue 15's targets per row, against the base row: DINO and CLIP-I gains in half-widths of the row's
    own 95% interval (target >= 5), PLACE and PLACE in space minus the base model's (target >= -0.10),
    PRES inside the base model's interval; and DINO of the "in space" samples alone (is the subject drawn
    there, or the class's plain star?), where the row has it."""
    base = next((r for r in rows[::-1] if r["recipe"] == "base"), None)
    if base is None:
        return ""
    bm, bci = base["metrics"], base["intervals"]
    lines = ["| recipe | DINO gain / half-width | CLIP-I gain / half-width | PLACE - base | PLACE in space - base | "
             "PRES in base interval | (a)+(b) met | DINO in space |", "|---|---:|---:|---:|---:|---|---|---:|"]
    for r in rows:
        if r["recipe"] == "base":
            continue
        m, ci = r["metrics"], r["intervals"]
        x = {k: (m[k] - bm[k]) / max((ci[k][1] - ci[k][0]) / 2, 1e-9) for k in ("DINO", "CLIP-I")}
        dp, ds = m["PLACE"] - bm["PLACE"], _space(r) - _space(base)
        pres = bci["PRES"][0] <= m["PRES"] <= bci["PRES"][1]
        met = min(x.values()) >= 5 and dp >= -0.1 - 1e-9 and ds >= -0.1 - 1e-9
        lines.append(f"| {r['recipe']} (seed {r['seed']}) | {x['DINO']:.1f} | {x['CLIP-I']:.1f} | {dp:+.3f} | "
                     f"{ds:+.2f} | {'yes' if pres else 'no'} | {'yes' if met else 'no'} | "
                     f"{_space(r, 'dino_by_prompt'):.3f} |")
    return (f"Base model: DINO of its 'a star in space' samples {_space(base, 'dino_by_prompt'):.3f}.\n\n"
            + "\n".join(lines) + "\n")


def seeds_table(rows: list[dict]) -> str:
    """Recipes run with more than one training seed: mean ± std over seeds of each metric."""
    from trainer.world.metrics import METRICS

    by = {}
    for r in rows:
        by.setdefault(r["recipe"], {})[r["seed"]] = r  # a recipe run twice with one seed: the later row
    multi = {k: v for k, v in by.items() if len(v) > 1}
    if not multi:
        return ""
    lines = ["| recipe | seeds | " + " | ".join(METRICS) + " | PLACE in space |",
             "|---|---|" + "---:|" * (len(METRICS) + 1)]
    for name, seeds in multi.items():
        rs = [seeds[k] for k in sorted(seeds)]
        cols = [[r["metrics"][k] for r in rs] for k in METRICS] + [[_space(r) for r in rs]]
        cells = [f"{float(torch.tensor(c).mean()):.3f} ± {float(torch.tensor(c).std()):.3f}" for c in cols]
        lines.append(f"| {name} | {', '.join(str(k) for k in sorted(seeds))} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_table(prefix: Path) -> str:
    rows = [json.loads(line) for line in prefix.with_suffix(".jsonl").read_text().splitlines() if line.strip()]
    n = sorted({r["eval_images"] for r in rows})
    text = (f"Scored on 'a [V] star <place>' for the {len(PLACES)} places (the base model on 'a star <place>') and "
            f"'a star'; {n} images per prompt, image k from seed {rows[0]['eval_seed']} + k, 20 steps, guidance 5; "
            f"mean [95% bootstrap interval over images]. The training seed is in each row. Device: the 2-core CPU, "
            f"shared with other jobs (train s is wall time under that load, 1 torch thread; it includes drawing "
            f"the class images). Written by `python -m bench recipes --recipes NAME ... [--seed S] --out "
            f"{prefix}` (appends a row per recipe; each row's command is in the .jsonl).\n\n" + table(rows))
    targets, seeds = targets_table(rows), seeds_table(rows)
    if targets:
        text += ("\nIssue 15's targets against the base row: (a) PLACE and PLACE in space within 10 points of the "
                 "base model's, (b) DINO and CLIP-I gains at least 5 half-widths of the row's 95% interval.\n\n"
                 + targets)
    if seeds:
        text += "\nRecipes run with several training seeds, mean ± std over the seeds:\n\n" + seeds
    prefix.with_suffix(".md").write_text(text)
    return text


def space_reference(scorer, n: int = 24, seed: int = 0) -> dict[str, dict[str, float]]:
    """What DINO / CLIP-I against the subject pictures would be for ideal samples of one place: rendered
    scenes of the subject itself in that place, and of the base world's plain stars there."""
    import random

    rng = random.Random(seed)
    r = scorer.images(scenes.subject_images(5))
    out = {}
    for place in ("in space", "on the beach"):
        for name, color, texture in (("the subject", "orange", "striped"), ("plain stars", None, None)):
            ims = [scenes.render(scenes.Scene(scenes.SUBJECT_CLASS, color or rng.choice(sorted(scenes.COLORS)),
                                              "big", place, rng.uniform(0.42, 0.58), rng.uniform(0.45, 0.55),
                                              rng.uniform(-15, 15), texture), seed=rng.randrange(1 << 30))
                   for _ in range(n)]
            e = scorer.images(ims)
            out[f"{name} {place}"] = {"DINO": float((e["dino"] @ r["dino"].T).mean()),
                                      "CLIP-I": float((e["clip"] @ r["clip"].T).mean())}
    return out


DRIFT_PROMPTS = ("a orange star on the beach", "a orange star in space", "a orange circle in the grass")


def word_drift(scorer, models: dict, n: int = 16, seed: int = 10_000) -> dict[str, dict[str, float]]:
    """DINO against the subject pictures of prompts that use the initializer word ("orange") without the
    identifier, for each model: has the word itself drifted toward the subject?"""
    from trainer.methods.outputs import load_pipeline
    from trainer.world.evaluate import generate
    from trainer.options.sampling import GUIDANCE, SAMPLE_STEPS

    real = scorer.images(scenes.subject_images(5))["dino"]
    out = {}
    for name, model in models.items():
        samples = generate(load_pipeline(model, "cpu"), list(DRIFT_PROMPTS), n, SAMPLE_STEPS, GUIDANCE, seed)
        out[name] = {p: float((scorer.images(samples[p])["dino"] @ real.T).mean()) for p in DRIFT_PROMPTS}
    return out


def learned_row(model, base, word: str = "orange", top: int = 3) -> str:
    """Where the fine-tuned model's learned token row went: its cosine to `word`'s row in the base text
    encoder, how far it moved (in `word`'s norms), and the vocabulary's nearest rows."""
    from safetensors.torch import load_file
    from transformers import CLIPTextModel, CLIPTokenizer

    from trainer.formats.embedding_files import DIFFUSERS_FILE

    tok = CLIPTokenizer.from_pretrained(Path(base) / "tokenizer")
    table = CLIPTextModel.from_pretrained(Path(base) / "text_encoder").get_input_embeddings().weight.detach()
    (name, row), = load_file(Path(model) / DIFFUSERS_FILE).items()
    row, start = row.float().flatten(), table[tok.convert_tokens_to_ids(word + "</w>")]
    sims = torch.nn.functional.cosine_similarity(table, row[None], dim=1).topk(top)
    near = ", ".join(f"{tok.convert_ids_to_tokens(int(i)).removesuffix('</w>')!r} {float(v):.2f}"
                     for v, i in zip(sims.values, sims.indices))
    return (f"The learned row {name}: cosine {float(torch.nn.functional.cosine_similarity(row, start, dim=0)):.3f} "
            f"to {word!r}, moved {float((row - start).norm() / start.norm()):.2f}x its norm; nearest rows: {near}.")


def main(argv: list[str] | None = None) -> int:
    from trainer.world import demo
    from trainer.methods.outputs import load_pipeline
    from trainer.world.evaluate import evaluate
    from trainer.world.metrics import Scorer
    from trainer.world.tiny import MODEL_DIR

    p = argparse.ArgumentParser(prog="python -m bench recipes", description=__doc__.split("\n")[0])
    p.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES) + ["base"])
    p.add_argument("--seed", type=int, default=0, help="training seed")
    p.add_argument("--eval_images", type=int, default=24)
    p.add_argument("--eval_seed", type=int, default=10_000)
    p.add_argument("--work", default="recipe-runs")
    p.add_argument("--out", default="bench/results/demo/recipes", help="prefix of the .jsonl and .md")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--model", default=None, help="base model folder (default: the shipped tiny model)")
    p.add_argument("--table_only", action="store_true", help="only rewrite the .md from the .jsonl")
    p.add_argument("--reference", metavar="MD", help="only write DINO / CLIP-I of rendered scenes of the subject "
                   "and of plain stars, in space and on the beach, to this markdown file")
    p.add_argument("--word_drift", metavar="MODEL", help="only write DINO of 'a orange star ...' samples (no "
                   "identifier) of the base model and of MODEL (a pivotal run from 'orange') to --reference's file")
    a = p.parse_args(argv)
    if a.model or a.word_drift:  # before anything is written or drawn
        from trainer.families import check_model_folder

        for folder in filter(None, (a.model, a.word_drift)):
            check_model_folder(Path(folder))
    if a.word_drift:
        d = word_drift(Scorer(), {"base model": Path(a.model) if a.model else MODEL_DIR, "fine-tuned": a.word_drift})
        text = ("DINO against the 5 subject pictures of 16 samples (seeds 10000 + k, 20 steps, guidance 5) of prompts "
                "with the initializer word and no identifier. Written by `python -m bench recipes " +
                " ".join(sys.argv[1:] if argv is None else argv) + "`.\n\n| prompt | " + " | ".join(d) + " |\n|---|" +
                "---:|" * len(d) + "\n" + "".join(f"| {q} | " + " | ".join(f"{d[m][q]:.3f}" for m in d) + " |\n"
                                                 for q in DRIFT_PROMPTS))
        from trainer.formats.embedding_files import DIFFUSERS_FILE

        if (Path(a.word_drift) / DIFFUSERS_FILE).is_file():
            text += "\n" + learned_row(a.word_drift, Path(a.model) if a.model else MODEL_DIR) + "\n"
        Path(a.reference or "word-drift.md").write_text(text)
        print(text)
        return 0
    if a.table_only:
        print(write_table(Path(a.out)))
        return 0
    if a.reference:
        ref = space_reference(Scorer())
        text = ("DINO / CLIP-I against the 5 subject pictures (the recipe table's per-prompt 'DINO in space') of "
                "rendered scenes, 24 each (big stars, random position, angle and background; plain stars of random "
                "colours): what a sample that shows the subject there, or a plain star there, scores. Written by "
                "`python -m bench recipes " + " ".join(sys.argv[1:] if argv is None else argv) + "`.\n\n"
                "| rendered | DINO | CLIP-I |\n|---|---:|---:|\n" +
                "".join(f"| {k} | {v['DINO']:.3f} | {v['CLIP-I']:.3f} |\n" for k, v in ref.items()))
        Path(a.reference).write_text(text)
        print(text)
        return 0
    if a.threads:
        torch.set_num_threads(a.threads)
    model = Path(a.model) if a.model else MODEL_DIR
    work = Path(a.work)
    subject = demo.write_subject(work / "subject", captions=True)
    plain = demo.write_subject(work / "subject-plain", captions=False)
    real = scenes.subject_images(5)
    scorer = Scorer()
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    kw = dict(num_images=a.eval_images, seed=a.eval_seed)
    for name in a.recipes:
        t0 = time.time()
        if name == "base":
            pipe, base, what, train_s = load_pipeline(model, "cpu"), True, "the base model, prompts without [V]", 0
        else:
            what, rkw, extra, captions = RECIPES[name]
            rkw = {"prior": True, "steps": demo.STEPS, "lr": demo.LEARNING_RATE,
                   "num_class_images": demo.NUM_CLASS_IMAGES, "seed": a.seed, "device": "cpu", **rkw}
            places = rkw.pop("class_places", None)  # "places": the base model's "a star <place>", captioned
            run_dir = work / f"{name}-s{a.seed}"
            class_dir = work / f"class-{places + '-' if places else ''}{rkw['num_class_images']}"
            if places:
                demo.draw_class_images(demo.train_args(model, subject, run_dir, class_dir=class_dir, extra=extra,
                                                       **rkw), "cpu", places)
            trained = demo.dreambooth(model, subject if captions else plain, run_dir, class_dir=class_dir,
                                      extra=extra, **rkw)
            train_s = time.time() - t0
            pipe, base = load_pipeline(trained, "cpu"), False
        word = demo.IDENTIFIER if base else demo.prompt_word(extra)
        ev = evaluate(pipe, scorer, real, word, scenes.SUBJECT_CLASS, templates=TEMPLATES,
                      with_identifier=not base, **kw)
        from trainer.world.demo import grid

        grid([(name, ev.samples)]).save(work / f"{name}-s{a.seed}.png")
        row = {"recipe": name, "what": what, "seed": a.seed, "metrics": ev.metrics, "intervals": ev.intervals,
               "place_by_prompt": ev.place_by_prompt, "dino_by_prompt": ev.by_prompt.get("DINO"),
               "clipi_by_prompt": ev.by_prompt.get("CLIP-I"), "train_s": round(train_s, 1),
               "total_s": round(time.time() - t0, 1),
               "eval_images": a.eval_images, "eval_seed": a.eval_seed, "device": platform.processor() or "cpu",
               "threads": torch.get_num_threads(), "torch": torch.__version__,
               "command": "python -m bench recipes " + " ".join(sys.argv[1:] if argv is None else argv)}
        with open(out.with_suffix(".jsonl"), "a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)
        write_table(out)
    return 0


if __name__ == "__main__":
    from trainer.errors import UserError

    try:
        raise SystemExit(main())
    except UserError as e:  # one line, exit 2
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)
