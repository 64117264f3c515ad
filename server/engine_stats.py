"""Feeds the engine's figures into ServerMetrics after every engine step, and at scrape time.

The engine keeps cumulative totals (FLOPs executed and dense, saved per axis, busy and saved
seconds, preemptions); this observer adds what each step added to Prometheus counters, so the
values live in the registry (or, with several workers, in each process's multiprocess file) and
no scrape resets anything. Per-request engine timings follow vLLM's definitions: queue time is
engine arrival to first scheduled step, prefill time first scheduled step to first token, decode
time first token to last token, all on the monotonic clock.

The engine has no stats hook yet, so the observer wraps two methods of the engine instance it
serves: `ModelRunner.execute(SchedulerOutput)` (which requests a step schedules and how many
tokens it feeds the model) and `LLMEngine.step() -> list[RequestOutput]` (what came out). Both run
in the engine's worker thread; the wrappers only read. When the engine gets a stats hook of its
own (as vLLM's SchedulerStats and IterationStats), this observer becomes its consumer.

Counters of dynamic pruning are read from the engine's `total_flops` (a FlopCount):
`prompt_tokens_dropped`, `kv_slots_evicted`, `kv_bytes_saved` (length axis), `draft_tokens`,
`accepted_tokens`, `verify_steps` and `draft_flops` (speculative decoding, depth axis). Early
exit's `exit_layer_tokens` ({layer: tokens that exited after it}) is read defensively: the engine
does not count it yet, so it stays at zero.
"""
from __future__ import annotations

import functools
import time

from trident.server.metrics import AXES, ServerMetrics, plan_labels

# FlopCount fields of dynamic pruning -> (series attribute, axis).
_DYNAMIC_COUNTERS = {
    "prompt_tokens_dropped": ("prompt_tokens_dropped", "length"),
    "kv_slots_evicted": ("kv_slots_evicted", "length"),
    "kv_bytes_saved": ("kv_bytes_saved", "length"),
    "draft_tokens": ("draft_tokens_proposed", "depth"),
    "accepted_tokens": ("draft_tokens_accepted", "depth"),
    "verify_steps": ("speculative_verify_steps", "depth"),
    "draft_flops": ("draft_flops", "depth"),
}


class EngineStats:
    """Observes one LLMEngine (the loaded `AsyncEngine.engine`) for `metrics`."""

    def __init__(self, metrics: ServerMetrics, async_engine) -> None:
        self.metrics = metrics
        self.async_engine = async_engine
        self.engine = async_engine.engine
        self._totals: dict[tuple[str, str], float] = {}    # (series, axis) -> engine total already added
        self._exit_counts: dict[int, int] = {}              # layer -> exited tokens already observed
        self._scheduled: dict[str, float] = {}              # request id -> first scheduled
        self._first_token: dict[str, float] = {}            # request id -> first output token

    @classmethod
    def attach(cls, metrics: ServerMetrics, async_engine, model_name: str) -> "EngineStats":
        """Binds `metrics` to the loaded engine's model and starts observing its steps."""
        engine = async_engine.engine
        metrics.bind(model_name, engine.max_model_len, engine.model_config.num_layers,
                     plan_labels(engine.plan, engine.config.plan or (engine.config.plans or [None])[0]),
                     {v.name: v.weight_bytes for v in engine.variants})
        stats = cls(metrics, async_engine)
        stats._wrap()
        stats.refresh()
        metrics.scrape_hooks.append(stats.refresh)
        return stats

    def _wrap(self) -> None:
        runner, engine = self.engine.runner, self.engine
        execute, step = runner.execute, engine.step

        @functools.wraps(execute)
        def observed_execute(sched):
            now = time.monotonic()
            for s in sched.scheduled:
                seq = s.seq
                if seq.request_id not in self._scheduled:
                    self._scheduled[seq.request_id] = now
                    arrival = getattr(seq, "arrival_time", now)
                    self.metrics.request_queue_time.labels(self.metrics.model).observe(max(0.0, now - arrival))
            result = execute(sched)
            num_tokens = sum(s.num_new_tokens + len(s.draft_slots) for s in sched.scheduled)  # what entered the model
            self.metrics.iteration_tokens.labels(self.metrics.model).observe(num_tokens)
            return result

        @functools.wraps(step)
        def observed_step():
            outputs = step()
            self._after_step(outputs)
            return outputs

        runner.execute = observed_execute
        engine.step = observed_step

    # ------------------------------------------------------------------ per step

    def _after_step(self, outputs) -> None:
        m, model, now = self.metrics, self.metrics.model, time.monotonic()
        for out in outputs:
            rid = out.request_id
            scheduled = self._scheduled.get(rid, now)
            if rid not in self._first_token and (out.num_output_tokens or out.finished):
                self._first_token[rid] = now
                m.request_prefill_time.labels(model).observe(now - scheduled)
            if out.finished:
                m.request_decode_time.labels(model).observe(now - self._first_token.pop(rid, now))
                self._scheduled.pop(rid, None)
        # Requests aborted mid-way never finish: forget them once the engine has.
        for timings in (self._scheduled, self._first_token):
            for rid in [rid for rid in timings if rid not in self.engine.requests]:
                del timings[rid]
        self._add_totals()
        self.refresh()

    def _add(self, series: str, axis: str | None, total: float) -> None:
        """Adds to a counter what the engine's cumulative `total` gained since the last step."""
        key = (series, axis or "")
        delta = total - self._totals.get(key, 0.0)
        if delta > 0:
            labels = (self.metrics.model,) if axis is None else (self.metrics.model, axis)
            getattr(self.metrics, series).labels(*labels).inc(delta)
            self._totals[key] = total

    def _add_totals(self) -> None:
        engine = self.engine
        flops = engine.total_flops
        self._add("flops_executed", None, flops.executed)
        self._add("flops_dense", None, flops.dense)
        for axis in AXES:
            self._add("flops_saved", axis, flops.saved.get(axis, 0.0))
            self._add("seconds_saved", axis, engine.saved_seconds.get(axis, 0.0))
        self._add("engine_busy_seconds", None, engine.busy_seconds)
        self._add("num_preemptions", None, engine.scheduler.num_preemptions)
        for field, (series, axis) in _DYNAMIC_COUNTERS.items():
            self._add(series, axis, getattr(flops, field, 0))
        exits = self.metrics.exit_layer.labels(self.metrics.model, "depth")
        for layer, count in dict(getattr(flops, "exit_layer_tokens", None) or {}).items():
            for _ in range(count - self._exit_counts.get(layer, 0)):
                exits.observe(layer)
            self._exit_counts[layer] = count

    def refresh(self) -> None:
        """Sets the scheduler gauges from the engine's state (after each step, and at scrape time)."""
        m, model, engine = self.metrics, self.metrics.model, self.engine
        # tuple() copies in one C call, so the step thread cannot change the list midway.
        running = {seq.request_id for seq in tuple(engine.scheduler.running)}
        m.num_requests_running.labels(model).set(len(running))
        m.num_requests_waiting.labels(model).set(self.async_engine.num_waiting)
        bm = engine.block_manager
        m.kv_cache_usage_perc.labels(model).set(1.0 - bm.num_free_blocks / bm.num_blocks)
