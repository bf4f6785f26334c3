"""A copied diffusers command line says where our defaults differ from the script's, and --diffusers_defaults
takes theirs (issue 29); --repeats counts epochs as textual_inversion.py does."""
from __future__ import annotations

import shlex
from pathlib import Path

import pytest
from PIL import Image

from trainer.options import diffusers_flags
from trainer.options import textual_inversion as ti_config
from trainer.options import train as config

FLAGS = Path(__file__).resolve().parent / "upstream_flags"


def _images(folder: Path, n: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(n):
        Image.new("RGB", (40, 32), (30 * k, 90, 200)).save(folder / f"i{k}.png")
    return folder


def dog_toy(tmp_path: Path) -> list[str]:
    """The DreamBooth README's first train_dreambooth.py command line, paths substituted."""
    line = next(x for x in (FLAGS / "readme_commands.txt").read_text().splitlines() if x.startswith("--"))
    text = (line.replace("$MODEL_NAME", "m").replace("$INSTANCE_DIR", str(_images(tmp_path / "dog", 3)))
            .replace("$OUTPUT_DIR", str(tmp_path / "out")))
    return shlex.split(text)


def ti_readme(tmp_path: Path) -> list[str]:
    """textual_inversion's README command line (cat toy), paths substituted."""
    return shlex.split(f'--pretrained_model_name_or_path=m --train_data_dir={_images(tmp_path / "cat", 3)} '
                       '--learnable_property="object" --placeholder_token="<cat-toy>" --initializer_token="toy" '
                       '--resolution=512 --train_batch_size=1 --gradient_accumulation_steps=4 --max_train_steps=3000 '
                       '--learning_rate=5.0e-04 --scale_lr --lr_scheduler="constant" --lr_warmup_steps=0 '
                       f'--output_dir={tmp_path / "ti-out"}')


def notes(capsys) -> list[str]:
    return [x for x in capsys.readouterr().err.splitlines() if "diffusers' " in x and ".py" in x
            and ("differs:" in x or "defaults:" in x)]


def test_note_names_each_difference_of_train_dreambooth(tmp_path, capsys):
    cfg = config.parse(dog_toy(tmp_path))
    [line] = notes(capsys)
    assert line.startswith("dbtrain: note: where diffusers' train_dreambooth.py differs: ")
    assert "--optimizer adamw8bit (theirs: adamw, --optimizer adamw)" in line
    # the README sets batch, warm-up, steps, lr, resolution: not listed
    for flag in ("--train_batch_size", "--lr_warmup_steps", "--num_train_epochs", "--learning_rate", "resize"):
        assert flag not in line, flag
    assert line.endswith("--diffusers_defaults takes all of theirs")
    assert cfg.optim.optimizer == "adamw8bit"


def test_note_names_each_difference_of_train_dreambooth_lora(tmp_path, capsys):
    argv = [a for a in dog_toy(tmp_path) if not a.startswith(("--learning_rate", "--max_train_steps"))]
    config.parse(argv + ["--rank", "4", "--validation_prompt", "a sks dog"])
    [line] = notes(capsys)
    assert "train_dreambooth_lora.py differs: " in line
    for said in ("--optimizer adamw8bit (theirs: adamw", "--learning_rate 5e-06 (theirs: 0.0005",
                 "resize bilinear (theirs: lanczos, --image_interpolation_mode lanczos)",
                 "800 steps (theirs: 1 epoch, --num_train_epochs 1)",
                 "(theirs: every 50 epochs, --validation_epochs 50)",
                 "(theirs: DPMSolverMultistepScheduler, --validation_scheduler DPMSolverMultistepScheduler)"):
        assert said in line, said
    assert "--train_batch_size" not in line and "--output_dir" not in line  # given on the line


def test_note_names_each_difference_of_textual_inversion(tmp_path, capsys):
    ti_config.parse(ti_readme(tmp_path))
    [line] = notes(capsys)
    assert "textual_inversion.py differs: " in line
    for said in ("no flip (theirs: random flip p=0.5, --random_flip)",
                 "resize bilinear (theirs: bicubic, --image_interpolation_mode bicubic)",
                 "resize to cover, then a random square crop (theirs: the whole image resized to the square, "
                 "--image_fit squash)"):
        assert said in line, said
    assert "--optimizer" not in line  # TI's defaults are already theirs


def test_diffusers_defaults_takes_theirs(tmp_path, capsys):
    base = ["--pretrained_model_name_or_path", "m", "--instance_data_dir", "d", "--instance_prompt", "a [V] dog"]
    full = config.parse(base + ["--diffusers_defaults"])
    assert (full.optim.optimizer, full.training.train_batch_size, full.optim.lr_warmup_steps,
            full.training.num_train_epochs, full.training.max_train_steps) == ("adamw", 4, 500, 1, None)
    assert full.data.image_interpolation_mode in (None, "bilinear") and not full.data.random_flip
    lora = config.parse(base + ["--rank", "4", "--diffusers_defaults"])
    assert (lora.optim.optimizer, lora.optim.learning_rate, lora.data.image_interpolation_mode,
            lora.checkpoints.output_dir) == ("adamw", 5e-4, "lanczos", "lora-dreambooth-model")
    ti = ti_config.parse(ti_readme(tmp_path) + ["--diffusers_defaults"])
    assert ti.data.random_flip and ti.data.image_interpolation_mode == "bicubic" and ti.optim.optimizer == "adamw"
    assert ti.data.image_fit == "squash" and full.data.image_fit == lora.data.image_fit == "cover"
    err = capsys.readouterr().err
    assert "note: using diffusers' train_dreambooth.py defaults: --optimizer adamw, --train_batch_size 4" in err
    assert "using diffusers' textual_inversion.py defaults: --random_flip, --image_interpolation_mode bicubic, " \
           "--image_fit squash\n" in err


def test_a_given_flag_is_never_overridden(tmp_path, capsys):
    base = ["--pretrained_model_name_or_path", "m", "--instance_data_dir", "d", "--instance_prompt", "a [V] dog"]
    cfg = config.parse(base + ["--rank", "4", "--diffusers_defaults", "--optimizer", "adamw8bit", "--learning_rate",
                               "1e-4", "--image_interpolation_mode", "bilinear", "--max_train_steps", "7",
                               "--train_batch_size", "1", "--lr_warmup_steps", "0", "--output_dir", "o"])
    assert (cfg.optim.optimizer, cfg.optim.learning_rate, cfg.data.image_interpolation_mode,
            cfg.training.max_train_steps, cfg.training.train_batch_size, cfg.optim.lr_warmup_steps,
            cfg.checkpoints.output_dir) == ("adamw8bit", 1e-4, "bilinear", 7, 1, 0, "o")
    assert notes(capsys) == []  # all set: no line
    toml = tmp_path / "run.toml"  # a --config file's keys are given too
    toml.write_text('optimizer = "adamw8bit"\n')
    assert config.parse(["--config", str(toml), *base, "--diffusers_defaults"]).optim.optimizer == "adamw8bit"
    ti = ti_config.parse(ti_readme(tmp_path) + ["--diffusers_defaults", "--image_interpolation_mode", "nearest",
                                                "--center_crop"])
    assert ti.data.image_interpolation_mode == "nearest" and ti.data.random_flip
    assert config.parse(base + ["--use_8bit_adam", "--diffusers_defaults"]).optim.optimizer == "adamw8bit"


def test_repeats_count_epochs_as_textual_inversion_py(tmp_path, capsys):
    argv = ti_readme(tmp_path)  # 3 images, batch 1, accumulation 4

    def per_epoch(*extra):
        cfg = ti_config.parse(argv + list(extra))
        return diffusers_flags.steps_per_epoch(cfg, 3), cfg

    # diffusers: len(dataloader) = ceil(3 x repeats / 1); per epoch ceil(that / 4)
    assert per_epoch()[0] == 75  # default --repeats 100
    assert per_epoch("--repeats", "2")[0] == 2  # ceil(6 / 4)
    per, cfg = per_epoch("--repeats", "5", "--num_train_epochs", "3")
    cfg.training.max_train_steps = None  # (their default 5000 wins over epochs, as ours: count from epochs here)
    diffusers_flags.resolve_counts(cfg)
    assert per == 4 and cfg.training.max_train_steps == 12  # ceil(15 / 4) = 4 per epoch, 3 epochs
    cfg = ti_config.parse(argv + ["--repeats", "5", "--validation_epochs", "2", "--validation_prompt", "a <cat-toy>"])
    diffusers_flags.resolve_counts(cfg)
    assert cfg.logging.validation_steps == 30  # 2 x (3 images x 5 repeats), as diffusers multiplies
    assert "--validation_epochs 2: validation every 30 steps" in capsys.readouterr().err
