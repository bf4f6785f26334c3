"""8-bit optimizers: AdamW8bit (blockwise dynamic 8-bit states) and step_in_backward."""
from .adamw8bit import AdamW8bit
from .step_in_backward import StepInBackwardHandle, step_in_backward

__all__ = ["AdamW8bit", "StepInBackwardHandle", "step_in_backward"]
