"""Issue 33, the reading side: damaged and poisoned inputs are one line (exit 2), and a checkpoint of a run
can be sampled.

Damaged model folders (truncated or wrongly typed configs, truncated weights, pickles under weight names,
custom code asked for), NaN/inf LoRA files, alphas and embeddings, a pickled .pt LoRA, and
`dbtrain sample --model OUT/checkpoint-N` for full DreamBooth, LoRA and Textual Inversion runs.
"""
from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from cli_helpers import one_line_error, run_cli
from trainer.errors import UserError
from trainer.world.tiny_sd import build_tiny_sd

SAMPLE = ["--prompt", "a photo of sks toy", "--num_images", "1", "--steps", "1", "--device", "cpu"]
FAST = ["--optimizer", "adamw", "--kernels", "off", "--resolution", "32", "--learning_rate", "1e-4", "--seed", "3"]


class RunsCode:
    """A pickle that would run a shell command when unpickled (it must never be)."""

    marker = None

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return build_tiny_sd(tmp_path_factory.mktemp("damaged") / "model")


@pytest.fixture
def copy(model, tmp_path):
    def make(name="m"):
        return Path(shutil.copytree(model, tmp_path / name))
    return make


def sample(model, out, capsys, *extra):
    return run_cli(["sample", "--model", str(model), *SAMPLE, "--out", str(out), *extra], capsys)


def evil_pickle(tmp_path) -> bytes:
    RunsCode.marker = tmp_path / "code-ran"
    return pickle.dumps({"x": RunsCode()})


# ------------------------------------------------------------------ damaged model folders

def _truncated_config(d, tmp):
    p = d / "unet/config.json"
    p.write_text(p.read_text()[:200])
    return "unet/config.json", "not valid JSON"


def _typed_config(d, tmp):
    p = d / "unet/config.json"
    p.write_text(json.dumps({**json.loads(p.read_text()), "block_out_channels": "abc"}))
    return "unet/config.json", "block_out_channels"


def _bin_pickle(d, tmp):
    (d / "unet/diffusion_pytorch_model.safetensors").unlink()
    (d / "unet/diffusion_pytorch_model.bin").write_bytes(evil_pickle(tmp))
    return "unet/diffusion_pytorch_model.bin", "pickle"


def _safetensors_pickle(d, tmp):
    (d / "unet/diffusion_pytorch_model.safetensors").write_bytes(evil_pickle(tmp))
    return "unet/diffusion_pytorch_model.safetensors", "pickle"


def _custom_component(d, tmp):
    p = d / "model_index.json"
    p.write_text(json.dumps({**json.loads(p.read_text()), "unet": ["my_unet", "MyUNet"]}))
    return "model_index.json", "never runs code"


def _custom_pipeline(d, tmp):
    p = d / "model_index.json"
    p.write_text(json.dumps({**json.loads(p.read_text()), "_class_name": ["pipeline", "MyPipeline"]}))
    return "model_index.json", "never runs code"


def _auto_map(d, tmp):
    p = d / "text_encoder/config.json"
    p.write_text(json.dumps({**json.loads(p.read_text()), "auto_map": {"AutoModel": "modeling.MyModel"}}))
    return "text_encoder/config.json", "auto_map"


def _truncated_vae(d, tmp):
    p = d / "vae/diffusion_pytorch_model.safetensors"
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    return "vae/diffusion_pytorch_model.safetensors", "truncated"


def _nan_weights(d, tmp):
    p = d / "unet/diffusion_pytorch_model.safetensors"
    sd = load_file(p)
    sd["conv_in.weight"][0, 0, 0, 0] = float("nan")
    save_file(sd, p)
    return "unet", "conv_in.weight"


DAMAGE = [_truncated_config, _typed_config, _bin_pickle, _safetensors_pickle, _custom_component, _custom_pipeline,
          _auto_map, _truncated_vae, _nan_weights]


