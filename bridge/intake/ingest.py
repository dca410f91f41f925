"""Ingest: MQTT message -> readings (or a reject) -> group commit -> ack -> feeder.

``on_message`` runs on the event loop for every message: it maps the payload right away
(pure and fast) and queues the outcome. The ingest task then commits whatever has queued up
in ONE spool transaction, acknowledges those messages in the order they arrived, and hands the
stored rows to the feeder. Nothing is acknowledged before its reading (or its dead letter) is
on disk; when the spool is full nothing is acknowledged at all, so the broker keeps the rest.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from bridge.errors import MappingError, SpoolError, SpoolFullError
from bridge.health import SPOOL_FULL, Health
from bridge.intake.mapping import Mapper
from bridge.intake.mqtt import AckToken
from bridge.logs import Throttled
from bridge.models import Inbound, Reading
from bridge.push.feeder import Feeder
from bridge.spool.store import Reject
from bridge.spool.thread import SpoolWriter
from bridge.telemetry import Metrics

__all__ = ["Ingest"]

log = logging.getLogger("bridge.intake.ingest")

_REJECT_PREVIEW = 120
_OVERSIZED_KEPT = 1024


@dataclass(slots=True)
class _Pending:
    token: AckToken | None
    readings: list[Reading]
    reject: Reject | None


class Ingest:
    """Maps messages and commits them to the spool in groups.

    Args:
        mapper: topic + payload -> readings.
        writer: the spool.
        feeder: receives the stored rows.
        ack: acknowledges committed messages (``MqttSource.ack``).
        pause, resume: stop / restart reading the broker when too much is pending.
        commit_max: most messages per transaction.
        high_water: pending messages at which reading is paused.
    """

    def __init__(
        self,
        *,
        mapper: Mapper,
        writer: SpoolWriter,
        feeder: Feeder,
        ack: Callable[[Sequence[AckToken]], int],
        pause: Callable[[], None],
        resume: Callable[[], None],
        metrics: Metrics,
        health: Health,
        commit_max: int,
        high_water: int,
        max_tracked_devices: int = 100_000,
    ) -> None:
        self._mapper = mapper
        self._writer = writer
        self._feeder = feeder
        self._ack = ack
        self._pause = pause
        self._resume = resume
        self._metrics = metrics
        self._health = health
        self._commit_max = commit_max
        self._high_water = high_water
        self._pending: list[_Pending] = []
        # device -> last receive time, for the freshness gauges (bounded).
        self.last_seen: dict[tuple[str, str | None], float] = {}
        self._max_tracked = max_tracked_devices
        self._wake = asyncio.Event()
        self._paused = False
        self._stopping = False
        self._reject_log = Throttled(log)
        self._full_log = Throttled(log)
        self._received_counts: dict[str, int] = {}

    def silent_devices(self, silent_after: float, now: float) -> int:
        """How many known devices sent nothing for ``silent_after`` seconds."""
        cutoff = now - silent_after
        return sum(1 for t in self.last_seen.values() if t < cutoff)

    @property
    def pending(self) -> int:
        """Messages received but not yet committed."""
        return len(self._pending)

    def on_message(self, inbound: Inbound, token: AckToken | None) -> None:
        """Map one message and queue it for the next commit (called on the event loop)."""
        # Counted here in plain ints and added to the metrics once per commit: a Prometheus
        # counter takes a lock on every inc(), too dear per message at these rates.
        route = self._mapper.route_of(inbound.topic)
        self._received_counts[route] = self._received_counts.get(route, 0) + 1
        try:
            readings = self._mapper.map(inbound.topic, inbound.payload, inbound.received_at)
            item = _Pending(token, readings, None)
            seen = self.last_seen
            for reading in readings:
                key = (reading.device_type, reading.device_id)
                if key in seen or len(seen) < self._max_tracked:
                    seen[key] = inbound.received_at
        except MappingError as exc:
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
            )
        self._pending.append(item)
        self._wake.set()
        if not self._paused and len(self._pending) >= self._high_water:
            self._paused = True
            self._pause()

    def stop(self) -> None:
        """Commit what is pending, then return from :meth:`run`."""
        self._stopping = True
        self._wake.set()

    def _flush_counts(self) -> None:
        counts, self._received_counts = self._received_counts, {}
        for route, n in counts.items():
            self._metrics.messages_received.labels(route).inc(n)
        self._metrics.mqtt_unacked.set(len(self._pending))

    async def run(self) -> None:
        """Commit pending messages in groups until stopped and drained."""
        while True:
            self._flush_counts()
            if not self._pending:
                if self._stopping:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            chunk = self._pending[: self._commit_max]
            readings = [r for p in chunk for r in p.readings]
            rejects = [p.reject for p in chunk if p.reject is not None]
            try:
                rows = await self._writer.put(readings, rejects)
            except SpoolFullError as exc:
                self._full_log.log(
                    "full", logging.WARNING, "spool full, holding messages", {"detail": str(exc)}
                )
                self._health.set("spool", SPOOL_FULL)
                self._metrics.spool_full.set(1)
                if self._stopping:
                    return  # unacked: the broker keeps them
                await asyncio.sleep(1.0)
                continue
            except SpoolError as exc:
                self._full_log.log(
                    "error", logging.ERROR, "spool write failed, retrying", {"detail": str(exc)}
                )
                self._health.set("spool", "spool write failed (see the log)")
                if self._stopping:
                    return
                await asyncio.sleep(1.0)
                continue
            if "spool" in self._health.problems:
                self._metrics.spool_full.set(0)
                self._health.set("spool", None)
            del self._pending[: len(chunk)]
            self._ack([p.token for p in chunk if p.token is not None])
            self._metrics.readings_accepted.inc(len(rows))
            self._metrics.messages_accepted.inc(len(chunk) - len(rejects))
            self._metrics.mqtt_unacked.set(len(self._pending))
            self._feeder.offer(rows)
            if self._paused and len(self._pending) < self._high_water // 2:
                self._paused = False
                self._resume()

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
