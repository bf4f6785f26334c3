"""The six experiments of `python -m bench features` (bench/features.py runs them): their data, arms, training
command lines, the models each arm is scored as, and the measures beyond the paper's metrics.

An experiment is data written once (seed-independent), then per training seed a Plan: the `dbtrain train` runs and
the models to score. Every run is the demo's recipe (trainer.world.demo.train_args with DEMO_EXTRA_FLAGS) plus the
arm's flags, unless the experiment says otherwise.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from trainer.options.sampling import DEFAULT_PROMPTS, DEMO_EXTRA_FLAGS
from trainer.world import demo, scenes

# pivotal tuning's flags of the demo recipe (--concepts does not take them: the concepts experiment runs without)
PIVOTAL = ("--train_text_embedding", "--initializer_token", "--text_embedding_lr")
SECOND = {"shape": "cross", "color": "purple", "texture": "dotted", "texture_color": "yellow"}  # tests/test_own_subject
SECOND_IDENTIFIER = "zwx"  # a single token of the built-in tokenizer, like "sks"
OUTLIER = {"outlier": 2, "shape": "square", "color": "blue"}
BUCKET_RESO_STEPS = 16  # the built-in model's latents are 4x smaller and its UNet halves them twice: sides % 16


@dataclass
class Config:
    steps: int
    learning_rate: float
    num_class_images: int
    sample_steps: int
    device: str | None
    buckets: str = "auto"


@dataclass
class Subject:
    """What a model is scored on: the prompts' word and class noun, and the real pictures DINO / CLIP-I compare with."""

    name: str
    word: str
    noun: str
    real: list
    templates: tuple[str, ...] = DEFAULT_PROMPTS


@dataclass
class Run:
    name: str        # its folder under WORK/seed<s>/ (the model in WORK/seed<s>/<name>)
    args: list[str]  # `dbtrain train` arguments


@dataclass
class Scored:
    arm: str
    model: str       # which of the arm's models ("-" when it has one)
    path: Path
    subject: Subject
    runs: list[str]  # the runs the arm took (its time)


@dataclass
class Plan:
    runs: list[Run]
    scored: list[Scored]
    class_sets: list[tuple[list[str], str]] = field(default_factory=list)  # (a run's args, class noun): drawn first


def without(args: list[str], flags) -> list[str]:
    """`args` less the given flags and each one's value (flags of one value, or none when a flag follows)."""
    out, skip = [], False
    for i, a in enumerate(args):
        if skip:
            skip = False
            continue
        if a in flags:
            skip = i + 1 < len(args) and not args[i + 1].startswith("--")
            continue
        out.append(a)
    return out


def recipe(cfg: Config, subject: Path, model_dir: Path, class_dir: Path, seed: int, extra=(), *,
           noun: str = scenes.SUBJECT_CLASS, pivotal: bool = True, identifier: str = demo.IDENTIFIER) -> list[str]:
    """The demo's `dbtrain train` command line for one run, with `extra` flags; a step log line every 10 steps
    (ms per step from more than a few intervals)."""
    flags = list(DEMO_EXTRA_FLAGS) if pivotal else without(list(DEMO_EXTRA_FLAGS), PIVOTAL)
    args = demo.train_args(demo.BUILTIN_MODEL, subject, model_dir.parent, prior=True, steps=cfg.steps,
                           lr=cfg.learning_rate, num_class_images=cfg.num_class_images, seed=seed, device=cfg.device,
                           sample_steps=cfg.sample_steps, class_dir=class_dir, extra=tuple(flags) + tuple(extra),
                           class_noun=noun, model_dir=model_dir)
    args[args.index("--log_every") + 1] = "10"
    if identifier != demo.IDENTIFIER:
        args[args.index("--identifier") + 1] = identifier
    return args


def _save(folder: Path, images, captions: list[str] | None = None, write: bool = True) -> Path:
    """Picture k as subject-k.png (and its caption as subject-k.txt); write=False: only the folder's name."""
    if not write:
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    for k, im in enumerate(images):
        im.save(folder / f"subject-{k}.png")
        if captions:
            (folder / f"subject-{k}.txt").write_text(captions[k] + "\n")
    return folder


def place_captions(noun: str = scenes.SUBJECT_CLASS, count: int = 5, places=scenes.SUBJECT_CONTEXTS) -> list[str]:
    """The demo's captions: picture k is "a [V] <noun> <its place>" (places[k % len(places)])."""
    return [f"a [V] {noun} {places[k % len(places)]}" for k in range(count)]


