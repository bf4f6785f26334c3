"""Typed options: one dataclass per concern, each field a flag under diffusers' example-script name.

Owns: TrainOptions and its concerns (model, data, prior, training, optimizer, memory, checkpoints,
logging, LoRA, embeddings, distributed) and each command's own options; the argparse surfaces built
from those fields (trainer.options.spec), the `--config` TOML file, the checks that need no file,
and the notes for diffusers' flags that dbtrain does its own way. No torch here: `--help` and flag
errors come back at once. May import: trainer.errors.
"""
