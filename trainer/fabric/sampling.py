"""FABRIC: feedback-driven sampling (von Rütte et al. 2023, arXiv 2307.10159) on dbkernels.attention.

    dbtrain fabric --model DIR --prompt "a star" --liked a.png --disliked b.png --out DIR

    from trainer.fabric import fabric_sample
    result = fabric_sample("trainer/world/assets/tiny-world-sd", "a star", liked=["a.png"], disliked=[img],
                           num_images=4, seed=0)
    result.images      # PIL images; result.notes, result.weights, result.stats

No training: liked and disliked images are encoded once by the VAE. At each denoising step
inside the feedback window, every reference latent is noised to the current timestep
(the scheduler's add_noise, fresh noise, then its scale_model_input) and ONE UNet pass over
all references with the empty prompt records the input hidden states of every
self-attention layer. In the main pass each self-attention layer attends over cat(own
tokens, cached reference tokens) through its own to_k / to_v; liked references join the
conditional half of the CFG batch, disliked ones the unconditional half; their keys carry
the bias log(w) (w for liked, w * neg_scale for disliked), the paper's P*w / sum(P*w).
w is max_weight for steps [round(N*feedback_start), round(N*feedback_end)) (rounded half
up) and min_weight outside; a step where every weight is 0 skips the reference pass and
is the plain pipeline's step. See trainer/fabric_attention.py for the attention.

Works with the scheduler the model ships (the built-in model's DPM-Solver++) and any
diffusers scheduler (`scheduler=` a class name such as "DDIMScheduler", or an instance).
SD 1.x / 2.x folders; SDXL needs its pooled text embeddings and time ids in both passes
(`_unet_kwargs` is the one place they would go) and is refused for now.
"""
from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from trainer.errors import UserError
from trainer.options.fabric import FEEDBACK_END, FEEDBACK_START, MAX_WEIGHT, MIN_WEIGHT, NEG_SCALE, check_settings


# ------------------------------------------------------------------ schedule

def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def feedback_window(num_steps: int, feedback_start: float = FEEDBACK_START,
                    feedback_end: float = FEEDBACK_END) -> tuple[int, int]:
    """[first, last) step index of the feedback window: round(N*start), round(N*end), halves up."""
    return _round_half_up(num_steps * feedback_start), _round_half_up(num_steps * feedback_end)


def feedback_schedule(num_steps: int, feedback_start: float = FEEDBACK_START, feedback_end: float = FEEDBACK_END,
                      min_weight: float = MIN_WEIGHT, max_weight: float = MAX_WEIGHT) -> list[float]:
    """The liked references' weight at each of num_steps steps (disliked: times neg_scale)."""
    lo, hi = feedback_window(num_steps, feedback_start, feedback_end)
    return [max_weight if lo <= i < hi else min_weight for i in range(num_steps)]


# ------------------------------------------------------------------ inputs

def load_pipeline(model, device=None, dtype=None):
    """A StableDiffusionPipeline from a local folder (nothing downloaded), on `device`."""
    import torch

    from trainer.families import SD, check_model_folder, family_of

    root = check_model_folder(model)
    if family_of(root) is not SD:  # SDXL needs its pooled embeddings and time ids in both passes (_unet_kwargs)
        raise UserError(f"{root} is an {family_of(root).label} model; dbtrain fabric supports SD 1.x / 2.x for now")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dtype is None:
        dtype = torch.float16 if device.type == "cuda" else torch.float32
    pipe = SD.load_pipeline(root, dtype=dtype)  # (a damaged or non-finite part: one line naming it)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def open_feedback_image(item, what: str):
    """A PIL RGB image from a PIL image or a path; a UserError naming the file otherwise."""
    from PIL import Image

    if isinstance(item, Image.Image):
        return item.convert("RGB")
    path = Path(item)
    if not path.is_file():
        raise UserError(f"{what} image {path} does not exist")
    from trainer.core.images import open_rgb

    return open_rgb(path)


def make_scheduler(pipe, scheduler):
    """None: the model's own; a diffusers scheduler class name; or a scheduler instance."""
    if scheduler is None:
        return pipe.scheduler
    if isinstance(scheduler, str):
        import diffusers

        cls = getattr(diffusers, scheduler, None)
        if cls is None or not hasattr(cls, "from_config") or not scheduler.endswith("Scheduler"):
            raise UserError(f"--scheduler {scheduler}: not a diffusers scheduler class (e.g. DDIMScheduler, "
                            f"EulerDiscreteScheduler, DPMSolverMultistepScheduler)")
        return cls.from_config(pipe.scheduler.config)
    return scheduler


