"""The built-in world: the shipped tiny model draws what it is told, the judge sees the subject,
DreamBooth on it really learns the subject, and prior preservation really limits the drift.

These fail if DreamBooth stops working: the runs go through the same `dbtrain train` code
as a real SD model, with fixed seeds, kept short for the CPU CI budget.
"""
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from cli_helpers import write_tiny_judge
from trainer import cli
from trainer.world import scenes
from trainer.world.tiny import JUDGE_DIR, MODEL_DIR

CONTEXT_PROMPTS = ("a {V} star on the beach", "a {V} star in the snow")


def folder_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**20


@pytest.fixture(scope="module")
def scorer():
    from trainer.world.metrics import Scorer

    return Scorer()


@pytest.fixture(scope="module")
def base_pipe():
    from trainer.methods.outputs import load_pipeline

    return load_pipeline(MODEL_DIR, "cpu")


def test_builtin_model_is_small_and_a_diffusers_folder():
    from diffusers import StableDiffusionPipeline

    assert folder_mb(MODEL_DIR) <= 20, folder_mb(MODEL_DIR)
    pipe = StableDiffusionPipeline.from_pretrained(MODEL_DIR)
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size
    tok = pipe.tokenizer
    for rare in ("sks", "zwx"):  # whole-word identifiers
        assert len(tok.tokenize(rare)) == 1


def test_builtin_model_draws_the_prompt(base_pipe, scorer):
    """'a red circle in the snow' gives red round things on snow, and the judge agrees it is that
    caption rather than other shape/colour/place combinations."""
    from trainer.world.evaluate import generate

    prompts = ["a red circle in the snow", "a blue square on the beach", "a yellow triangle in space"]
    samples = generate(base_pipe, prompts, 4, 20, 5.0, seed=0)
    red = np.stack([np.asarray(im, dtype=np.int32) for im in samples[prompts[0]]])
    r, g, b = red[..., 0], red[..., 1], red[..., 2]
    assert ((r > 150) & (g < 90) & (b < 90)).mean() > 0.04  # red object
    assert ((red[:, 40:].min(axis=-1) > 200)).mean() > 0.3  # white ground in the lower part
    cands = prompts + ["a green star in the grass", "a purple ring on the water", "a blue circle on a red table"]
    text = scorer.texts(cands)
    for k, p in enumerate(prompts):
        pick = (scorer.images(samples[p])["clip"] @ text.T).argmax(dim=1)
        assert (pick == k).float().mean() >= 0.5, (p, pick)


def test_judge_sees_the_subject_pattern(scorer):
    subject = scenes.subject_images(5)
    rng = random.Random(0)
    plain = [scenes.render(scenes.Scene("star", "orange", "big", c, 0.5, 0.5, rng.uniform(-15, 15)), seed=k)
             for k, c in enumerate(scenes.SUBJECT_CONTEXTS)]
    other = [im for im, _ in scenes.dataset(10, seed=5)]
    e = {k: scorer.images(v) for k, v in (("s", subject), ("p", plain), ("o", other))}
    n = len(subject)
    ss = (e["s"]["dino"] @ e["s"]["dino"].T)[~torch.eye(n, dtype=torch.bool)].mean()
    sp = (e["s"]["dino"] @ e["p"]["dino"].T).mean()
    so = (e["s"]["dino"] @ e["o"]["dino"].T).mean()
    assert ss > sp + 0.1 and sp > so, (ss, sp, so)  # the stripes matter, then the orange star
    text = scorer.texts(["a orange striped star", "a orange star", "a orange dotted star"])
    assert ((e["s"]["clip"] @ text.T).argmax(dim=1) == 0).all()


@pytest.fixture(scope="module")
def short_runs(tmp_path_factory, base_pipe, scorer):
    """Two short DreamBooth runs, with and without prior preservation, and the metrics."""
    from trainer.world import demo
    from trainer.methods.outputs import load_pipeline
    from trainer.world.evaluate import evaluate

    root = tmp_path_factory.mktemp("dreambooth")
    subject = demo.write_subject(root / "subject")
    real = scenes.subject_images(5)
    kw = {"templates": CONTEXT_PROMPTS, "num_images": 6, "seed": 7}
    out = {"base": evaluate(base_pipe, scorer, real, demo.IDENTIFIER, "star", **kw).metrics}
    for name, prior in (("prior", True), ("no_prior", False)):
        trained = demo.dreambooth(MODEL_DIR, subject, root / name, prior=prior, steps=150, lr=2e-4,
                                  num_class_images=20, seed=0, device="cpu")
        out[name] = evaluate(load_pipeline(trained, "cpu"), scorer, real, demo.IDENTIFIER, "star", **kw).metrics
        out[name + "_dir"] = trained
    print({k: v for k, v in out.items() if not k.endswith("_dir")})  # shown with pytest -s
    return out