def subject_of(word: str = None) -> Subject:
    return Subject("star", word or demo.prompt_word(), scenes.SUBJECT_CLASS, scenes.subject_images(5))


# ---------------------------------------------------------------- the measures beyond the paper's

def place_hits(scorer, samples: dict, noun: str, skip_place: str) -> dict[str, np.ndarray]:
    """Over the samples of prompts naming a place other than `skip_place`: PLACE_OTHER (1 where the judge sees the
    named place) and LEAK (1 where it sees `skip_place` instead), per image."""
    from trainer.world.place import PlaceClassifier, place_of

    classifier = PlaceClassifier(scorer, noun)
    hit, leak = [], []
    for prompt, images in samples.items():
        place = place_of(prompt)
        if place is None or place == skip_place:
            continue
        seen = classifier.predict(scorer.images(images)["clip"])
        hit += [p == place for p in seen]
        leak += [p == skip_place for p in seen]
    return {"PLACE_OTHER": np.array(hit, float), "LEAK": np.array(leak, float)}


def subject_pixels(image) -> np.ndarray:
    """Where an image shows the subject's colour (the world knows it): warm saturated pixels, R > 140, R - G > 80,
    R - B > 100. The star's orange (245, 140, 30) and the red-orange the model draws it in (~(200, 60, 35)) pass;
    sky, snow, grass, water, space and sand, also the warmer sand the model draws (~(228, 185, 115)), do not. A red
    table (170, 30, 35) would: no picture or prompt of the buckets experiment has one."""
    a = np.asarray(image.convert("RGB"), dtype=np.int32)
    r, g, b = a[..., 0], a[..., 1], a[..., 2]
    return (r > 140) & (r - g > 80) & (r - b > 100)


def cut_by_border(image, frame: int = 2, min_pixels: int = 4) -> bool:
    """CUT of one image: at least `min_pixels` subject-coloured pixels in the outer `frame` pixels of the image, i.e.
    the subject runs into the border (a whole subject inside the picture leaves the frame to the background)."""
    m = subject_pixels(image)
    inner = np.zeros_like(m)
    inner[frame:-frame, frame:-frame] = True
    return int((m & ~inner).sum()) >= min_pixels


def cut_share(samples: dict) -> dict[str, np.ndarray]:
    return {"CUT": np.array([cut_by_border(im) for images in samples.values() for im in images], float)}


# ---------------------------------------------------------------- the experiments

class Experiment:
    name = ""
    arms: tuple[str, ...] = ()
    optional_arms: tuple[str, ...] = ()
    extras: tuple[str, ...] = ()   # measures beyond METRICS, in the tables
    steps = 300
    eval_images = 12
    reading = ""                   # one line: what to look at

    def prepare(self, data: Path, write: bool = True) -> dict:
        """The data's folders {name: path} (write=False: the names only, for --dry)."""
        raise NotImplementedError

    def plan(self, seed: int, work: Path, data: dict, cfg: Config, arms) -> Plan:
        raise NotImplementedError

    def measure(self, scorer, subject: Subject, samples: dict) -> dict[str, np.ndarray]:
        return {}


class Masks(Experiment):
    """Every subject picture on the beach, masks on the star (from the world's renderer, PNGs in a --mask_dir)."""

    name = "masks"
    arms = ("no mask", "masked (none)", "masked (mean)")
    extras = ("PLACE_OTHER", "LEAK")
    eval_images = 16
    templates = ("a {V} {C} on the beach", "a {V} {C} in the snow", "a {V} {C} in space", "a {V} {C} in the grass")
    reading = ("LEAK: share of the samples of prompts naming another place (snow, space, grass) that the judge sees "
               "on the beach (lower: the beach leaks less); PLACE_OTHER: share showing the place named")
    # no caption files: "a [V] star" for every picture (a caption naming the beach would bind the beach to its word)

    def prepare(self, data, write=True):
        pairs = scenes.subject_in_one_place(5, "on the beach")
        return {"subject": _save(data / "beach", [p[0] for p in pairs], write=write),
                "masks": _save(data / "beach-masks", [p[1] for p in pairs], write=write)}

    def plan(self, seed, work, data, cfg, arms):
        flags = {"no mask": [], "masked (none)": ["--masked_loss", "--mask_dir", str(data["masks"]),
                                                  "--mask_normalization", "none"],
                 "masked (mean)": ["--masked_loss", "--mask_dir", str(data["masks"]), "--mask_normalization", "mean"]}
        subject = Subject("star", demo.prompt_word(), scenes.SUBJECT_CLASS, scenes.subject_images(5), self.templates)
        return _one_run_per_arm(seed, work, data["subject"], cfg, arms, flags, subject)

    def measure(self, scorer, subject, samples):
        return place_hits(scorer, samples, subject.noun, "on the beach")


