"""Fused attention (FlashAttention-2 style forward + backward, optional per-key bias)."""
from .op import attention, attention_or_sdpa, is_supported, sdpa_attention

__all__ = ["attention", "attention_or_sdpa", "is_supported", "sdpa_attention"]
