"""Issue 12, the trainer half: nothing a user made is lost, every failure is one line.

Each test is a case a user hit on the command line: an output folder of their own files,
Ctrl-C / SIGTERM before the first checkpoint, a full disk, a damaged checkpoint, numbers
that are not numbers, slow --help, fp16 on a CPU, the demo. Tiny models, few steps.
"""
from __future__ import annotations

import errno
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

from cli_helpers import one_line_error, run_cli
from trainer.world.tiny_sd import build_tiny_sd

ROOT = Path(__file__).resolve().parent.parent
ENV = dict(os.environ, PYTHONPATH=str(ROOT))
FAST = ["--optimizer", "adamw", "--kernels", "off"]
HEAVY = re.compile(r"\|\s+(torch|diffusers|transformers)(\.|$)", re.M)
# `dbtrain ARGS` in a new process, each training step `delay` s longer so that a signal lands mid-run
SLOW = ("import sys, time; from trainer import cli; from trainer.core import loop; real = loop.train_step; "
        "loop.train_step = lambda run, step: (time.sleep({delay}), real(run, step))[1]; "
        "sys.exit(cli.main(sys.argv[1:]))")


def start_slow(argv, delay, **kw):
    return subprocess.Popen([sys.executable, "-c", SLOW.format(delay=delay), *argv], env=ENV, text=True, **kw)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return build_tiny_sd(tmp_path_factory.mktemp("model") / "tiny-sd")


@pytest.fixture(scope="module")
def tiny_model_64(tmp_path_factory):
    """Demo-sized (64 px) and far cheaper than the built-in model: for the demo's mechanics."""
    return build_tiny_sd(tmp_path_factory.mktemp("model64") / "tiny-sd-64", sample_size=64)


@pytest.fixture
def inst(tmp_path):
    folder = tmp_path / "inst"
    folder.mkdir()
    for k in range(3):
        im = Image.new("RGB", (32, 32), (200, 40 * k, 40))
        ImageDraw.Draw(im).ellipse((4 + k, 6, 26, 28), fill=(20, 200, 90))
        im.save(folder / f"img{k}.png")
    return folder


def train_args(model, inst, out, *extra, steps=4):
    return ["--pretrained_model_name_or_path", str(model), "--instance_data_dir", str(inst),
            "--instance_prompt", "a photo of [V] toy", "--output_dir", str(out), "--resolution", "32",
            "--max_train_steps", str(steps), "--learning_rate", "1e-4", "--log_every", "1", "--seed", "3",
            *FAST, *extra]