def _notifier(note):
    seen: set[str] = set()
    notes: list[str] = []

    def say(msg: str) -> None:
        if msg in seen:
            return
        seen.add(msg)
        notes.append(msg)
        if note is not None:
            note(msg)
    return say, notes


_printed: set[str] = set()


def _stderr_note(msg: str) -> None:
    """Each distinct note once per process, as one line on stderr."""
    if msg not in _printed:
        _printed.add(msg)
        print(f"fabric: {msg}", file=sys.stderr)


def encode_references(pipe, images, width: int, height: int, say):
    """(n, C, h, w) VAE latents (the posterior mean, times scaling_factor) of the images at width x height."""
    import numpy as np
    import torch
    from PIL import Image

    arrays = []
    for name, im in images:
        if im.size != (width, height):
            say(f"{name} is {im.size[0]}x{im.size[1]}, resized to {width}x{height}")
            im = im.resize((width, height), Image.LANCZOS)
        arrays.append(np.asarray(im, dtype=np.float32) / 127.5 - 1.0)
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
    vae = pipe.vae
    x = x.to(vae.device, vae.dtype)
    latents = vae.encode(x).latent_dist.mean
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return (latents - shift) * vae.config.scaling_factor


def _unet_kwargs(pipe, batch: int) -> dict:
    """Extra UNet inputs per pass (SDXL's added_cond_kwargs would go here); none for SD 1.x / 2.x."""
    return {}


# ------------------------------------------------------------------ the sampler

@dataclass
class FabricResult:
    images: list                       # PIL images, image k from seeds[k]
    seeds: list
    weights: list                      # liked references' weight at each step (disliked: times neg_scale)
    notes: list = field(default_factory=list)
    stats: dict = field(default_factory=dict)


