"""The batches of a training step: [instance rows; class rows] latents, prompt embeddings, the UNet's extra
conditions (SDXL's pooled embeddings and time ids; none for SD 1.x/2.x) and, with --masked_loss, the loss weights.

Every draw (which images, flips, crops, VAE samples, caption dropout/shuffles) comes from a generator seeded by
(seed, step, micro-step), so a resumed run continues exactly as the uninterrupted one; under torchrun every rank
makes the draws of the whole global batch and keeps its own rows. With aspect-ratio buckets (trainer.core.buckets)
the global batch is one bucket; several concepts: instance images are drawn by weight (repeats), each class row
among the class images of its instance row's concept.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from trainer.core import buckets as bucketing
from trainer.core import masks as masking
from trainer.core.captions import CaptionOps
from trainer.core.images import ImageSet
from trainer.distributed import data_parallel as distributed
from trainer.errors import UserError


def step_seed(seed: int, step: int, micro: int) -> int:
    return (seed * 1_000_003 + step * 1009 + micro) % (1 << 62)


class Batch(NamedTuple):
    latents: torch.Tensor
    embeds: torch.Tensor  # prompt embeddings [B, L, D]
    gen: torch.Generator  # the step's generator, after the batch's draws
    conditions: dict  # the family's extra UNet inputs ({} for SD 1.x/2.x)
    mask: torch.Tensor | None = None  # --masked_loss: loss weights [B, 1, h, w] at the latents' resolution


class Batches:
    """Makes each step's batch.

    Latents of images whose preprocessing is deterministic are encoded once and kept as
    the VAE's (mean, std); a step samples mean + std * noise from them. Other images
    (random crops of non-square images) are encoded when drawn. With a frozen text side the
    prompt embeddings are encoded once too (one per distinct prompt).

    inst_concepts / cls_concepts: the concept index of each instance / class image (several concepts);
    inst_weights: each instance image's draw weight (its concept's repeats; None: uniform);
    inst_mask_dirs: each instance image's mask folder (None: --mask_dir for all).
    """

    def __init__(self, opts, family, comps, inst: ImageSet, cls: ImageSet | None, prompts: dict, device, vae_dtype,
                 inst_prompts: list[str] | None = None, templates: list[str] | None = None, word: str = "",
                 cls_prompts: list[str] | None = None, *, inst_concepts: list[int] | None = None,
                 cls_concepts: list[int] | None = None, inst_weights: list[float] | None = None,
                 inst_mask_dirs: list | None = None):
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
        self.factor = 2 ** (len(self.vae.config.block_out_channels) - 1)  # pixels per latent side
        # new token rows are trained: prompt embeddings change every step, the text encoder stays here
        self.train_te = opts.training.train_text_encoder or opts.embedding.train_text_embedding
        self.templates, self.word = templates, word  # Textual Inversion: a template drawn per image and step
        self.prompts = prompts
        self.captions = CaptionOps.of(opts.data)
        self._pairing(inst_concepts, cls_concepts, inst_weights)
        self.buckets = bucketing.for_run(opts.data, inst, self.factor, comps.unet)
        self.masks = masking.for_run(opts.data, inst, self.factor, inst_mask_dirs)
        self.cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        for which, images, i, size in self._fixed_views():
            for flip in images.variants(i):
                self.cache[self._key(which, i, size, flip)] = self._encode(images.fixed_view(i, flip, size)[None])
        self.all_cached = all(images.cacheable(i, size) for _, images, i, size in self._views())
        if self.all_cached:  # the VAE is not needed again until export/validation
            self.vae.to("cpu")
        self.embeds = None
        if not self.train_te:  # prompt embeddings are fixed: encode once, text encoder leaves the GPU
            # (shuffled captions are new prompts every step: the frozen encoders stay to encode them)
            self.cache_prompt_embeddings(move_off=not self.captions.shuffle_parts)

    def _pairing(self, inst_concepts, cls_concepts, inst_weights) -> None:
        """Draw weights and each concept's class images (several concepts)."""
        n = len(self.inst)
        if inst_weights is not None and (len(inst_weights) != n or min(inst_weights) < 0 or sum(inst_weights) <= 0):
            raise ValueError(f"inst_weights: expected {n} non-negative weights with a positive sum, got "
                             f"{list(inst_weights)}")
        uniform = inst_weights is None or len(set(inst_weights)) == 1  # (equal repeats: the draws of one concept)
        self.weights = None if uniform else torch.tensor(inst_weights, dtype=torch.float64)
        self.inst_concepts = list(inst_concepts) if inst_concepts is not None else None
        self.cls_of_concept = None
        if self.cls is not None and cls_concepts is not None and inst_concepts is not None:
            self.cls_of_concept = {}
            for k, c in enumerate(cls_concepts):
                self.cls_of_concept.setdefault(c, []).append(k)
            missing = sorted(set(self.inst_concepts) - set(self.cls_of_concept))
            if missing:
                raise UserError(f"concept {missing[0] + 1} (of --concepts) has no class images; prior preservation "
                                f"draws each concept's class rows among its own class images")

    def _views(self):
        """(which, images, i, size) of every view the run can draw: size None without buckets; instance images at
        their bucket, class images at every bucket that holds instance images."""
        for i in range(len(self.inst)):
            yield "inst", self.inst, i, self.buckets.size_of(i) if self.buckets else None
        sizes = [self.buckets.sizes[k] for k in self.buckets.used] if self.buckets else [None]
        for size in sizes:
            for i in range(len(self.cls) if self.cls is not None else 0):
                yield "cls", self.cls, i, size

    def _fixed_views(self):
        return ((w, images, i, size) for w, images, i, size in self._views() if images.cacheable(i, size))

    @staticmethod
    def _key(which: str, i: int, size, flip: bool) -> tuple:
        return (which, i, flip) if size is None else (which, i, tuple(size), flip)

    def can_cache(self) -> bool:
        return not self.templates and not self.opts.training.train_text_encoder

    def distinct_prompts(self) -> list[str]:
        texts = list(dict.fromkeys(self.inst_prompts))
        if self.cls is not None:
            texts += self.cls_prompts
        if self.captions.dropout > 0:  # caption dropout: the empty prompt is one more
            texts.append("")
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
        return (1, self.vae.config.latent_channels, px.shape[-2] // self.factor, px.shape[-1] // self.factor)

    @torch.no_grad()
    def _encode(self, px: torch.Tensor):
        dist = self.vae.encode(px.to(self.device, self.vae_dtype)).latent_dist
        return dist.mean.float(), dist.std.float()

    def _pick(self, which: str, images: ImageSet, j: int, drawn: list[int], bucket, gen: torch.Generator) -> int:
        """The image of global row j: the first instance row (or every one without buckets) among all instance
        images, the others among the first's bucket; class row j among its instance row's concept's images."""
        if which == "inst":
            pool = self.buckets.members[bucket] if bucket is not None and j > 0 else None
            weights = self.weights
        else:
            pool = self.cls_of_concept[self.inst_concepts[drawn[j]]] if self.cls_of_concept is not None else None
            weights = None
        if weights is not None:
            w = weights if pool is None else weights[pool]
            k = int(torch.multinomial(w, 1, generator=gen))
        else:  # (uniform: the draw of runs without concepts, unchanged)
            k = int(torch.randint(0, len(pool) if pool is not None else len(images), (), generator=gen))
        return pool[k] if pool is not None else k

    def make(self, step: int, micro: int) -> Batch:
        training = self.opts.training
        gen = torch.Generator().manual_seed(step_seed(training.seed, step, micro))
        rows, keys, views, weights = [], [], [], []
        drawn, bucket = [], None  # the global instance rows' images; the global batch's bucket
        b, n_ranks, rank = training.train_batch_size, distributed.world(), distributed.rank()
        # torchrun: the draws of the whole global batch (N x b rows each); this rank keeps rows r*b..(r+1)*b-1
        for which, images, n in (("inst", self.inst, b * n_ranks),
                                 ("cls", self.cls, b * n_ranks if self.cls is not None else 0)):
            for j in range(n):
                mine = j // b == rank
                i = self._pick(which, images, j, drawn, bucket, gen)
                if which == "inst":
                    drawn.append(i)
                    if self.buckets is not None and j == 0:
                        bucket = self.buckets.of_image[i]
                size = self.buckets.sizes[bucket] if bucket is not None else None
                crop, flip = images.draw(i, gen, size)
                view = images.geometry(i, crop, flip, size)
                if crop is None:  # a fixed view: its cached latents
                    mean, std = self.cache[self._key(which, i, size, flip)]
                else:  # a random crop: encode this view now (its size and crop: SDXL's time ids)
                    px = images.pixels(i, crop, flip, size)
                    mean, std = self._encode(px[None]) if mine else (self._latent_shape(px), None)
                shape = mean if std is None else mean.shape  # (another rank's row: only its draws are made)
                eps = torch.randn(shape, generator=gen)
                key = self.prompt(which, i)
                if which == "inst" and self.templates:
                    t = self.templates[int(torch.randint(0, len(self.templates), (), generator=gen))]
                    key = t.format(self.word)
                if self.captions.active:
                    key = self.captions(key, gen)
                if mine:
                    rows.append((mean + std * eps.to(mean.device)) * self.scale)
                    views.append(view)
                    keys.append(key)
                    if self.masks is not None:  # the mask through the same resize/crop/flip (class rows: ones)
                        weights.append(self.masks.latent(i, crop, flip, size) if which == "inst"
                                       else torch.ones((1, 1, *mean.shape[-2:])))
        latents = torch.cat(rows).to(self.device)
        mask = torch.cat(weights).to(self.device) if self.masks is not None else None
        if self.embeds is not None and all(k in self.embeds for k in keys):
            picked = [self.embeds[k] for k in keys]
            emb = torch.cat([e for e, _ in picked])
            pooled = torch.cat([p for _, p in picked]) if picked[0][1] is not None else None
        elif self.embeds is not None:  # shuffled captions of a frozen text side: encoded now, no gradient
            with torch.no_grad():
                emb, pooled = self.encode_text(keys)
        else:
            emb, pooled = self.encode_text(keys)
        conditions = self.family.unet_conditions(pooled, views, self.inst.resolution, self.device)
        return Batch(latents, emb, gen, conditions, mask)
