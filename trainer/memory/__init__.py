"""`dbtrain estimate`: the peak GPU memory of one training step, computed on the CPU.

Owns: the trainer's own step run on fake tensors (fake_step) with every storage counted by phase and
category (tracker), the allowance for what fake tensors do not see, and the report, the preflight
warning and the log fields dbtrain train shows on a GPU (estimate). May import: trainer.errors,
options, formats, families, distributed, methods, core.
"""
