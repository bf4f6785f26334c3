"""One run per output folder, the divergence guard, and resuming with other flags (issues 33 and 34)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cli_helpers import one_line_error, run_cli
from test_trainer import FAST, args, make_images, read_log
from trainer.core import guard
from trainer.formats import outdir
from trainer.world.tiny_sd import build_tiny_sd

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return build_tiny_sd(tmp_path_factory.mktemp("model") / "tiny-sd")


def _env():
    return {**os.environ, "PYTHONPATH": str(ROOT)}


# ---------------------------------------------------------------- two runs, one folder

def test_a_second_run_into_a_held_folder_is_refused_before_its_model_loads(tiny_model, tmp_path):
    make_images(tmp_path / "inst")
    first = subprocess.Popen([sys.executable, "-m", "trainer", "train", *args(tiny_model, tmp_path, *FAST, steps=40),
                              "--checkpointing_steps", "10"], env=_env(), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    lock = tmp_path / "out" / outdir.LOCK
    deadline = time.time() + 120
    while not (lock.is_file() and lock.stat().st_size) and first.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert first.poll() is None, first.communicate()
    second = subprocess.run([sys.executable, "-m", "trainer", "train", *args(tiny_model, tmp_path, *FAST, steps=40),
                             "--resume_from_checkpoint", "latest"], env=_env(), capture_output=True, text=True)
    out_a, err_a = first.communicate(timeout=600)
    assert first.returncode == 0, err_a
    line = one_line_error(second.returncode, second.stderr, "in use by another dbtrain run", f"pid {first.pid}")
    assert "identifier:" not in second.stdout  # refused before the model (and its tokenizer) loaded
    assert "saved" in out_a and (tmp_path / "out" / "unet").is_dir(), line
    assert [r["step"] for r in read_log(tmp_path / "out")] == list(range(1, 41))  # one run's log, not two


def test_the_lock_dies_with_its_process_and_a_refused_run_leaves_no_folder(tmp_path):
    folder = tmp_path / "held"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from trainer.formats import outdir; "
                               "outdir.hold(sys.argv[1]); print('held', flush=True); time.sleep(60)", str(folder)],
                              env=_env(), stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(outdir.InUse, match=f"pid {holder.pid}"):
        outdir.hold(folder)
    holder.kill()  # SIGKILL: no cleanup ran, yet the lock is free
    holder.wait()
    assert outdir.hold(folder) == folder
    outdir.release(folder)
    assert folder.is_dir()  # not made by this process: kept
    new = tmp_path / "new"
    outdir.hold(new)
    outdir.release(new)
    assert not new.exists()  # made for nothing: removed


# ---------------------------------------------------------------- divergence

def test_full_fine_tuning_that_diverges_stops_and_keeps_no_diverged_checkpoint(tiny_model, tmp_path, capsys):
    make_images(tmp_path / "inst")
    a = args(tiny_model, tmp_path, *FAST, "--checkpointing_steps", "3", steps=12)
    a[a.index("--learning_rate") + 1] = "1e3"
    code, _, err = run_cli(["train", *a], capsys)
    line = one_line_error(code, err, "training diverged at step 1", "norm", "no good checkpoint",
                          "lower --learning_rate")
    out = tmp_path / "out"
    assert outdir.list_checkpoints(out) == [] and not (out / "unet").exists(), line


def test_textual_inversion_that_diverges_stops(tiny_model, tmp_path, capsys):
    make_images(tmp_path / "inst")
    code, _, err = run_cli(["textual-inversion", "--pretrained_model_name_or_path", str(tiny_model),
                         "--train_data_dir", str(tmp_path / "inst"), "--placeholder_token", "<toy>",
                         "--initializer_token", "toy", "--output_dir", str(tmp_path / "out"), "--resolution", "32",
                         "--max_train_steps", "6", "--train_batch_size", "1", "--learning_rate", "1e3",
                         "--lr_warmup_steps", "0", "--save_steps", "100", "--kernels", "off"], capsys)
    one_line_error(code, err, "training diverged at step 1", "norm")
    assert not list((tmp_path / "out").glob("learned_embeds*"))


def test_guard_bounds_and_what_it_sets_aside(tmp_path):
    p = torch.nn.Parameter(torch.ones(100))
    g = guard.Guard([p], zero_loss=1.0)
    for step in range(1, 11):  # a healthy start: loss about 0.1
        assert g.check(step, 0.1, True) is None
    assert g.suspect_since is None
    assert g.check(11, 0.5, True) is None and g.suspect_since is None  # a noisy step is not suspect
    for step in range(12, 40):  # the loss climbs: suspect from the step its average passed 3x, diverged past 10x
        why = g.check(step, 5.0, True)
        if why:
            break
    assert why and "moving average" in why and g.suspect_since is not None and g.suspect_since < step
    # a state that is 101x its starting norm has diverged, at once
    g2 = guard.Guard([p])
    with torch.no_grad():
        p.mul_(101)
    assert "norm" in g2.check(1, 0.1, True)
    # skipped steps in a row
    g3 = guard.Guard([torch.nn.Parameter(torch.ones(3))])
    whys = [g3.check(s, float("nan"), False) for s in range(1, guard.SKIP_BOUND + 1)]
    assert whys[:-1] == [None] * (guard.SKIP_BOUND - 1) and "in a row" in whys[-1]
    # checkpoints written while suspect are set aside (kept, not resumable)
    for s in (3, 6, 9):
        (tmp_path / f"checkpoint-{s}").mkdir()
    moved = guard.set_aside(tmp_path, 5, outdir.list_checkpoints)
    assert moved == ["diverged-checkpoint-6", "diverged-checkpoint-9"]
    assert [s for s, _ in outdir.list_checkpoints(tmp_path)] == [3]


def test_an_overflowing_update_of_small_state_is_taken_back():
    p = torch.nn.Parameter(torch.ones(4))
    g = guard.Guard([p])
    g.before_update()
    with torch.no_grad():
        p[1] = float("inf")
    assert g.update_was_finite()  # small state: restored, the step counts as skipped
    assert torch.equal(p.detach(), torch.ones(4))


# ---------------------------------------------------------------- resume with other flags

def test_train_more_continues_from_the_final_state_with_the_new_schedule(tiny_model, tmp_path, capsys):
    make_images(tmp_path / "inst")
    base = [*FAST, "--checkpointing_steps", "2"]
    code, _, err = run_cli(["train", *args(tiny_model, tmp_path, *base, steps=3)], capsys)
    assert code == 0, err
    out = tmp_path / "out"
    assert [s for s, _ in outdir.list_checkpoints(out)] == [2, 3]  # the final state is kept
    # the same command again: finished, nothing to do
    code, _, err = run_cli(["train", *args(tiny_model, tmp_path, *base, "--resume_from_checkpoint", "latest",
                                           steps=3)], capsys)
    one_line_error(code, err, "finished at step 3", "--max_train_steps above 3")
    # more steps at a lower learning rate: continued from step 3, the new rate used and said
    a = args(tiny_model, tmp_path, *base, "--resume_from_checkpoint", "latest", steps=5)
    a[a.index("--learning_rate") + 1] = "5e-5"
    code, stdout, err = run_cli(["train", *a], capsys)
    assert code == 0, err
    assert "resuming checkpoint-3 with changed options" in stdout
    assert "--max_train_steps 3 -> 5" in stdout and "--learning_rate 0.0001 -> 5e-05" in stdout
    assert "at step 3" in stdout
    log = read_log(out)
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5]
    assert [r["lr"] for r in log[-2:]] == [5e-5, 5e-5]
    state = json.loads((out / "checkpoint-5" / "training_state.json").read_text())
    assert state["config"]["learning_rate"] == 5e-5 and "guard" in state


def test_resume_refuses_what_cannot_change_before_the_model_loads(tiny_model, tmp_path, capsys):
    make_images(tmp_path / "inst")
    code, _, err = run_cli(["train", *args(tiny_model, tmp_path, *FAST, "--checkpointing_steps", "2", steps=3)],
                           capsys)
    assert code == 0, err
    a = args(tiny_model, tmp_path, *FAST, "--resume_from_checkpoint", "latest", "--lora_rank", "4", steps=6)
    a[a.index("--resolution") + 1] = "40"
    code, stdout, err = run_cli(["train", *a], capsys)
    one_line_error(code, err, "cannot resume", "--resolution: the run's 32, now 40",
                   "--lora_rank: the run there trains the full model, not LoRA adapters", "new --output_dir")
    assert "identifier:" not in stdout


def test_a_broken_class_image_is_named_before_the_model_loads(tiny_model, tmp_path, capsys):
    make_images(tmp_path / "inst")
    cls = make_images(tmp_path / "cls", n=1)
    (cls / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    code, stdout, err = run_cli(["train", *args(tiny_model, tmp_path, *FAST, "--with_prior_preservation",
                                                "--class_data_dir", str(cls), "--class_prompt", "a photo of toy",
                                                "--num_class_images", "4")], capsys)
    one_line_error(code, err, "broken.png")
    assert "identifier:" not in stdout and not (tmp_path / "out").exists()
