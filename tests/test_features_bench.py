"""`python -m bench features` (issue 30's experiments on the built-in world): the scenes they train on, the CUT
and LEAK measures, the planned command lines, the rows -> markdown, and one tiny run end to end."""
from __future__ import annotations

import hashlib
import json
import random
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import features, features_plans as plans  # noqa: E402
from trainer.world import scenes  # noqa: E402

ORANGE, BLACK = scenes.COLORS["orange"], scenes.COLORS["black"]


def _background(place: str, seed: int) -> np.ndarray:
    bg = Image.new("RGB", (scenes.SIZE, scenes.SIZE))
    scenes._background(ImageDraw.Draw(bg), place, random.Random(seed))
    return np.asarray(bg)


def _centre_square(im: Image.Image) -> Image.Image:
    w, h = im.size
    s = min(w, h)
    return im.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))


# ---------------------------------------------------------------- the scenes

def test_the_worlds_existing_pictures_stay_bitwise_the_same():
    # the demo's numbers are pinned on these; the hash is of the pictures before the feature builders were added
    h = hashlib.sha256()
    for im in scenes.subject_images(5) + scenes.object_images("cross", "purple", "dotted", "yellow"):
        h.update(im.tobytes())
    for im, cap in scenes.dataset(40, seed=3, p_texture=0.5):
        h.update(im.tobytes())
        h.update(cap.encode())
    assert h.hexdigest() == "0d9cc46fcd1cb2f961251be5334883e16f987dd273975fe22ede79c8a2d3f962"


def test_render_with_mask_is_render_and_marks_the_object():
    for k, s in enumerate(scenes.scenes(12, seed=4, p_texture=0.5)):
        im, mask = scenes.render_with_mask(s, seed=k)
        assert im.tobytes() == scenes.render(s, seed=k).tobytes()
        m = np.asarray(mask)
        assert set(np.unique(m)) == {0, 255}
        # off the mask the picture is the place's background, pixel for pixel
        assert (np.asarray(im)[m == 0] == _background(s.context, k)[m == 0]).all()


def test_one_place_pictures_have_the_beach_behind_and_the_star_under_the_mask():
    pairs = scenes.subject_in_one_place(5, "on the beach", seed=0)
    assert len(pairs) == 5
    for k, (im, mask) in enumerate(pairs):
        a, m = np.asarray(im), np.asarray(mask) > 0
        assert (a[~m] == _background("on the beach", k)[~m]).all()
        on = a[m]
        assert (((on == ORANGE).all(1)) | ((on == BLACK).all(1))).all()
        assert 0.15 < m.mean() < 0.4  # a big star
    with pytest.raises(ValueError, match="place"):
        scenes.subject_in_one_place(5, "on the moon")


def test_aspect_pictures_hold_the_whole_star_but_a_centre_square_cuts_it():
    pairs = scenes.subject_aspect_images(5)
    shapes = [(im.height, im.width) for im, _ in pairs]
    assert shapes == [(64, 64), (96, 64), (64, 96), (96, 64), (64, 96)]  # (height, width)
    for (im, mask), (h, w) in zip(pairs, shapes):
        m = np.asarray(mask) > 0
        assert m.shape == (h, w) and m.sum() > 0.15 * 64 * 64
        assert not m[:4].any() and not m[-4:].any() and not m[:, :4].any() and not m[:, -4:].any()
        crop = np.asarray(_centre_square(mask)) > 0
        frame = crop.copy()
        frame[1:-1, 1:-1] = False
        assert frame.any() == ((h, w) != (64, 64)), (h, w)  # the crop's border runs through the star
        assert h % plans.BUCKET_RESO_STEPS == 0 and w % plans.BUCKET_RESO_STEPS == 0


def test_cut_finds_the_cut_views_and_not_the_whole_ones():
    """CUT's own check on the training data: the whole pictures and the bucket views (48x80 / 80x48, resized to cover
    and centre-cropped) are not cut; the centre squares of the long pictures are."""
    pairs = scenes.subject_aspect_images(5)
    assert not any(plans.cut_by_border(im) for im, _ in pairs)
    assert not any(plans.cut_by_border(im) for im in scenes.subject_images(4))  # (the 5th: on the red table)
    centre = [plans.cut_by_border(_centre_square(im)) for im, _ in pairs]
    assert centre == [False, True, True, True, True]
    for im, _ in pairs:
        bh, bw = (64, 64) if im.width == im.height else (48, 80) if im.width > im.height else (80, 48)
        scale = max(bw / im.width, bh / im.height)
        big = im.resize((round(im.width * scale), round(im.height * scale)), Image.BILINEAR)
        l, t = (big.width - bw) // 2, (big.height - bh) // 2
        assert not plans.cut_by_border(big.crop((l, t, l + bw, t + bh)))
    assert plans.cut_share({"p": [im for im, _ in pairs], "q": [_centre_square(pairs[1][0])]})["CUT"].tolist() == \
        [0, 0, 0, 0, 0, 1]


