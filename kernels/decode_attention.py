"""Decode attention: one new query per sequence over its kept keys in the paged KV cache.

Decode is bound by reading K/V, so a program owns one (sequence, KV head, split): it loads the
query heads of that KV head together (padded to 16 rows for tl.dot) and reads each K/V tile once.
Long contexts are cut into `num_splits` key ranges run in parallel; a merge kernel combines the
partial results through their logsumexp, and a split with no keys (a short sequence next to a
long one) carries lse = -inf and weight 0.

Ragged heads: `kept_q_heads` [Hk] (indices into q's Hq heads, distinct, any order); head h reads
KV head h // G, and the output holds only kept heads, in list order. Dropped tokens: shorter rows
of `meta.key_slots`; padding has position -1. Heavy hitters: if `key_mass` [S, L] float32 is
given, each key's attention probability (summed over kept heads) is added to it; the main kernel
saves the scaled logits of each (head, key), so the mass needs one more read of 4 bytes per head
and key instead of re-reading K.

Its torch twin, the CPU path, is `kernels.attention.paged_attention_ref` (one twin for both kernels).
"""
from __future__ import annotations

import functools

import torch

from trident.kernels.backend import tl, triton
from trident.kernels.metadata import AttentionMetadata
from trident.kernels.paged_kv import load_kv_tile
from trident.kernels.launch import (FLOAT_DTYPES, MIN_DOT, check, check_attention_inputs, check_tensor,
                            dot_precision, key_lens, kept_heads, num_sms, pow2_at_least, step_tensor)

LOG2E = 1.4426950408889634


@triton.jit
def _decode_attention_kernel(
    q_ptr, k_ptr, v_ptr, part_out_ptr, part_lse_ptr, logits_ptr, members_ptr, kept_ptr,
    key_slots_ptr, key_pos_ptr, key_len_ptr,
    stride_qs, stride_qh, stride_ks, stride_kh, stride_vs, stride_vh, stride_slots, stride_kpos,
    num_kept, num_splits, keys_per_split, logits_len, group_size, head_dim, qk_scale,
    BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr, STORE_LOGITS: tl.constexpr,
):
    tl.static_assert(BLOCK_H >= 16 and BLOCK_N >= 16 and BLOCK_D >= 16)
    seq, kv_head, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_h = tl.arange(0, BLOCK_H)
    # members: [Hkv, G] position in the kept list of each query head of this KV head, or -1.
    member = tl.load(members_ptr + kv_head * group_size + offs_h, mask=offs_h < group_size, other=-1)
    mask_h = member >= 0
    q_head = tl.load(kept_ptr + member, mask=mask_h, other=0)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < head_dim
    q = tl.load(q_ptr + seq * stride_qs + q_head[:, None] * stride_qh + offs_d[None, :],
                mask=mask_h[:, None] & mask_d[None, :], other=0.0)         # [BLOCK_H, BLOCK_D]

    key_len = tl.load(key_len_ptr + seq)
    start = split * keys_per_split
    end = tl.minimum(start + keys_per_split, key_len)
    end = tl.where(tl.max(member, 0) >= 0, end, start)   # a KV head with no kept query head reads nothing
    slots_row = key_slots_ptr + seq * stride_slots
    kpos_row = key_pos_ptr + seq * stride_kpos
    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < end
        k_pos, k, v = load_kv_tile(slots_row, kpos_row, offs_n, mask_n, k_ptr, v_ptr, stride_ks, stride_kh,
                                   stride_vs, stride_vh, kv_head, offs_d, mask_d)   # [BLOCK_N], [BLOCK_N, BLOCK_D] x 2
        scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # [BLOCK_H, BLOCK_N]
        scores = tl.where((k_pos >= 0)[None, :], scores, float("-inf"))
        if STORE_LOGITS:   # logits: [S, Hk, L] in log2 units
            tl.store(logits_ptr + (seq.to(tl.int64) * num_kept + member[:, None]) * logits_len + offs_n[None, :],
                     scores, mask=mask_h[:, None] & mask_n[None, :])
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(scores - m_ref[:, None])
        alpha = tl.exp2(m_i - m_ref)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    part = (seq * num_splits + split) * num_kept + member                  # into [S, splits, Hk]
    tl.store(part_out_ptr + part[:, None] * head_dim + offs_d[None, :], acc / l_safe[:, None],
             mask=mask_h[:, None] & mask_d[None, :])
    tl.store(part_lse_ptr + part, tl.where(l_i == 0.0, float("-inf"), m_i + tl.log2(l_safe)), mask=mask_h)


