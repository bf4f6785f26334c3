"""step_in_backward: run each parameter's optimizer update inside backward().

A `register_post_accumulate_grad_hook` on every parameter updates it as soon as its
gradient is complete and sets `.grad = None` right after, so at most the gradients of
the layers still in flight exist at once instead of the full gradient set (the peak
memory of a training step drops by about the size of all gradients).

What it cannot be combined with, by construction:
  * gradient accumulation (several backward() calls per update): every backward() is
    an update. Use a larger batch, or ordinary `opt.step()` steps. Passing
    `gradient_accumulation_steps > 1` raises.
  * global-norm clipping (`clip_grad_norm_` over all parameters): the global norm is
    only known after the whole backward, when the early updates are done and their
    gradients freed. The alternative offered is per-tensor clipping:
    `max_grad_norm_per_tensor=c` scales each gradient by min(1, c / ||g||) before its
    update.
  * `opt.step()` while the handle is active raises (the updates already happened);
    `opt.zero_grad()` is harmless. A closure-based optimizer loop does not apply.
  * a parameter used several times in one graph still gets a single update per
    backward (its hook fires after the final accumulation).
"""
from __future__ import annotations

import torch


class StepInBackwardHandle:
    """Returned by step_in_backward; `.remove()` (or leaving a `with` block) unhooks."""

    def __init__(self, opt, hooks):
        self._opt = opt
        self._hooks = hooks

    @property
    def active(self) -> bool:
        return self._hooks is not None

    def remove(self) -> None:
        if self._hooks is None:
            return
        for h in self._hooks:
            h.remove()
        self._hooks = None
        if getattr(self._opt, "_sib_handle", None) is self:
            self._opt._sib_handle = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()


def step_in_backward(model: torch.nn.Module, opt, *, max_grad_norm_per_tensor: float | None = None,
                     gradient_accumulation_steps: int = 1) -> StepInBackwardHandle:
    """Update every parameter of `opt` that belongs to `model` from inside backward().

    Returns a handle; call `handle.remove()` to return to ordinary `opt.step()` calls.
    See the module docstring for what this mode cannot be combined with.
    """
    from .adamw8bit import AdamW8bit

    if not isinstance(opt, AdamW8bit):
        raise TypeError(f"step_in_backward needs a dbkernels.optim.AdamW8bit optimizer, got {type(opt).__name__}")
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(gradient_accumulation_steps, bool) or not isinstance(gradient_accumulation_steps, int) \
            or gradient_accumulation_steps < 1:
        raise ValueError(f"gradient_accumulation_steps must be an int >= 1, got {gradient_accumulation_steps!r}")
    if gradient_accumulation_steps != 1:
        raise ValueError("step_in_backward cannot be combined with gradient accumulation: every backward() "
                         "updates the parameters and frees their gradients. Use ordinary opt.step() with "
                         "accumulation, or a larger batch.")
    if max_grad_norm_per_tensor is not None and not float(max_grad_norm_per_tensor) > 0:
        raise ValueError(f"max_grad_norm_per_tensor must be None or > 0, got {max_grad_norm_per_tensor}")
    if getattr(opt, "_sib_handle", None) is not None:
        raise RuntimeError("step_in_backward is already active on this optimizer; remove the old handle first")

    group_of = {p: g for g in opt.param_groups for p in g["params"]}
    params = [p for p in model.parameters() if p in group_of and p.requires_grad]
    if not params:
        raise ValueError("none of the model's trainable parameters is in the optimizer")
    pending = [tuple(p.shape) for p in params if p.grad is not None]
    if pending:
        raise RuntimeError(f"{len(pending)} parameter(s) already hold a gradient (e.g. shape {pending[0]}): "
                           "accumulated gradients cannot be combined with step_in_backward. Call "
                           "opt.zero_grad(set_to_none=True) before enabling it.")
    clip = None if max_grad_norm_per_tensor is None else float(max_grad_norm_per_tensor)

    def hook(p):
        if p.grad is None:
            return
        if clip is not None:
            g = p.grad
            norm = torch.linalg.vector_norm(g.float())
            g.mul_(torch.clamp(clip / (norm + 1e-6), max=1.0).to(g.dtype))
        opt._step_param(p, group_of[p])
        p.grad = None

    hooks = [p.register_post_accumulate_grad_hook(hook) for p in params]
    handle = StepInBackwardHandle(opt, hooks)
    opt._sib_handle = handle
    return handle
