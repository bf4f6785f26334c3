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
- PLACE   recontextualisation (ours, not the paper's): share of "[V] [class] <place>" samples in
          which the judge sees the place the prompt named (trainer.world.place).
Every metric is a mean over generated images; `bootstrap` gives its 95% interval over them.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from trainer.errors import UserError

METRICS = ("DINO", "CLIP-I", "CLIP-T", "PLACE", "PRES", "DIV")


def to_judge_tensor(images, size: int = 64) -> torch.Tensor:
    arr = np.stack([np.asarray(im.convert("RGB").resize((size, size), resample=3), dtype=np.float32)
                    for im in images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).div(127.5).sub(1.0)


class Scorer:
    """Embeddings for the metrics. The judge by default; --clip_model / --dino_model replace its
    CLIP-like or DINO-like part with real weights from a local folder (transformers format)."""

    def __init__(self, judge_dir=None, clip_model=None, dino_model=None, device="cpu"):
        from trainer.world.judge import Judge

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


def _distances(feats: list[torch.Tensor]) -> np.ndarray:
    """n x n perceptual distances between the samples of one prompt."""
    n = feats[0].shape[0]
    i, j = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
    i, j = i.flatten(), j.flatten()
    return perceptual_distance([f[i] for f in feats], [f[j] for f in feats]).view(n, n).numpy()


def per_image(scorer: Scorer, real, subject_samples: dict[str, list], class_samples: list,
              clean_prompts: dict[str, str], class_noun: str | None = None) -> dict[str, np.ndarray]:
    """What every metric is the mean of, per generated image: (prompts x images) arrays for DINO,
    CLIP-I, CLIP-T and PLACE (1 where the judge sees the prompt's place; NaN for prompts that name
    none of the world's places), (images,) for PRES, (prompts x images x images) distances for DIV."""
    from trainer.world.place import PlaceClassifier, place_of

    r = scorer.images(real)
    noun = class_noun
    out = {"DINO": [], "CLIP-I": [], "CLIP-T": [], "PLACE": [], "DIV": []}
    places = None
    for prompt, images in subject_samples.items():
        e = scorer.images(images)
        out["DINO"].append((e["dino"] @ r["dino"].T).mean(1).numpy())
        out["CLIP-I"].append((e["clip"] @ r["clip"].T).mean(1).numpy())
        out["CLIP-T"].append((e["clip"] @ scorer.texts([clean_prompts[prompt]]).T)[:, 0].numpy())
        place = place_of(clean_prompts[prompt])
        if place is not None and noun:
            places = places or PlaceClassifier(scorer, noun)
            out["PLACE"].append(np.array([p == place for p in places.predict(e["clip"])], dtype=np.float64))
        else:
            out["PLACE"].append(np.full(len(images), np.nan))
        out["DIV"].append(_distances(e["features"]))
    res = {k: np.stack(v).astype(np.float64) for k, v in out.items()}
    c = scorer.images(class_samples)
    res["PRES"] = (c["dino"] @ r["dino"].T).mean(1).numpy().astype(np.float64)
    return res


def _div(d: np.ndarray) -> float:
    """Mean distance over pairs of distinct images (d: prompts x n x n)."""
    n = d.shape[-1]
    off = ~np.eye(n, dtype=bool)
    return float(d[..., off].mean())


def point_estimates(v: dict[str, np.ndarray]) -> dict[str, float]:
    m = {k: float(np.mean(v[k])) for k in ("DINO", "CLIP-I", "CLIP-T", "PRES")}
    m["DIV"] = _div(v["DIV"]) if v["DIV"].shape[-1] > 1 else float("nan")
    m["PLACE"] = float(np.nanmean(v["PLACE"])) if not np.isnan(v["PLACE"]).all() else float("nan")
    return {k: m[k] for k in METRICS}


def bootstrap(v: dict[str, np.ndarray], n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> dict[str, list]:
    """Percentile bootstrap intervals over images: each prompt's images (and the class images) are
    drawn again with replacement; DIV then averages over the pairs of distinct draws of distinct
    images, so a repeated image never counts as a zero distance."""
    rng = np.random.default_rng(seed)
    lo_q, hi_q = 100 * (1 - level) / 2, 100 * (1 + level) / 2
    prompts, n = v["DINO"].shape
    idx = rng.integers(0, n, size=(n_boot, prompts, n))
    out = {}
    for k in ("DINO", "CLIP-I", "CLIP-T", "PLACE"):
        draws = np.take_along_axis(v[k][None], idx, axis=2)
        with np.errstate(all="ignore"):
            stats = np.nanmean(draws.reshape(n_boot, -1), axis=1) if not np.isnan(v[k]).all() else np.full(n_boot, np.nan)
        out[k] = stats
    c = v["PRES"]
    out["PRES"] = c[rng.integers(0, len(c), size=(n_boot, len(c)))].mean(1)
    if n > 1:
        d = v["DIV"][np.arange(prompts)[None, :, None, None], idx[:, :, :, None], idx[:, :, None, :]]
        distinct = idx[:, :, :, None] != idx[:, :, None, :]
        out["DIV"] = (d * distinct).sum(axis=(1, 2, 3)) / np.maximum(distinct.sum(axis=(1, 2, 3)), 1)
    else:
        out["DIV"] = np.full(n_boot, np.nan)
    return {k: [float(np.percentile(out[k], lo_q)), float(np.percentile(out[k], hi_q))] for k in METRICS}


def score(scorer: Scorer, real, subject_samples: dict[str, list], class_samples: list,
          clean_prompts: dict[str, str], class_noun: str | None = None, intervals: bool = False):
    """The metrics (and with intervals=True, also their 95% bootstrap intervals over images).

    real: the subject's own images; subject_samples: {prompt with identifier: images};
    class_samples: images of the bare class prompt; clean_prompts: {prompt: prompt without identifier};
    class_noun: needed for PLACE (NaN without it).
    """
    v = per_image(scorer, real, subject_samples, class_samples, clean_prompts, class_noun)
    m = point_estimates(v)
    return (m, bootstrap(v)) if intervals else m


def fmt(value: float, interval=None) -> str:
    if interval is None or any(np.isnan(interval)):
        return f"{value:.3f}"
    return f"{value:.3f} [{interval[0]:.3f}, {interval[1]:.3f}]"


def markdown_table(rows: dict[str, dict[str, float]], first: str = "model", intervals: dict | None = None) -> str:
    """One row per model; with intervals {model: {metric: [lo, hi]}}, each cell also gets its 95% interval."""
    lines = [f"| {first} | " + " | ".join(METRICS) + " |", "|---|" + "---:|" * len(METRICS)]
    for name, m in rows.items():
        ci = (intervals or {}).get(name, {})
        lines.append(f"| {name} | " + " | ".join(fmt(m[k], ci.get(k)) for k in METRICS) + " |")
    return "\n".join(lines)
