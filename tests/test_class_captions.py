"""Class images with caption files (issue 15): `x.txt` beside `x.png` in --class_data_dir is that class
image's prompt when --caption_extension is given (kohya's convention for regularisation images);
--class_prompt for the others and for generating missing ones. The demo's place-diverse class images."""
from __future__ import annotations

import pytest
import torch
from PIL import Image

from trainer import cli
from trainer.world.tiny_sd import build_tiny_sd


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return build_tiny_sd(tmp_path_factory.mktemp("model") / "tiny-sd")


def _images(folder, n, size=32):
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(n):
        Image.new("RGB", (size, size), (40 * k, 120, 200)).save(folder / f"img{k}.png")
    return sorted(folder.glob("*.png"))


def test_class_prompts_read_caption_files_and_fall_back_to_the_class_prompt(tmp_path, capsys):
    from trainer.core import images as data

    files = _images(tmp_path / "cls", 3)
    (tmp_path / "cls" / "img0.txt").write_text("a star in space\n")
    (tmp_path / "cls" / "img1.txt").write_text("  \n")  # empty: the class prompt
    assert data.class_prompts(files, ".txt", "a star") == ["a star in space", "a star", "a star"]
    err = capsys.readouterr().err
    assert "1 of 3 image(s) captioned by their .txt file; the class prompt for img1.png, img2.png" in err
    # without --caption_extension the caption files are not read
    assert data.class_prompts(files, None, "a star") == ["a star"] * 3


def test_generated_class_images_carry_their_prompt_as_caption(tiny_model, tmp_path, capsys):
    """prompts=[...]: image i drawn from prompts[i % len], its caption written beside it; the files are
    counted as images only (no 'not images' warning), so a second call makes nothing."""
    from trainer.core.class_images import generate_class_images
    from trainer.options.train import TrainOptions

    cfg = TrainOptions()
    cfg.prior.class_data_dir, cfg.prior.num_class_images, cfg.prior.class_prompt = str(tmp_path / "cls"), 5, "a toy"
    cfg.prior.class_inference_steps, cfg.prior.sample_batch_size = 2, 4
    cfg.training.seed, cfg.data.resolution, cfg.data.caption_extension = 0, 32, ".txt"
    cfg.model.pretrained_model_name_or_path = str(tiny_model)
    prompts = ["a toy on the beach", "a toy in space"]
    assert generate_class_images(cfg, torch.device("cpu"), torch.float32, prompts=prompts) == 5
    captions = [(tmp_path / "cls" / f"class-{i:05d}.txt").read_text().strip() for i in range(5)]
    assert captions == [prompts[i % 2] for i in range(5)]
    assert len(list((tmp_path / "cls").glob("*.png"))) == 5
    assert generate_class_images(cfg, torch.device("cpu"), torch.float32, prompts=prompts) == 0
    assert "not images" not in capsys.readouterr().err


def test_training_uses_each_class_images_caption(tiny_model, tmp_path, capsys, monkeypatch):
    """Through `dbtrain train`: the class rows' prompts are the class images' captions (one cached embedding
    per distinct prompt), --class_prompt where none."""
    from trainer.core import loop

    _images(tmp_path / "inst", 2)
    _images(tmp_path / "cls", 3)
    (tmp_path / "cls" / "img0.txt").write_text("a toy in space")
    (tmp_path / "cls" / "img1.txt").write_text("a toy on the beach")
    seen = []
    real_make = loop.Batches.make
    monkeypatch.setattr(loop.Batches, "make", lambda self, step, micro: (
        seen.append((dict(self.embeds), [self.prompt("cls", i) for i in range(3)])), real_make(self, step, micro))[1])
    argv = ["train", "--pretrained_model_name_or_path", str(tiny_model), "--instance_data_dir", str(tmp_path / "inst"),
            "--instance_prompt", "a [V] toy", "--output_dir", str(tmp_path / "out"), "--resolution", "32",
            "--max_train_steps", "1", "--seed", "3", "--optimizer", "adamw", "--kernels", "off",
            "--with_prior_preservation", "--class_prompt", "a toy", "--class_data_dir", str(tmp_path / "cls"),
            "--num_class_images", "3", "--caption_extension", ".txt"]
    assert cli.main(argv) == 0
    embeds, cls_prompts = seen[0]
    assert cls_prompts == ["a toy in space", "a toy on the beach", "a toy"]
    assert {"a toy in space", "a toy on the beach", "a toy"} <= set(embeds)
    assert "2 of 3 image(s) captioned by their .txt file; the class prompt for img2.png" in capsys.readouterr().err


def test_place_class_prompts_cover_every_place_of_the_world():
    from trainer.world.demo import place_class_prompts
    from trainer.world.place import PLACES

    assert place_class_prompts() == [f"a star {p}" for p in PLACES]
    assert "a star in space" in place_class_prompts()


def test_demo_class_image_kinds():
    from trainer.world.demo import class_image_prompts

    assert class_image_prompts(None) is None  # all from --class_prompt "a star"
    assert class_image_prompts("places+plain")[-1] == "a star" and len(class_image_prompts("places+plain")) == 7
    assert "a star" not in class_image_prompts("places")
    half = class_image_prompts("places+halfplain")  # half the cycle plain "a star", half the 6 places
    assert half.count("a star") == 6 and len(half) == 12 and half[:6] == class_image_prompts("places")
    with pytest.raises(ValueError):
        class_image_prompts("space")
