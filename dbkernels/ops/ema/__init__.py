"""EMA of many tensors in one fused update (the trainer's --use_ema)."""
from .op import ema_update_

__all__ = ["ema_update_"]
