"""File formats other UIs load: single-file SD checkpoints and kohya LoRA files.

Each conversion is a table of renames (plus the few reshapes that really exist) used in
both directions; `io` writes a new .safetensors file atomically and never replaces a
file that is already there.
"""
