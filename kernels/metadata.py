"""The per-step attention contract: which cache slots each sequence's queries read and write.

A leaf module: the attention launchers, their twins and the engine import it; it imports nothing
of Trident's. Metadata is built from each sequence's explicit list of kept key slots and their
ORIGINAL positions, never from `arange`, so any subset of a sequence's tokens (prefill-dropped
rows, evicted slots, compacted blocks) is described the same way, and RoPE positions never move.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass
class AttentionMetadata:
    """Per-step inputs shared by every layer of a segment (layers that see the same keys)."""

    slot_mapping: torch.Tensor      # [T] int64: cache slot that receives each new token's K/V
    query_positions: torch.Tensor   # [T] int64: original position of each new token
    query_start_loc: list[int]      # [S + 1]: new tokens of sequence s are rows [loc[s], loc[s+1])
    key_slots: torch.Tensor         # [S, L] int64: cache slots of each sequence's keys, padded with 0
    key_positions: torch.Tensor     # [S, L] int64: original positions of those keys, -1 for padding
    is_decode: bool                 # every sequence has exactly one new token
    # Tensors the kernel launchers derive from the fields above (key lengths, tile tables), built
    # on first use and shared by every layer of the step. An entry is rebuilt when the field it
    # came from is reassigned; fields are never edited in place.
    derived: dict[str, tuple] = field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def num_seqs(self) -> int:
        return len(self.query_start_loc) - 1

    @staticmethod
    def from_keys(key_slots: list[list[int]], key_positions: list[list[int]], num_new: list[int],
                  device: torch.device | str = "cpu") -> "AttentionMetadata":
        """Metadata for S sequences whose keys (kept slots, in increasing original position) are
        `key_slots[s]` at `key_positions[s]`; the last `num_new[s]` of them are this step's new
        tokens, whose K/V are written to those slots and whose queries attend causally by position."""
        num_seqs = len(key_slots)
        lens = [len(slots) for slots in key_slots]
        if len(key_positions) != num_seqs or len(num_new) != num_seqs:
            raise ValueError("key_slots, key_positions and num_new need one entry per sequence")
        if any(len(p) != n for p, n in zip(key_positions, lens)) or any(not 0 <= k <= n for k, n in zip(num_new, lens)):
            raise ValueError("each sequence needs one position per slot and at most that many new tokens")
        width = max(lens, default=0)
        # Filled row by row in numpy: a handful of small copies, no parallel torch ops (whose
        # thread start-up costs more than the copy at these sizes).
        slots = np.zeros((num_seqs, width), dtype=np.int64)
        positions = np.full((num_seqs, width), -1, dtype=np.int64)
        new_slots, new_positions = [], []
        for s, (row_slots, row_positions, n, k) in enumerate(zip(key_slots, key_positions, lens, num_new)):
            slots[s, :n] = row_slots
            positions[s, :n] = row_positions
            new_slots.extend(row_slots[n - k:])
            new_positions.extend(row_positions[n - k:])
        loc = [0]
        for k in num_new:
            loc.append(loc[-1] + k)
        return AttentionMetadata(
            slot_mapping=torch.tensor(new_slots, dtype=torch.long, device=device),
            query_positions=torch.tensor(new_positions, dtype=torch.long, device=device),
            query_start_loc=loc,
            key_slots=torch.from_numpy(slots).to(device),
            key_positions=torch.from_numpy(positions).to(device),
            is_decode=bool(num_new) and all(k == 1 for k in num_new),
        )

    @staticmethod
    def build(block_tables: list[list[int]], seq_lens: list[int], new_counts: list[int],
              block_size: int, device: torch.device | str = "cpu") -> "AttentionMetadata":
        """Metadata for unpruned sequences holding `seq_lens[s]` tokens at positions 0..len-1 in
        consecutive slots of their block tables (the last `new_counts[s]` of them new). For tests,
        benchmarks and healing; the engine builds from each sequence's kept slots (`from_keys`)."""
        slots = [[bt[p // block_size] * block_size + p % block_size for p in range(n)]
                 for bt, n in zip(block_tables, seq_lens)]
        return AttentionMetadata.from_keys(slots, [list(range(n)) for n in seq_lens], new_counts, device)


def keep_keys(meta: AttentionMetadata, kept: list[torch.Tensor]) -> AttentionMetadata:
    """The same queries over fewer keys: sequence s keeps the key columns `kept[s]` (indices into
    its row of `meta.key_slots`, in any order), with their original positions. A query whose own
    key is dropped still writes its K/V (slot_mapping is unchanged)."""
    if len(kept) != meta.num_seqs:
        raise ValueError(f"kept has {len(kept)} entries for {meta.num_seqs} sequences")
    width = max((len(k) for k in kept), default=0)
    device = meta.key_slots.device
    slots = torch.zeros(meta.num_seqs, width, dtype=torch.long, device=device)
    positions = torch.full((meta.num_seqs, width), -1, dtype=torch.long, device=device)
    for s, cols in enumerate(kept):
        cols = cols.to(device=device, dtype=torch.long)
        if bool((meta.key_positions[s, cols] < 0).any()):
            raise ValueError(f"sequence {s} keeps a padding column")
        slots[s, :len(cols)] = meta.key_slots[s, cols]
        positions[s, :len(cols)] = meta.key_positions[s, cols]
    return AttentionMetadata(meta.slot_mapping, meta.query_positions, meta.query_start_loc, slots, positions,
                             meta.is_decode)
