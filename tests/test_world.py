"""The procedural world: deterministic, and the pictures show what the captions say."""
import random

import numpy as np

from trainer.world import scenes


def test_dataset_is_reproducible_and_varied():
    a = scenes.dataset(12, seed=3)
    b = scenes.dataset(12, seed=3)
    assert [c for _, c in a] == [c for _, c in b]
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for (x, _), (y, _) in zip(a, b))
    assert [c for _, c in scenes.dataset(12, seed=4)] != [c for _, c in a]
    assert len({c for _, c in scenes.dataset(60, seed=0)}) > 40
    assert all(im.size == (scenes.SIZE, scenes.SIZE) and im.mode == "RGB" for im, _ in a)


def test_caption_matches_the_picture():
    rng = random.Random(0)
    for _ in range(30):
        scene = scenes.sample_scene(rng)
        if scene.shape == "ring":  # a ring's center is background
            continue
        img = np.asarray(scenes.render(scene))
        cx, cy = int(scene.x * scenes.SIZE), int(scene.y * scenes.SIZE)
        assert tuple(img[cy, cx]) == scenes.COLORS[scene.color], scene
        cap = scene.caption()
        assert cap.startswith(f"a {scene.size} {scene.color} {scene.shape} ") and cap.endswith(scene.context)


def test_subject_texture_is_new_to_the_world():
    subject = scenes.subject_images(5)
    assert len(subject) == 5
    dark = [(np.asarray(im).sum(axis=2) < 100).mean() for im in subject]  # the black stripes
    assert min(dark) > 0.05
    plain = scenes.render(scenes.Scene("star", "orange", "big", "on the beach", 0.5, 0.5, 0.0))
    assert (np.asarray(plain).sum(axis=2) < 100).mean() < 0.01


def test_tiny_sd_command_writes_model_and_subject_and_never_overwrites(tmp_path, capsys):
    from trainer.world import tiny_sd
    from trainer.families import check_model_folder

    out, subject = tmp_path / "tiny-sd", tmp_path / "subject"
    assert tiny_sd.main([str(out), "--subject", str(subject)]) == 0
    check_model_folder(out)
    assert len(list(subject.glob("*.png"))) == 5
    before = (out / "model_index.json").read_text()
    assert tiny_sd.main([str(out)]) == 2  # refuses a non-empty folder
    assert (out / "model_index.json").read_text() == before