class Buckets(Experiment):
    """Subject pictures of 1:1, 2:3 and 3:2 with the star towards one end: a centre square crop cuts it."""

    name = "buckets"
    arms = ("centre crop", "buckets")
    extras = ("CUT",)
    eval_images = 20
    reading = ("CUT: share of the [V] samples whose subject runs into the image border (lower: whole subjects); "
               "ms/step: training speed")

    def prepare(self, data, write=True):
        pairs = scenes.subject_aspect_images(5)
        captions = place_captions(places=scenes.ASPECT_PLACES)
        return {"subject": _save(data / "aspect", [p[0] for p in pairs], captions, write)}

    def plan(self, seed, work, data, cfg, arms):
        # both centre their crops: centre squares against the bucket's own shape (resized to cover it, centred)
        flags = {"centre crop": ["--center_crop"],
                 "buckets": ["--center_crop", "--aspect_ratio_buckets", cfg.buckets, "--bucket_reso_steps",
                             str(BUCKET_RESO_STEPS)]}
        return _one_run_per_arm(seed, work, data["subject"], cfg, arms, flags, subject_of())

    def measure(self, scorer, subject, samples):
        return cut_share(samples)


class Ema(Experiment):
    """One run gives both: --use_ema exports the average as the model, --save_raw_weights the raw weights to raw/."""

    name = "ema"
    arms = ("ema run",)
    eval_images = 20
    reading = "the spread (± std over training seeds) of DINO and PRES: the average's against the raw weights'"

    def prepare(self, data, write=True):
        return {"subject": _save(data / "subject", scenes.subject_images(5), place_captions(), write)}

    def plan(self, seed, work, data, cfg, arms):
        out = work / f"seed{seed}" / "ema"
        run = Run("ema", recipe(cfg, data["subject"], out, work / "class-star", seed,
                                ["--use_ema", "--save_raw_weights"]))
        subject = subject_of()
        return Plan([run], [Scored("ema run", "ema (the model)", out, subject, ["ema"]),
                            Scored("ema run", "raw (raw/)", out / "raw", subject, ["ema"])],
                    [(run.args, scenes.SUBJECT_CLASS)])


class Huber(Experiment):
    """Picture 2 of the five is a blue square (captioned as the star): a wrong picture in the set."""

    name = "huber"
    arms = ("l2", "huber (snr)")
    optional_arms = ("l2, clean pictures",)
    eval_images = 20
    reading = "DINO against the real subject's pictures (the outlier is not among them): higher is better"

    def prepare(self, data, write=True):
        return {"subject": _save(data / "outlier", scenes.subject_images_with_outlier(5, **OUTLIER), place_captions(),
                                 write),
                "clean": _save(data / "clean", scenes.subject_images(5), place_captions(), write)}

    def plan(self, seed, work, data, cfg, arms):
        flags = {"l2": ["--loss_type", "l2"], "huber (snr)": ["--loss_type", "huber", "--huber_schedule", "snr"],
                 "l2, clean pictures": ["--loss_type", "l2"]}
        plan = _one_run_per_arm(seed, work, data["subject"], cfg, [a for a in arms if a in flags and "clean" not in a],
                                flags, subject_of())
        if "l2, clean pictures" in arms:
            extra = _one_run_per_arm(seed, work, data["clean"], cfg, ["l2, clean pictures"], flags, subject_of())
            plan.runs += extra.runs
            plan.scored += extra.scored
        return plan