def test_dreambooth_learns_the_subject(short_runs):
    base, tuned = short_runs["base"], short_runs["prior"]
    assert tuned["DINO"] > base["DINO"] + 0.15, (base, tuned)
    assert tuned["CLIP-I"] > base["CLIP-I"] + 0.1, (base, tuned)
    rec = json.loads((short_runs["prior_dir"] / "dreambooth.json").read_text())
    assert rec["identifier"] == "sks" and rec["class_noun"] == "star"


def test_prior_preservation_keeps_the_class_prior(short_runs):
    assert short_runs["prior"]["PRES"] < short_runs["no_prior"]["PRES"], short_runs


def test_eval_command_with_local_clip_and_dino_folders(tmp_path, capsys):
    subject = tmp_path / "subject"
    clip_dir, dino_dir = write_tiny_judge(tmp_path, MODEL_DIR / "tokenizer", 16)
    from trainer.world.demo import write_subject

    write_subject(subject)
    out = tmp_path / "eval"
    rc = cli.main(["eval", "--model", str(MODEL_DIR), "--instance_data_dir", str(subject), "--identifier", "sks",
                   "--class_noun", "star", "--num_images", "2", "--steps", "2", "--clip_model", str(clip_dir),
                   "--dino_model", str(dino_dir), "--out", str(out)])
    assert rc == 0
    rec = json.loads((out / "metrics.json").read_text())
    assert rec["embeddings"] == {"clip": str(clip_dir), "dino": str(dino_dir)}
    assert set(rec["metrics"]) == set(rec["intervals"]) == {"DINO", "CLIP-I", "CLIP-T", "PLACE", "PRES", "DIV"}
    assert all(np.isfinite(v) for v in rec["metrics"].values())
    assert all(lo <= hi for lo, hi in rec["intervals"].values())
    assert rec["reference"] is None
    assert "| DINO | CLIP-I | CLIP-T | PLACE | PRES | DIV |" in capsys.readouterr().out.replace(str(MODEL_DIR), "")


def test_eval_command_bad_input(tmp_path, capsys):
    subject = tmp_path / "subject"
    from trainer.world.demo import write_subject

    write_subject(subject)
    base = ["eval", "--model", str(MODEL_DIR), "--instance_data_dir", str(subject), "--num_images", "2"]
    assert cli.main(base) == 2  # the base model records no identifier
    assert "--identifier" in capsys.readouterr().err
    assert cli.main(base + ["--identifier", "sks", "--class_noun", "star", "--clip_model", str(tmp_path)]) == 2
    assert "not a local transformers model folder" in capsys.readouterr().err
    assert cli.main(["eval", "--model", str(tmp_path / "nope"), "--instance_data_dir", str(subject),
                     "--identifier", "sks", "--class_noun", "star"]) == 2


def test_demo_command_writes_grid_and_metrics_and_never_overwrites(tmp_path, capsys):
    from trainer.world import demo as demo_mod

    out = tmp_path / "demo"
    rc = cli.main(["demo", "--out", str(out), "--steps", "4", "--num_class_images", "4", "--eval_images", "2"])
    assert rc == 0
    from PIL import Image

    grid = Image.open(out / "before_after.png")
    # 2 samples a side (--eval_images 2) of at least 128 px, one row per prompt plus its label
    rows = len(rec_prompts := json.loads((out / "metrics.json").read_text())["after_prompts"])
    assert grid.width >= 2 * 2 * 128 and grid.height >= rows * 128
    assert rec_prompts[-1] == "a star" and any("in space" in p for p in rec_prompts)
    rec = json.loads((out / "metrics.json").read_text())
    assert set(rec["before"]) == set(rec["after"]) == {"DINO", "CLIP-I", "CLIP-T", "PLACE", "PRES", "DIV"}
    word = demo_mod.prompt_word()  # "<sks>": the demo's pivotal tuning makes a new token of the identifier
    assert all(word in p for p in rec["after_prompts"][:-1])
    assert rec["before_prompts"] == [p.replace(word + " ", "") for p in rec["after_prompts"]]  # base: without [V]
    if "--train_text_embedding" in rec["train_flags"]:
        assert (out / "model" / "learned_embeds.safetensors").is_file()
    assert set(rec["after_intervals"]) == set(rec["after"])
    assert rec["prior_preservation"] is True
    assert len(list((out / "class-images").glob("*.png"))) == 4
    # the recipe's per-image captions name each picture's place
    assert (out / "subject" / "subject-0.txt").read_text().strip() == f"a [V] star {scenes.subject_place(0)}"
    before = (out / "metrics.md").read_text()
    assert cli.main(["demo", "--out", str(out)]) == 2  # never writes over a previous demo
    assert "holds a finished demo" in capsys.readouterr().err
    assert (out / "metrics.md").read_text() == before


