"""One package per op; each holds reference.py (the spec), triton_kernels.py, cuda.py and op.py."""
