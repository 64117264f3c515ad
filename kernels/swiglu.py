"""SwiGLU activation on the fused gate/up projection: out = silu(gate) * up.

The model computes gate and up with one matmul into a [T, 2F] tensor (gate = columns [0, F),
up = columns [F, 2F)); this kernel reads both halves once and writes [T, F]. The definition, one
for the model, the kernel and its twin (HF transformers' LlamaMLP): silu(gate) computed in float32
and rounded to the dtype, then times up, computed in float32 and rounded again (both exact in
float32). `swiglu_op` is what the model calls: Triton where `use_triton`, the twin otherwise.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from trident.kernels.backend import tl, triton, use_triton
from trident.kernels.launch import FLOAT_DTYPES, check, check_tensor


@triton.jit
def _swiglu_kernel(x_ptr, out_ptr, stride_x, stride_o, ffn, BLOCK: tl.constexpr):
    row, col_block = tl.program_id(0).to(tl.int64), tl.program_id(1)   # row * stride: int64 offsets
    offs = col_block * BLOCK + tl.arange(0, BLOCK)
    mask = offs < ffn
    gate = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + ffn + offs, mask=mask, other=0.0).to(tl.float32)
    dt = out_ptr.dtype.element_ty
    silu = (gate * tl.sigmoid(gate)).to(dt).to(tl.float32)
    tl.store(out_ptr + row * stride_o + offs, (silu * up).to(dt), mask=mask)


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    """Triton path. gate_up: [T, 2F]; returns [T, F] = silu(gate_up[:, :F]) * gate_up[:, F:], as the
    module docstring defines it."""
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
    """Torch twin of `swiglu` (torch's reduced-precision silu and mul compute in float32 and round)."""
    gate, up = gate_up.chunk(2, -1)
    return F.silu(gate) * up


def swiglu_op(gate_up: torch.Tensor) -> torch.Tensor:
    """The model's SwiGLU: the Triton kernel where `use_triton(gate_up)`, the twin otherwise."""
    return swiglu(gate_up) if use_triton(gate_up) else swiglu_ref(gate_up)
