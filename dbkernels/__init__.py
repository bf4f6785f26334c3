"""dbkernels: fused GPU kernels for DreamBooth training (usable on their own).

Every op has a pure-PyTorch reference (the spec), a Triton and/or a CUDA
implementation; a dispatcher picks one per call (see dbkernels._backend and
`python -m dbkernels`). Importing this package never needs a GPU.
"""
from ._backend import BACKENDS, BackendUnavailable, enable_interpreter_without_gpu, force_backend

enable_interpreter_without_gpu()

from .ops.attention import attention  # noqa: E402
from .ops.diffusion_loss import add_noise, diffusion_loss, seeded_noise  # noqa: E402
from .ops.ema import ema_update_  # noqa: E402
from . import optim  # noqa: E402

__version__ = "0.1.0"

__all__ = ["BACKENDS", "BackendUnavailable", "add_noise", "attention", "diffusion_loss", "ema_update_",
           "force_backend", "optim", "seeded_noise"]
