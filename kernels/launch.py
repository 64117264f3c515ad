"""Helpers shared by the Triton launchers: argument checks, device facts, per-step derived tensors."""
from __future__ import annotations

import functools
from typing import Callable

import torch

# Element types the kernels accept for activations, weights and caches.
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# tl.dot needs every dimension >= 16 on NVIDIA GPUs; blocks are padded up to this and masked.
MIN_DOT = 16


def check(cond: bool, message: str) -> None:
    if not cond:
        raise ValueError(message)


def check_tensor(name: str, t: torch.Tensor, ndim: int, dtypes: tuple[torch.dtype, ...],
                 unit_last_stride: bool = True) -> None:
    """Rank, dtype and (by default) a contiguous last dimension, so rows load as vectors."""
    check(t.dim() == ndim, f"{name} must have {ndim} dims, got shape {tuple(t.shape)}")
    check(t.dtype in dtypes, f"{name} has dtype {t.dtype}, expected one of {dtypes}")
    if unit_last_stride and t.numel() > 0:
        check(t.stride(-1) == 1, f"{name} needs a contiguous last dim, got strides {t.stride()}")


def dot_precision(dtype: torch.dtype) -> str:
    """float32 inputs get exact products (a GPU would otherwise round them to tf32)."""
    return "ieee" if dtype == torch.float32 else "tf32"


def pow2_at_least(n: int, floor: int = 1) -> int:
    return max(floor, 1 << max(0, n - 1).bit_length())


@functools.lru_cache(maxsize=None)
def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors on a CUDA device; a nominal 4 elsewhere (interpreter runs)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def step_tensor(meta, name: str, sources: tuple, build: Callable[[], torch.Tensor]) -> torch.Tensor:
    """A tensor derived from the metadata fields `sources`, built on first use and reused by every
    layer of the step until one of those fields is reassigned."""
    cached = meta.derived.get(name)
    if cached is None or len(cached[0]) != len(sources) or any(a is not b for a, b in zip(cached[0], sources)):
        cached = meta.derived[name] = (sources, build())
    return cached[1]


def key_lens(key_positions: torch.Tensor) -> torch.Tensor:
    """[S] int32: one past the last real key (position >= 0) of each row of key_positions [S, L]."""
    num_seqs, width = key_positions.shape
    if width == 0:
        return torch.zeros(num_seqs, dtype=torch.int32, device=key_positions.device)
    index = torch.arange(1, width + 1, device=key_positions.device)
    return torch.where(key_positions >= 0, index, 0).amax(1).to(torch.int32)


@functools.lru_cache(maxsize=64)
def _identity_heads(num_heads: int, device: torch.device) -> torch.Tensor:
    return torch.arange(num_heads, dtype=torch.int32, device=device)


def kept_heads(kept_q_heads: torch.Tensor | None, num_q_heads: int, device: torch.device) -> torch.Tensor:
    """[Hk] int32 query-head indices: the given list, or every head when None."""
    if kept_q_heads is None:
        return _identity_heads(num_q_heads, device)
    check(kept_q_heads.dim() == 1 and not kept_q_heads.is_floating_point(),
          f"kept_q_heads must be a 1-D integer tensor, got {kept_q_heads.dtype} {tuple(kept_q_heads.shape)}")
    check(kept_q_heads.device == device, f"kept_q_heads on {kept_q_heads.device}, expected {device}")
    return kept_q_heads.to(torch.int32)


def check_attention_inputs(meta, device: torch.device, key_mass: torch.Tensor | None) -> None:
    """The metadata's key lists (and key_mass, if any) in the layout and on the device the
    attention kernels read."""
    slots, positions = meta.key_slots, meta.key_positions
    check(slots.dtype == torch.int64 and positions.dtype == torch.int64 and slots.dim() == 2
          and slots.shape == positions.shape and slots.stride(-1) == 1 and positions.stride(-1) == 1,
          f"key_slots / key_positions must be int64 [S, L] with a contiguous last dim, got "
          f"{slots.dtype} {tuple(slots.shape)} / {positions.dtype} {tuple(positions.shape)}")
    for name, t in (("key_slots", slots), ("key_positions", positions),
                    ("query_positions", meta.query_positions), ("key_mass", key_mass)):
        check(t is None or t.device == device, f"{name} is on {t.device if t is not None else None}, q on {device}")
    if key_mass is not None:
        check(key_mass.dtype == torch.float32 and key_mass.shape == slots.shape and key_mass.stride(-1) == 1,
              f"key_mass must be float32 {tuple(slots.shape)} with a contiguous last dim, "
              f"got {key_mass.dtype} {tuple(key_mass.shape)}")
