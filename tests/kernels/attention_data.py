"""Random paged-attention batches for the kernel tests: caches, metadata, pruned key lists."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from trident.kernels.metadata import AttentionMetadata, keep_keys

DTYPES = {"f32": torch.float32, "f16": torch.float16}


@dataclass
class Batch:
    q: torch.Tensor          # [T, Hq, D]
    k_cache: torch.Tensor    # [num_slots, Hkv, D]
    v_cache: torch.Tensor
    meta: AttentionMetadata
    seq_lens: list[int]


def make_batch(seq_lens: list[int], new_counts: list[int], num_q_heads: int, num_kv_heads: int,
               head_dim: int, block_size: int, dtype: torch.dtype, seed: int, q_view: bool = False) -> Batch:
    """Sequences stored in shuffled blocks of a cache whose unused slots hold random values
    (so a read outside a sequence's keys shows up as a wrong result). With q_view, q is a view
    into a wider fused qkv projection output (row stride > Hq * D), as the model produces it."""
    gen = torch.Generator().manual_seed(seed)
    blocks_per_seq = [max(1, -(-n // block_size)) for n in seq_lens]
    num_blocks = sum(blocks_per_seq) + 3
    order = torch.randperm(num_blocks, generator=gen).tolist()
    tables, used = [], 0
    for count in blocks_per_seq:
        tables.append(order[used:used + count])
        used += count
    meta = AttentionMetadata.build(tables, seq_lens, new_counts, block_size)
    shape = (num_blocks * block_size, num_kv_heads, head_dim)
    k_cache = torch.randn(shape, generator=gen).to(dtype)
    v_cache = torch.randn(shape, generator=gen).to(dtype)
    width = (num_q_heads + 2 * num_kv_heads if q_view else num_q_heads) * head_dim
    qkv = torch.randn(sum(new_counts), width, generator=gen).to(dtype)
    q = qkv[:, :num_q_heads * head_dim].view(-1, num_q_heads, head_dim)
    return Batch(q, k_cache, v_cache, meta, list(seq_lens))


def prune_keys(meta: AttentionMetadata, keep: float, shuffle: bool, empty_seq: int | None,
               seed: int) -> AttentionMetadata:
    """Keep a random `keep` fraction of each sequence's keys (original positions kept), optionally
    in shuffled order; sequence `empty_seq` keeps none."""
    gen = torch.Generator().manual_seed(seed)
    kept = []
    for s in range(meta.num_seqs):
        real = (meta.key_positions[s] >= 0).nonzero().squeeze(1)
        chosen = real[torch.randperm(len(real), generator=gen)[:max(1, round(keep * len(real)))]]
        chosen = chosen if shuffle else chosen.sort().values
        kept.append(chosen[:0] if s == empty_seq else chosen)
    return keep_keys(meta, kept)


def dense_attention(batch: Batch, scale: float) -> torch.Tensor:
    """Every key kept: per sequence, contiguous K/V and SDPA with the chunk's causal offset."""
    meta, out = batch.meta, torch.empty(batch.q.shape, dtype=torch.float32)
    group = batch.q.shape[1] // batch.k_cache.shape[1]
    for s, n in enumerate(batch.seq_lens):
        lo, hi = meta.query_start_loc[s], meta.query_start_loc[s + 1]
        slots = meta.key_slots[s, :n]
        keys = batch.k_cache[slots].float().transpose(0, 1).repeat_interleave(group, 0)  # [Hq, n, D]
        values = batch.v_cache[slots].float().transpose(0, 1).repeat_interleave(group, 0)
        mask = torch.ones(hi - lo, n, dtype=torch.bool).tril(n - (hi - lo))
        out[lo:hi] = F.scaled_dot_product_attention(batch.q[lo:hi].float().transpose(0, 1), keys, values,
                                                    attn_mask=mask, scale=scale).transpose(0, 1)
    return out


def kept_head_list(mode: str, num_q_heads: int, num_kv_heads: int, seed: int) -> torch.Tensor | None:
    """None (all heads), "shuffled" (a random 60% in random order), "drop_group" (every head but
    those of KV head 0, shuffled), "empty" (no head)."""
    gen = torch.Generator().manual_seed(seed)
    if mode == "all":
        return None
    if mode == "empty":
        return torch.empty(0, dtype=torch.long)
    if mode == "drop_group":
        heads = torch.arange(num_q_heads // num_kv_heads, num_q_heads)
        return heads[torch.randperm(len(heads), generator=gen)]
    count = max(1, round(0.6 * num_q_heads))
    return torch.randperm(num_q_heads, generator=gen)[:count]
