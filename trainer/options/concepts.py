"""Several subjects in one run: the --concepts file (JSON or TOML). No torch here.

The file is the concepts_list of the DreamBooth forks (ShivamShrirao's diffusers fork): a list of
{instance_data_dir, instance_prompt, class_prompt, class_data_dir}, plus kohya's `repeats` and, optionally, each
concept's caption_extension, mask_dir, num_class_images and identifier (not given: the flags'). JSON: a list or an
object with a "concepts" list; TOML: [[concepts]] tables. Relative paths are relative to the file.

Each concept is checked as a run of its own would be (trainer.options.checks on a copy of the options that holds
the concept's values as the flags), so its errors are the flags' errors, said of the concept.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import os
import re
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

from trainer.errors import UserError

KEYS = ("instance_data_dir", "instance_prompt", "class_prompt", "class_data_dir", "repeats", "caption_extension",
        "mask_dir", "num_class_images", "identifier")
PATH_KEYS = ("instance_data_dir", "class_data_dir", "mask_dir")
INT_KEYS = ("repeats", "num_class_images")


@dataclass
class Concept:
    """One subject of the run; None: the flag's value (trainer.options.train.DataOptions / PriorOptions)."""

    instance_data_dir: str
    instance_prompt: str | None = None
    class_prompt: str | None = None
    class_data_dir: str | None = None
    repeats: int = 1
    caption_extension: str | None = None
    mask_dir: str | None = None
    num_class_images: int | None = None
    identifier: str | None = None
    name: str = ""  # what messages and the start line call it: its folder's name


def load(path) -> list[Concept]:
    """The concepts of a --concepts file, paths made relative to the file's folder; a file that is missing, does
    not parse or is not a list of concept tables with the right kinds of values is one line."""
    path = Path(path)
    where = f"--concepts {path}"
    if not path.is_file():
        raise UserError(f"{where}: no such file" if not path.exists() else f"{where} is a folder, not a file")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{where}: cannot read it ({getattr(e, 'strerror', None) or e})") from e
    table = _parse(text, path, where)
    items = table.get("concepts") if isinstance(table, dict) else table
    if not isinstance(items, list):
        got = (f"a table without a \"concepts\" list (keys: {', '.join(map(str, table)) or 'none'})"
               if isinstance(table, dict) else type(table).__name__)
        raise UserError(f"{where}: expected a list of concepts (or a table with a \"concepts\" list), got {got}")
    if not items:
        raise UserError(f"{where} holds no concepts")
    out = [_concept(item, k, path.parent, where) for k, item in enumerate(items, 1)]
    names = [c.name for c in out]
    for c in out:  # two folders of one name (a/dog, b/dog): the index tells them apart
        if names.count(c.name) > 1:
            c.name = f"{c.name}-{out.index(c) + 1}"
    return out


def _parse(text: str, path: Path, where: str):
    toml = path.suffix.lower() == ".toml" or (path.suffix.lower() != ".json" and text.lstrip()[:1] not in "[{")
    if toml:
        try:
            return tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:  # (its message ends with "(at line L, column C)")
            raise UserError(f"{where}: not valid TOML: {e}") from e
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{where}: not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}") from e


def _concept(item, k: int, root: Path, where: str) -> Concept:
    if not isinstance(item, dict):
        raise UserError(f"{where}: concept {k} is a {type(item).__name__}, not a table of "
                        f"{{instance_data_dir, instance_prompt, ...}}")
    unknown = sorted(set(item) - set(KEYS))
    if unknown:
        raise UserError(f"{where}: concept {k} has unknown key(s) {', '.join(map(str, unknown))} (a concept has "
                        f"{', '.join(KEYS)})")
    for key, value in item.items():
        kind = "a whole number" if key in INT_KEYS else "text"
        if (key in INT_KEYS and (isinstance(value, bool) or not isinstance(value, int))) or (
                key not in INT_KEYS and not isinstance(value, str)):
            raise UserError(f"{where}: concept {k}: {key} must be {kind}, got {value!r}")
    for key in ("instance_data_dir", "instance_prompt"):
        if not str(item.get(key) or "").strip():
            raise UserError(f"{where}: concept {k} has no {key} (each concept names its images' folder and their "
                            f"prompt, e.g. {{\"instance_data_dir\": \"dog\", \"instance_prompt\": \"a photo of [V] "
                            f"dog\"}})")
    values = {key: (str(root / os.path.expanduser(v)) if key in PATH_KEYS and v else v) for key, v in item.items()}
    c = Concept(**values)
    c.name = Path(c.instance_data_dir).name or f"concept-{k}"
    if c.repeats < 1:
        raise UserError(f"{where}: concept {k} ({c.name}): repeats must be >= 1, got {c.repeats}")
    return c


def concepts_of(opts) -> list[Concept]:
    """The run's concepts with the flags' values where a concept gives none: the --concepts file's, else the one
    subject of --instance_data_dir and the prompts."""
    data, prior = opts.data, opts.prior
    found = load(data.concepts) if data.concepts else [Concept(data.instance_data_dir, data.instance_prompt,
                                                               prior.class_prompt, prior.class_data_dir)]
    for c in found:
        c.caption_extension = c.caption_extension if c.caption_extension is not None else data.caption_extension
        c.mask_dir = c.mask_dir if c.mask_dir is not None else data.mask_dir
        c.num_class_images = c.num_class_images if c.num_class_images is not None else prior.num_class_images
        c.identifier = c.identifier if c.identifier is not None else data.identifier
        c.name = c.name or Path(str(c.instance_data_dir or "")).name
    return found


