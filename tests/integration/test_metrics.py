"""The metrics reconcile after a run: every message and every reading is accounted for."""

from __future__ import annotations

from decimal import Decimal

import pytest

from tests.support import (
    START_TS,
    BridgeFactory,
    Mosquitto,
    Publisher,
    StubFactory,
    iter_telemetry,
    telemetry_payload,
    wait_until,
)

pytestmark = pytest.mark.integration


def test_counters_reconcile_after_a_run_with_rejects_and_refusals(
    mosquitto: Mosquitto, stub_factory: StubFactory, bridge_factory: BridgeFactory
) -> None:
    """Test that the message and reading counters reconcile exactly after a mixed run.

    Received = accepted + rejected (messages) and accepted = delivered +
    dead-lettered + spooled (readings), with bad messages and a refused entry in the run.
    """
    stub = stub_factory("--poison-point", "poison", "--error-rate", "0.1", "--seed", "7")
    bridge = bridge_factory(cloud_url=stub.url)
    good = list(iter_telemetry([f"rec-{i:02d}" for i in range(20)], 50, START_TS))
    bad = [("meters/1/rec-bad/telemetry", b"{nope")] * 7 + [("meters/x/rec-bad/telemetry", b"{}")]
    poisoned = ("meters/1/rec-p/telemetry", telemetry_payload(5_000, START_TS, poison=Decimal(1)))
    with Publisher(mosquitto.host, mosquitto.port) as pub:
        pub.publish_many([*good[:500], *bad, poisoned, *good[500:]])
    published = len(good) + len(bad) + 1

    def settled() -> dict[str, float] | None:
        # Done when every message arrived and every reading reached a final state (the spool
        # gauge alone is refreshed once a second and reads 0 before the first refresh).
        m = bridge.metrics()
        received = sum(v for k, v in m.items() if k.startswith("bridge_messages_received_total"))
        final = m["bridge_readings_delivered_total"] + sum(
            v for k, v in m.items() if k.startswith("bridge_readings_dead_lettered_total{")
        )
        if received < published or final < len(good) + 1 or m["bridge_spool_readings"] != 0:
            return None
        return m

    m = wait_until(settled, 60, message="every message received and the spool empty")

    def total(name: str) -> float:
        return sum(v for k, v in m.items() if k == name or k.startswith(name + "{"))

    received = total("bridge_messages_received_total")
    accepted_messages = total("bridge_messages_accepted_total")
    rejected = total("bridge_messages_rejected_total")
    accepted = total("bridge_readings_accepted_total")
    delivered = total("bridge_readings_delivered_total")
    dead = total("bridge_readings_dead_lettered_total")
    spooled = total("bridge_spool_readings")
    assert (published, 8.0, 1.0) == (received, rejected, dead)
    assert received == accepted_messages + rejected
    assert accepted == delivered + dead + spooled
    assert len(good) + 1 == accepted