def unet(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(folder / "unet" / "diffusion_pytorch_model.safetensors")


def assert_same_weights(a: Path, b: Path):
    x, y = unet(a), unet(b)
    assert x.keys() == y.keys()
    for k in x:
        assert torch.equal(x[k], y[k]), k


def resume_argv(err: str) -> list[str]:
    """The command the CLI printed, as arguments of cli.main."""
    cmd = re.search(r"(?:resume|continue) with: (dbtrain .*)$", err, re.M).group(1)
    return shlex.split(cmd)[1:]


@pytest.fixture
def no_model_loading(monkeypatch):
    """Any attempt to load a model fails the test: flag and folder errors must come first."""
    import diffusers

    def refuse(*a, **k):
        raise AssertionError("a model was loaded before the flags were checked")

    for cls in (diffusers.UNet2DConditionModel, diffusers.AutoencoderKL, diffusers.StableDiffusionPipeline):
        monkeypatch.setattr(cls, "from_pretrained", refuse)


# ------------------------------------------------------------------ --help: instant, grouped, defaults

@pytest.mark.parametrize("cmd", ["train", "textual-inversion", "sample", "eval", "demo", "fabric"])
def test_help_loads_no_torch_and_shows_groups_and_defaults(cmd):
    """`dbtrain train --help` took 25-66 s (torch and diffusers loaded before argparse)."""
    p = subprocess.run([sys.executable, "-X", "importtime", "-m", "trainer.cli", cmd, "--help"],
                       env=dict(ENV, COLUMNS="200"),
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr[-2000:]
    assert not HEAVY.findall(p.stderr), HEAVY.findall(p.stderr)[:5]  # importtime lists every module imported
    assert f"usage: dbtrain {cmd}" in p.stdout and "(default: " in p.stdout
    if cmd == "train":
        for group in ("model and data:", "prior preservation:", "training:", "memory and speed:",
                      "checkpoints and logging:", "ours (dbtrain's own"):
            assert group in p.stdout
        assert "--kernels on|off" in p.stdout and "(default: on)" in p.stdout
        assert "(default: 800)" in p.stdout and "(default: 5e-06)" in p.stdout


def test_every_flag_is_explained():
    from trainer.options.train import build_parser
    from trainer.options.sampling import demo_parser, eval_parser, sample_parser
    from trainer.options.textual_inversion import build_ti_parser

    for parser in (build_parser(), build_ti_parser(), sample_parser(), eval_parser(), demo_parser()):
        bare = [a.option_strings[0] for a in parser._actions if a.option_strings and not (a.help or "").strip()]
        assert not bare, (parser.prog, bare)
        assert len(parser._action_groups) > 3, parser.prog  # grouped, not one flat list


# ------------------------------------------------------------------ flag and folder errors: first, one line

def test_flag_errors_come_first_in_one_line_and_leave_nothing(tiny_model, inst, tmp_path, capsys,
                                                              no_model_loading):
    """--learning_rate nan was a ValueError after the model loaded, and left an empty output folder."""
    out = tmp_path / "out"
    cases = [(["--learning_rate", "nan"], "--learning_rate must be a finite number"),
             (["--learning_rate", "inf"], "--learning_rate must be a finite number"),
             (["--learning_rate", "-1e-4"], "--learning_rate must be >= 0"),
             (["--prior_loss_weight", "nan"], "--prior_loss_weight must be a finite number"),
             (["--adam_beta2", "1.5"], "--adam_beta2 must be >= 0 and < 1"),
             (["--max_grad_norm", "-inf"], "--max_grad_norm must be a finite number"),
             (["--max_train_steps", "-5"], "--max_train_steps must be >= 1"),
             (["--lr_warmup_steps", "-1"], "--lr_warmup_steps must be >= 0"),
             (["--checkpoints_total_limit", "0"], "--checkpoints_total_limit must be >= 1"),
             (["--with_prior_preservation", "--class_prompt", "a toy", "--class_data_dir", str(tmp_path / "c"),
               "--num_class_images", "-1"], "--num_class_images must be >= 1"),
             (["--resume_from_checkpoint", "checkpoint-7"], "no such checkpoint folder")]
    for extra, message in cases:
        code, _, err = run_cli(["train", *train_args(tiny_model, inst, out, *extra)], capsys)
        one_line_error(code, err, message)
        assert not out.exists(), extra


def test_output_dir_that_is_a_file_or_not_writable_is_refused_first(tiny_model, inst, tmp_path, capsys,
                                                                   monkeypatch, no_model_loading):
    """--output_dir an existing file: FileExistsError after the model loaded; read-only: OSError."""
    afile = tmp_path / "model.bin"
    afile.write_bytes(b"mine")
    code, _, err = run_cli(["train", *train_args(tiny_model, inst, afile)], capsys)
    one_line_error(code, err, f"--output_dir {afile} is a file")
    assert afile.read_bytes() == b"mine"
    code, _, err = run_cli(["train", *train_args(tiny_model, inst, afile / "out")], capsys)
    one_line_error(code, err, f"{afile} is a file")

    ro = tmp_path / "read-only"
    (ro / "empty-out").mkdir(parents=True)
    os.chmod(ro / "empty-out", 0o555)
    os.chmod(ro, 0o555)
    if os.geteuid() == 0:  # root writes anyway: make the permission bits count as they do for a user
        real = os.access

        def access(path, mode, *a, **k):
            if Path(path).resolve() in (ro.resolve(), (ro / "empty-out").resolve()) and mode & os.W_OK:
                return False
            return real(path, mode, *a, **k)

        monkeypatch.setattr(os, "access", access)
    try:
        code, _, err = run_cli(["train", *train_args(tiny_model, inst, ro / "new-out")], capsys)
        one_line_error(code, err, f"cannot create --output_dir {ro / 'new-out'}", "is not writable")
        code, _, err = run_cli(["train", *train_args(tiny_model, inst, ro / "empty-out")], capsys)
        one_line_error(code, err, f"--output_dir {ro / 'empty-out'} is not writable")
        assert sorted(p.name for p in ro.iterdir()) == ["empty-out"]
    finally:
        os.chmod(ro, 0o755)
        os.chmod(ro / "empty-out", 0o755)


def test_a_folder_of_the_users_files_is_refused_before_loading_and_untouched(tiny_model, inst, tmp_path, capsys,
                                                                             no_model_loading):
    """Its unet/, vae/, ... subfolders were replaced and their files deleted (exit 0)."""
    out = tmp_path / "my-stuff"
    for sub in ("unet", "vae", "tokenizer"):
        (out / sub).mkdir(parents=True)
        (out / sub / "mine.txt").write_text(sub)
    (out / "notes.txt").write_text("notes")
    before = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    code, _, err = run_cli(["train", *train_args(tiny_model, inst, out)], capsys)
    one_line_error(code, err, "holds files dbtrain did not write (notes.txt, tokenizer, unet, vae)",
                   "choose another --output_dir")
    code, _, err = run_cli(["train", *train_args(tiny_model, inst, out, "--resume_from_checkpoint", "latest")],
                           capsys)
    one_line_error(code, err, "holds files dbtrain did not write")
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == before
    assert all((out / s / "mine.txt").read_text() == s for s in ("unet", "vae", "tokenizer"))


def test_export_replaces_only_what_an_earlier_export_of_the_run_wrote(tiny_model, tmp_path):
    from diffusers import UNet2DConditionModel

    from trainer.errors import UserError
    from trainer.formats import outdir
    from trainer.methods.full import export
    from trainer.options.train import TrainOptions

    cfg = TrainOptions()
    cfg.model.pretrained_model_name_or_path = str(tiny_model)
    model = UNet2DConditionModel.from_pretrained(tiny_model, subfolder="unet")
    out = tmp_path / "run"
    outdir.claim(out, {})
    export(cfg, model, {}, out)  # first export: writes unet/, vae/, ... and records them
    assert "unet" in outdir.read_marker(out)["exported"]
    export(cfg, model, {}, out)  # the next one may replace them
    shutil.rmtree(out / "vae")
    (out / "vae").mkdir()
    (out / "vae" / "mine.txt").write_text("mine")
    rec = outdir.read_marker(out)
    outdir.write_marker(out, exported=[n for n in rec["exported"] if n != "vae"])  # not written by us
    with pytest.raises(UserError, match="holds vae, which dbtrain did not write"):
        export(cfg, model, {}, out)
    assert (out / "vae" / "mine.txt").read_text() == "mine"
    assert not list(out.glob(".tmp-export*"))


# ------------------------------------------------------------------ interrupts

def test_sigint_before_the_first_checkpoint_saves_one_and_the_printed_command_resumes_bitwise(
        tiny_model, inst, tmp_path, capsys):
    """Ctrl-C before the first checkpoint printed 'resume with --resume_from_checkpoint latest', which
    was then refused: the work was lost. Now the interrupt saves a checkpoint and the printed command
    ends with the weights of an uninterrupted run."""
    steps = 12
    killed = tmp_path / "killed"
    argv = train_args(tiny_model, inst, killed, steps=steps)  # default --checkpointing_steps 500: none on the way
    proc = start_slow(["train", *argv], 0.25, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    log = killed / "logs" / "train_log.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if log.exists() and len(log.read_text().splitlines()) >= 2:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err
    line = [x for x in err.splitlines() if x.startswith("dbtrain: interrupted:")]
    assert len(line) == 1, err[-3000:]
    step = int(re.search(r"SIGINT at step (\d+) of", line[0]).group(1))
    assert 2 <= step < steps and (killed / f"checkpoint-{step}").is_dir()
    assert not (killed / "model_index.json").exists()
    again = resume_argv(line[0])
    assert again[0] == "train" and again[-2:] == ["--resume_from_checkpoint", "latest"]

    full = tmp_path / "full"
    code, _, err = run_cli(["train", *train_args(tiny_model, inst, full, steps=steps)], capsys)
    assert code == 0, err
    code, out, err = run_cli(again, capsys)
    assert code == 0, err
    assert f"resumed from {killed / f'checkpoint-{step}'} at step {step}" in out
    assert_same_weights(full, killed)


def test_a_run_stopped_hard_before_any_checkpoint_continues_with_the_printed_command(tiny_model, inst, tmp_path,
                                                                                    capsys, monkeypatch):
    """A run killed before its first checkpoint left logs/, and then 'latest' was refused."""
    from trainer.core import loop

    real, calls = loop.train_step, []

    def stop_at_once(run, step):
        calls.append(step)
        if len(calls) == 3:
            raise KeyboardInterrupt  # as a second Ctrl-C does: no checkpoint
        return real(run, step)

    out = tmp_path / "out"
    monkeypatch.setattr(loop, "train_step", stop_at_once)
    code, _, err = run_cli(["train", *train_args(tiny_model, inst, out)], capsys)
    assert code == 130 and "Traceback" not in err
    assert (out / "logs").is_dir() and not list(out.glob("checkpoint-*"))
    monkeypatch.setattr(loop, "train_step", real)
    code, stdout, err = run_cli(resume_argv(err), capsys)
    assert code == 0, err
    assert "starting it again at step 0" in stdout and (out / "model_index.json").is_file()


def test_demo_stopped_by_sigterm_continues_with_the_same_command(tiny_model_64, tmp_path, capsys):
    """The demo wrote nothing until its end and printed a resume advice it could not follow."""
    out = tmp_path / "demo"
    demo = ["demo", "--out", str(out), "--model", str(tiny_model_64), "--steps", "8", "--num_class_images", "2",
            "--eval_images", "2", "--sample_steps", "2"]
    proc = start_slow(demo, 0.5, stdout=subprocess.PIPE, stderr=(tmp_path / "err.txt").open("w"))
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None:
        if re.search(r"\| +[1-9]/8 ", (tmp_path / "err.txt").read_text()):  # the progress bar of training
            break
        time.sleep(0.05)
    assert (out / "before.png").is_file()  # written as soon as the base model's samples exist
    proc.send_signal(signal.SIGTERM)
    stdout, _ = proc.communicate(timeout=120)
    err = (tmp_path / "err.txt").read_text()
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "Traceback" not in err
    for k, phase in ((1, "base model samples"), (2, "class images")):
        assert re.search(rf"^\[{k}/5\] {phase}: \d+\.\d s$", stdout, re.M), stdout
    line = [x for x in err.splitlines() if x.startswith("dbtrain: interrupted:")]
    assert len(line) == 1 and "SIGTERM at step" in line[0], err[-3000:]
    assert resume_argv(line[0]) == demo

    code, stdout, err = run_cli(demo, capsys)
    assert code == 0, err
    assert "continuing the demo in" in stdout and "resumed from" in stdout
    for k, phase in ((3, "training"), (4, "fine-tuned model samples"), (5, "scores")):
        assert re.search(rf"^\[{k}/5\] {phase}: \d+\.\d s$", stdout, re.M), stdout
    assert (out / "before_after.png").is_file() and (out / "metrics.json").is_file()
    code, _, err = run_cli(demo, capsys)
    one_line_error(code, err, "holds a finished demo")


def test_demo_default_folder_is_git_ignored():
    from trainer.options.sampling import demo_parser

    default = demo_parser().get_default("out")
    assert not Path(default).is_absolute()
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    p = subprocess.run(["git", "check-ignore", "-q", default], cwd=ROOT)
    assert p.returncode == 0, f"{default}/ would land in the repository untracked"


# ------------------------------------------------------------------ disk space

def test_too_little_space_is_one_line_before_the_model_loads(tiny_model, inst, tmp_path, capsys, monkeypatch,
                                                            no_model_loading):
    """A 12 MB disk lost the whole run at its final save, with a traceback."""
    free = shutil.disk_usage(tmp_path)._replace(free=3 * 2**20)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: free)
    out = tmp_path / "out"
    code, _, err = run_cli(["train", *train_args(tiny_model, inst, out)], capsys)
    one_line_error(code, err, f"not enough free space in {tmp_path}", "needs about", "3.0 MB free")
    assert not out.exists()


def test_no_space_at_a_checkpoint_keeps_the_last_good_one(tiny_model, inst, tmp_path, capsys, monkeypatch):
    real = torch.save

    def full_disk(obj, f, *a, **k):
        if ".tmp-checkpoint-4" in str(f):
            Path(f).write_bytes(b"half")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", full_disk)
    out = tmp_path / "out"
    code, _, err = run_cli(["train", *train_args(tiny_model, inst, out, "--checkpointing_steps", "2", steps=6)],
                           capsys)
    one_line_error(code, err, f"could not write checkpoint-4 in {out}: No space left on device", "needs about",
                   f"kept the last good checkpoint {out / 'checkpoint-2'}", "resume with: dbtrain train")
    assert sorted(p.name for p in out.iterdir() if p.name.startswith((".tmp", "checkpoint"))) == ["checkpoint-2"]
    from trainer.core.checkpoint import verify

    assert verify(out / "checkpoint-2") is None


def test_no_space_for_the_final_model_keeps_the_trained_state(tiny_model, inst, tmp_path, capsys, monkeypatch):
    from diffusers import StableDiffusionPipeline

    real = StableDiffusionPipeline.save_pretrained

    def full_disk(self, folder, *a, **k):
        (Path(folder) / "unet").mkdir(parents=True)
        (Path(folder) / "unet" / "half.safetensors").write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(StableDiffusionPipeline, "save_pretrained", full_disk)
    out = tmp_path / "out"
    code, _, err = run_cli(["train", *train_args(tiny_model, inst, out)], capsys)
    line = one_line_error(code, err, f"could not write the trained model in {out}", "needs about",
                          f"the trained state is saved in {out / 'checkpoint-4'}")
    assert not list(out.glob(".tmp-export*")) and not (out / "unet").exists()
    monkeypatch.setattr(StableDiffusionPipeline, "save_pretrained", real)  # space freed
    code, _, err = run_cli(resume_argv(line), capsys)
    assert code == 0, err
    full = tmp_path / "full"
    code, _, err = run_cli(["train", *train_args(tiny_model, inst, full)], capsys)
    assert code == 0, err
    assert_same_weights(full, out)


# ------------------------------------------------------------------ damaged checkpoints

def test_damaged_checkpoint_skipped_by_latest_and_named_when_explicit(tiny_model, inst, tmp_path, capsys):
    """A truncated .safetensors in a checkpoint was a SafetensorError traceback naming no file."""
    out = tmp_path / "out"
    argv = train_args(tiny_model, inst, out, "--checkpointing_steps", "2", steps=6)
    code, _, err = run_cli(["train", *argv], capsys)
    assert code == 0, err
    first = unet(out)
    shutil.rmtree(out / "checkpoint-6")  # the final state gone too: latest must skip the damaged checkpoint-4
    bad = out / "checkpoint-4" / "unet" / "diffusion_pytorch_model.safetensors"
    with open(bad, "r+b") as f:
        f.truncate(bad.stat().st_size // 2)
    code, _, err = run_cli(["train", *argv, "--resume_from_checkpoint", "checkpoint-4"], capsys)
    one_line_error(code, err, f"checkpoint {out / 'checkpoint-4'} is damaged: {bad} is truncated",
                   f"{out / 'checkpoint-2'} is intact")
    code, stdout, err = run_cli(["train", *argv, "--resume_from_checkpoint", "latest"], capsys)
    assert code == 0, err
    assert f"dbtrain: warning: skipping checkpoint-4, it is damaged: {bad} is truncated" in err
    assert f"resumed from {out / 'checkpoint-2'} at step 2" in stdout
    again = unet(out)
    assert all(torch.equal(first[k], again[k]) for k in first)  # the same run, redone from step 2


# ------------------------------------------------------------------ fp16 on a CPU

def test_fp16_on_a_cpu_says_it_is_slow(tiny_model, inst, tmp_path, capsys):
    code, _, err = run_cli(["train", *train_args(tiny_model, inst, tmp_path / "out", "--mixed_precision", "fp16",
                                                 "--device", "cpu", steps=1)], capsys)
    assert code == 0, err
    assert re.search(r"note: --mixed_precision fp16 on a CPU runs about [\d-]+x slower than fp32", err), err


@pytest.mark.parametrize("cmd", ["sample", "fabric", "eval"])
def test_image_commands_never_write_into_a_users_folder(cmd, tiny_model, inst, tmp_path, capsys, no_model_loading):
    # sample / fabric / eval write 000.png, grid.png, ...: a folder of the user's own files is refused
    mine = tmp_path / "holiday"
    mine.mkdir()
    (mine / "000.png").write_bytes(b"the user's photo")
    extra = {"sample": ["--prompt", "a toy"], "fabric": ["--prompt", "a toy"],
             "eval": ["--instance_data_dir", str(inst), "--identifier", "sks", "--class_noun", "toy"]}[cmd]
    code, _, err = run_cli([cmd, "--model", str(tiny_model), *extra, "--out", str(mine)], capsys)
    one_line_error(code, err, str(mine), "did not write", "--out")
    assert (mine / "000.png").read_bytes() == b"the user's photo"


def test_sample_writes_into_its_own_folder_again(tiny_model, tmp_path, capsys):
    out = tmp_path / "samples"
    argv = ["sample", "--model", str(tiny_model), "--prompt", "a toy", "--num_images", "1", "--steps", "1",
            "--device", "cpu", "--out", str(out)]
    for _ in range(2):  # the second run finds the marker of the first
        code, _, err = run_cli(argv, capsys)
        assert code == 0, err
    assert (out / "000.png").is_file() and (out / ".dbtrain-run.json").is_file()


def test_resume_hint_under_torchrun_is_the_torchrun_line(monkeypatch):
    from trainer import cli

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert cli.continue_command("train", ["--output_dir", "o"]).startswith("resume with: dbtrain train --output_dir o")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    hint = cli.continue_command("textual-inversion", ["--output_dir", "o", "--resume_from_checkpoint", "checkpoint-2"])
    assert hint == ("resume with: torchrun --nproc_per_node 2 -m trainer textual-inversion --output_dir o "
                    "--resume_from_checkpoint latest")
