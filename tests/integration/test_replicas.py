"""Replicas sharing the load through the broker (``mqtt.share_group``) on one real Mosquitto.

Every reading carries a ``seq`` point; each test ends by reconciling what the cloud stub
received against what was published: nothing lost, duplicates counted and explained.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bridge.testing import TEST_ENV
from tests.support import (
    START_TS,
    BridgeFactory,
    BridgeProcess,
    Mosquitto,
    Publisher,
    StubProcess,
    free_port,
    seq_counts,
    telemetry_payload,
    wait_until,
)

pytestmark = pytest.mark.integration

GROUP = "eb"


def readings(first: int, count: int, meters: int) -> Iterator[tuple[str, bytes]]:
    """Readings ``first``..``first+count-1``, no two with the same device and time.

    Reading ``seq`` is meter ``seq % meters``'s reading number ``seq // meters`` (one second
    apart).
    """
    for seq in range(first, first + count):
        topic = f"meters/1/meter-{seq % meters:04d}/telemetry"
        yield topic, telemetry_payload(seq, START_TS + seq // meters)


def received(bridge: BridgeProcess) -> int:
    """Messages this run of ``bridge`` received."""
    return int(bridge.metric("bridge_messages_received_total"))


def replica(bridge_factory: BridgeFactory, name: str, **overrides: Any) -> BridgeProcess:
    """A bridge in the share group with client id ``name``."""
    return bridge_factory(mqtt={"client_id": name, "share_group": GROUP}, **overrides)


def test_replicas_share_the_load_and_a_graceful_stop_leaves_the_group(
    mosquitto: Mosquitto, stub: StubProcess, bridge_factory: BridgeFactory
) -> None:
    """Test that two replicas split the stream, and one stopped leaves and rejoins the group.

    The one stopped with SIGTERM first leaves the share group (the other gets everything
    meanwhile) and rejoins when started.
    """
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


def cli(*args: str) -> tuple[int, dict[str, Any], str]:
    """Run ``energy-bridge ARGS``; returns the exit status, the JSON report and stderr."""
    result = subprocess.run(
        [sys.executable, "-m", "bridge", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **TEST_ENV},
        timeout=120,
        check=False,
    )
    report = json.loads(result.stdout) if result.stdout.strip() else {}
    return result.returncode, report, result.stderr


def spool_of(bridge: BridgeProcess) -> Path:
    """The spool file of a bridge made by the ``bridge_factory`` fixture."""
    return bridge.config_path.parent / "spool.db"


def lost_and_duplicated(stub: StubProcess, total: int) -> tuple[list[int], int]:
    """Seqs 0..total-1 the stub never accepted, and how many it accepted more than once."""
    counts = seq_counts(stub.received())
    return sorted(set(range(total)) - set(counts)), sum(c - 1 for c in counts.values())


def test_session_drain_takes_a_killed_replicas_share_and_ends_its_session(
    mosquitto: Mosquitto, stub: StubProcess, bridge_factory: BridgeFactory
) -> None:
    """Test that `session drain` moves a killed replica's queue into this spool and ends it.

    What the broker queued for the killed replica is delivered from this bridge's spool, and
    its session ends, so it gets no more share.
    """
    a = replica(bridge_factory, "eb-a")
    b = replica(bridge_factory, "eb-b")
    b.kill()  # its session stays, and keeps receiving its share (queued)
    with Publisher(mosquitto.host, mosquitto.port) as pub:
        pub.publish_many(readings(0, 1_000, 10))
        wait_until(lambda: received(a) >= 400, 30, message="a's share")
        assert received(a) < 1_000  # the rest waits in b's session

        refused = cli("session", "drain", "--config", str(a.config_path), "--client-id", "eb-a")
        assert 2 == refused[0]
        assert "this bridge's own client id" in refused[2]

        status, report, err = cli(
            "session", "drain", "--config", str(a.config_path), "--client-id", "eb-b"
        )
        assert 0 == status, err
        assert (True, True) == (report["session_present"], report["session_ended"])
        assert 1_000 == received(a) + report["messages"]
        wait_until(lambda: stub.stats()["entries_accepted"] >= 1_000, 30, message="all 1,000")
        # No session, no share: everything published now goes to a.
        pub.publish_many(readings(1_000, 500, 10))
        wait_until(lambda: stub.stats()["entries_accepted"] >= 1_500, 30, message="all 1,500")
    assert ([], 0) == lost_and_duplicated(stub, 1_500)


def test_spool_drain_pushes_a_stopped_replicas_spool_and_refuses_a_live_one(
    mosquitto: Mosquitto, stub: StubProcess, bridge_factory: BridgeFactory
) -> None:
    """Test that `spool drain` refuses a running bridge's spool and delivers a stopped one's.

    Every reading of the stopped replica's spool is delivered, and what was delivered deleted.
    """
    a = replica(bridge_factory, "eb-a")
    dead_cloud = f"http://127.0.0.1:{free_port()}"
    b = replica(bridge_factory, "eb-b", cloud={"endpoint": dead_cloud}, shutdown_grace_secs=2)
    with Publisher(mosquitto.host, mosquitto.port) as pub:
        pub.publish_many(readings(0, 1_000, 10))
    wait_until(lambda: b.metric("bridge_spool_readings") > 0, 30, message="b spools")
    wait_until(lambda: received(a) + received(b) >= 1_000, 30, message="all received")
    held = int(b.metric("bridge_readings_accepted_total"))

    status, _, err = cli(
        "spool", "drain", "--config", str(a.config_path), "--path", str(spool_of(b))
    )
    assert 1 == status
    assert "is in use by energy-bridge pid" in err
    assert "drain only the spool of a replica that is stopped" in err

    assert 0 == b.terminate()
    status, report, err = cli(
        "spool", "drain", "--config", str(a.config_path), "--path", str(spool_of(b))
    )
    assert 0 == status, err
    assert (held, held, 0) == (report["readings_before"], report["delivered"], report["left"])
    wait_until(lambda: stub.stats()["entries_accepted"] >= 1_000, 30, message="all 1,000")
    assert ([], 0) == lost_and_duplicated(stub, 1_000)


# ---------------------------------------------------------------------------------------------
# Three replicas, 30,000 readings from 300 meters


TOTAL = 30_000
METERS = 300


class Background:
    """Publishes readings 0..TOTAL-1 from a thread, paced to ``rate`` messages/s."""

    def __init__(self, mosquitto: Mosquitto, rate: float) -> None:
        self.errors: list[BaseException] = []
        self.published = 0
        self._thread = threading.Thread(target=self._run, args=(mosquitto, rate), daemon=True)
        self._thread.start()

    def _run(self, mosquitto: Mosquitto, rate: float) -> None:
        step = 300
        started = time.monotonic()
        try:
            with Publisher(mosquitto.host, mosquitto.port, window=500) as pub:
                for first in range(0, TOTAL, step):
                    pub.publish_many(readings(first, step, METERS), timeout=120)
                    self.published = first + step
                    ahead = started + self.published / rate - time.monotonic()
                    if ahead > 0:
                        time.sleep(ahead)
        except BaseException as exc:  # reported by join()
            self.errors.append(exc)

    def join(self) -> None:
        """Wait until everything is published; re-raise what went wrong."""
        self._thread.join(180)
        assert [] == self.errors
        assert TOTAL == self.published


def three(bridge_factory: BridgeFactory, **c_overrides: Any) -> list[BridgeProcess]:
    """Replicas eb-a, eb-b and eb-c in one share group (``c_overrides`` for eb-c only)."""
    quick = {"shutdown_grace_secs": 4}
    return [
        replica(bridge_factory, "eb-a", **quick),
        replica(bridge_factory, "eb-b", **quick),
        replica(bridge_factory, "eb-c", **quick, **c_overrides),
    ]


def redelivery_counts(bridges: list[BridgeProcess]) -> tuple[int, int]:
    """Rows sent again, and messages the broker sent again, over the bridges' current runs."""
    rows = sum(int(b.metric("bridge_readings_redelivered_total")) for b in bridges)
    dups = sum(int(b.metric("bridge_mqtt_redelivered_messages_total")) for b in bridges)
    return rows, dups