@pytest.mark.parametrize("damage", DAMAGE, ids=[d.__name__.strip("_") for d in DAMAGE])
def test_damaged_model_folder_is_one_line(damage, copy, tmp_path, capsys):
    d = copy()
    where, what = damage(d, tmp_path)
    code, _, err = sample(d, tmp_path / "s", capsys)
    one_line_error(code, err, str(d / where), what)
    assert not (tmp_path / "code-ran").exists()
    assert not list(tmp_path.glob("s/*.png"))


def test_damaged_folder_refused_by_train_and_export(copy, tmp_path, capsys):
    d = copy()
    _typed_config(d, tmp_path)
    code, _, err = run_cli(["export", "--model", str(d), "--single_file", str(tmp_path / "x.safetensors")], capsys)
    one_line_error(code, err, "block_out_channels")
    inst = tmp_path / "inst"
    inst.mkdir()
    code, _, err = run_cli(["train", "--pretrained_model_name_or_path", str(d), "--instance_data_dir", str(inst),
                            "--instance_prompt", "a [V] toy", "--output_dir", str(tmp_path / "o"), *FAST], capsys)
    one_line_error(code, err, "block_out_channels")


# ------------------------------------------------------------------ non-finite LoRA files and embeddings

def _lora_for(model, path, *, alpha=2.0, poison=None):
    """A kohya LoRA for the tiny model's attention projections (poison: 'nan' / 'inf' weight, 'alpha' inf)."""
    from diffusers import UNet2DConditionModel

    from trainer.formats import kohya_lora as kl

    unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet")
    torch.manual_seed(0)
    sd = {}
    for name, m in unet.named_modules():
        if name.endswith("attn1.to_q"):
            k = kl.kohya_name("unet", name)
            sd[f"{k}.lora_down.weight"] = torch.randn(2, m.weight.shape[1]) * 0.1
            sd[f"{k}.lora_up.weight"] = torch.randn(m.weight.shape[0], 2) * 0.1
            sd[f"{k}.alpha"] = torch.tensor(alpha)
    if poison == "nan":
        sd[next(k for k in sorted(sd) if k.endswith("lora_up.weight"))][0, 0] = float("nan")
    elif poison == "inf":
        sd[next(k for k in sorted(sd) if k.endswith("lora_down.weight"))][0, 0] = float("inf")
    elif poison == "alpha":
        sd[next(k for k in sorted(sd) if k.endswith(".alpha"))] = torch.tensor(float("inf"))
    save_file(sd, path)
    return path


@pytest.mark.parametrize("poison", ["nan", "inf", "alpha"])
def test_non_finite_lora_is_refused_by_sample_and_export(poison, model, tmp_path, capsys):
    bad = _lora_for(model, tmp_path / "bad.safetensors", poison=poison)
    code, _, err = sample(model, tmp_path / "s", capsys, "--lora", str(bad))
    one_line_error(code, err, str(bad), "NaN or inf" if poison != "alpha" else "alpha")
    out = tmp_path / "merged.safetensors"
    code, _, err = run_cli(["export", "--model", str(model), "--lora", str(bad), "--merge", "--single_file",
                            str(out)], capsys)
    one_line_error(code, err, str(bad))
    assert not out.exists() and not list(tmp_path.glob("s/*.png"))


def test_export_that_overflows_float16_writes_nothing(model, tmp_path, capsys):
    """A LoRA strong enough that the merged weights pass float16's range: --half would write inf."""
    huge = _lora_for(model, tmp_path / "huge.safetensors", alpha=1e8)
    out = tmp_path / "merged.safetensors"
    code, _, err = run_cli(["export", "--model", str(model), "--lora", str(huge), "--merge", "--single_file",
                            str(out), "--half"], capsys)
    one_line_error(code, err, str(out), "NaN or inf", "float16")
    assert not out.exists()


