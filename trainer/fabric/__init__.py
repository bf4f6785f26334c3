"""FABRIC: feedback-driven sampling without training (von Rütte et al. 2023), on dbkernels.attention.

Owns: the sampler (trainer.fabric.sampling: references encoded once, noised each step, injected as
extra keys/values with per-reference weights) and the self-attention that does it
(trainer.fabric.attention). May import: trainer.errors, trainer.options, trainer.formats,
trainer.families, trainer.core (images), trainer.world (the judge, for the simulated user).

    from trainer.fabric import fabric_sample
"""
from __future__ import annotations

from trainer.fabric.sampling import FabricResult, fabric_sample

__all__ = ["FabricResult", "fabric_sample"]
