"""`dbtrain train ...` / `dbtrain sample ...` (also `python -m trainer ...`).

Bad input ends with exit code 2 and one line saying what to fix, never a traceback.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .config import UserError

USAGE = """usage: dbtrain demo [options]      DreamBooth on the built-in tiny model and subject, before/after
       dbtrain train [options]     DreamBooth fine-tuning (dbtrain train --help)
       dbtrain sample [options]    images from a trained output folder (dbtrain sample --help)
       dbtrain eval [options]      the paper's metrics (DINO, CLIP-I, CLIP-T, PRES, DIV) of a model"""


def sample_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dbtrain sample", description="Images from a trained model folder.")
    p.add_argument("--model", required=True, help="a diffusers folder (a dbtrain train output_dir)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--negative_prompt", default=None)
    p.add_argument("--num_images", type=int, default=4)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resolution", type=int, default=None, help="default: the model's")
    p.add_argument("--out", default="samples", help="folder for the PNGs and grid.png")
    p.add_argument("--device", default=None)
    return p


def sample(argv: list[str]) -> Path:
    import torch
    from diffusers import StableDiffusionPipeline

    from .data import make_grid
    from .models import check_model_folder

    args = sample_parser().parse_args(argv)
    if args.num_images < 1 or args.steps < 1:
        raise UserError("--num_images and --steps must be >= 1")
    if args.resolution is not None and args.resolution % 8:
        raise UserError(f"--resolution must be a multiple of 8, got {args.resolution}")
    check_model_folder(args.model)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    pipe = StableDiffusionPipeline.from_pretrained(args.model, safety_checker=None,
                                                   requires_safety_checker=False).to(device)
    gens = [torch.Generator("cpu").manual_seed(args.seed + k) for k in range(args.num_images)]
    kw = {"height": args.resolution, "width": args.resolution} if args.resolution else {}
    images = pipe([args.prompt] * args.num_images, negative_prompt=(
        [args.negative_prompt] * args.num_images if args.negative_prompt else None),
        num_inference_steps=args.steps, guidance_scale=args.guidance, generator=gens, **kw).images
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for k, im in enumerate(images):
        im.save(out / f"{k:03d}.png")
    make_grid(images).save(out / "grid.png")
    print(f"wrote {len(images)} image(s) and grid.png to {out}")
    return out


def _quiet_libraries() -> None:
    """diffusers/transformers info chatter (accelerate hints, dtype notes) off; warnings stay."""
    try:
        from diffusers.utils import logging as dl
        from transformers.utils import logging as tl

        dl.set_verbosity_error()
        tl.set_verbosity_error()
    except ImportError:
        pass


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    _quiet_libraries()
    try:
        if cmd == "train":
            from . import config, loop

            loop.train(config.parse(rest))
        elif cmd == "sample":
            sample(rest)
        elif cmd == "demo":
            from . import demo

            demo.run(rest)
        elif cmd == "eval":
            from . import evaluate

            evaluate.run(rest)
        else:
            print(f"dbtrain: unknown command {cmd!r}\n{USAGE}", file=sys.stderr)
            return 2
    except UserError as e:
        print(f"dbtrain: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dbtrain: interrupted (resume with --resume_from_checkpoint latest)", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
