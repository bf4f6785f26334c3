"""Every flag of diffusers' DreamBooth / LoRA / Textual Inversion example scripts is accepted (issue 16).

The flag lists are the scripts' argument names, committed under tests/upstream_flags/ with the diffusers
revision they were read from; the README's train_dreambooth.py command lines run through `dbtrain train`'s
parsing and checks with only the model/data paths (and the step count) substituted, one of them end to end.
"""
from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path

import pytest
from PIL import Image

from trainer.options import diffusers_flags as flag_notes
from trainer.options import textual_inversion as ti_config
from trainer.options import train as config
from trainer.options.checks import DEFAULT_STEPS
from trainer.core import inputs
from trainer.errors import UserError
from trainer.world.tiny_sd import build_tiny_sd

from cli_helpers import one_line_error, run_cli

FLAGS = Path(__file__).resolve().parent / "upstream_flags"
BASE = ["--pretrained_model_name_or_path", "m", "--instance_data_dir", "d", "--instance_prompt", "a [V] dog"]


def upstream(name: str) -> list[str]:
    lines = (FLAGS / name).read_text().splitlines()
    assert lines[0].startswith("#") and any("revision:" in x for x in lines if x.startswith("#")), name
    return [x.strip() for x in lines if x.strip() and not x.startswith("#")]


def readme_commands() -> list[tuple[str, str]]:
    """(README line and section, the arguments) of each train_dreambooth.py command line."""
    out, where = [], None
    for line in (FLAGS / "readme_commands.txt").read_text().splitlines():
        if line.startswith("# README line"):
            where = line[2:]
        elif line.strip() and not line.startswith("#"):
            out.append((where, line))
    return out


def value_for(action: argparse.Action) -> list[str]:
    """A valid value of one option (none for switches)."""
    if action.nargs == 0:
        return []
    if action.choices:
        return [str(list(action.choices)[-1])]
    if action.type is int:
        return ["8"]
    if action.type is float:
        return ["0.5"]
    return ["x"]


@pytest.mark.parametrize("script,parser", [("train_dreambooth.txt", config.build_parser),
                                           ("train_dreambooth_lora.txt", config.build_parser),
                                           ("textual_inversion.txt", ti_config.build_ti_parser)])
def test_every_upstream_flag_is_ours(script, parser):
    p = parser()
    names = upstream(script)
    assert len(names) > 40 and len(set(names)) == len(names)
    missing = [n for n in names if n not in p._option_string_actions]  # exact names, not abbreviations
    assert not missing, f"{script}: not accepted by our parser: {missing}"


