"""One place for a step's dynamic pruning decisions.

The model runner builds a `StepPruning` once per step for the sequences that prune their length or
may exit early; the model asks it, layer by layer, for a key-mass buffer (`key_mass`) and lets it
act between layers (`after_layer`): rows that prefill pruning drops leave the batch there, decode
rows whose exit classifier fires leave it too, and the attention metadata of the deeper layers is
rebuilt from each sequence's kept keys (a sequence with no row left drops out of it). Each stretch
of layers that sees the same rows and keys is a segment with one metadata; the mass buffer of a
segment is shared by its layers (the kernels add to it in place), so scoring costs no Python per
layer.

Early exit (depth axis): at an exit layer, the classifier (`kernels.exit_classifier`: a probe on
the final-normed state) scores each decode row whose sequence has a threshold there; a row at or
above it leaves. The model then writes that token's K/V in every deeper layer from its exit state
(`take_exited`), and at the end the exited rows rejoin the others (`merge_exits`), so the LM head
reads their exit states.

Key depths: a key is present in the layers with index < its depth; a token dropped after layer m
has depth m + 1, an unpruned one the model's layer count. Old keys bring their depths from the
sequence (`Sequence.kv_depth`), this step's rows get theirs here.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from trident.engine.pruning.length import chunk_keep, select_rows
from trident.kernels.exit_classifier import exit_decision
from trident.kernels.metadata import AttentionMetadata


@dataclass
class SeqStep:
    """One sequence's part of a step. Keys are its kept keys followed by this step's new tokens."""

    slots: list[int]                 # [old kept + new] cache slots
    positions: list[int]             # their original positions (increasing)
    depths: list[int] | None         # [old kept] depths; None = every old key in every layer
    num_new: int                     # new tokens (rows) this step, the last entries of `slots`
    schedule: list[tuple[int, float]] = field(default_factory=list)   # prefill stages for these rows
    sinks: int = 0                   # positions below this always stay (prefill pruning)
    pool: int = 1                    # rows scored by the max mass of this many neighbours (prefill pruning)
    recent_from: int | None = None   # positions from this one on always stay (prefill pruning)
    scores: bool = False             # accumulate key mass for a KV budget
    exits: dict[int, float] | None = None   # early exit of a decode row: exit layer -> probe threshold

    @property
    def num_old(self) -> int:
        return len(self.slots) - self.num_new


@dataclass
class Segment:
    """Layers (original indices in [first, last]) that saw the same rows and keys, for accounting."""

    first: int
    last: int
    rows: list[int]                  # [S] rows of each sequence
    attended: list[float]            # [S] sum over those rows of the keys each attended
    scored_pairs: list[float]        # [S] (query, key) pairs one scored layer computed mass for
    scored_layers: int               # layers of the segment that computed key mass

    def accounting(self, s: int) -> tuple[int, int, int, float, float, int]:
        """Sequence s's part, as FlopCounter.step_segments takes it."""
        return self.first, self.last, self.rows[s], self.attended[s], self.scored_pairs[s], self.scored_layers


@dataclass
class SeqResult:
    new_depths: list[int] | None     # [num_new]; None = every new key in every layer
    num_dropped: int                 # rows dropped before the last layer
    mass: torch.Tensor | None        # [old + new] mass this step gave each key, summed over layers
    exit_layer: int | None = None    # the layer after which the decode row exited
    exit_checks: int = 0             # exit classifications its row went through


@dataclass
class ExitProbe:
    """An exit point's classifier: a linear probe on the final-normed state."""

    weight: torch.Tensor             # [hidden] float32
    bias: float
    temperature: float = 1.0         # an exited token's logits are divided by this


