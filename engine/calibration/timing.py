"""Timing engines against each other in one process.

`lockstep_speed` is the one way Trident times engines side by side: every engine steps in turn,
so a slow spell of the machine lands on all of them alike. The bench scripts use it, and
`trident plan` fits its cost model to the step times it measures.
"""
from __future__ import annotations

import statistics
import time

from trident.engine.llm import LLM
from trident.engine.pruning.length import RequestPruning
from trident.engine.sampling_params import SamplingParams


def batch_params(decode_tokens: int, pruning: RequestPruning | None = None) -> SamplingParams:
    """Greedy, EOS ignored: every sequence runs exactly `decode_tokens` decode steps after its first token."""
    return SamplingParams(max_tokens=decode_tokens + 1, temperature=0, ignore_eos=True, pruning=pruning)


def add_batch(llm: LLM, prompts: list[list[int]], decode_tokens: int, tag: str,
              pruning: RequestPruning | None = None) -> list:
    """Add `prompts` to an idle engine as one batch; returns their sequences, to step and watch."""
    engine = llm.engine
    if engine.has_unfinished_requests():
        raise ValueError("timing a batch needs an idle engine")
    for i, prompt in enumerate(prompts):
        engine.add_request(f"{tag}-{i}", prompt, batch_params(decode_tokens, pruning))
    return [seq for req in engine.requests.values() for seq in req.seqs]


def lockstep_speed(llms: list[LLM], prompts: list[list[list[int]]], decode_tokens: int,
                   first: int = 0, pruning: list[RequestPruning | None] | None = None,
                   warm_up: bool = True) -> list[tuple[float, float]]:
    """[(prefill tok/s, decode tok/s)] of each engine running its batch `prompts[i]`, after a
    warm-up run of the same shapes. The engines run side by side, one step each in turn (engine
    `first` opens the first turn, and each turn starts one engine later), so a slow spell of the
    machine lands on every engine's steps alike instead of on whichever ran while it lasted.
    Both phases are timed from each engine's own steps: prefill is the prompt tokens over the
    time of the steps until every sequence holds its first token; decode is the tokens emitted
    over the time of the next `decode_tokens` steps, in which every sequence of the batch
    decodes (a chunked prefill finishes its first prompts long before its last, so sequences
    that stopped after a fixed count would leave the window with fewer rows than the batch).
    The sequences may run to the engine's max_model_len; the batch is aborted once timed.
    Needs idle engines without prefix caching, so that the timed run recomputes its prompts.
    `pruning`: each engine's per-request pruning (the length axis), None for none."""
    for llm in llms:
        if llm.engine.config.cache.enable_prefix_caching:
            raise ValueError("timing needs an engine without prefix caching")
        if llm.engine.has_unfinished_requests():        # the warm-up would run them to the end
            raise ValueError("timing needs an idle engine")
    pruning = pruning or [None] * len(llms)
    for llm, batch, policy in zip(llms, prompts, pruning):
        if warm_up:
            llm.generate(batch, batch_params(decode_tokens, policy))
    room = [llm.engine.config.scheduler.max_model_len - max(map(len, batch)) for llm, batch in zip(llms, prompts)]
    seqs = [add_batch(llm, batch, r - 1, "speed", policy) for llm, batch, r, policy in zip(llms, prompts, room, pruning)]
    n = len(llms)
    prefill_s, decode_s = [0.0] * n, [0.0] * n
    emitted_before: list[int | None] = [None] * n     # tokens out when the prefill phase ended
    decode_steps = [0] * n
    preemptions = [llm.engine.scheduler.num_preemptions for llm in llms]
    turn = first
    try:
        while any(steps < decode_tokens for steps in decode_steps):
            for i in [(turn + k) % n for k in range(n)]:
                if decode_steps[i] >= decode_tokens:
                    continue
                start = time.perf_counter()
                llms[i].engine.step()
                elapsed = time.perf_counter() - start
                if any(seq.is_finished for seq in seqs[i]):
                    raise ValueError(f"a sequence of engine {i} finished before its {decode_tokens} decode steps "
                                     f"were timed: raise its max_model_len")
                if emitted_before[i] is not None:
                    if llms[i].engine.scheduler.num_preemptions != preemptions[i]:
                        raise ValueError(f"engine {i} preempted a sequence while its decode was timed: "
                                         f"give it more KV blocks")
                    decode_s[i] += elapsed
                    decode_steps[i] += 1
                else:
                    prefill_s[i] += elapsed
                    if all(seq.num_output_tokens > 0 for seq in seqs[i]):
                        emitted_before[i] = sum(seq.num_output_tokens for seq in seqs[i])
                        preemptions[i] = llms[i].engine.scheduler.num_preemptions
            turn += 1
    finally:
        for llm in llms:
            for request_id in list(llm.engine.requests):
                llm.engine.abort_request(request_id)
    return [(sum(map(len, batch)) / prefill_s[i],
             (sum(seq.num_output_tokens for seq in seqs[i]) - emitted_before[i]) / decode_s[i])
            for i, batch in enumerate(prompts)]


def paired_ratio(rounds: list[float], dense_rounds: list[float]) -> float:
    """Median over rounds of a plan's figure over dense's figure of the same round."""
    return statistics.median(a / b for a, b in zip(rounds, dense_rounds, strict=True))
