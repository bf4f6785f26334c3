"""Model families: everything that differs between SD 1.x/2.x and SDXL, one module per family.

Owns: recognising a model folder's family and checking it (torch-free), loading its parts, encoding
prompts, the UNet's extra inputs (SDXL's pooled embeddings and time ids), VAE dtype quirks, the
pipeline class, and each family's files (LoRA, single-file checkpoint, embeddings), behind the
interface of trainer.families.base.Family. Adding a family is adding one module and one entry in
FAMILIES. May import: trainer.errors, trainer.options, trainer.formats.
"""
from __future__ import annotations

from pathlib import Path

from trainer.families.base import Family
from trainer.families.sd import SD
from trainer.families.sdxl import SDXL

FAMILIES: tuple[Family, ...] = (SDXL, SD)  # the first whose matches() says yes; SD 1.x/2.x is the default


def family_of(folder) -> Family:
    """The family of a diffusers folder (torch-free, from its config files)."""
    return next(f for f in FAMILIES if f.matches(folder))


def family_with_text_encoders(n: int) -> Family:
    """The family whose models have n text encoders (components or configs without a folder to look at)."""
    return next(f for f in FAMILIES if len(f.text_encoder_names) == n)


def check_model_folder(folder, variant: str | None = None, what: str = "model folder") -> Path:
    """The folder, or a one-line UserError listing what is missing (with `variant`: its weight files)."""
    return family_of(folder).check_folder(folder, variant=variant, what=what)


def load_components(folder, **kw):
    """The parts of a model folder of any family (Family.load_components)."""
    return family_of(folder).load_components(folder, **kw)
