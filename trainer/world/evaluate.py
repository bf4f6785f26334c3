"""The paper's metrics for a model, on images it generates now (`dbtrain eval`, the demo, bench).

Every prompt gets the same seeds (image k of every prompt, and of every model evaluated with
the same --seed, starts from the same noise), so two models are compared image for image.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from trainer.errors import UserError
from trainer.formats import outdir
from trainer.families import check_model_folder
from trainer.methods.outputs import checkpoint_of, load_pipeline, lora_files_of, model_and_embeddings, recorded_subject
from trainer.options.sampling import CLASS_PROMPT, DEFAULT_PROMPTS, EVAL_IMAGES, EVAL_SEED, GUIDANCE, SAMPLE_STEPS


@dataclass
class Evaluation:
    metrics: dict          # {metric: value}
    intervals: dict        # {metric: [lo, hi]}, 95% bootstrap over images
    samples: dict          # {prompt: images}
    place_by_prompt: dict  # {prompt: PLACE of its images}
    by_prompt: dict = field(default_factory=dict)  # {"DINO"/"CLIP-I": {prompt: mean of its images}}


@torch.no_grad()
def generate(pipe, prompts: list[str], n: int, steps: int, guidance: float, seed: int, batch: int = 32):
    """{prompt: n images}; image k of each prompt uses seed + k."""
    out = {}
    for prompt in prompts:
        images = []
        for k0 in range(0, n, batch):
            gens = [torch.Generator("cpu").manual_seed(seed + k) for k in range(k0, min(n, k0 + batch))]
            images += pipe([prompt] * len(gens), num_inference_steps=steps, guidance_scale=guidance,
                           generator=gens).images
        out[prompt] = images
    return out


def subject_prompts(templates, identifier: str, class_noun: str) -> tuple[dict[str, str], str]:
    """{prompt with identifier: the same without it}, and the bare class prompt."""
    pairs = {}
    for t in templates:
        if "{V}" not in t:
            raise UserError(f"prompt template {t!r} has no {{V}} (where the identifier goes)")
        pairs[t.format(V=identifier, C=class_noun)] = " ".join(t.replace("{V}", "").format(C=class_noun).split())
    return pairs, CLASS_PROMPT.format(C=class_noun)


def evaluate(pipe, scorer, real, identifier, class_noun, templates=DEFAULT_PROMPTS, num_images=EVAL_IMAGES,
             steps=SAMPLE_STEPS, guidance=GUIDANCE, seed=EVAL_SEED, with_identifier=True) -> Evaluation:
    """The metrics of one pipeline. with_identifier=False: the prompts without [V] (the base model's
    reference: what the class alone gives in each place)."""
    import numpy as np

    from trainer.world.metrics import bootstrap, per_image, point_estimates

    pairs, class_prompt = subject_prompts(templates, identifier, class_noun)
    if not with_identifier:
        pairs = {clean: clean for clean in pairs.values()}
    samples = generate(pipe, list(pairs) + [class_prompt], num_images, steps, guidance, seed)
    v = per_image(scorer, real, {p: samples[p] for p in pairs}, samples[class_prompt], pairs, class_noun)
    by_prompt = {p: (None if np.isnan(row).all() else float(row.mean())) for p, row in zip(pairs, v["PLACE"])}
    per = {k: {p: float(row.mean()) for p, row in zip(pairs, v[k])} for k in ("DINO", "CLIP-I")}
    return Evaluation(point_estimates(v), bootstrap(v), samples, by_prompt, per)


def check(a) -> None:
    """An EvalOptions' bad input, found before a model loads (one line)."""
    if a.num_images < 2:
        raise UserError("--num_images must be >= 2 (DIV compares samples of one prompt)")
    if not math.isfinite(a.lora_scale):
        raise UserError(f"--lora_scale must be a finite number, got {a.lora_scale}")
    if a.out:
        outdir.check_images_out(a.out)
    lora_files_of(a.model, a.lora)  # missing files: one line before any model loads
    check_model_folder(model_and_embeddings(a.model, a.embedding)[0])  # (a checkpoint: its run's base model)
    if a.base_model:
        check_model_folder(a.base_model)
    if checkpoint_of(a.model) is not None:
        from trainer.core.checkpoint import verify

        problem = verify(Path(a.model))
        if problem is not None:
            raise UserError(f"checkpoint {a.model} is damaged: {problem}; evaluate another checkpoint or the "
                            f"finished output folder")


def run(a) -> dict:
    """`dbtrain eval` of a checked EvalOptions: sample, score, print (and with --out write) the metrics."""
    from trainer.core.images import list_images, make_grid, open_rgb
    from trainer.world.metrics import Scorer, markdown_table

    rec = recorded_subject(Path(a.model))
    identifier = a.identifier or rec.get("identifier")
    class_noun = a.class_noun or rec.get("class_noun")
    if not identifier or not class_noun:
        raise UserError(f"{a.model} records no identifier/class (not a dbtrain train output); "
                        f"pass --identifier and --class_noun")
    # caption files (kohya's .txt, as the demo writes) beside the pictures are expected, not noted
    real = [open_rgb(p) for p in list_images(a.instance_data_dir, "instance image", captions=".txt")]
    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    scorer = Scorer(a.judge, a.clip_model, a.dino_model, device)
    kw = dict(templates=a.prompts or DEFAULT_PROMPTS, num_images=a.num_images, steps=a.steps, guidance=a.guidance,
              seed=a.seed)
    ev = evaluate(load_pipeline(a.model, device, a.embedding, a.lora, a.lora_scale), scorer, real, identifier,
                  class_noun, **kw)
    rows, cis = {str(a.model): ev.metrics}, {str(a.model): ev.intervals}
    ref = None
    if a.base_model:
        ref = evaluate(load_pipeline(a.base_model, device), scorer, real, identifier, class_noun,
                       with_identifier=False, **kw)
        name = f"{a.base_model} (prompts without {identifier})"
        rows, cis = {name: ref.metrics, **rows}, {name: ref.intervals, **cis}
    metrics, samples = ev.metrics, ev.samples
    table = markdown_table(rows, intervals=cis)
    print(table)
    print(f"mean [95% bootstrap interval over images]; image k of each prompt from seed {a.seed} + k; "
          f"PLACE by prompt: " + ", ".join(f"{p}: {v:.2f}" for p, v in ev.place_by_prompt.items() if v is not None))
    print(f"embeddings: CLIP from {scorer.names['clip']}, DINO from {scorer.names['dino']}")
    if a.out:
        out = outdir.claim_images_out(a.out, "eval")
        for k, (prompt, images) in enumerate(samples.items()):
            make_grid(images).save(out / f"prompt-{k}.png")
        (out / "metrics.json").write_text(json.dumps({
            "model": str(a.model), "identifier": identifier, "class_noun": class_noun, "prompts": list(samples),
            "num_images": a.num_images, "seed": a.seed, "steps": a.steps, "guidance": a.guidance,
            "embeddings": scorer.names, "metrics": metrics, "intervals": ev.intervals,
            "place_by_prompt": ev.place_by_prompt,
            "reference": None if ref is None else {"model": str(a.base_model), "metrics": ref.metrics,
                                                   "intervals": ref.intervals,
                                                   "place_by_prompt": ref.place_by_prompt}}, indent=1))
        (out / "metrics.md").write_text(table + "\n")
        print(f"wrote samples and metrics to {out}")
    return metrics
