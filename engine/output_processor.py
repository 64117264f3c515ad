"""From a step's sampled tokens to RequestOutputs: stop tokens, EOS and stop strings, incremental
detokenizing, length limits, and the cumulative output of each request. The engine core
(llm_engine.py) schedules, runs the step and hands the result here."""
from __future__ import annotations

from dataclasses import dataclass

from trident.engine.model_runner import RunnerOutput
from trident.engine.outputs import CompletionOutput, RequestOutput
from trident.engine.pruning.accounting import FlopCount
from trident.engine.scheduler import Scheduler, SchedulerOutput
from trident.engine.sequence import Sequence
from trident.engine.tokenizer import IncrementalDetokenizer, Tokenizer


@dataclass
class Request:
    request_id: str
    prompt_token_ids: list[int]
    seqs: list[Sequence]
    detokenizers: list[IncrementalDetokenizer]
    flops: FlopCount

    @property
    def finished(self) -> bool:
        return all(s.is_finished for s in self.seqs)


class OutputProcessor:
    def __init__(self, scheduler: Scheduler, tokenizer: Tokenizer, max_model_len: int, plan_loaded: bool) -> None:
        self.scheduler = scheduler
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.plan_loaded = plan_loaded           # every output then reports its pruning

    def process(self, sched: SchedulerOutput, result: RunnerOutput, requests: dict[str, Request]) -> list[Request]:
        """Apply a step's tokens and prompt logprobs to their requests; the requests with news."""
        touched: dict[str, Request] = {}
        for s in sched.scheduled:
            seq = s.seq
            req = requests[seq.request_id]
            req.flops.add(result.flops[seq.seq_id])
            if seq.seq_id in result.prompt_logprobs:
                seq.prompt_logprobs.extend(result.prompt_logprobs[seq.seq_id])
            if s.sample and seq.max_tokens == 0:
                self.scheduler.finish(seq, "length")
            elif seq.seq_id in result.sampled:
                # Several tokens when drafts were accepted; a stop among them ends the sequence there.
                logprobs = result.logprobs.get(seq.seq_id)
                for j, token in enumerate(result.sampled[seq.seq_id]):
                    self.append_token(req, seq, token, logprobs[j] if logprobs is not None else None)
                    if seq.is_finished:
                        break
            else:
                continue                                  # a prefill chunk: nothing to report yet
            touched[req.request_id] = req
        return list(touched.values())

    def append_token(self, req: Request, seq: Sequence, token: int, logprobs) -> None:
        p = seq.params
        seq.token_ids.append(token)
        if logprobs is not None:
            seq.logprobs.append(logprobs)
        # Stops wait for min_tokens outputs (the sampler masks stop tokens and EOS until then).
        may_stop = seq.num_output_tokens >= p.min_tokens
        # A stop token stays in token_ids (it was generated) but never reaches the text.
        if may_stop and token in p.stop_token_ids:
            return self.scheduler.finish(seq, "stop", token)
        if may_stop and not p.ignore_eos and token in self.tokenizer.eos_token_ids:
            return self.scheduler.finish(seq, "stop")           # stop_reason None for EOS, as vLLM

        old_len = len(seq.text)
        seq.text += req.detokenizers[seq.index].add(token)
        if p.stop and may_stop:
            # A new match must end in the new text, so it starts at most (longest stop - 1) before it.
            start = max(0, old_len - p.max_stop_len + 1)
            hits = [(seq.text.find(s, start), s) for s in p.stop]
            hits = [(i, s) for i, s in hits if i >= 0]
            if hits:
                i, s = min(hits)
                seq.text = seq.text[:i + len(s)] if p.include_stop_str_in_output else seq.text[:i]
                return self.scheduler.finish(seq, "stop", s)
        if seq.num_output_tokens >= seq.max_tokens or seq.num_tokens >= self.max_model_len:
            self.scheduler.finish(seq, "length")

    def make_output(self, req: Request) -> RequestOutput:
        outputs = []
        for seq in req.seqs:
            text = seq.text
            if not seq.is_finished and seq.params.stop:
                # Hold back a tail that could still become a stop string, so a stream never shows it.
                text = text[:max(0, len(text) - (seq.params.max_stop_len - 1))]
            outputs.append(CompletionOutput(
                index=seq.index, text=text, token_ids=seq.output_token_ids,
                logprobs=list(seq.logprobs) if seq.params.logprobs is not None else None,   # a snapshot
                finish_reason=seq.finish_reason, stop_reason=seq.stop_reason,
            ))
        first = req.seqs[0]
        return RequestOutput(
            request_id=req.request_id, prompt_token_ids=req.prompt_token_ids, outputs=outputs,
            finished=req.finished,
            prompt_logprobs=list(first.prompt_logprobs) if first.params.prompt_logprobs is not None else None,
            pruning=req.flops.summary() if self.plan_loaded or first.prunes_length or first.num_draft_tokens
            else {},
        )
