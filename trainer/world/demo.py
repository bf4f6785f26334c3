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

from trainer.errors import UserError
from trainer.options.sampling import (BUILTIN_MODEL, DEFAULT_PROMPTS, DEMO_CLASS_IMAGES, DEMO_EXTRA_FLAGS, EVAL_SEED,
                                      GUIDANCE, LEARNING_RATE, NUM_CLASS_IMAGES, SAMPLE_STEPS, STEPS)
from trainer.world import scenes

IDENTIFIER = "sks"
# the recipe's defaults (trainer.options.sampling), also read as demo.STEPS etc. by the ablation and the recipe search
RECIPE_DEFAULTS = {"steps": STEPS, "lr": LEARNING_RATE, "num_class_images": NUM_CLASS_IMAGES}
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
        from trainer.formats.outdir import check_creatable

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


def write_subject(folder: Path, seed: int = 0, captions: bool = False) -> Path:
    """The five subject pictures, and with captions=True beside each its caption naming the place it
    shows ("a [V] star on the beach": subject-0.txt beside subject-0.png, for --caption_extension .txt),
    so the identifier binds to the star and each place stays with its own word."""
    folder.mkdir(parents=True, exist_ok=True)
    for k, im in enumerate(scenes.subject_images(5, seed=seed)):
        im.save(folder / f"subject-{k}.png")
        if captions:
            (folder / f"subject-{k}.txt").write_text(f"a [V] {scenes.SUBJECT_CLASS} {scenes.subject_place(k)}\n")
    return folder


def place_class_prompts(plain: int = 0) -> list[str]:
    """The place-diverse class prompts: "a star <place>" for every place of the world (the unseen one too),
    so the class term keeps "a star in space" itself, not only "a star"; then `plain` times "a star"."""
    from trainer.world.place import PLACES

    return [f"a {scenes.SUBJECT_CLASS} {p}" for p in PLACES] + [f"a {scenes.SUBJECT_CLASS}"] * plain


# DEMO_CLASS_IMAGES' kinds -> how many "a star" prompts follow the 6 places' (prompt i % len draws image i)
CLASS_KINDS = {"places": 0, "places+plain": 1, "places+halfplain": 6}


def class_image_prompts(kind: str | None) -> list[str] | None:
    """The prompts the class images are drawn from (DEMO_CLASS_IMAGES): None = --class_prompt."""
    if kind is not None and kind not in CLASS_KINDS:
        raise ValueError(f"class images {kind!r}: None or one of {', '.join(CLASS_KINDS)}")
    return place_class_prompts(CLASS_KINDS[kind]) if kind else None


def _in_turn(prompts: list[str]) -> str:
    """'a star on the beach' / ... / 'a star' (x6): each prompt once, with how often it comes in the cycle."""
    return " / ".join(repr(p) + (f" (x{prompts.count(p)})" if prompts.count(p) > 1 else "")
                      for p in dict.fromkeys(prompts))


def draw_class_images(args: list[str], device, kind: str | None = DEMO_CLASS_IMAGES) -> int:
    """The class images of a demo `dbtrain train` command line `args`, drawn by the base model before training
    (the missing ones; with `kind`, each with its caption file); returns how many were drawn."""
    import torch

    from trainer.core.class_images import generate_class_images
    from trainer.options import train as train_options

    return generate_class_images(train_options.parse(args), torch.device(device or "cpu"), torch.float32,
                                 prompts=class_image_prompts(kind))


def prompt_word(extra: tuple = DEMO_EXTRA_FLAGS) -> str:
    """The word that names the subject in prompts: the identifier, or with pivotal tuning
    (`--train_text_embedding`) the new token it makes of it, <identifier>."""
    return f"<{IDENTIFIER}>" if "--train_text_embedding" in extra else IDENTIFIER


def recipe_extras(model=None) -> dict:
    """The demo recipe's `dbtrain train` flags beyond train_args' own (DEMO_EXTRA_FLAGS). With `model`
    (a --model whose tokenizer splits the initializer word into pieces): without --initializer_token, so
    the new token starts from the identifier's embedding, and a note says so."""
    extra = tuple(DEMO_EXTRA_FLAGS)
    if model is not None and "--initializer_token" in extra:
        i = extra.index("--initializer_token")
        word = extra[i + 1]
        from transformers import CLIPTokenizer

        pieces = CLIPTokenizer.from_pretrained(Path(model) / "tokenizer").tokenize(word)
        if len(pieces) != 1:
            print(f"note: {model}'s tokenizer splits {word!r} into {len(pieces)} tokens; the new token starts from "
                  f"{IDENTIFIER!r} instead", flush=True)
            extra = extra[:i] + extra[i + 2:]
    return {"extra": extra}


def _on_gpu(device) -> bool:
    import torch

    return torch.cuda.is_available() and (device is None or str(device).startswith("cuda"))


