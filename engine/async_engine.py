"""Asyncio front of the engine for the HTTP server.

The event loop owns all engine state changes: new requests and aborts are staged and applied
between steps, while `LLMEngine.step` runs in one worker thread, so the loop stays responsive
during a forward pass and nothing touches the engine concurrently.
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

from trident.engine.config import EngineConfig
from trident.engine.llm_engine import LLMEngine
from trident.engine.outputs import RequestOutput
from trident.engine.sampling_params import SamplingParams

log = logging.getLogger(__name__)


class QueueFullError(RuntimeError):
    """The waiting queue is at `max_waiting`; the server answers 429."""


class EngineDeadError(RuntimeError):
    """The engine is not loaded yet or failed; the server answers 503."""


class AsyncEngine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.engine: LLMEngine | None = None
        self.errored = False
        self.error: BaseException | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="trident-step")
        self._queues: dict[str, asyncio.Queue] = {}
        self._pending_adds: list[tuple[str, list[int], SamplingParams]] = []
        self._pending_aborts: set[str] = set()
        self._wakeup: asyncio.Event | None = None
        self._loop_task: asyncio.Task | None = None

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Load the model in the worker thread, then start the step loop. Raises on load failure."""
        loop = asyncio.get_running_loop()
        self._wakeup = asyncio.Event()
        try:
            self.engine = await loop.run_in_executor(self._executor, LLMEngine, self.config)
        except BaseException as e:
            self.errored, self.error = True, e
            raise
        self._loop_task = asyncio.create_task(self._run(), name="trident-engine-loop")

    async def shutdown(self) -> None:
        if self._loop_task is not None:
            self._loop_task.cancel()
            try:
                await self._loop_task
            except (asyncio.CancelledError, Exception):
                pass
        self._executor.shutdown(wait=False, cancel_futures=True)

    @property
    def ready(self) -> bool:
        return self.engine is not None and not self.errored

    @property
    def model_name(self) -> str:
        return self.engine.model_name if self.engine else self.config.model

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def num_waiting(self) -> int:
        """Requests not yet running: the engine's waiting ones plus those staged for the next step."""
        return self.engine.num_waiting + len(self._pending_adds)

    # ------------------------------------------------------------------ requests

    async def generate(self, prompt_token_ids: list[int], params: SamplingParams,
                       request_id: str) -> AsyncIterator[RequestOutput]:
        """Yield cumulative outputs until the request finishes. Leaving early aborts it."""
        if not self.ready:
            raise EngineDeadError("the engine is not ready" if not self.errored else f"the engine failed: {self.error}")
        self.engine.validate(prompt_token_ids, params)           # ValueError -> 400
        if request_id in self._queues:
            raise ValueError(f"request id {request_id!r} is already in use")
        if self.num_waiting >= self.config.scheduler.max_waiting:
            raise QueueFullError(f"the server is at capacity ({self.config.scheduler.max_waiting} waiting requests)")
        queue: asyncio.Queue = asyncio.Queue()
        self._queues[request_id] = queue
        self._pending_adds.append((request_id, prompt_token_ids, params))
        self._wakeup.set()
        finished = False
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            self._queues.pop(request_id, None)
            if not finished:
                self._abort_later(request_id)

    def _abort_later(self, request_id: str) -> None:
        self._pending_aborts.add(request_id)
        if self._wakeup is not None:
            self._wakeup.set()

    # ------------------------------------------------------------------ loop

    def _apply_pending(self) -> None:
        # Aborts first, so an id whose old request was just abandoned can be reused at once.
        aborts, self._pending_aborts = self._pending_aborts, set()
        for request_id in aborts:
            self.engine.abort_request(request_id)
        adds, self._pending_adds = self._pending_adds, []
        for request_id, ids, params in adds:
            if request_id not in self._queues:      # its consumer left before it started
                continue
            try:
                self.engine.add_request(request_id, ids, params)
            except ValueError as e:
                self._deliver(request_id, e)

    def _deliver(self, request_id: str, item) -> None:
        queue = self._queues.get(request_id)
        if queue is not None:
            queue.put_nowait(item)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                self._apply_pending()
                if not self.engine.has_unfinished_requests():
                    self._wakeup.clear()
                    if not self._pending_adds and not self._pending_aborts:
                        await self._wakeup.wait()
                    continue
                outputs = await loop.run_in_executor(self._executor, self.engine.step)
                for out in outputs:
                    self._deliver(out.request_id, out)
        except asyncio.CancelledError:
            raise
        except BaseException as e:   # a failed step leaves the engine in an unknown state: stop serving
            log.exception("engine step failed")
            self.errored, self.error = True, e
            for queue in self._queues.values():
                queue.put_nowait(EngineDeadError(f"the engine failed: {e}"))
