"""PLACE (which of the world's places an image shows), the bootstrap intervals of every metric,
the one set of sampler defaults, and the demo's before/after picture. No sampling here: rendered
scenes and synthetic numbers, so these run in seconds."""
import numpy as np
import pytest

from trainer.world import scenes
from bench.place import validate
from trainer.world.place import PLACES, place_of


@pytest.fixture(scope="module")
def scorer():
    from trainer.world.metrics import Scorer

    return Scorer()


def test_place_of_reads_the_place_a_prompt_names():
    assert place_of("a sks star in space") == "in space"
    assert place_of("a star on a red table") == "on a red table"
    assert place_of("a star") is None and place_of("a spaceship") is None


def test_place_classifier_tells_every_place_on_rendered_scenes(scorer):
    acc = validate(scorer, per_place=12, seed=1)
    assert set(acc) == set(PLACES)
    assert min(acc.values()) >= 0.9, acc


def _scene_images(place, n, seed=0, subject=True):
    import random

    rng = random.Random(seed)
    return [scenes.render(scenes.Scene("star", "orange", "big", place, 0.5, 0.5, rng.uniform(-15, 15),
                                       "striped" if subject else None), seed=seed + k) for k in range(n)]


def test_place_metric_is_one_for_the_right_place_and_zero_for_another(scorer):
    from trainer.world.metrics import score

    real = scenes.subject_images(5)
    pairs = {"a sks star in space": "a star in space", "a sks star in the snow": "a star in the snow"}
    right = {"a sks star in space": _scene_images("in space", 4), "a sks star in the snow": _scene_images("in the snow", 4)}
    wrong = {"a sks star in space": _scene_images("on the beach", 4), "a sks star in the snow": _scene_images("on the beach", 4)}
    cls = _scene_images("in the grass", 4, subject=False)
    m, ci = score(scorer, real, right, cls, pairs, "star", intervals=True)
    assert m["PLACE"] == 1.0 and ci["PLACE"] == [1.0, 1.0]
    assert score(scorer, real, wrong, cls, pairs, "star")["PLACE"] == 0.0
    assert np.isnan(score(scorer, real, right, cls, pairs)["PLACE"])  # no class noun: no PLACE
    # the striped star is the subject, a plain one is not: DINO sees it, PRES of plain stars is lower
    assert m["DINO"] > m["PRES"] + 0.1


def _synthetic(rng, prompts=3, n=32):
    d = rng.uniform(0.5, 1.0, size=(prompts, n, n))
    d = (d + d.transpose(0, 2, 1)) / 2
    d[:, np.arange(n), np.arange(n)] = 0
    return {"DINO": rng.normal(0.3, 0.1, (prompts, n)), "CLIP-I": rng.normal(0.5, 0.1, (prompts, n)),
            "CLIP-T": rng.normal(0.6, 0.05, (prompts, n)), "PLACE": (rng.uniform(size=(prompts, n)) < 0.8) * 1.0,
            "PRES": rng.normal(0.0, 0.1, n), "DIV": d}


def test_bootstrap_intervals_cover_the_estimate_and_shrink_with_more_images():
    from trainer.world.metrics import METRICS, bootstrap, point_estimates

    rng = np.random.default_rng(0)
    small, big = _synthetic(rng, n=16), _synthetic(rng, n=64)
    ci_s, ci_b = bootstrap(small), bootstrap(big)
    m = point_estimates(small)
    for k in METRICS:
        assert ci_s[k][0] <= m[k] <= ci_s[k][1], k
        assert ci_b[k][1] - ci_b[k][0] < ci_s[k][1] - ci_s[k][0], k
    # DINO: 48 values of sd 0.1; the 95% interval of their mean is about +-1.96 * 0.1 / sqrt(48)
    half = (ci_s["DINO"][1] - ci_s["DINO"][0]) / 2
    assert 0.02 < half < 0.04, half
    assert bootstrap(small) == ci_s  # seeded: the same numbers every time


def test_bootstrap_div_never_counts_an_image_against_itself():
    from trainer.world.metrics import bootstrap

    v = _synthetic(np.random.default_rng(1), n=8)
    lo, hi = bootstrap(v)["DIV"]
    assert lo >= 0.5  # every distinct pair is >= 0.5 apart; a repeated draw counted as 0 would pull it lower


