"""Token sampling for a batch of sequences: penalties, min_tokens, temperature, top-k, top-p, min-p,
seeds, logprobs.

Greedy rows take a vectorized argmax. Random rows are sampled one by one so each seeded request
draws from its own generator: the same seed gives the same tokens whatever else is in the batch
(speculative decoding aside: engine/speculative.py).
Reported logprobs are those of the model's distribution (log-softmax of raw logits), as vLLM does.
"""
from __future__ import annotations

import torch

from trident.engine.outputs import TokenLogprobs
from trident.engine.sequence import Sequence


def top_logprobs(logprobs: torch.Tensor, chosen: torch.Tensor, k: int | list[int]) -> list[TokenLogprobs]:
    """Per row: {chosen token: logprob, then the row's k most likely tokens}. logprobs: [N, V];
    k: one count for every row, or one per row (a row's entries never depend on the others')."""
    ks = [k] * len(chosen) if isinstance(k, int) else k
    chosen_lp = logprobs.gather(1, chosen[:, None]).squeeze(1).tolist()
    result = [{c: lp} for c, lp in zip(chosen.tolist(), chosen_lp)]
    if max(ks, default=0) > 0:
        values, indices = logprobs.topk(max(ks), dim=-1)
        for row, ids, vals, row_k in zip(result, indices.tolist(), values.tolist(), ks):
            for i, v in zip(ids[:row_k], vals[:row_k]):
                row.setdefault(i, v)
    return result


def apply_penalties(logits: torch.Tensor, seqs: list[Sequence]) -> None:
    """In place, in vLLM's order: repetition (a logit of a token in the prompt or output is divided
    by the penalty when positive, multiplied when negative), then OpenAI's frequency and presence
    (logit -= frequency * count(token in output) + presence * [count > 0]); then, until a
    sequence has `min_tokens` outputs, its EOS and stop tokens are masked out."""
    for row, seq in enumerate(seqs):
        p = seq.params
        if p.repetition_penalty != 1.0:
            seen = torch.tensor(sorted(set(seq.token_ids)), device=logits.device)
            vals = logits[row, seen]
            # A penalty near 0 (the smallest float is a valid one) would divide a logit to +inf, and
            # softmax over +inf is NaN: the largest finite value ranks it first just the same.
            boosted = (vals / p.repetition_penalty).clamp(max=torch.finfo(logits.dtype).max)
            logits[row, seen] = torch.where(vals > 0, boosted, vals * p.repetition_penalty)
        if (p.presence_penalty or p.frequency_penalty) and seq.num_output_tokens:
            ids = torch.tensor(seq.output_token_ids, device=logits.device)
            counts = torch.bincount(ids, minlength=logits.shape[1]).to(logits.dtype)
            logits[row] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(logits.dtype)
        if seq.num_output_tokens < p.min_tokens and seq.min_tokens_banned:
            logits[row, seq.min_tokens_banned] = float("-inf")


def _filter(row: torch.Tensor, top_k: int, top_p: float, min_p: float) -> torch.Tensor:
    """Mask (to -inf) the tokens that top-k, top-p and min-p exclude from a [V] logit row."""
    if top_k > 0 and top_k < row.numel():
        kth = row.topk(top_k).values[-1]
        row = row.masked_fill(row < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = row.sort(descending=True)
        probs = sorted_logits.softmax(-1)
        # Drop a token when the tokens ranked above it already cover top_p; the top token always stays.
        drop = (probs.cumsum(-1) - probs) > top_p
        row = row.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    if min_p > 0.0:
        probs = row.softmax(-1)
        row = row.masked_fill(probs < min_p * probs.max(), float("-inf"))
    return row


def distribution(row: torch.Tensor, seq: Sequence) -> torch.Tensor:
    """[V] probabilities a sampled sequence draws from, given its (penalized) logit row:
    temperature, then top-k, top-p and min-p."""
    p = seq.params
    return _filter(row / p.temperature, p.top_k, p.top_p, p.min_p).softmax(-1)


def draw(probs: torch.Tensor, generator: torch.Generator | None) -> int:
    """One token id from [V] probabilities; seeded draws use a CPU generator, whatever the device."""
    if generator is not None:
        probs = probs.cpu()
    return int(torch.multinomial(probs, 1, generator=generator)[0])


def sample(logits: torch.Tensor, seqs: list[Sequence]) -> tuple[list[int], list[TokenLogprobs | None]]:
    """logits: float32 [N, V], one row per sequence. Returns the sampled ids and, per row, logprobs
    when that sequence asked for them (None otherwise)."""
    want_logprobs = [s.params.logprobs is not None for s in seqs]
    raw_logprobs = logits.log_softmax(-1) if any(want_logprobs) else None
    apply_penalties(logits, seqs)
    chosen = logits.argmax(-1)
    for row, seq in enumerate(seqs):
        p = seq.params
        if p.greedy:
            continue
        chosen[row] = draw(distribution(logits[row], seq), seq.generator)
    token_ids = chosen.tolist()
    logprobs: list[TokenLogprobs | None] = [None] * len(seqs)
    if raw_logprobs is not None:
        rows = top_logprobs(raw_logprobs, chosen, [s.params.logprobs or 0 for s in seqs])
        logprobs = [row if want else None for row, want in zip(rows, want_logprobs)]
    return token_ids, logprobs
