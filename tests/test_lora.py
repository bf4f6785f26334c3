"""LoRA DreamBooth (`dbtrain train --lora_rank R`) on a tiny SD model: only adapters train, diffusers'
own loader reads what we save, resume is exact, sample/eval take --lora, bad input gets one line."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from cli_helpers import one_line_error, run_cli, train_until_interrupt
from test_trainer import make_images
from trainer import cli
from trainer.options import train as config
from trainer.core import loop
from trainer.world.tiny_sd import build_tiny_sd


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return build_tiny_sd(tmp_path_factory.mktemp("model") / "tiny-sd")


def train_args(model, inst, out, *extra, steps=3):
    return ["train", "--pretrained_model_name_or_path", str(model), "--instance_data_dir", str(inst),
            "--instance_prompt", "a photo of [V] toy", "--output_dir", str(out), "--resolution", "32",
            "--max_train_steps", str(steps), "--learning_rate", "1e-2", "--log_every", "1", "--seed", "3",
            "--device", "cpu", "--kernels", "off", *extra]


def _probe(unet, te, tokenizer):
    """The UNet's output on a fixed input with the text encoder's embedding of a fixed prompt."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 8, 8, generator=g)
    ids = tokenizer(["a photo of sks toy"], padding="max_length", max_length=tokenizer.model_max_length,
                    return_tensors="pt").input_ids
    with torch.no_grad():
        return unet(x, torch.tensor([500]), encoder_hidden_states=te(ids)[0]).sample


@pytest.fixture(scope="module")
def lora_run(tiny_model, tmp_path_factory):
    """A LoRA run on the UNet and the text encoder, with the trained in-memory model kept for comparison."""
    tmp = tmp_path_factory.mktemp("lora")
    inst = make_images(tmp / "inst")
    seen = {}
    real_save = loop.save_model

    def keep(run, out, step):
        seen["run"] = run
        seen["probe"] = _probe(run.unet.float(), run.text_encoders["text_encoder"].float(), run.batches.tokenizers[0])
        real_save(run, out, step)

    mp = pytest.MonkeyPatch()
    mp.setattr(loop, "save_model", keep)
    try:
        assert loop.train(config.parse(train_args(
            tiny_model, inst, tmp / "out", "--lora_rank", "4", "--lora_alpha", "8", "--train_text_encoder",
            "--optimizer", "adamw")[1:])) == tmp / "out"
    finally:
        mp.undo()
    return tmp, seen


def test_only_the_adapters_train(tiny_model, lora_run):
    from diffusers import UNet2DConditionModel

    _, seen = lora_run
    run = seen["run"]
    base = UNet2DConditionModel.from_pretrained(tiny_model, subfolder="unet").state_dict()
    trainable = {n for n, p in run.unet.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)
    for name, p in run.unet.named_parameters():
        if ".lora_" in name:
            continue
        key = name.replace(".base_layer", "")
        assert torch.equal(p.detach().float(), base[key].float()), name
    lora_b = [p for n, p in run.unet.named_parameters() if "lora_B" in n]
    assert any(p.abs().max() > 0 for p in lora_b)  # B starts at zero: it moved
    assert all(p.dtype == torch.float32 for p in run.params)
    assert set(run.models) == {"unet_lora", "text_encoder_lora"}


def test_diffusers_load_lora_weights_gives_the_trained_model(tiny_model, lora_run):
    from diffusers import StableDiffusionPipeline

    tmp, seen = lora_run
    out = tmp / "out"
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model, safety_checker=None, requires_safety_checker=False)
    base = _probe(pipe.unet, pipe.text_encoder, pipe.tokenizer)
    pipe.load_lora_weights(out)  # diffusers' own loader, on the folder
    loaded = _probe(pipe.unet, pipe.text_encoder, pipe.tokenizer)
    assert not torch.allclose(base, seen["probe"], atol=1e-4)
    torch.testing.assert_close(loaded, seen["probe"], atol=1e-5, rtol=1e-4)
    # the kohya file (A1111 / ComfyUI) holds the same adapters
    kohya = [f for f in out.glob("*.safetensors") if f.name != "pytorch_lora_weights.safetensors"]
    assert len(kohya) == 1
    with safe_open(str(kohya[0]), "pt") as f:
        meta = f.metadata()
        keys = list(f.keys())
    assert meta["ss_network_dim"] == "4" and float(meta["ss_network_alpha"]) == 8 and meta["ss_steps"] == "3"
    assert any(k.startswith("lora_unet_") for k in keys) and any(k.startswith("lora_te_") for k in keys)
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model, safety_checker=None, requires_safety_checker=False)
    pipe.load_lora_weights(kohya[0].parent, weight_name=kohya[0].name)
    torch.testing.assert_close(_probe(pipe.unet, pipe.text_encoder, pipe.tokenizer), seen["probe"],
                               atol=1e-5, rtol=1e-4)
    rec = json.loads((out / "dreambooth.json").read_text())
    assert rec["method"] == "lora" and rec["base_model"] == str(tiny_model.resolve())


def test_sample_takes_a_lora_folder_or_file(tiny_model, lora_run, capsys):
    tmp, _ = lora_run
    out = tmp / "out"
    common = ["--prompt", "a photo of sks toy", "--num_images", "1", "--steps", "2", "--device", "cpu"]
    code, _, err = run_cli(["sample", "--model", str(out), "--out", str(tmp / "s1"), *common], capsys)
    assert code == 0, err
    code, _, err = run_cli(["sample", "--model", str(tiny_model), "--lora", str(out / "pytorch_lora_weights."
                                                                                    "safetensors"),
                            "--lora_scale", "0.5", "--out", str(tmp / "s2"), *common], capsys)
    assert code == 0, err
    assert (tmp / "s1" / "000.png").is_file() and (tmp / "s2" / "000.png").is_file()


