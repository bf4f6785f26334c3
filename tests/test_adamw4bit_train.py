"""`dbtrain train --optimizer adamw4bit`: the 4-bit states through the trainer (checkpoint and bitwise resume,
step_in_backward with bf16 weights, Textual Inversion), the optimizer fixed once a run starts, and `dbtrain
estimate` counting its states."""
from __future__ import annotations

import json

import torch

from test_trainer import args, make_images, run_cli, unet_state, tiny_model  # noqa: F401 (the fixture)

from trainer.cli import main

FOUR = ["--optimizer", "adamw4bit", "--kernels", "off"]


def _one_line(code, err, text):
    last = err.strip().splitlines()[-1]  # (after the start's notes)
    assert code == 2 and last.startswith("dbtrain: error:") and text in last, err


def test_resume_from_a_checkpoint_equals_the_uninterrupted_run(tiny_model, tmp_path, capsys):  # noqa: F811
    """4 steps at once == 2 steps, stopped, then resumed from checkpoint-2: the same weights bit for bit (the
    packed 4-bit codes, the absmax and the seeds survive the checkpoint)."""
    make_images(tmp_path / "inst")
    full = args(tiny_model, tmp_path, *FOUR, "--checkpointing_steps", "2", steps=4)
    assert run_cli(["train", *full], capsys)[0] == 0
    whole = unet_state(tmp_path / "out")
    half = args(tiny_model, tmp_path, *FOUR, "--checkpointing_steps", "2", steps=4)
    half[half.index("--output_dir") + 1] = str(tmp_path / "half")
    first = list(half)
    first[first.index("--max_train_steps") + 1] = "2"
    assert run_cli(["train", *first], capsys)[0] == 0
    state = torch.load(tmp_path / "half" / "checkpoint-2" / "optimizer.pt", weights_only=True)
    assert all(g.get("state_bits") == 4 for g in state["param_groups"])
    packed = [s for s in state["state"].values() if "state1" in s]
    assert packed and all(s["state1"].dtype == torch.uint8 for s in packed)
    code, err = run_cli(["train", *half, "--resume_from_checkpoint", "latest"], capsys)
    assert code == 0, err
    resumed = unet_state(tmp_path / "half")
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)
    # the optimizer is fixed once a run starts: resuming it with AdamW8bit is refused in one line
    eight = [a if a != "adamw4bit" else "adamw8bit" for a in half]
    eight[eight.index("--max_train_steps") + 1] = "6"
    _one_line(*run_cli(["train", *eight, "--resume_from_checkpoint", "latest"], capsys), "--optimizer")


def test_step_in_backward_with_bf16_weights(tiny_model, tmp_path, capsys):  # noqa: F811
    make_images(tmp_path / "inst")
    a = args(tiny_model, tmp_path, *FOUR, "--weights_dtype", "bf16", "--step_in_backward",
             "--gradient_checkpointing", steps=2)
    code, err = run_cli(["train", *a], capsys)
    assert code == 0, err
    state = unet_state(tmp_path / "out")
    assert all(v.dtype == torch.bfloat16 for v in state.values())
    base = unet_state(tiny_model)
    assert any(not torch.equal(v.float(), base[k].float().to(torch.bfloat16).float()) for k, v in state.items())
    bad = args(tiny_model, tmp_path, "--optimizer", "adamw", "--step_in_backward", steps=2)
    _one_line(*run_cli(["train", *bad], capsys), "--step_in_backward needs --optimizer adamw8bit or adamw4bit")


def test_textual_inversion_with_adamw4bit(tiny_model, tmp_path, capsys):  # noqa: F811
    make_images(tmp_path / "inst")
    code, err = run_cli(["textual-inversion", "--pretrained_model_name_or_path", str(tiny_model),
                         "--train_data_dir", str(tmp_path / "inst"), "--placeholder_token", "<new>",
                         "--initializer_token", "toy", "--output_dir", str(tmp_path / "ti"), "--resolution", "32",
                         "--max_train_steps", "2", "--train_batch_size", "1", "--optimizer", "adamw4bit"], capsys)
    assert code == 0, err
    assert (tmp_path / "ti" / "learned_embeds.safetensors").is_file()


def test_estimate_counts_half_the_state_of_adamw8bit(tiny_model, capsys):  # noqa: F811
    got = {}
    for opt in ("adamw8bit", "adamw4bit"):
        assert main(["estimate", "--pretrained_model_name_or_path", str(tiny_model), "--resolution", "32",
                     "--optimizer", opt, "--json"]) == 0
        rec = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        got[opt] = rec["by_category"]["optimizer_state"], rec["trainable_params"]
    (s8, n8), (s4, n4) = got["adamw8bit"], got["adamw4bit"]
    # the tiny UNet's many tensors under 4096 elements keep fp32 states (8 B each) with either optimizer: 0.63 here
    assert n8 == n4 and s4 < 0.7 * s8
