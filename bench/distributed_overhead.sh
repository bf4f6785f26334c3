#!/bin/bash
# Step time of 2 gloo ranks (batch 1 each, 1 thread each) against 1 process (batch 2, 2 threads) at the same
# global batch 2, built-in model, 64 px, full fine-tuning, fp32, adamw8bit; interleaved rounds; and 2 ranks with
# --shard (optimizer state and gradients split, issue 20) against 2 ranks without.
# usage: bash bench/distributed_overhead.sh ROUNDS STEPS   (work folder: $DBK_WORK, default /tmp/dbk-ddp)
set -e
cd "$(dirname "$0")/.."
R=${1:-3}; S=${2:-12}; B=${DBK_WORK:-/tmp/dbk-ddp}
export B
mkdir -p $B/inst
python - <<'PY'
import os
from PIL import Image, ImageDraw
for k in range(4):
    im = Image.new("RGB", (64, 64), (200, 40 * k, 40)); ImageDraw.Draw(im).ellipse((8 + k, 10, 50, 54), fill=(20, 200, 90))
    im.save(f"{os.environ['B']}/inst/img{k}.png")
PY
COMMON="--pretrained_model_name_or_path trainer/world/assets/tiny-world-sd --instance_data_dir $B/inst
 --instance_prompt 'a photo of [V] toy' --resolution 64 --max_train_steps $S --log_every 1 --report_to none
 --checkpointing_steps 100000 --seed 1"
for r in $(seq 1 $R); do
  rm -rf $B/one-$r $B/two-$r $B/one1-$r $B/shard-$r
  eval OMP_NUM_THREADS=2 python -m trainer train $COMMON --train_batch_size 2 --output_dir $B/one-$r > /dev/null 2>&1
  eval OMP_NUM_THREADS=1 python -m trainer train $COMMON --train_batch_size 2 --output_dir $B/one1-$r > /dev/null 2>&1
  eval OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 --master_port 29533 -m trainer train $COMMON \
      --train_batch_size 1 --output_dir $B/two-$r > $B/two-$r.log 2>&1
  eval OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 --master_port 29533 -m trainer train $COMMON \
      --train_batch_size 1 --shard --output_dir $B/shard-$r > $B/shard-$r.log 2>&1
done
python - $R <<'PY'
import json, os, statistics, sys
R = int(sys.argv[1])
def med(path):  # median ms/step of the steps after the first two (warm-up)
    ms = [json.loads(x)["ms_per_step"] for x in open(path + "/logs/train_log.jsonl")][2:]
    return statistics.median(ms)
for r in range(1, R + 1):
    B = os.environ["B"]
    a, b, c, d = med(f"{B}/one-{r}"), med(f"{B}/two-{r}"), med(f"{B}/one1-{r}"), med(f"{B}/shard-{r}")
    print(f"round {r}: 1 process batch 2, 2 threads: {a:.1f} ms/step; 2 gloo ranks batch 1, 1 thread each: "
          f"{b:.1f} ms/step (ratio {b / a:.2f}); 1 process batch 2, 1 thread: {c:.1f} ms/step; "
          f"2 ranks --shard: {d:.1f} ms/step (x{d / b:.2f} of 2 ranks without)")
PY
