"""Paged KV-cache blocks: a free list, reference counts, live-slot counts and prefix caching.

A sequence owns its list of kept slots (`Sequence.kv_slots`); the block manager owns the blocks,
how many sequences reference each, and how many live slots each holds. New tokens take the next
reserved slot of their sequence's last block (`take_slots`); when the length axis evicts a key its
slot is released, and a block with no live slot left goes back to the free list. `compact` moves a
fragmented sequence's keys into fewer blocks.

Prefix caching: a full block of an unpruned sequence is identified by a hash chained over every
token before it, so a sequence admitted after another has computed the same prefix (a shared system
prompt, a repeated prompt, a preempted sequence coming back) reuses those blocks. Sequences
admitted in the same step (the n completions of one request) each compute theirs. A block whose ref
count drops to 0 goes back to the free list but keeps its hash until it is handed out again, so a
later request can still reuse it. Prefix caching only shares blocks no policy has changed: a
sequence that prunes its length neither publishes its blocks nor reuses others'. The chain starts
from the sequence's `cache_salt`, so sequences of different served variants never share a block.
"""
from __future__ import annotations

from collections import OrderedDict

from trident.engine.sequence import Sequence


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.live = [0] * num_blocks                # written slots not yet released (owned blocks)
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))  # LRU order
        self.block_hash: dict[int, int] = {}        # block id -> hash of its full contents + prefix
        self.cached: dict[int, int] = {}            # hash -> block id

    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self.free)

    def blocks_needed(self, seq: Sequence, num_new_tokens: int) -> int:
        """Extra blocks `seq` needs to write `num_new_tokens` more tokens."""
        return max(0, -(-(num_new_tokens - len(seq.free_slots)) // self.block_size))

    def _take_free_block(self) -> int:
        block, _ = self.free.popitem(last=False)
        old = self.block_hash.pop(block, None)
        if old is not None and self.cached.get(old) == block:
            del self.cached[old]
        self.ref_counts[block] = 1
        self.live[block] = 0
        return block

    def _release_block(self, block: int) -> None:
        self.ref_counts[block] -= 1
        if self.ref_counts[block] == 0:
            self.live[block] = 0
            self.free[block] = None

    def allocate(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Reserve room for `num_new_tokens` more tokens of seq. False (and no change) if out of blocks."""
        need = self.blocks_needed(seq, num_new_tokens)
        if need > len(self.free):
            return False
        for _ in range(need):
            block = self._take_free_block()
            seq.block_table.append(block)
            seq.free_slots.extend(range(block * self.block_size, (block + 1) * self.block_size))
        return True

    def take_slots(self, seq: Sequence, num_tokens: int) -> list[int]:
        """The slots the next `num_tokens` tokens of seq are written to (reserved by `allocate`)."""
        if num_tokens > len(seq.free_slots):
            raise RuntimeError(f"sequence {seq.seq_id} has {len(seq.free_slots)} reserved slots, needs {num_tokens}")
        slots, seq.free_slots = seq.free_slots[:num_tokens], seq.free_slots[num_tokens:]
        for slot in slots:
            self.live[slot // self.block_size] += 1
        return slots

    def release_slots(self, seq: Sequence, slots: list[int]) -> int:
        """Slots seq no longer keeps (evicted keys). A block left with no live slot and no reserved
        one leaves seq's block table and, unreferenced, returns to the free list. Returns the
        number of blocks freed."""
        emptied = set()
        for slot in slots:
            block = slot // self.block_size
            self.live[block] -= 1
            if self.live[block] == 0:
                emptied.add(block)
        reserved = {slot // self.block_size for slot in seq.free_slots}
        gone = emptied - reserved
        if gone:
            seq.block_table = [b for b in seq.block_table if b not in gone]
            for block in gone:
                self._release_block(block)
        return len(gone)

    def rollback(self, seq: Sequence, slots: list[int]) -> int:
        """Give back slots taken but not kept (rejected speculative drafts): they return, in order,
        to the front of seq's reserve, and trailing blocks that hold none of seq's tokens return to
        the free list. Returns the number of blocks freed."""
        if not slots:
            return 0
        for slot in slots:
            self.live[slot // self.block_size] -= 1
        seq.free_slots = slots + seq.free_slots
        freed, holds_keys = 0, {slot // self.block_size for slot in seq.kv_slots[-1:]}
        while seq.block_table and self.live[seq.block_table[-1]] == 0 and seq.block_table[-1] not in holds_keys:
            block = seq.block_table.pop()
            first = block * self.block_size
            seq.free_slots = [s for s in seq.free_slots if not first <= s < first + self.block_size]
            self._release_block(block)
            freed += 1
        return freed

    def fragmented(self, seq: Sequence) -> bool:
        """Whether seq holds enough more blocks than its kept keys need that compacting pays."""
        need = -(-(len(seq.kv_slots) + len(seq.free_slots)) // self.block_size)
        return len(seq.block_table) >= need + max(2, need // 4)

    def compact(self, seq: Sequence) -> tuple[list[int], list[int]] | None:
        """Move seq's kept keys into as few fresh blocks as they need, in order, and free the old
        ones. Returns (source slots, destination slots) for the caller to copy the K/V of every
        layer before anything writes the cache again; None when there are not enough free blocks."""
        num_keys = len(seq.kv_slots)
        need = -(-num_keys // self.block_size)
        if need > len(self.free) or seq.block_hashes:
            return None
        new_blocks = [self._take_free_block() for _ in range(need)]
        slots = [b * self.block_size + i for b in new_blocks for i in range(self.block_size)]
        dst, tail = slots[:num_keys], slots[num_keys:]
        for slot in dst:
            self.live[slot // self.block_size] += 1
        src = seq.kv_slots
        for block in seq.block_table:
            self._release_block(block)
        seq.block_table, seq.kv_slots, seq.free_slots = new_blocks, dst, tail
        return src, dst

    def match_prefix(self, seq: Sequence) -> int:
        """Attach cached blocks for seq's leading full blocks; returns the tokens they cover.

        At least one token is always left to compute, since the last prompt token's logits are needed.
        """
        if not self.enable_prefix_caching or seq.block_table or seq.wants_prompt_logprobs or seq.prunes_length:
            return 0
        h = seq.cache_salt
        for start in range(0, seq.num_tokens - self.block_size, self.block_size):
            h = hash((h, tuple(seq.token_ids[start:start + self.block_size])))
            block = self.cached.get(h)
            if block is None:
                break
            if self.ref_counts[block] == 0:
                del self.free[block]
            self.ref_counts[block] += 1
            seq.block_table.append(block)
            seq.block_hashes.append(h)
        num_matched = len(seq.block_table) * self.block_size
        seq.kv_slots = [b * self.block_size + i for b in seq.block_table for i in range(self.block_size)]
        seq.kv_positions = list(range(num_matched))
        return num_matched

    def register_full_blocks(self, seq: Sequence) -> None:
        """Publish the hashes of seq's computed full blocks so later sequences can share them. Only
        unpruned sequences publish: their block i holds positions [i * size, (i + 1) * size)."""
        if not self.enable_prefix_caching or seq.prunes_length:
            return
        # Tokens accepted from a speculative draft are computed before they join token_ids; K/V an
        # early exit filled from its exit state is not the full model's and is never shared.
        exact = seq.num_computed_tokens if seq.exact_kv_tokens is None else seq.exact_kv_tokens
        num_full = min(exact, seq.num_tokens) // self.block_size
        for i in range(len(seq.block_hashes), num_full):
            prev = seq.block_hashes[-1] if seq.block_hashes else seq.cache_salt
            h = hash((prev, tuple(seq.token_ids[i * self.block_size:(i + 1) * self.block_size])))
            seq.block_hashes.append(h)
            block = seq.block_table[i]
            if block not in self.block_hash:
                self.block_hash[block] = h
                self.cached.setdefault(h, block)

    def free_sequence(self, seq: Sequence) -> None:
        """Give back every block of seq (finish, abort, preemption) and forget its cache contents."""
        # Release in reverse so the tail of a sequence is reused before its (more shareable) head.
        for block in reversed(seq.block_table):
            self._release_block(block)
        seq.reset_kv()