def test_fused_lora_equals_the_adapters(tiny_model, lora_run):
    from trainer.methods.outputs import load_pipeline

    tmp, seen = lora_run
    pipe = load_pipeline(tmp / "out", "cpu")  # a LoRA output folder: base model + its LoRA, fused
    torch.testing.assert_close(_probe(pipe.unet, pipe.text_encoder, pipe.tokenizer), seen["probe"],
                               atol=1e-5, rtol=1e-4)


def test_resume_after_interrupt_equals_uninterrupted_run(tiny_model, tmp_path, monkeypatch):
    inst = make_images(tmp_path / "inst")
    extra = ["--lora_rank", "2", "--lora_conv", "--checkpointing_steps", "2"]
    assert cli.main(train_args(tiny_model, inst, tmp_path / "full", *extra, steps=4)) == 0
    train_until_interrupt(monkeypatch, train_args(tiny_model, inst, tmp_path / "cut", *extra, steps=4)[1:])
    assert (tmp_path / "cut" / "checkpoint-2").is_dir()
    code = cli.main(train_args(tiny_model, inst, tmp_path / "cut", *extra, "--resume_from_checkpoint", "latest",
                               steps=4))
    assert code == 0
    a = load_file(tmp_path / "full" / "pytorch_lora_weights.safetensors")
    b = load_file(tmp_path / "cut" / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys() and any("conv1" in k for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_bad_lora_input_gets_one_line(tiny_model, lora_run, tmp_path, capsys):
    tmp, _ = lora_run
    inst = make_images(tmp_path / "inst")
    for bad in ("0", "-4"):
        code, _, err = run_cli(train_args(tiny_model, inst, tmp_path / f"o{bad}", "--lora_rank", bad), capsys)
        one_line_error(code, err, "--lora_rank")
    other = build_tiny_sd(tmp_path / "other", cross_attention_dim=48)  # a model of another shape
    code, _, err = run_cli(["sample", "--model", str(other), "--lora", str(tmp / "out"), "--prompt", "a toy",
                            "--num_images", "1", "--steps", "1", "--device", "cpu", "--out", str(tmp_path / "s")],
                           capsys)
    one_line_error(code, err, "--lora", "another architecture")
    code, _, err = run_cli(["sample", "--model", str(tiny_model), "--lora", str(tmp_path / "missing.safetensors"),
                            "--prompt", "a toy", "--out", str(tmp_path / "s2")], capsys)
    one_line_error(code, err, "--lora", "no such file")


def test_prior_preservation_memory_options_and_text_encoder_checkpointing(tiny_model, tmp_path):
    """LoRA with everything the full model has: prior preservation with generated class images, AdamW8bit with
    the step inside backward, gradient checkpointing (text-encoder adapters still get gradients), our kernels."""
    inst = make_images(tmp_path / "inst")
    out = tmp_path / "out"
    code = cli.main(train_args(tiny_model, inst, out, "--lora_rank", "4", "--train_text_encoder",
                               "--with_prior_preservation", "--class_prompt", "a photo of toy", "--class_data_dir",
                               str(tmp_path / "cls"), "--num_class_images", "2", "--class_inference_steps", "2",
                               "--gradient_checkpointing", "--step_in_backward", "--optimizer", "adamw8bit",
                               "--kernels", "on", steps=2))
    assert code == 0
    assert len(list((tmp_path / "cls").glob("*.png"))) == 2
    lora = load_file(out / "pytorch_lora_weights.safetensors")
    ups = {k: v for k, v in lora.items() if "lora_B" in k}
    assert any(k.startswith("text_encoder.") and v.abs().max() > 0 for k, v in ups.items())
    assert any(k.startswith("unet.") and v.abs().max() > 0 for k, v in ups.items())
    log = [json.loads(x) for x in (out / "logs" / "train_log.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == 2 and log[-1]["loss_prior"] is not None


def test_older_diffusers_lora_names_merge_the_same(tiny_model, lora_run, tmp_path):
    """Files from diffusers' own scripts (convert_state_dict_to_diffusers: '.lora.down.weight',
    '.lora_linear_layer.up.weight') merge like peft-named ones."""
    from safetensors.torch import save_file

    from trainer.methods.outputs import load_pipeline

    tmp, seen = lora_run
    sd = load_file(tmp / "out" / "pytorch_lora_weights.safetensors")
    with safe_open(str(tmp / "out" / "pytorch_lora_weights.safetensors"), "pt") as f:
        meta = f.metadata()
    old = {}
    for k, v in sd.items():
        kind = "down" if ".lora_A." in k else "up"
        stem = k.replace(".lora_A.weight", "").replace(".lora_B.weight", "")
        old[f"{stem}.lora_linear_layer.{kind}.weight" if k.startswith("text_encoder.")
            else f"{stem}.lora.{kind}.weight"] = v
    save_file(old, str(tmp_path / "old.safetensors"), metadata=meta)
    pipe = load_pipeline(tiny_model, "cpu", lora_files=[tmp_path / "old.safetensors"])
    torch.testing.assert_close(_probe(pipe.unet, pipe.text_encoder, pipe.tokenizer), seen["probe"],
                               atol=1e-5, rtol=1e-4)