def train_args(model, subject: Path, out: Path, *, prior: bool, steps: int, lr: float, num_class_images: int,
               seed: int, device, sample_steps: int = SAMPLE_STEPS, class_dir: Path | None = None,
               extra: tuple = (), class_noun: str = scenes.SUBJECT_CLASS, model_dir: Path | None = None) -> list[str]:
    """The `dbtrain train` command line of the demo (printed, so it can be rerun by hand); `extra`:
    more `dbtrain train` flags (the recipe search's levers); `class_noun`: another subject's class;
    `model_dir`: the trained model's folder (not given: OUT/model)."""
    args = ["--pretrained_model_name_or_path", str(model), "--instance_data_dir", str(subject),
            "--instance_prompt", f"a [V] {class_noun}", "--identifier", IDENTIFIER,
            "--output_dir", str(model_dir or out / "model"), "--resolution", str(scenes.SIZE), "--random_flip",
            "--train_batch_size", "2", "--max_train_steps", str(steps), "--learning_rate", str(lr),
            "--lr_warmup_steps", "0", "--checkpointing_steps", str(steps), "--log_every", "50", "--seed", str(seed)]
    if prior:
        args += ["--with_prior_preservation", "--class_prompt", f"a {class_noun}",
                 "--class_data_dir", str(class_dir or out / "class-images"),
                 "--num_class_images", str(num_class_images),
                 "--class_inference_steps", str(sample_steps), "--sample_batch_size", "25"]
    args += list(extra)
    if device:
        args += ["--device", str(device)]
    if not _on_gpu(device):
        # On a CPU, adamw8bit's vectorised step takes 2.6x torch AdamW's time on this UNet (README,
        # Python API); the demo shows the method, and our kernels are for GPUs.
        args += ["--optimizer", "adamw"]
    return args


# ---------------------------------------------------------------- your own subject on the built-in model

OWN_PLACEHOLDERS = {"subject": "MY_PHOTOS", "class_noun": "CLASS", "word": "COLOUR", "out": "MY_RUN"}


def own_subject_args(subject, class_noun: str, word: str, out, *, model=BUILTIN_MODEL, device=None, steps: int = STEPS,
                     lr: float = LEARNING_RATE, num_class_images: int = NUM_CLASS_IMAGES, seed: int = 0) -> list[str]:
    """The demo's recipe as one `dbtrain train` command line for a user's own subject: pivotal tuning with the
    new token started from `word` (one word the model already draws like the subject, e.g. its colour: the
    demo's "orange"), the token at its own lr, a caption file beside each picture, prior preservation with the
    class images drawn from "a <class_noun>" by dbtrain train into OUT/class-images; the model in OUT/model."""
    extra = list(DEMO_EXTRA_FLAGS)
    if "--initializer_token" in extra:
        extra[extra.index("--initializer_token") + 1] = word
    return train_args(model, Path(subject), Path(out), prior=True, steps=steps, lr=lr,
                      num_class_images=num_class_images, seed=seed, device=device, extra=tuple(extra),
                      class_noun=class_noun)


def own_subject_hint(model=BUILTIN_MODEL, device=None) -> str:
    """The demo's last lines: its recipe as the command that trains a user's own subject on the same model."""
    ph = OWN_PLACEHOLDERS
    return (f"your own subject on this model: this recipe is the one that learns one here (docs/world.md, \"Your own "
            f"subject\"). Put 3-5 pictures in {ph['subject']}/, each with a caption file naming its place (p0.png + "
            f"p0.txt = \"a [V] {ph['class_noun']} on the beach\"); {ph['class_noun']} = the class noun, "
            f"{ph['word']} = one word the model already draws like the subject (its colour, as \"orange\" here); "
            f"prompt it as \"a <{IDENTIFIER}> {ph['class_noun']} in space\":\n  " + own_subject_command(model, device))


def own_subject_command(model=BUILTIN_MODEL, device=None) -> str:
    """`own_subject_args` as a command to copy, with placeholders for the user's photos, class noun, start word
    and run folder (docs/world.md shows it with the model path relative to the repository)."""
    import shlex

    ph = OWN_PLACEHOLDERS
    args = own_subject_args(ph["subject"], ph["class_noun"], ph["word"], ph["out"], model=model, device=device)
    return "dbtrain train " + shlex.join(args)


def dreambooth(model, subject: Path, out: Path, *, resume: bool = False, **kw) -> Path:
    from trainer.core import loop
    from trainer.memory import estimate
    from trainer.options import train as train_options

    args = train_args(model, subject, out, **kw) + (["--resume_from_checkpoint", "latest"] if resume else [])
    print("dbtrain train " + " ".join(a if " " not in a else repr(a) for a in args), flush=True)
    return loop.train(train_options.parse(args), preflight=estimate.preflight_of_run,
                      log_estimate=estimate.log_fields_of_run)


