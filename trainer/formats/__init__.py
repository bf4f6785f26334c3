"""Files dbtrain reads and writes, safely and in the formats other tools load.

Owns: the output folder's rules (trainer.formats.outdir: new, empty or ours, the marker, free
space), staged installs into it (diffusers_folder), new files written atomically (io), tensor files
read without running code (safe_load), and the conversions: original single-file checkpoints
(single_file, single_file_sdxl), kohya LoRA files, Textual Inversion embedding files. Nothing here
loads a model. May import: trainer.errors, trainer.options.
"""
