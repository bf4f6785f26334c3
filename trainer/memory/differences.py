"""Where a GPU run differs from `dbtrain estimate`'s fake one: the notes printed with an estimate."""
from __future__ import annotations

# (applies to the run?, what differs on the GPU)
DIFFERENCES = (  # of an EstimateOptions
    (lambda c: c.train.memory.mixed_precision != "no",
     "autocast's op lists differ between CPU (this run) and CUDA: a few ops (norms, softmax) may keep another "
     "dtype on the GPU"),
    (lambda c: c.train.memory.mixed_precision == "fp16",
     "GradScaler: modelled as a scaled loss and an in-place unscale (its inf checks need values)"),
    (lambda c: c.train.optim.optimizer in ("adamw8bit", "bnb8bit"),
     "AdamW8bit: the fake run creates its states but skips the update, which the CUDA kernel does in place "
     "(no temporaries besides a small launch table)"),
    (lambda c: c.train.optim.optimizer == "adamw4bit",
     "AdamW4bit: the fake run creates its states but skips the update, which the CUDA kernel does in place "
     "(no temporaries besides a small launch table)"),
    (lambda c: c.train.optim.optimizer == "adamw",
     "torch AdamW: the fake run uses the fused step for fp32 weights and foreach otherwise, as the trainer and "
     "torch pick on a GPU"),
    (lambda c: c.train.training.kernels,
     "Triton attention: its backward's fp32 row sums (batch x heads x tokens x 4 B, one layer at a time) are "
     "not seen"),
    (lambda c: c.train.ema.use_ema and c.train.ema.ema_device != "cpu",
     "--use_ema: the average is counted in every phase as category ema; its update after the step is one fused "
     "in-place kernel (no temporaries)"),
    (lambda c: not c.stock_recipe and not c.train.data.shuffle_caption,
     "latents and prompt embeddings are cached as the trainer does for square or center-cropped images: the VAE "
     "(and frozen text encoders) are not on the GPU during the steps; random crops would keep the VAE there"),
    (lambda c: c.train.data.shuffle_caption,
     "--shuffle_caption: the frozen text encoders stay on the GPU (each step's shuffled prompts are encoded)"),
)