class StepPruning:
    def __init__(self, seqs: list[SeqStep], present_layers: list[int], full_depth: int, window: int,
                 device: torch.device, decode_pads: bool = False, exit_probes: dict[int, ExitProbe] | None = None,
                 final_norm: tuple[torch.Tensor, float] | None = None) -> None:
        self.seqs, self.full_depth, self.window, self.device = seqs, full_depth, window, device
        self.exit_probes, self.final_norm = exit_probes or {}, final_norm
        self.exit_layer: list[int | None] = [None] * len(seqs)
        self.exit_checks = [0] * len(seqs)
        self.exited: list[tuple[int, torch.Tensor]] = []       # (original row, exit state) of exited rows
        self._exited_now: tuple | None = None
        self.decode_pads = decode_pads              # CPU decode attends every sequence over the widest key list
        self.layers = present_layers
        self.keys = [list(range(len(s.slots))) for s in seqs]     # present keys (indices into s.slots)
        self.rows = [list(range(s.num_new)) for s in seqs]         # present new rows (indices into the new tokens)
        self.new_depths: list[list[int] | None] = [None] * len(seqs)
        # Boundaries: layers after which some sequence's rows or keys change.
        self.boundaries = {m for s in seqs for m, _ in s.schedule}
        self.boundaries |= {d - 1 for s in seqs for d in (s.depths or ()) if d < full_depth}
        self.boundaries |= {m for s in seqs for m in (s.exits or ())}
        selecting = {m for s in seqs if s.num_new > 1 for m, _ in s.schedule}
        self.mass_layers = set(present_layers) if any(s.scores for s in seqs) else selecting
        self.step_mass = [torch.zeros(len(s.slots)) if s.scores else None for s in seqs]
        self.mass_buf: torch.Tensor | None = None
        self.packed = torch.arange(sum(s.num_new for s in seqs))    # original row of each present row
        self.segments: list[Segment] = []
        self.segment_first = present_layers[0] if present_layers else 0
        self.segment_scored = 0
        self.meta = self._build_meta()
        self.first_meta = self.meta

    # ---------------------------------------------------------------- called by the model

    def key_mass(self, layer: int) -> torch.Tensor | None:
        """The [S, L] float32 buffer layer `layer` adds its key mass to, or None if unscored."""
        if layer not in self.mass_layers:
            return None
        if self.mass_buf is None:
            self.mass_buf = torch.zeros(self.meta.key_slots.shape, dtype=torch.float32, device=self.device)
        self.segment_scored += 1
        return self.mass_buf

    def after_layer(self, layer: int, x: torch.Tensor, angles: tuple[torch.Tensor, torch.Tensor]):
        """(x, angles, meta) for the layers after `layer`: dropped rows removed, keys re-listed."""
        if layer not in self.boundaries:
            return x, angles, self.meta
        mass = self._close_segment(layer)
        exiting = self._exits_at(layer, x)
        keep_local, offset, rows_changed, keys_changed = [], 0, False, False
        exit_local: list[int] = []
        for s, seq in enumerate(self.seqs):
            rows, stage = self.rows[s], dict(seq.schedule).get(layer)
            kept = list(range(len(rows)))
            if s in exiting:                        # the decode row leaves through the exit
                exit_local.append(offset)
                self.exit_layer[s], self.rows[s], kept, rows_changed = layer, [], [], True
            elif stage is not None and len(rows) > 1 and mass is not None:
                num_keys = len(self.keys[s])
                row_pos = torch.tensor([seq.positions[seq.num_old + r] for r in rows])
                kept = select_rows(mass[self.meta_index[s], num_keys - len(rows):num_keys].cpu(), row_pos,
                                   chunk_keep(stage, seq.num_new), seq.sinks, seq.pool, seq.recent_from).tolist()
                if len(kept) < len(rows):
                    depths = self.new_depths[s] or [self.full_depth] * seq.num_new
                    for r in set(rows) - {rows[i] for i in kept}:
                        depths[r] = layer + 1
                    self.new_depths[s] = depths
                    self.rows[s] = [rows[i] for i in kept]
                    rows_changed = True
            keep_local.extend(offset + i for i in kept)
            offset += len(rows)
            present = [k for k in self.keys[s] if self._depth(s, k) > layer + 1]
            if len(present) != len(self.keys[s]):
                self.keys[s], keys_changed = present, True
        if exit_local:
            index = torch.tensor(exit_local, dtype=torch.long, device=x.device)
            states = x.index_select(0, index)
            slots = torch.tensor([self.seqs[s].slots[-1] for s in sorted(exiting)], dtype=torch.long, device=x.device)
            self._exited_now = (states, (angles[0].index_select(0, index), angles[1].index_select(0, index)), slots)
            self.exited.extend(zip(self.packed[index.cpu()].tolist(), states))
        if rows_changed:
            index = torch.tensor(keep_local, dtype=torch.long, device=x.device)
            x, angles = x.index_select(0, index), (angles[0].index_select(0, index), angles[1].index_select(0, index))
            self.packed = self.packed[index.cpu()]
        if rows_changed or keys_changed:
            self.meta = self._build_meta()
        return x, angles, self.meta

    def take_exited(self) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor], torch.Tensor] | None:
        """(exit states [R, hidden], their rotary angles, their cache slots) of the rows that left
        after the last layer, once: the model fills their K/V in the deeper layers."""
        exited, self._exited_now = self._exited_now, None
        return exited

    def merge_exits(self, x: torch.Tensor) -> torch.Tensor:
        """The final rows with the exited rows' states put back, in packed order (`packed` follows)."""
        if not self.exited:
            return x
        rows = torch.cat([self.packed, torch.tensor([r for r, _ in self.exited], dtype=torch.long)])
        states = torch.cat([x, torch.stack([state for _, state in self.exited])])
        order = rows.argsort()
        self.packed = rows[order]
        return states.index_select(0, order.to(states.device))

    # ---------------------------------------------------------------- called by the runner

    def finish(self) -> list[SeqResult]:
        last = self.layers[-1] if self.layers else 0
        self._close_segment(last)
        return [SeqResult(self.new_depths[s], sum(d < self.full_depth for d in self.new_depths[s] or ()),
                          self.step_mass[s], self.exit_layer[s], self.exit_checks[s]) for s in range(len(self.seqs))]

    # ---------------------------------------------------------------- internals

    def _exits_at(self, layer: int, x: torch.Tensor) -> set[int]:
        """Sequences whose decode row exits after `layer`."""
        probe = self.exit_probes.get(layer)
        candidates, local, offset = [], [], 0
        for s, seq in enumerate(self.seqs):
            if probe is not None and seq.exits and layer in seq.exits and len(self.rows[s]) == 1:
                candidates.append(s)
                local.append(offset)
            offset += len(self.rows[s])
        if not candidates:
            return set()
        norm_weight, eps = self.final_norm
        hidden = x.index_select(0, torch.tensor(local, dtype=torch.long, device=x.device))
        scores = exit_decision(hidden, norm_weight, eps, 0.0, "probe", probe.weight, probe.bias).probe_score.tolist()
        for s in candidates:
            self.exit_checks[s] += 1
        return {s for s, score in zip(candidates, scores) if score >= self.seqs[s].exits[layer]}

    def _depth(self, s: int, key: int) -> int:
        seq = self.seqs[s]
        if key >= seq.num_old:
            depths = self.new_depths[s]
            return self.full_depth if depths is None else depths[key - seq.num_old]
        return self.full_depth if seq.depths is None else seq.depths[key]

    def _close_segment(self, layer: int) -> torch.Tensor | None:
        """Record the segment ending after `layer`, fold its mass into each scored key, and return
        the segment's mass buffer (None if no layer of it was scored)."""
        pairs = [min(self.window, len(r)) * len(k) if self.segment_scored else 0.0 for r, k in zip(self.rows, self.keys)]
        self.segments.append(Segment(self.segment_first, layer, [len(r) for r in self.rows], self._attended(),
                                     pairs, self.segment_scored))
        self.segment_first, self.segment_scored = layer + 1, 0
        buf, self.mass_buf = self.mass_buf, None
        if buf is not None:
            for s, step_mass in enumerate(self.step_mass):
                if step_mass is not None:
                    keys = self.keys[s]
                    step_mass.index_add_(0, torch.tensor(keys, dtype=torch.long),
                                         buf[self.meta_index[s], :len(keys)].cpu())
        return buf

    def _attended(self) -> list[float]:
        """Per sequence, the sum over present rows of the keys each attends (causal by position)."""
        meta, out = self.meta, []
        if meta.is_decode and self.decode_pads:
            return [float(meta.key_slots.shape[1]) if s in self.meta_index else 0.0 for s in range(len(self.seqs))]
        for s in range(len(self.seqs)):
            if s not in self.meta_index:
                out.append(0.0)
                continue
            lo, hi = meta.query_start_loc[self.meta_index[s]], meta.query_start_loc[self.meta_index[s] + 1]
            num_keys = len(self.keys[s])
            keys = meta.key_positions[self.meta_index[s], :num_keys]
            out.append(float(torch.searchsorted(keys, meta.query_positions[lo:hi], right=True).sum()))
        return out

    def _build_meta(self) -> AttentionMetadata:
        """Metadata of the sequences that still have rows (an exited one has none)."""
        active = [s for s in range(len(self.seqs)) if self.rows[s]]
        self.meta_index = {s: i for i, s in enumerate(active)}
        slots = [[self.seqs[s].slots[k] for k in self.keys[s]] for s in active]
        positions = [[self.seqs[s].positions[k] for k in self.keys[s]] for s in active]
        return AttentionMetadata.from_keys(slots, positions, [len(self.rows[s]) for s in active], self.device)
