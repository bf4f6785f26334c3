"""`dbtrain train --save_single_file`: the trained model (full or LoRA merged into the base) also as one
original-layout .safetensors file, read back by diffusers' own from_single_file."""
from __future__ import annotations

import torch

from test_lora import _probe, train_args
from test_trainer import make_images
from trainer import cli


def _from_single_file(path, config):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_single_file(str(path), config=str(config), local_files_only=True,
                                                    safety_checker=None, requires_safety_checker=False)


def test_full_and_lora_runs_write_a_single_file_diffusers_reads(tmp_path):
    from diffusers import StableDiffusionPipeline

    from trainer.methods.outputs import load_pipeline
    from trainer.world.tiny_sd import build_tiny_sd

    model = build_tiny_sd(tmp_path / "tiny-sd")
    inst = make_images(tmp_path / "inst")
    full, low = tmp_path / "full", tmp_path / "low"
    assert cli.main(train_args(model, inst, full, "--save_single_file", "--optimizer", "adamw", steps=2)) == 0
    assert cli.main(train_args(model, inst, low, "--save_single_file", "--lora_rank", "4", "--train_text_encoder",
                               steps=2)) == 0
    for out, name, want in ((full, "full.safetensors", full), (low, "low-merged.safetensors", low)):
        ref = load_pipeline(want, "cpu")  # the folder (full) or base + LoRA merged by us (LoRA)
        assert (out / name).is_file(), sorted(p.name for p in out.iterdir())
        got = _from_single_file(out / name, model)
        torch.testing.assert_close(_probe(got.unet, got.text_encoder, got.tokenizer),
                                   _probe(ref.unet, ref.text_encoder, ref.tokenizer), atol=1e-5, rtol=1e-4)
    base = StableDiffusionPipeline.from_pretrained(model, safety_checker=None, requires_safety_checker=False)
    merged = _from_single_file(low / "low-merged.safetensors", model)
    assert not torch.allclose(_probe(base.unet, base.text_encoder, base.tokenizer),
                              _probe(merged.unet, merged.text_encoder, merged.tokenizer), atol=1e-4)
