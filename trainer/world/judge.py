"""The tiny judge: CLIP-style image and text encoders trained on the procedural world.

It stands in for the models the DreamBooth paper measures with, none of which may be
downloaded here:
- `clip` image/text embeddings, trained contrastively on (image, caption) pairs: CLIP-I, CLIP-T;
- `dino` image embeddings from a self-supervised head on the same image tower, trained to tell
  each image from every other under small shifts and flips (SimCLR-style), so it sees pattern,
  colour, shape and place, not just what captions name: DINO and PRES;
- `features`: the tower's normalised feature maps, compared as LPIPS compares VGG's (without
  LPIPS's learned weights): DIV.
Its training data has patterned objects (stripes, dots, checks) which the base text-to-image
model never saw; the judge must be able to see what DreamBooth is asked to learn.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from trainer.formats.io import normal_permissions
from trainer.world import JUDGE_DIR

MAX_TOKENS = 16


def _block(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1), nn.GroupNorm(8, cout), nn.SiLU(),
                         nn.Conv2d(cout, cout, 3, 1, 1), nn.GroupNorm(8, cout), nn.SiLU())


class ImageTower(nn.Module):
    def __init__(self, width: int = 16):
        super().__init__()
        w = width
        self.stages = nn.ModuleList([_block(3, w, 2), _block(w, 2 * w, 2), _block(2 * w, 4 * w, 2),
                                     _block(4 * w, 8 * w, 2)])  # 32, 16, 8, 4 pixels
        self.out_dim = 8 * w

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        feats = []
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        return x.mean(dim=(2, 3)), feats


class Judge(nn.Module):
    def __init__(self, vocab_size: int, width: int = 16, dim: int = 64):
        super().__init__()
        from transformers import CLIPTextConfig, CLIPTextModel

        self.config = {"vocab_size": vocab_size, "width": width, "dim": dim}
        self.image = ImageTower(width)
        self.text = CLIPTextModel(CLIPTextConfig(
            vocab_size=vocab_size, hidden_size=dim, intermediate_size=2 * dim, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=MAX_TOKENS, bos_token_id=vocab_size - 2,
            eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1, projection_dim=dim))
        self.clip_image = nn.Linear(self.image.out_dim, dim)
        self.clip_text = nn.Linear(dim, dim)
        self.ssl = nn.Sequential(nn.Linear(self.image.out_dim, 128), nn.SiLU(), nn.Linear(128, dim))
        self.logit_scale = nn.Parameter(torch.tensor(2.6))
        self.tokenizer = None

    # ---- embeddings (inputs: images in [-1, 1], N x 3 x 64 x 64) ----
    def image_embeddings(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        pooled, feats = self.image(x)
        return {"clip": F.normalize(self.clip_image(pooled), dim=-1), "dino": F.normalize(self.ssl(pooled), dim=-1),
                "features": feats[:3]}

    def text_embeddings(self, prompts: list[str]) -> torch.Tensor:
        ids = self.tokenizer(prompts, padding="max_length", max_length=MAX_TOKENS, truncation=True,
                             return_tensors="pt").input_ids.to(self.clip_text.weight.device)
        return F.normalize(self.clip_text(self.text(ids).pooler_output), dim=-1)

    # ---- files ----
    def save(self, folder: Path) -> None:
        from safetensors.torch import save_file

        folder = Path(folder)
        tmp = folder.with_name(folder.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()},
                  str(tmp / "judge.safetensors"))
        (tmp / "config.json").write_text(json.dumps(self.config, indent=1))
        self.tokenizer.save_pretrained(tmp / "tokenizer")
        normal_permissions(tmp)  # (safetensors writes owner-only files)
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)

    @classmethod
    def load(cls, folder: Path | str | None = None) -> Judge:
        from safetensors.torch import load_file
        from transformers import CLIPTokenizer

        folder = Path(folder or JUDGE_DIR)
        if not (folder / "judge.safetensors").is_file():
            from trainer.errors import UserError

            raise UserError(f"no judge at {folder} (expected judge.safetensors, config.json, tokenizer/); "
                            f"python -m trainer.world.tiny pretrain makes one")
        judge = cls(**json.loads((folder / "config.json").read_text()))
        judge.load_state_dict(load_file(str(folder / "judge.safetensors")))
        judge.tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
        return judge.eval()


def _augment(x: torch.Tensor, g: torch.Generator, shift: int = 6) -> torch.Tensor:
    """A random shift (edge pixels repeated) and horizontal flip per image."""
    n, _, h, w = x.shape
    pad = F.pad(x, (shift,) * 4, mode="replicate")
    dx = torch.randint(0, 2 * shift + 1, (n,), generator=g).tolist()
    dy = torch.randint(0, 2 * shift + 1, (n,), generator=g).tolist()
    flip = torch.rand(n, generator=g).lt(0.5).tolist()
    out = torch.stack([pad[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])
    return torch.where(torch.tensor(flip).view(n, 1, 1, 1), out.flip(-1), out)