def options_of(opts, concept: Concept):
    """A copy of `opts` whose flags are `concept`'s values: what a run of that subject alone would be given."""
    data = dataclasses.replace(opts.data, instance_data_dir=concept.instance_data_dir,
                               instance_prompt=concept.instance_prompt, caption_extension=concept.caption_extension,
                               mask_dir=concept.mask_dir, identifier=concept.identifier, concepts=None)
    prior = dataclasses.replace(opts.prior, class_prompt=concept.class_prompt, class_data_dir=concept.class_data_dir,
                                num_class_images=concept.num_class_images)
    return dataclasses.replace(opts, data=data, prior=prior)


def label(opts, k: int, concept: Concept) -> str:
    """How a message names concept k (1-based) of the --concepts file."""
    return f"--concepts {opts.data.concepts}: concept {k} ({concept.name})"


@contextlib.contextmanager
def said_of(opts, k: int, concept: Concept):
    """A UserError inside is re-raised as said of concept k: prefixed with it, the flags it replaces by its keys."""
    try:
        yield
    except UserError as e:
        text = re.sub(rf"--({'|'.join(KEYS)})\b", r"\1", str(e))
        raise UserError(f"{label(opts, k, concept)}: {text}") from e


def instance_count(opts) -> int:
    """The instance images of an epoch: each concept's images x its repeats (kohya's dataset length)."""
    from trainer.options.checks import count_images

    return sum(count_images(c.instance_data_dir) * c.repeats for c in concepts_of(opts))


def class_folders(opts) -> dict[str, tuple[str, int]]:
    """{real path: (the folder as given, images wanted)} of each class folder of the run; a folder shared by
    concepts is filled to the largest of their counts (trainer.core.class_images)."""
    out: dict[str, tuple[str, int]] = {}
    for c in concepts_of(opts):
        key = os.path.realpath(c.class_data_dir or "")
        given, n = out.get(key, (c.class_data_dir, 0))
        out[key] = (given, max(n, c.num_class_images))
    return out


def class_count(opts) -> int:
    """The class images of the run (each class folder's)."""
    return sum(n for _, n in class_folders(opts).values())


def check(opts) -> None:
    """UserError for the first bad concept of --concepts: the file, each concept as a run of its own, and what
    the concepts must not share (trainer.options.train.parse calls it after checks.check when --concepts is
    given)."""
    from trainer.options import checks

    data, where = opts.data, f"--concepts {opts.data.concepts}"
    if opts.method == "textual_inversion":
        raise UserError("dbtrain textual-inversion learns one placeholder: it does not take --concepts (train "
                        "several subjects with dbtrain train --concepts)")
    if opts.embedding.train_text_embedding:
        raise UserError("--train_text_embedding with --concepts is not supported (the new tokens are one subject's); "
                        "train the concepts without it, or each subject in a run of its own")
    for flag in ("instance_data_dir", "instance_prompt"):
        if getattr(data, flag):
            raise UserError(f"--concepts names each subject's folder and prompt; give either --concepts or "
                            f"--{flag}, not both")
    for flag in ("class_data_dir", "class_prompt"):
        if getattr(opts.prior, flag):
            raise UserError(f"--concepts gives each concept its own {flag}; leave --{flag} out")
    found = concepts_of(opts)
    if any(c.mask_dir for c in found):
        data.masked_loss = True  # (as --mask_dir: a mask folder says what is meant)
    for k, c in enumerate(found, 1):
        folder = Path(c.instance_data_dir)
        if not folder.is_dir():
            raise UserError(f"{label(opts, k, c)}: instance_data_dir {folder} "
                            f"{'does not exist' if not folder.exists() else 'is a file, not a folder of images'}")
        if c.class_data_dir and Path(c.class_data_dir).exists() and not Path(c.class_data_dir).is_dir():
            raise UserError(f"{label(opts, k, c)}: class_data_dir {c.class_data_dir} is a file, not a folder")
        one = copy.deepcopy(options_of(opts, c))
        markers = checks.subject_markers(one)
        if not data.prompt_without_identifier and not checks.names_subject(c.instance_prompt, markers):
            has = f"names neither [V] nor {markers[-1]}" if len(markers) > 1 else "has no [V]"
            raise UserError(f"{label(opts, k, c)}: instance_prompt {c.instance_prompt!r} {has}: write [V] where the "
                            f"subject's word goes, e.g. \"a photo of [V] dog\", "
                            f"give the concept its word (\"identifier\": \"zwx\" for a prompt that writes zwx), or "
                            f"add --prompt_without_identifier to train on it as written")
        with said_of(opts, k, c):
            checks.check(one)  # (the flags' checks, for this concept: prompts, class folder, caption files, mask_dir)
    prompts_of: dict[str, tuple[int, str]] = {}
    for k, c in enumerate(found, 1):
        if not opts.prior.with_prior_preservation:
            break
        key = os.path.realpath(c.class_data_dir)
        j, other = prompts_of.setdefault(key, (k, c.class_prompt))
        if other != c.class_prompt:
            raise UserError(f"{where}: concepts {j} and {k} share the class_data_dir {c.class_data_dir} but not the "
                            f"class prompt ({other!r}, {c.class_prompt!r}): its images are drawn from one prompt; "
                            f"give each class prompt a folder of its own")
        for i, d in enumerate(found, 1):  # nor is one's class folder another's subject folder
            if i != k:
                with said_of(opts, k, c):
                    pair = dataclasses.replace(c, instance_data_dir=d.instance_data_dir)
                    checks._class_folder(options_of(opts, pair))
    words: dict[str, int] = {}
    for k, c in enumerate(found, 1):
        if c.identifier != "auto" and words.setdefault(c.identifier, k) != k:
            print(f"dbtrain: note: {where}: concepts {words[c.identifier]} and {k} share the identifier "
                  f"{c.identifier}: both subjects are learned under one word; give each concept its own "
                  f"\"identifier\"", file=sys.stderr, flush=True)
            break
