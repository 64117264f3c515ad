"""Rotary position embedding (rotate-half / HF convention) fused with the KV-cache write.

The input is the fused qkv projection of a step's T rows, viewed as heads: qkv [T, Hq + 2 Hkv, D],
q heads first, then k, then v (the model's layout, so no split copies). Each q and k head vector
x = [x1, x2] (halves of D) becomes [x1 cos - x2 sin, x2 cos + x1 sin], in float32, with cos, sin
the row's angles ([T, D/2]: the tables of `rope_cos_sin` gathered at each row's original position,
once per step). Rotated k and plain v go to the cache slots slot_mapping[t]; rotated q comes back.
The kernel does it in one pass, so k never makes a round trip through memory unrotated.
"""
from __future__ import annotations

import torch

from trident.kernels.backend import tl, triton, use_triton
from trident.kernels.launch import FLOAT_DTYPES, check, check_tensor, pow2_at_least


@triton.jit
def _rotate_heads(src_ptr, dst_ptr, stride_src_h, stride_dst_h, num_heads, cos, sin, half_dim,
                  BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
    """Rotate num_heads head vectors at src_ptr and store them at dst_ptr (dst's dtype)."""
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_HALF)
    mask = (offs_h < num_heads)[:, None] & (offs_d < half_dim)[None, :]
    src = src_ptr + offs_h[:, None] * stride_src_h + offs_d[None, :]
    dst = dst_ptr + offs_h[:, None] * stride_dst_h + offs_d[None, :]
    x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)                # [BLOCK_H, BLOCK_HALF]
    x2 = tl.load(src + half_dim, mask=mask, other=0.0).to(tl.float32)
    tl.store(dst, (x1 * cos[None, :] - x2 * sin[None, :]).to(dst_ptr.dtype.element_ty), mask=mask)
    tl.store(dst + half_dim, (x2 * cos[None, :] + x1 * sin[None, :]).to(dst_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rope_write_kv_kernel(
    qkv_ptr, cos_ptr, sin_ptr, slot_ptr, q_out_ptr, k_cache_ptr, v_cache_ptr,
    stride_t, stride_h, stride_oqt, stride_oqh, stride_kcs, stride_kch, stride_vcs, stride_vch,
    stride_cos, stride_sin, num_q_heads, num_kv_heads, half_dim,
    BLOCK_HQ: tl.constexpr, BLOCK_HKV: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_D: tl.constexpr,
):
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t).to(tl.int64)     # slot * stride passes 2**31 in large caches
    row = qkv_ptr + t.to(tl.int64) * stride_t
    offs_half = tl.arange(0, BLOCK_HALF)
    cos = tl.load(cos_ptr + t * stride_cos + offs_half, mask=offs_half < half_dim, other=0.0).to(tl.float32)
    sin = tl.load(sin_ptr + t * stride_sin + offs_half, mask=offs_half < half_dim, other=0.0).to(tl.float32)
    _rotate_heads(row, q_out_ptr + t * stride_oqt, stride_h, stride_oqh,
                  num_q_heads, cos, sin, half_dim, BLOCK_HQ, BLOCK_HALF)
    _rotate_heads(row + num_q_heads * stride_h, k_cache_ptr + slot * stride_kcs, stride_h, stride_kch,
                  num_kv_heads, cos, sin, half_dim, BLOCK_HKV, BLOCK_HALF)
    offs_h = tl.arange(0, BLOCK_HKV)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_h < num_kv_heads)[:, None] & (offs_d < 2 * half_dim)[None, :]
    v_row = row + (num_q_heads + num_kv_heads) * stride_h
    v = tl.load(v_row + offs_h[:, None] * stride_h + offs_d[None, :], mask=mask, other=0.0)
    tl.store(v_cache_ptr + slot * stride_vcs + offs_h[:, None] * stride_vch + offs_d[None, :],
             v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def rope_cos_sin(inv_freq: torch.Tensor, max_positions: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables, each [max_positions, D/2] float32, from inv_freq [D/2] (any scaling
    variant computes its own inv_freq): angle[p, i] = p * inv_freq[i]."""
    angles = torch.outer(torch.arange(max_positions, dtype=torch.float32, device=inv_freq.device), inv_freq.float())
    return angles.cos(), angles.sin()


def _check(qkv: torch.Tensor, num_q_heads: int, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
           v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    check_tensor("qkv", qkv, 3, FLOAT_DTYPES)
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        check_tensor(name, t, 3, FLOAT_DTYPES)
    for name, t in (("cos", cos), ("sin", sin)):
        check_tensor(name, t, 2, (torch.float32,))
    check_tensor("slot_mapping", slot_mapping, 1, (torch.int64, torch.int32), unit_last_stride=False)
    num_tokens, num_heads, head_dim = qkv.shape
    num_kv_heads = k_cache.shape[1]
    check(k_cache.shape == v_cache.shape and k_cache.shape[2] == head_dim and head_dim % 2 == 0
          and num_heads == num_q_heads + 2 * num_kv_heads,
          f"qkv {tuple(qkv.shape)} is not {num_q_heads} q heads and 2 x {num_kv_heads} KV heads of "
          f"the caches {tuple(k_cache.shape)}")
    check(cos.shape == sin.shape == (num_tokens, head_dim // 2),
          f"cos/sin {tuple(cos.shape)} must be [{num_tokens}, {head_dim // 2}]")
    check(slot_mapping.shape == (num_tokens,), f"slot_mapping {tuple(slot_mapping.shape)} must be [{num_tokens}]")


def rope_write_kv(qkv: torch.Tensor, num_q_heads: int, cos: torch.Tensor, sin: torch.Tensor,
                  k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> torch.Tensor:
    """Triton path. qkv: [T, Hq + 2 Hkv, D] (unit last stride); cos, sin: [T, D/2] float32;
    caches: [num_slots, Hkv, D]; slot_mapping: [T] int (distinct slots).

    Returns rope(q) [T, Hq, D]; writes k_cache[slot_mapping[t]] = rope(k[t]) and
    v_cache[slot_mapping[t]] = v[t] (see the module docstring)."""
    _check(qkv, num_q_heads, cos, sin, k_cache, v_cache, slot_mapping)
    num_tokens, _, head_dim = qkv.shape
    num_kv_heads = k_cache.shape[1]
    q_out = qkv.new_empty(num_tokens, num_q_heads, head_dim)
    if num_tokens == 0:
        return q_out
    half = head_dim // 2
    _rope_write_kv_kernel[(num_tokens,)](
        qkv, cos, sin, slot_mapping, q_out, k_cache, v_cache,
        qkv.stride(0), qkv.stride(1), q_out.stride(0), q_out.stride(1),
        k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1), cos.stride(0), sin.stride(0),
        num_q_heads, num_kv_heads, half,
        BLOCK_HQ=pow2_at_least(num_q_heads), BLOCK_HKV=pow2_at_least(num_kv_heads),
        BLOCK_HALF=pow2_at_least(half), BLOCK_D=pow2_at_least(head_dim), num_warps=4)
    return q_out


def rope_write_kv_ref(qkv: torch.Tensor, num_q_heads: int, cos: torch.Tensor, sin: torch.Tensor,
                      k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> torch.Tensor:
    """Torch twin of `rope_write_kv`: q and k heads are rotated together, in one pass."""
    num_kv_heads = k_cache.shape[1]
    x1, x2 = qkv[:, :num_q_heads + num_kv_heads].float().chunk(2, dim=-1)
    c, s = cos.unsqueeze(1), sin.unsqueeze(1)                                     # [T, 1, D/2]
    qk = torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).to(qkv.dtype)
    q, k = qk.split([num_q_heads, num_kv_heads], dim=1)
    slot_mapping = slot_mapping.long()
    k_cache.index_copy_(0, slot_mapping, k.to(k_cache.dtype))
    v_cache.index_copy_(0, slot_mapping, qkv[:, num_q_heads + num_kv_heads:].to(v_cache.dtype))
    return q


def rope_write_kv_op(qkv: torch.Tensor, num_q_heads: int, cos: torch.Tensor, sin: torch.Tensor,
                     k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> torch.Tensor:
    """The model's RoPE and KV write: the Triton kernel where `use_triton(qkv)`, the twin otherwise."""
    if use_triton(qkv):
        return rope_write_kv(qkv, num_q_heads, cos, sin, k_cache, v_cache, slot_mapping)
    return rope_write_kv_ref(qkv, num_q_heads, cos, sin, k_cache, v_cache, slot_mapping)
