"""Time trainer.distributed.data_parallel.reduce_step (the per-step gradient all-reduce) on the built-in model's UNet
gradients, 2 gloo ranks on this CPU, 1 thread each. Run from the repository root:
    OMP_NUM_THREADS=1 PYTHONPATH=. torchrun --nproc_per_node 2 bench/allreduce_time.py"""
import statistics
import sys
import time
from types import SimpleNamespace

import torch
from diffusers import UNet2DConditionModel
from trainer.distributed import data_parallel as distributed

torch.set_num_threads(1)
distributed.init(SimpleNamespace(device="cpu", ddp_timeout=60, train_batch_size=1))
unet = UNet2DConditionModel.from_pretrained("trainer/world/assets/tiny-world-sd/unet")
params = list(unet.parameters())
for p in params:
    p.grad = torch.randn_like(p)
ts = []
for _ in range(15):
    distributed.barrier()
    t0 = time.perf_counter()
    distributed.reduce_step(params, 1.0, True)
    ts.append((time.perf_counter() - t0) * 1000)
n = sum(p.numel() for p in params)
if distributed.is_main():
    sys.stderr.write(f"{n / 1e6:.2f} M parameters ({n * 4 / 2**20:.1f} MB fp32 gradients): all-reduce median "
                     f"{statistics.median(ts[3:]):.1f} ms (min {min(ts[3:]):.1f}, max {max(ts[3:]):.1f})\n")
distributed.shutdown()
