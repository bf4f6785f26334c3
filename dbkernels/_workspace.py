"""Persistent per-(device, stream) ticket counters for single-launch reductions.

A kernel that reduces across programs in one launch counts arrivals on an int32
counter; the last arrival does the final sum and sets the counter back to 0. The
counter therefore has to be zero at rest and must not be shared by launches that
can run concurrently, hence one per stream. Allocating it fresh each call would
cost a memset launch.
"""
from __future__ import annotations

import threading

import torch

_lock = threading.Lock()
_counters: dict[tuple, torch.Tensor] = {}


def ticket_counter(device: torch.device) -> torch.Tensor:
    if device.type == "cuda":
        stream = torch.cuda.current_stream(device).cuda_stream
        key = ("cuda", device.index if device.index is not None else torch.cuda.current_device(), stream)
    else:
        key = (device.type, device.index, 0)
    buf = _counters.get(key)
    if buf is None:
        with _lock:
            buf = _counters.get(key)
            if buf is None:
                buf = torch.zeros(1, dtype=torch.int32, device=device)
                _counters[key] = buf
    return buf
