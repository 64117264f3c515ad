"""What a CPU figure depends on, recorded in every bench report: the CPU, its vector and bf16 matrix
support, the threads torch uses and the torch version. Figures from different machines are not
compared (see the README)."""
from __future__ import annotations

import torch

from trident.engine.config import cpu_has_bf16_matmul
from trident.kernels.backend import cpu_info


def machine_info() -> dict:
    cpu = cpu_info()
    return {"cpu": cpu.model, "avx2": "avx2" in cpu.flags, "avx512": "avx512f" in cpu.flags,
            "bf16_matmul": cpu_has_bf16_matmul(), "threads": torch.get_num_threads(), "torch": torch.__version__}
