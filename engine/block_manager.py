"""Paged KV-cache blocks: a free list, reference counts and prefix caching by block hash.

A block holds `block_size` consecutive tokens of one sequence. Full blocks are identified by a hash
chained over every token before them, so a sequence admitted after another has computed the same
prefix (a shared system prompt, a repeated prompt, a preempted sequence coming back) reuses those
blocks. Sequences admitted in the same step (the n completions of one request) each compute theirs. A block whose ref count drops to 0 goes back to the free
list but keeps its hash until it is handed out again, so a later request can still reuse it.
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
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))  # LRU order
        self.block_hash: dict[int, int] = {}        # block id -> hash of its full contents + prefix
        self.cached: dict[int, int] = {}            # hash -> block id

    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    def blocks_needed(self, seq: Sequence, num_tokens: int) -> int:
        """Extra blocks `seq` needs to hold `num_tokens` tokens in total."""
        return max(0, -(-num_tokens // self.block_size) - len(seq.block_table))

    def _take_free_block(self) -> int:
        block, _ = self.free.popitem(last=False)
        old = self.block_hash.pop(block, None)
        if old is not None and self.cached.get(old) == block:
            del self.cached[old]
        self.ref_counts[block] = 1
        return block

    def allocate(self, seq: Sequence, num_tokens: int) -> bool:
        """Grow seq's block table to hold `num_tokens` tokens. False (and no change) if out of blocks."""
        need = self.blocks_needed(seq, num_tokens)
        if need > len(self.free):
            return False
        seq.block_table.extend(self._take_free_block() for _ in range(need))
        return True

    def match_prefix(self, seq: Sequence) -> int:
        """Attach cached blocks for seq's leading full blocks; returns the tokens they cover.

        At least one token is always left to compute, since the last prompt token's logits are needed.
        """
        if not self.enable_prefix_caching or seq.block_table or seq.wants_prompt_logprobs:
            return 0
        h = 0
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
        return len(seq.block_table) * self.block_size

    def register_full_blocks(self, seq: Sequence) -> None:
        """Publish the hashes of seq's computed full blocks so later sequences can share them."""
        if not self.enable_prefix_caching:
            return
        num_full = seq.num_computed_tokens // self.block_size
        for i in range(len(seq.block_hashes), num_full):
            prev = seq.block_hashes[-1] if seq.block_hashes else 0
            h = hash((prev, tuple(seq.token_ids[i * self.block_size:(i + 1) * self.block_size])))
            seq.block_hashes.append(h)
            block = seq.block_table[i]
            if block not in self.block_hash:
                self.block_hash[block] = h
                self.cached.setdefault(h, block)

    def free_sequence(self, seq: Sequence) -> None:
        # Release in reverse so the tail of a sequence is reused before its (more shareable) head.
        for block in reversed(seq.block_table):
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                self.free[block] = None
        seq.block_table = []
        seq.block_hashes = []
