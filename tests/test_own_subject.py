"""Your own subject on the built-in model (issue 34, item 6): the demo's recipe, as the command `dbtrain demo`
prints and docs/world.md shows, learns a subject that is not the demo's.

The subject: a purple cross with yellow dots (the base model never saw a pattern), its pictures placed as the
demo's. The command runs as printed, with COLOUR = "purple". The judge's DINO of the trained model on
"a <sks> cross <place>" must lie above its 95% interval of the base model on "a purple cross <place>", which is
what the model draws before the first step (the new token starts as "purple"): 0 steps, or lr 0, fail here.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from trainer import cli
from trainer.world import demo, scenes
from trainer.world.tiny import MODEL_DIR

SUBJECT = {"shape": "cross", "color": "purple", "texture": "dotted", "texture_color": "yellow"}
TEMPLATES = ("a {V} {C} on the beach", "a {V} {C} in the snow")
EVAL = {"templates": TEMPLATES, "num_images": 6, "seed": 10_000}
DOCS = Path(__file__).resolve().parents[1] / "docs" / "world.md"


def write_photos(folder: Path) -> list:
    """The user's pictures, each with its caption file naming its place (as the recipe asks)."""
    folder.mkdir(parents=True)
    images = scenes.object_images(**SUBJECT)
    for k, im in enumerate(images):
        im.save(folder / f"p{k}.png")
        (folder / f"p{k}.txt").write_text(f"a [V] {SUBJECT['shape']} {scenes.subject_place(k)}\n")
    return images


def test_the_recipe_learns_a_new_subject(tmp_path):
    from trainer.methods.outputs import load_pipeline
    from trainer.world.evaluate import evaluate
    from trainer.world.metrics import Scorer

    images = write_photos(tmp_path / "photos")
    args = demo.own_subject_args(tmp_path / "photos", SUBJECT["shape"], SUBJECT["color"], tmp_path / "run",
                                 device="cpu")
    assert cli.main(["train", *args]) == 0
    scorer, base = Scorer(), load_pipeline(MODEL_DIR, "cpu")
    start = evaluate(base, scorer, images, SUBJECT["color"], SUBJECT["shape"], **EVAL)  # = the model at step 0
    plain = evaluate(base, scorer, images, "<sks>", SUBJECT["shape"], with_identifier=False, **EVAL)
    after = evaluate(load_pipeline(tmp_path / "run" / "model", "cpu"), scorer, images, "<sks>", SUBJECT["shape"],
                     **EVAL)
    print({k: (e.metrics["DINO"], e.intervals["DINO"]) for k, e in (("plain", plain), ("start", start),
                                                                      ("after", after))})  # pytest -s
    assert after.intervals["DINO"][0] > max(start.intervals["DINO"][1], plain.intervals["DINO"][1])
    assert after.metrics["CLIP-I"] > start.metrics["CLIP-I"]


def test_the_docs_and_the_demo_show_the_command(tmp_path, capsys):
    doc = " ".join(DOCS.read_text().replace("\\\n", " ").split())  # the command's lines joined
    assert demo.own_subject_command(model="trainer/world/assets/tiny-world-sd", device="cpu") in doc
    rc = cli.main(["demo", "--out", str(tmp_path / "demo"), "--steps", "2", "--num_class_images", "2",
                   "--eval_images", "2", "--sample_steps", "2"])
    assert rc == 0
    tail = capsys.readouterr().out.strip().splitlines()[-1]
    assert tail.strip() == demo.own_subject_command(model=MODEL_DIR, device="cpu")
    assert "--initializer_token COLOUR" in tail and "--train_text_embedding" in tail


@pytest.mark.parametrize("word", ["orange", "purple"])
def test_the_command_is_the_demos_recipe(word, tmp_path):
    """The same flags as the demo's own `dbtrain train` line, the class noun and start word the user's."""
    from trainer.options.sampling import DEMO_EXTRA_FLAGS

    args = demo.own_subject_args(tmp_path / "p", "cross", word, tmp_path / "run", device="cpu")
    theirs = demo.train_args(MODEL_DIR, tmp_path / "p", tmp_path / "run", prior=True, steps=demo.STEPS,
                             lr=demo.LEARNING_RATE, num_class_images=demo.NUM_CLASS_IMAGES, seed=0, device="cpu",
                             extra=DEMO_EXTRA_FLAGS)
    swap = {"a [V] star": "a [V] cross", "a star": "a cross", "orange": word}
    assert args == [swap.get(a, a) for a in theirs]
