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

from trident.engine.block_manager import BlockManager
from trident.engine.config import SchedulerConfig
from trident.engine.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledSequence:
    seq: Sequence
    num_new_tokens: int        # feeds seq.token_ids[num_computed_tokens : num_computed_tokens + num_new_tokens]
    sample: bool               # the chunk reaches the last known token: sample the next one


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSequence] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

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
        # 1. Running sequences first, oldest first; preempt from the back when blocks run out.
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            while not self.block_manager.allocate(seq, seq.num_computed_tokens + n):
                victim = self.running.pop()
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is seq:
                    break
            else:
                out.scheduled.append(ScheduledSequence(seq, n, self._samples(seq, n)))
                budget -= n
                i += 1
                continue
            break
        # 2. Admit waiting sequences while there is room (not in a step that had to preempt).
        while self.waiting and budget > 0 and not out.preempted and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]          # waiting sequences hold no blocks
            seq.num_computed_tokens = self.block_manager.match_prefix(seq)
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if not self.block_manager.allocate(seq, seq.num_computed_tokens + n):
                # Give back the matched prefix blocks: a waiting sequence must not pin cache space.
                self.block_manager.free_sequence(seq)
                seq.num_computed_tokens = 0
                break
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            out.scheduled.append(ScheduledSequence(seq, n, self._samples(seq, n)))
            budget -= n
        return out

    @staticmethod
    def _samples(seq: Sequence, n: int) -> bool:
        return seq.num_computed_tokens + n == seq.num_tokens

    def _preempt(self, seq: Sequence) -> None:
        self.block_manager.free_sequence(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def update_after_step(self, out: SchedulerOutput) -> None:
        """Account the tokens the runner computed (before new tokens are appended)."""
        for s in out.scheduled:
            s.seq.num_computed_tokens += s.num_new_tokens
            self.block_manager.register_full_blocks(s.seq)

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