def test_subject_pixels_are_the_star_never_a_background():
    for place in scenes.CONTEXTS:
        if place != "on a red table":  # (red: no prompt of the buckets experiment names it)
            assert not plans.subject_pixels(Image.fromarray(_background(place, 1))).any(), place
    for s, seed in [(scenes.Scene("star", "orange", "big", p, 0.5, 0.5, 10, "striped"), k)
                    for k, p in enumerate(scenes.ASPECT_PLACES)]:
        im, mask = scenes.render_with_mask(s, seed)
        found, m = plans.subject_pixels(im), np.asarray(mask) > 0
        assert not (found & ~m).any() and found.sum() > 0.3 * m.sum()


def test_the_outlier_replaces_one_picture_by_another_object():
    clean, bad = scenes.subject_images(5), scenes.subject_images_with_outlier(5, outlier=2, shape="square",
                                                                           color="blue")
    same = [a.tobytes() == b.tobytes() for a, b in zip(clean, bad)]
    assert same == [True, True, False, True, True]
    assert not plans.subject_pixels(bad[2]).any() and plans.subject_pixels(clean[2]).any()
    with pytest.raises(ValueError):
        scenes.subject_images_with_outlier(5, outlier=5)
    with pytest.raises(ValueError):
        scenes.subject_images_with_outlier(shape="star", color="orange")


# ---------------------------------------------------------------- the harness

RUNS = {"masks": 3, "buckets": 2, "ema": 1, "huber": 2, "concepts": 3, "optimizers": 3}
FLAGS = {"masks": ["--mask_normalization mean", "--mask_dir"], "buckets": ["--aspect_ratio_buckets auto",
         "--bucket_reso_steps 16", "--center_crop"], "ema": ["--use_ema --save_raw_weights"],
         "huber": ["--loss_type huber --huber_schedule snr", "--loss_type l2"], "concepts": ["--concepts "],
         "optimizers": ["--optimizer adamw4bit", "--optimizer adamw8bit"]}


@pytest.mark.parametrize("experiment", sorted(plans.EXPERIMENTS))
def test_dry_prints_every_run_and_writes_nothing(experiment, tmp_path, capsys):
    work = tmp_path / "work"
    assert features.main([experiment, "--dry", "--seeds", "0", "1", "--work", str(work)]) == 0
    out = capsys.readouterr().out
    assert out.count("python -m trainer train ") == 2 * RUNS[experiment]
    for flag in FLAGS[experiment]:
        assert flag in out, flag
    assert "--seed 1 " in out and "--optimizer adamw" in out
    assert not work.exists()


@pytest.mark.parametrize("experiment", sorted(plans.EXPERIMENTS))
def test_every_planned_command_line_passes_the_trainers_own_checks(experiment, tmp_path):
    from trainer.core import inputs
    from trainer.options import train as train_options

    a = features.parse([experiment, "--seeds", "0", "--work", str(tmp_path)])
    exp, data, by_seed = features.plan_of(a)
    assert all(Path(p).exists() for p in data.values())
    for run in by_seed[0].runs:
        opts = train_options.parse(run.args)  # the flag checks (trainer.options.checks)
        inputs.check_paths(opts)
        assert opts.training.max_train_steps == (2 if run.name == "concepts" else 1) * exp.steps
    if experiment == "concepts":
        items = json.loads(data["concepts"].read_text())
        assert [c["identifier"] for c in items] == ["sks", "zwx"]
        assert not any("--train_text_embedding" in r.args for r in by_seed[0].runs)


def test_bad_arms_and_numbers_exit_2(tmp_path):
    for argv in (["huber", "--arms", "l1"], ["masks", "--eval_images", "1"], ["nope"], ["ema", "--jobs", "0"]):
        with pytest.raises(SystemExit) as e:
            features.parse(argv + ["--work", str(tmp_path)])
        assert e.value.code == 2, argv
    a = features.parse(["huber", "--arms", "l2, clean pictures", "--steps", "7"])
    assert a.arms == ["l2, clean pictures"] and a.steps == 7 and a.eval_images == plans.Huber.eval_images


def test_a_foreign_work_folder_is_refused(tmp_path):
    (tmp_path / "mine.txt").write_text("x")
    with pytest.raises(SystemExit, match="not empty"):
        features.run(features.parse(["ema", "--work", str(tmp_path)]))


def test_a_finished_run_is_reused_only_with_the_same_command_line(tmp_path, monkeypatch):
    from trainer.world import demo

    monkeypatch.setattr(demo, "_trained", lambda folder: True)
    assert not features._finished(tmp_path, ["--seed", "0"])  # no bench-time.json: not a finished bench run
    (tmp_path / "bench-time.json").write_text(json.dumps({"seconds": 1.0, "args": ["--seed", "0"]}))
    assert features._finished(tmp_path, ["--seed", "0"])
    with pytest.raises(RuntimeError, match="other options"):
        features._finished(tmp_path, ["--seed", "1"])


