"""Drives the LLMEngine (which is not thread-safe) from one dedicated thread beside the asyncio event loop.

The event loop sends commands (add, abort, stop) through a queue. The engine thread applies them between steps,
steps while there is work, and hands each step's outputs back to the loop in a single call_soon_threadsafe.
There they are routed to the RequestGroup that waits for them. Only the engine thread touches the LLMEngine,
and only the event loop touches the groups, so neither side needs a lock.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Self

from mixquant.engine.llm_engine import LLMEngine
from mixquant.outputs import RequestOutput
from mixquant.sampling_params import SamplingParams
from mixquant.server.metrics import RequestTimeline, ServerMetrics

logger = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The engine thread has stopped (it failed, or the server is shutting down): no request can be served."""


class EngineOverloadedError(RuntimeError):
    """More requests are pending than the server is configured to hold."""


@dataclass
class _AddRequests:
    request_ids: list[str]
    prompts: list[list[int]]
    params: SamplingParams
    accepted: concurrent.futures.Future  # resolved once the engine took all of them, or failed on the first bad one


@dataclass
class _Abort:
    request_ids: list[str]


class _Stop:
    pass


class RequestGroup:
    """The engine requests behind one HTTP request (one per prompt), read as a single stream of outputs.

    Outputs are cumulative, so only the newest one per request is kept until the reader takes it: a slow reader
    skips intermediate states instead of queueing them. Used as a context manager, it aborts whatever has not
    finished when the reader leaves (an error, a cancelled task, a client that went away).
    """

    def __init__(self, owner: AsyncEngine, request_ids: list[str], arrival: float):
        self.request_ids = request_ids
        self._owner = owner
        self._index = {request_id: i for i, request_id in enumerate(request_ids)}
        self._unfinished = set(request_ids)
        self._newest: dict[str, RequestOutput] = {}
        self._wakeup = asyncio.Event()
        self._error: BaseException | None = None
        self.timelines = {request_id: RequestTimeline(arrival) for request_id in request_ids}
        self.aborted = False

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info):
        self.abort()

    async def __aiter__(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        """(prompt index, newest output of that prompt's request) until every request has finished."""
        while True:
            if self._newest:
                ready, self._newest = self._newest, {}
                for request_id, output in ready.items():
                    yield self._index[request_id], output
                continue
            if self._error is not None:
                raise self._error
            if not self._unfinished:
                return
            self._wakeup.clear()
            await self._wakeup.wait()

    def abort(self):
        """Stops the unfinished requests and frees their KV blocks; a no-op once all have finished."""
        if not self._unfinished:
            return
        self.aborted = True
        self._owner._abort(list(self._unfinished))
        self._unfinished.clear()
        self._wakeup.set()

    def _deliver(self, output: RequestOutput):
        if output.request_id not in self._unfinished:
            return  # aborted meanwhile: nobody reads it any more
        self._newest.pop(output.request_id, None)  # re-insert so that readers see outputs in arrival order
        self._newest[output.request_id] = output
        if output.finished:
            self._unfinished.discard(output.request_id)
        self._wakeup.set()

    def _fail(self, error: BaseException):
        self._error = error
        self._unfinished.clear()
        self._wakeup.set()


class AsyncEngine:
    def __init__(self, engine: LLMEngine, metrics: ServerMetrics, max_pending_requests: int):
        self.engine = engine
        self.metrics = metrics
        self.max_pending_requests = max_pending_requests
        self.stats: dict = engine.stats()  # a snapshot the engine thread replaces after every change
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._routes: dict[str, RequestGroup] = {}  # unfinished request id -> its group (event loop only)
        self._ids = itertools.count()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        # Set by the engine thread before it drains its last commands, so a submit that races with its end sees it.
        self._stopped_because: BaseException | None = None

    # ---- lifecycle (event loop) ---------------------------------------------------------------------------------

    def start(self):
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="mixquant-engine", daemon=True)
        self._thread.start()

    async def shutdown(self):
        """Aborts what is still running and ends the engine thread."""
        if self._thread is None:
            return
        self._commands.put(_Stop())
        await asyncio.to_thread(self._thread.join)
        self._thread = None

    @property
    def dead_error(self) -> BaseException | None:
        """Why no request can be served: the engine thread stopped, or a rank of the engine died (even while idle)."""
        return self._stopped_because or self.engine.failure

    @property
    def num_pending_requests(self) -> int:
        return len(self._routes)

    # ---- requests (event loop) ----------------------------------------------------------------------------------

    async def submit(self, prompts: list[list[int]], params: SamplingParams) -> RequestGroup:
        """Hands one request per prompt to the engine; raises ValueError if the engine refuses one of them."""
        if self.dead_error is not None:
            raise EngineDeadError(f"the engine is not running ({self.dead_error})")
        if self.num_pending_requests + len(prompts) > self.max_pending_requests:
            raise EngineOverloadedError(
                f"the server is overloaded: {self.num_pending_requests} requests are pending and at most "
                f"{self.max_pending_requests} may be (--max-pending-requests); retry later")
        base = next(self._ids)
        group = RequestGroup(self, [f"{base}-{i}" for i in range(len(prompts))], time.monotonic())
        for request_id in group.request_ids:
            self._routes[request_id] = group
        accepted = concurrent.futures.Future()
        self._commands.put(_AddRequests(group.request_ids, prompts, params, accepted))
        try:
            if self._stopped_because is not None:  # it stopped after the check above: the command may be lost
                raise EngineDeadError(f"the engine is not running ({self._stopped_because})")
            await asyncio.wrap_future(accepted)
        except BaseException:  # refused, dead, or the caller was cancelled while waiting
            group.abort()
            raise
        return group

    def _abort(self, request_ids: list[str]):
        self._unroute(request_ids)
        self._commands.put(_Abort(request_ids))

    def _unroute(self, request_ids: list[str]):
        for request_id in request_ids:
            self._routes.pop(request_id, None)

    def _dispatch(self, outputs: list[RequestOutput], now: float):
        for output in outputs:
            group = self._routes.get(output.request_id)
            if group is None:
                continue
            self.metrics.observe(group.timelines[output.request_id], output, now)
            group._deliver(output)
            if output.finished:
                del self._routes[output.request_id]

    def _fail_all(self, error: BaseException):
        for group in set(self._routes.values()):
            group._fail(error)
        self._routes.clear()

    # ---- the engine thread --------------------------------------------------------------------------------------

    def _run(self):
        try:
            while True:
                for command in self._next_commands(wait=not self.engine.has_unfinished_requests()):
                    if isinstance(command, _Stop):
                        self._stop(EngineDeadError("the server is shutting down"))
                        return
                    self._apply(command)
                outputs = self.engine.step() if self.engine.has_unfinished_requests() else []
                now = time.monotonic()
                # refreshed before the outputs go out, so a client that scrapes /metrics after its answer sees it
                self.stats = self.engine.stats()
                if outputs:
                    self._loop.call_soon_threadsafe(self._dispatch, outputs, now)
        except Exception as e:  # anything escaping a step leaves the engine in an unknown state: stop serving
            logger.exception("the engine failed; the server answers 503 from now on")
            self._stop(EngineDeadError(f"the engine failed: {type(e).__name__}: {e}"))

    def _next_commands(self, wait: bool) -> list:
        commands = [self._commands.get()] if wait else []
        while True:
            try:
                commands.append(self._commands.get_nowait())
            except queue.Empty:
                return commands

    def _apply(self, command: _AddRequests | _Abort):
        if isinstance(command, _Abort):
            for request_id in command.request_ids:
                self.engine.abort_request(request_id)
        else:
            added = []
            try:
                for request_id, prompt in zip(command.request_ids, command.prompts):
                    self.engine.add_request(request_id, prompt, command.params)
                    added.append(request_id)
            except Exception as e:
                for request_id in added:
                    self.engine.abort_request(request_id)
                command.accepted.set_exception(e)
                if not isinstance(e, ValueError):  # not a bad request but a failing engine
                    raise
            else:
                command.accepted.set_result(None)

    def _stop(self, reason: EngineDeadError):
        """Refuses what is queued and tells every waiting request, then frees the KV blocks of what was running."""
        self._stopped_because = reason
        for command in self._next_commands(wait=False):
            if isinstance(command, _AddRequests):
                command.accepted.set_exception(reason)
        try:
            self._loop.call_soon_threadsafe(self._fail_all, reason)
        except RuntimeError:  # the event loop is already closed: nobody is left to tell
            pass
        for request_id in list(self.engine.requests):
            self.engine.abort_request(request_id)
        self.stats = self.engine.stats()
