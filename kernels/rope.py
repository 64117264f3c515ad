"""Rotary position embedding (rotate-half / HF convention) fused with the KV-cache write.

Per new token t at original position p = positions[t], each head vector x = [x1, x2] (halves of
D) becomes [x1 cos - x2 sin, x2 cos + x1 sin] with cos, sin = cos_cache[p], sin_cache[p] ([D/2]).
The kernel rotates q (returned) and k, and stores rotated k and plain v into the cache slots
slot_mapping[t] in the same pass, so k never makes a round trip through memory unrotated.
"""
from __future__ import annotations

import torch

from trident.kernels.backend import tl, triton
from trident.kernels.attention import write_kv
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
    q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, pos_ptr, slot_ptr, q_out_ptr, k_cache_ptr, v_cache_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_oqt, stride_oqh,
    stride_kcs, stride_kch, stride_vcs, stride_vch, stride_cos, stride_sin,
    num_q_heads, num_kv_heads, half_dim,
    BLOCK_HQ: tl.constexpr, BLOCK_HKV: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_D: tl.constexpr,
):
    t = tl.program_id(0)
    pos = tl.load(pos_ptr + t)
    slot = tl.load(slot_ptr + t).to(tl.int64)     # slot * stride passes 2**31 in large caches
    offs_half = tl.arange(0, BLOCK_HALF)
    cos = tl.load(cos_ptr + pos * stride_cos + offs_half, mask=offs_half < half_dim, other=0.0).to(tl.float32)
    sin = tl.load(sin_ptr + pos * stride_sin + offs_half, mask=offs_half < half_dim, other=0.0).to(tl.float32)
    _rotate_heads(q_ptr + t * stride_qt, q_out_ptr + t * stride_oqt, stride_qh, stride_oqh,
                  num_q_heads, cos, sin, half_dim, BLOCK_HQ, BLOCK_HALF)
    _rotate_heads(k_ptr + t * stride_kt, k_cache_ptr + slot * stride_kcs, stride_kh, stride_kch,
                  num_kv_heads, cos, sin, half_dim, BLOCK_HKV, BLOCK_HALF)
    offs_h = tl.arange(0, BLOCK_HKV)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_h < num_kv_heads)[:, None] & (offs_d < 2 * half_dim)[None, :]
    v = tl.load(v_ptr + t * stride_vt + offs_h[:, None] * stride_vh + offs_d[None, :], mask=mask, other=0.0)
    tl.store(v_cache_ptr + slot * stride_vcs + offs_h[:, None] * stride_vch + offs_d[None, :],
             v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def rope_cos_sin(inv_freq: torch.Tensor, max_positions: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin caches, each [max_positions, D/2] float32, from inv_freq [D/2] (any scaling
    variant computes its own inv_freq): angle[p, i] = p * inv_freq[i]."""
    angles = torch.outer(torch.arange(max_positions, dtype=torch.float32, device=inv_freq.device), inv_freq.float())
    return angles.cos(), angles.sin()


def rope_write_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                  positions: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  slot_mapping: torch.Tensor) -> torch.Tensor:
    """Triton path. q: [T, Hq, D]; k, v: [T, Hkv, D]; cos, sin: [max_pos, D/2]; positions,
    slot_mapping: [T] int64 (positions < max_pos, distinct slots); caches: [num_slots, Hkv, D].

    Returns rope(q) [T, Hq, D]; writes k_cache[slot_mapping[t]] = rope(k[t]) and
    v_cache[slot_mapping[t]] = v[t], rope(x) = [x1 cos_p - x2 sin_p, x2 cos_p + x1 sin_p].
    """
    check_tensor("q", q, 3, FLOAT_DTYPES)
    for name, t in (("k", k), ("v", v), ("k_cache", k_cache), ("v_cache", v_cache)):
        check_tensor(name, t, 3, FLOAT_DTYPES)
    for name, t in (("cos", cos), ("sin", sin)):
        check_tensor(name, t, 2, (torch.float32,))
    for name, t in (("positions", positions), ("slot_mapping", slot_mapping)):
        check_tensor(name, t, 1, (torch.int64, torch.int32), unit_last_stride=False)
    num_tokens, num_q_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    check(head_dim % 2 == 0 and cos.shape == sin.shape and cos.shape[1] * 2 == head_dim,
          f"cos/sin {tuple(cos.shape)} must be [max_pos, {head_dim // 2}]")
    check(k.shape == v.shape == (num_tokens, num_kv_heads, head_dim)
          and k_cache.shape == v_cache.shape and k_cache.shape[1:] == k.shape[1:],
          f"k {tuple(k.shape)}, v {tuple(v.shape)}, caches {tuple(k_cache.shape)} do not fit q {tuple(q.shape)}")
    check(positions.shape == slot_mapping.shape == (num_tokens,), "positions and slot_mapping must be [T]")
    q_out = torch.empty_like(q, memory_format=torch.contiguous_format)
    if num_tokens == 0:
        return q_out
    half = head_dim // 2
    _rope_write_kv_kernel[(num_tokens,)](
        q, k, v, cos, sin, positions, slot_mapping, q_out, k_cache, v_cache,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        q_out.stride(0), q_out.stride(1), k_cache.stride(0), k_cache.stride(1),
        v_cache.stride(0), v_cache.stride(1), cos.stride(0), sin.stride(0),
        num_q_heads, num_kv_heads, half,
        BLOCK_HQ=pow2_at_least(num_q_heads), BLOCK_HKV=pow2_at_least(num_kv_heads),
        BLOCK_HALF=pow2_at_least(half), BLOCK_D=pow2_at_least(head_dim), num_warps=4)
    return q_out


def rope_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE of x [T, H, D] at positions [T], computed in float32."""
    c, s = cos[positions][:, None, :], sin[positions][:, None, :]          # [T, 1, D/2]
    x1, x2 = x.float().chunk(2, -1)
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], -1).to(x.dtype)


def rope_write_kv_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                      positions: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      slot_mapping: torch.Tensor) -> torch.Tensor:
    """Torch twin of `rope_write_kv`."""
    write_kv(rope_ref(k, cos, sin, positions), v, k_cache, v_cache, slot_mapping.long())
    return rope_ref(q, cos, sin, positions)
