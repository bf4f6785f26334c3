"""What trains and what is saved: full DreamBooth, LoRA, Textual Inversion, pivotal tuning.

Owns: the Method interface (trainer.methods.base) and its four implementations, the trainable parts
they add (peft adapters, new token rows), the files each writes at the end, and reading those
outputs back for sampling (trainer.methods.outputs, torch-free). May import: trainer.errors,
trainer.options, trainer.formats, trainer.families, trainer.distributed.
"""
from __future__ import annotations


def method_for(opts):
    """The Method of a run's options: Textual Inversion, pivotal tuning (--train_text_embedding), LoRA
    (--lora_rank) or full DreamBooth."""
    from trainer.methods.embeddings import PivotalTuning, TextualInversion
    from trainer.methods.full import FullModel
    from trainer.methods.lora import Lora

    if not opts.trains_unet:
        return TextualInversion()
    if opts.embedding.train_text_embedding:
        return PivotalTuning()
    if opts.uses_lora:
        return Lora()
    return FullModel()
