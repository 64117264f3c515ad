"""Runs one scheduled step through the model: builds the packed batch and its attention metadata
from each sequence's kept keys, runs the forward pass (with a StepPruning when some sequence prunes
its length), computes logits only for the rows that need them, samples, and decides evictions.
Sequences that speculate first draft their tokens (engine/speculative.py); their drafts join the
batch as extra rows, and acceptance replaces sampling for them."""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from trident.engine.model import LlamaModel
from trident.engine.outputs import TokenLogprobs
from trident.engine.pruning.accounting import FlopCount, FlopCounter
from trident.engine.pruning.length import select_evictions
from trident.engine.sampler import distribution, draw, sample, top_logprobs
from trident.engine.scheduler import ScheduledSequence, SchedulerOutput
from trident.engine.speculative import Draft, accept_greedy, accept_sampled
from trident.engine.step_pruning import ExitProbe, SeqResult, SeqStep, StepPruning
from trident.kernels.metadata import AttentionMetadata


@dataclass
class KvUpdate:
    """What one step decided about a length-pruned sequence's keys; Scheduler.update_after_step applies it."""

    full_depth: int                  # depth of a key in every layer (the model's layer count)
    new_depths: list[int] | None     # [num_new_tokens] depth of each new key; None = all full
    num_dropped: int                 # new rows prefill pruning kept out of deeper layers
    mass: torch.Tensor | None        # [kept + new] accumulated attention mass (KV budget), before eviction
    evict: list[int]                 # indices into kept + new keys that leave the sequence


@dataclass
class RunnerOutput:
    sampled: dict[int, list[int]] = field(default_factory=dict)             # seq_id -> new token ids (1 + accepted drafts)
    logprobs: dict[int, list[TokenLogprobs]] = field(default_factory=dict)  # seq_id -> their logprobs
    accepted_drafts: dict[int, int] = field(default_factory=dict)           # seq_id -> drafts verified (speculative)
    exited: set[int] = field(default_factory=set)                           # seq_ids whose row left through an exit
    draft_time: float = 0.0                                                 # seconds of step_time spent drafting
    prompt_logprobs: dict[int, list[TokenLogprobs]] = field(default_factory=dict)  # seq_id -> one per prompt token
    num_tokens: int = 0                                                     # tokens run through the model
    step_time: float = 0.0                                                  # seconds, forward + sampling
    flops: dict[int, FlopCount] = field(default_factory=dict)               # seq_id -> its share of the step
    step_flops: FlopCount = field(default_factory=FlopCount)                # the whole step
    kv_updates: dict[int, KvUpdate] = field(default_factory=dict)           # seq_id -> length-axis decisions

    def merge(self, other: "RunnerOutput") -> None:
        """Add another group's output of the same step (engine/variants.py runs one per variant)."""
        for name in ("sampled", "logprobs", "accepted_drafts", "prompt_logprobs", "flops", "kv_updates"):
            getattr(self, name).update(getattr(other, name))
        self.exited |= other.exited
        self.draft_time += other.draft_time
        self.num_tokens += other.num_tokens
        self.step_time += other.step_time
        self.step_flops.add(other.step_flops)


def copy_slots(kv_caches: list[tuple[torch.Tensor, torch.Tensor]], copies: list[tuple[list[int], list[int]]],
               device: torch.device) -> None:
    """Move compacted sequences' K/V in every layer, in order (a later copy may read what an
    earlier one vacated)."""
    for src, dst in copies:
        src_t = torch.tensor(src, dtype=torch.long, device=device)
        dst_t = torch.tensor(dst, dtype=torch.long, device=device)
        for k_cache, v_cache in kv_caches:
            k_cache.index_copy_(0, dst_t, k_cache.index_select(0, src_t))
            v_cache.index_copy_(0, dst_t, v_cache.index_select(0, src_t))