def test_three_replicas_split_30000_readings_from_300_meters(
    mosquitto: Mosquitto, stub: StubProcess, bridge_factory: BridgeFactory
) -> None:
    """Test that three replicas each take a share of 30,000 readings, all arriving.

    Under 1 % are duplicates.
    """
    bridges = three(bridge_factory)
    started = time.monotonic()
    Background(mosquitto, rate=1e9).join()
    wait_until(lambda: stub.stats()["entries_accepted"] >= TOTAL, 120, message="all delivered")
    elapsed = time.monotonic() - started
    shares = [received(b) for b in bridges]
    missing, duplicates = lost_and_duplicated(stub, TOTAL)
    print(
        f"\n3 replicas, {TOTAL} readings from {METERS} meters in {elapsed:.1f}s:"
        f" shares {shares} ({', '.join(f'{s / TOTAL:.1%}' for s in shares)}),"
        f" {duplicates} duplicates, {len(missing)} lost"
    )
    assert [] == missing
    assert TOTAL == sum(shares)
    assert min(shares) >= TOTAL // 10, shares
    assert duplicates < TOTAL // 100


def test_three_replicas_one_killed_mid_stream_and_restarted_lose_nothing(
    mosquitto: Mosquitto, stub: StubProcess, bridge_factory: BridgeFactory
) -> None:
    """Test that a SIGKILLed replica gets its queued share when it returns, nothing lost.

    It returns with the same client id; every duplicate is explained by the redelivery counters.
    """
    bridges = three(bridge_factory)
    c = bridges[2]
    publisher = Background(mosquitto, rate=3_000)
    wait_until(lambda: stub.stats()["entries_accepted"] >= TOTAL // 3, 60, message="a third")
    before_kill = received(c)
    c.kill()
    time.sleep(1.0)  # its share queues in its session meanwhile
    c.start()
    c.wait_ready()
    publisher.join()
    wait_until(lambda: stub.stats()["entries_accepted"] >= TOTAL, 120, message="all delivered")
    wait_until(lambda: c.metric("bridge_spool_readings") == 0, 30, message="c's spool empty")
    missing, duplicates = lost_and_duplicated(stub, TOTAL)
    rows_again, broker_again = redelivery_counts(bridges)
    shares = [received(b) for b in bridges[:2]] + [before_kill + received(c)]
    print(
        f"\n3 replicas, eb-c SIGKILLed at {before_kill} received and restarted: shares {shares},"
        f" {duplicates} duplicates (explained by: {rows_again} rows sent again,"
        f" {broker_again} messages the broker sent again), {len(missing)} lost"
    )
    assert [] == missing
    assert duplicates <= rows_again + broker_again
    assert duplicates < TOTAL // 100


def test_three_replicas_one_stopped_for_good_with_its_cloud_down_is_drained(
    mosquitto: Mosquitto, stub: StubProcess, bridge_factory: BridgeFactory
) -> None:
    """Test that a replica stopped for good with its cloud unreachable loses nothing once drained.

    It is stopped with SIGTERM; `session drain` and `spool drain` are run from a surviving
    replica.
    """
    dead_cloud = f"http://127.0.0.1:{free_port()}"
    bridges = three(bridge_factory, cloud={"endpoint": dead_cloud})
    a, c = bridges[0], bridges[2]
    publisher = Background(mosquitto, rate=3_000)
    wait_until(lambda: c.metric("bridge_spool_readings") >= 2_000, 60, message="c holds some")
    assert 0 == c.terminate()
    assert "unsubscribed from the share group" in c.log_text()
    publisher.join()
    wait_until(
        lambda: stub.stats()["entries_accepted"] >= received(a) + received(bridges[1]),
        60,
        message="a and b delivered their shares",
    )
    status, session, err = cli(
        "session", "drain", "--config", str(a.config_path), "--client-id", "eb-c"
    )
    assert 0 == status, err
    status, spool, err = cli(
        "spool", "drain", "--config", str(a.config_path), "--path", str(spool_of(c))
    )
    assert 0 == status, err
    wait_until(lambda: stub.stats()["entries_accepted"] >= TOTAL, 60, message="all delivered")
    missing, duplicates = lost_and_duplicated(stub, TOTAL)
    print(
        f"\n3 replicas, eb-c stopped for good holding {spool['readings_before']} in its spool:"
        f" session drain took {session['messages']} messages left in its session, spool drain"
        f" delivered {spool['delivered']}; {duplicates} duplicates, {len(missing)} lost"
    )
    assert [] == missing
    assert 0 == duplicates


def test_session_drain_of_an_unknown_client_id_reports_no_session(
    mosquitto: Mosquitto, stub: StubProcess, bridge_factory: BridgeFactory
) -> None:
    """Test that draining a client id without a session takes nothing and says so.

    The answer says session_present false, and no session is left behind.
    """
    a = replica(bridge_factory, "eb-a")
    status, report, err = cli(
        "session",
        "drain",
        "--config",
        str(a.config_path),
        "--client-id",
        "eb-never",
        "--quiet-secs",
        "0.5",
    )
    assert 0 == status, err
    assert {"session_present": False, "messages": 0, "session_ended": True} == {
        k: report[k] for k in ("session_present", "messages", "session_ended")
    }
    with Publisher(mosquitto.host, mosquitto.port) as pub:
        pub.publish_many(readings(0, 100, 10))
    wait_until(lambda: stub.stats()["entries_accepted"] >= 100, 30, message="all to a")
    assert 100 == received(a)
