"""The DreamBooth paper's metrics, on embeddings from the built-in judge or local CLIP / DINO weights.

- DINO    subject fidelity: mean cosine of DINO(-like) embeddings, every generated [V] image
          against every real subject image.
- CLIP-I  subject fidelity, the same with CLIP(-like) image embeddings.
- CLIP-T  prompt fidelity: mean cosine of each generated image with its prompt, the identifier
          left out ("a [V] dog on the beach" is scored against "a dog on the beach").
- PRES    prior preservation: DINO(-like) cosine of "a [class]" samples against the real subject
          images; high means the class prior drifted toward the subject.
- DIV     diversity: mean perceptual distance between samples of the same prompt (LPIPS in
          the paper; here the judge's unweighted LPIPS-like distance).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .config import UserError

METRICS = ("DINO", "CLIP-I", "CLIP-T", "PRES", "DIV")


def to_judge_tensor(images, size: int = 64) -> torch.Tensor:
    arr = np.stack([np.asarray(im.convert("RGB").resize((size, size), resample=3), dtype=np.float32)
                    for im in images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).div(127.5).sub(1.0)


class Scorer:
    """Embeddings for the metrics. The judge by default; --clip_model / --dino_model replace its
    CLIP-like or DINO-like part with real weights from a local folder (transformers format)."""

    def __init__(self, judge_dir=None, clip_model=None, dino_model=None, device="cpu"):
        from .world.judge import Judge

        self.device = torch.device(device)
        self.judge = Judge.load(judge_dir).to(self.device)
        self.clip = self.dino = None
        self.names = {"clip": "judge", "dino": "judge"}
        if clip_model:
            from transformers import AutoProcessor, CLIPModel

            path = _local_folder(clip_model, "--clip_model")
            self.clip = (CLIPModel.from_pretrained(path, local_files_only=True).to(self.device).eval(),
                         AutoProcessor.from_pretrained(path, local_files_only=True))
            self.names["clip"] = str(path)
        if dino_model:
            from transformers import AutoImageProcessor, AutoModel

            path = _local_folder(dino_model, "--dino_model")
            self.dino = (AutoModel.from_pretrained(path, local_files_only=True).to(self.device).eval(),
                         AutoImageProcessor.from_pretrained(path, local_files_only=True))
            self.names["dino"] = str(path)

    @torch.no_grad()
    def images(self, images) -> dict[str, torch.Tensor | list[torch.Tensor]]:
        emb = self.judge.image_embeddings(to_judge_tensor(images).to(self.device))
        if self.clip is not None:
            model, proc = self.clip
            px = proc(images=list(images), return_tensors="pt")["pixel_values"].to(self.device)
            emb["clip"] = F.normalize(_tensor(model.get_image_features(pixel_values=px)), dim=-1)
        if self.dino is not None:
            model, proc = self.dino
            px = proc(images=list(images), return_tensors="pt")["pixel_values"].to(self.device)
            emb["dino"] = F.normalize(model(pixel_values=px).last_hidden_state[:, 0], dim=-1)  # the CLS token
        return emb

    @torch.no_grad()
    def texts(self, prompts: list[str]) -> torch.Tensor:
        if self.clip is not None:
            model, proc = self.clip
            tok = proc.tokenizer(prompts, padding=True, truncation=True, return_tensors="pt").to(self.device)
            return F.normalize(_tensor(model.get_text_features(**tok)), dim=-1)
        return self.judge.text_embeddings(prompts)


def _tensor(out) -> torch.Tensor:
    """get_*_features returns a tensor in transformers 4, an output object in some 5.x versions."""
    if isinstance(out, torch.Tensor):
        return out
    for name in ("image_embeds", "text_embeds", "pooler_output"):
        if getattr(out, name, None) is not None:
            return getattr(out, name)
    raise TypeError(f"unexpected CLIP features output {type(out).__name__}")


def _local_folder(path, flag: str) -> Path:
    p = Path(path)
    if not (p / "config.json").is_file():
        raise UserError(f"{flag} {p}: not a local transformers model folder (no config.json); nothing is "
                        f"downloaded, so pass a folder you have")
    return p


def perceptual_distance(fa: list[torch.Tensor], fb: list[torch.Tensor]) -> torch.Tensor:
    """LPIPS-like: channel-normalised feature maps, squared difference, spatial mean, layer mean."""
    total = 0.0
    for a, b in zip(fa, fb):
        total = total + (F.normalize(a, dim=1) - F.normalize(b, dim=1)).square().sum(1).mean(dim=(1, 2))
    return total / len(fa)


def mean_pairwise_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a @ b.T).mean())


def diversity(feats: list[torch.Tensor]) -> float:
    n = feats[0].shape[0]
    if n < 2:
        return float("nan")
    i, j = torch.triu_indices(n, n, offset=1)
    return float(perceptual_distance([f[i] for f in feats], [f[j] for f in feats]).mean())


def score(scorer: Scorer, real, subject_samples: dict[str, list], class_samples: list,
          clean_prompts: dict[str, str]) -> dict[str, float]:
    """The five metrics.

    real: the subject's own images; subject_samples: {prompt with identifier: images};
    class_samples: images of the bare class prompt; clean_prompts: {prompt: prompt without identifier}.
    """
    r = scorer.images(real)
    dino, clip_i, clip_t, div = [], [], [], []
    for prompt, images in subject_samples.items():
        e = scorer.images(images)
        dino.append(mean_pairwise_cosine(e["dino"], r["dino"]))
        clip_i.append(mean_pairwise_cosine(e["clip"], r["clip"]))
        clip_t.append(float((e["clip"] @ scorer.texts([clean_prompts[prompt]]).T).mean()))
        div.append(diversity(e["features"]))
    c = scorer.images(class_samples)
    return {"DINO": float(np.mean(dino)), "CLIP-I": float(np.mean(clip_i)), "CLIP-T": float(np.mean(clip_t)),
            "PRES": mean_pairwise_cosine(c["dino"], r["dino"]), "DIV": float(np.mean(div))}


def markdown_table(rows: dict[str, dict[str, float]], first: str = "model") -> str:
    lines = [f"| {first} | " + " | ".join(METRICS) + " |", "|---|" + "---:|" * len(METRICS)]
    for name, m in rows.items():
        lines.append(f"| {name} | " + " | ".join(f"{m[k]:.3f}" for k in METRICS) + " |")
    return "\n".join(lines)
