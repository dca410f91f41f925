"""Every Prometheus metric of energy-bridge, defined once.

Names follow ``bridge_<noun>_<unit>[_total]``; labels are low-cardinality (route template,
reason code, outcome, error code, readiness condition). Labelled series that are known up front
are created at zero, so dashboards show 0 rather than "no data" and alerts see the first
increase. Counters reconcile:

* ``messages received = messages accepted + messages rejected + messages skipped``, and
* ``readings accepted = delivered + dead-lettered + still spooled``.
"""

from __future__ import annotations

import threading
import time
from bisect import bisect_left
from collections.abc import Iterable, Iterator, Sequence

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.core import HistogramMetricFamily
from prometheus_client.registry import Collector

from bridge import __version__

__all__ = ["AgeHistogram", "Metrics"]

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 300, 900, 3600)


class AgeHistogram(Collector):
    """A Prometheus histogram of ages, observed a batch at a time.

    ``prometheus_client.Histogram.observe`` takes a lock and walks the buckets for each value;
    the end-to-end latency is observed for every delivered reading (thousands per second), where
    that cost showed up in the profile (~3 % of the bridge's CPU). Here a batch's ages are sorted
    into the buckets with one lock taken. The exposition is the same as a ``Histogram``'s
    (``_bucket{le}`` cumulative, ``_sum``, ``_count``).
    """

    def __init__(
        self, name: str, documentation: str, buckets: Sequence[float], registry: CollectorRegistry
    ) -> None:
        """Register the histogram.

        Args:
            name: the metric name, without ``_bucket``/``_sum``/``_count``.
            documentation: the help text.
            buckets: the finite upper bounds, ascending (``+Inf`` is added).
            registry: where it is exposed.
        """
        self._name = name
        self._documentation = documentation
        self._bounds = tuple(float(b) for b in buckets)
        if list(self._bounds) != sorted(set(self._bounds)):
            raise ValueError("buckets must be strictly ascending")
        self._counts = [0] * (len(self._bounds) + 1)  # the last one is +Inf
        self._sum = 0.0
        self._lock = threading.Lock()  # collect() runs in the HTTP server's thread
        registry.register(self)

    def observe_ages(self, received_ats: Iterable[float], now: float | None = None) -> None:
        """Observe ``now - t`` for every ``t`` (epoch seconds); ``now`` defaults to the clock."""
        if now is None:
            now = time.time()
        bounds = self._bounds
        local = [0] * len(self._counts)
        total = 0.0
        for received in received_ats:
            age = now - received
            total += age
            # le is inclusive: an age equal to a bound belongs to that bound's bucket.
            local[bisect_left(bounds, age)] += 1
        with self._lock:
            counts = self._counts
            for index, count in enumerate(local):
                if count:
                    counts[index] += count
            self._sum += total

    def collect(self) -> Iterator[HistogramMetricFamily]:
        """Yield the cumulative buckets, the sum and the count."""
        with self._lock:
            counts = list(self._counts)
            total = self._sum
        buckets: list[tuple[str, float]] = []
        running = 0
        for bound, count in zip((*self._bounds, float("inf")), counts, strict=True):
            running += count
            buckets.append(("+Inf" if bound == float("inf") else _le(bound), running))
        family = HistogramMetricFamily(self._name, self._documentation)
        family.add_metric([], buckets, total)
        yield family


def _le(bound: float) -> str:
    """The ``le`` label text Prometheus' own client writes for a bound (``5.0``, ``0.05``)."""
    return repr(float(bound))


