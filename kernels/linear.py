"""The model's linear layer: nn.Linear whose decode-sized CPU products go through the measured
GEMM dispatch of kernels/cpu_gemm.py; everything else (prefill chunks, bf16, CUDA) is F.linear."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from trident.kernels import cpu_gemm


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias), contiguous [..., out], through the provider chosen for x's row count."""
    if not cpu_gemm.applies(x, weight):
        return F.linear(x, weight, bias)
    return cpu_gemm.DISPATCH.provider_for(x)(x, weight, bias)


class Linear(nn.Linear):
    """nn.Linear (same parameters and state-dict names) whose forward is `linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
