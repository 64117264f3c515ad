"""The one place that decides whether an op runs its Triton kernel or its torch twin."""
from __future__ import annotations

import functools
import os

import torch


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    if os.environ.get("TRIDENT_DISABLE_TRITON") == "1":
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def use_triton(t: torch.Tensor) -> bool:
    """Triton on CUDA tensors (or anywhere under TRITON_INTERPRET=1, for tests); torch twins otherwise.
    The device test comes first so that the CPU path never imports triton."""
    if not (t.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"):
        return False
    return triton_available()
