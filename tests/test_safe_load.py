"""Files from strangers: nothing dbtrain reads may run code while it is loaded.

The payload is a .pt whose unpickling writes a marker file. Before issue 14 the trainer's
resume read optimizer.pt, scheduler.pt, scaler.pt and rng_state.pt with weights_only=False,
which runs it.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from trainer.core import checkpoint
from trainer import cli
from trainer.formats import safe_load
from trainer.errors import UserError


class _Payload:
    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):  # unpickling calls exec(...): the marker appears if the file was trusted
        return (exec, (f"open({self.marker!r}, 'w').write('ran')",))


def evil_pt(path: Path, marker: Path, inner=None) -> Path:
    torch.save({"state": {}, "param_groups": [], "x": _Payload(marker), **(inner or {})}, path)
    return path


def test_the_payload_is_real(tmp_path):
    """Control: a plain torch.load(weights_only=False) does run it (so the tests below can fail)."""
    marker = tmp_path / "ran"
    torch.load(evil_pt(tmp_path / "e.pt", marker), weights_only=False)
    assert marker.read_text() == "ran"


def test_load_tensors_refuses_code_in_one_line_and_runs_nothing(tmp_path):
    marker = tmp_path / "ran"
    path = evil_pt(tmp_path / "embedding.pt", marker)
    with pytest.raises(safe_load.Refused) as e:
        safe_load.load_tensors(path)
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg and "refused" in msg and "exec" in msg
    assert not marker.exists()
    # the embedding reader too (A1111 .pt files are pickles)
    from trainer.formats.embedding_files import read_embedding

    with pytest.raises(UserError, match="refused"):
        read_embedding(path)
    assert not marker.exists()
    # plain tensor pickles and safetensors load
    torch.save({"string_to_param": {"*": torch.ones(2, 4)}, "name": "x", "step": 3}, tmp_path / "ok.pt")
    assert safe_load.load_tensors(tmp_path / "ok.pt")["step"] == 3
    from safetensors.torch import save_file

    save_file({"emb_params": torch.ones(1, 4)}, str(tmp_path / "ok.safetensors"))
    assert safe_load.load_tensors(tmp_path / "ok.safetensors")["emb_params"].shape == (1, 4)
    (tmp_path / "garbage.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{broken")
    with pytest.raises(UserError, match="not a readable safetensors file"):
        safe_load.load_tensors(tmp_path / "garbage.safetensors")


def test_rng_state_round_trips_and_old_numpy_files_still_load(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    torch.save(checkpoint.rng_state(), tmp_path / "rng_state.pt")
    a = (random.random(), np.random.rand(), torch.rand(1).item())
    checkpoint.set_rng_state(torch.load(tmp_path / "rng_state.pt", weights_only=True))  # no allow-list needed
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == a
    # checkpoints written before this change hold numpy's state as an ndarray: allow-listed, still loads
    old = tmp_path / "old"
    old.mkdir()
    np.random.seed(5)
    torch.save({"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()},
               old / "rng_state.pt")
    b = np.random.rand()
    checkpoint.set_rng_state(checkpoint.load_pt(old / "rng_state.pt"))
    assert np.random.rand() == b


def test_resume_refuses_a_checkpoint_file_that_would_run_code(tmp_path, capsys):
    from PIL import Image

    from trainer.world.tiny_sd import build_tiny_sd

    model = build_tiny_sd(tmp_path / "m")
    inst = tmp_path / "inst"
    inst.mkdir()
    for k in range(2):
        Image.new("RGB", (32, 32), (200, 60 * k, 40)).save(inst / f"{k}.png")
    out = tmp_path / "out"
    argv = ["train", "--pretrained_model_name_or_path", str(model), "--instance_data_dir", str(inst),
            "--instance_prompt", "a [V] toy", "--output_dir", str(out), "--resolution", "32",
            "--max_train_steps", "3", "--checkpointing_steps", "2", "--optimizer", "adamw", "--kernels", "off"]
    assert cli.main(argv) == 0, capsys.readouterr().err
    marker = tmp_path / "ran"
    for name in ("optimizer.pt", "scheduler.pt", "rng_state.pt"):
        ck = out / "checkpoint-2"
        saved = (ck / name).read_bytes()
        evil_pt(ck / name, marker)
        state = json.loads((ck / "training_state.json").read_text())
        state["files"][name] = (ck / name).stat().st_size  # sizes agree: only the content is hostile
        (ck / "training_state.json").write_text(json.dumps(state))
        capsys.readouterr()
        code = cli.main(argv + ["--resume_from_checkpoint", "checkpoint-2"])
        err = capsys.readouterr().err
        assert code == 2 and "Traceback" not in err, err
        lines = [x for x in err.splitlines() if x.startswith("dbtrain: error:")]
        assert len(lines) == 1 and str(ck / name) in lines[0] and "refused to load" in lines[0], err
        assert not marker.exists(), name
        (ck / name).write_bytes(saved)
        state["files"][name] = len(saved)
        (ck / "training_state.json").write_text(json.dumps(state))
