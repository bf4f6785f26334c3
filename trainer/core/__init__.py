"""The training core: the one loop that DreamBooth, LoRA, Textual Inversion and pivotal tuning share.

Owns: the loop read top to bottom (trainer.core.loop), one step (step), the batches (batches), the
training images (images), the [V] prompts (prompts), class images (class_images), checkpoints,
the run log and subject record (runlog), validation grids, interrupts, and the path checks before
anything loads (inputs). What trains comes from trainer.methods, what differs between model
families from trainer.families. May import: trainer.errors, options, formats, families,
distributed, methods (and dbkernels).
"""
