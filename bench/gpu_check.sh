#!/usr/bin/env bash
# The one GPU verification run: everything a session with the GPU machine checks and measures, in
# order of value, inside one device call (budget: 8 minutes on an H100/H200, the extension build and
# the Triton compile + autotune included). Each stage writes as soon as it finishes and is packed into
# $OUT/results.tar.gz, so a run cut off still returns what it did.
#
#   here, once:   ../shared/device/fetch-wheels          (diffusers / bitsandbytes / torchao into .whl/)
#   device call:  bash bench/gpu_check.sh                 (carry [".whl"], timeout_s 600)
#   afterwards:   tar xzf results.tar.gz; copy results/*.jsonl into bench/results/ as they came;
#                 python -m bench report; python -m bench memory --calibrate bench/results/train.jsonl
#                 (each measured peak beside its CPU estimate); commit.
#
# Stages (each skipped when the time left cannot hold it):
#   0  environment; CUDA extension build (sm_90 only, background) while `python -m dbkernels compile`
#      fills Triton's cache for this GPU in parallel (16 processes), so the JIT only autotunes later
#   1  python -m dbkernels check           every backend of every op against the reference
#   2  pytest -m gpu                       the GPU tests
#   3  python -m bench loss / attention / optim / train / train --arch sdxl   (rows under $OUT/results)
set -uo pipefail
OUT=${OUT:-/tmp/out}
BUDGET=${BUDGET:-470}          # seconds for the whole script (the device call allows 600)
START=$SECONDS
mkdir -p "$OUT/results" "$OUT/logs"
export PYTHONUNBUFFERED=1
left() { echo $(( BUDGET - (SECONDS - START) )); }
pack() { tar czf "$OUT/results.tar.gz" -C "$OUT" results logs 2>/dev/null; }
stage() {  # stage NAME MIN_SECONDS MAX_SECONDS COMMAND...
  local name=$1 need=$2 cap=$3; shift 3
  local l; l=$(left)
  if [ "$l" -lt "$need" ]; then echo "== $name skipped: ${l}s left, needs ${need}s" | tee -a "$OUT/logs/stages.log"; return; fi
  [ "$cap" -gt "$l" ] && cap=$l
  echo "== $name (up to ${cap}s; ${l}s left)" | tee -a "$OUT/logs/stages.log"
  local t0=$SECONDS
  timeout "$cap" "$@" > "$OUT/logs/$name.log" 2>&1
  local rc=$?
  echo "== $name rc=$rc in $((SECONDS - t0))s" | tee -a "$OUT/logs/stages.log"
  tail -5 "$OUT/logs/$name.log"
  pack
}

if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
{
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  git log --oneline -1 2>/dev/null
} > "$OUT/logs/env.log" 2>&1
cat "$OUT/logs/env.log"
arch=$(python3 -c "import torch; p = torch.cuda.get_device_properties(0); print(p.major * 10 + p.minor)")

# 0: build the extension for this GPU only, and fill Triton's cache meanwhile
( TORCH_CUDA_ARCH_LIST="$((arch / 10)).$((arch % 10))" MAX_JOBS=8 \
    timeout 300 python3 -m pip install -q --no-build-isolation --no-deps -e . > "$OUT/logs/build.log" 2>&1;
  echo "build rc=$?" >> "$OUT/logs/build.log" ) &
build_pid=$!
stage compile 60 200 python3 -m dbkernels compile --arch "$arch" --jobs 12 --out "$OUT/results/static"
wait $build_pid
tail -3 "$OUT/logs/build.log"
python3 -m dbkernels > "$OUT/logs/dbkernels.log" 2>&1; cat "$OUT/logs/dbkernels.log" | tail -12
pack

# 1-3, in order of value
stage check 40 150 python3 -m dbkernels check --json "$OUT/results/check.jsonl"
stage gpu_tests 40 150 python3 -m pytest -m gpu -q -x --no-header -p no:cacheprovider tests
stage bench_loss 30 60 python3 -m bench loss --out "$OUT/results"
stage bench_attention 40 100 python3 -m bench attention --out "$OUT/results"
stage bench_optim 30 60 python3 -m bench optim --out "$OUT/results"
stage bench_train 30 80 python3 -m bench train --out "$OUT/results"
stage bench_train_sdxl 60 150 python3 -m bench train --arch sdxl --text-encoder off --out "$OUT/results"
pack
echo "done in $((SECONDS - START))s"; ls -la "$OUT"
