"""The batches of a training step: [instance rows; class rows] latents, prompt embeddings and the UNet's
extra conditions (SDXL's pooled embeddings and time ids; none for SD 1.x/2.x).

Every draw (which images, flips, crops, VAE samples) comes from a generator seeded by (seed, step,
micro-step), so a resumed run continues exactly as the uninterrupted one; under torchrun every rank makes
the draws of the whole global batch and keeps its own rows.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from trainer.core.images import ImageSet
from trainer.distributed import data_parallel as distributed


def step_seed(seed: int, step: int, micro: int) -> int:
    return (seed * 1_000_003 + step * 1009 + micro) % (1 << 62)


class Batch(NamedTuple):
    latents: torch.Tensor
    embeds: torch.Tensor  # prompt embeddings [B, L, D]
    gen: torch.Generator  # the step's generator, after the batch's draws
    conditions: dict  # the family's extra UNet inputs ({} for SD 1.x/2.x)


class Batches:
    """Makes each step's batch.

    Latents of images whose preprocessing is deterministic are encoded once and kept as
    the VAE's (mean, std); a step samples mean + std * noise from them. Other images
    (random crops of non-square images) are encoded when drawn. With a frozen text side the
    prompt embeddings are encoded once too (one per distinct prompt).
    """

    def __init__(self, opts, family, comps, inst: ImageSet, cls: ImageSet | None, prompts: dict, device, vae_dtype,
                 inst_prompts: list[str] | None = None, templates: list[str] | None = None, word: str = "",
                 cls_prompts: list[str] | None = None):
        self.opts, self.family, self.inst, self.cls, self.device = opts, family, inst, cls, device
        # the prompt of each instance / class image: its caption file's, or the instance / class prompt
        self.inst_prompts = list(inst_prompts) if inst_prompts is not None else [prompts["inst"]] * len(inst)
        self.cls_prompts = (list(cls_prompts) if cls_prompts is not None
                            else [prompts.get("cls")] * (len(cls) if cls is not None else 0))
        self.tokenizers, self.text_encoders = comps.tokenizers, comps.text_encoders
        vae_dtype = family.vae_dtype(comps.vae, vae_dtype)  # SDXL's own VAE overflows in float16
        self.vae = comps.vae.to(device, dtype=vae_dtype).eval().requires_grad_(False)
        self.vae_dtype = vae_dtype
        self.scale = comps.vae.config.scaling_factor
        # new token rows are trained: prompt embeddings change every step, the text encoder stays here
        self.train_te = opts.training.train_text_encoder or opts.embedding.train_text_embedding
        self.templates, self.word = templates, word  # Textual Inversion: a template drawn per image and step
        self.prompts = prompts
        self.cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        for which, images in (("inst", inst), ("cls", cls)):
            for i in range(len(images) if images is not None else 0):
                if images.cacheable(i):
                    for flip in images.variants(i):
                        self.cache[(which, i, flip)] = self._encode(images.fixed_view(i, flip)[None])
        self.all_cached = all(images.cacheable(i) for images in (inst, cls) if images is not None
                              for i in range(len(images)))
        if self.all_cached:  # the VAE is not needed again until export/validation
            self.vae.to("cpu")
        self.embeds = None
        if not self.train_te:  # prompt embeddings are fixed: encode once, text encoder leaves the GPU
            self.cache_prompt_embeddings(move_off=True)

    def can_cache(self) -> bool:
        return not self.templates and not self.opts.training.train_text_encoder

    def distinct_prompts(self) -> list[str]:
        texts = list(dict.fromkeys(self.inst_prompts))
        if self.cls is not None:
            texts += self.cls_prompts
        return list(dict.fromkeys(texts))

    @torch.no_grad()
    def cache_prompt_embeddings(self, move_off: bool = False) -> None:
        """One embedding per distinct prompt, computed now (the text side is frozen from here on)."""
        for te in self.text_encoders:
            te.to(self.device)
        self.embeds = {p: self.encode_text([p]) for p in self.distinct_prompts()}
        if move_off:
            for te in self.text_encoders:
                te.to("cpu")

    def encode_text(self, prompts: list[str]) -> tuple:
        """(prompt embeddings, pooled or None) of the family's text encoders."""
        data = self.opts.data
        return self.family.encode_prompt(self.tokenizers, self.text_encoders, prompts, self.device,
                                         max_length=data.tokenizer_max_length,
                                         attention_mask=data.text_encoder_use_attention_mask)

    def prompt(self, which: str, i: int) -> str:
        return self.inst_prompts[i] if which == "inst" else self.cls_prompts[i]

    def _latent_shape(self, px: torch.Tensor) -> tuple:
        f = 2 ** (len(self.vae.config.block_out_channels) - 1)
        return (1, self.vae.config.latent_channels, px.shape[-2] // f, px.shape[-1] // f)

    @torch.no_grad()
    def _encode(self, px: torch.Tensor):
        dist = self.vae.encode(px.to(self.device, self.vae_dtype)).latent_dist
        return dist.mean.float(), dist.std.float()

    def make(self, step: int, micro: int) -> Batch:
        training = self.opts.training
        gen = torch.Generator().manual_seed(step_seed(training.seed, step, micro))
        rows, keys, views = [], [], []
        b, n_ranks, rank = training.train_batch_size, distributed.world(), distributed.rank()
        # torchrun: the draws of the whole global batch (N x b rows each); this rank keeps rows r*b..(r+1)*b-1
        for which, images, n in (("inst", self.inst, b * n_ranks),
                                 ("cls", self.cls, b * n_ranks if self.cls is not None else 0)):
            for j in range(n):
                mine = j // b == rank
                i = int(torch.randint(0, len(images), (), generator=gen))
                if images.cacheable(i):
                    flip = bool(torch.randint(0, 2, (), generator=gen)) if images.random_flip else False
                    mean, std = self.cache[(which, i, flip)]
                    view = images.geometry(i, None, flip)
                else:  # a random crop: encode this view now (its size and crop: SDXL's time ids)
                    px, _, view = images.view(i, gen)
                    mean, std = self._encode(px[None]) if mine else (self._latent_shape(px), None)
                shape = mean if std is None else mean.shape  # (another rank's row: only its draws are made)
                eps = torch.randn(shape, generator=gen)
                key = self.prompt(which, i)
                if which == "inst" and self.templates:
                    t = self.templates[int(torch.randint(0, len(self.templates), (), generator=gen))]
                    key = t.format(self.word)
                if mine:
                    rows.append((mean + std * eps.to(mean.device)) * self.scale)
                    views.append(view)
                    keys.append(key)
        latents = torch.cat(rows).to(self.device)
        if self.embeds is not None:
            picked = [self.embeds[k] for k in keys]
            emb = torch.cat([e for e, _ in picked])
            pooled = torch.cat([p for _, p in picked]) if picked[0][1] is not None else None
        else:
            emb, pooled = self.encode_text(keys)
        return Batch(latents, emb, gen, self.family.unet_conditions(pooled, views, self.inst.resolution, self.device))
