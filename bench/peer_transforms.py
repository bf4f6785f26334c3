"""The first batch of a copied diffusers command line: our views against the script's own dataset code.

For each of train_dreambooth.py, train_dreambooth_lora.py and textual_inversion.py (imported from a diffusers
checkout's examples folder, which needs torchvision), the script's own parse_args reads a command line and its
own dataset class builds the training views of a few known pictures (square, wider, taller, sizes that do not
divide evenly); `dbtrain train` / `textual-inversion` reads the same command line plus --diffusers_defaults
and builds its views with the training code (trainer.core.concepts.Subjects). Every view must be bitwise equal.

Random draws cannot share a generator (the script's DataLoader shuffles with torch's global one), so each view
is compared for the same draw: the script's RandomCrop offset (recorded from torchvision) is given to ours as
the crop's place, and textual_inversion.py's flip (p = 0.5, ours the same) is compared flipped and not.
Used by `python -m bench peers transforms` and tests/test_peer_transforms.py.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np

SCRIPTS = {"full": "dreambooth/train_dreambooth.py", "lora": "dreambooth/train_dreambooth_lora.py",
           "ti": "textual_inversion/textual_inversion.py"}
SIZES = ((64, 64), (333, 200), (150, 211), (97, 64), (90, 90), (41, 130))  # (w, h): even, odd and uneven ratios
RESOLUTION = 64


def write_pictures(folder: Path) -> list[Path]:
    """Known pictures: seeded noise over gradients (every pixel differs, so a one-pixel shift shows)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for k, (w, h) in enumerate(SIZES):
        rng = np.random.default_rng(k)
        y, x = np.mgrid[0:h, 0:w]
        base = np.stack([x * 255 / max(w - 1, 1), y * 255 / max(h - 1, 1), (x + y) * 127 / max(w + h - 2, 1)], -1)
        arr = np.clip(base + rng.normal(0, 40, (h, w, 3)), 0, 255).astype(np.uint8)
        out.append(folder / f"picture-{k}-{w}x{h}.png")
        Image.fromarray(arr).save(out[-1])
    return out


def load_script(examples: Path, which: str):
    """The example script as a module (its module-level code runs: imports, check_min_version)."""
    path = Path(examples) / SCRIPTS[which]
    spec = importlib.util.spec_from_file_location(f"peer_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(path.parent))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(path.parent))
    return module


def command_line(which: str, model: Path, pictures: Path, out: Path, center_crop: bool) -> list[str]:
    """The script's command line (as its README gives it, at the built-in model's size)."""
    common = ["--pretrained_model_name_or_path", str(model), "--resolution", str(RESOLUTION), "--output_dir",
              str(out)] + (["--center_crop"] if center_crop else [])
    if which == "ti":
        return common + ["--train_data_dir", str(pictures), "--placeholder_token", "<sks>", "--initializer_token",
                         "star", "--learnable_property", "object"]
    return common + ["--instance_data_dir", str(pictures), "--instance_prompt", "a sks star"] + (
        ["--rank", "4"] if which == "lora" else [])


def our_views(which: str, argv: list[str]):
    """Our ImageSet for the command line + --diffusers_defaults, built as the training loop builds it."""
    from trainer.core.concepts import Subjects
    from trainer.options import textual_inversion as ti_config
    from trainer.options import train as config

    opts = (ti_config if which == "ti" else config).parse(argv + ["--diffusers_defaults"])
    return opts, Subjects(opts).inst


def _their_args(module, argv: list[str]):
    """The script's own parse_args on argv (textual_inversion.py's reads sys.argv)."""
    import inspect

    if inspect.signature(module.parse_args).parameters:
        return module.parse_args(argv)
    saved = sys.argv
    sys.argv = [module.__file__, *argv]
    try:
        return module.parse_args()
    finally:
        sys.argv = saved


def _their_dataset(module, which: str, args, tokenizer):
    if which == "ti":  # (as textual_inversion.py's main builds it: flip and resampling are the class's defaults)
        return module.TextualInversionDataset(data_root=args.train_data_dir, tokenizer=tokenizer,
                                              size=args.resolution, placeholder_token=args.placeholder_token,
                                              repeats=args.repeats, learnable_property=args.learnable_property,
                                              center_crop=args.center_crop, set="train")
    module.args = args  # (train_dreambooth_lora.py's dataset reads the module's global args)
    return module.DreamBoothDataset(instance_data_root=args.instance_data_dir, instance_prompt=args.instance_prompt,
                                    tokenizer=tokenizer, size=args.resolution, center_crop=args.center_crop)


def compare(examples: Path, model: Path, work: Path) -> list[dict]:
    """One row per (script, crop mode, picture, draw): whether our view equals the script's, bitwise."""
    import torch
    from torchvision import transforms
    from transformers import CLIPTokenizer

    from trainer.core import images

    pictures = write_pictures(Path(work) / "pictures")
    tokenizer = CLIPTokenizer.from_pretrained(Path(model) / "tokenizer")
    rows = []
    for which in SCRIPTS:
        module = load_script(examples, which)
        for center_crop in (False, True):
            argv = command_line(which, model, pictures[0].parent, Path(work) / f"out-{which}", center_crop)
            args = _their_args(module, argv)
            opts, ours = our_views(which, argv)
            theirs = _their_dataset(module, which, args, tokenizer)
            paths = theirs.image_paths if which == "ti" else theirs.instance_images_path
            for k, path in enumerate(paths):
                i = ours.files.index(Path(path))
                w, h = ours.images[i].size
                draws = [(None, False)]
                if which == "ti":  # their flip: p = 0.5 by the class's default; each outcome compared
                    draws = [(None, False), (None, True)]
                for crop, flip in draws:
                    recorded = []
                    real_get_params = transforms.RandomCrop.get_params

                    def record(img, size, _real=real_get_params, _out=recorded):
                        _out.append(_real(img, size))
                        return _out[-1]

                    transforms.RandomCrop.get_params = staticmethod(record)
                    try:
                        torch.manual_seed(1000 + k)
                        if which == "ti":
                            theirs.flip_transform = transforms.RandomHorizontalFlip(p=1.0 if flip else 0.0)
                            got = theirs[k]["pixel_values"]
                        else:
                            got = theirs[k]["instance_images"]
                    finally:
                        transforms.RandomCrop.get_params = real_get_params
                    if recorded:  # their random crop's (top, left): ours at the same place
                        top, left, th, tw = recorded[0]
                        nw, nh = images.resized_size(w, h, RESOLUTION)
                        crop = (left / (nw - tw) if nw > tw else 0.0, top / (nh - th) if nh > th else 0.0)
                    if ours.cacheable(i):
                        crop = None
                    mine = ours.pixels(i, crop, flip)
                    same = mine.shape == got.shape and mine.dtype == got.dtype and torch.equal(mine, got)
                    diff = float((mine - got).abs().max()) if mine.shape == got.shape else None
                    rows.append({"script": SCRIPTS[which], "center_crop": center_crop, "picture": Path(path).name,
                                 "flip": flip, "their_crop": list(recorded[0][:2]) if recorded else None,
                                 "equal": bool(same), "max_abs_diff": diff, "shape": list(got.shape),
                                 "ours": {"image_fit": opts.data.image_fit, "interpolation":
                                          opts.data.image_interpolation_mode or "bilinear",
                                          "random_flip": opts.data.random_flip}})
    return rows
