"""The DreamBooth trainer end to end on a tiny SD model built locally (CPU)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

from trainer import cli
from trainer.world.tiny_sd import build_tiny_sd

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return build_tiny_sd(tmp_path_factory.mktemp("model") / "tiny-sd")


def make_images(folder: Path, n=3, size=(40, 48)) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(n):
        im = Image.new("RGB", size, (200, 40 * k, 40))
        ImageDraw.Draw(im).ellipse((4 + k, 6, 30, 36), fill=(20, 200, 90))
        im.save(folder / f"img{k}.png")
    return folder


def args(model, tmp_path, *extra, steps=4):
    return ["--pretrained_model_name_or_path", str(model), "--instance_data_dir", str(tmp_path / "inst"),
            "--instance_prompt", "a photo of [V] toy", "--output_dir", str(tmp_path / "out"),
            "--resolution", "32", "--max_train_steps", str(steps), "--learning_rate", "1e-4",
            "--log_every", "1", "--seed", "3", *extra]


def run_cli(argv, capsys=None):
    code = cli.main(argv)
    err = capsys.readouterr().err if capsys is not None else ""
    return code, err


def read_log(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "logs" / "train_log.jsonl").read_text().splitlines()]


def unet_state(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(folder / "unet" / "diffusion_pytorch_model.safetensors")


FAST = ["--optimizer", "adamw", "--kernels", "off"]


def test_full_run_with_prior_preservation_loads_and_samples(tiny_model, tmp_path, capsys):
    make_images(tmp_path / "inst")
    cls = tmp_path / "cls"
    make_images(cls, n=1)  # one image already there: it must be kept, and only 3 generated
    before = (cls / "img0.png").read_bytes()
    code, err = run_cli(["train", *args(tiny_model, tmp_path, "--with_prior_preservation", "--class_prompt", "a photo of toy",
                             "--class_data_dir", str(cls), "--num_class_images", "4", "--class_inference_steps", "2",
                             "--checkpointing_steps", "1", "--checkpoints_total_limit", "2",
                             "--validation_prompt", "a [V] toy in the snow", "--validation_steps", "2",
                             "--num_validation_images", "2", "--identifier", "auto", *FAST)], capsys)
    assert code == 0, err
    assert (cls / "img0.png").read_bytes() == before
    assert len(list(cls.glob("*.png"))) == 4
    out = tmp_path / "out"
    # the last step's state is kept too (a finished run can be trained more), within the limit of 2
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-4"]
    assert not list(out.glob(".tmp-*"))
    assert (out / "validation" / "step-000002.png").is_file()
    log = read_log(out)
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    for r in log:
        assert r["loss_prior"] is not None and abs(r["loss"] - (r["loss_instance"] + r["loss_prior"])) < 1e-4
    # the output is a diffusers folder that StableDiffusionPipeline loads as is
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(out, safety_checker=None, requires_safety_checker=False)
    img = pipe("a photo of toy", num_inference_steps=2, height=32, width=32).images[0]
    assert img.size == (32, 32)
    # and training changed the UNet
    base = unet_state(Path(tiny_model))
    assert any(not torch.equal(v, base[k]) for k, v in unet_state(out).items())
    # dbtrain sample writes PNGs and a grid
    code, err = run_cli(["sample", "--model", str(out), "--prompt", "a photo of sks toy", "--num_images", "2",
                         "--steps", "2", "--resolution", "32", "--out", str(tmp_path / "samples")], capsys)
    assert code == 0, err
    assert (tmp_path / "samples" / "grid.png").is_file() and (tmp_path / "samples" / "001.png").is_file()


def test_text_encoder_training(tiny_model, tmp_path, capsys):
    make_images(tmp_path / "inst")
    code, err = run_cli(["train", *args(tiny_model, tmp_path, "--train_text_encoder", "--center_crop",
                                        "--random_flip", *FAST, steps=3)], capsys)
    assert code == 0, err
    from safetensors.torch import load_file

    new = load_file(tmp_path / "out" / "text_encoder" / "model.safetensors")
    old = load_file(Path(tiny_model) / "text_encoder" / "model.safetensors")
    assert any(not torch.equal(v, old[k]) for k, v in new.items())


def _train_cmd(model, tmp_path, out, *extra):
    # the default optimizer (adamw8bit): its 8-bit state must survive the checkpoint bitwise
    a = args(model, tmp_path, "--checkpointing_steps", "2", "--kernels", "off", *extra, steps=8)
    a[a.index("--output_dir") + 1] = str(out)
    return [sys.executable, "-m", "trainer", "train", *a]


def test_resume_after_kill_equals_uninterrupted_run(tiny_model, tmp_path):
    make_images(tmp_path / "inst")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    full = tmp_path / "full"
    subprocess.run(_train_cmd(tiny_model, tmp_path, full), check=True, env=env, capture_output=True, timeout=300)

    killed = tmp_path / "killed"
    proc = subprocess.Popen(_train_cmd(tiny_model, tmp_path, killed), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    log = killed / "logs" / "train_log.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if log.exists() and len(log.read_text().splitlines()) >= 3:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # at whatever point step 3+ happens to be
    proc.wait()
    assert not (killed / "model_index.json").exists() or proc.returncode == 0
    subprocess.run(_train_cmd(tiny_model, tmp_path, killed, "--resume_from_checkpoint", "latest"), check=True,
                   env=env, capture_output=True, timeout=300)
    a, b = unet_state(full), unet_state(killed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ------------------------------------------------------------------ bad input

def _one_line_error(code, err, match):
    assert code == 2
    assert "Traceback" not in err
    lines = [x for x in err.strip().splitlines() if x.startswith("dbtrain: error:")]
    assert len(lines) == 1 and match in lines[0], err


def test_bad_inputs_give_one_clear_line(tiny_model, tmp_path, capsys):
    # missing instance folder
    code, err = run_cli(["train", *args(tiny_model, tmp_path, *FAST)], capsys)
    _one_line_error(code, err, "instance image folder")
    # empty folder (only a non-image file)
    (tmp_path / "inst").mkdir()
    (tmp_path / "inst" / "notes.txt").write_text("not an image")
    code, err = run_cli(["train", *args(tiny_model, tmp_path, *FAST)], capsys)
    _one_line_error(code, err, "holds no images")
    # a corrupt image is named; non-image files are skipped with a warning line
    (tmp_path / "inst" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    code, err = run_cli(["train", *args(tiny_model, tmp_path, *FAST)], capsys)
    _one_line_error(code, err, "broken.png")
    assert "dbtrain: warning:" in err and "not images: notes.txt" in err
    (tmp_path / "inst" / "broken.png").unlink()
    make_images(tmp_path / "inst")
    # resolution not a multiple of 8
    a = args(tiny_model, tmp_path, *FAST)
    a[a.index("--resolution") + 1] = "30"
    code, err = run_cli(["train", *a], capsys)
    _one_line_error(code, err, "multiple of 8")
    # prior preservation without a class prompt
    code, err = run_cli(["train", *args(tiny_model, tmp_path, "--with_prior_preservation", "--class_data_dir",
                                        str(tmp_path / "cls"), *FAST)], capsys)
    _one_line_error(code, err, "--class_prompt")
    # a model folder missing components lists them
    broken = tmp_path / "model"
    (broken / "unet").mkdir(parents=True)
    a = args(broken, tmp_path, *FAST)
    code, err = run_cli(["train", *a], capsys)
    _one_line_error(code, err, "missing: unet (config.json + weights), vae, text_encoder, tokenizer, scheduler")
    # an output folder holding someone else's files, or a previous run, is refused, never overwritten
    out = tmp_path / "out"
    assert not out.exists()  # the failed runs above created nothing
    out.mkdir()
    (out / "model_index.json").write_text("{}")
    code, err = run_cli(["train", *args(tiny_model, tmp_path, *FAST)], capsys)
    _one_line_error(code, err, "holds files dbtrain did not write (model_index.json)")
    (out / ".dbtrain-run.json").write_text("{}")  # the marker of a dbtrain run
    code, err = run_cli(["train", *args(tiny_model, tmp_path, *FAST)], capsys)
    _one_line_error(code, err, "holds a previous run")
    assert (out / "model_index.json").read_text() == "{}"
    # with the non-image file still there (skipped, warned about above), the run goes on
    import shutil

    shutil.rmtree(out)
    code, err = run_cli(["train", *args(tiny_model, tmp_path, *FAST, steps=1)], capsys)
    assert code == 0, err


def test_out_of_memory_names_the_options(tiny_model, tmp_path, capsys, monkeypatch):
    make_images(tmp_path / "inst")
    from diffusers import UNet2DConditionModel

    def boom(*a, **k):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(UNet2DConditionModel, "forward", boom)
    code, err = run_cli(["train", *args(tiny_model, tmp_path, *FAST)], capsys)
    _one_line_error(code, err, "out of GPU memory; options that would help: --gradient_checkpointing")
    assert "--mixed_precision bf16" in err


def test_config_file_and_flag_override(tiny_model, tmp_path):
    from trainer.options import train as config
    from trainer.errors import UserError

    toml = tmp_path / "run.toml"
    toml.write_text('learning_rate = 3e-6\nmax_train_steps = 7\ninstance_prompt = "a [V] dog"\n')
    cfg = config.parse(["--config", str(toml), "--pretrained_model_name_or_path", "m", "--instance_data_dir", "d",
                        "--max_train_steps", "9"])
    assert (cfg.optim.learning_rate == 3e-6 and cfg.training.max_train_steps == 9
            and cfg.data.instance_prompt == "a [V] dog")
    toml.write_text("learning_rte = 1\n")
    with pytest.raises(UserError, match="unknown option"):
        config.parse(["--config", str(toml)])


def test_identifier_auto_picks_a_rare_single_token(tiny_model):
    from transformers import CLIPTokenizer

    from trainer.core.prompts import pick_identifier

    tok = CLIPTokenizer.from_pretrained(tiny_model, subfolder="tokenizer")
    word = pick_identifier(tok, "toy", seed=0)
    assert len(tok.tokenize(word)) == 1 and 2 <= len(word) <= 3
    assert word in ("sks", "zwx", "qlo", "vyt")


def test_v_prediction_bf16_autocast_min_snr_offset_noise_accumulation(tmp_path, capsys):
    model = build_tiny_sd(tmp_path / "v-model", prediction_type="v_prediction", seed=1)
    make_images(tmp_path / "inst")
    code, err = run_cli(["train", *args(model, tmp_path, "--mixed_precision", "bf16", "--snr_gamma", "5",
                                        "--offset_noise", "0.1", "--gradient_accumulation_steps", "2",
                                        "--lr_scheduler", "cosine", "--lr_warmup_steps", "1", *FAST, steps=2)],
                        capsys)
    assert code == 0, err
    log = read_log(tmp_path / "out")
    assert len(log) == 2 and all(r["skipped_steps"] == 0 and r["loss"] > 0 for r in log)
    assert log[0]["lr"] != log[1]["lr"]  # the schedule moved


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_kernels_on_and_off_give_matching_losses(tiny_model, tmp_path, capsys, monkeypatch, backend):
    """--kernels on (dbkernels loss + FusedAttnProcessor) vs off (PyTorch), same seeds."""
    from dbkernels import _backend

    if backend == "triton" and _backend.unavailable_reason("triton", "cpu"):
        pytest.skip(_backend.unavailable_reason("triton", "cpu"))
    make_images(tmp_path / "inst")
    logs = {}
    for kernels in ("off", "on"):
        out = tmp_path / f"out-{kernels}"
        a = args(tiny_model, tmp_path, "--optimizer", "adamw", "--kernels", kernels, steps=3)
        a[a.index("--output_dir") + 1] = str(out)
        if kernels == "on":
            monkeypatch.setenv("DBKERNELS_BACKEND", backend)
        code, err = run_cli(["train", *a], capsys)
        assert code == 0, err
        logs[kernels] = read_log(out)
    for off, on in zip(logs["off"], logs["on"]):
        assert on["loss"] == pytest.approx(off["loss"], rel=1e-4, abs=1e-6)
    a, b = unet_state(tmp_path / "out-off"), unet_state(tmp_path / "out-on")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=1e-5)


def test_defaults_and_lowest_memory_settings_run(tiny_model, tmp_path, capsys):
    """adamw8bit + kernels on (the defaults), then bf16 weights + step_in_backward + checkpointing."""
    make_images(tmp_path / "inst")
    code, err = run_cli(["train", *args(tiny_model, tmp_path, steps=2)], capsys)
    assert code == 0, err
    out2 = tmp_path / "lowmem"
    a = args(tiny_model, tmp_path, "--weights_dtype", "bf16", "--step_in_backward", "--gradient_checkpointing",
             "--train_text_encoder", steps=2)
    a[a.index("--output_dir") + 1] = str(out2)
    code, err = run_cli(["train", *a], capsys)
    assert code == 0, err
    state = unet_state(out2)
    assert all(v.dtype == torch.bfloat16 for v in state.values())
    base = unet_state(Path(tiny_model))
    assert any(not torch.equal(v.float(), base[k].float().to(torch.bfloat16).float()) for k, v in state.items())
    # step_in_backward refuses what it cannot do
    a = args(tiny_model, tmp_path, "--step_in_backward", "--gradient_accumulation_steps", "2")
    code, err = run_cli(["train", *a], capsys)
    _one_line_error(code, err, "--step_in_backward cannot accumulate gradients")


@pytest.mark.parametrize("precision", ["no", "fp16"])
def test_non_finite_loss_skips_the_step_and_is_counted(tiny_model, tmp_path, capsys, monkeypatch, precision):
    import dbkernels

    make_images(tmp_path / "inst")
    real = dbkernels.diffusion_loss
    calls = []

    def sometimes_nan(*a, **k):
        calls.append(1)
        loss = real(*a, **k)
        return loss * float("nan") if len(calls) == 2 else loss

    monkeypatch.setattr(dbkernels, "diffusion_loss", sometimes_nan)
    code, err = run_cli(["train", *args(tiny_model, tmp_path, "--mixed_precision", precision, *FAST, steps=3)],
                        capsys)
    assert code == 0, err
    log = read_log(tmp_path / "out")
    assert [r["skipped_steps"] for r in log] == [0, 1, 1]
    assert all(torch.isfinite(v.float()).all() for v in unet_state(tmp_path / "out").values())


def test_caption_files_are_per_image_instance_prompts(tiny_model, tmp_path, capsys, monkeypatch):
    """--caption_extension .txt: img0.txt is img0.png's prompt ([V] substituted), the others fall back to
    --instance_prompt; one cached embedding per distinct prompt. Before, every image got the instance
    prompt and the .txt files were skipped as 'not images'."""
    from trainer.core import loop

    make_images(tmp_path / "inst")
    (tmp_path / "inst" / "img0.txt").write_text("\n  a [V] toy on the beach  \nsecond line ignored\n")
    (tmp_path / "inst" / "img1.txt").write_text("a [V] toy in the snow")
    encoded = []
    from trainer.families import sd

    real = sd.encode_prompt
    monkeypatch.setattr(sd, "encode_prompt", lambda tok, te, prompts, dev, *rest: (
        encoded.extend(prompts), real(tok, te, prompts, dev, *rest))[1])
    seen = []
    real_make = loop.Batches.make
    monkeypatch.setattr(loop.Batches, "make", lambda self, step, micro: (seen.append(dict(self.embeds)),
                                                                         real_make(self, step, micro))[1])
    code, err = run_cli(["train", *args(tiny_model, tmp_path, "--caption_extension", "txt", *FAST, steps=1)],
                        capsys)
    assert code == 0, err
    want = ["a sks toy on the beach", "a sks toy in the snow", "a photo of sks toy"]
    assert encoded == want  # each distinct prompt encoded once, in image order
    assert list(seen[0]) == want
    assert "not images" not in err and "2 of 3 image(s) captioned by their .txt file" in err
    # a caption file that is not text is one line naming it
    (tmp_path / "inst" / "img2.txt").write_bytes(b"\xff\xfe\x00bad")
    a = args(tiny_model, tmp_path, "--caption_extension", ".txt", *FAST, steps=1)
    a[a.index("--output_dir") + 1] = str(tmp_path / "out2")
    code, err = run_cli(["train", *a], capsys)
    _one_line_error(code, err, "img2.txt is not UTF-8 text")
