"""The feeder: spool rows -> batcher -> the push queue, oldest first, never more than fits.

Live readings are handed over in memory right after their commit (no read-back). When the
pipeline is backed up (cloud slow or down, or a backlog at start), the feeder stops taking
hand-overs and instead pages through the spool by row id, so memory stays bounded however
large the backlog is, and the backlog drains in spool order at full speed once there is room.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from bridge.models import Batch, SpooledReading
from bridge.push.batching import Batcher
from bridge.spool.thread import SpoolThread
from bridge.stage import Finished

__all__ = ["Feeder"]

log = logging.getLogger("bridge.push.feeder")


class Feeder:
    """Pulls spooled readings into batches and queues the batches for the pusher.

    Args:
        spool: the spool (for paging when behind); it tells the feeder about rows another
            process added (:meth:`notice_rows`).
        batcher: the pure batcher.
        queue: where closed batches go (bounded: the pusher's backlog).
        fetch_chunk: rows read from the spool per page.
    """

    def __init__(
        self,
        *,
        spool: SpoolThread,
        batcher: Batcher,
        queue: asyncio.Queue[Batch],
        fetch_chunk: int = 5000,
    ) -> None:
        self._spool = spool
        self._batcher = batcher
        self._queue = queue
        self._chunk = fetch_chunk
        self._cursor = 0  # highest row id taken into memory (hand-over or page)
        self._behind = True  # start by paging: the spool may hold readings from a last run
        # Readings left by an earlier run are a backlog: once they are all read back, their
        # last partial batches go out at once instead of lingering.
        self._leftover_until: int | None = spool.last_id or None
        self._inbox: list[SpooledReading] = []
        self._fetching = False  # a page read is under way: hand-overs would overlap it
        self._wake = asyncio.Event()
        self._stopping = False
        self._finished = Finished()
        spool.watch(self.notice_rows)

    def offer(self, rows: list[SpooledReading]) -> None:
        """Hand over freshly committed rows; ignored (left in the spool) when behind."""
        if not rows:
            return
        if (
            not self._fetching
            and rows[0].rid == self._cursor + 1
            and self._batcher.pending + len(self._inbox) + len(rows) <= self._batcher.max_pending
            and not self._queue.full()
        ):
            # Contiguous with what is in memory: take it, even right after paging caught up.
            self._inbox.extend(rows)
            self._cursor = rows[-1].rid
            self._behind = False
        else:
            self._behind = True
        self._wake.set()

    def notice_rows(self, last_id: int) -> None:
        """Rows up to ``last_id`` exist in the spool (some maybe written by another process)."""
        if last_id > self._cursor and not self._behind and not self._inbox:
            self._behind = True
            self._wake.set()

    async def stop(self, deadline: float) -> None:
        """Stop reading; wait until :meth:`run` has closed the open batches into the queue.

        With the cloud down the queue may never have room for them: they stay in the spool.
        """
        self._stopping = True
        self._wake.set()
        await self._finished.wait(deadline)

    async def run(self) -> None:
        """Feed until stopped; then close every open batch into the queue."""
        try:
            await self._feed()
        finally:
            self._finished.set()

    async def _feed(self) -> None:
        batcher = self._batcher
        while not self._stopping:
            if self._inbox:
                rows, self._inbox = self._inbox, []
                await self._add(rows)
            elif self._behind and not self._queue.full():
                known = self._spool.last_id
                self._fetching = True
                try:
                    rows = await self._spool.fetch_after(self._cursor, self._chunk)
                finally:
                    self._fetching = False
                if rows:
                    self._cursor = rows[-1].rid
                    await self._add(rows)
                else:
                    # Nothing after the cursor: every id up to ``known`` is gone (delivered).
                    self._cursor = max(self._cursor, known)
                if self._leftover_until is not None and self._cursor >= self._leftover_until:
                    self._leftover_until = None
                    for batch in batcher.flush():
                        await self._queue.put(batch)
                if self._cursor >= self._spool.last_id:
                    self._behind = False
                continue
            for batch in batcher.due():
                await self._queue.put(batch)
            deadline = batcher.next_deadline()
            self._wake.clear()
            if self._inbox or (self._behind and not self._queue.full()):
                continue
            timeout = None if deadline is None else max(0.0, deadline - batcher.clock())
            if self._behind:
                # Waiting for queue room: poll, since asyncio.Queue has no "space" event.
                timeout = 0.05 if timeout is None else min(timeout, 0.05)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout)
        for batch in batcher.flush():
            await self._queue.put(batch)
        log.info("feeder stopped", extra={"cursor": self._cursor})

    async def _add(self, rows: list[SpooledReading]) -> None:
        for row in rows:
            for batch in self._batcher.add(row):
                await self._queue.put(batch)
