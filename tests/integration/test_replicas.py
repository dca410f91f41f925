"""Replicas sharing the load through the broker (``mqtt.share_group``) on one real Mosquitto.

Every reading carries a ``seq`` point; each test ends by reconciling what the cloud stub
received against what was published: nothing lost, duplicates counted and explained.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator

import pytest

from tests.support import (
    START_TS,
    BridgeFactory,
    BridgeProcess,
    Mosquitto,
    Publisher,
    StubProcess,
    seq_counts,
    telemetry_payload,
    wait_until,
)

pytestmark = pytest.mark.integration

GROUP = "eb"


def readings(first: int, count: int, meters: int) -> Iterator[tuple[str, bytes]]:
    """Readings ``first``..``first+count-1``: reading ``seq`` is meter ``seq % meters``'s
    reading number ``seq // meters`` (one second apart), so no two share a device and time."""
    for seq in range(first, first + count):
        topic = f"meters/1/meter-{seq % meters:04d}/telemetry"
        yield topic, telemetry_payload(seq, START_TS + seq // meters)


def received(bridge: BridgeProcess) -> int:
    """Messages this run of ``bridge`` received."""
    return int(bridge.metric("bridge_messages_received_total"))


def replica(bridge_factory: BridgeFactory, name: str, **overrides: object) -> BridgeProcess:
    """A bridge in the share group with client id ``name``."""
    return bridge_factory(mqtt={"client_id": name, "share_group": GROUP}, **overrides)


def test_replicas_share_the_load_and_a_graceful_stop_leaves_the_group(
    mosquitto: Mosquitto, stub: StubProcess, bridge_factory: BridgeFactory
) -> None:
    """Test that two replicas split the stream, that one stopped with SIGTERM first leaves the
    share group (the other gets everything meanwhile) and that it rejoins when started."""
    a = replica(bridge_factory, "eb-a")
    b = replica(bridge_factory, "eb-b")
    with Publisher(mosquitto.host, mosquitto.port) as pub:
        pub.publish_many(readings(0, 2_000, 20))
        wait_until(lambda: stub.stats()["entries_accepted"] >= 2_000, 60, message="first 2,000")
        first_split = (received(a), received(b))
        assert 2_000 == sum(first_split)
        assert min(first_split) > 0, first_split

        assert 0 == a.terminate()
        assert "unsubscribed from the share group" in a.log_text()
        # Nothing is queued for a's session any more: b gets every reading while a is away.
        pub.publish_many(readings(2_000, 1_000, 20))
        wait_until(lambda: stub.stats()["entries_accepted"] >= 3_000, 60, message="b takes all")
        assert first_split[1] + 1_000 == received(b)

        a.start()
        a.wait_ready()
        status, body = a.get("/readyz")
        identity = {"client_id": "eb-a", "hostname": socket.gethostname(), "share_group": GROUP}
        assert (200, identity) == (status, json.loads(body)["replica"])
        pub.publish_many(readings(3_000, 1_000, 20))
        wait_until(lambda: stub.stats()["entries_accepted"] >= 4_000, 60, message="all 4,000")
    assert received(a) > 0  # subscribed again on start
    assert 1 == a.metric("bridge_replica_info", client_id="eb-a", share_group=GROUP)
    counts = seq_counts(stub.received())
    assert ([], 0) == (
        sorted(set(range(4_000)) - set(counts)),
        sum(c - 1 for c in counts.values()),
    )