def test_one_set_of_sampler_defaults_for_sample_eval_and_demo():
    from trainer.options.sampling import EVAL_SEED, GUIDANCE, SAMPLE_STEPS, demo_parser, eval_parser, sample_parser

    s, e, d = sample_parser(), eval_parser(), demo_parser()
    assert s.get_default("steps") == e.get_default("steps") == d.get_default("sample_steps") == SAMPLE_STEPS
    assert s.get_default("guidance") == e.get_default("guidance") == GUIDANCE
    assert e.get_default("seed") == EVAL_SEED  # eval's default seeds are the demo's (--seed 0)


def test_before_after_picture_has_big_cells_and_rows_for_seen_and_unseen_places():
    from PIL import Image

    from trainer.world import demo

    prompts = ["a sks star on the beach", "a sks star in space", "a star"]
    after = {p: [Image.new("RGB", (64, 64), (k * 40, 0, 0)) for k in range(4)] for p in prompts}
    before = {p.replace("sks ", ""): v for p, v in after.items()}
    g = demo.before_after_grid(before, after)
    assert g.width >= 2 * 4 * 128 and g.height >= 3 * 128
    assert "NEVER" in demo.row_label("a sks star in space")  # no subject picture shows space
    assert "NEVER" not in demo.row_label("a sks star on the beach")
    assert "class prior" in demo.row_label("a star")
    # a sample fills a 128 px cell: find a 128-wide run of one sample's colour
    arr = np.asarray(g)
    row = arr[g.height - 64]
    runs = (row == np.array([40, 0, 0])).all(axis=1)
    assert runs.sum() >= 2 * 128


def test_ablation_and_recipe_tables_carry_every_metric_with_its_interval():
    from bench.ablation import markdown
    from trainer.world.metrics import METRICS
    from bench.recipes import table

    m = {k: 0.5 for k in METRICS}
    ci = {k: [0.25, 0.75] for k in METRICS}
    rows = [{"model": "base", "seed": None, **m, "intervals": ci},
            {"model": "with prior preservation", "seed": 0, **m, "intervals": ci}]
    text = markdown(rows, [0])
    assert text.count("0.500 [0.250, 0.750]") == 2 * len(METRICS)
    assert "without prior preservation" not in text  # not measured yet: no row of nans
    rec = [{"recipe": "x", "what": "y", "seed": 0, "metrics": m, "intervals": ci, "train_s": 1.0,
            "place_by_prompt": {f"a sks star {p}": 0.25 for p in PLACES}}]
    line = table(rec).splitlines()[-1]
    assert line.count("[0.250, 0.750]") == len(METRICS) and "| 0.25 |" in line  # PLACE of the unseen place


def test_recipe_search_refuses_a_missing_model_before_writing(tmp_path):
    from trainer.errors import UserError
    from bench import recipes

    for flag in ("--model", "--word_drift"):
        with pytest.raises(UserError, match="does not exist"):
            recipes.main([flag, str(tmp_path / "nope"), "--recipes", "base", "--work", str(tmp_path / "w"),
                          "--out", str(tmp_path / "r")])
    assert list(tmp_path.iterdir()) == []


def test_learned_row_reports_where_the_token_went(tmp_path):
    """A row equal to "orange"'s: cosine 1, moved 0; mostly "black": that is the nearest row, cosine below 1."""
    from safetensors.torch import save_file
    from transformers import CLIPTextModel, CLIPTokenizer

    from bench.recipes import learned_row
    from trainer.world.tiny import MODEL_DIR

    tok = CLIPTokenizer.from_pretrained(MODEL_DIR / "tokenizer")
    table = CLIPTextModel.from_pretrained(MODEL_DIR / "text_encoder").get_input_embeddings().weight.detach()
    orange, black = (table[tok.convert_tokens_to_ids(w + "</w>")] for w in ("orange", "black"))
    save_file({"<sks>": orange[None].clone()}, tmp_path / "learned_embeds.safetensors")
    line = learned_row(tmp_path, MODEL_DIR)
    assert "cosine 1.000 to 'orange', moved 0.00x" in line and "nearest rows: 'orange' 1.00" in line
    save_file({"<sks>": (0.2 * orange + black)[None].clone()}, tmp_path / "learned_embeds.safetensors")
    line = learned_row(tmp_path, MODEL_DIR)
    assert "cosine 1.000" not in line and "nearest rows: 'black'" in line
