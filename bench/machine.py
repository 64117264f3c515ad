"""What a CPU figure depends on, recorded in every bench report: the CPU, its vector and bf16 matrix
support, the threads torch uses and the torch version. Figures from different machines are not
compared (see the README)."""
from __future__ import annotations

import platform

import torch

from trident.engine.config import cpu_has_bf16_matmul


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else what `platform` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            line = next((l for l in f if l.startswith("model name")), "")
    except OSError:
        line = ""
    return line.partition(":")[2].strip() or platform.processor() or platform.machine()


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            return set(next((l for l in f if l.startswith("flags")), "").partition(":")[2].split())
    except OSError:
        return set()


def machine_info() -> dict:
    flags = cpu_flags()
    return {"cpu": cpu_model(), "avx2": "avx2" in flags, "avx512": "avx512f" in flags,
            "bf16_matmul": cpu_has_bf16_matmul(), "threads": torch.get_num_threads(), "torch": torch.__version__}
