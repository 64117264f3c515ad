"""The model's linear layer: nn.Linear with one CPU dispatch for decode-sized batches.

F.linear computes y = x @ W^T. On CPU in float32, for a few rows (a decode step's tokens), the
same product can run faster as y = (W @ x^T)^T, where the weight's rows are the GEMM's long first
dimension. At the model's shapes with cold weights (bench/results/cpu-linear.json): 2.2-3.0x
faster at 4 rows, 1.3-1.7x at 8 (except down_proj, 0.81x), about even from 16 to 128 rows and at
1 row, slower from 256. bfloat16 (where the weight-major form is slower at almost every shape)
and CUDA keep F.linear. The figures are from a 2-core AMD EPYC VM (torch's MKL) and differ between
runs by up to about 30%; `python -m bench.cpu_linear` measures both forms on any CPU, and the
engine's decode step with the dispatch off and on.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# Row counts up to this take the weight-major form; 0 turns the dispatch off. Past 64 rows the LM
# head, the largest GEMM of a decode step, turns slower (0.96x at 128 rows, 0.81x at 256).
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
    a one-column product as a matrix-vector product, which read the weights at well under half
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
