"""Attention over a paged KV cache for a ragged batch of sequences.

A step packs the new tokens of S sequences into one [T, ...] batch. Each sequence's new tokens
attend causally to every key of that sequence already in the cache plus their own chunk, so the
same op serves prefill, chunked prefill and decode. K/V live in one tensor per layer,
[num_slots, num_kv_heads, head_dim] with num_slots = num_blocks * block_size; a sequence finds its
keys through a block table.

Causality compares original positions (`key_positions` <= query position), never indices, so a
length-pruning policy can later keep an arbitrary subset of slots without renumbering.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from trident.kernels.backend import use_triton
from trident.kernels.metadata import AttentionMetadata
from trident.kernels.launch import step_tensor


def paged_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
                        scale: float, kept_q_heads: torch.Tensor | None = None, key_mass: torch.Tensor | None = None,
                        mass_window: int = 1) -> torch.Tensor:
    """The torch twin of both attention kernels (kernels/prefill_attention.py,
    kernels/decode_attention.py), and the path every CPU step runs. Same arguments and math as
    `paged_attention`; computed in q's dtype by torch's fused SDPA, so no [n, L] probability
    matrix is materialized except the mass's last `mass_window` queries.

    out[t, h] = sum_j softmax_j(scale * q[t, h] . K[j, kv(h)]) V[j, kv(h)] over the keys j of t's
    sequence with key_position[j] <= query_position[t], kv(h) = h // (Hq / Hkv); a query with no
    such key gets 0 (as the kernels; torch's SDPA returns 0 for a fully masked row). The output
    never depends on whether mass is asked for: a sequence that prunes nothing gets the same bits
    next to one that does.
    """
    if key_mass is not None:
        _accumulate_key_mass(q, k_cache, meta, scale, kept_q_heads, key_mass, mass_window)
    if kept_q_heads is None:
        return _attend(q, k_cache, v_cache, meta, scale)
    if meta.is_decode or kept_q_heads.numel() == 0:
        # One query per sequence: attending with every slot of q is cheap next to the K/V
        # gather, which per-head K/V would make `group` times larger (see decode_computes_all_heads).
        return _attend(q, k_cache, v_cache, meta, scale).index_select(1, kept_q_heads)
    group = q.shape[1] // k_cache.shape[1]
    return _attend(q.index_select(1, kept_q_heads), k_cache, v_cache, meta, scale, kept_q_heads // group)


def _attend(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata, scale: float,
            kv_heads: torch.Tensor | None = None) -> torch.Tensor:
    """The attention output of `paged_attention_ref` for every head of q [T, H, D]: head h reads
    KV head h // (H / Hkv), or kv_heads[h] when given (the kept heads of a prefill step, each
    reading its own KV head, so the work scales with the heads in q)."""
    gqa = kv_heads is None and q.shape[1] != k_cache.shape[1]

    def gather(cache: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:     # [..., L, H, D]
        # index_select on flat slots: 4-7x faster on CPU than advanced indexing with the same result.
        rows = cache.index_select(0, slots.reshape(-1)).view(*slots.shape, *cache.shape[1:])
        return rows if kv_heads is None else rows.index_select(-2, kv_heads)

    if meta.is_decode:
        # One query per sequence: gather the padded keys of all sequences and run one batched call.
        keys = gather(k_cache, meta.key_slots).transpose(1, 2)   # [S, Hkv, L, D]
        values = gather(v_cache, meta.key_slots).transpose(1, 2)
        # [S, 1, 1, L] additive mask, built once per step: SDPA would convert a bool mask per layer.
        mask = step_tensor(meta, f"decode_mask_{q.dtype}", (meta.key_positions,), lambda: torch.zeros(
            meta.key_positions.shape, dtype=q.dtype, device=q.device).masked_fill_(
            meta.key_positions < 0, float("-inf"))[:, None, None, :])
        # A query group shares its KV head: fold the group into the query axis ([S, Hkv, G, D]),
        # the same math as enable_gqa, which on CPU falls back to an unfused path (10x slower in bf16).
        num_seqs, num_kv_heads = q.shape[0], keys.shape[1]
        queries = q.view(num_seqs, num_kv_heads, q.shape[1] // num_kv_heads, q.shape[2])
        out = F.scaled_dot_product_attention(queries, keys, values, attn_mask=mask, scale=scale)
        return out.reshape(q.shape)                             # [S, Hq, D]
    out = torch.empty_like(q)
    for s in range(meta.num_seqs):
        lo, hi = meta.query_start_loc[s], meta.query_start_loc[s + 1]
        num_keys = int((meta.key_positions[s] >= 0).sum())
        slots = meta.key_slots[s, :num_keys]
        # 4-D inputs: torch's CPU flash path takes them; 3-D ones fall back to a slower kernel.
        keys = gather(k_cache, slots).transpose(0, 1).unsqueeze(0)      # [1, Hkv, L, D]
        values = gather(v_cache, slots).transpose(0, 1).unsqueeze(0)
        queries = q[lo:hi].transpose(0, 1).unsqueeze(0)          # [1, Hq, n, D]
        key_pos, query_pos = meta.key_positions[s, :num_keys], meta.query_positions[lo:hi]
        if torch.equal(key_pos, query_pos):      # a whole prompt from position 0: plain causal
            attn = F.scaled_dot_product_attention(queries, keys, values, is_causal=True, scale=scale,
                                                  enable_gqa=gqa)
        else:
            mask = key_pos[None, :] <= query_pos[:, None]        # [n, L]
            attn = F.scaled_dot_product_attention(queries, keys, values, attn_mask=mask, scale=scale,
                                                  enable_gqa=gqa)
        out[lo:hi] = attn[0].transpose(0, 1)
    return out


def _accumulate_key_mass(q: torch.Tensor, k_cache: torch.Tensor, meta: AttentionMetadata, scale: float,
                         kept_q_heads: torch.Tensor | None, key_mass: torch.Tensor, mass_window: int) -> None:
    """key_mass[s, j] += sum over heads h and over the last `mass_window` queries i of sequence s
    of softmax_j(scale * q[i, h] . K[j, kv(h)]) over the keys i may see (position <= its own).
    Heads are `kept_q_heads` when given (each reads KV head h // G), else all of q's. The
    probabilities of only those queries are materialized: [window, heads, L] per sequence."""
    num_q_heads, num_kv_heads, head_dim = q.shape[1], k_cache.shape[1], q.shape[2]
    group = num_q_heads // num_kv_heads
    heads = torch.arange(num_q_heads, device=q.device) if kept_q_heads is None else kept_q_heads.long()
    if meta.is_decode:
        # One query per sequence: one batched product per KV head, its query group folded into
        # the query axis, so no key is copied once per query head.
        num_seqs = meta.key_slots.shape[0]
        keys = k_cache.index_select(0, meta.key_slots.reshape(-1)).view(*meta.key_slots.shape, num_kv_heads, head_dim)
        keys = keys.float().permute(0, 2, 3, 1)                                      # [S, Hkv, D, L]
        queries = q.float().view(num_seqs, num_kv_heads, group, head_dim)
        scores = torch.matmul(queries, keys).mul_(scale)                             # [S, Hkv, G, L]
        scores.masked_fill_((meta.key_positions < 0)[:, None, None, :], float("-inf"))
        probs = torch.softmax(scores, -1).nan_to_num_(0.0).view(num_seqs, num_q_heads, -1)
        key_mass += (probs if kept_q_heads is None else probs.index_select(1, heads)).sum(1)
        return
    for s in range(meta.num_seqs):
        lo, hi = meta.query_start_loc[s], meta.query_start_loc[s + 1]
        if hi == lo:
            continue
        num_keys = int((meta.key_positions[s] >= 0).sum())
        key_pos = meta.key_positions[s, :num_keys]
        keys = k_cache[meta.key_slots[s, :num_keys]].float()[:, heads // group]     # [L, Hk, D]
        last = slice(max(lo, hi - mass_window), hi)
        queries = q[last].float()[:, heads]                                          # [W, Hk, D]
        scores = scale * torch.einsum("whd,lhd->whl", queries, keys)
        visible = key_pos[None, :] <= meta.query_positions[last, None]               # [W, L]
        scores = scores.masked_fill(~visible[:, None, :], float("-inf"))
        key_mass[s, :num_keys] += torch.softmax(scores, -1).nan_to_num(0.0).sum((0, 1))


def decode_computes_all_heads(device: torch.device | str) -> bool:
    """Whether a decode step with `kept_q_heads` on `device` computes every head of q (the CPU
    path), so honest FLOP accounting counts them all."""
    return not use_triton(torch.empty(0, device=device))


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    meta: AttentionMetadata, scale: float, kept_q_heads: torch.Tensor | None = None,
                    key_mass: torch.Tensor | None = None, mass_window: int = 1) -> torch.Tensor:
    """Checked entry point used by the model; see `paged_attention_ref` for the math.

    Runs the Triton kernels where `use_triton(q)` (the decode kernel when meta.is_decode), the
    twin `paged_attention_ref` otherwise. Pruning extras, both optional: `kept_q_heads` [Hk]
    computes only those query heads (head h reads KV head h // G) and returns [T, Hk, D];
    `key_mass` [S, L] float32 gets += the attention mass each key receives from the last
    `mass_window` queries of its sequence (in decode, from the one query), summed over heads.
    """
    if q.dim() != 3 or k_cache.dim() != 3 or k_cache.shape != v_cache.shape:
        raise ValueError(f"bad shapes: q {tuple(q.shape)}, k_cache {tuple(k_cache.shape)}, v_cache {tuple(v_cache.shape)}")
    if q.shape[1] % k_cache.shape[1] or q.shape[2] != k_cache.shape[2]:
        raise ValueError(f"query heads {q.shape[1]} / head_dim {q.shape[2]} do not fit KV heads "
                         f"{k_cache.shape[1]} / head_dim {k_cache.shape[2]}")
    if q.shape[0] != meta.query_start_loc[-1]:
        raise ValueError(f"q has {q.shape[0]} rows, metadata describes {meta.query_start_loc[-1]} tokens")
    if not use_triton(q):
        return paged_attention_ref(q, k_cache, v_cache, meta, scale, kept_q_heads, key_mass, mass_window)
    # Imported here: a CPU run never needs the kernel modules.
    if meta.is_decode:
        from trident.kernels.decode_attention import decode_attention
        return decode_attention(q, k_cache, v_cache, meta, scale, kept_q_heads, key_mass)
    from trident.kernels.prefill_attention import prefill_attention
    return prefill_attention(q, k_cache, v_cache, meta, scale, kept_q_heads, key_mass, mass_window)