def test_textured_base_world_holds_out_the_subjects_pattern_on_its_class():
    """The base model's textured stage: patterns on every shape and in every place, stars with the other
    patterns, but never a striped star (the subject's own pairing); the judge's data keeps them."""
    drawn = scenes.scenes(3000, seed=5, p_texture=0.3, hold_out=True)
    textured = [s for s in drawn if s.texture]
    assert 0.25 < len(textured) / len(drawn) < 0.35
    assert scenes.HELD_OUT == (scenes.SUBJECT_CLASS, "striped")
    assert not [s for s in textured if (s.shape, s.texture) == scenes.HELD_OUT]
    assert {s.texture for s in textured if s.shape == scenes.SUBJECT_CLASS} == {"dotted", "checked"}
    assert {s.shape for s in textured if s.texture == "striped"} == set(scenes.SHAPES) - {scenes.SUBJECT_CLASS}
    assert {s.context for s in textured if s.texture == "striped"} == set(scenes.CONTEXTS)
    assert "striped" in {s.texture for s in scenes.scenes(3000, seed=5, p_texture=0.3) if s.shape == "star"}


def test_judge_load_and_pretrain_from_model_bad_folders_say_what_to_do(tmp_path, capsys):
    from trainer.errors import UserError
    from trainer.world import tiny
    from trainer.world.judge import Judge

    with pytest.raises(UserError, match="pretrain makes one"):
        Judge.load(tmp_path)
    assert tiny.main(["pretrain", "--work", str(tmp_path / "w"), "--from_model", str(tmp_path)]) == 2
    assert "no vae/config.json" in capsys.readouterr().err


def test_pretrain_script_end_to_end_in_miniature(tmp_path):
    """`python -m trainer.world.tiny pretrain` with a handful of steps: every stage runs and the result
    is a folder StableDiffusionPipeline loads and a judge that loads."""
    from diffusers import StableDiffusionPipeline

    from trainer.world import tiny
    from trainer.world.judge import Judge

    model, judge = tmp_path / "model", tmp_path / "judge"
    assert tiny.main(["pretrain", "--work", str(tmp_path / "work"), "--vae_steps", "2", "--unet_steps", "2",
                      "--unet2_steps", "2", "--unet3_steps", "2", "--unet4_steps", "2", "--judge_steps", "2",
                      "--images", "64", "--scenes", "64", "--dest", str(model), "--judge_dest", str(judge)]) == 0
    pipe = StableDiffusionPipeline.from_pretrained(model)
    image = pipe("a red circle in the snow", num_inference_steps=2, output_type="np").images[0]
    assert image.shape == (scenes.SIZE, scenes.SIZE, 3)
    assert Judge.load(judge).text_embeddings(["a red circle"]).shape == (1, 64)
    assert JUDGE_DIR != judge  # the shipped judge is untouched
    # the patterned stage alone, on top of a finished model folder
    work2 = tmp_path / "work2"
    assert tiny.main(["pretrain", "--work", str(work2), "--from_model", str(model), "--stages", "unet4",
                      "--unet4_steps", "2", "--scenes", "64"]) == 0
    assert (work2 / "unet4" / "unet" / "config.json").is_file() and (work2 / "unet3" / "text_encoder").is_dir()
    assert tiny.assemble(work2, tmp_path / "model2").is_dir()