@triton.jit
def _decode_merge_kernel(
    part_out_ptr, part_lse_ptr, out_ptr, lse_ptr, stride_os, stride_oh,
    num_kept, num_splits, head_dim, BLOCK_SPLITS: tl.constexpr, BLOCK_D: tl.constexpr,
):
    seq, head_idx = tl.program_id(0), tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_SPLITS)
    offs_d = tl.arange(0, BLOCK_D)
    mask_s, mask_d = offs_s < num_splits, offs_d < head_dim
    part = (seq * num_splits + offs_s) * num_kept + head_idx
    part_lse = tl.load(part_lse_ptr + part, mask=mask_s, other=float("-inf"))   # [BLOCK_SPLITS]
    lse_max = tl.max(part_lse, 0)
    lse_ref = tl.where(lse_max == float("-inf"), 0.0, lse_max)
    weight = tl.exp2(part_lse - lse_ref)                                     # empty split: 0
    parts = tl.load(part_out_ptr + part[:, None] * head_dim + offs_d[None, :],
                    mask=mask_s[:, None] & mask_d[None, :], other=0.0)       # [BLOCK_SPLITS, BLOCK_D]
    total = tl.sum(weight, 0)
    total_safe = tl.where(total == 0.0, 1.0, total)
    out = tl.sum(weight[:, None] * parts, 0) / total_safe
    tl.store(out_ptr + seq * stride_os + head_idx * stride_oh + offs_d, out.to(out_ptr.dtype.element_ty),
             mask=mask_d)
    tl.store(lse_ptr + seq * num_kept + head_idx, tl.where(total == 0.0, float("-inf"), lse_ref + tl.log2(total_safe)))


@triton.jit
def _decode_key_mass_kernel(
    logits_ptr, lse_ptr, mass_ptr, key_pos_ptr, key_len_ptr, stride_mass, stride_kpos,
    num_kept, logits_len, BLOCK_N: tl.constexpr,
):
    seq, tile = tl.program_id(0), tl.program_id(1)
    offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    key_len = tl.load(key_len_ptr + seq)
    k_pos = tl.load(key_pos_ptr + seq * stride_kpos + offs_n, mask=offs_n < key_len, other=-1)
    mask_n = k_pos >= 0
    mass = tl.zeros([BLOCK_N], tl.float32)
    for head_idx in range(num_kept):
        lse = tl.load(lse_ptr + seq * num_kept + head_idx)
        logits = tl.load(logits_ptr + (seq.to(tl.int64) * num_kept + head_idx) * logits_len + offs_n,
                         mask=mask_n, other=0.0)
        mass += tl.where(mask_n, tl.exp2(logits - lse), 0.0)
    mass_ptrs = mass_ptr + seq * stride_mass + offs_n
    tl.store(mass_ptrs, tl.load(mass_ptrs, mask=offs_n < logits_len, other=0.0) + mass, mask=offs_n < logits_len)


def _config(head_dim: int, dtype: torch.dtype) -> dict:
    """Tile sizes and launch options, fixed (autotuning needs a GPU at import time). float32
    runs its dots without tensor cores, so it gets small tiles to stay within registers."""
    block_d = pow2_at_least(head_dim, MIN_DOT)
    if dtype == torch.float32:
        return dict(BLOCK_N=32 if block_d <= 64 else 16, BLOCK_D=block_d, num_warps=4, num_stages=2)
    return dict(BLOCK_N=64 if block_d <= 128 else 32, BLOCK_D=block_d, num_warps=4, num_stages=3)


def _num_splits(work_items: int, max_keys: int, block_n: int, device: torch.device) -> int:
    """Enough key ranges that (sequences x KV heads x splits) fills the device about twice,
    with at least 4 key tiles per split so the merge stays cheap."""
    wanted = triton.cdiv(2 * num_sms(device), max(work_items, 1))
    return max(1, min(wanted, triton.cdiv(max_keys, 4 * block_n), 64))


def _head_members(kept: torch.Tensor, num_kv_heads: int, group_size: int) -> torch.Tensor:
    """[Hkv, G] int32: for each KV head, the kept-list position of each of its query heads, or -1."""
    members = torch.full((num_kv_heads * group_size,), -1, dtype=torch.int32, device=kept.device)
    members[kept.long()] = torch.arange(kept.numel(), dtype=torch.int32, device=kept.device)
    return members.view(num_kv_heads, group_size)


