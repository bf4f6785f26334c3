"""The divergence guard: a run that has gone bad stops, and never leaves a bad state to resume from.

Before an update is applied, the step's loss and gradients must be finite (trainer.core.step skips the
step otherwise, whatever the method and --max_grad_norm). After the update the guard looks at the
trained tensors (one fused norm over them: a read of the weights, small next to a training step):
- a non-finite tensor after a finite-gradient update (an overflow): trainable state up to
  SNAPSHOT_BYTES (LoRA, embeddings, small models) is put back as it was before the step, which then
  counts as skipped; a larger state cannot be copied every step, so the run stops there instead;
- the run has diverged when, after BASELINE_STEPS finite steps, the loss's moving average exceeds
  LOSS_BOUND x its average over those first steps and also the loss of predicting zero (1 per term for
  unit-variance targets: a single step's loss swings with its timestep, so a ratio alone could trip
  on a run whose first steps drew easy timesteps), when the trained tensors' norm exceeds NORM_BOUND x
  its value at the start, or after SKIP_BOUND skipped steps in a row (fp16's loss scaler skips up to
  about 16 while it finds its scale, so fewer may be normal).
Checkpoints written since the run first looked suspect (SUSPECT_LOSS / SUSPECT_NORM, or a skipped step,
and never healthy again since) are set aside as diverged-checkpoint-N, so `--resume_from_checkpoint
latest` takes the last good one. Normal training is far from every bound: full fine-tuning moves the
UNet's norm by well under 1%, a learned embedding grows a few times its initial norm at most.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import torch

LOSS_BOUND = 10.0
NORM_BOUND = 100.0
SKIP_BOUND = 25
SUSPECT_LOSS = 3.0
SUSPECT_NORM = 10.0
BASELINE_STEPS = 10
EMA_DECAY = 0.9
SNAPSHOT_BYTES = 256 * 2**20
DIVERGED_PREFIX = "diverged-"


def _norm(params) -> float:
    if not params:
        return 0.0
    norms = torch._foreach_norm([p.detach() for p in params])
    return float(torch.linalg.vector_norm(torch.stack([n.float() for n in norms])))


def _fake(params) -> bool:
    return any(isinstance(p, torch._subclasses.FakeTensor) for p in params)


class Guard:
    """Watches one run's steps (see the module docstring); its state travels in the checkpoints."""

    def __init__(self, params: list, state: dict | None = None, zero_loss: float = 1.0):
        self.params, self.zero_loss = params, zero_loss
        self.off = _fake(params)  # the memory estimate's fake tensors have no values
        nbytes = sum(p.numel() * p.element_size() for p in params)
        self.can_restore = nbytes <= SNAPSHOT_BYTES
        self._copy = None
        self._norm_after_update = None  # measured by update_was_finite, used by check (one pass a step)
        self.taken_back = False  # the last update overflowed and small state was put back: the step is skipped
        s = state or {}
        self.initial_norm = s.get("initial_norm") or (0.0 if self.off else _norm(params))
        self.first_losses: list[float] = list(s.get("first_losses", []))
        self.ema = s.get("ema")
        self.skips_in_a_row = int(s.get("skips_in_a_row", 0))
        self.suspect_since = s.get("suspect_since")

    def state_dict(self) -> dict:
        return {"initial_norm": self.initial_norm, "first_losses": self.first_losses, "ema": self.ema,
                "skips_in_a_row": self.skips_in_a_row, "suspect_since": self.suspect_since}

    # ---- around the update (trainer.core.step)

    def before_update(self) -> None:
        """Keep a copy of small trainable state, so an update that overflows can be taken back."""
        if not self.off and self.can_restore:
            self._copy = [p.detach().clone() for p in self.params]

    def update_was_finite(self) -> bool:
        """False if the update made a trained tensor non-finite and it could not be taken back; small state is
        restored (then `taken_back`). The trained tensors' norm measured here serves check() too."""
        self.taken_back = False
        if self.off:
            return True
        norm = _norm(self.params)  # non-finite iff a tensor is (or so large that its square overflows)
        if math.isfinite(norm):
            self._norm_after_update = norm
        elif self._copy is not None:
            with torch.no_grad():
                for p, c in zip(self.params, self._copy):
                    p.copy_(c)
            self.taken_back = True
        self._copy = None
        return math.isfinite(norm) or self.taken_back

    # ---- after the step (trainer.core.loop)

    def check(self, step: int, loss: float, stepped: bool, finite_state: bool = True) -> str | None:
        """None while the run is healthy; else why it has diverged (one clause)."""
        if self.off:
            return None
        if not finite_state:
            return "the update made a trained tensor non-finite"
        norm = self._norm_after_update if self._norm_after_update is not None else _norm(self.params)
        self._norm_after_update = None
        if not math.isfinite(norm):
            return "a trained tensor is non-finite"
        ratio = norm / self.initial_norm if self.initial_norm > 0 else 1.0
        suspect = not stepped
        if stepped and math.isfinite(loss):
            self.skips_in_a_row = 0
            self.ema = loss if self.ema is None else EMA_DECAY * self.ema + (1 - EMA_DECAY) * loss
            if len(self.first_losses) < BASELINE_STEPS:
                self.first_losses.append(loss)
        else:
            self.skips_in_a_row += 1
        base = sum(self.first_losses) / len(self.first_losses) if len(self.first_losses) == BASELINE_STEPS else None
        loss_ratio = self.ema / base if base and self.ema is not None else 1.0
        if self.ema is not None and self.ema <= self.zero_loss / 2:
            loss_ratio = min(loss_ratio, 1.0)  # a small loss, however it compares, is no sign of divergence
        suspect = suspect or loss_ratio > SUSPECT_LOSS or ratio > SUSPECT_NORM
        self.suspect_since = (self.suspect_since or step) if suspect else None
        if ratio > NORM_BOUND:
            return f"the trained tensors' norm is {ratio:.3g}x its value at the start (bound {NORM_BOUND:g}x)"
        if loss_ratio > LOSS_BOUND and self.ema > self.zero_loss:
            return (f"the loss's moving average {self.ema:.4g} is {loss_ratio:.3g}x its average over the first "
                    f"{BASELINE_STEPS} steps (bound {LOSS_BOUND:g}x)")
        if self.skips_in_a_row >= SKIP_BOUND:
            return f"{self.skips_in_a_row} steps in a row had a non-finite loss or gradient"
        return None


def set_aside(output_dir, since: int | None, list_checkpoints) -> list[str]:
    """Rename the checkpoints written at or after step `since` to diverged-checkpoint-N (kept, not resumable)."""
    moved = []
    if since is None:
        return moved
    for step, p in list_checkpoints(output_dir):
        if step >= since:
            target = Path(output_dir) / f"{DIVERGED_PREFIX}{p.name}"
            if not target.exists():
                os.rename(p, target)
                moved.append(target.name)
    return moved
