"""Plug dbkernels' fused attention into diffusers models.

    from dbkernels.diffusers import use_fused_attention
    n = use_fused_attention(unet)        # every standard attention layer; returns n

`FusedAttnProcessor` is an attention processor for diffusers' `Attention` (self and
cross) that computes what `AttnProcessor2_0` computes (spatial_norm, group_norm,
norm_cross, norm_q / norm_k, to_q / to_k / to_v, to_out, 4-D inputs,
residual_connection, rescale_output_factor), with dbkernels.attention in place of
scaled_dot_product_attention. q, k and v go to the kernel as the transposed
(B, L, H, D) views of the projections (no copies), and the output comes back in that
memory layout, so the head merge is a free reshape. The softmax scale is
`attn.scale` (= 1/sqrt(D) unless the layer was built with scale_qk=False).

Fallbacks to scaled_dot_product_attention (same result, documented):
  * a call with an `attention_mask` (the kernel has no general mask; UNet training
    passes none);
  * head dims the kernel does not cover (D > 256 or D % 8 != 0). That is said once per
    process, one line on stderr naming the head dims (use_fused_attention says it when
    it installs the processor; a processor installed otherwise, at its first such call).

Key bias (FABRIC): a bias (B, Lk) or (B, H, Lk) added to the scores of each key (log
of the key's weight). Give it per call through the UNet's cross_attention_kwargs
{"key_bias": ...} or as the processor's `key_bias` attribute (the call wins); it may
be a tensor, or a callable `fn(attn, query_len, key_len) -> tensor | None` so one
setting can serve layers of different lengths (return None to skip a layer).
"""
from __future__ import annotations

import sys
from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F

from .ops.attention import op as _attn

KeyBias = Union[torch.Tensor, Callable[..., Optional[torch.Tensor]], None]

_noted_head_dims: set[int] = set()


def _covered(head_dim: int) -> bool:
    return head_dim <= _attn.MAX_HEAD_DIM and head_dim % _attn.HEAD_DIM_MULTIPLE == 0


def _note_uncovered(head_dims: list[int], *, per_layer: bool = False) -> None:
    """One line on stderr for the head dims not noted yet in this process; nothing if none.
    per_layer: head_dims has one entry per attention layer (the line counts them)."""
    new = sorted(set(head_dims) - _noted_head_dims)
    if not new:
        return
    _noted_head_dims.update(new)
    dims = ", ".join(str(d) for d in new)
    n = sum(d in new for d in head_dims)
    where = f" ({n} attention layer{'s' if n != 1 else ''})" if per_layer else ""
    print(f"dbkernels: head dim{'s' if len(new) > 1 else ''} {dims}{where} not covered by the fused attention "
          f"kernel (needs D <= {_attn.MAX_HEAD_DIM}, D % {_attn.HEAD_DIM_MULTIPLE} == 0); those layers use "
          "torch's scaled_dot_product_attention", file=sys.stderr, flush=True)


def _head_dim(attn) -> Optional[int]:
    heads = getattr(attn, "heads", None)
    inner = getattr(attn, "inner_dim", None)
    return inner // heads if heads and inner else None


class FusedAttnProcessor:
    """Attention processor running dbkernels.attention; outputs as AttnProcessor2_0's."""

    def __init__(self, key_bias: KeyBias = None):
        self.key_bias = key_bias

    def _resolve_bias(self, key_bias: KeyBias, attn, query_len: int, key_len: int):
        kb = key_bias if key_bias is not None else self.key_bias
        if callable(kb) and not isinstance(kb, torch.Tensor):
            kb = kb(attn, query_len, key_len)
        return kb

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: Optional[torch.Tensor] = None,
                 attention_mask: Optional[torch.Tensor] = None, temb: Optional[torch.Tensor] = None,
                 key_bias: KeyBias = None, *args, **kwargs) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)

        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)

        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape)

        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])

        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)

        inner_dim = key.shape[-1]
        head_dim = inner_dim // attn.heads
        # (B, L, H, D) views seen as (B, H, L, D): no copies
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        kb = self._resolve_bias(key_bias, attn, query.shape[2], key.shape[2])
        scale = attn.scale
        if attention_mask is not None:
            # No general mask in the kernel: SDPA for this call (the key bias joins the mask).
            mask = attention_mask
            if kb is not None:
                kbm = (kb if kb.dim() == 3 else kb[:, None, :])[:, :, None, :].to(query.dtype)
                mask = mask + kbm if mask.dtype != torch.bool else torch.where(
                    mask, kbm, torch.tensor(float("-inf"), dtype=query.dtype, device=query.device))
            hidden_states = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scale)
        elif _attn.is_supported(query, key, value):
            hidden_states = _attn.attention(query, key, value, scale=scale, key_bias=kb)
        else:
            if head_dim not in _noted_head_dims and not _covered(head_dim):
                _note_uncovered([head_dim])
            hidden_states = _attn.sdpa_attention(query, key, value, scale=scale, key_bias=kb)

        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)

        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        hidden_states = hidden_states / attn.rescale_output_factor
        return hidden_states


def _standard_processor_types():
    from diffusers.models import attention_processor as ap

    return tuple(getattr(ap, n) for n in ("AttnProcessor", "AttnProcessor2_0") if hasattr(ap, n))


def use_fused_attention(model: torch.nn.Module, processor: Optional[FusedAttnProcessor] = None) -> int:
    """Install FusedAttnProcessor on every attention layer of `model` (e.g. a UNet2DConditionModel).

    Replaces the processors of the standard kind (AttnProcessor / AttnProcessor2_0,
    diffusers' defaults) and leaves specialised ones (IP-Adapter, LoRA-fused,
    added-KV, ...) alone. One processor instance is shared by all layers (pass your
    own, e.g. FusedAttnProcessor(key_bias=...), which also replaces FusedAttnProcessors
    installed earlier). Returns how many layers it replaced (0 when called again).
    Head dims the kernel does not cover are named once, in one line on stderr (those
    layers compute with scaled_dot_product_attention).
    """
    from diffusers.models.attention_processor import Attention

    proc = processor if processor is not None else FusedAttnProcessor()
    standard = _standard_processor_types()
    replaced = 0
    uncovered: list[int] = []
    for module in model.modules():
        if not isinstance(module, Attention):
            continue
        current = module.processor
        if current is proc or (processor is None and isinstance(current, FusedAttnProcessor)):
            continue  # already fused (pass a processor to swap it for another one)
        if isinstance(current, standard) or isinstance(current, FusedAttnProcessor):
            module.set_processor(proc)
            replaced += 1
            d = _head_dim(module)
            if d is not None and not _covered(d):
                uncovered.append(d)
    if uncovered:
        _note_uncovered(uncovered, per_layer=True)
    return replaced


__all__ = ["FusedAttnProcessor", "use_fused_attention"]
