"""What the CLI tests share: run `dbtrain ...` in-process and check a one-line error."""
from __future__ import annotations

from trainer import cli


def run_cli(argv, capsys):
    """(exit code, stdout, stderr) of `dbtrain ARGV`, in this process."""
    code = cli.main(argv)
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def one_line_error(code, err, *parts):
    """Exit 2, no traceback, exactly one `dbtrain: error:` line holding every part; returns that line."""
    assert code == 2, err
    assert "Traceback" not in err, err
    lines = [x for x in err.splitlines() if x.startswith("dbtrain: error:")]
    assert len(lines) == 1, err
    for part in parts:
        assert part in lines[0], lines[0]
    return lines[0]


def write_tiny_judge(folder, tokenizer_dir, max_positions: int):
    """Tiny random CLIP and DINO (ViT) folders for `dbtrain eval --clip_model/--dino_model`; (clip_dir, dino_dir)."""
    import torch
    from transformers import (CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer, ViTConfig,
                              ViTImageProcessor, ViTModel)

    torch.manual_seed(0)
    clip_dir, dino_dir = folder / "clip", folder / "dino"
    tok = CLIPTokenizer.from_pretrained(tokenizer_dir)
    CLIPModel(CLIPConfig(
        text_config={"vocab_size": len(tok), "hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "max_position_embeddings": max_positions, "bos_token_id": len(tok) - 2,
                     "eos_token_id": len(tok) - 1, "pad_token_id": len(tok) - 1},
        vision_config={"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "image_size": 32, "patch_size": 8},
        projection_dim=16)).save_pretrained(clip_dir)
    CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size=32),
                  tokenizer=tok).save_pretrained(clip_dir)
    ViTModel(ViTConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2,
                       image_size=32, patch_size=8), add_pooling_layer=False).save_pretrained(dino_dir)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(dino_dir)
    return clip_dir, dino_dir


def train_until_interrupt(monkeypatch, train_argv, at_step: int = 3) -> None:
    """`dbtrain train ARGV` in this process, stopped by a KeyboardInterrupt as step `at_step` begins."""
    import pytest

    from trainer.options import train as config
    from trainer.core import loop

    real_step = loop.train_step

    def stop(run, step):
        if step == at_step:
            raise KeyboardInterrupt
        return real_step(run, step)

    monkeypatch.setattr(loop, "train_step", stop)
    with pytest.raises(KeyboardInterrupt):
        loop.train(config.parse(train_argv))
    monkeypatch.setattr(loop, "train_step", real_step)


def add_random_lora(unet, encoders, ucfg, tcfg) -> None:
    """peft LoRA adapters on the UNet (ucfg) and each text encoder (tcfg; peft's injection, as transformers'
    add_adapter wants peft >= 0.22), with random B (it starts at zero: make the LoRA do something)."""
    from peft import inject_adapter_in_model

    unet.add_adapter(ucfg)
    for te in encoders:
        inject_adapter_in_model(tcfg, te)
    for m in (unet, *encoders):
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.data.normal_(0, 0.05)
