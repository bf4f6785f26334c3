"""`python -m dbkernels`: the environment and which backend can run each op.

    python -m dbkernels                 this report
    python -m dbkernels check [--quick] every usable backend of every op against the reference, on this device
    python -m dbkernels compile [...]   every Triton kernel compiled ahead of time for sm_86 / sm_90 (no GPU needed)
"""
from __future__ import annotations

import os
import platform
import sys


def _version(mod: str) -> str:
    try:
        m = __import__(mod)
        return getattr(m, "__version__", "?")
    except Exception as e:  # noqa: BLE001 - report, never fail
        return f"not importable ({type(e).__name__})"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "compile":
        from .aot import main as compile_main

        return compile_main(argv[1:])
    if argv and argv[0] == "check":
        from .check import main as check_main

        return check_main(argv[1:])
    if argv:
        print(__doc__.strip() if argv[0] in ("-h", "--help") else
              f"python -m dbkernels: unknown command {argv[0]!r}\n\n{__doc__.strip()}",
              file=sys.stdout if argv[0] in ("-h", "--help") else sys.stderr)
        return 0 if argv[0] in ("-h", "--help") else 2
    return report()


def report() -> int:
    import torch

    import dbkernels
    from dbkernels import _backend, _ext

    print(f"dbkernels {dbkernels.__version__}  python {platform.python_version()}  ({sys.executable})")
    print(f"torch {torch.__version__}  cuda build {torch.version.cuda}  triton {_version('triton')}")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            print(f"cuda:{i} {p.name}  sm_{p.major}{p.minor}  {p.total_memory / 2**30:.1f} GiB")
    else:
        print("CUDA device: none")
    interp = _backend.triton_interpreting()
    env = os.environ.get("TRITON_INTERPRET")
    why = f"TRITON_INTERPRET={env}" if env is not None else ("turned on in-process: no CUDA device" if interp
                                                             else "TRITON_INTERPRET unset")
    print(f"Triton mode: {'interpreter' if interp else 'compiled'} ({why})  "
          f"DBKERNELS_BACKEND={os.environ.get('DBKERNELS_BACKEND', '') or '(auto)'}")
    print()
    rows = _backend.report()  # probes the extension (a JIT build on a GPU machine without _C)
    width = max(len(k) for k in rows)
    print(f"{'op [device]':<{width}}  " + "  ".join(f"{b:<10}" for b in _backend.BACKENDS) + "  chosen")
    for op_dev, status in rows.items():
        op, dev = op_dev.split(" [")
        dev = dev.rstrip("]")
        try:
            chosen = _backend.choose(op, dev)
        except Exception as e:  # noqa: BLE001 - a forced backend that cannot run
            chosen = f"error: {e}"
        cells = "  ".join(f"{'yes' if s == 'ok' else 'no':<10}" for s in status.values())
        print(f"{op_dev:<{width}}  {cells}  {chosen}")
    print()
    why = _ext.unavailable_reason()
    print(f"CUDA extension: {'usable' if why is None else 'off: ' + why}")
    for key, value in _ext.info().items():
        print(f"ext.{key}: {value}")
    reasons = {(b, s) for st in rows.values() for b, s in st.items() if s != "ok"}
    if reasons:
        print("\nwhy not:")
        for b, s in sorted(reasons):
            print(f"  {b}: {s}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
