"""The length axis's decisions: which prefill rows go on to deeper layers, which keys a KV budget
evicts, and what a request's `pruning` object turns into.

Both decisions rank keys by attention mass: the probability the last `window` queries of a step
give each key, summed over heads (and, for eviction, over layers and steps, as H2O does). The
kernels compute that mass next to the attention output (`paged_attention(..., key_mass=...)`).

Prefill (LazyLLM / SnapKV style), per chunk: after layer m of the schedule, a sequence's rows in
this step keep ceil(fraction * rows of the chunk); the rest leave the batch, write no K/V in deeper
layers, and are never attended there. Each chunk of a chunked prefill decides for its own rows
with its own last queries, so the saving does not depend on the chunk size; earlier chunks'
decisions stand. A step that holds the whole prompt scores it with the prompt's own last queries,
which keeps quality best (bench/results/length-float32/). The last row (it samples), the first
`prefill_sinks` positions and the prompt's last `prefill_recent` positions always stay.
Rows are ranked by the mass max-pooled over `prefill_pool` neighbouring rows, which keeps spans
instead of isolated tokens (bench/results/length-prefill-float32/ measures it against no pooling).

Decode (SnapKV, then H2O + StreamingLLM): a sequence with a budget prefills its whole prompt,
every chunk attending to every earlier prompt key; the step that finishes the prompt compresses
it once (SnapKV), scored by the prompt's last `window` queries. From then on, after every step it
keeps its first `decode_sinks` keys, its last `decode_recent` keys and the `decode_heavy` keys of
highest mass accumulated over the decode steps (H2O) among the rest, max-pooled over `kv_pool`
neighbouring keys; the others are evicted in every layer (one kept set for all layers). Chunks
before the last are not scored. A plan with `evict_during_prefill` evicts after every chunk
instead (scored by each chunk's last queries), which bounds a long prompt's blocks while it
prefills, at a quality cost: later chunks see only the budget of the earlier ones. A per-layer or
per-KV-head budget (PyramidKV, Ada-KV) would need a kept-slot list per layer (or head) in the
sequence and one metadata per layer; this contract keeps one list and per-key depths.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from trident.engine.pruning.plan import LengthPolicy, check_length_policy

DENSE_PROFILE = "dense"
LOSSLESS_PROFILE = "lossless"     # no lossy dynamic pruning; speculative decoding on (engine.speculative)
MIN_KV_BUDGET = 8
DEFAULT_SINKS = 4


@dataclass(frozen=True)
class RequestPruning:
    """The `pruning` object of a completion request, already type-checked at the HTTP edge."""

    profile: str | None = None                    # "dense": no dynamic pruning; "lossless": speculation only;
    #                                               the served plan's name: its policy
    kv_budget: int | None = None                  # keys kept per sequence in decode (sinks + recent + heavy)
    prefill_keep: float | list[tuple[int, float]] | None = None   # a fraction after the default layer, or a schedule
    speculative: bool | None = None               # self-speculative decoding on/off (None: the server's default)
    num_draft_tokens: int | None = None           # tokens drafted per step (None: the server's default)
    early_exit: bool | None = None                # the plan's early exits on/off (None: on where the plan has them)
    exit_threshold: float | None = None           # one probe threshold for every exit point (None: the plan's)


def default_prefill_layer(num_layers: int) -> int:
    """Where `{"prefill_keep": f}` prunes: after the first third of the layers, whose attention
    already tells which tokens matter (bench/length_sweep.py measures the choice)."""
    return max(0, num_layers // 3 - 1)


def budget_policy(budget: int, base: LengthPolicy) -> LengthPolicy:
    """A KV budget split as H2O does: a few sinks, then half recent and half heavy hitters."""
    if budget < MIN_KV_BUDGET:
        raise ValueError(f"pruning.kv_budget must be at least {MIN_KV_BUDGET}, got {budget}")
    sinks = min(DEFAULT_SINKS, budget // 4)
    recent = (budget - sinks + 1) // 2
    return replace(base, decode_sinks=sinks, decode_recent=recent, decode_heavy=budget - sinks - recent)


def resolve_request(request: RequestPruning | None, served: LengthPolicy, served_name: str | None,
                    num_layers: int, kept_layers: list[bool]) -> LengthPolicy:
    """The policy one request runs: the served plan's, changed by the request's `pruning` object.
    ValueError (a 400 at the edge) for what cannot run on this model."""
    if request is None:
        return served
    policy = served
    if request.profile is not None:
        if request.profile in (DENSE_PROFILE, LOSSLESS_PROFILE):
            policy = LengthPolicy()
        elif request.profile != served_name:
            choices = [DENSE_PROFILE, LOSSLESS_PROFILE] + \
                ([served_name] if served_name and served_name != DENSE_PROFILE else [])
            raise ValueError(f"pruning.profile {request.profile!r} is not served here: per request, a profile "
                             f"chooses only the dynamic pruning of the loaded plan; choose one of {choices} "
                             f"(start the server with --plan {request.profile} to serve it)")
    if request.profile == LOSSLESS_PROFILE and (request.kv_budget is not None or request.prefill_keep is not None):
        raise ValueError("pruning.profile 'lossless' runs no lossy pruning: drop kv_budget and prefill_keep")
    if request.kv_budget is not None:
        policy = budget_policy(request.kv_budget, policy)
    if request.prefill_keep is not None:
        keep = request.prefill_keep
        schedule = [(default_prefill_layer(num_layers), keep)] if isinstance(keep, (int, float)) else list(keep)
        policy = replace(policy, prefill_keep=[(int(m), float(f)) for m, f in schedule])
    try:
        check_length_policy(policy, num_layers, kept_layers)
    except ValueError as e:
        raise ValueError(f"pruning: {e}") from None
    return policy


def pooled(mass: torch.Tensor, pool: int) -> torch.Tensor:
    """float32 scores [n] of `mass` [n] in position order: each entry's largest mass among the odd
    `pool` entries centred on it (itself when pool is 1)."""
    score = mass.float()
    if pool > 1:
        score = F.max_pool1d(score[None, None], pool, stride=1, padding=pool // 2)[0, 0]
    return score


def select_rows(mass: torch.Tensor, positions: torch.Tensor, keep: int, sinks: int, pool: int = 1,
                recent_from: int | None = None) -> torch.Tensor:
    """Indices (increasing) of the `keep` rows of highest mass among `positions` [n]; the last row,
    positions < sinks and positions >= recent_from are always among them (so more than `keep`
    may stay). With an odd
    `pool` > 1, a row's score is the largest mass among the `pool` rows centred on it (SnapKV's
    clustering), so the rows around a heavy one stay with it and a kept fact keeps its context."""
    forced = positions < sinks
    if recent_from is not None:
        forced |= positions >= recent_from
    forced[-1] = True
    keep = min(len(positions), max(keep, int(forced.sum())))
    score = pooled(mass, pool).masked_fill(forced, math.inf)
    return score.topk(keep, sorted=False).indices.sort().values


def select_evictions(mass: torch.Tensor, policy: LengthPolicy) -> torch.Tensor:
    """Indices (increasing) of the keys to evict from a sequence holding len(mass) keys, in
    position order, with accumulated attention `mass`; empty while within the budget."""
    num_keys = len(mass)
    if not policy.kv_budget or num_keys <= policy.kv_budget:
        return torch.zeros(0, dtype=torch.long)
    middle = torch.arange(policy.decode_sinks, num_keys - policy.decode_recent)
    score = pooled(mass, policy.kv_pool)[middle]
    heavy = score.topk(policy.decode_heavy, sorted=False).indices if policy.decode_heavy else middle[:0]
    evict = torch.ones(len(middle), dtype=torch.bool)
    evict[heavy] = False
    return middle[evict]


def chunk_keep(fraction: float, num_rows: int) -> int:
    """Rows of an n-row chunk that a prefill_keep stage keeps."""
    return max(1, math.ceil(fraction * num_rows))
