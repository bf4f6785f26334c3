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


def subjects_of(a, rec: dict) -> list[dict]:
    """What `dbtrain eval` scores: [{name, identifier, class_noun, instance_data_dir}]. A run of several concepts
    (its dreambooth.json's "concepts"): each concept against its own pictures, or with --instance_data_dir the
    concept of that folder; --identifier / --class_noun override what the run recorded. One subject (name None):
    --instance_data_dir with the recorded or given identifier and class."""
    concepts = rec.get("concepts") or _concepts_of_running(a.model)
    given = a.instance_data_dir
    if concepts:
        picked = [c for c in concepts if given is None or _same_folder(given, c["instance_data_dir"])]
        if picked:
            return [{"name": c["name"], "identifier": a.identifier or c["identifier"],
                     "class_noun": a.class_noun or c["class_noun"], "instance_data_dir": c["instance_data_dir"]}
                    for c in picked]
        if not (a.identifier and a.class_noun):
            folders = ", ".join(f"{c['name']}: {c['instance_data_dir']}" for c in concepts)
            raise UserError(f"--instance_data_dir {given} is none of {a.model}'s concepts' folders ({folders}); leave "
                            f"it out to score each concept against its own pictures, or pass --identifier and "
                            f"--class_noun to score these pictures")
    if given is None:
        raise UserError("--instance_data_dir is required (the subject's real images)")
    identifier = a.identifier or rec.get("identifier")
    class_noun = a.class_noun or rec.get("class_noun")
    if not identifier or not class_noun:
        raise UserError(f"{a.model} records no identifier/class (not a dbtrain train output); "
                        f"pass --identifier and --class_noun")
    return [{"name": None, "identifier": identifier, "class_noun": class_noun, "instance_data_dir": given}]


def _same_folder(a, b) -> bool:
    return Path(a).resolve() == Path(b).resolve()


def _concepts_of_running(model) -> list[dict]:
    """A checkpoint of a --concepts run still going (no dreambooth.json yet): its concepts from the file its
    options name, where that file is still there and each concept's word is known (not --identifier auto)."""
    ck = checkpoint_of(model)
    path = (ck.config.get("concepts") if ck is not None else None) or None
    if not path or not Path(path).is_file():
        return []
    from trainer.options.concepts import load

    try:
        found = load(path)
    except UserError:
        return []
    out = []
    for c in found:
        ident = c.identifier or ck.config.get("identifier")
        words = c.instance_prompt.split()
        noun = (c.class_prompt.split()[-1] if c.class_prompt else
                words[words.index("[V]") + 1] if "[V]" in words[:-1] else None)
        if not ident or ident == "auto" or not noun:
            return []
        out.append({"name": c.name, "identifier": ident, "class_noun": noun,
                    "instance_data_dir": str(Path(c.instance_data_dir).resolve())})
    return out


def run(a) -> dict:
    """`dbtrain eval` of a checked EvalOptions: sample, score, print (and with --out write) the metrics; of each
    concept of a --concepts run (a row each)."""
    from trainer.core.images import list_images, make_grid, open_rgb
    from trainer.world.metrics import Scorer, markdown_table

    subjects = subjects_of(a, recorded_subject(Path(a.model)))
    several = subjects[0]["name"] is not None
    # caption files (kohya's .txt, as the demo writes) beside the pictures are expected, not noted
    real = [[open_rgb(p) for p in list_images(s["instance_data_dir"], "instance image", captions=".txt")]
            for s in subjects]
    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    scorer = Scorer(a.judge, a.clip_model, a.dino_model, device)
    kw = dict(templates=a.prompts or DEFAULT_PROMPTS, num_images=a.num_images, steps=a.steps, guidance=a.guidance,
              seed=a.seed)
    tags = [f" [{s['name']}]" if several else "" for s in subjects]
    pipe = load_pipeline(a.model, device, a.embedding, a.lora, a.lora_scale)
    evs = [evaluate(pipe, scorer, r, s["identifier"], s["class_noun"], **kw) for s, r in zip(subjects, real)]
    del pipe  # (one pipeline in memory at a time)
    rows = {f"{a.model}{t}": ev.metrics for t, ev in zip(tags, evs)}
    cis = {f"{a.model}{t}": ev.intervals for t, ev in zip(tags, evs)}
    refs, ref_evs = {}, [None] * len(subjects)
    if a.base_model:
        base = load_pipeline(a.base_model, device)
        for j, (s, r, t) in enumerate(zip(subjects, real, tags)):
            ref = ref_evs[j] = evaluate(base, scorer, r, s["identifier"], s["class_noun"], with_identifier=False, **kw)
            name = f"{a.base_model}{t} (prompts without {s['identifier']})"
            refs[name], cis[name] = ref.metrics, ref.intervals
    results = list(zip(subjects, evs, ref_evs))
    table = markdown_table({**refs, **rows}, intervals=cis)
    print(table)
    for s, ev, _ in results:
        print(("" if not several else f"{s['name']}: ")
              + f"mean [95% bootstrap interval over images]; image k of each prompt from seed {a.seed} + k; "
              f"PLACE by prompt: " + ", ".join(f"{p}: {v:.2f}" for p, v in ev.place_by_prompt.items() if v is not None))
    print(f"embeddings: CLIP from {scorer.names['clip']}, DINO from {scorer.names['dino']}")
    if a.out:
        out = outdir.claim_images_out(a.out, "eval")
        for j, (s, ev, _) in enumerate(results):
            for k, (prompt, images) in enumerate(ev.samples.items()):
                make_grid(images).save(out / (f"concept-{j}-prompt-{k}.png" if several else f"prompt-{k}.png"))
        run_fields = {"num_images": a.num_images, "seed": a.seed, "steps": a.steps, "guidance": a.guidance,
                      "embeddings": scorer.names}
        records = [{"identifier": s["identifier"], "class_noun": s["class_noun"], "prompts": list(ev.samples),
                    **({} if several else run_fields), "metrics": ev.metrics, "intervals": ev.intervals,
                    "place_by_prompt": ev.place_by_prompt,
                    "reference": None if ref is None else {"model": str(a.base_model), "metrics": ref.metrics,
                                                           "intervals": ref.intervals,
                                                           "place_by_prompt": ref.place_by_prompt}}
                   for s, ev, ref in results]
        if several:  # each concept's record as a one-subject eval writes it, with its name and pictures
            doc = {"model": str(a.model), **run_fields, "concepts": [
                {"name": s["name"], "instance_data_dir": s["instance_data_dir"], **r}
                for (s, _, _), r in zip(results, records)]}
        else:
            doc = {"model": str(a.model), **records[0]}
        (out / "metrics.json").write_text(json.dumps(doc, indent=1))
        (out / "metrics.md").write_text(table + "\n")
        print(f"wrote samples and metrics to {out}")
    if several:
        return {s["name"]: ev.metrics for s, ev, _ in results}
    return results[0][1].metrics
