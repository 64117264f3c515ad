"""RMSNorm, optionally fused with the residual add that precedes it in every decoder layer.

The definition, one for the model, the kernels and their twins (HF transformers' LlamaRMSNorm):
normalize in float32, x * rsqrt(mean(x^2) + eps), round to x's dtype, then multiply by the weight
in that dtype (computed in float32, rounded once more). In float32 both roundings are exact.

One program normalizes one row in a single read and write: the residual stream is summed,
stored (rounded to its dtype, as the unfused model would hold it) and normalized from that
rounded value, so the fused and unfused models see bit-identical residuals. `rms_norm_op` and
`add_rms_norm_op` are what the model calls: Triton where `use_triton`, the twin otherwise.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from trident.kernels.backend import tl, triton, use_triton
from trident.kernels.launch import FLOAT_DTYPES, check, check_tensor, pow2_at_least


@triton.jit
def _rms_norm_kernel(
    x_ptr, residual_ptr, weight_ptr, out_ptr, residual_out_ptr,
    stride_x, stride_r, stride_o, stride_ro, hidden, eps,
    HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)        # row * stride: int64 offsets
    offs = tl.arange(0, BLOCK)
    mask = offs < hidden
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        residual = tl.load(residual_ptr + row * stride_r + offs, mask=mask, other=0.0).to(tl.float32)
        summed = (x + residual).to(residual_out_ptr.dtype.element_ty)
        tl.store(residual_out_ptr + row * stride_ro + offs, summed, mask=mask)
        x = summed.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, 0) / hidden + eps)
    weight = tl.load(weight_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    normed = (x * rstd).to(out_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + row * stride_o + offs, (normed * weight).to(out_ptr.dtype.element_ty), mask=mask)


def _launch(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float):
    check_tensor("x", x, 2, FLOAT_DTYPES)
    check_tensor("weight", weight, 1, FLOAT_DTYPES)
    check(weight.shape[0] == x.shape[1], f"weight {tuple(weight.shape)} does not fit x {tuple(x.shape)}")
    if residual is not None:
        check_tensor("residual", residual, 2, (x.dtype,))
        check(residual.shape == x.shape, f"residual {tuple(residual.shape)} != x {tuple(x.shape)}")
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    residual_out = torch.empty_like(out) if residual is not None else out
    if x.shape[0] > 0:
        block = pow2_at_least(x.shape[1])
        _rms_norm_kernel[(x.shape[0],)](
            x, residual if residual is not None else x, weight, out, residual_out,
            x.stride(0), (residual if residual is not None else x).stride(0), out.stride(0),
            residual_out.stride(0), x.shape[1], eps,
            HAS_RESIDUAL=residual is not None, BLOCK=block, num_warps=min(16, max(1, block // 256)))
    return out, residual_out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Triton path. x: [T, H], weight: [H]; returns [T, H] in x's dtype, as the module docstring
    defines it."""
    return _launch(x, None, weight, eps)[0]


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton path. x, residual: [T, H]; returns (normed, new_residual), both [T, H]:
    new_residual = x + residual (in their dtype), normed = rms_norm(new_residual, weight, eps)."""
    return _launch(x, residual, weight, eps)


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Torch twin of `rms_norm`. In float32 it is F.rms_norm, the same math as one op."""
    if x.dtype == torch.float32 and weight.dtype == torch.float32:
        return F.rms_norm(x, weight.shape, weight, eps)
    x32 = x.float()
    return (weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)).to(x.dtype)


def add_rms_norm_ref(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                     eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch twin of `add_rms_norm`."""
    new_residual = x + residual
    return rms_norm_ref(new_residual, weight, eps), new_residual


def rms_norm_op(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The model's RMSNorm: the Triton kernel where `use_triton(x)`, the twin otherwise."""
    return rms_norm(x, weight, eps) if use_triton(x) else rms_norm_ref(x, weight, eps)


def add_rms_norm_op(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                    eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's residual add + RMSNorm: (normed, new residual), fused in one kernel where
    `use_triton(x)`, the twin otherwise."""
    return add_rms_norm(x, residual, weight, eps) if use_triton(x) else add_rms_norm_ref(x, residual, weight, eps)
