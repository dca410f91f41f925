"""`energy-bridge dlq`: list, show, replay and purge dead letters."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from bridge.models import Reading
from bridge.spool.store import DeadLetter, Reject, SpoolStore
from tests.support import BridgeFactory, StubProcess, wait_until


def _dlq(
    tmp_path: Path, *args: str, config: Path | None = None
) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "bridge", "dlq", "--spool", str(tmp_path / "spool.db")]
    if config is not None:
        argv += ["--config", str(config)]
    return subprocess.run(
        [*argv, *args], capture_output=True, text=True, timeout=60, check=False, env=os.environ
    )


def _lines(result: subprocess.CompletedProcess[str]) -> list[dict[str, object]]:
    assert 0 == result.returncode, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


def _spool_with_dead_letters(tmp_path: Path) -> None:
    spool = SpoolStore.open(tmp_path / "spool.db", max_bytes=1 << 30)
    reading = Reading("1", "m-1", 1631097600, "2021-09-08 18:40:00", {"Ua": "226.1"}, 1.0)
    (rid,) = spool.commit([reading], []).ids
    spool.commit(
        [],
        [
            Reject(b"meters/1/m-2/telemetry", b"not json", "bad_json", "bad", 2.0),
            Reject(b"plant/m-3/data", b'{"ts": 1631097600, "Ua": 230.5}', "no_route", "x", 3.0),
        ],
        dead=[DeadLetter(rid, "InvalidParameter", "devices[0] refused")],
    )
    spool.close()


def test_dlq_list_filters_by_reason_and_source(tmp_path: Path) -> None:
    """Test that `dlq list` prints one line per dead letter and honours its filters."""
    _spool_with_dead_letters(tmp_path)
    everything = _lines(_dlq(tmp_path, "list"))
    no_route = _lines(_dlq(tmp_path, "list", "--reason", "no_route"))
    cloud = _lines(_dlq(tmp_path, "list", "--source", "cloud"))
    assert 3 == len(everything)
    assert ["plant/m-3/data"] == [e["topic"] for e in no_route]
    assert [("InvalidParameter", "m-1")] == [(e["reason"], e["deviceId"]) for e in cloud]


def test_dlq_show_prints_the_payload(tmp_path: Path) -> None:
    """Test that `dlq show ID` prints the entry with its payload text."""
    _spool_with_dead_letters(tmp_path)
    (entry,) = _lines(_dlq(tmp_path, "list", "--reason", "bad_json"))
    shown = json.loads(_dlq(tmp_path, "show", str(entry["id"])).stdout)
    assert ("not json", "bad_json") == (shown["payload"], shown["reason"])


def test_dlq_replay_maps_again_with_the_fixed_config(tmp_path: Path) -> None:
    """Test that after adding a route, `dlq replay` moves the fixed message into the spool."""
    _spool_with_dead_letters(tmp_path)
    config = tmp_path / "bridge.yaml"
    config.write_text(
        "routes:\n"
        "  - topic: 'meters/{deviceType}/{deviceId}/telemetry'\n"
        "  - topic: 'plant/{deviceId}/data'\n"
        "    device_type: '1'\n",
        encoding="utf-8",
    )
    (summary,) = _lines(_dlq(tmp_path, "replay", "--source", "mapping", config=config))
    assert {"replayed": 1, "readings": 1, "still_rejected": {"bad_json": 1}} == {
        k: summary[k] for k in ("replayed", "readings", "still_rejected")
    }
    spool = SpoolStore.open(tmp_path / "spool.db", max_bytes=1 << 30)
    rows = spool.fetch_after(0, 10)
    assert [("m-3", {"Ua": "230.5"})] == [(r.reading.device_id, r.reading.data) for r in rows]
    remaining = sorted(d.reason for d in spool.dead_letters())
    assert ["InvalidParameter", "bad_json"] == remaining


def test_dlq_replay_writes_the_new_reason_of_an_entry_that_still_fails(tmp_path: Path) -> None:
    """Test that an entry still failing after a replay stays, with its new reason.

    An entry that still fails after a replay stays, with the reason it fails for
    now (here: it had no route; with the route it is bad JSON).
    """
    spool = SpoolStore.open(tmp_path / "spool.db", max_bytes=1 << 30)
    spool.commit([], [Reject(b"plant/m-4/data", b"{not json", "no_route", "no route", 4.0)])
    spool.close()
    config = tmp_path / "bridge.yaml"
    config.write_text(
        "routes:\n  - topic: 'plant/{deviceId}/data'\n    device_type: '1'\n", encoding="utf-8"
    )

    (summary,) = _lines(_dlq(tmp_path, "replay", config=config))

    (entry,) = _lines(_dlq(tmp_path, "list"))
    expected = ({"bad_json": 1}, "bad_json", "plant/m-4/data")
    assert expected == (summary["still_rejected"], entry["reason"], entry["topic"])


def test_dlq_replay_dry_run_changes_nothing(tmp_path: Path) -> None:
    """Test that `dlq replay --dry-run` reports without moving anything."""
    _spool_with_dead_letters(tmp_path)
    (summary,) = _lines(_dlq(tmp_path, "replay", "--source", "cloud", "--dry-run"))
    assert 1 == summary["replayed"]
    assert 3 == len(_lines(_dlq(tmp_path, "list")))


def test_dlq_purge_needs_yes(tmp_path: Path) -> None:
    """Test that `dlq purge` deletes matching entries only when confirmed."""
    _spool_with_dead_letters(tmp_path)
    refused = _dlq(tmp_path, "purge", "--reason", "bad_json")
    assert 1 == refused.returncode
    _lines(_dlq(tmp_path, "purge", "--reason", "bad_json", "--yes"))
    assert ["InvalidParameter", "no_route"] == sorted(
        str(e["reason"]) for e in _lines(_dlq(tmp_path, "list"))
    )


def test_dlq_replay_while_the_bridge_runs_delivers_the_fixed_message(
    tmp_path: Path, stub: StubProcess, bridge_factory: BridgeFactory
) -> None:
    """Test that a replay into a running bridge's spool reaches the cloud without a restart."""
    bridge = bridge_factory()
    spool_path = bridge.config_path.parent / "spool.db"
    spool = SpoolStore.open(spool_path, max_bytes=1 << 30)
    spool.commit(
        [], [Reject(b"plant/m-9/data", b'{"ts": 1631097600, "Ua": 230.5}', "no_route", "x", 3.0)]
    )
    spool.close()
    config = tmp_path / "fixed.yaml"
    config.write_text(
        "routes:\n  - topic: 'plant/{deviceId}/data'\n    device_type: '1'\n", encoding="utf-8"
    )
    argv = [sys.executable, "-m", "bridge", "dlq", "--spool", str(spool_path), "--config"]
    subprocess.run([*argv, str(config), "replay"], check=True, timeout=60, capture_output=True)
    received = wait_until(stub.received, 30, message="the replayed reading")
    assert [("m-9", "2021-09-08 18:40:00", {"Ua": "230.5"})] == [
        (e["deviceId"], e["recordTime"], e["data"]) for e in received
    ]