def fabric_sample(pipe, prompt: str, liked=(), disliked=(), *, negative_prompt: str | None = None,
                  num_images: int = 4, seed: int = 0, seeds=None, steps: int = 20, guidance_scale: float = 7.5,
                  feedback_start: float = FEEDBACK_START, feedback_end: float = FEEDBACK_END,
                  min_weight: float = MIN_WEIGHT, max_weight: float = MAX_WEIGHT, neg_scale: float = NEG_SCALE,
                  resolution: int | None = None, scheduler=None, device=None, batch_size: int | None = None,
                  ref_batch_size: int | None = None, noise_seed: int | None = None, note=_stderr_note,
                  attention: str = "dbkernels", output_type: str = "pil") -> FabricResult:
    """Images of `prompt` steered toward the liked and away from the disliked images (FABRIC).

    pipe: a StableDiffusionPipeline or a local model folder (loaded on `device`).
    liked / disliked: PIL images or paths; any size (resized to the output size, with a note).
    seeds: one per image (default seed + k for image k); the same seeds, scheduler and no
    feedback give exactly the plain StableDiffusionPipeline's images.
    Schedule: weight max_weight for steps [round(N*feedback_start), round(N*feedback_end)),
    min_weight elsewhere; disliked references get weight * neg_scale.
    scheduler: None (the model's own), a diffusers scheduler class name, or an instance.
    batch_size: images per main pass (default all). ref_batch_size: references per UNet call of the
    reference pass (default: the main pass's rows, 2 x images with CFG, so the reference pass never
    holds more activations than the main pass; more references take more calls). noise_seed: the references' noise (default
    seeds[0] + 1_000_003). note: called once per distinct note (a line), default stderr.
    attention: "dbkernels" (dbkernels.attention with the key bias; SDPA for head dims it does not
    cover) or "sdpa" (torch SDPA with a broadcast bias mask everywhere; leaner on a CPU, where
    dbkernels.attention is its chunked pure-PyTorch reference).
    output_type "latent" returns the final latents (one tensor per image) instead of PIL images.
    """
    import torch
    from diffusers.utils.torch_utils import randn_tensor

    from trainer.fabric.attention import FabricController, install

    check_settings(feedback_start, feedback_end, min_weight, max_weight, neg_scale)
    if isinstance(pipe, (str, Path)):
        pipe = load_pipeline(pipe, device)
    seeds = list(seeds) if seeds is not None else [seed + k for k in range(num_images)]
    if not seeds or steps < 1:
        raise UserError("need at least one image and one step")
    say, notes = _notifier(note)
    device = pipe._execution_device
    unet, vae = pipe.unet, pipe.vae
    res = resolution or unet.config.sample_size * pipe.vae_scale_factor
    multiple = pipe.vae_scale_factor * 2 ** (len(unet.config.block_out_channels) - 1)
    if res % multiple:
        raise UserError(f"--resolution {res} must be a multiple of {multiple} for this model")
    sched = make_scheduler(pipe, scheduler)
    if not hasattr(sched, "add_noise"):
        raise UserError(f"{type(sched).__name__} has no add_noise; FABRIC noises the references with it")
    do_cfg = guidance_scale > 1.0
    if disliked and not do_cfg:
        say("guidance_scale <= 1 (no unconditional half): the disliked images are not used")
        disliked = ()
    refs = ([(f"liked image {k} ({_name(x)})", open_feedback_image(x, "liked")) for k, x in enumerate(liked)]
            + [(f"disliked image {k} ({_name(x)})", open_feedback_image(x, "disliked"))
               for k, x in enumerate(disliked)])
    n_pos, n_neg = len(liked), len(disliked)
    t0 = time.perf_counter()
    stats = {"reference_passes": 0, "main_passes": 0, "cache_bytes": 0, "feedback_steps": [],
             "reference_unet_calls": 0}

    with torch.no_grad():
        cond, uncond = pipe.encode_prompt(prompt, device, 1, do_cfg, negative_prompt)
        ref_latents = null = None
        if refs:
            ref_latents = encode_references(pipe, [(n, im) for n, im in refs], res, res, say)
            null = pipe.encode_prompt("", device, 1, False)[0]
        if attention not in ("dbkernels", "sdpa"):
            raise UserError(f"--attention must be dbkernels or sdpa, got {attention!r}")
        controller = FabricController(note=say, backend=attention)
        restore = install(unet, controller)
        ref_gen = torch.Generator("cpu").manual_seed(seeds[0] + 1_000_003 if noise_seed is None else noise_seed)
        images, weights = [], []
        try:
            bs = batch_size or len(seeds)
            for b0 in range(0, len(seeds), bs):
                chunk = seeds[b0:b0 + bs]
                gens = [torch.Generator("cpu").manual_seed(s) for s in chunk]
                emb = torch.cat([uncond.expand(len(chunk), -1, -1), cond.expand(len(chunk), -1, -1)]) if do_cfg \
                    else cond.expand(len(chunk), -1, -1)
                sched.set_timesteps(steps, device=device)
                timesteps = sched.timesteps
                shape = (len(chunk), unet.config.in_channels, res // pipe.vae_scale_factor,
                         res // pipe.vae_scale_factor)
                latents = randn_tensor(shape, generator=gens, device=device, dtype=emb.dtype) * sched.init_noise_sigma
                extra = pipe.prepare_extra_step_kwargs(gens, 0.0)
                weights = feedback_schedule(len(timesteps), feedback_start, feedback_end, min_weight, max_weight)
                for i, t in enumerate(timesteps):
                    w = weights[i]
                    controller.mode = "off"
                    pos_on, neg_on = n_pos > 0 and w > 0, n_neg > 0 and w * neg_scale > 0
                    if pos_on or neg_on:
                        _reference_pass(pipe, sched, controller, ref_latents, null, t, n_pos, pos_on, neg_on,
                                        ref_gen, stats, ref_batch_size or (2 if do_cfg else 1) * len(chunk))
                        if b0 == 0:
                            stats["feedback_steps"].append(i)
                        controller.groups = batch_groups(len(chunk), n_pos, pos_on, neg_on, w, neg_scale, do_cfg)
                        controller.mode = "inject"
                    x = torch.cat([latents] * 2) if do_cfg else latents
                    x = sched.scale_model_input(x, t)
                    pred = unet(x, t, encoder_hidden_states=emb, return_dict=False, **_unet_kwargs(pipe, x.shape[0]))[0]
                    stats["main_passes"] += 1
                    controller.mode = "off"
                    controller.clear()
                    if do_cfg:
                        pu, pc = pred.chunk(2)
                        pred = pu + guidance_scale * (pc - pu)
                    latents = sched.step(pred, t, latents, **extra, return_dict=False)[0]
                if output_type == "latent":
                    images += list(latents)
                    continue
                image = vae.decode(latents / vae.config.scaling_factor, return_dict=False, generator=gens)[0]
                images += pipe.image_processor.postprocess(image, output_type=output_type,
                                                           do_denormalize=[True] * image.shape[0])
        finally:
            restore()
    stats["seconds"] = time.perf_counter() - t0
    return FabricResult(images=images, seeds=seeds, weights=weights, notes=notes, stats=stats)


def _name(x) -> str:
    return str(x) if isinstance(x, (str, Path)) else "PIL image"


def batch_groups(b: int, n_pos: int, pos_on: bool, neg_on: bool, w: float, neg_scale: float, do_cfg: bool):
    """Which cached references each half of the main batch attends to, with what weight.

    The reference pass records [liked (if pos_on), disliked (if neg_on)] in that order. With CFG
    the batch is [unconditional (b rows), conditional (b rows)]: disliked references join the
    unconditional half with weight w * neg_scale, liked ones the conditional half with w.
    Returns [(start, stop, slice of the cache or None, weight)] for FabricController.groups."""
    pos_sl = slice(0, n_pos) if pos_on else None
    neg_sl = slice(n_pos if pos_on else 0, None) if neg_on else None
    if do_cfg:
        return [(0, b, neg_sl, w * neg_scale), (b, 2 * b, pos_sl, w)]
    return [(0, b, pos_sl, w)]


def noised_references(sched, z0, noise, t):
    """The UNet input for clean latents z0 at timestep t: the scheduler's add_noise, then its
    scale_model_input (Euler-type schedulers noise in sigma space and scale there; DDIM and
    DPM-Solver++ scale by 1). Either way the UNet sees sqrt(abar_t) z0 + sqrt(1 - abar_t) noise."""
    import torch

    # A 1-D timestep tensor (one per reference): DPM-Solver++ / Euler iterate over it (a 0-d one fails).
    tt = (t if torch.is_tensor(t) else torch.tensor(t)).reshape(1).expand(z0.shape[0]).to(z0.device)
    return sched.scale_model_input(sched.add_noise(z0, noise, tt), t)


def _reference_pass(pipe, sched, controller, ref_latents, null, t, n_pos, pos_on, neg_on, gen, stats,
                    chunk: int) -> None:
    """Noise the needed references to timestep t (fresh noise) and record their attn1 inputs: one UNet
    pass over all of them, in chunks of at most `chunk` references."""
    import torch

    z0 = ref_latents if (pos_on and neg_on) else (ref_latents[:n_pos] if pos_on else ref_latents[n_pos:])
    noise = torch.randn(z0.shape, generator=gen, dtype=torch.float32).to(z0.device, z0.dtype)
    z = noised_references(sched, z0, noise, t)
    controller.clear()
    controller.mode = "record"
    for c0 in range(0, z.shape[0], chunk):  # one pass unless there are more references than main-pass rows
        zc = z[c0:c0 + chunk]
        pipe.unet(zc, t, encoder_hidden_states=null.expand(zc.shape[0], -1, -1), return_dict=False,
                  **_unet_kwargs(pipe, zc.shape[0]))
        stats["reference_unet_calls"] += 1
    controller.mode = "off"
    stats["reference_passes"] += 1
    stats["cache_bytes"] = max(stats["cache_bytes"], controller.cache_bytes())


# ------------------------------------------------------------------ the simulated user (rounds)

def target_similarity(scorer, images, target, embedding: str = "clip"):
    """Cosine of each image's judge embedding with the target's."""
    e = scorer.images(list(images))[embedding]
    t = scorer.images([target])[embedding]
    return (e @ t.T).flatten().tolist()


def simulated_rounds(pipe, prompt: str, target, scorer, *, rounds: int = 3, num_images: int = 4, seed: int = 0,
                     likes_per_round: int = 1, dislikes_per_round: int = 1, liked=(), disliked=(),
                     feedback: bool = True, embedding: str = "clip", **sample_kw) -> list[dict]:
    """The paper's simulated user: each round likes the images closest to `target` and dislikes the
    farthest (judge embeddings); the next round uses all feedback so far. Round r, image k uses seed
    seed + r * num_images + k. feedback=False: the same rounds and seeds with no feedback at all."""
    liked, disliked = list(liked), list(disliked)
    out = []
    for r in range(rounds):
        seeds = [seed + r * num_images + k for k in range(num_images)]
        res = fabric_sample(pipe, prompt, liked if feedback else (), disliked if feedback else (), seeds=seeds,
                            **sample_kw)
        sims = target_similarity(scorer, res.images, target, embedding)
        order = sorted(range(num_images), key=lambda k: -sims[k])
        like = order[:likes_per_round]
        dislike = [k for k in order[::-1][:dislikes_per_round] if k not in like]
        out.append({"round": r, "seeds": seeds, "images": res.images, "similarity": sims,
                    "n_liked": len(liked) if feedback else 0, "n_disliked": len(disliked) if feedback else 0,
                    "liked_now": like, "disliked_now": dislike, "seconds": res.stats["seconds"],
                    "notes": res.notes})
        liked += [res.images[k] for k in like]
        disliked += [res.images[k] for k in dislike]
    return out
