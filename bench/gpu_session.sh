#!/usr/bin/env bash
# What a session with the GPU machine runs, in stages that each fit one device call
# (10 minutes a command; the machine keeps the built extension while it stays warm):
#   device run, carry [".whl"]:  bash bench/gpu_session.sh tests
#                                bash bench/gpu_session.sh loss attention   (suites)
#                                bash bench/gpu_session.sh optim
# (first, here: ../shared/device/fetch-wheels puts diffusers/bitsandbytes/torchao in .whl/)
# Each call builds the CUDA extension if needed, then runs its stages, writing logs and
# JSONL rows under $OUT. Copy $OUT/results/*.jsonl into bench/results/ and commit them
# as they came, then `python -m bench report`.
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT/results"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
{
  nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv
  python3 -m pip install -q --no-build-isolation --no-deps -e . 2>&1 | tail -3
  python3 -m dbkernels
} 2>&1 | tee "$OUT/env.log"

for stage in "${@:-tests}"; do
  if [ "$stage" = tests ]; then
    timeout 480 python3 -m pytest -m gpu -q --no-header -p no:cacheprovider tests 2>&1 | tee "$OUT/gpu_tests.log"
  elif python3 -m bench list 2>/dev/null | grep -qw "$stage"; then
    timeout 480 python3 -m bench "$stage" --out "$OUT/results" 2>&1 | tee "$OUT/bench_$stage.log"
  else
    echo "unknown stage $stage (tests, or a suite from python -m bench list)"
  fi
done
ls -la "$OUT" "$OUT/results"
