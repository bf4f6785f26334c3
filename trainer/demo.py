"""`dbtrain demo`: DreamBooth on the built-in tiny model and subject, measured before and after.

The run is an ordinary `dbtrain train` (the same loop, options and files as for a real SD
model); only its inputs are built in: the model `trainer/world/assets/tiny-world-sd`, the subject
(five pictures of an orange star with black stripes, a pattern the model never saw) and the
judge `trainer/world/assets/tiny-world-judge` that scores the result.

It goes in five phases, each printed with its time: base-model samples (written to
before.png at once), class images, training, samples of the trained model, scores. A demo
stopped at any point continues when the same command is run again: finished phases are
kept (the record is OUT/.dbtrain-demo.json), training resumes from its checkpoint.
"""
from __future__ import annotations

import contextlib
import json
import math
import time
from pathlib import Path

from .world import scenes
from .config import UserError
from .parsers import (BUILTIN_MODEL, DEFAULT_PROMPTS, LEARNING_RATE, NUM_CLASS_IMAGES, STEPS,  # noqa: F401
                      demo_parser)

IDENTIFIER = "sks"
RECORD = ".dbtrain-demo.json"
PHASES = 5


def check_out(out: Path) -> None:
    """A new or empty folder (what the ablation script needs)."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out} already exists and is not empty; the demo never writes over anything: "
                        f"pass --out NEW_FOLDER")


def open_out(out: Path, recipe: dict) -> bool:
    """True if `out` holds an unfinished demo of this recipe to continue; False if it is new or
    empty; a UserError for anything else (nothing is ever written over)."""
    if not out.exists():
        from .outdir import check_creatable

        check_creatable(out, "--out")
        return False
    if not out.is_dir():
        raise UserError(f"--out {out} is a file; pass a new folder")
    if not any(out.iterdir()):
        return False
    try:
        rec = json.loads((out / RECORD).read_text())
    except (OSError, ValueError):
        raise UserError(f"{out} already exists and is not empty (and is not a demo); the demo never writes over "
                        f"anything: pass --out NEW_FOLDER") from None
    if rec.get("finished"):
        raise UserError(f"{out} holds a finished demo (before_after.png, metrics.md); pass --out NEW_FOLDER "
                        f"to run it again")
    if rec.get("recipe") != recipe:
        theirs = rec.get("recipe", {})
        diff = ", ".join(f"{k} {theirs.get(k)} (now {v})" for k, v in recipe.items() if theirs.get(k) != v)
        raise UserError(f"{out} holds an unfinished demo with other options: {diff}; rerun it with its options "
                        f"to continue it, or pass --out NEW_FOLDER")
    return True


def write_subject(folder: Path, seed: int = 0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for k, im in enumerate(scenes.subject_images(5, seed=seed)):
        im.save(folder / f"subject-{k}.png")
    return folder


def _on_gpu(device) -> bool:
    import torch

    return torch.cuda.is_available() and (device is None or str(device).startswith("cuda"))


def train_args(model, subject: Path, out: Path, *, prior: bool, steps: int, lr: float, num_class_images: int,
               seed: int, device, sample_steps: int = 20) -> list[str]:
    """The `dbtrain train` command line of the demo (printed, so it can be rerun by hand)."""
    args = ["--pretrained_model_name_or_path", str(model), "--instance_data_dir", str(subject),
            "--instance_prompt", f"a [V] {scenes.SUBJECT_CLASS}", "--identifier", IDENTIFIER,
            "--output_dir", str(out / "model"), "--resolution", str(scenes.SIZE), "--random_flip",
            "--train_batch_size", "2", "--max_train_steps", str(steps), "--learning_rate", str(lr),
            "--lr_warmup_steps", "0", "--checkpointing_steps", str(steps), "--log_every", "50", "--seed", str(seed)]
    if prior:
        args += ["--with_prior_preservation", "--class_prompt", f"a {scenes.SUBJECT_CLASS}",
                 "--class_data_dir", str(out / "class-images"), "--num_class_images", str(num_class_images),
                 "--class_inference_steps", str(sample_steps), "--sample_batch_size", "25"]
    if device:
        args += ["--device", str(device)]
    if not _on_gpu(device):
        # On a CPU, adamw8bit's vectorised step takes 2.6x torch AdamW's time on this UNet (README,
        # Python API); the demo shows the method, and our kernels are for GPUs.
        args += ["--optimizer", "adamw"]
    return args


def dreambooth(model, subject: Path, out: Path, *, resume: bool = False, **kw) -> Path:
    from . import config, loop

    args = train_args(model, subject, out, **kw) + (["--resume_from_checkpoint", "latest"] if resume else [])
    print("dbtrain train " + " ".join(a if " " not in a else repr(a) for a in args), flush=True)
    return loop.train(config.parse(args))


def score_model(model, scorer, real, device, **kw):
    """(metrics, samples) of a model on the demo subject's prompts (trainer.evaluate.evaluate)."""
    from .evaluate import evaluate, load_pipeline

    return evaluate(load_pipeline(model, device), scorer, real, IDENTIFIER, scenes.SUBJECT_CLASS, **kw)