def test_good_lora_still_samples(model, tmp_path, capsys):
    good = _lora_for(model, tmp_path / "good.safetensors")
    code, out, err = sample(model, tmp_path / "s", capsys, "--lora", str(good))
    assert code == 0, err
    assert "merged" in out


def test_non_finite_embedding_is_refused(model, tmp_path, capsys):
    emb = tmp_path / "bad.safetensors"
    rows = torch.zeros(1, 32)
    rows[0, 3] = float("nan")
    save_file({"<bad>": rows}, emb)
    code, _, err = sample(model, tmp_path / "s", capsys, "--embedding", str(emb))
    one_line_error(code, err, str(emb), "NaN or inf")


def test_pickled_lora_says_pickle(model, tmp_path, capsys):
    """A .pt LoRA was refused as "header too large"; one that would run code is refused as the pickle it is,
    and a plain tensor pickle is read weights-only, as every pickle dbtrain reads."""
    evil = tmp_path / "evil.pt"
    evil.write_bytes(evil_pickle(tmp_path))
    code, _, err = sample(model, tmp_path / "s", capsys, "--lora", str(evil))
    line = one_line_error(code, err, str(evil), "pickle")
    assert "header too large" not in line.lower() and "HeaderTooLarge" not in line
    assert not (tmp_path / "code-ran").exists()
    plain = tmp_path / "plain.pt"
    torch.save(load_file(_lora_for(model, tmp_path / "good.safetensors")), plain)
    code, out, err = sample(model, tmp_path / "s2", capsys, "--lora", str(plain))
    assert code == 0, err


# ------------------------------------------------------------------ sampling a checkpoint

@pytest.fixture(scope="module")
def runs(model, tmp_path_factory):
    """Three tiny runs (full with the text encoder, LoRA, Textual Inversion) with checkpoint-2 of 3 steps."""
    from PIL import Image

    from trainer import cli

    root = tmp_path_factory.mktemp("runs")
    inst = root / "inst"
    inst.mkdir()
    for k in range(2):
        Image.new("RGB", (32, 32), (200, 60 * k, 40)).save(inst / f"{k}.png")
    common = ["--pretrained_model_name_or_path", str(model), "--max_train_steps", "3", "--checkpointing_steps", "2",
              *FAST]
    argv = {"full": ["train", "--instance_data_dir", str(inst), "--instance_prompt", "a photo of [V] toy",
                     "--train_text_encoder"],
            "lora": ["train", "--instance_data_dir", str(inst), "--instance_prompt", "a photo of [V] toy",
                     "--lora_rank", "4", "--lora_alpha", "2", "--train_text_encoder"],
            "ti": ["textual-inversion", "--train_data_dir", str(inst), "--placeholder_token", "<tok>",
                   "--initializer_token", "toy"]}
    for name, a in argv.items():
        assert cli.main([*a, *common, "--output_dir", str(root / name)]) == 0
        assert (root / name / "checkpoint-2").is_dir()
    return root


@pytest.mark.parametrize("run", ["full", "lora", "ti"])
def test_sample_a_checkpoint(run, runs, tmp_path, capsys):
    code, out, err = sample(runs / run / "checkpoint-2", tmp_path / "s", capsys)
    assert code == 0, err
    assert (tmp_path / "s" / "000.png").is_file()
    if run == "ti":
        assert "write <tok> in the prompt" in out


