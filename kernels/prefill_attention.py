"""Prefill / extend attention over the paged KV cache, with ragged heads and dropped tokens.

A ragged batch packs the new tokens of S sequences; each new token attends causally (by original
position) to its sequence's keys in the cache, which already hold this chunk, so chunked prefill
is the same op. Pruning enters through two inputs:
- `kept_q_heads` [Hk]: query heads to compute (indices into q's Hq heads, any order, distinct);
  head h reads KV head h // G with G = Hq / Hkv. The output holds only those heads, in list order.
- the rows of `meta.key_slots` / `meta.key_positions`: a dropped-token sequence is a shorter row
  of kept slots that carry their original positions; the causal test compares positions.

Optionally the launcher adds to `key_mass` [S, L] the attention mass each key receives from the
last `mass_window` queries of its sequence (summed over kept heads): a second pass recomputes
q.k for just those queries and normalizes with the saved logsumexp, so no [T, L] matrix exists.

Its torch twin, the CPU path, is `kernels.attention.paged_attention_ref` (one twin for both kernels).
"""
from __future__ import annotations

import torch

from trident.kernels.backend import tl, triton
from trident.kernels.metadata import AttentionMetadata
from trident.kernels.paged_kv import load_cache_rows, load_kv_tile
from trident.kernels.launch import (FLOAT_DTYPES, MIN_DOT, check, check_attention_inputs, check_tensor,
                            dot_precision, key_lens, kept_heads, pow2_at_least, step_tensor)

LOG2E = 1.4426950408889634