class Concepts(Experiment):
    """The demo's star and a purple cross with yellow dots (scenes.object_images): one --concepts run or two runs.
    Without pivotal tuning (--concepts does not take --train_text_embedding): the identifiers sks and zwx."""

    name = "concepts"
    arms = ("separate runs", "one --concepts run")
    reading = ("DINO of each concept (against its own pictures) and the arm's training time (both runs of 'separate' "
               "together); the --concepts run takes 2 x steps, so that each concept trains on as many rows")

    def prepare(self, data, write=True):
        folders = {"star": _save(data / "star", scenes.subject_images(5), place_captions(), write),
                   "cross": _save(data / "cross", scenes.object_images(**SECOND), place_captions(SECOND["shape"]),
                                  write)}
        return {**folders, "concepts": self.concepts_file(data, folders, write)}

    def subjects(self) -> dict[str, Subject]:
        return {"star": Subject("star", demo.IDENTIFIER, scenes.SUBJECT_CLASS, scenes.subject_images(5)),
                "cross": Subject("cross", SECOND_IDENTIFIER, SECOND["shape"], scenes.object_images(**SECOND))}

    def concepts_file(self, data: Path, folders: dict, write: bool) -> Path:
        """data/concepts.json: both subjects with their class folders (WORK/class-<name>, drawn before training)."""
        path = data / "concepts.json"
        items = [{"instance_data_dir": str(folders[name].resolve()), "instance_prompt": f"a [V] {s.noun}",
                  "class_prompt": f"a {s.noun}", "class_data_dir": str((data.parent / f"class-{name}").resolve()),
                  "identifier": s.word, "caption_extension": ".txt"} for name, s in self.subjects().items()]
        if write:
            path.write_text(json.dumps(items, indent=1) + "\n")
        return path

    def plan(self, seed, work, data, cfg, arms):
        subjects, folder = self.subjects(), work / f"seed{seed}"
        runs, scored, class_sets = [], [], []
        for name, s in subjects.items():
            args = recipe(cfg, data[name], folder / name, work / f"class-{name}", seed, noun=s.noun, pivotal=False,
                          identifier=s.word)
            class_sets.append((args, s.noun))
            if "separate runs" in arms:
                runs.append(Run(name, args))
                scored.append(Scored("separate runs", name, folder / name, s, list(subjects)))
        if "one --concepts run" in arms:
            both = Config(**{**cfg.__dict__, "steps": 2 * cfg.steps})
            args = recipe(both, data["star"], folder / "concepts", work / "class-star", seed, pivotal=False)
            args = without(args, ("--instance_data_dir", "--instance_prompt", "--identifier", "--class_prompt",
                                  "--class_data_dir"))
            runs.append(Run("concepts", args + ["--concepts", str(data["concepts"])]))
            scored += [Scored("one --concepts run", name, folder / "concepts", s, ["concepts"])
                       for name, s in subjects.items()]
        return Plan(runs, scored, class_sets)


def _one_run_per_arm(seed, work, subject_dir, cfg, arms, flags, subject) -> Plan:
    runs, scored = [], []
    for arm in arms:
        name = arm.replace(" ", "-").replace("(", "").replace(")", "").replace(",", "")
        out = work / f"seed{seed}" / name
        runs.append(Run(name, recipe(cfg, subject_dir, out, work / "class-star", seed, flags[arm])))
        scored.append(Scored(arm, "-", out, subject, [name]))
    return Plan(runs, scored, [(runs[0].args, scenes.SUBJECT_CLASS)] if runs else [])


class Optimizers(Experiment):
    """The demo's recipe with each optimizer: AdamW4bit (4-bit states) against AdamW8bit and torch AdamW (fp32
    states); nothing else differs."""

    name = "optimizers"
    arms = ("adamw", "adamw8bit", "adamw4bit")
    eval_images = 20
    reading = ("each arm's DINO, CLIP-I, PRES and PLACE against adamw8bit's: an arm inside adamw8bit's intervals "
               "learned as well; ms/step is the CPU step (torch AdamW's is the fastest there)")

    def prepare(self, data, write=True):
        return {"subject": _save(data / "subject", scenes.subject_images(5), place_captions(), write)}

    def plan(self, seed, work, data, cfg, arms):
        plan = _one_run_per_arm(seed, work, data["subject"], cfg, arms, {a: [] for a in self.arms}, subject_of())
        for run, arm in zip(plan.runs, arms):  # the recipe's own --optimizer (adamw on a CPU) gives way to the arm's
            run.args = without(run.args, ["--optimizer"]) + ["--optimizer", arm]
        return plan


EXPERIMENTS = {e.name: e for e in (Masks(), Buckets(), Ema(), Huber(), Concepts(), Optimizers())}
