"""The one place that decides whether an op runs its Triton kernel or its torch twin, and that
reads what the CPU is (for the CPU paths' choices and the bench reports)."""
from __future__ import annotations

import functools
import os
import platform
import types
from typing import NamedTuple

import torch


class CpuInfo(NamedTuple):
    model: str                # e.g. "AMD EPYC"
    flags: frozenset[str]     # e.g. {"avx2", "avx512f", "avx512_bf16", ...}


@functools.cache
def cpu_info() -> CpuInfo:
    """This CPU's model name and feature flags from /proc/cpuinfo (Linux); elsewhere what
    `platform` knows and no flags."""
    model, flags = "", []
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and not model:
                    model = value.strip()
                elif key.strip() == "flags" and not flags:
                    flags = value.split()
    except OSError:
        pass                  # not Linux: the model from `platform`, no flags
    return CpuInfo(model or platform.processor() or platform.machine(), frozenset(flags))


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


def _import_triton() -> tuple[types.ModuleType, types.ModuleType]:
    """`triton` and `triton.language`, or stand-ins on an install without the `triton` extra.

    The kernel files define their `@triton.jit` kernels at import time. Without triton the
    stand-in `jit` returns the function unchanged, so those files still import and their `_ref`
    twins run; `use_triton` is then False everywhere, so no launcher ever calls such a kernel.
    (Kernel signatures annotate with `tl.constexpr` under `from __future__ import annotations`,
    so the annotations are never evaluated.)"""
    try:
        import triton
        import triton.language as tl
        return triton, tl
    except ImportError:
        def jit(fn=None, **_options):
            return fn if fn is not None else (lambda f: f)

        return types.SimpleNamespace(jit=jit), types.SimpleNamespace()


triton, tl = _import_triton()