def test_without_drops_flags_and_their_values():
    args = ["--a", "1", "--b", "--c", "x y", "--d", "2"]
    assert plans.without(args, ("--a", "--c")) == ["--b", "--d", "2"]
    assert plans.without(args, ("--b",)) == ["--a", "1", "--c", "x y", "--d", "2"]


def test_ms_per_step_and_intervals(tmp_path):
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "train_log.jsonl").write_text(
        "".join(json.dumps({"step": 10 * i, "ms_per_step": ms}) + "\n" for i, ms in enumerate([900, 100, 120, 110])))
    assert features.ms_per_step(tmp_path) == 110
    assert features.interval(np.ones(8)) == [1.0, 1.0]
    lo, hi = features.interval(np.array([0.0, 1.0] * 10))
    assert 0.2 <= lo < 0.5 < hi <= 0.8


def _row(arm, seed, dino, leak):
    from trainer.world.metrics import METRICS

    m = {k: 0.5 for k in METRICS}
    return {"experiment": "masks", "arm": arm, "model": "-", "seed": seed, **m, "DINO": dino, "LEAK": leak,
            "PLACE_OTHER": 1 - leak, "intervals": {k: [0.4, 0.6] for k in (*METRICS, "LEAK", "PLACE_OTHER")},
            "train_s": 50.0, "ms_per_step": 140.0, "steps": 300, "learning_rate": 1e-4, "num_class_images": 50,
            "eval_images": 12, "sample_steps": 20, "guidance": 5.0, "eval_seed": 10000, "jobs": 2, "threads": 1,
            "device": "x86_64 CPU, 2 cores", "torch": "2.x", "command": "python -m bench features masks",
            "train_commands": [f"python -m trainer train --seed {seed} --x"], "seconds": 1}


def test_report_regenerates_the_markdown_from_the_rows(tmp_path):
    rows = [_row("no mask", 0, 0.1, 0.5), _row("no mask", 1, 0.3, 0.7), _row("masked (none)", 0, 0.2, 0.1)]
    (tmp_path / "masks.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert features.main(["report", "--out", str(tmp_path)]) == 0
    md = (tmp_path / "masks.md").read_text()
    assert "| no mask | - | 2 | 0.400 ± 0.100 | 0.600 ± 0.100 | 0.200 ± 0.100 |" in md  # PLACE_OTHER LEAK DINO
    assert "| masked (none) | - | 1 |" in md
    assert "| no mask | - | 1 | 0.300 [0.400, 0.600] | 0.700 [0.400, 0.600] | 0.300 [0.400, 0.600] |" in md
    assert "x86_64 CPU, 2 cores" in md and "`python -m bench features masks`" in md
    assert "python -m trainer train --seed 0 --x" in md and "--seed 1 --x" not in md


@pytest.mark.slow  # ~11 s on an idle machine (a `dbtrain train` process, class images, scoring), 70+ s loaded
def test_one_tiny_experiment_end_to_end(tmp_path, capsys):
    """Two training steps, two images per prompt: the run, its row and markdown; a finished run is not run again."""
    work, out = tmp_path / "work", tmp_path / "out"
    argv = ["masks", "--arms", "no mask", "--seeds", "0", "--steps", "2", "--num_class_images", "2", "--eval_images",
            "2", "--sample_steps", "2", "--jobs", "1", "--work", str(work), "--out", str(out)]
    assert features.main(argv) == 0
    rows = [json.loads(x) for x in (out / "masks.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["arm"] == "no mask" and rows[0]["steps"] == 2
    assert {"DINO", "PRES", "LEAK", "PLACE_OTHER", "train_s", "device", "torch", "command"} <= set(rows[0])
    assert rows[0]["intervals"]["LEAK"][0] <= rows[0]["LEAK"] <= rows[0]["intervals"]["LEAK"][1]
    assert (work / "seed0" / "no-mask" / "bench-time.json").is_file()
    assert "| no mask | - | 1 |" in (out / "masks.md").read_text()
    mtime = (work / "seed0" / "no-mask" / "bench-time.json").stat().st_mtime
    run = features.plan_of(features.parse(argv))[2][0].runs[0]
    capsys.readouterr()
    features.train_one(run, work / "seed0" / "no-mask", 1)
    assert "trained already" in capsys.readouterr().out
    assert (work / "seed0" / "no-mask" / "bench-time.json").stat().st_mtime == mtime


def test_each_optimizer_arm_trains_with_its_own_optimizer_only(tmp_path):
    """The recipe's own --optimizer (adamw on a CPU) gives way to the arm's: one --optimizer per run."""
    a = features.parse(["optimizers", "--seeds", "0", "--work", str(tmp_path)])
    _, _, by_seed = features.plan_of(a)
    for run in by_seed[0].runs:
        assert run.args.count("--optimizer") == 1 and run.args[run.args.index("--optimizer") + 1] == run.name
