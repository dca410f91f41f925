"""Group commit: many small spool requests from the event loop become few transactions.

Every spool call runs on one dedicated thread (SQLite connections are single-threaded and
the GIL is released while SQLite works, so the loop keeps serving MQTT meanwhile). Requests
made while a transaction runs wait for the next one, which is how commits group themselves
under load without any timer.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TypeVar

from bridge.errors import SpoolError, SpoolFullError
from bridge.models import Reading, SpooledReading
from bridge.spool.store import DeadLetter, Reject, Spool, SpoolStats
from bridge.telemetry import Metrics

__all__ = ["SpoolWriter"]

log = logging.getLogger("bridge.spool")
T = TypeVar("T")


@dataclass(slots=True)
class _Put:
    readings: Sequence[Reading]
    rejects: Sequence[Reject]
    future: asyncio.Future[list[SpooledReading]]


@dataclass(slots=True)
class _Work:
    puts: list[_Put] = field(default_factory=list)
    delivered: list[int] = field(default_factory=list)
    dead: list[DeadLetter] = field(default_factory=list)
    marks: list[tuple[Sequence[int], asyncio.Future[int]]] = field(default_factory=list)
    completion_futures: list[asyncio.Future[None]] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.puts or self.delivered or self.dead or self.marks)


@dataclass(slots=True)
class _Result:
    put_ids: list[list[int]] | None = None
    put_error: SpoolError | None = None
    completion_error: SpoolError | None = None
    already_sent: int = 0


class SpoolWriter:
    """Owns the spool thread; the only way the rest of the bridge touches the spool."""

    def __init__(self, spool: Spool, metrics: Metrics) -> None:
        self.spool = spool
        self._metrics = metrics
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="spool")
        self._work = _Work()
        self._wake = asyncio.Event()
        self._closed = False
        self.last_id = spool.last_id
        self.full_reason: str | None = None
        self._evicted_reported = 0

    # -- requests ---------------------------------------------------------------------------

    def put(
        self, readings: Sequence[Reading], rejects: Sequence[Reject]
    ) -> asyncio.Future[list[SpooledReading]]:
        """Store readings and dead letters; resolves with the stored rows once committed.

        The future fails with :class:`SpoolFullError` when there is no room (nothing stored).
        """
        fut: asyncio.Future[list[SpooledReading]] = asyncio.get_running_loop().create_future()
        self._work.puts.append(_Put(readings, rejects, fut))
        self._wake.set()
        return fut

    def complete(
        self, delivered: Sequence[int] = (), dead: Sequence[DeadLetter] = ()
    ) -> asyncio.Future[None]:
        """Delete delivered rows, move dead ones to the dead-letter table; retried until done."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._work.delivered.extend(delivered)
        self._work.dead.extend(dead)
        self._work.completion_futures.append(fut)
        self._wake.set()
        return fut

    def mark_sent(self, rids: Sequence[int]) -> asyncio.Future[int]:
        """Flag rows as handed to the cloud; resolves with how many were flagged already."""
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._work.marks.append((rids, fut))
        self._wake.set()
        return fut

    async def call(self, fn: Callable[[], T]) -> T:
        """Run a read-only spool call on the spool thread."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn)

    async def fetch_after(self, after_id: int, limit: int) -> list[SpooledReading]:
        """Rows after ``after_id``, oldest first."""
        return await self.call(lambda: self.spool.fetch_after(after_id, limit))

    async def stats(self) -> SpoolStats:
        """Spool counts and size."""
        return await self.call(self.spool.stats)

    # -- the commit loop --------------------------------------------------------------------

    async def run(self) -> None:
        """Commit pending work until :meth:`close`; one transaction per turn."""
        loop = asyncio.get_running_loop()
        while True:
            if not self._work:
                if self._closed:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            work, self._work = self._work, _Work()
            started = time.perf_counter()
            result = await loop.run_in_executor(self._executor, self._commit, work)
            self._metrics.spool_commit_latency.observe(time.perf_counter() - started)
            self._settle(work, result)
            evicted = self.spool.dead_letters_evicted - self._evicted_reported
            if evicted:
                self._evicted_reported += evicted
                self._metrics.dead_letters_evicted.inc(evicted)
                log.warning(
                    "dead-letter store over budget: oldest dropped", extra={"dropped": evicted}
                )
            if result.completion_error is not None:
                # Keep the completions and try again shortly: rows stay until deleted.
                self._work.delivered[:0] = work.delivered
                self._work.dead[:0] = work.dead
                self._work.completion_futures[:0] = work.completion_futures
                log.error(
                    "spool write failed, retrying", extra={"error": str(result.completion_error)}
                )
                await asyncio.sleep(1.0)

    def close(self) -> None:
        """Let :meth:`run` return once the pending work is committed."""
        self._closed = True
        self._wake.set()

    def shutdown(self) -> None:
        """Stop the spool thread and close the database (after :meth:`run` returned)."""
        self._executor.submit(self.spool.close).result()
        self._executor.shutdown(wait=True)

    def _commit(self, work: _Work) -> _Result:
        readings: list[Reading] = [r for p in work.puts for r in p.readings]
        rejects: list[Reject] = [j for p in work.puts for j in p.rejects]
        marks = [rid for rids, _ in work.marks for rid in rids]
        result = _Result()
        try:
            ids, result.already_sent = self.spool.commit(
                readings, rejects, work.delivered, work.dead, marks
            )
        except SpoolError as exc:
            result.put_error = exc
            if not work.puts:
                result.completion_error = exc
                return result
        else:
            result.put_ids = _split_ids(ids, work.puts)
            return result
        if work.delivered or work.dead or marks:
            try:
                _, result.already_sent = self.spool.commit([], [], work.delivered, work.dead, marks)
            except SpoolError as exc:
                result.completion_error = exc
        return result

    def _settle(self, work: _Work, result: _Result) -> None:
        if work.puts:
            if result.put_ids is not None:
                self._metrics.spool_commits.inc()
                for put, ids in zip(work.puts, result.put_ids, strict=True):
                    if ids:
                        self.last_id = ids[-1]
                    rows = [SpooledReading(i, r) for i, r in zip(ids, put.readings, strict=True)]
                    if not put.future.done():
                        put.future.set_result(rows)
                if self.full_reason is not None:
                    self.full_reason = None
            else:
                error = result.put_error or SpoolError("spool write failed")
                if isinstance(error, SpoolFullError):
                    self.full_reason = str(error)
                for put in work.puts:
                    if not put.future.done():
                        put.future.set_exception(error)
        if result.completion_error is None:
            for fut in work.completion_futures:
                if not fut.done():
                    fut.set_result(None)
            remaining = result.already_sent
            for _rids, mark in work.marks:
                if not mark.done():
                    # The count is per transaction; attribute it to the first waiter.
                    mark.set_result(remaining)
                    remaining = 0


def _split_ids(ids: list[int], puts: list[_Put]) -> list[list[int]]:
    out: list[list[int]] = []
    start = 0
    for put in puts:
        out.append(ids[start : start + len(put.readings)])
        start += len(put.readings)
    return out
