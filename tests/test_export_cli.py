"""`dbtrain export`: single file, LoRA merged into a single file / folder, diffusers -> kohya; bad input."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from cli_helpers import add_random_lora, one_line_error, run_cli
from trainer.families import SD, SDXL
from trainer.formats import kohya_lora as kl
from trainer.formats import single_file as sf
from trainer.world.tiny_sd import build_tiny_sd

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny model and a diffusers-format LoRA for it (UNet + text encoder, alpha != rank)."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig, get_peft_model_state_dict

    root = tmp_path_factory.mktemp("export")
    folder = build_tiny_sd(root / "model")
    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    torch.manual_seed(0)
    ucfg = LoraConfig(r=4, lora_alpha=2, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                      init_lora_weights="gaussian")
    tcfg = LoraConfig(r=4, lora_alpha=2, target_modules=["q_proj", "v_proj"], init_lora_weights="gaussian")
    add_random_lora(pipe.unet, [pipe.text_encoder], ucfg, tcfg)
    lora_dir = root / "lora"
    StableDiffusionPipeline.save_lora_weights(
        lora_dir, unet_lora_layers=get_peft_model_state_dict(pipe.unet),
        text_encoder_lora_layers=get_peft_model_state_dict(pipe.text_encoder),
        unet_lora_adapter_metadata=ucfg.to_dict(), text_encoder_lora_adapter_metadata=tcfg.to_dict())
    return {"root": root, "model": folder, "lora": lora_dir / "pytorch_lora_weights.safetensors"}


def test_single_file(setup, capsys):
    out = setup["root"] / "plain.safetensors"
    code, stdout, err = run_cli(["export", "--model", str(setup["model"]), "--single_file", str(out)], capsys)
    assert code == 0, err
    assert "wrote" in stdout and out.is_file()
    unet = SD.load_models(setup["model"])[0]
    sd = load_file(str(out))
    assert torch.equal(sd["model.diffusion_model.input_blocks.0.0.weight"], unet.conv_in.weight)


def test_kohya_then_merge(setup, capsys, tmp_path):
    kohya = tmp_path / "subject.safetensors"
    code, stdout, err = run_cli(["export", "--lora", str(setup["lora"]), "--kohya", str(kohya),
                                 "--model", str(setup["model"])], capsys)
    assert code == 0, err
    with safe_open(str(kohya), "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    assert all(k.startswith(("lora_unet_", "lora_te_")) for k in keys)
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "2.0"
    assert meta["ss_sd_model_name"] == "model" and meta["ss_base_model_version"] == "sd_v1"

    single, folder = tmp_path / "merged.safetensors", tmp_path / "merged"
    code, stdout, err = run_cli(["export", "--model", str(setup["model"]), "--lora", str(kohya), "--merge",
                                 "--lora_scale", "0.5", "--single_file", str(single), "--output_dir", str(folder)],
                                capsys)
    assert code == 0, err
    want = dict(zip(("unet", "vae", "text_encoder"),  # from the diffusers file: the same LoRA
                    SD.merge_lora(setup["model"], setup["lora"], scale=0.5)))
    got_single = sf.diffusers_state_dicts(load_file(str(single)), want["unet"].config, want["vae"].config)
    got_folder = SD.load_models(folder)
    for i, name in enumerate(("unet", "vae", "text_encoder")):
        ref = want[name].state_dict()
        for got in (got_single[name], got_folder[i].state_dict()):
            assert set(got) == set(ref)
            for k in ref:
                torch.testing.assert_close(got[k], ref[k], rtol=0, atol=1e-6)
    base = SD.load_models(setup["model"])[0].state_dict()
    k = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight"
    assert not torch.allclose(got_folder[0].state_dict()[k], base[k])


def test_parse_is_torch_free(setup):
    code = ("import sys; from trainer.commands import export as export_cli; "
            f"export_cli.parse(['--model', {str(setup['model'])!r}, '--single_file', 'x.safetensors']); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_bad_input(setup, capsys, tmp_path):
    model, lora = str(setup["model"]), str(setup["lora"])
    existing = tmp_path / "exists.safetensors"
    existing.write_bytes(b"user's")
    notsd = tmp_path / "notsd"
    notsd.mkdir()
    full = tmp_path / "full"
    full.mkdir()
    (full / "x.txt").write_text("x")
    lora_run = tmp_path / "lora_run"
    lora_run.mkdir()
    (lora_run / "pytorch_lora_weights.safetensors").write_bytes(setup["lora"].read_bytes())
    pt = tmp_path / "lora.pt"
    pt.write_bytes(b"x")
    cases = [
        (["--model", str(tmp_path / "nope"), "--single_file", "o.safetensors"], "is not a folder"),
        (["--model", str(notsd), "--single_file", "o.safetensors"], "not a diffusers Stable Diffusion folder"),
        (["--model", model, "--single_file", str(existing)], "already exists"),
        (["--model", model, "--single_file", str(tmp_path / "o.ckpt")], "must end in .safetensors"),
        (["--model", model], "say what to write"),
        (["--model", model, "--merge", "--single_file", "o.safetensors"], "--merge needs --lora"),
        (["--model", model, "--lora", lora, "--single_file", "o.safetensors"], "needs --merge"),
        (["--kohya", "o.safetensors"], "--kohya needs --lora"),
        (["--lora", str(pt), "--kohya", "o.safetensors"], "only .safetensors"),
        (["--model", model, "--lora", lora, "--merge", "--output_dir", str(full)], "not an empty folder"),
        (["--lora", lora, "--merge", "--single_file", "o.safetensors"], "--model DIR is needed"),
        (["--model", str(lora_run), "--single_file", "o.safetensors"], "holds a LoRA, not a model"),
    ]
    for argv, part in cases:
        code, _, err = run_cli(["export", *argv], capsys)
        one_line_error(code, err, part)
    assert existing.read_bytes() == b"user's"


def test_lora_of_another_architecture(setup, capsys, tmp_path):
    sd, meta = kl.read_lora(setup["lora"])
    k = next(k for k in sd if "attn2.to_k.lora_A" in k)
    sd[k] = torch.zeros(4, 48)  # made for a text encoder of width 48
    bad = tmp_path / "other.safetensors"
    save_file(sd, str(bad), metadata=meta)
    out = tmp_path / "m.safetensors"
    code, _, err = run_cli(["export", "--model", str(setup["model"]), "--lora", str(bad), "--merge",
                            "--single_file", str(out)], capsys)
    one_line_error(code, err, "another architecture")
    assert not out.exists()
    code, _, err = run_cli(["export", "--model", str(setup["model"]), "--lora", str(bad), "--kohya",
                            str(tmp_path / "k.safetensors")], capsys)
    one_line_error(code, err, "another architecture")
    assert not (tmp_path / "k.safetensors").exists()


# ------------------------------------------------------------------ SDXL (lora_te1_ / lora_te2_)

@pytest.fixture(scope="module")
def setup_xl(tmp_path_factory):
    """A tiny SDXL folder and a diffusers-format LoRA on its UNet and both text encoders (alpha != rank)."""
    from peft import LoraConfig, get_peft_model_state_dict

    from diffusers import StableDiffusionXLPipeline
    from trainer.world.tiny_sdxl import build_tiny_sdxl

    root = tmp_path_factory.mktemp("export_xl")
    folder = build_tiny_sdxl(root / "model")
    c = SDXL.load_components(folder)
    torch.manual_seed(0)
    ucfg = LoraConfig(r=4, lora_alpha=2, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                      init_lora_weights="gaussian")
    tcfg = LoraConfig(r=4, lora_alpha=2, target_modules=["q_proj", "v_proj"], init_lora_weights="gaussian")
    add_random_lora(c.unet, [c.text_encoder, c.text_encoder_2], ucfg, tcfg)
    lora_dir = root / "lora"
    StableDiffusionXLPipeline.save_lora_weights(
        lora_dir, unet_lora_layers=get_peft_model_state_dict(c.unet),
        text_encoder_lora_layers=get_peft_model_state_dict(c.text_encoder),
        text_encoder_2_lora_layers=get_peft_model_state_dict(c.text_encoder_2),
        unet_lora_adapter_metadata=ucfg.to_dict(), text_encoder_lora_adapter_metadata=tcfg.to_dict(),
        text_encoder_2_lora_adapter_metadata=tcfg.to_dict())
    return {"root": root, "model": folder, "lora": lora_dir / "pytorch_lora_weights.safetensors"}


def test_sdxl_kohya_then_merge(setup_xl, capsys, tmp_path):
    """--kohya writes lora_unet_/lora_te1_/lora_te2_; --merge of that file (single file and folder) equals
    the SDXL family's merge of the diffusers file, on all four parts."""
    from trainer.formats.single_file_sdxl import diffusers_state_dicts_sdxl

    merge_lora_sdxl, load_components_sdxl = SDXL.merge_lora, SDXL.load_models

    model = str(setup_xl["model"])
    kohya = tmp_path / "subject.safetensors"
    code, _, err = run_cli(["export", "--lora", str(setup_xl["lora"]), "--kohya", str(kohya), "--model", model],
                           capsys)
    assert code == 0, err
    with safe_open(str(kohya), "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    assert {k.split("_")[1] for k in keys} == {"unet", "te1", "te2"}
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0" and meta["ss_network_alpha"] == "2.0"

    single, folder = tmp_path / "merged.safetensors", tmp_path / "merged"
    code, _, err = run_cli(["export", "--model", model, "--lora", str(kohya), "--merge", "--lora_scale", "0.5",
                            "--single_file", str(single), "--output_dir", str(folder)], capsys)
    assert code == 0, err
    want = merge_lora_sdxl(model, setup_xl["lora"], scale=0.5)
    got_single = diffusers_state_dicts_sdxl(load_file(str(single)), want[0].config, want[1].config)
    got_folder = load_components_sdxl(folder)
    names = ("unet", "vae", "text_encoder", "text_encoder_2")
    for i, name in enumerate(names):
        ref = {k.removeprefix("text_model."): v for k, v in want[i].state_dict().items()}
        for got in (got_single[name], got_folder[i].state_dict()):
            got = {k.removeprefix("text_model."): v for k, v in got.items()}
            common = set(got) & set(ref)
            assert len(common) >= 0.9 * len(ref), name
            for k in common:
                torch.testing.assert_close(got[k], ref[k], rtol=0, atol=1e-6)
    base = load_components_sdxl(model)
    for i in (0, 2, 3):  # the LoRA moved the UNet and both encoders
        assert any(not torch.equal(a, b) for a, b in zip(base[i].state_dict().values(),
                                                         got_folder[i].state_dict().values()))


def test_sdxl_kohya_without_model_and_bad_lora(setup_xl, capsys, tmp_path):
    out = tmp_path / "k.safetensors"
    code, _, err = run_cli(["export", "--lora", str(setup_xl["lora"]), "--kohya", str(out)], capsys)
    assert code == 0, err
    with safe_open(str(out), "pt") as f:  # the second encoder's adapters say SDXL
        assert f.metadata()["ss_base_model_version"] == "sdxl_base_v1-0"
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"x")
    code, _, err = run_cli(["export", "--model", str(setup_xl["model"]), "--lora", str(bad), "--merge",
                            "--single_file", str(tmp_path / "o.safetensors")], capsys)
    one_line_error(code, err, "not a readable .safetensors", "is an SDXL model")
    assert not (tmp_path / "o.safetensors").exists()
