"""The spool stage: the one thread that touches the SQLite store, and group commit.

Every spool call runs on one dedicated thread (SQLite connections are single-threaded and
the GIL is released while SQLite works, so the loop keeps serving MQTT meanwhile). Requests
made while a transaction runs wait for the next one, which is how commits group themselves
under load without any timer.

This stage is also the one owner of what the rest of the bridge knows about the spool: the
last row id (and rows another process added), whether it can take readings (the ``spool``
readiness condition and ``bridge_spool_full``) and every spool metric. It reads the store's
state once a second, on its own thread, between transactions.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TypeVar

from bridge.errors import SpoolError, SpoolFullError
from bridge.health import SPOOL_FULL, Health
from bridge.logs import Throttled
from bridge.models import Reading, SpooledReading
from bridge.spool.store import AliasRow, Committed, DeadLetter, Reject, SpoolStats, SpoolStore
from bridge.stage import Finished
from bridge.telemetry import Metrics

__all__ = ["SpoolThread"]

log = logging.getLogger("bridge.spool")
T = TypeVar("T")

_SPOOL_FAILED = "spool write failed (see the log)"
_STOP_MARGIN_SECS = 10.0
"""How long past the shutdown deadline completions may still take to commit: they are what
keeps delivered readings from being sent again after the restart."""


@dataclass(slots=True)
class _Put:
    readings: Sequence[Reading]
    rejects: Sequence[Reject]
    future: asyncio.Future[list[SpooledReading]]
    aliases: Sequence[AliasRow] = ()


@dataclass(slots=True)
class _Work:
    puts: list[_Put] = field(default_factory=list)
    delivered: list[int] = field(default_factory=list)
    dead: list[DeadLetter] = field(default_factory=list)
    marks: list[tuple[Sequence[int], asyncio.Future[int]]] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.puts or self.delivered or self.dead or self.marks)

    def keep_completions(self, failed: _Work) -> None:
        """Put the completions of a failed turn back in front (rows stay until deleted)."""
        self.delivered[:0] = failed.delivered
        self.dead[:0] = failed.dead


@dataclass(slots=True)
class _Result:
    committed: Committed | None = None
    put_error: SpoolError | None = None
    completion_error: SpoolError | None = None


class SpoolThread:
    """Owns the spool thread and the store; the only way the rest of the bridge touches it.

    Args:
        store: the opened store (closed by :meth:`stop`).
        metrics, health: the spool's metrics and its readiness condition, written only here.
        stats_interval: seconds between reads of the spool's size and counts.
    """

    def __init__(
        self, store: SpoolStore, metrics: Metrics, health: Health, *, stats_interval: float = 1.0
    ) -> None:
        self._store = store
        self._metrics = metrics
        self._health = health
        self._stats_interval = stats_interval
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="spool")
        self._work = _Work()
        self._wake = asyncio.Event()
        self._closing = False
        self._closed = False
        self._finished = Finished()
        self._watchers: list[Callable[[int], None]] = []
        self._problem: str | None = None
        self._failure_log = Throttled(log)
        metrics.spool_max_bytes.set(store.max_bytes)

    # -- what the rest of the bridge may know -----------------------------------------------

    @property
    def last_id(self) -> int:
        """The highest row id in the spool, as of the last transaction or stats read."""
        return self._store.last_id

    def watch(self, callback: Callable[[int], None]) -> None:
        """Call ``callback(last_id)`` when rows appear that this bridge did not write."""
        self._watchers.append(callback)

    # -- requests ---------------------------------------------------------------------------

    def put(
        self,
        readings: Sequence[Reading],
        rejects: Sequence[Reject],
        aliases: Sequence[AliasRow] = (),
    ) -> asyncio.Future[list[SpooledReading]]:
        """Store readings, dead letters and the Sparkplug alias changes their messages made.

        The future resolves with the stored rows once committed. It fails with
        :class:`SpoolFullError` when there is no room, or with :class:`SpoolError` when the
        store failed (nothing stored either way).
        """
        fut: asyncio.Future[list[SpooledReading]] = asyncio.get_running_loop().create_future()
        self._work.puts.append(_Put(readings, rejects, fut, aliases))
        self._wake.set()
        return fut

    def complete(self, delivered: Sequence[int] = (), dead: Sequence[DeadLetter] = ()) -> None:
        """Delete delivered rows, move refused ones to the dead letters.

        Nobody waits for this: completions ride the next transaction, are retried until they
        commit, and are committed before :meth:`stop` returns. (A crash before that only means
        the readings are sent again, and counted as redelivered.)
        """
        self._work.delivered.extend(delivered)
        self._work.dead.extend(dead)
        self._wake.set()

    def mark_sent(self, rids: Sequence[int]) -> asyncio.Future[int]:
        """Flag rows as handed to the cloud; resolves with how many were flagged already."""
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._work.marks.append((rids, fut))
        self._wake.set()
        return fut

    async def fetch_after(self, after_id: int, limit: int) -> list[SpooledReading]:
        """Rows after ``after_id``, oldest first."""
        return await self._call(lambda: self._store.fetch_after(after_id, limit))

    async def stats(self) -> SpoolStats:
        """Spool counts and size (read on the spool thread)."""
        return await self._call(self._store.stats)

    async def _call(self, fn: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn)

    # -- the stage ----------------------------------------------------------------------------

    async def run(self) -> None:
        """Commit pending work, one transaction per turn, and read the stats between turns."""
        try:
            next_stats = 0.0
            while True:
                if time.monotonic() >= next_stats:
                    await self._read_stats()
                    next_stats = time.monotonic() + self._stats_interval
                if not self._work:
                    if self._closing:
                        return
                    self._wake.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(
                            self._wake.wait(), max(0.0, next_stats - time.monotonic())
                        )
                    continue
                await self._commit_turn()
        finally:
            self._finished.set()

    async def stop(self, deadline: float) -> None:
        """Commit what is pending (completions even a little past ``deadline``), then close."""
        self._closing = True
        self._wake.set()
        await self._finished.wait(deadline + _STOP_MARGIN_SECS)
        if not self._closed:
            self._closed = True
            await asyncio.to_thread(self._close)

    def _close(self) -> None:
        self._executor.submit(self._store.close).result()
        self._executor.shutdown(wait=True)

    async def _commit_turn(self) -> None:
        work, self._work = self._work, _Work()
        started = time.perf_counter()
        result = await asyncio.get_running_loop().run_in_executor(
            self._executor, self._commit, work
        )
        self._metrics.spool_commit_latency.observe(time.perf_counter() - started)
        self._settle(work, result)
        if result.completion_error is not None:
            # Rows stay until deleted: keep the completions and try again shortly.
            self._work.keep_completions(work)
            self._failure_log.log(
                "completion",
                logging.ERROR,
                "spool write failed, retrying",
                {"error": str(result.completion_error)},
            )
            await asyncio.sleep(1.0)

    def _commit(self, work: _Work) -> _Result:
        readings = [r for p in work.puts for r in p.readings]
        rejects = [j for p in work.puts for j in p.rejects]
        marks = [rid for rids, _ in work.marks for rid in rids]
        aliases = [a for p in work.puts for a in p.aliases]
        result = _Result()
        try:
            result.committed = self._store.commit(
                readings, rejects, work.delivered, work.dead, marks, aliases=aliases
            )
        except SpoolError as exc:
            result.put_error = exc
            if not work.puts:
                result.completion_error = exc
                return result
        else:
            return result
        # The readings could not go in (full, or a broken store): the completions and marks
        # must not wait for room, so they get a transaction of their own.
        if work.delivered or work.dead or marks:
            try:
                result.committed = self._store.commit([], [], work.delivered, work.dead, marks)
            except SpoolError as exc:
                result.completion_error = exc
        return result

    def _settle(self, work: _Work, result: _Result) -> None:
        committed = result.committed
        if work.puts:
            if result.put_error is None and committed is not None:
                self._metrics.spool_commits.inc()
                start = 0
                for put in work.puts:
                    ids = committed.ids[start : start + len(put.readings)]
                    start += len(put.readings)
                    rows = [SpooledReading(i, r) for i, r in zip(ids, put.readings, strict=True)]
                    if not put.future.done():
                        put.future.set_result(rows)
                self._set_problem(None)
            else:
                error = result.put_error or SpoolError("spool write failed")
                self._report_put_failure(error)
                for put in work.puts:
                    if not put.future.done():
                        put.future.set_exception(error)
        if committed is not None:
            for source, evicted in committed.evicted.items():
                if evicted:
                    self._metrics.dead_letters_evicted.labels(source).inc(evicted)
                    log.warning(
                        "dead-letter store over budget: oldest dropped",
                        extra={"source": source, "dropped": evicted},
                    )
        if result.completion_error is None:
            remaining = committed.already_sent if committed is not None else 0
            for _rids, mark in work.marks:
                if not mark.done():
                    # The count is per transaction; attribute it to the first waiter.
                    mark.set_result(remaining)
                    remaining = 0

    def _report_put_failure(self, error: SpoolError) -> None:
        if isinstance(error, SpoolFullError):
            self._failure_log.log(
                "full", logging.WARNING, "spool full, holding messages", {"detail": str(error)}
            )
            self._set_problem(SPOOL_FULL)
        else:
            self._failure_log.log(
                "error", logging.ERROR, "spool write failed, retrying", {"detail": str(error)}
            )
            self._set_problem(_SPOOL_FAILED)

    def _set_problem(self, problem: str | None) -> None:
        if problem == self._problem:
            return
        self._problem = problem
        self._health.set("spool", problem)
        self._metrics.spool_full.set(1 if problem == SPOOL_FULL else 0)

    async def _read_stats(self) -> None:
        before = self._store.last_id
        try:
            stats = await self._call(self._stats_after_refresh)
        except SpoolError as exc:
            self._failure_log.log("stats", logging.ERROR, "spool stats failed", {"error": str(exc)})
            return
        m = self._metrics
        m.spool_readings.set(stats.readings)
        m.spool_bytes.set(stats.used_bytes)
        for source, entries in stats.dead_letters.items():
            m.dead_letters.labels(source).set(entries)
        m.spool_oldest_age.set(
            0.0
            if stats.oldest_received_at is None
            else max(0.0, time.time() - stats.oldest_received_at)
        )
        if stats.full:
            self._set_problem(SPOOL_FULL)
        elif self._problem == SPOOL_FULL:
            self._set_problem(None)
        if stats.last_id > before:
            for watcher in self._watchers:
                watcher(stats.last_id)

    def _stats_after_refresh(self) -> SpoolStats:
        try:
            self._store.refresh()
            return self._store.stats()
        except sqlite3.Error as exc:
            raise SpoolError(f"spool {self._store.path}: {exc}") from exc
