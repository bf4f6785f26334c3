"""`dbtrain fabric`: images steered by liked / disliked images through the UNet's self-attention, no training
(trainer.fabric); with --auto_feedback a simulated user picks over several rounds."""
from __future__ import annotations

import json

from trainer.commands import quiet_libraries
from trainer.families import check_model_folder
from trainer.formats.io import one_line_write_errors
from trainer.formats.outdir import check_images_out, claim_images_out
from trainer.options.fabric import parse


def run(argv: list[str]) -> int:
    """`dbtrain fabric ...`; returns 0, raises UserError for bad input."""
    a = parse(argv)
    check_images_out(a.out)
    check_model_folder(a.model)  # before torch and the model load
    quiet_libraries()
    from trainer.core.images import make_grid
    from trainer.fabric.sampling import (fabric_sample, load_pipeline, make_scheduler, open_feedback_image,
                                         simulated_rounds)

    liked, disliked = list(a.liked), list(a.disliked)
    pipe = load_pipeline(a.model, a.device)
    kw = dict(negative_prompt=a.negative_prompt, steps=a.steps, guidance_scale=a.guidance_scale,
              feedback_start=a.feedback_start, feedback_end=a.feedback_end, min_weight=a.min_weight,
              max_weight=a.max_weight, neg_scale=a.neg_scale, resolution=a.resolution,
              scheduler=make_scheduler(pipe, a.scheduler), attention=a.attention)
    out = claim_images_out(a.out, "fabric")
    record = {"settings": dict(vars(a)), "scheduler": type(kw["scheduler"]).__name__}
    if a.auto_feedback:
        from trainer.world.metrics import Scorer

        scorer = Scorer(a.judge, device=pipe._execution_device)
        target = open_feedback_image(a.auto_feedback, "--auto_feedback")
        rounds = simulated_rounds(pipe, a.prompt, target, scorer, rounds=a.rounds, num_images=a.num_images,
                                  seed=a.seed, likes_per_round=a.likes_per_round,
                                  dislikes_per_round=a.dislikes_per_round, liked=liked, disliked=disliked,
                                  embedding=a.judge_embedding, **kw)
        files = {f"round-{r['round']}/{k:03d}.png": im for r in rounds for k, im in enumerate(r["images"])}
        files["grid.png"] = make_grid([im for r in rounds for im in r["images"]], cols=a.num_images)
        for r in rounds:
            print(f"round {r['round']}: {r['n_liked']} liked, {r['n_disliked']} disliked so far; similarity to "
                  f"target mean {sum(r['similarity']) / len(r['similarity']):.3f}, best {max(r['similarity']):.3f}")
        record["rounds"] = [{k: v for k, v in r.items() if k != "images"} for r in rounds]
        wrote = sum(len(r["images"]) for r in rounds)
    else:
        res = fabric_sample(pipe, a.prompt, liked, disliked, num_images=a.num_images, seed=a.seed, **kw)
        files = {f"{k:03d}.png": im for k, im in enumerate(res.images)}
        files["grid.png"] = make_grid(res.images)
        record.update(seeds=res.seeds, weights=res.weights, notes=res.notes, stats=res.stats)
        wrote = len(res.images)
    need = sum(3 * im.width * im.height for im in files.values())  # (uncompressed: an upper bound)
    with one_line_write_errors(out, "the images", need):  # a full disk: one line, not a traceback
        for name, im in files.items():
            (out / name).parent.mkdir(exist_ok=True)
            im.save(out / name)
        (out / "fabric.json").write_text(json.dumps(record, indent=1, default=str))
    print(f"wrote {wrote} image(s), grid.png and fabric.json to {out}")
    return 0
