"""Ingest: MQTT message -> readings (or a reject) -> group commit -> ack -> feeder.

Two loops on the event loop. The receiving loop takes every message the source holds, maps
each right away (pure and fast) and queues the outcome; the committing loop commits whatever
has queued up in ONE spool transaction (on the spool's thread, so mapping goes on meanwhile),
acknowledges those messages in the order they arrived, and hands the stored rows to the feeder.
Nothing is acknowledged before its reading (or its dead letter) is on disk; when the spool is
full nothing is acknowledged at all, so the broker keeps the rest.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from bridge.errors import MappingError, MessageSkipped, SpoolError
from bridge.intake.mapping import Mapper
from bridge.intake.mqtt import AckToken, Received
from bridge.intake.registry import Registry
from bridge.intake.sparkplug_route import SparkplugIntake
from bridge.logs import Throttled
from bridge.models import Inbound, Reading
from bridge.push.feeder import Feeder
from bridge.spool.store import AliasRow, Reject
from bridge.spool.thread import SpoolThread
from bridge.stage import Finished
from bridge.telemetry import Metrics

__all__ = ["Ingest", "Source"]

log = logging.getLogger("bridge.intake.ingest")

_REJECT_PREVIEW = 120
_OVERSIZED_KEPT = 1024


class Source(Protocol):
    """What ingest needs of the MQTT edge (:class:`bridge.intake.mqtt.MqttSource`)."""

    async def receive(self) -> list[Received]:
        """Every message received since the last call; waits for at least one."""
        ...

    def receive_nowait(self) -> list[Received]:
        """Every message received since the last call (maybe none)."""
        ...

    def ack(self, tokens: Sequence[AckToken]) -> int:
        """Acknowledge committed messages in the order received; returns how many were sent."""
        ...

    def pause(self) -> None:
        """Stop reading messages (backpressure)."""
        ...

    def resume(self) -> None:
        """Read messages again."""
        ...


@dataclass(slots=True)
class _Pending:
    token: AckToken | None
    readings: list[Reading]
    reject: Reject | None
    aliases: list[AliasRow] | None = None


class _WithAliases(MappingError):
    """A rejected Sparkplug message whose alias changes are still to be kept (a birth)."""

    def __init__(self, error: MappingError, aliases: list[AliasRow]) -> None:
        super().__init__(error.reason, error.detail)
        self.aliases = aliases


class Ingest:
    """Maps messages and commits them to the spool in groups.

    Args:
        mapper: topic + payload -> readings.
        spool: where readings and dead letters are committed.
        feeder: receives the stored rows.
        source: where messages come from; acknowledges the committed ones, and stops /
            restarts reading the broker when too much is pending.
        metrics: the intake counters and the device freshness gauges.
        commit_max: most messages per transaction.
        high_water: pending messages at which reading is paused.
        silent_after_secs: a device that sent nothing for this long counts as silent.
        max_tracked_devices: most devices whose last reading time is remembered.
        sparkplug: maps the messages of the Sparkplug B routes (before ``mapper``).
        registry: maps the deviceIds the routes produced to the ones pushed; replaced as a
            whole on SIGHUP (:attr:`registry`).
    """

    def __init__(
        self,
        *,
        mapper: Mapper,
        spool: SpoolThread,
        feeder: Feeder,
        source: Source,
        metrics: Metrics,
        commit_max: int,
        high_water: int,
        silent_after_secs: float = 300.0,
        max_tracked_devices: int = 100_000,
        sparkplug: SparkplugIntake | None = None,
        registry: Registry | None = None,
    ) -> None:
        self._mapper = mapper
        self._sparkplug = sparkplug or None
        self.registry = registry
        """The device registry in use (swapped whole, by the loop, when re-read)."""
        self._spool = spool
        self._feeder = feeder
        self._source = source
        self._metrics = metrics
        self._silent_after = silent_after_secs
        self._commit_max = commit_max
        self._high_water = high_water
        self._pending: list[_Pending] = []
        # device -> last receive time, for the freshness gauges (bounded).
        self.last_seen: dict[tuple[str, str | None], float] = {}
        self._max_tracked = max_tracked_devices
        self._wake = asyncio.Event()
        self._paused = False
        self._stopping = False
        self._finished = Finished()
        self._receiver: asyncio.Task[None] | None = None
        self._reject_log = Throttled(log)
        self._received_counts: dict[str, int] = {}
        self._dup_count = 0
        self._next_freshness = 0.0

    def silent_devices(self, silent_after: float, now: float) -> int:
        """How many known devices sent nothing for ``silent_after`` seconds."""
        cutoff = now - silent_after
        return sum(1 for t in self.last_seen.values() if t < cutoff)

    def _take(self, received: list[Received]) -> None:
        for inbound, token in received:
            self._map_one(inbound, token)
        if received:
            self._wake.set()
        if not self._paused and len(self._pending) >= self._high_water:
            self._paused = True
            self._source.pause()

    def _map_one(self, inbound: Inbound, token: AckToken | None) -> None:
        """Map one message and queue it for the next commit."""
        # Counted here in plain ints and added to the metrics once per commit: a Prometheus
        # counter takes a lock on every inc(), too dear per message at these rates.
        sparkplug = self._sparkplug
        route = (sparkplug.route_of(inbound.topic) if sparkplug else None) or (
            self._mapper.route_of(inbound.topic)
        )
        self._received_counts[route] = self._received_counts.get(route, 0) + 1
        if inbound.dup:
            self._dup_count += 1
        if inbound.retained_replay:
            # Acknowledged in its turn, with the commit of the messages around it.
            self._metrics.messages_skipped.labels("retained_replay").inc()
            self._pending.append(_Pending(token, [], None))
            return
        aliases: list[AliasRow] | None = None
        try:
            if sparkplug is not None:
                readings, aliases = self._map_sparkplug(inbound, sparkplug)
            else:
                readings = self._map(inbound)
            if readings is None:
                self._pending.append(_Pending(token, [], None, aliases))
                return
            if self.registry is not None:
                readings = self.registry.apply(readings)
            item = _Pending(token, readings, None, aliases)
            seen = self.last_seen
            for reading in readings:
                key = (reading.device_type, reading.device_id)
                if key in seen or len(seen) < self._max_tracked:
                    seen[key] = inbound.received_at
        except MessageSkipped as exc:
            # A preset's message that is not a reading (an LWT): acknowledged, counted.
            self._metrics.messages_skipped.labels(exc.reason).inc()
            item = _Pending(token, [], None)
        except MappingError as exc:
            if isinstance(exc, _WithAliases):
                aliases = exc.aliases
            self._metrics.messages_rejected.labels(exc.reason).inc()
            self._log_reject(inbound, exc)
            payload = inbound.payload
            if exc.reason == "payload_too_large":
                # Kept only as evidence: an oversized payload must not fill the spool.
                payload = payload[:_OVERSIZED_KEPT]
            item = _Pending(
                token,
                [],
                Reject(inbound.topic, payload, exc.reason, exc.detail, inbound.received_at),
                aliases,
            )
        self._pending.append(item)

    def _map_sparkplug(
        self, inbound: Inbound, sparkplug: SparkplugIntake
    ) -> tuple[list[Reading] | None, list[AliasRow] | None]:
        """Map through the Sparkplug routes when one takes the topic, else the mapper.

        Returns:
            The readings (``None``: the message is not a reading, counted as skipped) and the
            alias changes to commit with the message.

        Raises:
            MappingError: the message is dead-lettered.
        """
        if inbound.oversized or not inbound.topic.startswith(b"spBv1.0/"):
            return self._map(inbound), None
        try:
            outcome = sparkplug.map(inbound.topic, inbound.payload, inbound.received_at)
        except Exception as exc:
            log.exception("mapping failed unexpectedly; message dead-lettered")
            raise MappingError("mapping_failed", f"{type(exc).__name__}: {exc}"[:300]) from exc
        if outcome is None:
            return self._map(inbound), None
        if outcome.error is not None:
            raise _WithAliases(outcome.error, outcome.aliases)
        if outcome.skipped is not None:
            self._metrics.messages_skipped.labels(outcome.skipped).inc()
            return None, outcome.aliases
        return outcome.readings, outcome.aliases

    def _map(self, inbound: Inbound) -> list[Reading]:
        if inbound.oversized:
            raise MappingError(
                "payload_too_large",
                f"a packet of {inbound.oversized} bytes, over mqtt.max_payload_bytes;"
                " only its start was read",
            )
        try:
            return self._mapper.map(inbound.topic, inbound.payload, inbound.received_at)
        except (MappingError, MessageSkipped):
            raise
        except Exception as exc:
            # A bug, not bad input; still only this message is set aside, never the loop
            # (and the messages around it) with it.
            log.exception("mapping failed unexpectedly; message dead-lettered")
            raise MappingError("mapping_failed", f"{type(exc).__name__}: {exc}"[:300]) from exc

    async def stop(self, deadline: float) -> None:
        """Commit and acknowledge what is pending, then let :meth:`run` return.

        Bounded by ``deadline``: a full spool leaves the rest unacknowledged, with the broker.
        """
        self._stopping = True
        if self._receiver is not None:
            self._receiver.cancel()
        self._wake.set()
        await self._finished.wait(deadline)

    async def run(self) -> None:
        """Receive and commit messages until stopped, then commit what is left."""
        try:
            async with asyncio.TaskGroup() as tg:
                self._receiver = tg.create_task(self._receive_loop(), name="ingest-receive")
                await self._commit_loop()
                self._receiver.cancel()
        finally:
            self._finished.set()

    async def _receive_loop(self) -> None:
        while True:
            self._take(await self._source.receive())

    async def _commit_loop(self) -> None:
        while True:
            self._flush_counts()
            if self._stopping:
                # The source is paused: what it still holds is the last of it.
                self._take(self._source.receive_nowait())
            if not self._pending:
                if self._stopping:
                    return
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), 1.0)
                continue
            chunk = self._pending[: self._commit_max]
            readings = [r for p in chunk for r in p.readings]
            rejects = [p.reject for p in chunk if p.reject is not None]
            aliases = [a for p in chunk if p.aliases for a in p.aliases]
            try:
                rows = await self._spool.put(readings, rejects, aliases)
            except SpoolError:
                # Full or failing: the spool reports it (readiness, metrics, log); the messages
                # stay unacknowledged, with the broker, until a commit succeeds.
                if self._stopping:
                    return
                await asyncio.sleep(1.0)
                continue
            del self._pending[: len(chunk)]
            self._source.ack([p.token for p in chunk if p.token is not None])
            self._metrics.readings_accepted.inc(len(rows))
            self._metrics.messages_accepted.inc(
                sum(1 for p in chunk if p.reject is None and p.readings)
            )
            self._metrics.mqtt_unacked.set(len(self._pending))
            self._feeder.offer(rows)
            if self._paused and len(self._pending) < self._high_water // 2:
                self._paused = False
                self._source.resume()

    def _flush_counts(self) -> None:
        counts, self._received_counts = self._received_counts, {}
        for route, n in counts.items():
            self._metrics.messages_received.labels(route).inc(n)
        if self._dup_count:
            self._metrics.messages_redelivered.inc(self._dup_count)
            self._dup_count = 0
        self._metrics.mqtt_unacked.set(len(self._pending))
        now = time.monotonic()
        if now >= self._next_freshness:
            self._next_freshness = now + 1.0
            self._metrics.devices_seen.set(len(self.last_seen))
            self._metrics.devices_silent.set(self.silent_devices(self._silent_after, time.time()))

    def _log_reject(self, inbound: Inbound, exc: MappingError) -> None:
        self._reject_log.log(
            exc.reason,
            logging.WARNING,
            "message rejected, dead-lettered",
            {
                "reason": exc.reason,
                "detail": exc.detail,
                "topic": inbound.topic[:200].decode("utf-8", "backslashreplace"),
                "payload_preview": inbound.payload[:_REJECT_PREVIEW].decode("utf-8", "replace"),
            },
        )
