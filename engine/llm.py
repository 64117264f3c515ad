"""Offline (in-process) use of the engine: `LLM(EngineConfig(model=...)).generate(prompts, params)`."""
from __future__ import annotations

import itertools

from trident.engine.config import EngineConfig
from trident.engine.llm_engine import LLMEngine
from trident.engine.outputs import RequestOutput
from trident.engine.sampling_params import SamplingParams


class LLM:
    def __init__(self, config: EngineConfig) -> None:
        self.engine = LLMEngine(config)
        self.tokenizer = self.engine.tokenizer
        self._ids = itertools.count()

    def generate(self, prompts: list[str] | list[list[int]],
                 params: SamplingParams | list[SamplingParams]) -> list[RequestOutput]:
        """Run all prompts to completion (continuously batched); outputs in prompt order. `params`
        is shared by every prompt, or a list with one entry per prompt."""
        per_prompt = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
        if len(per_prompt) != len(prompts):
            raise ValueError(f"got {len(per_prompt)} sampling params for {len(prompts)} prompts")
        encoded = [self.tokenizer.encode(p) if isinstance(p, str) else list(p) for p in prompts]
        for ids, prompt_params in zip(encoded, per_prompt):     # every prompt checked before any is queued
            self.engine.validate(ids, prompt_params)
        order = []
        for ids, prompt_params in zip(encoded, per_prompt):
            request_id = f"offline-{next(self._ids)}"
            self.engine.add_request(request_id, ids, prompt_params)
            order.append(request_id)
        done: dict[str, RequestOutput] = {}
        while self.engine.has_unfinished_requests():
            for out in self.engine.step():
                if out.finished:
                    done[out.request_id] = out
        return [done[r] for r in order]

    def prompt_logprobs(self, token_ids: list[int]) -> list[float]:
        """Log-probability of each token after the first given its prefix (for perplexity)."""
        out = self.generate([token_ids], SamplingParams(max_tokens=0, prompt_logprobs=0))[0]
        return [lp[t] for t, lp in zip(token_ids[1:], out.prompt_logprobs[1:])]
