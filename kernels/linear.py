"""The model's linear layer: nn.Linear with one CPU dispatch for decode-sized batches.

F.linear computes y = x @ W^T. On CPU in float32, for a few rows (a decode step's tokens), the
same product can run faster as y = (W @ x^T)^T, where the weight's rows are the GEMM's long first
dimension, and a single row runs faster still when padded to two (see weight_major_linear). At
the model's shapes with cold weights (bench/results/cpu-linear.json, one run): 1.7-2.5x faster at
1 row, 2.7-4.8x at 2, 2.1-3.7x at 4, 1.3-1.8x at 8 (except down_proj, 0.82x), 1.0-1.2x at 16,
0.8-1.0x at 64 and slower from 256. bfloat16 (where the weight-major form is slower at almost
every shape, bench/results/cpu-linear-bfloat16.json) and CUDA keep F.linear. The figures are from
a 2-core AMD EPYC VM (torch's MKL) and differ between runs by up to about 30%; `python -m
bench.cpu_linear` measures both forms on any CPU, and the engine's decode step with the dispatch
off and on.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# Row counts up to this take the weight-major form; 0 turns the dispatch off. Past 64 rows the LM
# head, the largest GEMM of a decode step, turns slower (0.96x at 128 rows and 0.81x at 256 in
# one run; at 64 rows runs have measured 1.07x and 0.81x).
SMALL_BATCH_ROWS = 64


def uses_weight_major(x: torch.Tensor) -> bool:
    """Whether `linear` computes (W @ x^T)^T for input x."""
    return (x.dim() == 2 and x.shape[0] <= SMALL_BATCH_ROWS and x.dtype == torch.float32
            and x.device.type == "cpu" and not torch.is_autocast_enabled("cpu"))   # autocast: bf16 GEMMs


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias), contiguous [..., out], in the faster GEMM form for x."""
    if not uses_weight_major(x):
        return F.linear(x, weight, bias)
    return weight_major_linear(x, weight, bias)


def weight_major_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                        pad_one_row: bool = True) -> torch.Tensor:
    """F.linear(x, weight, bias) for 2-D x, computed as (W @ x^T)^T, contiguous [rows, out].

    A one-row x is computed as two rows (the second zero) and the extra output dropped: BLAS runs
    a one-column product as a matrix-vector product, which reads the weights at well under half
    the rate of its two-column GEMM at every shape measured (`pad_one_row=False` keeps one row)."""
    rows = x.shape[0]
    if rows == 1 and pad_one_row:
        x = F.pad(x, (0, 0, 0, 1))
    if bias is None:
        out = torch.mm(weight, x.t())                       # [out, rows]
    else:
        out = torch.addmm(bias.unsqueeze(1), weight, x.t())
    return out[:, :rows].t().contiguous()                   # [rows, out]; callers view() it


class Linear(nn.Linear):
    """nn.Linear (same parameters and state-dict names) whose forward is `linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