def score_model(model, scorer, real, device, **kw):
    """trainer.world.evaluate.Evaluation of a model on the demo subject's prompts."""
    from trainer.methods.outputs import load_pipeline
    from trainer.world.evaluate import evaluate

    return evaluate(load_pipeline(model, device), scorer, real, prompt_word(), scenes.SUBJECT_CLASS, **kw)


CELL = 128  # pixels per sample in the pictures (the 64 px samples upscaled, nearest: no invented detail)


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: one small bitmap font
        return ImageFont.load_default()


def grid(columns: list[tuple[str, dict]], per_row: int = 4, cell: int = CELL, row_labels: dict | None = None):
    """Rows: prompts (of the first column; column c's row r is its r-th prompt); one block of `per_row`
    samples per (title, {prompt: images}) column. Each row is labelled above its images."""
    from PIL import Image, ImageDraw

    per_row = min([per_row] + [len(v) for _, samples in columns for v in samples.values()])
    head_font, row_font = _font(20), _font(16)
    head_h, label_h, gap, pad = 30, 24, 16, 8
    n_rows = len(columns[0][1])
    block = per_row * cell + gap
    canvas = Image.new("RGB", (2 * pad + len(columns) * block - gap, head_h + n_rows * (label_h + cell + pad)),
                       (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for c, (title, samples) in enumerate(columns):
        draw.text((pad + c * block, 4), title, fill=(0, 0, 0), font=head_font)
        for r, (prompt, images) in enumerate(samples.items()):
            y = head_h + r * (label_h + cell + pad)
            label = (row_labels or {}).get(r, prompt) if c == 0 else None
            if label:
                draw.text((pad, y + 2), label, fill=(40, 40, 40), font=row_font)
            for k in range(per_row):
                canvas.paste(images[k].resize((cell, cell), Image.NEAREST), (pad + c * block + k * cell, y + label_h))
    return canvas


def row_label(prompt: str) -> str:
    """'in space: never in the subject's pictures' / 'on the beach: in 1 of the 5 pictures' / 'a star'."""
    from trainer.world.place import place_of

    place = place_of(prompt)
    if place is None:
        return f'"{prompt}" (the class prior)'
    shown = sum(scenes.subject_place(k) == place for k in range(5))
    return f"{place}: " + (f"in {shown} of the 5 subject pictures" if shown else "NEVER in the subject's pictures")


def before_after_grid(before: dict, after: dict, per_row: int = 4, cell: int = CELL):
    """Rows: places, then the class prompt. Left: the base model on the prompt without the identifier;
    right: after DreamBooth with it (same seeds)."""
    labels = {r: row_label(p) for r, p in enumerate(after)}
    return grid([(f'before: base model, "a {scenes.SUBJECT_CLASS} <place>"', before),
                 (f'after DreamBooth: "a {prompt_word()} {scenes.SUBJECT_CLASS} <place>"', after)],
                per_row, cell, labels)


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
    from trainer.core.images import open_rgb

    try:
        prompts = json.loads((folder / "prompts.json").read_text())
        return {p: [open_rgb(folder / f"{i}-{k:02d}.png") for k in range(n)] for i, p in enumerate(prompts)}
    except (OSError, ValueError, UserError):
        return None


def _trained(model_dir: Path) -> bool:
    from trainer.formats.outdir import read_marker

    return bool((read_marker(model_dir) or {}).get("finished")) and (model_dir / "model_index.json").is_file()


def run(a) -> dict:
    """`dbtrain demo` of a DemoOptions (trainer.options.sampling)."""
    if a.steps < 1 or a.eval_images < 2 or a.num_class_images < 1 or a.sample_steps < 1:
        raise UserError("--steps, --num_class_images and --sample_steps must be >= 1 and --eval_images >= 2")
    if not math.isfinite(a.learning_rate) or a.learning_rate <= 0:
        raise UserError(f"--learning_rate must be a positive finite number, got {a.learning_rate}")
    from trainer.families import check_model_folder

    model = Path(a.model) if a.model else BUILTIN_MODEL
    check_model_folder(model)
    out = Path(a.out)
    recipe = {"model": str(model.resolve()), "steps": a.steps, "learning_rate": a.learning_rate,
              "num_class_images": a.num_class_images, "prior_preservation": not a.no_prior_preservation,
              "eval_images": a.eval_images, "sample_steps": a.sample_steps, "seed": a.seed,
              "class_images": DEMO_CLASS_IMAGES, "train_flags": list(DEMO_EXTRA_FLAGS)}
    resuming = open_out(out, recipe)

    import torch

    from trainer.methods.outputs import load_pipeline
    from trainer.world.evaluate import generate, subject_prompts
    from trainer.world.metrics import Scorer, markdown_table, score

    t_start, times = time.time(), {}
    out.mkdir(parents=True, exist_ok=True)
    (out / RECORD).write_text(json.dumps({"recipe": recipe, "finished": False}, indent=1))
    print(f"{'continuing the demo in' if resuming else 'demo in'} {out}", flush=True)
    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    subject = write_subject(out / "subject", captions=True)
    word = prompt_word()
    pairs, class_prompt = subject_prompts(DEFAULT_PROMPTS, word, scenes.SUBJECT_CLASS)
    # the base model is the reference on the prompts without the identifier ("a star in space")
    base_prompts, prompts = list(pairs.values()) + [class_prompt], list(pairs) + [class_prompt]
    sample_kw = {"n": a.eval_images, "steps": a.sample_steps, "guidance": GUIDANCE, "seed": EVAL_SEED + a.seed}
    prior = not a.no_prior_preservation

    with phase(1, "base model samples", times):
        before = _load_samples(out / "before", a.eval_images)
        if before is None or list(before) != base_prompts:
            before = generate(load_pipeline(model, device), base_prompts, **sample_kw)
            _save_samples(out / "before", before)
        grid([(f"base model (seeds {sample_kw['seed']}-{sample_kw['seed'] + 3})", before)],
             row_labels={r: f'"{p}"' for r, p in enumerate(before)}).save(out / "before.png")
        print(f"wrote {out / 'before.png'}", flush=True)
    recipe_kw = dict(prior=prior, steps=a.steps, lr=a.learning_rate, num_class_images=a.num_class_images,
                     seed=a.seed, device=a.device, sample_steps=a.sample_steps, **recipe_extras(model))
    args = train_args(model, subject, out, **recipe_kw)
    with phase(2, "class images", times):
        if prior:
            made = draw_class_images(args, device)
            source = (f"from {_in_turn(class_image_prompts(DEMO_CLASS_IMAGES))} in turn, each with its caption "
                      f"file" if DEMO_CLASS_IMAGES else f"from 'a {scenes.SUBJECT_CLASS}'")
            print(f"{made} class image(s) drawn by the base model {source}; {a.num_class_images - made} already "
                  f"there", flush=True)
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
        from trainer.core.images import open_rgb

        real = [open_rgb(p) for p in sorted(subject.glob("*.png"))]
        scorer = Scorer(a.judge, device=device)
        clean = {p: p for p in pairs.values()}
        m_before, ci_before = score(scorer, real, {p: before[p] for p in clean}, before[class_prompt], clean,
                                    scenes.SUBJECT_CLASS, intervals=True)
        m_after, ci_after = score(scorer, real, {p: after[p] for p in pairs}, after[class_prompt], pairs,
                                  scenes.SUBJECT_CLASS, intervals=True)
    names = (f'base model ("a {scenes.SUBJECT_CLASS} <place>")', f'after DreamBooth ("a {word} '
             f'{scenes.SUBJECT_CLASS} <place>")')
    table = markdown_table(dict(zip(names, (m_before, m_after))), intervals=dict(zip(names, (ci_before, ci_after))))
    note = (f"mean [95% bootstrap interval over images]; {a.eval_images} images per prompt, image k from seed "
            f"{sample_kw['seed']} + k; {a.sample_steps} steps, guidance {GUIDANCE}; prompts: "
            + "; ".join(prompts))
    (out / "metrics.md").write_text(table + "\n\n" + note + "\n")
    (out / "metrics.json").write_text(json.dumps({
        "before": m_before, "after": m_after, "before_intervals": ci_before, "after_intervals": ci_after,
        "before_prompts": base_prompts, "after_prompts": prompts, "steps": a.steps, "learning_rate": a.learning_rate,
        "prior_preservation": prior, "class_images": DEMO_CLASS_IMAGES, "train_flags": list(recipe_kw["extra"]),
        "seed": a.seed, "sample_seed": sample_kw["seed"], "eval_images": a.eval_images,
        "sample_steps": a.sample_steps, "guidance": GUIDANCE, "phase_seconds": times}, indent=1))
    (out / RECORD).write_text(json.dumps({"recipe": recipe, "finished": True}, indent=1))
    print(table)
    print(note)
    print(f"DINO/CLIP-I: subject fidelity (higher is better); CLIP-T: prompt fidelity; PLACE: samples showing the "
          f"place their prompt named (the base model's, without {word}, is the reference); PRES: 'a "
          f"{scenes.SUBJECT_CLASS}' samples that look like the subject (lower is better); DIV: diversity")
    print(f"wrote {out / 'before_after.png'}, {out / 'metrics.md'} and the model {trained} "
          f"in {time.time() - t_start:.0f} s")
    print(own_subject_hint(model, device), flush=True)
    return {"before": m_before, "after": m_after}
