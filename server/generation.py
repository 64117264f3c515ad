"""Runs the engine requests behind one HTTP request, records their latencies, watches the client.

One HTTP request becomes one engine request per prompt (completions accept a list of prompts).
Each engine request runs in its own asyncio task feeding a shared queue, so that
- the handler can wait for the first output of every prompt before answering: what the engine
  raises on admission (bad input, queue full, engine dead) becomes an HTTP error, not a broken stream;
- closing the generation (client gone, error elsewhere) is a plain synchronous `task.cancel()`,
  safe in `finally` blocks under a cancelled anyio scope; the engine aborts a request whose
  consumer is cancelled.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import AsyncIterator, Awaitable
from typing import TypeVar

from fastapi import Request

from trident.engine.outputs import RequestOutput
from trident.engine.sampling_params import SamplingParams
from trident.server.errors import engine_error
from trident.server.metrics import ServerMetrics

logger = logging.getLogger(__name__)
T = TypeVar("T")

# What a prompt's task puts on the queue: an output, the exception that ended it, or None when done.
_Item = tuple[int, RequestOutput | BaseException | None]


class Generation:
    """The engine requests of one HTTP request, one per prompt, run side by side.

    Engine request ids are f"{request_id}-{prompt_index}". Outputs are cumulative RequestOutputs.
    """

    def __init__(self, engine, metrics: ServerMetrics, request_id: str, prompts: list[list[int]],
                 params: SamplingParams) -> None:
        self.engine = engine
        self.metrics = metrics
        self.request_id = request_id
        self.params = params
        self.finals: list[RequestOutput | None] = [None] * len(prompts)   # last output per prompt
        self._queue: asyncio.Queue[_Item] = asyncio.Queue()
        self._buffer: deque[_Item] = deque()   # items read by start(), replayed by outputs()
        self._tasks = [asyncio.create_task(self._run(i, ids)) for i, ids in enumerate(prompts)]

    async def _run(self, index: int, prompt_ids: list[int]) -> None:
        timer, last = self.metrics.request(self.params.n), None
        try:
            async for last in self.engine.generate(prompt_ids, self.params, f"{self.request_id}-{index}"):
                timer.output(last)
                self.finals[index] = last
                self._queue.put_nowait((index, last))
            timer.finished(last)
            self._queue.put_nowait((index, None))
        except asyncio.CancelledError:
            if last is None or not last.finished:
                timer.aborted(last)
            raise
        except Exception as exc:   # handed to the consumer, which answers it
            self._queue.put_nowait((index, exc))

    async def start(self) -> None:
        """Waits until every prompt has its first output; raises the APIError of one that failed."""
        started: set[int] = set()
        while len(started) < len(self._tasks):
            index, item = await self._queue.get()
            if isinstance(item, BaseException):
                raise engine_error(item)
            self._buffer.append((index, item))
            started.add(index)

    async def outputs(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        """(prompt index, cumulative output) as they arrive, until every prompt has finished."""
        num_open = len(self._tasks)
        while num_open:
            index, item = self._buffer.popleft() if self._buffer else await self._queue.get()
            if item is None:
                num_open -= 1
            elif isinstance(item, BaseException):
                raise engine_error(item)
            else:
                yield index, item

    async def collect(self) -> list[RequestOutput]:
        """Runs every prompt to the end; the final output of each, in prompt order."""
        async for _ in self.outputs():
            pass
        return list(self.finals)

    def close(self) -> None:
        """Cancels the prompts still running, which aborts them in the engine. Idempotent."""
        for task in self._tasks:
            if not task.done():
                task.cancel()

    async def aclose(self) -> None:
        """close() as a coroutine, for Starlette background tasks (sync ones run in a thread)."""
        self.close()


class ClientDisconnected(Exception):
    """The client closed the connection before the answer was ready."""


async def unless_disconnected(request: Request, awaitable: Awaitable[T], poll_s: float = 0.1) -> T:
    """Awaits `awaitable` while polling the client; cancels it and raises ClientDisconnected if it left."""
    task = asyncio.ensure_future(awaitable)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=poll_s)
            if done:
                return task.result()
            if await request.is_disconnected():
                logger.info("client disconnected; aborting its request")
                raise ClientDisconnected()
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
