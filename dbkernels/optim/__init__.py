"""Low-bit optimizers: AdamW8bit (blockwise dynamic 8-bit states), AdamW4bit (4-bit states), step_in_backward."""
from .adamw4bit import AdamW4bit
from .adamw8bit import AdamW8bit
from .step_in_backward import StepInBackwardHandle, step_in_backward

__all__ = ["AdamW4bit", "AdamW8bit", "StepInBackwardHandle", "step_in_backward"]
