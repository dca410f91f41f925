"""The MQTT edge against a real mosquitto: oversized messages, retained copies, takeovers.

Real processes; every scenario ends in an exact account.
"""

from __future__ import annotations

import sqlite3
import time
from typing import Any

import pytest

from tests.support import (
    START_TS,
    BridgeFactory,
    Mosquitto,
    MosquittoFactory,
    Publisher,
    StubProcess,
    seq_counts,
    telemetry_payload,
    wait_until,
)

pytestmark = pytest.mark.integration


def _dead_letters(bridge: Any) -> list[tuple[str, str]]:
    conn = sqlite3.connect(bridge.config_path.parent / "spool.db")
    try:
        rows = conn.execute("SELECT reason, topic FROM dead_letters").fetchall()
    finally:
        conn.close()
    return [(str(reason), str(topic)) for reason, topic in rows]


@pytest.mark.parametrize("protocol", ["v311", "v5"])
def test_an_oversized_message_neither_takes_the_memory_nor_the_messages_around_it(
    mosquitto: Mosquitto, stub: StubProcess, bridge_factory: BridgeFactory, protocol: str
) -> None:
    """Test that a 40 MB publish keeps memory bounded and every good reading delivered.

    A 40 MB publish between good readings leaves the bridge's memory bounded and
    every good reading delivered. v3.1.1: the bridge reads only the packet's start, drops the
    rest as it arrives and dead-letters the message (payload_too_large, first KiB kept). v5:
    the bridge announces its Maximum Packet Size and the broker does not send it at all.
    (Old: the whole payload was read first; 100 MB took RSS from 56 to 356 MB.)
    """
    bridge = bridge_factory(mqtt={"protocol": protocol})
    topic = "meters/1/meter-01/telemetry"
    with Publisher(mosquitto.host, mosquitto.port) as pub:
        pub.publish_many([(topic, telemetry_payload(n, START_TS + n)) for n in range(5)])
        pub.publish("meters/1/huge/telemetry", b"{" + b" " * (40 << 20) + b"}", timeout=60)
        pub.publish_many([(topic, telemetry_payload(n, START_TS + n)) for n in range(5, 10)])

    def ten_good() -> list[dict[str, Any]] | None:
        received = stub.received()
        return received if len(seq_counts(received)) >= 10 else None

    entries = wait_until(ten_good, 60, message="the 10 good readings")
    peak = bridge.peak_rss_mb
    dead = _dead_letters(bridge)
    assert dict.fromkeys(range(10), 1) == dict(seq_counts(entries))
    assert peak < 120, f"peak RSS {peak} MB"
    if protocol == "v311":
        assert [("payload_too_large", "meters/1/huge/telemetry")] == dead
    else:
        assert [] == dead


@pytest.mark.parametrize("protocol", ["v311", "v5"])
def test_a_retained_reading_is_ingested_once_however_often_the_bridge_reconnects(
    mosquitto: Mosquitto, stub: StubProcess, bridge_factory: BridgeFactory, protocol: str
) -> None:
    """Test that retained readings reach the cloud once and are not ingested again on reconnect.

    Retained readings (one with a time, one without) reach the cloud once, when
    the bridge's subscription is new, and are not ingested again after three broker restarts
    (old: a retained reading without time became a new reading at each reconnect).
    """
    with Publisher(mosquitto.host, mosquitto.port) as pub:
        pub.publish("meters/1/kept-1/telemetry", telemetry_payload(1, START_TS), retain=True)
        pub.publish("meters/1/kept-2/telemetry", b'{"Ua": 230.1, "seq": 2}', retain=True)
    bridge = bridge_factory(mqtt={"protocol": protocol})
    wait_until(lambda: len(stub.received()) >= 2, 30, message="the retained readings once")
    for _ in range(3):
        mosquitto.restart()
        wait_until(lambda: bridge.metric("bridge_mqtt_connected") == 1, 30, message="reconnect")
    with Publisher(mosquitto.host, mosquitto.port) as pub:
        pub.publish("meters/1/live/telemetry", telemetry_payload(3, START_TS + 3))

    def live() -> list[dict[str, Any]] | None:
        received = stub.received()
        return received if 3 in seq_counts(received) else None

    entries = wait_until(live, 30, message="live reading")

    assert {1: 1, 2: 1, 3: 1} == dict(seq_counts(entries))
    assert bridge.metric("bridge_messages_skipped_total", reason="retained_replay") >= (
        6 if protocol == "v311" else 0
    )


def test_two_bridges_with_one_client_id_report_it_and_do_not_fight(
    mosquitto_factory: MosquittoFactory, stub: StubProcess, bridge_factory: BridgeFactory
) -> None:
    """Test that two bridges with one client id back off instead of fighting over the session.

    When a second bridge connects with the same client id (an operator's mistake),
    both see the session taken over, report it in /readyz and a metric, and back off instead of
    taking the session from each other in a tight loop (old: 20 takeovers in 10 s).
    """
    broker = mosquitto_factory()
    first = bridge_factory(mqtt_port=broker.port, mqtt={"client_id": "plant-bridge"})
    second = bridge_factory(
        mqtt_port=broker.port, mqtt={"client_id": "plant-bridge"}, ready_timeout=None
    )

    def problems() -> list[str]:
        found = []
        for bridge in (first, second):
            try:
                status, body = bridge.get("/readyz")
            except OSError:  # not listening yet
                continue
            if status == 503 and b"session takeover" in body:
                found.append(body.decode())
        return found

    wait_until(problems, 30, message="a bridge reporting the takeover")
    name = "bridge_mqtt_short_connections_total"
    flaps_then = sum(b.metric(name) for b in (first, second))
    time.sleep(10)  # a measurement window, not a wait for a condition
    flaps = sum(b.metric(name) for b in (first, second)) - flaps_then

    assert flaps_then >= 3
    assert flaps <= 8, f"{flaps} sessions taken over in 10 s"
