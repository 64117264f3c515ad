"""Continuous batching: which tokens of which sequences run in the next step.

Every step mixes decodes (one token per running sequence) with prefill chunks of new sequences,
within `max_num_batched_tokens` and `max_num_seqs`. A sequence is just "tokens known" versus
"tokens computed", so prefill, chunked prefill, decode and recompute after preemption are one
rule: feed the next min(known - computed, budget) tokens. When the KV cache runs out, the newest
running sequence is preempted: its blocks are freed and it goes back to the head of the queue to be
recomputed (prompt and generated tokens) later.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from trident.engine.block_manager import BlockManager
from trident.engine.config import SchedulerConfig
from trident.engine.sequence import Sequence, SequenceStatus

if TYPE_CHECKING:
    from trident.engine.model_runner import RunnerOutput


@dataclass
class ScheduledSequence:
    seq: Sequence
    num_new_tokens: int        # feeds seq.token_ids[num_computed_tokens : num_computed_tokens + num_new_tokens]
    sample: bool               # the chunk reaches the last known token: sample the next one
    slots: list[int] = field(default_factory=list)   # [num_new_tokens] cache slots their K/V go to
    draft_slots: list[int] = field(default_factory=list)   # speculative decoding: one slot per draft token


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSequence] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    # (source slots, destination slots) of compacted sequences: the runner copies every layer's
    # K/V along them, in order, before the step writes anything.
    kv_copies: list[tuple[list[int], list[int]]] = field(default_factory=list)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager) -> None:
        self.config = config
        self.block_manager = block_manager
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        bm = self.block_manager
        # 0. Sequences whose evictions left their blocks fragmented move into fewer blocks.
        for seq in self.running:
            if seq.length.kv_budget and bm.fragmented(seq):
                copy = bm.compact(seq)
                if copy is not None:
                    out.kv_copies.append(copy)
        # 1. Running sequences first, oldest first; preempt from the back when blocks run out.
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = self._chunk(seq, budget)
            while not bm.allocate(seq, n):
                victim = self.running.pop()
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is seq:
                    break
            else:
                out.scheduled.append(ScheduledSequence(seq, n, self._samples(seq, n), bm.take_slots(seq, n)))
                budget -= n
                i += 1
                continue
            break
        # 2. Speculative drafts, from what every running sequence's own step left: tokens and free
        #    blocks; a draft never costs another sequence its decode or its blocks.
        for s in out.scheduled:
            k = min(s.seq.draft_length, budget) if s.num_new_tokens == 1 and s.sample else 0
            if k and not bm.allocate(s.seq, k):
                k = min(k, len(s.seq.free_slots))       # its last block's reserve costs no new block
            if k:
                s.draft_slots = bm.take_slots(s.seq, k)
                budget -= k
        # 3. Admit waiting sequences while there is room (not in a step that had to preempt).
        while self.waiting and budget > 0 and not out.preempted and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]          # waiting sequences hold no blocks
            seq.num_computed_tokens = bm.match_prefix(seq)
            n = self._chunk(seq, budget)
            if not bm.allocate(seq, n):
                # Give back the matched prefix blocks: a waiting sequence must not pin cache space.
                bm.free_sequence(seq)
                break
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            out.scheduled.append(ScheduledSequence(seq, n, self._samples(seq, n), bm.take_slots(seq, n)))
            budget -= n
        return out

    def _chunk(self, seq: Sequence, budget: int) -> int:
        """Tokens of seq to feed this step: what is left of it, up to `budget`. A KV budget that
        compresses the prompt at its end scores it by the last step's last `window` queries, so a
        chunk that would leave a shorter last step leaves min(window, step size) tokens instead
        (unless this step's leftover budget is what runs short)."""
        left = seq.num_tokens - seq.num_computed_tokens
        n = min(left, budget)
        policy = seq.length
        if policy.kv_budget and not policy.evict_during_prefill:
            last = min(policy.window, self.config.max_num_batched_tokens)
            if 0 < left - n < last < left:
                n = left - last
        return n

    @staticmethod
    def _samples(seq: Sequence, n: int) -> bool:
        return seq.num_computed_tokens + n == seq.num_tokens

    def _preempt(self, seq: Sequence) -> None:
        self.block_manager.free_sequence(seq)        # recomputed later from its tokens, policy and all
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def update_after_step(self, out: SchedulerOutput, result: RunnerOutput) -> None:
        """Apply what the runner computed and decided (before new tokens are appended): the new
        keys join each sequence's kept list, with the depth prefill pruning gave them; evicted keys
        leave it and their slots (and emptied blocks) go back to the block manager."""
        for s in out.scheduled:
            seq = s.seq
            first = seq.num_computed_tokens
            seq.kv_slots.extend(s.slots)
            seq.kv_positions.extend(range(first, first + s.num_new_tokens))
            seq.num_computed_tokens += s.num_new_tokens
            if seq.seq_id in result.exited and seq.exact_kv_tokens is None:
                # The exited token's deeper K/V came from its exit state: blocks from it on are not
                # what the full model computes, so prefix caching must never share them.
                seq.exact_kv_tokens = first
            if s.draft_slots:
                # Verified drafts keep their K/V (the verify pass wrote it); rejected ones give theirs back.
                accepted = result.accepted_drafts.get(seq.seq_id, 0)
                seq.kv_slots.extend(s.draft_slots[:accepted])
                seq.kv_positions.extend(range(seq.num_computed_tokens, seq.num_computed_tokens + accepted))
                seq.num_computed_tokens += accepted
                self.block_manager.rollback(seq, s.draft_slots[accepted:])
            update = result.kv_updates.get(seq.seq_id)
            if update is None:
                self.block_manager.register_full_blocks(seq)
                continue
            if update.new_depths is not None and seq.kv_depth is None:
                seq.kv_depth = [update.full_depth] * (len(seq.kv_slots) - s.num_new_tokens)
            if seq.kv_depth is not None:
                seq.kv_depth.extend(update.new_depths or [update.full_depth] * s.num_new_tokens)
            seq.num_dropped += update.num_dropped
            seq.kv_mass = update.mass
            if len(update.evict):
                self._evict(seq, update.evict)

    def _evict(self, seq: Sequence, evict: list[int]) -> None:
        gone = set(evict)
        keep = [i for i in range(len(seq.kv_slots)) if i not in gone]
        released = [seq.kv_slots[i] for i in evict]
        seq.kv_slots = [seq.kv_slots[i] for i in keep]
        seq.kv_positions = [seq.kv_positions[i] for i in keep]
        if seq.kv_depth is not None:
            seq.kv_depth = [seq.kv_depth[i] for i in keep]
        if seq.kv_mass is not None:
            seq.kv_mass = seq.kv_mass[torch.tensor(keep, dtype=torch.long)]
        seq.num_evicted += len(evict)
        self.block_manager.release_slots(seq, released)

    def finish(self, seq: Sequence, reason: str, stop_reason: int | str | None = None) -> None:
        """Mark seq finished and release its blocks, wherever it is (running, waiting)."""
        if seq.is_finished:
            return
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason, seq.stop_reason = reason, stop_reason
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.block_manager.free_sequence(seq)
