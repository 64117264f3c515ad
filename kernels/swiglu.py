"""SwiGLU activation on the fused gate/up projection: out = silu(gate) * up.

The model computes gate and up with one matmul into a [T, 2F] tensor (gate = columns [0, F),
up = columns [F, 2F)); this kernel reads both halves once and writes [T, F].
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from trident.kernels.backend import tl, triton
from trident.kernels.launch import FLOAT_DTYPES, check, check_tensor


@triton.jit
def _swiglu_kernel(x_ptr, out_ptr, stride_x, stride_o, ffn, BLOCK: tl.constexpr):
    row, col_block = tl.program_id(0).to(tl.int64), tl.program_id(1)   # row * stride: int64 offsets
    offs = col_block * BLOCK + tl.arange(0, BLOCK)
    mask = offs < ffn
    gate = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + ffn + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_o + offs, (gate * tl.sigmoid(gate) * up).to(out_ptr.dtype.element_ty), mask=mask)


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    """Triton path. gate_up: [T, 2F]; returns [T, F] = silu(gate_up[:, :F]) * gate_up[:, F:],
    computed in float32 and rounded once to gate_up's dtype."""
    check_tensor("gate_up", gate_up, 2, FLOAT_DTYPES)
    check(gate_up.shape[1] % 2 == 0, f"gate_up needs an even last dim, got {tuple(gate_up.shape)}")
    num_tokens, ffn = gate_up.shape[0], gate_up.shape[1] // 2
    out = gate_up.new_empty(num_tokens, ffn)
    if num_tokens > 0 and ffn > 0:
        block = 1024
        _swiglu_kernel[(num_tokens, triton.cdiv(ffn, block))](
            gate_up, out, gate_up.stride(0), out.stride(0), ffn, BLOCK=block, num_warps=4)
    return out


def swiglu_ref(gate_up: torch.Tensor) -> torch.Tensor:
    """Torch twin of `swiglu`."""
    gate, up = gate_up.float().chunk(2, -1)
    return (F.silu(gate) * up).to(gate_up.dtype)
