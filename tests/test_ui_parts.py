"""The parts of `dbtrain ui` that need no browser (trainer.ui's modules without Gradio): the form's command line,
the CLI's messages, the run folders and their logs, the loss plot, the one-process slot with Stop as Ctrl-C,
the FABRIC rounds, and `dbtrain ui` itself without Gradio or off loopback."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

from trainer import cli
from trainer.options.sampling import BUILTIN_MODEL
from trainer.options.ui import is_loopback, parse
from trainer.ui import fabric_rounds as fr
from trainer.ui import forms, plot, runs
from trainer.ui.jobs import Busy, Job, Slot, error_line, last_lines


def test_form_is_the_demo_like_command_line(tmp_path):
    form = forms.TrainForm(prior_preservation=True, num_class_images=10, other_flags="--snr_gamma 5 --use_ema")
    argv = forms.train_argv(form, tmp_path)
    assert argv[0] == "train"
    got = {f: v for f, v in zip(argv, argv[1:] + [""]) if f.startswith("--")}
    assert got["--instance_data_dir"] == str(tmp_path / "photos") and got["--output_dir"] == str(tmp_path / "model")
    assert got["--instance_prompt"] == "a [V] star" and got["--identifier"] == "sks"
    assert got["--resolution"] == "64"  # the built-in model's own size, read from its configs
    assert got["--class_prompt"] == "a star" and got["--class_data_dir"] == str(tmp_path / "class-images")
    assert got["--validation_prompt"] == "a [V] star on the beach"
    assert argv[-3:] == ["--snr_gamma", "5", "--use_ema"] and "--with_prior_preservation" in argv
    assert forms.check_argv(argv) is None


@pytest.mark.parametrize("method, want", [("LoRA", ["--lora_rank", "8"]),
                                          ("Pivotal tuning", ["--train_text_embedding", "--initializer_token", "red"])])
def test_methods_are_flags_of_dbtrain_train(tmp_path, method, want):
    argv = forms.train_argv(forms.TrainForm(method=method, initializer_token="red"), tmp_path)
    assert argv[0] == "train" and " ".join(want) in " ".join(argv)
    assert forms.check_argv(argv) is None


def test_textual_inversion_is_its_own_command(tmp_path):
    (tmp_path / "photos").mkdir()  # (its parser looks for the folder)
    argv = forms.train_argv(forms.TrainForm(method="Textual Inversion"), tmp_path)
    assert argv[:7] == ["textual-inversion", "--train_data_dir", str(tmp_path / "photos"), "--placeholder_token",
                        "<sks>", "--initializer_token", "star"]
    assert forms.check_argv(argv) is None


def test_bad_flags_come_back_as_the_clis_one_line(tmp_path):
    parse_error = forms.check_argv(forms.train_argv(forms.TrainForm(other_flags="--learning_rate fast"), tmp_path))
    assert parse_error == "dbtrain train: error: argument --learning_rate: invalid float value: 'fast'"
    check_error = forms.check_argv(forms.train_argv(forms.TrainForm(other_flags="--snr_gamma -1"), tmp_path))
    assert check_error == "dbtrain: error: --snr_gamma must be > 0, got -1.0"
    with pytest.raises(Exception, match="close every quote"):
        forms.train_argv(forms.TrainForm(other_flags="--validation_prompt 'a star"), tmp_path)
    with pytest.raises(Exception, match="one word"):
        forms.train_argv(forms.TrainForm(identifier="two words"), tmp_path)
    assert "got 2" in forms.check_photos(2) and "got 21" in forms.check_photos(21) and forms.check_photos(3) is None


def test_native_resolution_and_estimate_verdict():
    assert forms.native_resolution(str(BUILTIN_MODEL)) == 64
    assert forms.native_resolution("/nonexistent") is None
    report = ("by phase\npredicted peak: 0.80 GiB (860060254 bytes): fits the 8 GB card, 7.20 GiB to spare\n"
              "where the GPU run differs from this estimate:\n  - notes")
    assert forms.verdict(report) == ("predicted peak: 0.80 GiB (860060254 bytes): fits the 8 GB card, 7.20 GiB to "
                                     "spare", "")
    over = ("predicted peak: 1.23 GiB: does not fit the 0.5 GB card (0.73 GiB over)\nto fit the 0.5 GB card, add:\n"
            "  --gradient_checkpointing   0.93 GiB\nwhere the GPU run differs from this estimate:\n  - notes")
    assert forms.verdict(over)[1] == "to fit the 0.5 GB card, add:\n  --gradient_checkpointing   0.93 GiB"
    assert forms.verdict("nothing") == ("", "")


def test_new_folders_are_never_reused_and_uploads_keep_their_stems(tmp_path):
    a, b = runs.new_folder(tmp_path, "train"), runs.new_folder(tmp_path, "train")
    assert a != b and a.is_dir() and b.is_dir()
    src = tmp_path / "src"
    src.mkdir()
    (src / "My Dog (1).JPG").write_bytes(b"x")
    (src / "other").mkdir()
    (src / "other" / "My Dog (1).JPG").write_bytes(b"y")
    got = runs.copy_in([str(src / "My Dog (1).JPG"), str(src / "other" / "My Dog (1).JPG")], a / "photos")
    assert [p.name for p in got] == ["My_Dog_1.jpg", "My_Dog_1_2.jpg"]
    assert [p.read_bytes() for p in got] == [b"x", b"y"]
    assert runs.safe_name("../../etc/passwd") == "passwd"


def test_read_log_keeps_the_last_record_of_a_step(tmp_path):
    logs = tmp_path / "logs"
    logs.mkdir()
    rec = lambda s, v: json.dumps({"step": s, "loss": v, "loss_instance": v, "loss_prior": None})  # noqa: E731
    (logs / "train_log.jsonl").write_text("\n".join([rec(1, 0.5), rec(2, 0.4), rec(2, 0.3), rec(3, 0.2)])
                                          + '\n{"step": 4, "lo')  # a line being written
    got = runs.read_log(tmp_path)
    assert [(r["step"], r["loss"]) for r in got] == [(1, 0.5), (2, 0.3), (3, 0.2)]
    (tmp_path / "checkpoint-20").mkdir()
    (tmp_path / "checkpoint-5").mkdir()
    (tmp_path / "checkpoint-x").mkdir()
    assert runs.checkpoints(tmp_path) == [5, 20]


def test_loss_plot_has_a_point_per_logged_step_and_term():
    records = [{"step": s, "loss": 1.0 / s, "loss_instance": 1.0 / s, "loss_prior": 0.5 / s} for s in range(1, 6)]
    svg = plot.loss_svg(records, max_steps=10)
    assert svg.count('class="loss-point"') == 10
    assert svg.count('data-series="prior"') == 5 and "prior loss" in svg
    no_prior = [dict(r, loss_prior=None) for r in records]
    assert plot.loss_svg(no_prior).count('data-series="prior"') == 0
    assert "loss-point" not in plot.loss_svg([])
    flat = plot.loss_svg([{"step": 1, "loss": 0.2, "loss_instance": 0.2}])  # one point: a range around it
    assert flat.count('class="loss-point"') == 1 and "nan" not in flat
    assert 'data-state="running"' in plot.progress_html(3, 10, "running")


def _sleeper(tmp_path) -> list[str]:
    """A child that behaves as dbtrain train under Ctrl-C: it says so, 'saves', exits 130."""
    return ["-c", "import signal, sys, time\n"
                  "def stop(*a):\n"
                  "    print('dbtrain: interrupted: SIGINT at step 3 of 9; saved checkpoint-3', flush=True)\n"
                  "    sys.exit(130)\n"
                  "signal.signal(signal.SIGINT, stop)\n"
                  "print('rea' 'dy', flush=True)\n"
                  "time.sleep(60)\n"]


def test_one_run_at_a_time_and_stop_is_ctrl_c(tmp_path, monkeypatch):
    import trainer.ui.jobs as jobs

    real = jobs.subprocess.Popen
    # the child is `python -c ...` instead of `python -m trainer ...`
    monkeypatch.setattr(jobs.subprocess, "Popen", lambda cmd, **kw: real([sys.executable, *cmd[3:]], **kw))
    slot = Slot()
    job = slot.start(Job("train", [*_sleeper(tmp_path)], tmp_path / "a.log"))
    deadline = time.time() + 30
    while "ready" not in (tmp_path / "a.log").read_text() and time.time() < deadline:
        time.sleep(0.1)
    with pytest.raises(Busy, match="a train run is going"):
        slot.start(Job("sample", ["-c", "pass"], tmp_path / "b.log"))
    assert not (tmp_path / "b.log").exists()
    job.stop()
    assert job.wait(30) == 130 and job.stop_requested
    assert job.message() == "dbtrain: interrupted: SIGINT at step 3 of 9; saved checkpoint-3"
    done = slot.run(Job("sample", ["-c", "print('ok')"], tmp_path / "b.log"), timeout=30)  # the slot is free again
    assert done.returncode == 0 and done.message() is None
    assert last_lines(tmp_path / "b.log")[-1] == "ok"


def test_log_lines_and_the_clis_message():
    assert error_line(["x", "dbtrain: error: --resolution must be a multiple of 8", "trailing"]) \
        == "dbtrain: error: --resolution must be a multiple of 8"
    assert error_line(["usage: ...", "dbtrain train: error: argument --seed: invalid int value: 'a'"]) \
        == "dbtrain train: error: argument --seed: invalid int value: 'a'"
    assert error_line(["all good"]) is None


def test_last_lines_read_progress_bars_as_lines(tmp_path):
    (tmp_path / "log").write_text("a\n 10%|#   |\r 20%|##  |\x1b[A\nb\n")
    assert last_lines(tmp_path / "log", 3) == [" 10%|#   |", " 20%|##  |", "b"]


def _png(path: Path):
    from PIL import Image

    Image.new("RGB", (8, 8), (255, 0, 0)).save(path)


def test_fabric_rounds_carry_all_feedback_and_new_seeds(tmp_path):
    s = fr.new_session(tmp_path, model="M", prompt="a star", negative="", num_images=3, steps=5, seed=10,
                       device="cpu")
    first = fr.next_round_argv(s)
    assert "--liked" not in first and first[first.index("--seed") + 1] == "10"
    out = Path(first[first.index("--out") + 1])
    out.mkdir()
    for k in range(3):
        _png(out / f"{k:03d}.png")
    _png(out / "grid.png")
    fr.add_round(s, first)
    assert len(s["rounds"][0]["images"]) == 3  # (not grid.png)
    fr.give(s, 0, "liked")
    fr.give(s, 1, "disliked")
    fr.give(s, 2, "liked")
    fr.give(s, 2, "liked")  # the same button again takes it back
    second = fr.next_round_argv(s)
    assert second[second.index("--seed") + 1] == "13"  # round 2: seed + num_images
    assert second[second.index("--liked") + 1:second.index("--disliked")] == [str(out / "000.png")]
    assert second[second.index("--disliked") + 1:] == [str(out / "001.png")]
    assert second[second.index("--out") + 1].endswith("round-2")
    copies = fr.liked_copies(s)
    assert [Path(p).name for p in copies] == ["round-1-000.png"]
    fr.give(s, 0, "liked")  # un-liked: its copy goes, its picture stays
    assert fr.liked_copies(s) == [] and (out / "000.png").is_file()
    assert json.loads((Path(s["folder"]) / fr.SESSION_FILE).read_text())["verdicts"] == {str(out / "001.png"):
                                                                                          "disliked"}


def test_ui_options_and_loopback():
    a = parse([])
    assert (a.host, a.port) == ("127.0.0.1", 7860) and Path(a.model) == BUILTIN_MODEL
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.5") and not is_loopback("myhost")


def test_dbtrain_ui_without_gradio_says_how_to_install_it(monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gradio" else real(name, *a))
    assert cli.main(["ui"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and 'pip install ".[ui]"' in err, err


def test_dbtrain_ui_off_loopback_warns(monkeypatch, capsys):
    pytest.importorskip("gradio", reason="Gradio is not installed (pip install '.[ui]')")
    import trainer.ui.app as app

    launched = []
    monkeypatch.setattr(app, "launch", lambda opts: launched.append(opts))
    assert cli.main(["ui", "--host", "0.0.0.0", "--port", "7999"]) == 0
    assert launched[0].host == "0.0.0.0"
    assert "anyone who can reach this port can start runs" in capsys.readouterr().err
    assert cli.main(["ui", "--port", "70000"]) == 2


def test_photos_are_shown_as_the_trainer_reads_them(tmp_path):
    from PIL import Image

    from trainer.ui.photos import match_masks, preview

    upright = Image.new("RGB", (40, 20), (200, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: a viewer turns it 90 degrees
    upright.save(tmp_path / "turned.jpg", exif=exif)
    rgba = Image.new("RGBA", (16, 16), (0, 0, 255, 255))
    rgba.paste((0, 0, 0, 0), (0, 0, 8, 16))  # left half transparent
    rgba.save(tmp_path / "cut.png")
    Image.new("RGB", (16, 16), (0, 200, 0)).save(tmp_path / "plain.png")
    Image.new("L", (16, 16), 0).save(tmp_path / "mask_plain.png")
    mask = tmp_path / "masks" / "plain.png"
    mask.parent.mkdir()
    Image.new("L", (16, 16), 0).save(mask)  # black: this picture is not trained anywhere
    photos = [tmp_path / "turned.jpg", tmp_path / "cut.png", tmp_path / "plain.png"]
    shown = preview(photos, match_masks(photos, [mask]), masked_loss=True)
    (turned, t_caption), (cut, c_caption), (plain, p_caption) = shown
    assert turned.size == (20, 40) and "turned upright (EXIF)" in t_caption and "20x40" in t_caption
    r, g, b = cut.getpixel((2, 8))  # transparent: white (as the trainer composites it), darkened (masked out)
    assert r == g == b and r < 128 and cut.getpixel((12, 8))[2] == 255
    assert preview([tmp_path / "cut.png"], {}, masked_loss=False)[0][0].getpixel((2, 8)) == (255, 255, 255)
    assert "transparent areas on white" in c_caption and "mask from alpha" in c_caption
    assert "mask plain.png" in p_caption and max(plain.getpixel((8, 8))) < 200 * 0.5  # darkened where masked out
    with pytest.raises(Exception, match="no photo of the same name"):
        match_masks(photos, [tmp_path / "mask_plain.png"])
    Image.new("L", (8, 8), 0).save(mask)
    with pytest.raises(Exception, match="must have its image's size"):
        preview(photos, match_masks(photos, [mask]), masked_loss=False)


def test_a_restarted_app_shows_its_last_run(tmp_path):
    older, newer = runs.new_folder(tmp_path, "train"), runs.new_folder(tmp_path, "train")
    runs.write_json(older / runs.RUN_FILE, {"argv": ["train", "--a"], "max_steps": 5, "created": 1.0})
    runs.write_json(newer / runs.RUN_FILE, {"argv": ["train", "--b"], "max_steps": 7, "created": 2.0})
    (tmp_path / "train-broken").mkdir()
    (tmp_path / "train-broken" / runs.RUN_FILE).write_text("{")
    got = runs.latest_run(tmp_path)
    assert got["folder"] == str(newer) and got["argv"] == ["train", "--b"] and got["max_steps"] == 7
    assert runs.latest_run(tmp_path / "none") is None


def test_other_flags_cannot_move_the_run_out_of_its_folder(tmp_path):
    for flags in ("--output_dir /tmp/elsewhere", "--output_d /tmp/x", "--class_data_dir=~/pics",
                  "--max_train_steps 5", "--logging_dir /abs"):
        with pytest.raises(Exception, match="is set by the page"):
            forms.train_argv(forms.TrainForm(other_flags=flags), tmp_path)
    assert forms.train_argv(forms.TrainForm(other_flags="--snr_gamma 5"), tmp_path)[-2:] == ["--snr_gamma", "5"]


def test_ui_options_refuse_a_model_that_is_not_one_and_a_runs_dir_that_is_a_file(tmp_path):
    from trainer.errors import UserError

    with pytest.raises(UserError, match="not a diffusers model folder"):
        parse(["--model", str(tmp_path)])
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="is a file"):
        parse(["--runs_dir", str(tmp_path / "file")])


def test_an_earlier_apps_child_still_running_holds_the_slot(tmp_path):
    """The app was killed, its run goes on: a restarted app finds it by its pid file and refuses to start
    another until it ends; Stop stops it."""
    import subprocess

    from trainer.ui.jobs import pid_file, write_pid

    argv = ["-c", "import time; time.sleep(60)", "trainer"]
    child = subprocess.Popen([sys.executable, *argv])
    try:
        log = tmp_path / "train-1" / "ui-train.log"
        log.parent.mkdir()
        write_pid(pid_file(log), child.pid, argv)
        stale = tmp_path / "train-0" / "ui-train.pid"
        stale.parent.mkdir()
        write_pid(stale, 999999, argv)  # a pid that is gone: not adopted
        slot = Slot()
        slot.adopt([stale, pid_file(log)])
        assert slot.orphan() == child.pid and "earlier dbtrain ui" in slot.busy()
        with pytest.raises(Busy, match="earlier dbtrain ui"):
            slot.start(Job("train", ["-c", "pass"], tmp_path / "x.log"))
        assert slot.stop() is None
        assert child.wait(30) != 0
        assert slot.orphan() is None and slot.busy() is None
    finally:
        child.kill()


def test_the_message_is_this_runs_not_the_last_runs_in_the_same_log(tmp_path, monkeypatch):
    import trainer.ui.jobs as jobs

    real = jobs.subprocess.Popen
    monkeypatch.setattr(jobs.subprocess, "Popen", lambda cmd, **kw: real([sys.executable, *cmd[3:]], **kw))
    log = tmp_path / "ui-train.log"
    log.write_text("dbtrain: interrupted: SIGINT at step 3 of 9; saved checkpoint-3\n")  # the stopped run's
    job = Job("train", ["-c", "import sys; print('Traceback: boom'); sys.exit(1)"], log).start()
    assert job.wait(30) == 1
    assert job.message() == "Traceback: boom"


def test_a_port_in_use_is_one_line(tmp_path, capsys):
    pytest.importorskip("gradio", reason="Gradio is not installed (pip install '.[ui]')")
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert cli.main(["ui", "--port", str(port), "--runs_dir", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("dbtrain: error: cannot listen on 127.0.0.1:") and "--port" in err[-1], err
