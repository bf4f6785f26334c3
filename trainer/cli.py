"""`dbtrain train|sample|eval|demo|fabric|export|estimate ...` (also `python -m trainer ...`).

Flags are parsed and checked, and the folders they name looked at, before torch or a
model is imported: `--help` and every foreseeable mistake come back at once. Bad input
ends with exit code 2 and one line saying what to fix, never a traceback. A run stopped
by Ctrl-C / SIGTERM saves its state and prints the exact command that continues it.
"""
from __future__ import annotations

import math
import os
import shlex
import sys
from pathlib import Path

from trainer.core import interrupts
from trainer.formats import outdir
from trainer.errors import Resumable, UserError

USAGE = """usage: dbtrain demo [options]      DreamBooth on the built-in tiny model and subject, before/after
       dbtrain train [options]     DreamBooth fine-tuning (dbtrain train --help)
       dbtrain textual-inversion [options]   a new word for a concept, the model frozen (embedding files)
       dbtrain sample [options]    images from a trained output folder (dbtrain sample --help)
       dbtrain eval [options]      the paper's metrics (DINO, CLIP-I, CLIP-T, PRES, DIV) of a model
       dbtrain fabric [options]    images steered by liked / disliked images, no training (FABRIC)
       dbtrain export [options]    a model folder as one .safetensors file (A1111/ComfyUI), LoRA formats
       dbtrain estimate [options]  peak GPU memory of a training step, computed on the CPU"""
# Commands whose module owns its flags: parse(argv) checks them before torch loads, run(args) does the work.
MODULE_COMMANDS = {"export": "trainer.commands.export", "estimate": "trainer.memory.estimate"}
COMMANDS = ("train", "textual-inversion", "sample", "eval", "demo", "fabric", *MODULE_COMMANDS)


def sample_parser():
    from trainer.options.sampling import sample_parser as make

    return make()


def check_sample_args(args) -> None:
    from trainer.methods.lora import lora_files_of
    from trainer.families.sd import check_model_folder, model_and_embeddings

    if args.num_images < 1 or args.steps < 1:
        raise UserError("--num_images and --steps must be >= 1")
    if args.resolution is not None and (args.resolution <= 0 or args.resolution % 8):
        raise UserError(f"--resolution must be a positive multiple of 8, got {args.resolution}")
    if not math.isfinite(args.guidance):
        raise UserError(f"--guidance must be a finite number, got {args.guidance}")
    if not math.isfinite(args.lora_scale):
        raise UserError(f"--lora_scale must be a finite number, got {args.lora_scale}")
    outdir.check_images_out(args.out)
    check_model_folder(model_and_embeddings(args.model, args.embedding)[0])
    lora_files_of(args.model, args.lora)


def sample(argv: list[str]) -> Path:
    args = sample_parser().parse_args(argv)
    check_sample_args(args)
    import torch

    from trainer.core.images import make_grid

    from trainer.methods.lora import apply_loras, lora_files_of
    from trainer.families.sd import model_and_embeddings
    from trainer.families.sdxl import load_embedding, load_pipeline

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, files = model_and_embeddings(args.model, args.embedding)
    pipe = load_pipeline(model).to(device)  # StableDiffusionXLPipeline for an SDXL folder
    for f in files:
        print(f"embedding {f}: write {load_embedding(pipe, f)} in the prompt")
    apply_loras(pipe, lora_files_of(args.model, args.lora), args.lora_scale)
    gens = [torch.Generator("cpu").manual_seed(args.seed + k) for k in range(args.num_images)]
    kw = {"height": args.resolution, "width": args.resolution} if args.resolution else {}
    images = pipe([args.prompt] * args.num_images, negative_prompt=(
        [args.negative_prompt] * args.num_images if args.negative_prompt else None),
        num_inference_steps=args.steps, guidance_scale=args.guidance, generator=gens, **kw).images
    out = outdir.claim_images_out(args.out, "sample")
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


def _without_resume(args: list[str]) -> list[str]:
    """The arguments minus any --resume_from_checkpoint (also abbreviated or with =)."""
    out, skip = [], False
    for a in args:
        if skip:
            skip = False
            continue
        name = a.split("=", 1)[0]
        if name.startswith("--resu") and "--resume_from_checkpoint".startswith(name):
            skip = "=" not in a
            continue
        out.append(a)
    return out


def continue_command(cmd: str, rest: list[str]) -> str:
    """The exact command that continues a stopped `cmd` (empty for commands that cannot)."""
    if cmd in ("train", "textual-inversion"):
        args = shlex.join(_without_resume(rest) + ["--resume_from_checkpoint", "latest"])
        world = os.environ.get("WORLD_SIZE", "1")
        if world.isdigit() and int(world) > 1:  # started by torchrun: continue under the same launcher
            per_node = os.environ.get("LOCAL_WORLD_SIZE", world)
            return f"resume with: torchrun --nproc_per_node {per_node} -m trainer {cmd} {args}"
        return f"resume with: dbtrain {cmd} {args}"
    if cmd == "demo":
        return "continue with: " + " ".join(["dbtrain", "demo", shlex.join(rest)]).strip()
    return ""


def _run(cmd: str, rest: list[str]) -> None:
    if cmd in MODULE_COMMANDS:
        import importlib

        mod = importlib.import_module(MODULE_COMMANDS[cmd])
        args = mod.parse(rest)  # flags and paths, before torch
        _quiet_libraries()
        mod.run(args)
    elif cmd == "train":
        from trainer.options import train as config
        from trainer.core import inputs

        cfg = config.parse(rest)
        inputs.check_paths(cfg)
        _quiet_libraries()
        from trainer.core import loop

        loop.train(cfg)
    elif cmd == "textual-inversion":
        from trainer.core import inputs
        from trainer.options import textual_inversion as ti_config

        cfg = ti_config.parse(rest)  # flags, before torch
        inputs.check_paths(cfg)
        _quiet_libraries()
        from trainer.core import loop

        loop.train(cfg)
    elif cmd == "sample":
        check_sample_args(sample_parser().parse_args(rest))
        _quiet_libraries()
        sample(rest)
    elif cmd == "demo":
        from trainer.options.sampling import demo_parser

        demo_parser().parse_args(rest)  # --help and flag errors before torch loads
        _quiet_libraries()
        from trainer.world import demo

        demo.run(rest)
    elif cmd == "fabric":
        from trainer.fabric import sampling as fabric

        fabric.check_args(fabric.build_parser().parse_args(rest))  # before torch and the model load
        _quiet_libraries()
        fabric.main(rest)
    else:
        from trainer.options.sampling import eval_parser

        eval_parser().parse_args(rest)
        _quiet_libraries()
        from trainer.world import evaluate

        evaluate.run(rest)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if cmd not in COMMANDS:
        print(f"dbtrain: unknown command {cmd!r}\n{USAGE}", file=sys.stderr)
        return 2
    interrupts.terminate_raises()
    try:
        _run(cmd, rest)
    except Resumable as e:
        hint = continue_command(cmd, rest)
        print(f"dbtrain: {e.kind}: {e}" + (f"; {hint}" if hint else ""), file=sys.stderr, flush=True)
        return e.exit_code
    except UserError as e:
        print(f"dbtrain: error: {e}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        sig = interrupts.last_signal or 2
        hint = continue_command(cmd, rest)
        print(f"dbtrain: interrupted ({interrupts.signal_name(sig)}), stopped at once" + (f"; {hint}" if hint else ""),
              file=sys.stderr, flush=True)
        return 128 + sig
    return 0


if __name__ == "__main__":
    sys.exit(main())
