"""The feeder on a real spool, with the batcher on a fake clock: hand-over, paging, leftovers."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from bridge.models import Batch, Reading
from bridge.push.batching import Batcher
from bridge.push.feeder import Feeder
from bridge.spool.store import SpoolStore
from bridge.spool.thread import SpoolThread
from tests.stages.conftest import T0, eventually, reading, reopened, running


class FakeClock:
    """A wall clock that moves only when told."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        """The time the test last set."""
        return self.now


def _feeder(
    spool: SpoolThread, clock: FakeClock, *, linger: float = 10.0, max_pending: int = 1000
) -> tuple[Feeder, asyncio.Queue[Batch]]:
    queue: asyncio.Queue[Batch] = asyncio.Queue(maxsize=100)
    batcher = Batcher(
        max_devices=100,
        max_bytes=1 << 20,
        window_secs=3600,
        linger_secs=linger,
        max_pending=max_pending,
        clock=clock,
    )
    return Feeder(spool=spool, batcher=batcher, queue=queue, fetch_chunk=7), queue


def _drain(queue: asyncio.Queue[Batch]) -> list[int]:
    rids: list[int] = []
    while not queue.empty():
        rids += queue.get_nowait().rids
    return rids


async def test_feeder_takes_handed_over_rows_without_reading_the_spool(
    spool: SpoolThread, store: SpoolStore
) -> None:
    """Test that rows handed over right after their commit are batched from memory.

    Rows handed over right after their commit are batched from memory: the
    spool's rows are deleted behind the feeder's back and it still batches them.
    """
    clock = FakeClock()
    feeder, queue = _feeder(spool, clock)
    async with running(feeder, spool):
        await asyncio.sleep(0.1)  # the feeder has looked at the (empty) spool once
        rows = await spool.put([reading(n) for n in range(5)], [])
        # Gone from the spool: a feeder that read the spool would find nothing.
        store_ids = [row.rid for row in rows]
        spool.complete(delivered=store_ids)
        feeder.offer(rows)
        await asyncio.sleep(0.1)
        assert queue.empty(), "the batch lingers until linger_secs have passed"
        clock.now += 10.0
        batches = await eventually(lambda: _drain(queue), message="the batch after linger")

    assert store_ids == batches


async def test_feeder_pages_through_the_spool_when_hand_overs_are_missed(
    spool: SpoolThread,
) -> None:
    """Test that rows never handed over are read from the spool in id order, in pages.

    Rows committed but never handed over (or handed over out of order) are read
    from the spool in id order, in pages, none missed and none twice.
    """
    clock = FakeClock()
    feeder, queue = _feeder(spool, clock, linger=0.0)
    async with running(feeder, spool):
        first = await spool.put([reading(n) for n in range(10)], [])
        second = await spool.put([reading(n) for n in range(10, 30)], [])
        feeder.offer(second)  # not contiguous with the cursor: the feeder goes back to paging
        got: list[int] = []

        def all_batched() -> bool:
            got.extend(_drain(queue))
            return len(got) >= 30

        await eventually(all_batched, message="30 rows batched")

    assert [row.rid for row in first + second] == sorted(got)
    assert len(got) == len(set(got))


async def test_feeder_sends_leftovers_of_an_earlier_run_without_lingering(
    store: SpoolStore, spool: SpoolThread
) -> None:
    """Test that readings already in the spool at start go out without waiting linger_secs.

    Readings already in the spool at start go out as soon as they are read back,
    not after linger_secs (they waited long enough).
    """
    store.commit([reading(n) for n in range(3)])
    clock = FakeClock()
    feeder, queue = _feeder(spool, clock, linger=3600.0)
    async with running(feeder, spool):
        batches = await eventually(lambda: _drain(queue), message="the leftovers")

    assert [1, 2, 3] == batches


async def test_feeder_picks_up_rows_another_process_added(
    spool_path: object, store: SpoolStore, spool: SpoolThread
) -> None:
    """Test that rows another process wrote to the spool reach an idle feeder.

    Rows written to the spool file by another process (``dlq replay``) reach the
    feeder while the bridge is idle: the spool stage notices them and tells the feeder.
    """
    clock = FakeClock()
    feeder, queue = _feeder(spool, clock, linger=0.0)
    async with running(feeder, spool):
        await asyncio.sleep(0.1)
        other = SpoolStore.open(store.path, max_bytes=1 << 30)
        try:
            ids = other.commit([reading(1), reading(2)]).ids
        finally:
            other.close()
        batches = await eventually(lambda: _drain(queue), message="the other process's rows")

    assert ids == batches


async def test_feeder_held_readings_merge_and_go_out_at_shutdown(
    spool: SpoolThread, spool_path: Path
) -> None:
    """Test that readings held for their aligned window merge into one entry and are not lost.

    Readings held for align_secs wait past linger, merge into one entry, and at shutdown are
    closed into the queue, their rows still in the spool until delivered.
    """
    clock = FakeClock()
    feeder, queue = _feeder(spool, clock, linger=1.0)
    held = [
        Reading("1", "m-1", T0, "2021-09-08 18:40:00", points, 1000.0, hold_until=clock.now + 60)
        for points in ({"Ua": "230.1"}, {"Ia": "1.5"})
    ]
    async with running(feeder, spool):
        await asyncio.sleep(0.1)
        rows = await spool.put(held, [])
        feeder.offer(rows)
        clock.now += 5.0  # past linger, not past the hold
        await asyncio.sleep(0.2)
        assert queue.empty(), "held until the aligned window has closed"
        await feeder.stop(time.monotonic() + 5)
        (batch,) = [queue.get_nowait() for _ in range(queue.qsize())]

    assert [[row.rid for row in rows]] == batch.entry_rids
    with reopened(spool_path) as store:
        assert [row.rid for row in rows] == [row.rid for row in store.fetch_after(0, 10)]