@functools.lru_cache(maxsize=64)
def _all_heads_members(num_kv_heads: int, group_size: int, device: torch.device) -> torch.Tensor:
    return torch.arange(num_kv_heads * group_size, dtype=torch.int32, device=device).view(num_kv_heads, group_size)


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     meta: AttentionMetadata, scale: float, kept_q_heads: torch.Tensor | None = None,
                     key_mass: torch.Tensor | None = None, num_splits: int | None = None) -> torch.Tensor:
    """Triton path. q: [S, Hq, D] (one token per sequence); caches: [num_slots, Hkv, D];
    returns [S, Hk, D] for the kept heads.

    For kept head i with h = kept_q_heads[i], G = Hq / Hkv, over the keys j of sequence s with
    key_position[s, j] >= 0:
        out[s, i] = sum_j P_i[s, j] V[j, h // G],  P_i[s, j] = softmax_j(scale * q[s, h] . K[j, h // G])
    and, if key_mass [S, L] float32 is given, key_mass[s, j] += sum_i P_i[s, j]. A sequence with
    no keys gets 0. `num_splits` fixes the number of key ranges (default: sized to the device).
    """
    check_tensor("q", q, 3, FLOAT_DTYPES)
    for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        check_tensor(name, cache, 3, (q.dtype,))
    num_seqs, num_q_heads, head_dim = q.shape
    num_kv_heads, width = k_cache.shape[1], meta.key_slots.shape[1]
    check(k_cache.shape == v_cache.shape and k_cache.shape[2] == head_dim
          and num_kv_heads > 0 and num_q_heads % num_kv_heads == 0,
          f"q {tuple(q.shape)} does not fit caches {tuple(k_cache.shape)} / {tuple(v_cache.shape)}")
    check(meta.is_decode and num_seqs == meta.num_seqs, f"decode needs one query per sequence, got q {tuple(q.shape)}")
    check_attention_inputs(meta, q.device, key_mass)
    kept = kept_heads(kept_q_heads, num_q_heads, q.device)
    num_kept, group_size = kept.numel(), num_q_heads // num_kv_heads
    out = q.new_empty(num_seqs, num_kept, head_dim)
    if num_kept == 0 or num_seqs == 0:
        return out

    cfg = _config(head_dim, q.dtype)
    block_n, block_d = cfg.pop("BLOCK_N"), cfg.pop("BLOCK_D")
    if num_splits is None:
        num_splits = _num_splits(num_seqs * num_kv_heads, width, block_n, q.device)
    check(num_splits >= 1, f"num_splits must be >= 1, got {num_splits}")
    keys_per_split = triton.cdiv(triton.cdiv(max(width, 1), num_splits), block_n) * block_n
    lens = step_tensor(meta, "key_lens", (meta.key_positions,), lambda: key_lens(meta.key_positions))
    members = (_all_heads_members(num_kv_heads, group_size, q.device) if kept_q_heads is None
               else _head_members(kept, num_kv_heads, group_size))
    part_out = torch.empty(num_seqs, num_splits, num_kept, head_dim, dtype=torch.float32, device=q.device)
    part_lse = torch.empty(num_seqs, num_splits, num_kept, dtype=torch.float32, device=q.device)
    logits = (torch.empty(num_seqs, num_kept, width, dtype=torch.float32, device=q.device)
              if key_mass is not None else part_lse)   # unused placeholder when no mass is asked
    _decode_attention_kernel[(num_seqs, num_kv_heads, num_splits)](
        q, k_cache, v_cache, part_out, part_lse, logits, members, kept,
        meta.key_slots, meta.key_positions, lens,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1),
        meta.key_slots.stride(0), meta.key_positions.stride(0),
        num_kept, num_splits, keys_per_split, width, group_size, head_dim, scale * LOG2E,
        BLOCK_H=pow2_at_least(group_size, MIN_DOT), BLOCK_N=block_n, BLOCK_D=block_d,
        DOT_PRECISION=dot_precision(q.dtype), STORE_LOGITS=key_mass is not None, **cfg)
    lse = torch.empty(num_seqs, num_kept, dtype=torch.float32, device=q.device)
    _decode_merge_kernel[(num_seqs, num_kept)](
        part_out, part_lse, out, lse, out.stride(0), out.stride(1), num_kept, num_splits, head_dim,
        BLOCK_SPLITS=pow2_at_least(num_splits), BLOCK_D=block_d)
    if key_mass is not None and width > 0:
        _decode_key_mass_kernel[(num_seqs, triton.cdiv(width, block_n))](
            logits, lse, key_mass, meta.key_positions, lens, key_mass.stride(0),
            meta.key_positions.stride(0), num_kept, width, BLOCK_N=block_n)
    return out
