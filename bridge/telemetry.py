"""Every Prometheus metric of energy-bridge, defined once.

Names follow ``bridge_<noun>_<unit>[_total]``; labels are low-cardinality (route template,
reason code, outcome, error code, readiness condition). Labelled series that are known up front
are created at zero, so dashboards show 0 rather than "no data" and alerts see the first
increase. Counters reconcile:

* ``messages received = messages accepted + messages rejected + messages skipped``, and
* ``readings accepted = delivered + dead-lettered + still spooled``.
"""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
)

from bridge import __version__

__all__ = ["Metrics"]

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 300, 900, 3600)


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
            "Messages that are not readings and need none (retained copies seen before), by"
            " reason; acknowledged, not dead-lettered",
            ["reason"],
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
        self.e2e_latency = Histogram(
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

    def precreate(self, *, routes: list[str], reasons: tuple[str, ...]) -> None:
        """Create the labelled series known at start at zero."""
        for route in [*routes, "none"]:
            self.messages_received.labels(route)
        for reason in reasons:
            self.messages_rejected.labels(reason)
        self.messages_skipped.labels("retained_replay")
        for condition in ("mqtt", "spool", "cloud"):
            self.not_ready.labels(condition).set(0)
        for source in ("mapping", "cloud"):
            self.dead_letters.labels(source).set(0)
            self.dead_letters_evicted.labels(source)
