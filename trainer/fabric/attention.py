"""FABRIC's self-attention on dbkernels.attention: reference tokens as extra keys, weights as a key bias.

FABRIC (von Rütte et al. 2023) adds the self-attention inputs of noised reference images
as extra keys and values to every self-attention layer (attn1) of the UNet and reweights
the softmax: P'_ij = P_ij w_j / sum_j' P_ij' w_j', with w_j = 1 for the image's own
tokens and the reference's weight for its tokens. That equals softmax(S + log w), so the
weights go to dbkernels.attention as a per-key bias (1, Lk): no dense (B, H, Lq, Lk)
bias and, in the kernel, no Lq x Lk matrix.

One `FabricController` serves all attn1 layers of a UNet (`install`), in three modes:
  * "off"     the layer's own processor runs (results identical to the plain pipeline);
  * "record"  the layer stores its input hidden states (the reference pass: one UNet pass
              over all references, batched; chunks of it append) and then runs its own processor;
  * "inject"  the main pass: each group of rows of the batch (with CFG: the unconditional
              half and the conditional half) attends over cat(own tokens, its references'
              tokens), both through this layer's to_k / to_v; references with weight w get
              the bias log w. A group without references or with w = 0 attends to itself only.

Layers whose head dim dbkernels.attention does not cover (D % 8 != 0 or D > 256, e.g. the
built-in tiny model's first level, D = 4) use torch's scaled_dot_product_attention with
the bias as a (1, 1, 1, Lk) mask broadcast over batch, heads and queries; the controller
says so once, in one line, through its `note` callback.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence, Union

import torch

from dbkernels.ops.attention import op as _attn

Weight = Union[float, Sequence[float], torch.Tensor]


@dataclass
class Group:
    """Rows [start, stop) of the main batch, the references they attend to and their weight(s)."""
    start: int
    stop: int
    refs: Optional[torch.Tensor]  # (n, Lr, C) hidden states, or None
    weight: Weight = 0.0          # one weight for all references, or one per reference

    def active(self) -> bool:
        if self.refs is None or self.refs.shape[0] == 0:
            return False
        return bool((_weights(self.weight, self.refs.shape[0]) > 0).any())


def _weights(weight: Weight, n_refs: int) -> torch.Tensor:
    """(n_refs,) float64 weights from one weight or one per reference; finite and >= 0."""
    w = torch.as_tensor(weight, dtype=torch.float64).flatten().cpu()
    if w.numel() == 1:
        w = w.expand(n_refs)
    if w.numel() != n_refs:
        raise ValueError(f"weight: expected 1 or {n_refs} values (one per reference), got {w.numel()}")
    if (w < 0).any() or not torch.isfinite(w).all():
        raise ValueError(f"weight: reference weights must be finite and >= 0, got {w.tolist()}")
    return w


def key_bias_for(own_len: int, ref_len: int, n_refs: int, weight: Weight, device) -> torch.Tensor:
    """(1, own_len + n_refs * ref_len) fp32: 0 for own keys, log(w_r) for the keys of reference r."""
    w = _weights(weight, n_refs)
    logw = torch.log(w).to(torch.float32).repeat_interleave(ref_len)
    return torch.cat([torch.zeros(own_len, dtype=torch.float32), logw])[None].to(device)


def fabric_attention(attn, hidden_states: torch.Tensor, groups: Sequence[Group],
                     note: Optional[Callable[[str], None]] = None, backend: str = "dbkernels") -> torch.Tensor:
    """A diffusers self-attention layer `attn` on (N, L, C) hidden states, each group of rows
    attending over cat(own tokens, its references' tokens) with the references' log-weights
    as key bias. Groups must cover the batch in order. Returns (N, L, C_out).

    backend "dbkernels": dbkernels.attention where it covers the head dim, SDPA (with a note)
    elsewhere; "sdpa": torch's scaled_dot_product_attention with the bias as a broadcast mask
    everywhere (on a CPU, where dbkernels.attention is its chunked reference, SDPA is faster and
    holds less)."""
    if backend not in ("dbkernels", "sdpa"):
        raise ValueError(f"backend must be 'dbkernels' or 'sdpa', got {backend!r}")
    n, length, _ = hidden_states.shape
    query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
    heads = attn.heads
    head_dim = key.shape[-1] // heads

    def split(t: torch.Tensor) -> torch.Tensor:  # (b, l, H*D) -> (b, H, l, D) view, no copy
        return t.view(t.shape[0], -1, heads, head_dim).transpose(1, 2)

    outs, row = [], 0
    for g in groups:
        if g.start != row or g.stop <= g.start:
            raise ValueError(f"groups must cover the batch rows in order; got rows [{g.start}, {g.stop}) "
                             f"after row {row}")
        row = g.stop
        q, k, v = query[g.start:g.stop], key[g.start:g.stop], value[g.start:g.stop]
        bias = None
        if g.active():
            w = _weights(g.weight, g.refs.shape[0])
            keep = w > 0  # a weight of 0 removes the reference (P * 0 in the paper's formula)
            refs, w = g.refs[keep].to(hidden_states.dtype), w[keep]
            nr, lr, _ = refs.shape
            b = g.stop - g.start
            # The references' keys/values: projected once per layer and step, shared by every row.
            rk = attn.to_k(refs).reshape(1, nr * lr, -1).expand(b, -1, -1)
            rv = attn.to_v(refs).reshape(1, nr * lr, -1).expand(b, -1, -1)
            k, v = torch.cat([k, rk], dim=1), torch.cat([v, rv], dim=1)
            bias = key_bias_for(length, lr, nr, w, hidden_states.device)
        qh, kh, vh = split(q), split(k), split(v)
        if attn.norm_q is not None:
            qh = attn.norm_q(qh)
        if attn.norm_k is not None:
            kh = attn.norm_k(kh)
        if backend == "dbkernels" and _attn.is_supported(qh, kh, vh):
            o = _attn.attention(qh, kh, vh, scale=attn.scale, key_bias=bias)
        else:
            if note is not None and backend == "dbkernels":
                note(f"head dim {head_dim} is not covered by dbkernels.attention (needs D % 8 == 0, D <= 256): "
                     f"those layers use torch SDPA with the key bias as a broadcast (B, H, 1, Lk) mask")
            o = _attn.sdpa_attention(qh, kh, vh, scale=attn.scale, key_bias=bias)
        outs.append(o.transpose(1, 2).reshape(g.stop - g.start, length, heads * head_dim))
    if row != n:
        raise ValueError(f"groups cover rows [0, {row}) of a batch of {n}")
    out = torch.cat(outs) if len(outs) > 1 else outs[0]
    out = attn.to_out[1](attn.to_out[0](out.to(query.dtype)))
    if attn.residual_connection:
        out = out + hidden_states
    return out / attn.rescale_output_factor


@dataclass
class FabricController:
    """Shared state of the FABRIC processors of one UNet (see the module docstring)."""
    mode: str = "off"
    backend: str = "dbkernels"                    # or "sdpa" (see fabric_attention)
    cache: dict = field(default_factory=dict)     # layer name -> (n_refs, L, C) hidden states
    groups: list = field(default_factory=list)    # [(start, stop, ref_slice or None, weight)] for "inject"
    note: Optional[Callable[[str], None]] = None
    layers: dict = field(default_factory=dict)    # layer name -> Attention module
    said: set = field(default_factory=set)

    def say(self, msg: str) -> None:
        """Pass each distinct note to `note` once."""
        if msg not in self.said:
            self.said.add(msg)
            if self.note is not None:
                self.note(msg)

    def cache_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.cache.values())

    def clear(self) -> None:
        self.cache.clear()


class FabricAttnProcessor:
    """Processor of one attn1 layer; delegates to the layer's own processor unless injecting."""

    def __init__(self, controller: FabricController, name: str, original):
        self.controller, self.name, self.original = controller, name, original

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        c = self.controller
        plain = (encoder_hidden_states is not None or attention_mask is not None or hidden_states.ndim != 3)
        if c.mode == "record" and not plain:
            prev = c.cache.get(self.name)  # a later chunk of the reference pass appends
            h = hidden_states.detach()
            c.cache[self.name] = h if prev is None else torch.cat([prev, h])
        elif c.mode == "inject" and not plain and self.name in c.cache:
            refs = c.cache[self.name]
            groups = [Group(s, e, None if sl is None else refs[sl], w) for s, e, sl, w in c.groups]
            if any(g.active() for g in groups):
                return fabric_attention(attn, hidden_states, groups, c.say, c.backend)
        return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)


def self_attention_layers(unet) -> dict:
    """{name: Attention} of the UNet's self-attention layers (attn1 of each transformer block)."""
    from diffusers.models.attention_processor import Attention

    return {name: m for name, m in unet.named_modules()
            if isinstance(m, Attention) and name.split(".")[-1] == "attn1" and not m.is_cross_attention}


def install(unet, controller: FabricController) -> Callable[[], None]:
    """Put FABRIC processors on every attn1 of `unet`; returns a function that restores the old ones."""
    layers = self_attention_layers(unet)
    if not layers:
        raise ValueError("the UNet has no self-attention (attn1) layers for FABRIC to use")
    old = {name: m.processor for name, m in layers.items()}
    for name, m in layers.items():
        m.set_processor(FabricAttnProcessor(controller, name, m.processor))
    controller.layers = layers

    def restore() -> None:
        for name, m in layers.items():
            m.set_processor(old[name])
        controller.clear()
        controller.mode = "off"

    return restore


__all__ = ["FabricAttnProcessor", "FabricController", "Group", "fabric_attention", "install", "key_bias_for",
           "self_attention_layers"]
