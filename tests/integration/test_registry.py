"""The device registry end to end: ids mapped, unknown ids rejected, SIGHUP reloads.

A bad file sent with SIGHUP keeps the table in use.
"""

from __future__ import annotations

import os
import signal
import sqlite3
from pathlib import Path

import pytest

from tests.support import (
    BridgeFactory,
    BridgeProcess,
    Mosquitto,
    Publisher,
    StubProcess,
    wait_until,
)

pytestmark = pytest.mark.integration

TOPIC = "meters/1/{}/telemetry"


def _message(device: str, n: int) -> tuple[str, bytes]:
    return TOPIC.format(device), f'{{"ts": {1_700_000_000 + n}, "Ua": 226.{n}}}'.encode()


def _pushed(stub: StubProcess) -> list[tuple[str, str, str]]:
    return sorted((e["deviceType"], e["deviceId"], e["data"]["Ua"]) for e in stub.received())


def _dead_letters(bridge: BridgeProcess) -> list[tuple[str, str]]:
    with sqlite3.connect(bridge.config_path.parent / "spool.db") as db:
        return [(str(r), str(t)) for r, t in db.execute("SELECT reason, topic FROM dead_letters")]


def _sighup(bridge: BridgeProcess, result: str) -> None:
    """Send SIGHUP and wait for the first registry reload with ``result``."""
    assert bridge.pid is not None
    os.kill(bridge.pid, signal.SIGHUP)
    wait_until(
        lambda: bridge.metric("bridge_registry_reloads_total", result=result) > 0,
        10,
        message=f"registry reload {result}",
    )


def test_registry_maps_ids_rejects_unknown_and_keeps_its_table_on_a_bad_reload(
    mosquitto: Mosquitto, stub: StubProcess, bridge_factory: BridgeFactory, tmp_path: Path
) -> None:
    """Test that the registry maps and rejects ids and that SIGHUP reloads only a good file.

    Listed ids are pushed as the registry says (device type too), an unlisted id is
    dead-lettered (unknown_device) with `unknown: reject`, a broken file sent with SIGHUP is
    refused with a log line naming its line while the old table stays in use, and a good file
    sent with SIGHUP takes effect.
    """
    ids = tmp_path / "ids.csv"
    ids.write_text("source_id,device_id,device_type\nm-1,EE-0001,2\n", encoding="utf-8")
    bridge = bridge_factory(registry={"file": str(ids), "unknown": "reject"})

    with Publisher(mosquitto.host, mosquitto.port) as pub:
        pub.publish_many([_message("m-1", 1), _message("m-9", 2)])
        wait_until(lambda: stub.stats()["entries_accepted"] >= 1, 30, message="m-1 pushed")
        wait_until(
            lambda: bridge.metric("bridge_messages_rejected_total", reason="unknown_device") == 1,
            10,
            message="m-9 rejected",
        )

        ids.write_text("source_id,device_id\nm-1,EE-0001\nm-9,EE-0009,1,x\n", encoding="utf-8")
        _sighup(bridge, "failed")
        pub.publish_many([_message("m-1", 3), _message("m-9", 4)])
        wait_until(lambda: stub.stats()["entries_accepted"] >= 2, 30, message="m-1 again")
        wait_until(
            lambda: bridge.metric("bridge_messages_rejected_total", reason="unknown_device") == 2,
            10,
            message="m-9 rejected by the old table",
        )

        ids.write_text("source_id,device_id\nm-1,EE-0001\nm-9,EE-0009\n", encoding="utf-8")
        _sighup(bridge, "ok")
        pub.publish_many([_message("m-9", 5)])
        wait_until(lambda: stub.stats()["entries_accepted"] >= 3, 30, message="m-9 pushed")

    assert [("1", "EE-0009", "226.5"), ("2", "EE-0001", "226.1"), ("2", "EE-0001", "226.3")] == (
        _pushed(stub)
    )
    assert [("unknown_device", TOPIC.format("m-9"))] * 2 == _dead_letters(bridge)
    assert f"{ids} line 3" in bridge.log_text()