@pytest.mark.parametrize("script", ["train_dreambooth.txt", "train_dreambooth_lora.txt"])
def test_each_upstream_flag_parses_and_checks(script, capsys, monkeypatch):
    """Given alone (with a valid value) on top of the required flags, each passes our option checks."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    acts = config.build_parser()._option_string_actions
    for name in upstream(script):
        if name in BASE:
            continue
        extra = {"--with_prior_preservation": ["--class_prompt", "a dog", "--class_data_dir", "c"],
                 "--lora_dropout": ["--rank", "4"]}.get(name, [])  # (what each needs beside it)
        cfg = config.parse(BASE + extra + [name, *value_for(acts[name])])
        assert cfg.training.max_train_steps is not None or cfg.training.num_train_epochs == 8, name
    capsys.readouterr()


def test_ti_flags_parse(tmp_path, capsys):
    (tmp_path / "img").mkdir()
    base = ["--pretrained_model_name_or_path", "m", "--train_data_dir", str(tmp_path / "img"),
            "--placeholder_token", "<t>", "--initializer_token", "toy"]
    acts = ti_config.build_ti_parser()._option_string_actions
    for name in upstream("textual_inversion.txt"):
        if name in base:
            continue
        ti_config.parse(base + [name, *value_for(acts[name])])
    err = capsys.readouterr().err
    for flag in ("--save_as_full_pipeline", "--no_safe_serialization", "--push_to_hub", "--revision"):
        assert f"note: {flag}" in err, flag


def test_offset_noise_switch_or_number(capsys):
    assert config.parse(BASE + ["--offset_noise"]).training.offset_noise == 0.1  # diffusers' switch
    assert config.parse(BASE + ["--offset_noise", "--seed", "1"]).training.offset_noise == 0.1
    assert config.parse(BASE + ["--offset_noise", "0.05"]).training.offset_noise == 0.05  # ours
    assert config.parse(BASE).training.offset_noise == 0.0


def test_config_file_takes_diffusers_keys(tmp_path, capsys):
    toml = tmp_path / "run.toml"
    toml.write_text("offset_noise = true\nnum_train_epochs = 2\nuse_8bit_adam = true\nrank = 4\n")
    with pytest.raises(UserError, match="unknown option"):  # dests, not aliases: --rank's key is lora_rank
        config.parse(["--config", str(toml), *BASE])
    toml.write_text("offset_noise = true\nnum_train_epochs = 2\nuse_8bit_adam = true\nlora_rank = 4\n")
    cfg = config.parse(["--config", str(toml), *BASE])
    assert (cfg.training.offset_noise, cfg.training.num_train_epochs, cfg.training.max_train_steps,
            cfg.lora.lora_rank) == (0.1, 2, None, 4)
    assert "note: --use_8bit_adam" in capsys.readouterr().err


def test_mapped_flags_say_so_and_keep_no_token(capsys, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    cfg = config.parse(BASE + ["--use_8bit_adam", "--enable_xformers_memory_efficient_attention",
                               "--set_grads_to_none", "--pre_compute_text_embeddings", "--report_to", "wandb",
                               "--push_to_hub", "--hub_token", "secret", "--hub_model_id", "me/dog",
                               "--dataloader_num_workers", "4", "--local_rank", "0", "--revision", "main",
                               "--validation_images", "a.png"])
    err = capsys.readouterr().err
    assert cfg.optim.optimizer == "adamw8bit" and cfg.logging.hub_token is None  # the token is never kept (nor saved)
    assert "secret" not in json.dumps(cfg.to_dict())  # (what checkpoints and the marker record)
    notes = [x for x in err.splitlines() if x.startswith("dbtrain: note: ")]
    for flag in ("--use_8bit_adam", "--enable_xformers_memory_efficient_attention", "--set_grads_to_none",
                 "--pre_compute_text_embeddings", "--report_to wandb", "--push_to_hub", "--dataloader_num_workers",
                 "--local_rank", "--revision", "--validation_images"):
        assert sum(x.startswith("dbtrain: note: " + flag) for x in notes) == 1, (flag, err)
    assert "huggingface-cli upload me/dog" in err
    assert not err.replace("\n", "").count("Traceback")


def test_contradictions_are_one_line_errors(capsys, monkeypatch):
    with pytest.raises(UserError, match="--use_8bit_adam and --optimizer adamw"):
        config.parse(BASE + ["--use_8bit_adam", "--optimizer", "adamw"])
    with pytest.raises(UserError, match="--pre_compute_text_embeddings"):
        config.parse(BASE + ["--pre_compute_text_embeddings", "--train_text_encoder"])
    monkeypatch.setenv("WORLD_SIZE", "2")  # under torchrun: data parallel, --shard splits the state (issue 20)
    assert config.parse(BASE + ["--shard"]).distributed.shard
    monkeypatch.delenv("WORLD_SIZE")
    for bad, msg in ((["--lora_rank", "0"], "--lora_rank must be >= 1"), (["--rank", "4", "--lora_dropout", "1"],
                     "--lora_dropout"), (["--lora_alpha", "8"], "--lora_alpha needs --lora_rank"),
                     (["--rank", "4", "--lora_conv_rank", "2"], "--lora_conv_rank needs --lora_conv"),
                     (["--lora_dropout", "0.1"], "--lora_dropout needs --lora_rank .* add --rank 4"),
                     (["--single_file_half"], "--single_file_half needs --save_single_file"),
                     (["--num_train_epochs", "0"], "--num_train_epochs must be >= 1"),
                     (["--lr_power", "0"], "--lr_power must be > 0")):
        with pytest.raises(UserError, match=msg):
            config.parse(BASE + bad)
    cfg = config.parse(BASE + ["--rank", "8", "--lora_alpha", "16", "--lora_conv", "--lora_conv_rank", "4"])
    lo = cfg.lora
    assert (lo.lora_rank, lo.lora_alpha, lo.lora_conv_rank, lo.lora_dropout) == (8, 16.0, 4, 0.0)
    assert config.parse(BASE).lora.lora_rank is None


def _images(folder: Path, n: int, size=32) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(n):
        Image.new("RGB", (size, size), (40 * k, 120, 200)).save(folder / f"i{k}.png")
    return folder


def test_num_train_epochs_as_diffusers_counts(tmp_path, capsys):
    inst = _images(tmp_path / "inst", 5)
    model = tmp_path / "no-model"

    def steps(*extra):
        cfg = config.parse(["--pretrained_model_name_or_path", str(model), "--instance_data_dir", str(inst),
                            "--instance_prompt", "a [V] dog", "--output_dir", str(tmp_path / "o"), *extra])
        flag_notes.resolve_counts(cfg)  # (check_paths' step, without the model folder)
        flag_notes.resolve_counts(cfg)  # twice: idempotent
        return cfg.training.max_train_steps

    # len(dataloader) = ceil(5 / 2) = 3; per epoch ceil(3 / 2) = 2 updates
    assert steps("--num_train_epochs", "3", "--train_batch_size", "2", "--gradient_accumulation_steps", "2") == 6
    # prior preservation: the dataset is max(instance, class images) long: ceil(20 / 4) = 5 per epoch
    assert steps("--num_train_epochs", "2", "--train_batch_size", "4", "--with_prior_preservation",
                 "--class_prompt", "a dog", "--class_data_dir", str(tmp_path / "c"), "--num_class_images", "20") == 10
    assert steps("--num_train_epochs", "2", "--max_train_steps", "7") == 7  # a given max_train_steps wins
    assert steps() == DEFAULT_STEPS
    err = capsys.readouterr().err
    assert "--num_train_epochs 3: 6 steps" in err and "ignored, --max_train_steps 7" in err


def test_scale_lr_and_validation_epochs(tmp_path, capsys):
    cfg = config.parse(BASE + ["--scale_lr", "--train_batch_size", "3", "--gradient_accumulation_steps", "2",
                               "--learning_rate", "1e-6"])
    assert cfg.optim.learning_rate == pytest.approx(6e-6)
    inst = _images(tmp_path / "inst", 4)
    cfg = config.parse(["--pretrained_model_name_or_path", "m", "--instance_data_dir", str(inst), "--instance_prompt",
                        "a [V] dog", "--validation_epochs", "3", "--train_batch_size", "2", "--max_train_steps", "9"])
    flag_notes.resolve_counts(cfg)
    assert cfg.logging.validation_steps == 6 and cfg.training.max_train_steps == 9  # 2 steps per epoch


@pytest.fixture(scope="module")
def tiny77(tmp_path_factory):
    """The tiny model with a 77-position text encoder (the README's --tokenizer_max_length=77), plus an fp16
    variant copy of its weights."""
    from transformers import CLIPTextConfig, CLIPTextModel

    root = build_tiny_sd(tmp_path_factory.mktemp("model") / "tiny-sd")
    te_cfg = CLIPTextConfig.from_pretrained(root / "text_encoder")
    te_cfg.max_position_embeddings = 77
    CLIPTextModel(te_cfg).save_pretrained(root / "text_encoder")
    return root


def _substitute(args: str, model: Path, tmp: Path) -> list[str]:
    inst = _images(tmp / "dog", 3)
    _images(tmp / "val", 1)
    text = (args.replace("$MODEL_NAME", str(model)).replace("$INSTANCE_DIR", str(inst))
            .replace("$CLASS_DIR", str(tmp / "class")).replace("$OUTPUT_DIR", str(tmp / "out"))
            .replace("$VALIDATION_IMAGES", str(tmp / "val" / "i0.png")))
    argv = shlex.split(text)
    out = []
    for a in argv:  # --max_train_steps small; nothing else changes
        out.append("--max_train_steps=2" if a.startswith("--max_train_steps=") else a)
    return out


@pytest.mark.parametrize("where,args", readme_commands(), ids=[w.split(":")[0] for w, _ in readme_commands()])
def test_readme_command_parses_and_checks(where, args, tiny77, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    argv = _substitute(args, tiny77, tmp_path)
    cfg = config.parse(argv)
    inputs.check_paths(cfg)
    assert cfg.training.max_train_steps == 2, where
    err = capsys.readouterr().err
    if "--push_to_hub" in argv:
        assert "note: --push_to_hub: nothing is uploaded" in err
    assert "error" not in err, err


def test_readme_dog_toy_example_trains(tiny77, tmp_path, capsys, monkeypatch):
    """The README's first command (dog toy example) end to end: 2 steps on the tiny model, at 32 px (its 512 px
    took 11 minutes on the 2-core CPU: the tiny UNet attends over 128 x 128 latents there)."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    where, args = readme_commands()[0]
    assert "Dog toy" in where and "--resolution=512" in args
    argv = [("--resolution=32" if a == "--resolution=512" else a) for a in _substitute(args, tiny77, tmp_path)]
    code, out, err = run_cli(["train", *argv], capsys)
    assert code == 0, err
    assert "note: --push_to_hub: nothing is uploaded" in err
    folder = tmp_path / "out"
    assert (folder / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    log = [json.loads(x) for x in (folder / "logs" / "train_log.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == 2


def test_bad_model_flags_are_one_line_errors(tiny77, tmp_path, capsys):
    inst = _images(tmp_path / "inst", 2)
    base = ["train", "--pretrained_model_name_or_path", str(tiny77), "--instance_data_dir", str(inst),
            "--instance_prompt", "a [V] dog", "--output_dir", str(tmp_path / "o")]
    code, _, err = run_cli(base + ["--variant", "fp16"], capsys)
    one_line_error(code, err, "missing", "fp16 weights")
    code, _, err = run_cli(base + ["--tokenizer_name", str(tmp_path / "nothing")], capsys)
    one_line_error(code, err, "--tokenizer_name", "not a local tokenizer folder")
    code, _, err = run_cli(base + ["--tokenizer_max_length", "78"], capsys)
    one_line_error(code, err, "--tokenizer_max_length 78", "77 positions")
    with pytest.raises(SystemExit) as e:  # argparse's own message, exit 2
        run_cli(base + ["--class_labels_conditioning", "other"], capsys)
    assert e.value.code == 2 and "invalid choice: 'other'" in capsys.readouterr().err


@pytest.fixture(scope="module")
def fp16_only(tiny77, tmp_path_factory):
    """A copy of the tiny model holding only fp16-variant weight files (diffusers' --variant fp16 layout)."""
    import shutil

    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    root = tmp_path_factory.mktemp("variant") / "tiny-fp16"
    shutil.copytree(tiny77, root)
    for sub, cls in (("unet", UNet2DConditionModel), ("vae", AutoencoderKL), ("text_encoder", CLIPTextModel)):
        model = cls.from_pretrained(root / sub).to(torch.float16)
        for f in (root / sub).glob("*.safetensors"):
            f.unlink()
        model.save_pretrained(root / sub, variant="fp16")
    return root


def test_implemented_flags_end_to_end(fp16_only, tmp_path, capsys, monkeypatch):
    """--variant, --tokenizer_name, --num_train_epochs, --lr_num_cycles, --logging_dir, --tokenizer_max_length,
    --text_encoder_use_attention_mask, --class_labels_conditioning, --prior_generation_precision,
    --validation_scheduler, --skip_save_text_encoder and --allow_tf32 in one 2-step run."""
    import diffusers

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    made = []  # the validation pipeline's scheduler comes from --validation_scheduler
    plain = diffusers.DPMSolverMultistepScheduler.from_config.__func__
    monkeypatch.setattr(diffusers.DPMSolverMultistepScheduler, "from_config",
                        classmethod(lambda cls, *a, **k: made.append(cls.__name__) or plain(cls, *a, **k)))
    inst = _images(tmp_path / "inst", 3)
    out, cls = tmp_path / "out", tmp_path / "class"
    base = ["train", "--pretrained_model_name_or_path", str(fp16_only), "--instance_data_dir", str(inst),
            "--instance_prompt", "a [V] dog", "--output_dir", str(out), "--resolution", "32"]
    code, _, err = run_cli(base, capsys)
    one_line_error(code, err, "fp16 variant weights: add --variant fp16")
    code, _, err = run_cli(base + [
        "--variant", "fp16", "--tokenizer_name", str(fp16_only / "tokenizer"), "--num_train_epochs", "1",
        "--train_batch_size", "2", "--with_prior_preservation", "--class_prompt", "a dog", "--class_data_dir",
        str(cls), "--num_class_images", "2", "--class_inference_steps", "2", "--prior_generation_precision", "bf16",
        "--lr_scheduler", "cosine_with_restarts", "--lr_num_cycles", "2", "--learning_rate", "1e-4",
        "--logging_dir", "mylogs", "--tokenizer_max_length", "12", "--text_encoder_use_attention_mask",
        "--class_labels_conditioning", "timesteps", "--validation_prompt", "a [V] dog", "--validation_steps", "2",
        "--num_validation_images", "1", "--validation_scheduler", "DPMSolverMultistepScheduler",
        "--skip_save_text_encoder",
        "--allow_tf32", "--image_interpolation_mode", "lanczos", "--log_every", "1", "--optimizer", "adamw",
        "--kernels", "off"], capsys)
    assert code == 0, err
    assert "--num_train_epochs 1: 2 steps" in err  # ceil(max(3 instance, 2 class) / 2) = 2
    assert "has no class embedding" in err
    log = [json.loads(x) for x in (out / "mylogs" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2]
    # cosine_with_restarts, 2 cycles over 2 steps: step 1 starts the second cycle at the full rate
    # (one cycle would be halfway down: 5e-5)
    assert log[0]["lr"] == pytest.approx(1e-4)
    assert len(list(cls.glob("*.png"))) == 2
    assert (out / "validation" / "step-000002.png").is_file() and made == ["DPMSolverMultistepScheduler"]
    assert not (out / "text_encoder").exists() and (out / "unet").is_dir()
    assert json.loads((out / "model_index.json").read_text())["text_encoder"] == [None, None]


def test_tokenizer_max_length_and_attention_mask_reach_the_text_encoder(tiny77):
    import torch
    from transformers import CLIPTextModel, CLIPTokenizer

    from trainer.families.sd import encode_prompt

    tok = CLIPTokenizer.from_pretrained(tiny77 / "tokenizer")
    te = CLIPTextModel.from_pretrained(tiny77 / "text_encoder").eval()
    with torch.no_grad():
        plain = encode_prompt(tok, te, ["a dog"], "cpu")
        short = encode_prompt(tok, te, ["a dog"], "cpu", max_length=12)
        masked = encode_prompt(tok, te, ["a dog"], "cpu", max_length=12, attention_mask=True)
    assert plain.shape[1] == tok.model_max_length and short.shape[1] == 12
    n = len(tok("a dog").input_ids)  # bos, words, eos: the padding after them is what the mask hides
    assert torch.allclose(short[:, :n], masked[:, :n], atol=1e-5)  # causal: real tokens never see the padding
    assert not torch.allclose(short[:, n:], masked[:, n:])


def test_image_interpolation_mode_is_the_resize_filter(tmp_path):
    import numpy as np
    import torch

    from trainer.core.images import ImageSet

    rng = np.random.default_rng(0)
    f = tmp_path / "noise.png"
    Image.fromarray(rng.integers(0, 256, (50, 70, 3), dtype=np.uint8)).save(f)
    views = {m: ImageSet([f], 32, center_crop=True, random_flip=False, interpolation=m).fixed_view(0, False)
             for m in (None, "bilinear", "lanczos", "nearest")}
    assert torch.equal(views[None], views["bilinear"])  # not given: train_dreambooth.py's bilinear
    assert not torch.equal(views["bilinear"], views["lanczos"]) and not torch.equal(views["lanczos"], views["nearest"])


def _read_by_training_code() -> str:
    """The source of the training code, plus the option modules that turn diffusers' flags into the fields it
    reads (--num_train_epochs into steps, --scale_lr into the rate, ...): a field read there as `.name` is used.
    Not the declarations (train.py), nor the checks."""
    root = Path(__file__).resolve().parents[1] / "trainer"
    mapping = {"diffusers_flags.py", "textual_inversion.py"}
    return "\n".join(p.read_text() for p in sorted(root.rglob("*.py"))
                     if "options" not in p.parts or p.name in mapping)


@pytest.mark.parametrize("script,parse,parser", [
    ("train_dreambooth.txt", config.parse, config.build_parser),
    ("train_dreambooth_lora.txt", config.parse, config.build_parser),
    ("textual_inversion.txt", ti_config.parse, ti_config.build_ti_parser)])
def test_no_upstream_flag_is_silently_ignored(script, parse, parser, tmp_path, capsys, monkeypatch):
    """Each accepted flag of the scripts is a field the training code reads, or passing it prints a note."""
    import re

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    code = _read_by_training_code()
    acts = parser()._option_string_actions
    (tmp_path / "img").mkdir()
    base = (["--pretrained_model_name_or_path", "m", "--train_data_dir", str(tmp_path / "img"), "--placeholder_token",
             "<t>", "--initializer_token", "toy"] if script == "textual_inversion.txt" else BASE)
    silent = []
    for name in upstream(script):
        dest = acts[name].dest
        if re.search(rf"\.{dest}\b", code):
            continue
        extra = {"--with_prior_preservation": ["--class_prompt", "a dog", "--class_data_dir", "c"]}.get(name, [])
        capsys.readouterr()
        parse(base + extra + ([] if name in base else [name, *value_for(acts[name])]))
        if f"note: {name}" not in capsys.readouterr().err:
            silent.append(name)
    assert not silent, f"{script}: accepted, not read by the training code, no note: {silent}"
