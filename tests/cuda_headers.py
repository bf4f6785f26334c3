"""Where the CUDA toolkit's headers are, for tests that build CUDA sources with g++."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path


def cuda_include_dir() -> Path | None:
    """The include folder holding cuda_runtime.h and cuda_bf16.h, or None."""
    nvcc = shutil.which("nvcc")
    cands = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    if nvcc:
        cands += [str(Path(os.path.realpath(nvcc)).parents[1]), str(Path(nvcc).parents[1])]
    cands.append("/usr/local/cuda")
    dirs = [Path(c) / "include" for c in cands if c]
    if nvcc:  # nvcc may be a wrapper script: ask it where it looks
        try:
            out = subprocess.run([nvcc, "--dryrun", "-E", "-x", "cu", os.devnull], capture_output=True, text=True,
                                 timeout=30).stderr
            dirs += [Path(m.group(1)) for m in re.finditer(r"-I\"?([^\s\"]+)", out)]
        except (OSError, subprocess.SubprocessError):
            pass
    for d in dirs:
        if (d / "cuda_runtime.h").is_file() and (d / "cuda_bf16.h").is_file():
            return d
    return None