def test_checkpoint_parts_are_the_trained_ones(runs, model):
    """The full run's checkpoint UNet / text encoder, and the LoRA checkpoint's adapters merged at alpha/rank."""
    from trainer.methods.outputs import load_pipeline

    ck = runs / "full" / "checkpoint-2"
    pipe = load_pipeline(ck, "cpu")
    want = load_file(ck / "unet/diffusion_pytorch_model.safetensors")
    got = pipe.unet.state_dict()
    assert all(torch.equal(got[k], v) for k, v in want.items())
    te = load_file(ck / "text_encoder/model.safetensors")
    assert any(not torch.equal(te[k], load_file(model / "text_encoder/model.safetensors")[k]) for k in te)

    ck = runs / "lora" / "checkpoint-2"
    pipe = load_pipeline(ck, "cpu")
    base = load_file(model / "unet/diffusion_pytorch_model.safetensors")
    adapters = load_file(ck / "unet_lora/adapter.safetensors")
    k = next(k for k in adapters if k.endswith("attn1.to_q.lora_A.weight"))
    mod = k[: -len(".lora_A.weight")]
    delta = 2 / 4 * adapters[mod + ".lora_B.weight"] @ adapters[k]
    torch.testing.assert_close(pipe.unet.state_dict()[mod + ".weight"], base[mod + ".weight"] + delta)


def test_checkpoint_without_its_base_or_damaged(runs, tmp_path, capsys):
    moved = tmp_path / "alone"
    shutil.copytree(runs / "full", moved)
    state = moved / "checkpoint-2" / "training_state.json"
    rec = json.loads(state.read_text())
    rec["config"]["pretrained_model_name_or_path"] = str(tmp_path / "gone")
    state.write_text(json.dumps(rec))
    marker = moved / ".dbtrain-run.json"
    m = json.loads(marker.read_text())
    m["config"]["pretrained_model_name_or_path"] = str(tmp_path / "gone")
    marker.write_text(json.dumps(m))
    code, _, err = sample(moved / "checkpoint-2", tmp_path / "s", capsys)
    one_line_error(code, err, str(tmp_path / "gone"), "base model")

    damaged = tmp_path / "damaged"
    shutil.copytree(runs / "lora", damaged)
    p = damaged / "checkpoint-2" / "unet_lora" / "adapter.safetensors"
    p.write_bytes(p.read_bytes()[:-100])
    code, _, err = sample(damaged / "checkpoint-2", tmp_path / "s", capsys)
    one_line_error(code, err, "damaged", "adapter.safetensors")


def test_eval_of_a_checkpoint(runs, tmp_path):
    """`dbtrain eval --model OUT/checkpoint-N` passes its checks (the base model resolved, the checkpoint whole)
    and knows the subject from the run's options; a damaged checkpoint is one line."""
    from trainer.methods.outputs import recorded_subject
    from trainer.options.sampling import parse_eval
    from trainer.world import evaluate

    ck = runs / "full" / "checkpoint-2"
    evaluate.check(parse_eval(["--model", str(ck), "--instance_data_dir", str(runs / "inst")]))
    assert recorded_subject(ck)["class_noun"] == "toy"
    damaged = tmp_path / "full"
    shutil.copytree(runs / "full", damaged)
    (damaged / "checkpoint-2" / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"\0" * 10)
    with pytest.raises(UserError, match="damaged"):
        evaluate.check(parse_eval(["--model", str(damaged / "checkpoint-2"), "--instance_data_dir",
                                   str(runs / "inst")]))


def test_textual_inversion_output_moves_with_its_base(runs, model, tmp_path, capsys):
    """Issue 34 item 7: dreambooth.json records the base relative to the output folder (and absolute)."""
    rec = json.loads((runs / "ti" / "dreambooth.json").read_text())
    assert not Path(rec["base_model"]).is_absolute()
    assert rec["base_model_absolute"] == str(model.resolve())
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(model, elsewhere / model.relative_to(runs.parent.parent))
    shutil.copytree(runs / "ti", elsewhere / (runs / "ti").relative_to(runs.parent.parent))
    shutil.move(str(model), str(tmp_path / "hidden"))  # the original base is gone: only the copy resolves
    try:
        code, out, err = sample(elsewhere / (runs / "ti").relative_to(runs.parent.parent), tmp_path / "s", capsys)
        assert code == 0, err
    finally:
        shutil.move(str(tmp_path / "hidden"), str(model))
