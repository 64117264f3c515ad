"""Runs the engine requests behind one HTTP request, records their latencies, watches the client.

One HTTP request becomes one engine request per prompt (completions accept a list of prompts).
Each engine request runs in its own asyncio task that posts its newest output for the handler, so that
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
from collections.abc import AsyncIterator, Awaitable
from typing import TypeVar

from fastapi import Request

from trident.engine.outputs import RequestOutput
from trident.engine.sampling_params import SamplingParams
from trident.server.errors import engine_error
from trident.server.metrics import ServerMetrics

logger = logging.getLogger(__name__)
T = TypeVar("T")


class Generation:
    """The engine requests of one HTTP request, one per prompt, run side by side.

    Engine request ids are f"{request_id}-{prompt_index}". Outputs are cumulative RequestOutputs, so
    only the newest unread one of each prompt is kept: a client that stops reading a stream holds at
    most one output per prompt in server memory, however long the engine runs on.
    """

    def __init__(self, engine, metrics: ServerMetrics, request_id: str, prompts: list[list[int]],
                 params: SamplingParams, registry: set | None = None) -> None:
        self.engine = engine
        self.metrics = metrics
        self.request_id = request_id
        self.params = params
        self.finals: list[RequestOutput | None] = [None] * len(prompts)   # last output per prompt
        self._news: dict[int, RequestOutput] = {}               # prompt index -> newest unread output
        self._ends: dict[int, BaseException | None] = {}        # prompt index -> None (done) or its error
        self._changed = asyncio.Event()
        self._registry = registry if registry is not None else set()
        self._registry.add(self)
        self._tasks = [asyncio.create_task(self._run(i, ids)) for i, ids in enumerate(prompts)]

    def _put(self, index: int, output: RequestOutput) -> None:
        self._news.pop(index, None)      # re-inserted last: prompts take turns
        self._news[index] = output
        self._changed.set()

    def _end(self, index: int, error: BaseException | None) -> None:
        self._ends.setdefault(index, error)
        self._changed.set()

    async def _run(self, index: int, prompt_ids: list[int]) -> None:
        timer, last = self.metrics.request(self.params.n), None
        try:
            async for last in self.engine.generate(prompt_ids, self.params, f"{self.request_id}-{index}"):
                timer.output(last)
                self.finals[index] = last
                self._put(index, last)
            timer.finished(last)
            self._end(index, None)
        except asyncio.CancelledError:
            if last is None or not last.finished:
                timer.aborted(last)
            raise
        except Exception as exc:   # handed to the consumer, which answers it
            self._end(index, exc)

    async def _wait(self) -> None:
        self._changed.clear()
        await self._changed.wait()

    async def start(self) -> None:
        """Waits until every prompt has its first output; raises the APIError of one that failed."""
        while True:
            for error in self._ends.values():
                if error is not None:
                    raise engine_error(error)
            if all(final is not None or i in self._ends for i, final in enumerate(self.finals)):
                return
            await self._wait()

    async def outputs(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        """(prompt index, cumulative output) as they arrive, until every prompt has finished.
        A prompt's last output always comes before its end; its error, if any, is raised."""
        ended: set[int] = set()
        while len(ended) < len(self._tasks):
            if self._news:
                index = next(iter(self._news))
                yield index, self._news.pop(index)
                continue
            fresh = [i for i in self._ends if i not in ended]
            if not fresh:
                await self._wait()
                continue
            ended.add(fresh[0])
            if self._ends[fresh[0]] is not None:
                raise engine_error(self._ends[fresh[0]])

    async def collect(self) -> list[RequestOutput]:
        """Runs every prompt to the end; the final output of each, in prompt order."""
        async for _ in self.outputs():
            pass
        return list(self.finals)

    def fail(self, error: BaseException) -> None:
        """Ends every unfinished prompt with `error` (aborting it in the engine): its reader gets the
        error instead of further outputs. The shutdown drain uses it on what outlived the timeout."""
        for index in range(len(self._tasks)):
            if index not in self._ends:
                self._news.pop(index, None)
                self._end(index, error)
        self.close()

    def close(self) -> None:
        """Cancels the prompts still running, which aborts them in the engine. Idempotent."""
        self._registry.discard(self)
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
