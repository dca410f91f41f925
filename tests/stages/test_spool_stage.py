"""The spool stage: group commit on its own thread, a full spool, completions, readiness.

Completions must not be lost; the spool's readiness and metrics are written only here.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from bridge.errors import SpoolError, SpoolFullError
from bridge.health import SPOOL_FULL, Health
from bridge.models import SpooledReading
from bridge.spool.store import DeadLetter, DeadLetterFilter, Reject, SpoolStore
from bridge.spool.thread import SpoolThread
from bridge.telemetry import Metrics
from tests.stages.conftest import eventually, reading, reopened, running, sample


def _reject(n: int, size: int = 10) -> Reject:
    return Reject(b"t", b"x" * size, "bad_json", f"junk {n}", float(n))


async def test_spool_stage_groups_concurrent_puts_into_one_transaction(
    spool: SpoolThread, metrics: Metrics
) -> None:
    """Test that concurrent puts are committed together and each caller gets its own rows.

    Puts made while no transaction runs are committed together, and each caller
    gets its own rows back in order.
    """
    async with running(spool):
        await asyncio.sleep(0.1)  # the first stats read is done; the thread is idle
        before = sample(metrics, "bridge_spool_commits_total")
        futures = [spool.put([reading(2 * n), reading(2 * n + 1)], []) for n in range(5)]
        results = await asyncio.gather(*futures)

    expected = ([[1, 2], [3, 4], [5, 6], [7, 8], [9, 10]], 1.0)
    assert expected == (
        [[row.rid for row in rows] for rows in results],
        sample(metrics, "bridge_spool_commits_total") - before,
    )


async def test_spool_stage_full_spool_writes_nothing_and_reports_it(
    tmp_path: Path, metrics: Metrics, health: Health
) -> None:
    """Test that a full spool refuses puts, says so, still commits completions, then recovers.

    A full spool refuses a put (nothing written), says so in /readyz and the
    spool_full gauge, and still commits completions; deleting rows makes room again.
    """
    store = SpoolStore.open(tmp_path / "small.db", max_bytes=64 * 1024)
    spool = SpoolThread(store, metrics, health, stats_interval=0.05)
    async with running(spool):
        rows: list[SpooledReading] = []
        while not health.problems:
            try:
                rows += await spool.put([reading(len(rows), P="1" * 3000)], [])
            except SpoolFullError:
                break
        count = len(rows)
        last_id = spool.last_id
        full = (health.problems.get("spool"), sample(metrics, "bridge_spool_full"))
        spool.complete(delivered=[row.rid for row in rows])
        await eventually(lambda: health.ready, message="room again")
        more = await spool.put([reading(0)], [])

    assert count > 0
    assert (SPOOL_FULL, 1.0) == full
    expected = ([last_id + 1], 0.0)
    assert expected == ([row.rid for row in more], sample(metrics, "bridge_spool_full"))


async def test_spool_stage_retries_completions_until_they_commit(
    spool: SpoolThread, store: SpoolStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Test that a delete that failed is kept and committed on a later turn.

    A delete that fails (a broken disk for a moment) is kept and committed on a
    later turn: a delivered reading must not stay in the spool to be sent again.
    """
    async with running(spool):
        rows = await spool.put([reading(1), reading(2)], [])
        real_commit = store.commit
        failures = [SpoolError("disk I/O error")]

        def flaky_commit(*args: object, **kwargs: object) -> object:
            if failures:
                raise failures.pop()
            return real_commit(*args, **kwargs)  # type: ignore[arg-type]

        monkeypatch.setattr(store, "commit", flaky_commit)
        spool.complete(delivered=[rows[0].rid], dead=[DeadLetter(rows[1].rid, "Invalid", "x")])
        await eventually(lambda: not store.fetch_after(0, 10), within=5, message="retried")

    assert [] == failures
    with reopened(store.path) as settled:
        assert ["Invalid"] == [d.reason for d in settled.dead_letters()]


async def test_spool_stage_dead_letter_gauges_follow_another_process(
    spool: SpoolThread, store: SpoolStore, metrics: Metrics
) -> None:
    """Test that the dead-letter gauges are right after another process purged entries.

    The dead-letter gauges are right after another process purged entries
    (``energy-bridge dlq purge`` beside a running bridge), and the budget still holds.
    """
    async with running(spool):
        await spool.put([], [_reject(n) for n in range(5)])
        await eventually(
            lambda: sample(metrics, "bridge_dead_letters", source="mapping") == 5,
            message="5 dead letters",
        )
        other = SpoolStore.open(store.path, max_bytes=1 << 30)
        try:
            other.purge_dead_letters([d.id for d in other.dead_letters(DeadLetterFilter())][:4])
        finally:
            other.close()
        await eventually(
            lambda: sample(metrics, "bridge_dead_letters", source="mapping") == 1,
            message="the purge seen",
        )

    with reopened(store.path) as settled:
        usage = settled.dead_letter_usage()
    assert {"mapping": (1, 64 + 1 + 10 + len("junk 4")), "cloud": (0, 0)} == usage


async def test_spool_stage_garbage_cannot_evict_readings_the_cloud_refused(
    tmp_path: Path, metrics: Metrics, health: Health
) -> None:
    """Test that unmappable messages and cloud refusals have separate dead-letter budgets.

    Unmappable messages and cloud refusals have separate budgets: a flood of
    garbage evicts only garbage, counted by source.
    """
    store = SpoolStore.open(tmp_path / "dl.db", max_bytes=1 << 30, dead_letter_max_bytes=70_000)
    spool = SpoolThread(store, metrics, health, stats_interval=0.05)
    async with running(spool):
        rows = await spool.put([reading(1)], [])
        spool.complete(dead=[DeadLetter(rows[0].rid, "InvalidParameter", "refused")])
        for n in range(30):
            await spool.put([], [_reject(n, size=10_000)])

    with reopened(store.path) as settled:
        sources = [d.source for d in settled.dead_letters()]
    assert 1 == sources.count("cloud")
    assert 6 == sources.count("mapping")
    assert 24.0 == sample(metrics, "bridge_dead_letters_evicted_total", source="mapping")
    assert 0.0 == sample(metrics, "bridge_dead_letters_evicted_total", source="cloud")