class Metrics:
    """The bridge's metrics, registered in one registry.

    A fresh registry per app, so tests can run several apps in one process.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        ProcessCollector(registry=r)  # process_resident_memory_bytes, cpu, open fds, start time
        PlatformCollector(registry=r)
        self.build_info = Info("bridge_build", "energy-bridge build information", registry=r)
        self.build_info.info({"version": __version__})
        self.replica_info = Info(
            "bridge_replica",
            "Which replica this is: its MQTT client id, host name and share group (empty when"
            " it does not share)",
            registry=r,
        )
        # Known labels from the start (the app fills them in): dashboards and rules join on them.
        self.replica_info.info({"client_id": "", "hostname": "", "share_group": ""})

        # Intake
        self.messages_received = Counter(
            "bridge_messages_received_total", "MQTT messages received", ["route"], registry=r
        )
        self.messages_accepted = Counter(
            "bridge_messages_accepted_total",
            "Messages mapped to readings and committed to the spool",
            registry=r,
        )
        self.readings_accepted = Counter(
            "bridge_readings_accepted_total", "Readings committed to the spool", registry=r
        )
        self.messages_redelivered = Counter(
            "bridge_mqtt_redelivered_messages_total",
            "QoS 1 messages the broker sent again (DUP flag): an earlier copy may already be"
            " in the spool (its ack was lost with the connection or a crash)",
            registry=r,
        )
        self.messages_skipped = Counter(
            "bridge_messages_skipped_total",
            "Messages that are not readings and need none (retained copies seen before, a"
            " preset family's status, availability and metadata messages), by reason;"
            " acknowledged, not dead-lettered",
            ["reason"],
            registry=r,
        )
        self.sparkplug_rebirths = Counter(
            "bridge_sparkplug_rebirth_requests_total",
            "Sparkplug rebirth requests (NCMD Node Control/Rebirth) sent to edge nodes whose"
            " aliases the bridge did not know",
            registry=r,
        )
        self.registry_reloads = Counter(
            "bridge_registry_reloads_total",
            "Re-reads of the device registry (SIGHUP), by result (ok, failed: the previous"
            " table stays)",
            ["result"],
            registry=r,
        )
        self.messages_rejected = Counter(
            "bridge_messages_rejected_total",
            "Messages that could not be mapped, by reason (each dead-lettered)",
            ["reason"],
            registry=r,
        )
        # Delivery
        self.readings_delivered = Counter(
            "bridge_readings_delivered_total", "Readings accepted by the cloud", registry=r
        )
        self.readings_dead_lettered = Counter(
            "bridge_readings_dead_lettered_total",
            "Spooled readings the cloud refused permanently, by code",
            ["code"],
            registry=r,
        )
        self.readings_redelivered = Counter(
            "bridge_readings_redelivered_total",
            "Readings sent again that the cloud may already have (after a crash or timeout)",
            registry=r,
        )
        self.push_requests = Counter(
            "bridge_push_requests_total",
            "Push attempts by outcome and error code",
            ["outcome", "code"],
            registry=r,
        )
        self.push_retries = Counter(
            "bridge_push_retries_total", "Push attempts that were retries", registry=r
        )
        self.push_latency = Histogram(
            "bridge_push_latency_seconds",
            "Duration of one push request",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_devices = Histogram(
            "bridge_batch_devices",
            "devices[] entries per request",
            buckets=(1, 5, 10, 25, 50, 100, 250, 500, 1000),
            registry=r,
        )
        self.batch_bytes = Histogram(
            "bridge_batch_bytes",
            "Request body size",
            buckets=(1e3, 4e3, 16e3, 64e3, 128e3, 256e3, 512e3, 1e6, 4e6),
            registry=r,
        )
        self.requests_in_flight = Gauge(
            "bridge_push_requests_in_flight", "Push requests under way", registry=r
        )
        self.concurrency_limit = Gauge(
            "bridge_push_concurrency_limit", "Current adaptive concurrency limit", registry=r
        )
        self.e2e_latency = AgeHistogram(
            "bridge_end_to_end_latency_seconds",
            "From MQTT receipt to acceptance by the cloud",
            buckets=_E2E_BUCKETS,
            registry=r,
        )
        # Spool
        self.spool_readings = Gauge(
            "bridge_spool_readings", "Readings in the spool awaiting delivery", registry=r
        )
        self.spool_bytes = Gauge("bridge_spool_bytes", "Bytes used by the spool", registry=r)
        self.spool_max_bytes = Gauge(
            "bridge_spool_max_bytes", "Configured spool.max_bytes", registry=r
        )
        self.spool_full = Gauge(
            "bridge_spool_full", "1 while the spool refuses new readings", registry=r
        )
        self.spool_oldest_age = Gauge(
            "bridge_spool_oldest_reading_age_seconds",
            "Age of the oldest undelivered reading (receipt to now): the delivery lag",
            registry=r,
        )
        self.spool_commits = Counter(
            "bridge_spool_commits_total", "Spool transactions committed", registry=r
        )
        self.spool_commit_latency = Histogram(
            "bridge_spool_commit_seconds",
            "Duration of one spool transaction",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.dead_letters_evicted = Counter(
            "bridge_dead_letters_evicted_total",
            "Oldest dead letters dropped to keep a source within its budget, by source",
            ["source"],
            registry=r,
        )
        self.dead_letters = Gauge(
            "bridge_dead_letters",
            "Entries in the dead-letter store, by source (mapping, cloud)",
            ["source"],
            registry=r,
        )
        # MQTT
        self.mqtt_connected = Gauge(
            "bridge_mqtt_connected", "1 while connected to the broker", registry=r
        )
        self.mqtt_session_takeovers = Counter(
            "bridge_mqtt_session_takeovers_total",
            "Times the broker said another connection with our client id took the session"
            " (MQTT v5 reason 142; mosquitto 2.0 does not say it)",
            registry=r,
        )
        self.mqtt_short_connections = Counter(
            "bridge_mqtt_short_connections_total",
            "Connections the broker closed within 10 s of CONNACK (a takeover loop, a broker"
            " refusing us)",
            registry=r,
        )
        self.mqtt_reconnects = Counter(
            "bridge_mqtt_reconnects_total", "Connections made after the first", registry=r
        )
        self.mqtt_subscriptions = Gauge(
            "bridge_mqtt_subscriptions", "Topic filters currently subscribed", registry=r
        )
        self.mqtt_unacked = Gauge(
            "bridge_mqtt_unacked_messages",
            "QoS 1 messages received but not yet acknowledged (awaiting spool commit)",
            registry=r,
        )
        # Health
        self.ready = Gauge("bridge_ready", "1 while /readyz answers 200", registry=r)
        self.not_ready = Gauge(
            "bridge_not_ready",
            "1 while a readiness condition (mqtt, spool, cloud) reports a problem",
            ["condition"],
            registry=r,
        )
        self.devices_silent = Gauge(
            "bridge_devices_silent",
            "Devices seen before that sent nothing for more than the silence threshold",
            registry=r,
        )
        self.devices_seen = Gauge(
            "bridge_devices_seen", "Distinct devices seen since start", registry=r
        )

    def precreate(
        self,
        *,
        routes: list[str],
        reasons: tuple[str, ...],
        skip_reasons: tuple[str, ...] = (),
    ) -> None:
        """Create the labelled series known at start at zero."""
        for route in [*routes, "none"]:
            self.messages_received.labels(route)
        for reason in reasons:
            self.messages_rejected.labels(reason)
        for reason in ("retained_replay", *skip_reasons):
            self.messages_skipped.labels(reason)
        for result in ("ok", "failed"):
            self.registry_reloads.labels(result)
        for condition in ("mqtt", "spool", "cloud"):
            self.not_ready.labels(condition).set(0)
        for source in ("mapping", "cloud"):
            self.dead_letters.labels(source).set(0)
            self.dead_letters_evicted.labels(source)
