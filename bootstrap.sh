#!/usr/bin/env bash
# One command from a fresh clone to a running demo or test suite:
#
#   bash bootstrap.sh demo [dbtrain demo options]   install what is missing, then run `dbtrain demo`
#   bash bootstrap.sh test [pytest options]         install what is missing, then run the tests (what CI runs)
#
# It installs into the Python you run it with (PYTHON, default python3; use a venv if you like) and
# never replaces what is already there: a torch you installed (your CUDA build) is kept, and so is
# triton. Without torch: on a machine with an NVIDIA GPU it installs $DBK_TORCH (default
# torch==2.13.0, PyPI's CUDA build); on a machine without one it installs the CPU build, never
# the several GB of CUDA wheels (it asks pip first and switches to PyTorch's CPU index if PyPI's
# build would pull them). The CUDA extension is built when torch is a CUDA build and nvcc exists
# (DBK_SKIP_CUDA_BUILD=1 skips it). To install with pip instead (a package, CPU or GPU): docs/install.md.
set -euo pipefail
cd "$(dirname "$0")"
what=${1:-}
case "$what" in
  demo|test) shift ;;
  *) echo "usage: bash bootstrap.sh demo|test [options passed on]" >&2; exit 2 ;;
esac
PY=${PYTHON:-python3}
pip() { "$PY" -m pip "$@" --disable-pip-version-check -q; }
say() { echo "bootstrap: $*"; }

if "$PY" -c "import torch" 2>/dev/null; then
  say "keeping torch $("$PY" -c 'import torch; c = torch.version.cuda; print(torch.__version__, f"(CUDA {c})" if c else "(CPU build)")')"
else
  spec=${DBK_TORCH:-torch==2.13.0}
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    say "installing $spec (GPU machine: the CUDA build)"
    pip install "$spec"
  else
    report=$(mktemp)
    pip install --dry-run --ignore-installed --report "$report" "$spec" >/dev/null
    if grep -q '"name": "nvidia-' "$report"; then
      say "installing $spec, CPU build from PyTorch's CPU index (no GPU here; PyPI's build would pull CUDA wheels)"
      pip install "$spec" --index-url https://download.pytorch.org/whl/cpu
    else
      say "installing $spec (no GPU here; this resolves to a CPU build)"
      pip install "$spec"
    fi
    rm -f "$report"
  fi
fi

if "$PY" -c "import triton" 2>/dev/null; then
  say "keeping triton $("$PY" -c 'import triton; print(triton.__version__)')"
else
  pip install "triton==3.6.0"
fi
# everything else the trainer and the tests need (no torch / triton in there: see above)
pip install -r requirements-test.txt
# the browser tests of `dbtrain ui` (Gradio, Playwright; the Chromium they drive is the system's)
if [ "$what" = test ]; then pip install -r requirements-ui-test.txt; fi
pip install --no-build-isolation --no-deps -e .
"$PY" -m dbkernels 2>&1 | sed -n 1,3p

if [ "$what" = demo ]; then
  exec "$PY" -m trainer demo "$@"
else
  exec "$PY" -m pytest -q tests "$@"
fi