@triton.jit
def _prefill_tile_bounds_kernel(
    tiles_ptr, seq_start_ptr, q_pos_ptr, key_pos_ptr, key_len_ptr, key_end_ptr, stride_kpos, num_tiles,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """key_end[tile] = one past the last key any query of the tile can see. Keys may come in any
    order, so this scans positions; it runs once per step, and the attention loop of every layer
    and head stops there (in causal prefill, skipping the upper triangle)."""
    tile = tl.program_id(0)
    seq = tl.load(tiles_ptr + tile)
    offs_m = tl.load(tiles_ptr + num_tiles + tile) + tl.arange(0, BLOCK_M)
    q_pos = tl.load(q_pos_ptr + offs_m, mask=offs_m < tl.load(seq_start_ptr + seq + 1), other=-1)
    max_q_pos = tl.max(q_pos, 0)
    key_len = tl.load(key_len_ptr + seq)
    key_end = key_len * 0
    for start in range(0, key_len, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        k_pos = tl.load(key_pos_ptr + seq * stride_kpos + offs_n, mask=offs_n < key_len, other=-1)
        visible = (k_pos >= 0) & (k_pos <= max_q_pos)
        key_end = tl.maximum(key_end, tl.max(tl.where(visible, offs_n + 1, 0), 0))
    tl.store(key_end_ptr + tile, key_end)


@triton.jit
def _prefill_attention_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr, kept_ptr, tiles_ptr, seq_start_ptr, q_pos_ptr,
    key_slots_ptr, key_pos_ptr, key_end_ptr,
    stride_qt, stride_qh, stride_ks, stride_kh, stride_vs, stride_vh, stride_ot, stride_oh,
    stride_slots, stride_kpos, num_tiles, num_kept, group_size, head_dim, qk_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    tl.static_assert(BLOCK_M >= 16 and BLOCK_N >= 16 and BLOCK_D >= 16)
    tile, head_idx = tl.program_id(0), tl.program_id(1)
    seq = tl.load(tiles_ptr + tile)                        # tiles: [2, num_tiles] (seq, first row)
    row_start = tl.load(tiles_ptr + num_tiles + tile)
    row_end = tl.load(seq_start_ptr + seq + 1)
    key_end = tl.load(key_end_ptr + tile)
    q_head = tl.load(kept_ptr + head_idx)
    kv_head = q_head // group_size

    offs_m = row_start.to(tl.int64) + tl.arange(0, BLOCK_M)    # int64: offs_m * stride passes 2**31 at long T
    offs_d = tl.arange(0, BLOCK_D)
    mask_m, mask_d = offs_m < row_end, offs_d < head_dim
    q = tl.load(q_ptr + offs_m[:, None] * stride_qt + q_head * stride_qh + offs_d[None, :],
                mask=mask_m[:, None] & mask_d[None, :], other=0.0)       # [BLOCK_M, BLOCK_D]
    q_pos = tl.load(q_pos_ptr + offs_m, mask=mask_m, other=-1)             # [BLOCK_M]
    slots_row = key_slots_ptr + seq * stride_slots
    kpos_row = key_pos_ptr + seq * stride_kpos
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running row max (log2 units)
    l_i = tl.zeros([BLOCK_M], tl.float32)                 # running sum of exp2(score - m_i)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start in range(0, key_end, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        mask_n = offs_n < key_end
        k_pos, k, v = load_kv_tile(slots_row, kpos_row, offs_n, mask_n, k_ptr, v_ptr, stride_ks, stride_kh,
                                   stride_vs, stride_vh, kv_head, offs_d, mask_d)   # [BLOCK_N], [BLOCK_N, BLOCK_D] x 2
        scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # [BLOCK_M, BLOCK_N]
        visible = (k_pos[None, :] >= 0) & (k_pos[None, :] <= q_pos[:, None])
        scores = tl.where(visible, scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that see nothing yet stay at 0
        p = tl.exp2(scores - m_ref[:, None])
        alpha = tl.exp2(m_i - m_ref)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    l_safe = tl.where(l_i == 0.0, 1.0, l_i)               # a query with no visible key outputs 0
    out = acc / l_safe[:, None]
    tl.store(out_ptr + offs_m[:, None] * stride_ot + head_idx * stride_oh + offs_d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :])
    lse = tl.where(l_i == 0.0, float("-inf"), m_i + tl.log2(l_safe))
    tl.store(lse_ptr + offs_m * num_kept + head_idx, lse, mask=mask_m)    # lse: [T, Hk], log2 units


@triton.jit
def _prefill_key_mass_kernel(
    q_ptr, k_ptr, lse_ptr, mass_ptr, kept_ptr, seq_start_ptr, q_pos_ptr,
    key_slots_ptr, key_pos_ptr, key_len_ptr,
    stride_qt, stride_qh, stride_ks, stride_kh, stride_slots, stride_kpos, stride_mass,
    num_kept, group_size, head_dim, window, qk_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    tl.static_assert(BLOCK_M >= 16 and BLOCK_N >= 16 and BLOCK_D >= 16)
    seq, key_tile, head_idx = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    key_len = tl.load(key_len_ptr + seq)
    if key_tile * BLOCK_N < key_len:
        q_head = tl.load(kept_ptr + head_idx)
        kv_head = q_head // group_size
        offs_n = key_tile * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        mask_n, mask_d = offs_n < key_len, offs_d < head_dim
        slots = tl.load(key_slots_ptr + seq * stride_slots + offs_n, mask=mask_n, other=0)
        k_pos = tl.load(key_pos_ptr + seq * stride_kpos + offs_n, mask=mask_n, other=-1)
        k = load_cache_rows(k_ptr, slots, stride_ks, kv_head, stride_kh, offs_d,
                            mask_n[:, None] & mask_d[None, :])             # [BLOCK_N, BLOCK_D]
        row_end = tl.load(seq_start_ptr + seq + 1)
        row_start = tl.maximum(tl.load(seq_start_ptr + seq), row_end - window)
        mass = tl.zeros([BLOCK_N], tl.float32)
        for row in range(row_start, row_end, BLOCK_M):
            offs_m = row + tl.arange(0, BLOCK_M).to(tl.int64)
            mask_m = offs_m < row_end
            q = tl.load(q_ptr + offs_m[:, None] * stride_qt + q_head * stride_qh + offs_d[None, :],
                        mask=mask_m[:, None] & mask_d[None, :], other=0.0)
            q_pos = tl.load(q_pos_ptr + offs_m, mask=mask_m, other=-1)
            lse = tl.load(lse_ptr + offs_m * num_kept + head_idx, mask=mask_m, other=0.0)
            scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
            visible = (k_pos[None, :] >= 0) & (k_pos[None, :] <= q_pos[:, None])
            mass += tl.sum(tl.where(visible, tl.exp2(scores - lse[:, None]), 0.0), 0)
        tl.atomic_add(mass_ptr + seq * stride_mass + offs_n, mass, mask=mask_n)


def _config(head_dim: int, dtype: torch.dtype) -> dict:
    """Tile sizes and launch options, fixed (autotuning needs a GPU at import time). float32
    runs its dots without tensor cores, so it gets small tiles to stay within registers.
    MASS_BLOCK_M: queries per step of the key-mass pass (the window is usually short)."""
    block_d = pow2_at_least(head_dim, MIN_DOT)
    if dtype == torch.float32:
        return dict(BLOCK_M=32, BLOCK_N=32 if block_d <= 64 else 16, BLOCK_D=block_d, MASS_BLOCK_M=16,
                    num_warps=4 if block_d <= 64 else 8, num_stages=2)
    return dict(BLOCK_M=128 if block_d <= 128 else 64, BLOCK_N=64 if block_d <= 128 else 32, BLOCK_D=block_d,
                MASS_BLOCK_M=32, num_warps=4 if block_d <= 64 else 8, num_stages=3)


def _query_tiles(query_start_loc: list[int], block_m: int, device: torch.device) -> torch.Tensor:
    """[S + 1 + 2 * num_tiles] int32 = seq_start [S + 1], tile_seq, tile_first_row (one copy)."""
    loc = torch.tensor(query_start_loc, dtype=torch.int32)
    tiles_per_seq = (loc[1:] - loc[:-1] + block_m - 1) // block_m
    tile_seq = torch.repeat_interleave(torch.arange(len(tiles_per_seq), dtype=torch.int32), tiles_per_seq)
    first_tile = torch.cumsum(tiles_per_seq, 0) - tiles_per_seq
    index = torch.arange(len(tile_seq), dtype=torch.int32)
    tile_row = loc[:-1][tile_seq] + (index - first_tile[tile_seq]) * block_m
    return torch.cat([loc, tile_seq, tile_row]).to(device)


def prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      meta: AttentionMetadata, scale: float, kept_q_heads: torch.Tensor | None = None,
                      key_mass: torch.Tensor | None = None, mass_window: int = 1) -> torch.Tensor:
    """Triton path. q: [T, Hq, D]; caches: [num_slots, Hkv, D]; returns [T, Hk, D] (kept heads).

    For kept head i with h = kept_q_heads[i] and G = Hq / Hkv, over the keys j of t's sequence with
    0 <= key_position[j] <= query_position[t]:
        out[t, i] = sum_j softmax_j(scale * q[t, h] . K[j, h // G]) V[j, h // G]
    and, if key_mass [S, L] float32 is given, key_mass[s, j] += sum_i sum_t P_i[t, j] over the last
    `mass_window` queries t of sequence s. A query that sees no key gets 0.
    """
    check_tensor("q", q, 3, FLOAT_DTYPES)
    for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        check_tensor(name, cache, 3, (q.dtype,))
    num_tokens, num_q_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[1]
    check(k_cache.shape == v_cache.shape and k_cache.shape[2] == head_dim
          and num_kv_heads > 0 and num_q_heads % num_kv_heads == 0,
          f"q {tuple(q.shape)} does not fit caches {tuple(k_cache.shape)} / {tuple(v_cache.shape)}")
    check(num_tokens == meta.query_start_loc[-1], f"q has {num_tokens} rows, metadata {meta.query_start_loc[-1]}")
    check_attention_inputs(meta, q.device, key_mass)
    check(mass_window >= 1, f"mass_window must be >= 1, got {mass_window}")
    kept = kept_heads(kept_q_heads, num_q_heads, q.device)
    num_kept = kept.numel()
    out = q.new_empty(num_tokens, num_kept, head_dim)
    if num_kept == 0 or num_tokens == 0:
        return out

    cfg = _config(head_dim, q.dtype)
    block_m, block_n, block_d = cfg.pop("BLOCK_M"), cfg.pop("BLOCK_N"), cfg.pop("BLOCK_D")
    mass_block_m = cfg.pop("MASS_BLOCK_M")
    num_seqs = meta.num_seqs
    index = step_tensor(meta, f"prefill_tiles_{block_m}", (meta.query_start_loc,),
                        lambda: _query_tiles(meta.query_start_loc, block_m, q.device))
    seq_start, tiles = index[:num_seqs + 1], index[num_seqs + 1:]
    num_tiles = tiles.numel() // 2
    lens = step_tensor(meta, "key_lens", (meta.key_positions,), lambda: key_lens(meta.key_positions))

    def tile_key_end() -> torch.Tensor:
        key_end = torch.empty(num_tiles, dtype=torch.int32, device=q.device)
        _prefill_tile_bounds_kernel[(num_tiles,)](
            tiles, seq_start, meta.query_positions, meta.key_positions, lens, key_end,
            meta.key_positions.stride(0), num_tiles, BLOCK_M=block_m, BLOCK_N=256)
        return key_end

    key_end = step_tensor(meta, f"prefill_key_end_{block_m}",
                          (meta.query_start_loc, meta.query_positions, meta.key_positions), tile_key_end)
    lse = torch.empty(num_tokens, num_kept, dtype=torch.float32, device=q.device)
    qk_scale = scale * LOG2E
    precision = dot_precision(q.dtype)
    _prefill_attention_kernel[(num_tiles, num_kept)](
        q, k_cache, v_cache, out, lse, kept, tiles, seq_start, meta.query_positions,
        meta.key_slots, meta.key_positions, key_end,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1),
        v_cache.stride(0), v_cache.stride(1), out.stride(0), out.stride(1),
        meta.key_slots.stride(0), meta.key_positions.stride(0), num_tiles, num_kept,
        num_q_heads // num_kv_heads, head_dim, qk_scale,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, DOT_PRECISION=precision, **cfg)
    if key_mass is not None and meta.key_slots.shape[1] > 0:
        grid = (num_seqs, triton.cdiv(meta.key_slots.shape[1], block_n), num_kept)
        _prefill_key_mass_kernel[grid](
            q, k_cache, lse, key_mass, kept, seq_start, meta.query_positions,
            meta.key_slots, meta.key_positions, lens,
            q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1),
            meta.key_slots.stride(0), meta.key_positions.stride(0), key_mass.stride(0),
            num_kept, num_q_heads // num_kv_heads, head_dim, mass_window, qk_scale,
            BLOCK_M=mass_block_m, BLOCK_N=block_n, BLOCK_D=block_d, DOT_PRECISION=precision, **cfg)
    return out
