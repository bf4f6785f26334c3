"""The curated autotune sets of the attention kernels (curated_configs.json).

Autotuning every config that fits the device compiles 20-40 configs per kernel, head
dim, dtype and bias setting: minutes of the first training step on a user's card. For
the head dims of SD 1.x / 2.x / SDXL the autotuner instead chooses among at most 6
configs per (GPU family, kernel, head dim, element size), picked by
`python -m dbkernels compile --full --curate` from the compiled figures of the full
sweep (bench/results/static/): no register spills, within the shared memory of the
target, then ranked (see dbkernels/aot/curate.py). Each entry keeps the shared memory
the compiler allocated, so a device with less shared memory drops what does not fit
(and head dims without an entry fall back to the shared-memory model's prune).
"""
from __future__ import annotations

import functools
import json
from pathlib import Path

PATH = Path(__file__).with_name("curated_configs.json")
MAX_PER_SET = 6


def config_key(cfg) -> str:
    """'BMxBN/D0+D1[hi]/w<warps>/s<stages>' for a triton.Config (or its all_kwargs() dict)."""
    kw = cfg.all_kwargs() if hasattr(cfg, "all_kwargs") else cfg
    hi = "hi" if kw["HAS_HI"] else ""
    return (f"{kw['BLOCK_M']}x{kw['BLOCK_N']}/{kw['BLOCK_D0']}+{kw['BLOCK_D1']}{hi}"
            f"/w{kw['num_warps']}/s{kw['num_stages']}")


@functools.lru_cache(maxsize=1)
def _table() -> dict:
    if not PATH.is_file():
        return {}
    return json.loads(PATH.read_text())["sets"]


def family(arch: int, smem_optin: int) -> str:
    """Which curated family a device uses: "90" (Hopper and newer data-centre parts, >= 200 KB
    of shared memory per block) or "86" (Ampere / Ada / consumer Blackwell)."""
    return "90" if arch >= 90 and smem_optin >= 200 * 1024 else "86"


def lookup(kernel: str, caps, d: int, esize: int) -> dict[str, int] | None:
    """{config key: shared bytes} of the curated set, or None where there is none."""
    fam = _table().get(family(caps.arch, caps.smem_optin), {})
    entry = fam.get(kernel, {}).get(str(d), {}).get(str(esize))
    return dict(entry) if entry else None
