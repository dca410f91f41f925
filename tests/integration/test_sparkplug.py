"""Sparkplug B end to end: a private mosquitto, the cloud stub and `energy-bridge run`.

Payloads are written with Google's protobuf runtime (tests/support/sparkplug.py); the group,
edge node, device and metric names are invented (Sparkplug has no standard meter names).
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest

from bridge.intake.sparkplug import REBIRTH_METRIC, decode_payload
from tests.support import (
    BridgeFactory,
    BridgeProcess,
    Mosquitto,
    Publisher,
    StubProcess,
    Subscriber,
    wait_until,
)
from tests.support.sparkplug import BOOLEAN, DOUBLE, FLOAT, INT32, INT64, spb

pytestmark = pytest.mark.integration

T_MS = 1_700_000_000_000  # 2023-11-15 06:13:20 in Asia/Shanghai
NBIRTH = (
    "spBv1.0/plant/NBIRTH/edge-1",
    spb(
        {"name": "bdSeq", "datatype": INT64, "long_value": 0},
        {"name": "Node Control/Rebirth", "datatype": BOOLEAN, "boolean_value": False},
        {"name": "Cabinet/Temperature", "alias": 9, "datatype": DOUBLE, "double_value": 31.5},
        timestamp=T_MS,
        seq=0,
    ),
)
DBIRTH = (
    "spBv1.0/plant/DBIRTH/edge-1/meter-1",
    spb(
        {"name": "Voltage", "alias": 1, "datatype": FLOAT, "float_value": 230.0},
        {"name": "Power", "alias": 2, "datatype": INT32, "int_value": 1500},
        timestamp=T_MS,
        seq=1,
    ),
)
DDATA = (
    "spBv1.0/plant/DDATA/edge-1/meter-1",
    spb(
        # Int32 -118 as Sparkplug writers put it on the wire: the uint32 4294967178.
        {"alias": 2, "timestamp": T_MS + 60_000, "int_value": 4294967178},
        {"alias": 1, "timestamp": T_MS + 60_000, "float_value": 229.3},
        timestamp=T_MS + 60_000,
        seq=2,
    ),
)
NDEATH = ("spBv1.0/plant/NDEATH/edge-1", spb({"name": "bdSeq", "datatype": INT64, "long_value": 0}))

BIRTH_ENTRIES = [
    ("edge-1", "2023-11-15 06:13:20", {"Cabinet/Temperature": "31.5"}),
    ("edge-1/meter-1", "2023-11-15 06:13:20", {"Voltage": "230", "Power": "1500"}),
]
DATA_ENTRY = ("edge-1/meter-1", "2023-11-15 06:14:20", {"Power": "-118", "Voltage": "229.3"})


def _route(**extra: Any) -> dict[str, Any]:
    return {"format": "sparkplug-b", "device_type": "1", **extra}


def _entries(stub: StubProcess) -> list[tuple[str, str, dict[str, str]]]:
    return sorted(
        (e["deviceId"], e["recordTime"], e["data"])
        for e in stub.received()
        if e["deviceType"] == "1"
    )


def _delivered(stub: StubProcess) -> int:
    return int(stub.stats()["entries_accepted"])


def _dead_letters(bridge: BridgeProcess) -> list[tuple[str, str]]:
    spool = Path(str(bridge.config_path.parent / "spool.db"))
    with sqlite3.connect(spool) as db:
        return [(str(r), str(t)) for r, t in db.execute("SELECT reason, topic FROM dead_letters")]


def test_sparkplug_births_and_ddata_arrive_with_exact_values(
    mosquitto: Mosquitto, stub: StubProcess, bridge_factory: BridgeFactory
) -> None:
    """Test that NBIRTH, DBIRTH and an alias-only DDATA arrive as readings; NDEATH is skipped.

    Int32 -118 sent as 4294967178 arrives as "-118", Float 229.3 as "229.3"; the deviceIds are
    edge and edge/device, the recordTime from the metrics' timestamps; the NDEATH is counted.
    """
    bridge = bridge_factory(routes=[_route()])

    with Publisher(mosquitto.host, mosquitto.port) as pub:
        pub.publish_many([NBIRTH, DBIRTH, DDATA, NDEATH])
    wait_until(lambda: _delivered(stub) >= 3, 30, message="births and DDATA delivered")

    assert sorted([*BIRTH_ENTRIES, DATA_ENTRY]) == _entries(stub)
    wait_until(
        lambda: bridge.metric("bridge_messages_skipped_total", reason="sparkplug_ndeath") == 1,
        10,
        message="the NDEATH counted as skipped",
    )
    wait_until(
        lambda: bridge.metric("bridge_messages_received_total", route="spBv1.0/#") == 4,
        10,
        message="4 messages counted on the route",
    )
    assert 0 == bridge.metric("bridge_messages_rejected_total")


@pytest.mark.parametrize("stop", ["terminate", "kill"])
def test_sparkplug_ddata_queued_while_the_bridge_was_down_decodes_after_restart(
    mosquitto: Mosquitto, stub: StubProcess, bridge_factory: BridgeFactory, stop: str
) -> None:
    """Test that the aliases of a DBIRTH survive a bridge restart, clean stop or crash.

    A DDATA that waited in the persistent session's backlog while the bridge was down (stopped,
    or SIGKILLed) is decoded when it comes back.
    """
    bridge = bridge_factory(routes=[_route()])
    with Publisher(mosquitto.host, mosquitto.port) as pub:
        pub.publish_many([NBIRTH, DBIRTH])
        wait_until(lambda: _delivered(stub) >= 2, 30, message="the births delivered")
        # Their rows deleted too, so a crash does not send them twice.
        wait_until(lambda: bridge.metric("bridge_spool_readings") == 0, 10, message="spooled")
        if stop == "kill":
            bridge.kill()
        else:
            assert 0 == bridge.terminate()

        pub.publish_many([DDATA])
    bridge.start().wait_ready()
    wait_until(lambda: _delivered(stub) >= 3, 30, message="the DDATA delivered after restart")

    assert sorted([*BIRTH_ENTRIES, DATA_ENTRY]) == _entries(stub)
    assert 0 == bridge.metric("bridge_messages_rejected_total", reason="unknown_alias")


def test_sparkplug_unknown_alias_is_dead_lettered_and_a_rebirth_requested(
    mosquitto: Mosquitto, stub: StubProcess, bridge_factory: BridgeFactory
) -> None:
    """Test that a DDATA with undefined aliases is dead-lettered and triggers a rebirth request.

    It is dead-lettered as unknown_alias and counted, and answered with an NCMD Node
    Control/Rebirth = true on the broker; the births the node then sends make its next DDATA
    decode.
    """
    with Subscriber(mosquitto.host, mosquitto.port, ["spBv1.0/+/NCMD/#"]) as commands:
        bridge = bridge_factory(routes=[_route(request_rebirth=True)])
        with Publisher(mosquitto.host, mosquitto.port) as pub:
            pub.publish_many([DDATA])
            (request,) = commands.wait_for(1, 15)
            wait_until(
                lambda: (
                    bridge.metric("bridge_messages_rejected_total", reason="unknown_alias") == 1
                ),
                10,
                message="the unknown alias counted",
            )
            pub.publish_many([NBIRTH, DBIRTH, DDATA])
        wait_until(lambda: _delivered(stub) >= 3, 30, message="births and DDATA after rebirth")

    topic, payload = request
    (metric,) = decode_payload(payload).metrics
    assert ("spBv1.0/plant/NCMD/edge-1", REBIRTH_METRIC, True) == (
        topic,
        metric.name,
        metric.value,
    )
    assert 1 == bridge.metric("bridge_sparkplug_rebirth_requests_total")
    assert [("unknown_alias", DDATA[0])] == _dead_letters(bridge)
    assert sorted([*BIRTH_ENTRIES, DATA_ENTRY]) == _entries(stub)
