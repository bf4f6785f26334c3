"""The built-in world where DreamBooth runs on a CPU: the procedural world of shapes, colours and places
(`scenes`), the pretraining of the tiny text-to-image model and of the judge from nothing but that
world (`tiny`, `judge`, the tiny_sd / tiny_sdxl builders tests use), the metrics (`metrics`, `place`),
evaluation (`evaluate`), the demo (`demo`), and the shipped results (`assets/`).

May import: every layer below it (errors, options, formats, families, distributed, methods, core,
memory).
"""
from pathlib import Path

ASSETS = Path(__file__).resolve().parent / "assets"
MODEL_DIR = ASSETS / "tiny-world-sd"  # the built-in text-to-image model (a diffusers folder)
JUDGE_DIR = ASSETS / "tiny-world-judge"  # the built-in judge (trainer.world.judge)
