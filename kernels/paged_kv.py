"""Device-side reads of the paged KV cache that the attention kernels share.

A sequence's keys are listed in its row of `key_slots` (cache slot of each kept key) and
`key_positions` (its original position; -1 pads the row). A tile is BLOCK_N consecutive entries
of that list; each entry's K and V vectors of one KV head are gathered from the cache by slot.
"""
from __future__ import annotations

from trident.kernels.backend import tl, triton


@triton.jit
def load_cache_rows(cache_ptr, slots, stride_slot, kv_head, stride_head, offs_d, mask):
    """[BLOCK_N, BLOCK_D] vectors of `kv_head` at cache slots `slots` (0 where masked)."""
    return tl.load(cache_ptr + slots[:, None] * stride_slot + kv_head * stride_head + offs_d[None, :],
                   mask=mask, other=0.0)


@triton.jit
def load_kv_tile(slots_row, kpos_row, offs_n, mask_n, k_ptr, v_ptr, stride_ks, stride_kh, stride_vs, stride_vh,
                 kv_head, offs_d, mask_d):
    """(positions [BLOCK_N], K [BLOCK_N, BLOCK_D], V [BLOCK_N, BLOCK_D]) of the list entries offs_n
    of one sequence's row; entries outside mask_n read position -1 and zero vectors."""
    slots = tl.load(slots_row + offs_n, mask=mask_n, other=0)
    k_pos = tl.load(kpos_row + offs_n, mask=mask_n, other=-1)
    kv_mask = mask_n[:, None] & mask_d[None, :]
    k = load_cache_rows(k_ptr, slots, stride_ks, kv_head, stride_kh, offs_d, kv_mask)
    v = load_cache_rows(v_ptr, slots, stride_vs, kv_head, stride_vh, offs_d, kv_mask)
    return k_pos, k, v
