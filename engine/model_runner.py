"""Runs one scheduled step through the model: builds the packed batch, runs the forward pass,
computes logits only for the rows that need them, and samples."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from trident.engine.model import LlamaModel
from trident.engine.outputs import TokenLogprobs
from trident.engine.pruning.accounting import FlopCount, FlopCounter
from trident.engine.sampler import sample, top_logprobs
from trident.engine.scheduler import SchedulerOutput
from trident.kernels.metadata import AttentionMetadata


@dataclass
class RunnerOutput:
    sampled: dict[int, int] = field(default_factory=dict)                   # seq_id -> new token id
    logprobs: dict[int, TokenLogprobs] = field(default_factory=dict)        # seq_id -> its logprobs
    prompt_logprobs: dict[int, list[TokenLogprobs]] = field(default_factory=dict)  # seq_id -> one per prompt token
    num_tokens: int = 0                                                     # tokens run through the model
    step_time: float = 0.0                                                  # seconds, forward + sampling
    flops: dict[int, FlopCount] = field(default_factory=dict)               # seq_id -> its share of the step
    step_flops: FlopCount = field(default_factory=FlopCount)                # the whole step


class ModelRunner:
    def __init__(self, model: LlamaModel, kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
                 block_size: int, device: torch.device, flop_counter: FlopCounter) -> None:
        self.model = model
        self.flop_counter = flop_counter
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.device = device

    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput) -> RunnerOutput:
        start = time.perf_counter()
        input_ids: list[int] = []
        logit_rows: list[int] = []          # packed row indices whose logits are needed
        sample_seqs, sample_rows = [], []   # rows (into logit_rows) that sample a next token
        prompt_lp: list[tuple] = []         # (seq, slice of logit rows, target ids)
        rows_per_seq = []                   # logit rows each sequence needs (for accounting)
        for s in sched.scheduled:
            seq, lo = s.seq, len(input_ids)
            rows_before = len(logit_rows)
            begin, end = seq.num_computed_tokens, seq.num_computed_tokens + s.num_new_tokens
            input_ids.extend(seq.token_ids[begin:end])
            if seq.wants_prompt_logprobs:
                # Position p predicts token p + 1. Score prompt tokens not scored yet: a recompute
                # after preemption runs positions whose logprobs are already recorded.
                first_target = max(begin + 1, len(seq.prompt_logprobs))
                last_target = min(end + 1, seq.num_prompt_tokens)          # exclusive
                if first_target < last_target:
                    first = len(logit_rows)
                    logit_rows.extend(range(lo + first_target - 1 - begin, lo + last_target - 1 - begin))
                    prompt_lp.append((seq, slice(first, len(logit_rows)), seq.token_ids[first_target:last_target]))
            if s.sample and seq.max_tokens > 0:
                if not (logit_rows and logit_rows[-1] == lo + s.num_new_tokens - 1):
                    logit_rows.append(lo + s.num_new_tokens - 1)
                sample_seqs.append(seq)
                sample_rows.append(len(logit_rows) - 1)
            rows_per_seq.append(len(logit_rows) - rows_before)
        meta = AttentionMetadata.build(
            [s.seq.block_table for s in sched.scheduled],
            [s.seq.num_computed_tokens + s.num_new_tokens for s in sched.scheduled],
            [s.num_new_tokens for s in sched.scheduled],
            self.block_size, self.device,
        )
        ids = torch.tensor(input_ids, dtype=torch.long, device=self.device)
        hidden = self.model(ids, meta.query_positions, meta, self.kv_caches)
        out = RunnerOutput(num_tokens=len(input_ids))
        if logit_rows:
            # A decode step needs every row's logits: skip the row gathers (at 32 rows, copying
            # the [32, vocab] logits took 1.6 ms of a 100 ms step). Row lists only ever increase,
            # so a full-length one holds every row.
            if len(logit_rows) != hidden.shape[0]:
                hidden = hidden[torch.tensor(logit_rows, device=self.device)]
            logits = self.model.compute_logits(hidden)
            for seq, rows, targets in prompt_lp:
                lp = logits[rows].log_softmax(-1)
                k = seq.params.prompt_logprobs
                out.prompt_logprobs[seq.seq_id] = top_logprobs(lp, torch.tensor(targets, device=lp.device), k)
            if sample_seqs:
                sample_logits = logits if len(sample_rows) == len(logit_rows) else logits[sample_rows]
                token_ids, logprobs = sample(sample_logits, sample_seqs)
                for seq, tok, lp in zip(sample_seqs, token_ids, logprobs):
                    out.sampled[seq.seq_id] = tok
                    if lp is not None:
                        out.logprobs[seq.seq_id] = lp
        for s, rows in zip(sched.scheduled, rows_per_seq):
            count = self.flop_counter.step(s.num_new_tokens, s.seq.num_computed_tokens + s.num_new_tokens, rows,
                                           decode=meta.is_decode, batch_keys=meta.key_slots.shape[1])
            out.flops[s.seq.seq_id] = count
            out.step_flops.add(count)
        out.step_time = time.perf_counter() - start
        return out
