"""Edges of issue 30's features found in review: an edited --concepts file is not resumed silently, a mask is found
for a file name with glob characters, --save_steps files hold the EMA average, and flags that would do nothing
without their switch are refused."""
from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from tests.cli_helpers import one_line_error, run_cli
from trainer.core import masks
from trainer.world import scenes

MODEL = "trainer/world/assets/tiny-world-sd"


def _pictures(folder, images):
    folder.mkdir(parents=True, exist_ok=True)
    for k, im in enumerate(images):
        im.save(folder / f"{k}.png")


def test_an_edited_concepts_file_is_refused_on_resume(tmp_path, capsys):
    _pictures(tmp_path / "a", scenes.subject_images(2))
    _pictures(tmp_path / "b", scenes.object_images("cross", "purple", count=2))
    file = tmp_path / "c.json"
    concepts = [{"instance_data_dir": "a", "instance_prompt": "a [V] star"},
                {"instance_data_dir": "b", "instance_prompt": "a [V] cross", "identifier": "zwx"}]
    file.write_text(json.dumps(concepts))
    argv = ["train", "--pretrained_model_name_or_path", MODEL, "--concepts", str(file), "--resolution", "64",
            "--output_dir", str(tmp_path / "out"), "--checkpointing_steps", "1", "--device", "cpu"]
    assert run_cli(argv + ["--max_train_steps", "1"], capsys)[0] == 0
    concepts[1]["repeats"] = 3
    file.write_text(json.dumps(concepts))
    code, _, err = run_cli(argv + ["--max_train_steps", "2", "--resume_from_checkpoint", "latest"], capsys)
    one_line_error(code, err, "changed since checkpoint-1", "concept 2: repeats")
    concepts[1]["repeats"] = 1  # put back: it resumes
    file.write_text(json.dumps(concepts))
    code, out, err = run_cli(argv + ["--max_train_steps", "2", "--resume_from_checkpoint", "latest"], capsys)
    assert code == 0 and "resumed from" in out, err


def test_a_mask_is_found_for_a_name_with_glob_characters(tmp_path):
    (tmp_path / "m").mkdir()
    Image.new("L", (8, 8), 255).save(tmp_path / "m" / "dog[1].png")
    Image.new("L", (8, 8), 255).save(tmp_path / "m" / "dog1.png")
    assert masks.mask_file(tmp_path / "dog[1].jpg", tmp_path / "m") == tmp_path / "m" / "dog[1].png"


def test_save_steps_files_hold_the_average(tmp_path, capsys):
    _pictures(tmp_path / "cat", scenes.subject_images(2))
    out = tmp_path / "ti"
    code, _, err = run_cli(["textual-inversion", "--pretrained_model_name_or_path", MODEL, "--train_data_dir",
                            str(tmp_path / "cat"), "--placeholder_token", "<cat>", "--initializer_token", "star",
                            "--resolution", "64", "--train_batch_size", "1", "--max_train_steps", "2", "--save_steps",
                            "2", "--learning_rate", "0.05", "--use_ema", "--ema_decay", "0.5", "--save_raw_weights",
                            "--output_dir", str(out), "--device", "cpu"], capsys)
    assert code == 0, err
    step = load_file(out / "learned_embeds-steps-2.safetensors")
    final, raw = load_file(out / "learned_embeds.safetensors"), load_file(out / "raw" / "learned_embeds.safetensors")
    (key,) = step
    assert torch.equal(step[key], final[key]) and not torch.equal(step[key], raw[key])


@pytest.mark.parametrize("flags, says", [
    (["--mask_normalization", "mean"], "--mask_normalization shapes --masked_loss's weights"),
    (["--enable_bucket", "--resolution", "32"], "more than --resolution 32"),
    (["--huber_c", "0.3"], "--huber_c applies to --loss_type huber or smooth_l1"),
    (["--ema_decay", "0.99"], "--ema_decay needs --use_ema"),
])
def test_flags_without_their_switch_are_refused_in_one_line(tmp_path, capsys, flags, says):
    _pictures(tmp_path / "d", scenes.subject_images(1))
    code, _, err = run_cli(["train", "--pretrained_model_name_or_path", MODEL, "--instance_data_dir",
                            str(tmp_path / "d"), "--instance_prompt", "a [V] star", "--output_dir",
                            str(tmp_path / "o")] + flags, capsys)
    one_line_error(code, err, says)


def test_a_bucket_the_unet_cannot_take_is_refused_before_class_images_are_drawn(tmp_path, capsys):
    _pictures(tmp_path / "d", scenes.subject_images(1))
    code, _, err = run_cli(["train", "--pretrained_model_name_or_path", MODEL, "--instance_data_dir",
                            str(tmp_path / "d"), "--instance_prompt", "a [V] star", "--aspect_ratio_buckets",
                            "40,40;40,72", "--with_prior_preservation", "--class_data_dir", str(tmp_path / "cls"),
                            "--class_prompt", "a star", "--num_class_images", "1", "--resolution", "64",
                            "--output_dir", str(tmp_path / "o")], capsys)
    one_line_error(code, err, "bucket 40x40", "--bucket_reso_steps")
    assert not (tmp_path / "cls").exists() and not (tmp_path / "o").exists()
