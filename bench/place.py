"""The PLACE classifier measured: its accuracy per place on rendered scenes, and the CLIP-T that perfect
samples of the subject would get (bench/results/demo/place-classifier.{json,md}).

    python -m bench place [--per_place 100] [--seed 0] [--out bench/results/demo/place-classifier]
"""
from __future__ import annotations

import random

from trainer.world import scenes
from trainer.world.place import PLACES, PlaceClassifier


def validation_scenes(per_place: int, seed: int = 0) -> list[tuple[object, str]]:
    """(image, place) pairs: random objects (a third patterned) in every place, plus the subject
    (orange, striped star) in every place, background details from the seed."""
    rng = random.Random(seed)
    out = []
    for place in PLACES:
        for k in range(per_place):
            s = scenes.sample_scene(rng, p_texture=0.3)
            if k % 4 == 0:  # the subject itself, also in places its pictures never show
                s = scenes.Scene("star", "orange", "big", place, s.x, s.y, s.angle, "striped")
            s = scenes.Scene(**{**s.__dict__, "context": place})
            out.append((scenes.render(s, seed=rng.randrange(1 << 30)), place))
    return out


def validate(scorer, per_place: int = 40, seed: int = 0, noun: str = "star") -> dict[str, float]:
    """{place: accuracy} of the classifier on rendered scenes (`validation_scenes`)."""
    pairs = validation_scenes(per_place, seed)
    clf = PlaceClassifier(scorer, noun)
    pred = clf.predict(scorer.images([im for im, _ in pairs])["clip"])
    acc = {}
    for place in PLACES:
        hits = [p == t for p, (_, t) in zip(pred, pairs) if t == place]
        acc[place] = sum(hits) / len(hits)
    return acc


def clip_t_of_pictures(scorer, seed: int = 0) -> dict[str, float]:
    """CLIP-T that perfect samples would get: the subject's own pictures, and plain stars of random
    colours drawn the same way, each against "a star <the place it shows>" (the prompt without [V])."""
    rng = random.Random(seed)
    real = scenes.subject_images(5)
    places = [scenes.subject_place(k) for k in range(5)]
    plain = [scenes.render(scenes.Scene("star", rng.choice(sorted(scenes.COLORS)), "big", p, 0.5, 0.5,
                                        rng.uniform(-15, 15)), seed=k) for k, p in enumerate(places)]
    text = scorer.texts([f"a {scenes.SUBJECT_CLASS} {p}" for p in places])
    return {name: float((scorer.images(ims)["clip"] * text).sum(1).mean())
            for name, ims in (("subject pictures", real), ("plain stars", plain))}


def main(argv: list[str] | None = None) -> int:
    """python -m bench place [--out bench/results/demo/place-classifier]: the classifier's
    accuracy per place on rendered scenes, and the CLIP-T of the subject's own pictures."""
    import argparse
    import json
    import os
    import platform
    from pathlib import Path

    from trainer.world.metrics import Scorer

    p = argparse.ArgumentParser(prog="python -m bench place")
    p.add_argument("--per_place", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench/results/demo/place-classifier")
    a = p.parse_args(argv)
    scorer = Scorer()
    acc = validate(scorer, a.per_place, a.seed)
    ct = clip_t_of_pictures(scorer)
    rec = {"accuracy_by_place": acc, "per_place": a.per_place, "seed": a.seed, "clip_t_of_pictures": ct,
           "device": f"{platform.machine()} CPU, {os.cpu_count()} cores",
           "command": f"python -m bench place --per_place {a.per_place} --seed {a.seed} --out {a.out}"}
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(rec, indent=1) + "\n")
    lines = ["| place | in the subject's pictures | accuracy |", "|---|---:|---:|"]
    for place, v in acc.items():
        lines.append(f"| {place} | {sum(scenes.subject_place(k) == place for k in range(5))} of 5 | {v:.3f} |")
    text = (f"PLACE classifier (judge, zero-shot over 'a star <place>'), {a.per_place} rendered scenes per place "
            f"(a quarter of them the striped subject), seed {a.seed}: `{rec['command']}`\n\n" + "\n".join(lines) +
            "\n\nCLIP-T against 'a star <place>' of pictures that show exactly that: the subject's own pictures "
            f"{ct['subject pictures']:.3f}, plain stars of random colours {ct['plain stars']:.3f}.\n")
    out.with_suffix(".md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