class ModelRunner:
    def __init__(self, model: LlamaModel, kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
                 block_size: int, device: torch.device, flop_counter: FlopCounter) -> None:
        self.model = model
        self.flop_counter = flop_counter
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.device = device
        self.present_layers = [layer.spec.index for layer in model.layers]
        self.num_layers = model.config.num_layers
        # K/V bytes one token holds in the present layers with index >= d, for d in 0..num_layers.
        per_layer = dict(zip(self.present_layers, (2 * k.shape[1] * k.shape[2] * k.element_size() for k, _ in kv_caches)))
        self.bytes_from = [sum(b for i, b in per_layer.items() if i >= d) for d in range(self.num_layers + 1)]
        # Present layers a row of depth d runs (those with index < d), for d in 0..num_layers.
        self.layers_below = [sum(i < d for i in self.present_layers) for d in range(self.num_layers + 1)]
        self.draft_layers: list[int] | None = None      # positions in model.layers a speculative draft runs
        self.exit_probes: dict[int, ExitProbe] = {}      # early-exit classifiers by layer index (the plan's)
        # What picks each sampled row's token from its logits: sampler.sample, or a caller's own
        # with the same signature (the length bench teacher-forces targets through it).
        self.sampler: Callable[[torch.Tensor, list], tuple[list[int], list]] = sample

    def copy_kv(self, copies: list[tuple[list[int], list[int]]]) -> None:
        copy_slots(self.kv_caches, copies, self.device)

    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput) -> RunnerOutput:
        start = time.perf_counter()
        self.copy_kv(sched.kv_copies)
        drafts = self._draft([s for s in sched.scheduled if s.draft_slots])
        draft_time = time.perf_counter() - start
        input_ids: list[int] = []
        logit_rows: list[int] = []          # packed row indices whose logits are needed
        sample_seqs, sample_rows = [], []   # rows (into logit_rows) that sample a next token
        verify: list[tuple[ScheduledSequence, int]] = []   # speculating sequences and their first logit row
        prompt_lp: list[tuple] = []         # (seq, slice of logit rows, target ids)
        rows_per_seq = []                   # logit rows each sequence needs (for accounting)
        sample_row_of: dict[int, int] = {}  # scheduled index -> its sampling row in logit_rows
        for s in sched.scheduled:
            seq, lo = s.seq, len(input_ids)
            rows_before = len(logit_rows)
            begin, end = seq.num_computed_tokens, seq.num_computed_tokens + s.num_new_tokens
            input_ids.extend(seq.token_ids[begin:end])
            if s.draft_slots:               # a decode with drafts: every row's logits verify one token
                input_ids.extend(drafts[seq.seq_id].tokens)
                verify.append((s, len(logit_rows)))
                logit_rows.extend(range(lo, len(input_ids)))
                rows_per_seq.append(len(logit_rows) - rows_before)
                continue
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
                sample_row_of[len(rows_per_seq)] = len(logit_rows) - 1
            rows_per_seq.append(len(logit_rows) - rows_before)
        num_new = [s.num_new_tokens + len(s.draft_slots) for s in sched.scheduled]
        slots = [s.seq.kv_slots + s.slots + s.draft_slots for s in sched.scheduled]
        positions = [s.seq.kv_positions + list(range(s.seq.num_computed_tokens, s.seq.num_computed_tokens + n))
                     for s, n in zip(sched.scheduled, num_new)]
        ids = torch.tensor(input_ids, dtype=torch.long, device=self.device)
        pruning = self._step_pruning(sched, slots, positions, num_new)
        if pruning is None:
            meta = AttentionMetadata.from_keys(slots, positions, num_new, self.device)
            hidden = self.model(ids, meta.query_positions, meta, self.kv_caches)
        else:
            meta = pruning.meta
            hidden = self.model(ids, meta.query_positions, meta, self.kv_caches, pruning)
            if len(pruning.packed) != len(input_ids):      # rows dropped: find the logit rows among the kept
                where = torch.full((len(input_ids),), -1, dtype=torch.long)
                where[pruning.packed] = torch.arange(len(pruning.packed))
                logit_rows = where[torch.tensor(logit_rows, dtype=torch.long)].tolist()
                if min(logit_rows, default=0) < 0:
                    raise RuntimeError("prefill pruning dropped a row whose logits are needed")
        out = RunnerOutput(num_tokens=len(input_ids), draft_time=draft_time)
        if logit_rows:
            # A decode step needs every row's logits: skip the row gathers (at 32 rows, copying
            # the [32, vocab] logits took 1.6 ms of a 100 ms step). Row lists only ever increase,
            # so a full-length one holds every row.
            if len(logit_rows) != hidden.shape[0]:
                hidden = hidden[torch.tensor(logit_rows, device=self.device)]
            logits = self.model.compute_logits(hidden)
            if pruning is not None and pruning.exited:
                logits = self._soften_exits(logits, pruning, sample_row_of)
            for seq, rows, targets in prompt_lp:
                lp = logits[rows].log_softmax(-1)
                k = seq.params.prompt_logprobs
                out.prompt_logprobs[seq.seq_id] = top_logprobs(lp, torch.tensor(targets, device=lp.device), k)
            if sample_seqs:
                sample_logits = logits if len(sample_rows) == len(logit_rows) else logits[sample_rows]
                token_ids, logprobs = self.sampler(sample_logits, sample_seqs)
                for seq, tok, lp in zip(sample_seqs, token_ids, logprobs):
                    out.sampled[seq.seq_id] = [tok]
                    if lp is not None:
                        out.logprobs[seq.seq_id] = [lp]
            for s, first in verify:
                self._accept(s.seq, drafts[s.seq.seq_id], logits[first:first + 1 + len(s.draft_slots)], out)
        results = pruning.finish() if pruning is not None else [None] * len(sched.scheduled)
        if pruning is not None:                       # the step's shape before any row left
            decode, batch_keys = pruning.first_meta.is_decode, pruning.first_meta.key_slots.shape[1]
        else:
            decode, batch_keys = meta.is_decode, meta.key_slots.shape[1]
        for i, (s, rows, result) in enumerate(zip(sched.scheduled, rows_per_seq, results)):
            context_end = s.seq.num_computed_tokens + s.num_new_tokens
            if s.draft_slots:
                count = self.flop_counter.speculative(len(s.draft_slots), out.accepted_drafts[s.seq.seq_id],
                                                      s.seq.num_computed_tokens, self.draft_layer_indices)
            elif pruning is None:
                count = self.flop_counter.step(s.num_new_tokens, context_end, rows,
                                               decode=decode, batch_keys=batch_keys)
            else:
                count = self.flop_counter.step_segments([seg.accounting(i) for seg in pruning.segments],
                                                        s.num_new_tokens, context_end, rows, decode=decode,
                                                        batch_keys=batch_keys, exit_layer=result.exit_layer,
                                                        exit_checks=result.exit_checks)
            if result is not None and s.seq.prunes_length:
                update = self._kv_update(s.seq, result, positions[i])
                out.kv_updates[s.seq.seq_id] = update
                count.prompt_tokens_dropped = update.num_dropped
                count.kv_slots_evicted = len(update.evict)
                count.kv_bytes_saved = self._bytes_saved(s.seq, update)
            count.tokens, count.layer_tokens = self._layer_tokens(s, result, out.accepted_drafts.get(s.seq.seq_id, 0))
            if result is not None and result.exit_layer is not None:
                out.exited.add(s.seq.seq_id)
            out.flops[s.seq.seq_id] = count
            out.step_flops.add(count)
        out.step_time = time.perf_counter() - start
        return out

    # ---------------------------------------------------------------- speculative decoding

    @property
    def draft_layer_indices(self) -> list[int]:
        return [self.model.layers[i].spec.index for i in self.draft_layers or ()]

    def _draft(self, items: list[ScheduledSequence]) -> dict[int, Draft]:
        """Each item's draft tokens: single-token passes through the draft layers, batched across
        the sequences still drafting. Pass j writes K/V at the slot of position computed + j."""
        if not items:
            return {}
        drafts = {s.seq.seq_id: Draft([], None if s.seq.params.greedy else []) for s in items}
        current = [s.seq.token_ids[s.seq.num_computed_tokens] for s in items]
        for j in range(max(len(s.draft_slots) for s in items)):
            active = [i for i, s in enumerate(items) if len(s.draft_slots) > j]
            slots, positions = [], []
            for i in active:
                s = items[i]
                slots.append(s.seq.kv_slots + (s.slots + s.draft_slots)[:j + 1])
                positions.append(s.seq.kv_positions + list(range(s.seq.num_computed_tokens,
                                                                 s.seq.num_computed_tokens + j + 1)))
            meta = AttentionMetadata.from_keys(slots, positions, [1] * len(active), self.device)
            ids = torch.tensor([current[i] for i in active], dtype=torch.long, device=self.device)
            hidden = self.model(ids, meta.query_positions, meta, self.kv_caches, layers=self.draft_layers)
            logits = self.model.compute_logits(hidden)
            greedy = logits.argmax(-1).tolist()
            for row, i in enumerate(active):
                seq = items[i].seq
                draft = drafts[seq.seq_id]
                if draft.probs is None:
                    token = greedy[row]
                else:
                    q = distribution(logits[row], seq)
                    token = draw(q, seq.generator)
                    draft.probs.append(q)
                draft.tokens.append(token)
                current[i] = token
        return drafts

    def _soften_exits(self, logits: torch.Tensor, pruning: StepPruning, sample_row_of: dict[int, int]) -> torch.Tensor:
        """Divide the logits of rows that left through an exit by that exit's temperature."""
        scale = torch.ones(logits.shape[0], 1, dtype=logits.dtype, device=logits.device)
        for i, layer in enumerate(pruning.exit_layer):
            if layer is not None:
                scale[sample_row_of[i]] = 1.0 / self.exit_probes[layer].temperature
        return logits * scale

    @staticmethod
    def _accept(seq, draft: Draft, logits: torch.Tensor, out: RunnerOutput) -> None:
        """The tokens a speculating sequence emits this step, from the verify pass's [k + 1, V] logits."""
        if seq.params.greedy:
            tokens = accept_greedy(draft.tokens, logits)
        else:
            tokens = accept_sampled(draft, torch.stack([distribution(row, seq) for row in logits]), seq.generator)
        out.sampled[seq.seq_id] = tokens
        out.accepted_drafts[seq.seq_id] = len(tokens) - 1
        if seq.params.logprobs is not None:
            lp = logits[:len(tokens)].log_softmax(-1)
            out.logprobs[seq.seq_id] = top_logprobs(lp, torch.tensor(tokens, device=lp.device), seq.params.logprobs)

    def _layer_tokens(self, s: ScheduledSequence, result: SeqResult | None, accepted: int) -> tuple[int, int]:
        """(tokens the step emitted or fed, layers those rows ran through in total). A speculative
        step counts its emitted tokens against its draft passes and its verify rows."""
        present = len(self.present_layers)
        if s.draft_slots:
            k = len(s.draft_slots)
            return accepted + 1, (k + 1) * present + k * len(self.draft_layers or ())
        if result is None:
            return s.num_new_tokens, s.num_new_tokens * present
        depths = list(result.new_depths or [self.num_layers] * s.num_new_tokens)
        if result.exit_layer is not None:
            depths[-1] = result.exit_layer + 1
        return s.num_new_tokens, sum(self.layers_below[d] for d in depths)

    def _bytes_saved(self, seq, update: KvUpdate) -> float:
        """K/V bytes this step's decisions keep out of the cache: the deeper layers of dropped
        rows, and what evicted keys held (a dropped-then-evicted key only its shallow layers)."""
        full = self.bytes_from[0]
        dropped = sum(self.bytes_from[d] for d in update.new_depths or ())
        if not update.evict:
            return dropped
        depths = (seq.kv_depth or [self.num_layers] * len(seq.kv_slots)) + \
            (update.new_depths or [self.num_layers] * (len(update.mass) - len(seq.kv_slots)))
        return dropped + sum(full - self.bytes_from[depths[i]] for i in update.evict)

    def _step_pruning(self, sched: SchedulerOutput, slots: list[list[int]], positions: list[list[int]],
                      num_new: list[int]) -> StepPruning | None:
        """The step's StepPruning, or None when no scheduled sequence prunes its length or may exit early."""
        exits = [s.seq.exit_thresholds if s.num_new_tokens == 1 and s.sample and s.seq.max_tokens > 0
                 and not s.draft_slots else None for s in sched.scheduled]
        if not any(s.seq.prunes_length for s in sched.scheduled) and not any(exits):
            return None
        steps = []
        for s, seq_slots, seq_positions, n, seq_exits in zip(sched.scheduled, slots, positions, num_new, exits):
            policy = s.seq.length
            prefill = s.num_new_tokens > 1                  # a decode row is never dropped
            steps.append(SeqStep(seq_slots, seq_positions, s.seq.kv_depth, n,
                                 schedule=list(policy.prefill_keep) if prefill else [],
                                 sinks=policy.prefill_sinks, pool=policy.prefill_pool,
                                 recent_from=s.seq.num_tokens - policy.prefill_recent if policy.prefill_recent else None,
                                 scores=policy.kv_budget > 0 and s.seq.max_tokens > 0 and (s.sample or policy.evict_during_prefill),
                                 exits=seq_exits))
        window = max((s.seq.length.window for s in sched.scheduled if s.seq.prunes_length), default=1)
        return StepPruning(steps, self.present_layers, self.num_layers, window, self.device,
                           decode_pads=self.flop_counter.decode_pads, exit_probes=self.exit_probes,
                           final_norm=(self.model.norm.weight, self.model.norm.eps))

    def _kv_update(self, seq, result: SeqResult, positions: list[int]) -> KvUpdate:
        """Accumulate the step's key mass and pick the keys a KV budget evicts (the kept list's
        newest tokens are this step's)."""
        mass, evict = None, []
        if result.mass is not None:
            old = seq.kv_mass if seq.kv_mass is not None else torch.zeros(len(seq.kv_slots))
            mass = torch.cat([old, torch.zeros(len(positions) - len(old))]) + result.mass
            evict = select_evictions(mass, seq.length).tolist()
        return KvUpdate(self.num_layers, result.new_depths, result.num_dropped, mass, evict)
