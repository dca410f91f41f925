"""Ingest between a fake MQTT source and a real spool.

Ack after commit, in order; rejects dead-lettered and acked; pause and resume with
hysteresis.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

from bridge.config import PayloadFormat, Route
from bridge.intake.ingest import Ingest
from bridge.intake.mapping import Mapper
from bridge.intake.mqtt import AckToken, Received
from bridge.models import Batch, Inbound, Reading
from bridge.push.batching import Batcher
from bridge.push.feeder import Feeder
from bridge.spool.store import SpoolStore
from bridge.spool.thread import SpoolThread
from bridge.telemetry import Metrics
from tests.stages.conftest import eventually, reopened, running, sample


class FakeSource:
    """What ingest sees of the MQTT edge, recording what ingest does with it."""

    def __init__(self) -> None:
        self.inbox: list[Received] = []
        self.mail = asyncio.Event()
        self.acked: list[AckToken] = []
        self.calls: list[str] = []

    def publish(self, topic: str, payload: bytes, mid: int) -> None:
        """Queue a QoS 1 message as if the broker had delivered it, and wake the receiver."""
        self.inbox.append((Inbound(topic.encode(), payload, time.time(), mid, 1), (1, mid)))
        self.mail.set()

    async def receive(self) -> list[Received]:
        """Wait until at least one message is queued; take them all."""
        while not self.inbox:
            self.mail.clear()
            await self.mail.wait()
        return self.receive_nowait()

    def receive_nowait(self) -> list[Received]:
        """Take every queued message (possibly none) without waiting."""
        taken, self.inbox = self.inbox, []
        return taken

    def ack(self, tokens: Sequence[AckToken]) -> int:
        """Record the acks in the order given; all count as sent."""
        self.acked.extend(tokens)
        return len(tokens)

    def pause(self) -> None:
        """Record a pause."""
        self.calls.append("pause")

    def resume(self) -> None:
        """Record a resume."""
        self.calls.append("resume")


def _ingest(
    spool: SpoolThread,
    source: FakeSource,
    metrics: Metrics,
    high_water: int,
    mapper: Mapper | None = None,
) -> Ingest:
    queue: asyncio.Queue[Batch] = asyncio.Queue()
    batcher = Batcher(
        max_devices=10, max_bytes=1 << 20, window_secs=60, linger_secs=1, clock=time.time
    )
    return Ingest(
        mapper=mapper or Mapper([Route()], "Asia/Shanghai", max_payload_bytes=1024),
        spool=spool,
        feeder=Feeder(spool=spool, batcher=batcher, queue=queue),
        source=source,
        metrics=metrics,
        commit_max=100,
        high_water=high_water,
    )


def _payload(n: int) -> bytes:
    return b'{"ts": 1631097600, "Ua": 226.%d}' % n


async def test_ingest_acks_after_the_commit_in_arrival_order(
    spool: SpoolThread, store: SpoolStore, metrics: Metrics
) -> None:
    """Test that messages are acked only after their commit, in arrival order.

    Nothing is acknowledged before its reading or dead letter is committed, then
    every message is, in the order it arrived; the bad one is dead-lettered, the rest stored.
    """
    source = FakeSource()
    ingest = _ingest(spool, source, metrics, high_water=100)
    async with running(ingest):
        source.publish("meters/1/m-1/telemetry", _payload(1), 11)
        source.publish("meters/1/m-2/telemetry", b"{not json", 12)
        source.publish("meters/1/m-3/telemetry", _payload(3), 13)
        await asyncio.sleep(0.2)
        before_commit = list(source.acked)  # the spool stage is not running yet
        async with running(spool):
            await eventually(lambda: len(source.acked) == 3, message="3 acks")

    with reopened(store.path) as stored:
        expected: tuple[object, ...] = (
            [],
            [(1, 11), (1, 12), (1, 13)],
            ["m-1", "m-3"],
            ["bad_json"],
        )
        assert expected == (
            before_commit,
            source.acked,
            [row.reading.device_id for row in stored.fetch_after(0, 10)],
            [d.reason for d in stored.dead_letters()],
        )
    assert 1.0 == sample(metrics, "bridge_messages_rejected_total", reason="bad_json")


async def test_ingest_pauses_at_high_water_and_resumes_below_half(
    spool: SpoolThread, metrics: Metrics
) -> None:
    """Test that ingest pauses the source at high_water and resumes below half of it.

    Ingest stops the source once high_water messages wait for a commit and lets
    it read again only when fewer than half of that are left (no pause/resume flapping).
    """
    source = FakeSource()
    ingest = _ingest(spool, source, metrics, high_water=10)
    async with running(ingest):
        for n in range(12):
            source.publish(f"meters/1/m-{n}/telemetry", _payload(n % 10), n + 1)
        await eventually(lambda: source.calls, message="a pause")
        paused = list(source.calls)
        async with running(spool):
            await eventually(lambda: len(source.acked) == 12, message="12 acks")

    assert (["pause"], ["pause", "resume"]) == (paused, source.calls)


async def test_ingest_sets_aside_a_message_the_mapping_fails_on_and_keeps_the_rest(
    spool: SpoolThread, store: SpoolStore, metrics: Metrics
) -> None:
    """Test that a bug in the mapping costs only its message (dead-lettered as mapping_failed).

    A bug in the mapping (any exception, not a reject) costs only its message: it
    is dead-lettered as mapping_failed and acked, and the messages around it are stored.
    """

    class BuggyMapper(Mapper):
        """The real mapping, with a bug for one device."""

        __slots__ = ()

        def map(self, topic: bytes, payload: bytes, received_at: float) -> list[Reading]:
            if b"m-2" in topic:
                raise ZeroDivisionError("a bug")
            return super().map(topic, payload, received_at)

    source = FakeSource()
    mapper = BuggyMapper([Route()], "Asia/Shanghai", max_payload_bytes=1024)
    ingest = _ingest(spool, source, metrics, high_water=100, mapper=mapper)
    async with running(ingest, spool):
        for n in (1, 2, 3):
            source.publish(f"meters/1/m-{n}/telemetry", _payload(n), n)
        await eventually(lambda: len(source.acked) == 3, message="3 acks")

    with reopened(store.path) as stored:
        expected = (["m-1", "m-3"], [("mapping_failed", "ZeroDivisionError: a bug")])
        assert expected == (
            [row.reading.device_id for row in stored.fetch_after(0, 10)],
            [(d.reason, d.detail) for d in stored.dead_letters()],
        )


async def test_ingest_acks_and_counts_a_presets_non_reading_without_dead_letter(
    spool: SpoolThread, store: SpoolStore, metrics: Metrics
) -> None:
    """Test that a preset's non-reading (a Tasmota LWT) is acked in turn and counted as skipped.

    It is counted by reason, with no dead letter, and the reading after it is stored.
    """
    source = FakeSource()
    mapper = Mapper([Route(format=PayloadFormat.TASMOTA)], "Asia/Shanghai")
    ingest = _ingest(spool, source, metrics, high_water=100, mapper=mapper)
    async with running(ingest, spool):
        source.publish("tele/pow1/LWT", b"Online", 1)
        source.publish("tele/pow1/SENSOR", b'{"ENERGY":{"Voltage":227}}', 2)
        await eventually(lambda: len(source.acked) == 2, message="2 acks")

    assert [(1, 1), (1, 2)] == source.acked
    assert 1 == sample(metrics, "bridge_messages_skipped_total", reason="availability")
    assert 0 == sample(metrics, "bridge_messages_rejected_total")
    with reopened(store.path) as stored:
        assert ([{"Ua": "227"}], []) == (
            [row.reading.data for row in stored.fetch_after(0, 10)],
            stored.dead_letters(),
        )