def grid(columns: list[tuple[str, dict]], per_row: int = 4, scale: int = 2):
    """Rows: prompts; one block of `per_row` samples per (title, {prompt: images}) column."""
    from PIL import Image, ImageDraw

    per_row = min([per_row] + [len(v) for _, samples in columns for v in samples.values()])
    s = scenes.SIZE * scale
    label_h, gap = 14, 8
    rows = list(columns[0][1])
    block = per_row * s + gap
    canvas = Image.new("RGB", (len(columns) * block - gap, label_h + len(rows) * (label_h + s)), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for c, (title, samples) in enumerate(columns):
        draw.text((c * block + 2, 1), title, fill=(0, 0, 0))
        for r, prompt in enumerate(rows):
            y = label_h + r * (label_h + s)
            if c == 0:
                draw.text((2, y + 1), prompt, fill=(0, 0, 0))
            for k in range(per_row):
                canvas.paste(samples[prompt][k].resize((s, s), Image.NEAREST), (c * block + k * s, y + label_h))
    return canvas


def before_after_grid(before: dict, after: dict, per_row: int = 4, scale: int = 2):
    """Rows: prompts. Left: the base model; right: after DreamBooth (same seeds)."""
    return grid([("before (base model)", before), ("after DreamBooth", after)], per_row, scale)


@contextlib.contextmanager
def phase(k: int, what: str, times: dict):
    print(f"[{k}/{PHASES}] {what} ...", flush=True)
    t0 = time.time()
    yield
    times[what] = round(time.time() - t0, 1)
    print(f"[{k}/{PHASES}] {what}: {times[what]:.1f} s", flush=True)


def _save_samples(folder: Path, samples: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, images in enumerate(samples.values()):
        for k, im in enumerate(images):
            im.save(folder / f"{i}-{k:02d}.png")
    (folder / "prompts.json").write_text(json.dumps(list(samples)))  # written last: the set is complete


def _load_samples(folder: Path, n: int) -> dict | None:
    from .data import open_rgb

    try:
        prompts = json.loads((folder / "prompts.json").read_text())
        return {p: [open_rgb(folder / f"{i}-{k:02d}.png") for k in range(n)] for i, p in enumerate(prompts)}
    except (OSError, ValueError, UserError):
        return None


def _trained(model_dir: Path) -> bool:
    from .outdir import read_marker

    return bool((read_marker(model_dir) or {}).get("finished")) and (model_dir / "model_index.json").is_file()


def run(argv: list[str]) -> dict:
    a = demo_parser().parse_args(argv)
    if a.steps < 1 or a.eval_images < 2 or a.num_class_images < 1 or a.sample_steps < 1:
        raise UserError("--steps, --num_class_images and --sample_steps must be >= 1 and --eval_images >= 2")
    if not math.isfinite(a.learning_rate) or a.learning_rate <= 0:
        raise UserError(f"--learning_rate must be a positive finite number, got {a.learning_rate}")
    from .models import check_model_folder

    model = Path(a.model) if a.model else BUILTIN_MODEL
    check_model_folder(model)
    out = Path(a.out)
    recipe = {"model": str(model.resolve()), "steps": a.steps, "learning_rate": a.learning_rate,
              "num_class_images": a.num_class_images, "prior_preservation": not a.no_prior_preservation,
              "eval_images": a.eval_images, "sample_steps": a.sample_steps, "seed": a.seed}
    resuming = open_out(out, recipe)

    import torch

    from . import config
    from .evaluate import generate, load_pipeline, subject_prompts
    from .metrics import Scorer, markdown_table, score
    from .prior import generate_class_images

    t_start, times = time.time(), {}
    out.mkdir(parents=True, exist_ok=True)
    (out / RECORD).write_text(json.dumps({"recipe": recipe, "finished": False}, indent=1))
    print(f"{'continuing the demo in' if resuming else 'demo in'} {out}", flush=True)
    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    subject = write_subject(out / "subject")
    pairs, class_prompt = subject_prompts(DEFAULT_PROMPTS, IDENTIFIER, scenes.SUBJECT_CLASS)
    prompts = list(pairs) + [class_prompt]
    sample_kw = {"n": a.eval_images, "steps": a.sample_steps, "guidance": 5.0, "seed": 10_000 + a.seed}
    prior = not a.no_prior_preservation

    with phase(1, "base model samples", times):
        before = _load_samples(out / "before", a.eval_images)
        if before is None:
            before = generate(load_pipeline(model, device), prompts, **sample_kw)
            _save_samples(out / "before", before)
        grid([("base model", before)]).save(out / "before.png")
        print(f"wrote {out / 'before.png'}", flush=True)
    recipe_kw = dict(prior=prior, steps=a.steps, lr=a.learning_rate, num_class_images=a.num_class_images,
                     seed=a.seed, device=a.device, sample_steps=a.sample_steps)
    args = train_args(model, subject, out, **recipe_kw)
    with phase(2, "class images", times):
        if prior:
            made = generate_class_images(config.parse(args), device, torch.float32)
            print(f"{made} class image(s) drawn by the base model, {a.num_class_images - made} already there",
                  flush=True)
    with phase(3, "training", times):
        if _trained(out / "model"):
            print(f"{out / 'model'} is trained already", flush=True)
            trained = out / "model"
        else:
            trained = dreambooth(model, subject, out, resume=(out / "model").exists(), **recipe_kw)
    with phase(4, "fine-tuned model samples", times):
        after = generate(load_pipeline(trained, device), prompts, **sample_kw)
        before_after_grid(before, after).save(out / "before_after.png")
    with phase(5, "scores", times):
        from .data import open_rgb

        real = [open_rgb(p) for p in sorted(subject.glob("*.png"))]
        scorer = Scorer(a.judge, device=device)
        m_before, m_after = (score(scorer, real, {p: s[p] for p in pairs}, s[class_prompt], pairs)
                             for s in (before, after))
    table = markdown_table({"base model": m_before, "after DreamBooth": m_after})
    (out / "metrics.md").write_text(table + "\n")
    (out / "metrics.json").write_text(json.dumps({"before": m_before, "after": m_after, "steps": a.steps,
                                                  "prior_preservation": prior, "seed": a.seed,
                                                  "phase_seconds": times}, indent=1))
    (out / RECORD).write_text(json.dumps({"recipe": recipe, "finished": True}, indent=1))
    print(table)
    print(f"DINO/CLIP-I: subject fidelity (higher is better); CLIP-T: prompt fidelity; PRES: 'a "
          f"{scenes.SUBJECT_CLASS}' samples that look like the subject (lower is better); DIV: diversity")
    print(f"wrote {out / 'before_after.png'}, {out / 'metrics.md'} and the model {trained} "
          f"in {time.time() - t_start:.0f} s")
    return {"before": m_before, "after": m_after}
