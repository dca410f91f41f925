"""Delivery under faults, on real processes: mosquitto, the cloud stub and `energy-bridge run`.

Every test publishes numbered readings (a ``seq`` point) with QoS 1, injects one fault (a
poisoned entry, a full spool, broker restarts, MQTT v3.1.1, SIGTERM, wrong credentials,
throttling, "success" answers without ``"data": "success"``) and ends with an exact account
of what the stub received: nothing lost, duplicates counted, dead letters named.

"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import threading
import time
from collections import Counter
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from tests.support import (
    START_TS,
    BridgeFactory,
    BridgeProcess,
    Mosquitto,
    MosquittoFactory,
    Publisher,
    StubProcess,
    iter_telemetry,
    meter_ids,
    seq_counts,
    telemetry_payload,
    telemetry_points,
    wait_until,
)

pytestmark = pytest.mark.integration


# ---------------------------------------------------------------------------------------------
# accounting helpers


def _account(stub: StubProcess, published: int) -> tuple[list[int], int, int]:
    """Return (missing seqs, duplicate count, distinct seqs received) for seqs 0..published-1."""
    counts = seq_counts(stub.received())
    missing = sorted(set(range(published)) - set(counts))
    duplicates = sum(c - 1 for c in counts.values() if c > 1)
    return missing, duplicates, len(counts)


def _distinct(stub: StubProcess) -> int:
    return len(seq_counts(stub.received()))


def _delivered(stub: StubProcess) -> int:
    return int(stub.stats()["entries_accepted"])


def _readyz(bridge: BridgeProcess) -> tuple[int, dict[str, Any]]:
    status, body = bridge.get("/readyz")
    return status, json.loads(body)


def _not_ready(bridge: BridgeProcess) -> dict[str, Any] | None:
    """The /readyz body while it answers 503, else ``None`` (a predicate for wait_until)."""
    status, body = _readyz(bridge)
    return body if status == 503 else None


def _spool_path(bridge: BridgeProcess) -> Path:
    return bridge.config_path.parent / "spool.db"


def _log_events(bridge: BridgeProcess) -> list[dict[str, Any]]:
    """The bridge's JSON log lines, parsed (the harness's own header lines are skipped)."""
    events = []
    for line in bridge.log_text().splitlines():
        if line.startswith("{"):
            events.append(json.loads(line))
    return events


def _report(name: str, **numbers: object) -> None:
    print(f"\n{name}: " + ", ".join(f"{key}={value}" for key, value in numbers.items()))


class _BackgroundPublisher:
    """Publishes ``items`` from a thread in chunks, each on a fresh connection.

    ``gate`` is held while a chunk is published: a test that takes it can restart the broker
    between chunks without a publish ever straddling the restart (the publisher itself is not
    under test). ``rate`` paces the stream (messages per second).
    """

    def __init__(
        self,
        mosquitto: Mosquitto,
        items: list[tuple[str, bytes]],
        *,
        rate: float,
        chunk: int = 100,
    ) -> None:
        self.gate = threading.Lock()
        self.published = 0
        self.errors: list[BaseException] = []
        self._mosquitto = mosquitto
        self._items = items
        self._rate = rate
        self._chunk = chunk
        self._thread = threading.Thread(target=self._run, daemon=True, name="bg-publisher")

    def start(self) -> _BackgroundPublisher:
        """Start publishing in the background."""
        self._thread.start()
        return self

    def join(self, timeout: float) -> None:
        """Wait until everything is published; fail on a timeout or a publisher error."""
        self._thread.join(timeout)
        assert not self._thread.is_alive(), f"publisher still running after {timeout}s"
        assert [] == self.errors

    def _run(self) -> None:
        try:
            for start in range(0, len(self._items), self._chunk):
                chunk = self._items[start : start + self._chunk]
                began = time.monotonic()
                with self.gate, Publisher(self._mosquitto.host, self._mosquitto.port) as pub:
                    self.published += pub.publish_many(chunk, timeout=30)
                pause = len(chunk) / self._rate - (time.monotonic() - began)
                if pause > 0:
                    time.sleep(pause)  # pacing the stream, not waiting for a condition
        except BaseException as exc:  # reported by join()
            self.errors.append(exc)


# ---------------------------------------------------------------------------------------------
# 1. a poisoned entry


def test_poisoned_entry_is_dead_lettered_and_the_rest_delivered(
    mosquitto: Mosquitto, stub: StubProcess, bridge_factory: BridgeFactory
) -> None:
    """Test that one entry the cloud refuses is dead-lettered and the 299 around it arrive."""
    stub.set_faults(poison_point="poison")
    bridge = bridge_factory(batch={"max_devices": 100})
    meters = meter_ids(30)
    total = 300
    poisoned = 137  # the 18th meter's 5th reading, in the middle of the second batch
    items = list(iter_telemetry(meters, total // len(meters), START_TS))
    topic, _ = items[poisoned]
    ts = START_TS + poisoned // len(meters)
    items[poisoned] = (topic, telemetry_payload(poisoned, ts, poison=Decimal("1")))

    with Publisher(mosquitto.host, mosquitto.port) as pub:
        pub.publish_many(items)
    wait_until(lambda: _delivered(stub) >= total - 1, 30, message="the 299 good readings")
    wait_until(
        lambda: bridge.metric("bridge_readings_dead_lettered_total") >= 1,
        30,
        message="the poisoned reading dead-lettered",
    )
    wait_until(lambda: bridge.metric("bridge_spool_readings") == 0, 15, message="spool empty")

    missing, duplicates, _ = _account(stub, total)
    accepted = bridge.metric("bridge_readings_accepted_total")
    delivered = bridge.metric("bridge_readings_delivered_total")
    dead = bridge.metric("bridge_readings_dead_lettered_total")
    _report(
        "poisoned entry",
        published=total,
        delivered=_delivered(stub),
        dead_lettered=int(dead),
        duplicates=duplicates,
        lost=len(set(missing) - {poisoned}),
        peak_rss_mb=bridge.peak_rss_mb,
    )
    assert [poisoned] == missing
    assert 0 == duplicates
    assert 1 == dead
    assert 1 == bridge.metric("bridge_readings_dead_lettered_total", code="InvalidParameter")
    assert (total, total) == (accepted, delivered + dead)
    with sqlite3.connect(_spool_path(bridge)) as db:
        rows = db.execute(
            "SELECT source, reason, device_type, device_id, record_time, data, detail"
            " FROM dead_letters"
        ).fetchall()
    assert 1 == len(rows)
    source, reason, device_type, device_id, record_time, data, detail = rows[0]
    assert ("cloud", "InvalidParameter", "1", meters[poisoned % 30], "2023-11-15 06:13:24") == (
        source,
        reason,
        device_type,
        device_id,
        record_time,
    )
    assert {**telemetry_points(poisoned), "poison": "1"} == json.loads(data)
    assert "poison" in detail


# ---------------------------------------------------------------------------------------------
# 2. a full spool


def test_full_spool_stops_acknowledging_and_catches_up(
    mosquitto: Mosquitto, stub: StubProcess, bridge_factory: BridgeFactory
) -> None:
    """Test that a full spool stops acks and turns not-ready, and everything arrives after."""
    max_bytes = 200 * 1024
    stub.set_faults(outage=True)
    bridge = bridge_factory(spool={"max_bytes": max_bytes})
    total = 5_000
    with Publisher(mosquitto.host, mosquitto.port) as pub:
        pub.publish_many(iter_telemetry(meter_ids(50), total // 50, START_TS))

    wait_until(
        lambda: bridge.metric("bridge_spool_full") == 1, 30, message="bridge_spool_full == 1"
    )
    body = wait_until(lambda: _not_ready(bridge), 10, message="/readyz 503")
    assert "spool" in body["problems"]
    assert "full" in body["problems"]["spool"]
    # The gauges come from a once-a-second sample of the spool.
    wait_until(
        lambda: bridge.metric("bridge_spool_bytes") >= max_bytes,
        10,
        message="bridge_spool_bytes >= spool.max_bytes",
    )
    used = bridge.metric("bridge_spool_bytes")
    spooled = bridge.metric("bridge_spool_readings")
    accepted_while_full = bridge.metric("bridge_readings_accepted_total")
    assert 0 == _delivered(stub)
    # The bridge stopped taking readings long before the 5,000: the broker keeps the rest.
    assert accepted_while_full < total / 2
    assert accepted_while_full == spooled

    stub.set_faults(outage=False)
    wait_until(lambda: _distinct(stub) >= total, 60, message="every reading after the outage")
    wait_until(lambda: _readyz(bridge)[0] == 200, 15, message="/readyz 200 again")
    wait_until(lambda: bridge.metric("bridge_spool_readings") == 0, 15, message="spool empty")
    missing, duplicates, _ = _account(stub, total)
    _report(
        "full spool",
        published=total,
        accepted_while_full=int(accepted_while_full),
        spooled_while_full=int(spooled),
        spool_bytes_while_full=int(used),
        delivered=_delivered(stub),
        duplicates=duplicates,
        lost=len(missing),
        peak_rss_mb=bridge.peak_rss_mb,
    )
    assert [] == missing
    assert 0 == duplicates
    assert 0 == bridge.metric("bridge_spool_full")
    assert total == bridge.metric("bridge_readings_accepted_total")
    assert total == bridge.metric("bridge_readings_delivered_total")


def test_full_spool_reports_not_ready_once(
    mosquitto: Mosquitto, stub: StubProcess, bridge_factory: BridgeFactory
) -> None:
    """Test that a spool that stays full is logged once, with one stable /readyz reason."""
    stub.set_faults(outage=True)
    bridge = bridge_factory(spool={"max_bytes": 64 * 1024}, log={"format": "json"})
    with Publisher(mosquitto.host, mosquitto.port) as pub:
        pub.publish_many(iter_telemetry(meter_ids(50), 40, START_TS))
    wait_until(lambda: bridge.metric("bridge_spool_full") == 1, 30, message="spool full")
    reasons = set()
    deadline = time.monotonic() + 4.0
    while time.monotonic() < deadline:  # sample /readyz while the spool stays full for 4 s
        status, body = _readyz(bridge)
        assert 503 == status
        reasons.add(body["problems"]["spool"])
        time.sleep(0.1)
    not_ready = [
        event
        for event in _log_events(bridge)
        if event["event"] == "not ready" and event.get("condition") == "spool"
    ]
    _report(
        "full spool for 4 s",
        not_ready_lines=len(not_ready),
        distinct_readyz_reasons=len(reasons),
    )
    assert (1, 1) == (len(not_ready), len(reasons))


# ---------------------------------------------------------------------------------------------
# 3. broker restarts


def test_broker_restart_mid_stream_loses_nothing(
    mosquitto: Mosquitto, stub: StubProcess, bridge_factory: BridgeFactory
) -> None:
    """Test that two broker restarts while the bridge consumes lose no reading."""
    bridge = bridge_factory(mqtt={"reconnect_min_secs": 0.2, "reconnect_max_secs": 2})
    total = 9_000
    items = list(iter_telemetry(meter_ids(100), total // 100, START_TS))
    publisher = _BackgroundPublisher(mosquitto, items, rate=1_500, chunk=500).start()
    for restart, after in enumerate((2_000, 5_000), start=1):

        def delivered(n: int = after) -> bool:
            return _distinct(stub) >= n

        def reconnected(n: int = restart) -> bool:
            return (
                bridge.metric("bridge_mqtt_reconnects_total") >= n
                and bridge.metric("bridge_mqtt_connected") == 1
            )

        wait_until(delivered, 60, message=f"{after} delivered")
        # Between two chunks, so that no publish straddles the restart (the publisher is not
        # under test); the next test forces messages to be in flight at the restart.
        with publisher.gate:
            mosquitto.restart()
        wait_until(reconnected, 30, message=f"bridge reconnected after restart {restart}")
    publisher.join(120)
    wait_until(lambda: _distinct(stub) >= total, 60, message="every reading")
    wait_until(lambda: bridge.metric("bridge_spool_readings") == 0, 15, message="spool empty")
    missing, duplicates, _ = _account(stub, total)
    reconnects = bridge.metric("bridge_mqtt_reconnects_total")
    received = bridge.metric("bridge_messages_received_total")
    _report(
        "broker restarted twice",
        published=publisher.published,
        received_from_broker=int(received),
        delivered=_delivered(stub),
        duplicates=duplicates,
        lost=len(missing),
        peak_rss_mb=bridge.peak_rss_mb,
        reconnects=int(reconnects),
    )
    assert total == publisher.published
    assert [] == missing
    assert reconnects >= 2
    # Only messages the broker handed over again can be duplicated.
    assert duplicates <= received - total


def test_broker_restart_with_messages_in_flight_loses_nothing(
    mosquitto: Mosquitto, stub: StubProcess, bridge_factory: BridgeFactory
) -> None:
    """Test that messages the broker sent but never saw acknowledged arrive after its restart.

    The bridge is frozen (SIGSTOP) while the broker sends it 2,000 messages and restarts: the
    bridge then reads and stores them from its socket with no connection left to acknowledge
    them on, and the broker sends them again on the new session.
    """
    bridge = bridge_factory(mqtt={"reconnect_min_secs": 0.2, "reconnect_max_secs": 2})
    pid = bridge.pid
    assert pid is not None
    total = 6_000
    items = list(iter_telemetry(meter_ids(100), total // 100, START_TS))
    with Publisher(mosquitto.host, mosquitto.port) as pub:
        pub.publish_many(items[:2_000])
    wait_until(lambda: _distinct(stub) >= 2_000, 30, message="the first 2,000")
    os.kill(pid, signal.SIGSTOP)
    try:
        with Publisher(mosquitto.host, mosquitto.port) as pub:
            pub.publish_many(items[2_000:4_000])
        mosquitto.restart()
    finally:
        os.kill(pid, signal.SIGCONT)
    wait_until(
        lambda: (
            bridge.metric("bridge_mqtt_reconnects_total") >= 1
            and bridge.metric("bridge_mqtt_connected") == 1
        ),
        30,
        message="bridge reconnected",
    )
    with Publisher(mosquitto.host, mosquitto.port) as pub:
        pub.publish_many(items[4_000:])
    wait_until(lambda: _distinct(stub) >= total, 60, message="every reading")
    wait_until(lambda: bridge.metric("bridge_spool_readings") == 0, 15, message="spool empty")
    missing, duplicates, _ = _account(stub, total)
    received = bridge.metric("bridge_messages_received_total")
    _report(
        "broker restart with 2,000 in flight",
        published=total,
        received_from_broker=int(received),
        delivered=_delivered(stub),
        duplicates=duplicates,
        lost=len(missing),
        peak_rss_mb=bridge.peak_rss_mb,
        redelivered_metric=int(bridge.metric("bridge_readings_redelivered_total")),
    )
    assert [] == missing
    assert total < received  # the fault happened: the broker sent some messages twice
    assert duplicates <= received - total <= 2_000


# ---------------------------------------------------------------------------------------------
# 4. MQTT v3.1.1


def test_mqtt_v311_session_delivers_everything(
    mosquitto_factory: MosquittoFactory, stub: StubProcess, bridge_factory: BridgeFactory
) -> None:
    """Test that a bridge on MQTT v3.1.1 delivers 2,000 readings exactly once."""
    broker = mosquitto_factory(max_inflight=1000)
    bridge = bridge_factory(mqtt_port=broker.port, mqtt={"protocol": "v311"})
    total = 2_000
    started = time.monotonic()
    with Publisher(broker.host, broker.port) as pub:
        pub.publish_many(iter_telemetry(meter_ids(100), total // 100, START_TS))
    wait_until(lambda: _delivered(stub) >= total, 60, message="all readings")
    elapsed = time.monotonic() - started
    wait_until(lambda: bridge.metric("bridge_spool_readings") == 0, 15, message="spool empty")
    missing, duplicates, _ = _account(stub, total)
    _report(
        "MQTT v3.1.1",
        published=total,
        delivered=_delivered(stub),
        duplicates=duplicates,
        lost=len(missing),
        peak_rss_mb=bridge.peak_rss_mb,
        seconds=round(elapsed, 2),
    )
    assert [] == missing
    assert 0 == duplicates
    assert total == bridge.metric("bridge_readings_delivered_total")


# ---------------------------------------------------------------------------------------------
# 5. SIGTERM mid-stream


def test_sigterm_mid_stream_then_restart_loses_nothing(
    mosquitto: Mosquitto, stub: StubProcess, bridge_factory: BridgeFactory
) -> None:
    """Test that a bridge stopped with SIGTERM mid-stream exits 0 and loses nothing."""
    bridge = bridge_factory()
    total = 8_000
    items = list(iter_telemetry(meter_ids(100), total // 100, START_TS))
    publisher = _BackgroundPublisher(mosquitto, items, rate=1_000, chunk=200).start()
    wait_until(lambda: _delivered(stub) >= 2_000, 60, message="a quarter delivered")
    code = bridge.terminate(30)
    stopped_at = _delivered(stub)
    assert 0 == code
    assert "energy-bridge stopped" in bridge.log_text()
    time.sleep(2.0)  # the bridge stays away for 2 s while the meters keep publishing
    bridge.start()
    bridge.wait_ready(30)
    publisher.join(120)
    wait_until(lambda: _distinct(stub) >= total, 60, message="every reading after restart")
    missing, duplicates, _ = _account(stub, total)
    _report(
        "SIGTERM mid-stream",
        published=publisher.published,
        delivered_before_stop=stopped_at,
        delivered=_delivered(stub),
        duplicates=duplicates,
        lost=len(missing),
        peak_rss_mb=bridge.peak_rss_mb,
        redelivered_metric=int(bridge.metric("bridge_readings_redelivered_total")),
    )
    assert [] == missing
    assert 0 == duplicates


def test_sigterm_during_cloud_outage_exits_within_the_grace_period(
    mosquitto: Mosquitto, stub: StubProcess, bridge_factory: BridgeFactory
) -> None:
    """Test that SIGTERM with the cloud down exits after the grace period and keeps the data."""
    stub.set_faults(outage=True)
    grace = 2.0
    bridge = bridge_factory(shutdown_grace_secs=grace, batch={"linger_secs": 60})
    # A backlog queued by the broker while the bridge is away arrives in one burst: many more
    # batches than the push queue and the four workers hold (12), and a last one left open.
    assert 0 == bridge.terminate(30)
    total = 3_050
    with Publisher(mosquitto.host, mosquitto.port) as pub:
        pub.publish_many(iter_telemetry(meter_ids(50), total // 50, START_TS))
    bridge.start()
    bridge.wait_ready(30)
    wait_until(lambda: bridge.metric("bridge_spool_readings") == total, 15, message="all spooled")
    started = time.monotonic()
    try:
        code = bridge.terminate(grace + 8)
    finally:
        _report("SIGTERM during outage", exit_secs=round(time.monotonic() - started, 1))
    assert 0 == code
    assert "energy-bridge stopped" in bridge.log_text()
    stub.set_faults(outage=False)
    bridge.start()
    bridge.wait_ready(30)
    wait_until(lambda: _distinct(stub) >= total, 30, message="the kept backlog")
    missing, duplicates, _ = _account(stub, total)
    assert ([], 0) == (missing, duplicates)


# ---------------------------------------------------------------------------------------------
# 6. wrong credentials


def test_wrong_credentials_keep_data_and_recover_on_sighup(
    mosquitto: Mosquitto, stub: StubProcess, bridge_factory: BridgeFactory, tmp_path: Path
) -> None:
    """Test that refused credentials keep the data, log once, and SIGHUP with the fix recovers."""
    wrong = "wrong-secret-7f3c91"
    key_id_file = tmp_path / "ak-id"
    secret_file = tmp_path / "ak-secret"
    key_id_file.write_text("testid\n", "utf-8")
    secret_file.write_text(wrong + "\n", "utf-8")
    bridge = bridge_factory(
        cloud={
            "credentials": {
                "source": "file",
                "access_key_id_file": str(key_id_file),
                "access_key_secret_file": str(secret_file),
            }
        },
        log={"format": "json"},
    )
    pid = bridge.pid
    assert pid is not None
    total = 300
    with Publisher(mosquitto.host, mosquitto.port) as pub:
        pub.publish_many(iter_telemetry(meter_ids(30), total // 30, START_TS))
    body = wait_until(lambda: _not_ready(bridge), 30, message="/readyz 503")
    assert "credentials" in body["problems"].get("cloud", "")
    wait_until(
        lambda: stub.stats()["rejected"].get("SignatureDoesNotMatch", 0) >= 3,
        30,
        message="three refused requests",
    )
    assert 0 == _delivered(stub)
    wait_until(
        lambda: bridge.metric("bridge_spool_readings") == total, 10, message="all kept in spool"
    )

    secret_file.write_text("testsecret\n", "utf-8")
    fixed_at = time.monotonic()
    os.kill(pid, signal.SIGHUP)
    wait_until(lambda: _distinct(stub) >= total, 45, message="every reading after SIGHUP")
    recovered_after = time.monotonic() - fixed_at
    wait_until(lambda: _readyz(bridge)[0] == 200, 10, message="/readyz 200 again")
    missing, duplicates, _ = _account(stub, total)
    log = bridge.log_text()
    warnings = Counter(
        event["event"]
        for event in _log_events(bridge)
        if event["level"] == "warning" and "SignatureDoesNotMatch" in json.dumps(event)
    )
    _report(
        "wrong credentials",
        published=total,
        refused_requests=stub.stats()["rejected"]["SignatureDoesNotMatch"],
        delivered=_delivered(stub),
        duplicates=duplicates,
        lost=len(missing),
        peak_rss_mb=bridge.peak_rss_mb,
        recovered_after_sighup_secs=round(recovered_after, 1),
        warning_lines=dict(warnings),
    )
    assert [] == missing
    assert 0 == duplicates
    assert wrong not in log
    assert "testsecret" not in log
    # One line per kind of event for the problem, however many requests were refused.
    assert {"not ready": 1, "push failed, will retry": 1} == dict(warnings)


def test_fixed_credentials_resume_every_worker_promptly_after_sighup(
    mosquitto: Mosquitto, stub: StubProcess, bridge_factory: BridgeFactory, tmp_path: Path
) -> None:
    """Test that once the secret file is fixed (and SIGHUP sent) the backlog goes out promptly."""
    key_id_file = tmp_path / "ak-id"
    secret_file = tmp_path / "ak-secret"
    key_id_file.write_text("testid\n", "utf-8")
    secret_file.write_text("wrong-secret-7f3c91\n", "utf-8")
    bridge = bridge_factory(
        cloud={
            "max_in_flight": 16,
            "credentials": {
                "source": "file",
                "access_key_id_file": str(key_id_file),
                "access_key_secret_file": str(secret_file),
            },
        },
        batch={"max_devices": 10},
    )
    pid = bridge.pid
    assert pid is not None
    total = 600
    with Publisher(mosquitto.host, mosquitto.port) as pub:
        pub.publish_many(iter_telemetry(meter_ids(60), total // 60, START_TS))
    # Refused and paused: the first refusal pauses every worker (how many requests got out
    # before it depends on timing), and the bridge reports not ready.
    wait_until(
        lambda: (
            stub.stats()["rejected"].get("SignatureDoesNotMatch", 0) >= 1
            and bridge.get("/readyz")[0] == 503
        ),
        30,
        message="credentials refused and the bridge not ready",
    )
    secret_file.write_text("testsecret\n", "utf-8")
    fixed_at = time.monotonic()
    os.kill(pid, signal.SIGHUP)
    wait_until(lambda: _delivered(stub) >= 1, 10, message="the first delivery")
    first = time.monotonic() - fixed_at
    try:
        wait_until(lambda: _distinct(stub) >= total, 15, message="every reading after SIGHUP")
    finally:
        _report(
            "fixed credentials + SIGHUP",
            published=total,
            first_delivery_after_secs=round(first, 1),
            delivered_within_15s=_delivered(stub),
        )
    missing, duplicates, _ = _account(stub, total)
    assert ([], 0) == (missing, duplicates)


@pytest.mark.parametrize("where", ["variable", "file"])
def test_malformed_credentials_refuse_to_start(
    stub: StubProcess, bridge_factory: BridgeFactory, tmp_path: Path, where: str
) -> None:
    """Test that a credential with a CR/LF inside stops `run` at once, naming where it is.

    A credential with a CR/LF inside stops `run` at once with one line naming
    the variable or file (never the value), instead of crashing at the first push.
    """
    secret = "testsecret\r\nX-Injected: 1"
    secret_file = tmp_path / "ak-secret"
    if where == "file":
        (tmp_path / "ak-id").write_text("testid\n", "utf-8")
        secret_file.write_text(secret + "\n", "utf-8")
        credentials = {
            "source": "file",
            "access_key_id_file": str(tmp_path / "ak-id"),
            "access_key_secret_file": str(secret_file),
        }
        bridge = bridge_factory(cloud={"credentials": credentials}, ready_timeout=None)
        named = f"the AccessKey secret file {secret_file}"
    else:
        bridge = bridge_factory(env={"ALIBABA_CLOUD_ACCESS_KEY_SECRET": secret}, ready_timeout=None)
        named = "the environment variable ALIBABA_CLOUD_ACCESS_KEY_SECRET"

    wait_until(lambda: not bridge.running, 20, message=lambda: f"exit\n{bridge.describe()}")

    output = [line for line in bridge.log_text().splitlines() if not line.startswith("====")]
    assert 1 == len(output), output
    assert output[0].startswith(f"energy-bridge: cloud credentials: {named} contains a line break")
    assert (True, False) == (bridge.returncode not in {0, None}, "Injected" in output[0])
    assert 0 == stub.stats()["requests"]


def test_credentials_file_broken_at_run_time_pauses_and_recovers_on_sighup(
    mosquitto: Mosquitto, stub: StubProcess, bridge_factory: BridgeFactory, tmp_path: Path
) -> None:
    """Test that a CR/LF in a key id file re-read on SIGHUP keeps the bridge up and the data.

    An AccessKey id file broken with a CR/LF inside (it goes into a header: this
    crashed the bridge) and re-read on SIGHUP leaves the bridge up and not ready with a
    credentials reason, keeping every reading, and fixing the file plus another SIGHUP
    delivers them all.
    """
    key_id_file = tmp_path / "ak-id"
    secret_file = tmp_path / "ak-secret"
    key_id_file.write_text("testid\n", "utf-8")
    secret_file.write_text("testsecret\n", "utf-8")
    bridge = bridge_factory(
        cloud={
            "credentials": {
                "source": "file",
                "access_key_id_file": str(key_id_file),
                "access_key_secret_file": str(secret_file),
            }
        },
    )
    pid = bridge.pid
    assert pid is not None
    total = 100
    items = list(iter_telemetry(meter_ids(10), total // 10, START_TS))
    with Publisher(mosquitto.host, mosquitto.port) as pub:
        pub.publish_many(items[:10])
    wait_until(lambda: _distinct(stub) >= 10, 20, message="the first readings")

    key_id_file.write_text("test\r\nid\n", "utf-8")
    os.kill(pid, signal.SIGHUP)
    with Publisher(mosquitto.host, mosquitto.port) as pub:
        pub.publish_many(items[10:])
    body = wait_until(lambda: _not_ready(bridge), 20, message="/readyz 503")
    wait_until(
        lambda: bridge.metric("bridge_spool_readings") == total - 10,
        20,
        message="the readings kept in the spool",
    )
    reason = body["problems"].get("cloud", "")
    assert f"no usable credentials: cloud credentials: the AccessKey id file {key_id_file}" in (
        reason
    )
    assert (True, 10) == (bridge.running, _delivered(stub))

    key_id_file.write_text("testid\n", "utf-8")
    os.kill(pid, signal.SIGHUP)
    wait_until(lambda: _distinct(stub) >= total, 30, message="every reading after the fix")
    wait_until(lambda: _readyz(bridge)[0] == 200, 10, message="/readyz 200 again")
    missing, duplicates, _ = _account(stub, total)
    assert ([], 0) == (missing, duplicates)
    assert "testsecret" not in bridge.log_text()


# ---------------------------------------------------------------------------------------------
# 7. throttling


def test_throttling_slows_down_and_loses_nothing(
    mosquitto: Mosquitto, stub: StubProcess, bridge_factory: BridgeFactory
) -> None:
    """Test that 30 % throttling lowers the concurrency limit and loses no reading."""
    stub.set_faults(throttle_rate=0.3, retry_after_ms=200)
    bridge = bridge_factory(batch={"max_devices": 50})
    total = 3_000
    limits: list[float] = []

    def all_arrived() -> bool:
        limits.append(bridge.metric("bridge_push_concurrency_limit"))
        return _delivered(stub) >= total

    with Publisher(mosquitto.host, mosquitto.port) as pub:
        pub.publish_many(iter_telemetry(meter_ids(100), total // 100, START_TS))
    wait_until(all_arrived, 60, interval=0.02, message="all readings")
    missing, duplicates, _ = _account(stub, total)
    throttled = bridge.metric("bridge_push_requests_total", outcome="throttled")
    refused = stub.stats()["rejected"].get("Throttling.User", 0)
    _report(
        "throttling 30 %",
        published=total,
        delivered=_delivered(stub),
        duplicates=duplicates,
        lost=len(missing),
        peak_rss_mb=bridge.peak_rss_mb,
        throttled_requests=int(throttled),
        lowest_limit=min(limits),
        samples=len(limits),
    )
    assert [] == missing
    assert 0 == duplicates
    assert throttled > 0
    assert refused == throttled
    assert min(limits) < 4


# ---------------------------------------------------------------------------------------------
# 8. a 200 answer without "data": "success"


def test_success_answer_without_data_success_is_retried(
    mosquitto: Mosquitto, stub: StubProcess, bridge_factory: BridgeFactory
) -> None:
    """Test that HTTP 200 with "data": "fail" is retried until the cloud says success."""
    stub.set_faults(fail_body_rate=0.5)
    bridge = bridge_factory(batch={"max_devices": 50})
    total = 2_000
    with Publisher(mosquitto.host, mosquitto.port) as pub:
        pub.publish_many(iter_telemetry(meter_ids(100), total // 100, START_TS))
    wait_until(lambda: stub.stats()["fail_body"] >= 10, 30, message="ten fail answers")
    time.sleep(2.0)  # keep the fault on for 2 s more
    stub.set_faults(fail_body_rate=0.0)
    wait_until(lambda: _delivered(stub) >= total, 60, message="all readings")
    wait_until(lambda: bridge.metric("bridge_spool_readings") == 0, 15, message="spool empty")
    missing, duplicates, _ = _account(stub, total)
    fail_answers = stub.stats()["fail_body"]
    retried = bridge.metric("bridge_push_requests_total", outcome="refused", code="200")
    _report(
        "fail bodies",
        published=total,
        delivered=_delivered(stub),
        duplicates=duplicates,
        lost=len(missing),
        peak_rss_mb=bridge.peak_rss_mb,
        fail_answers=fail_answers,
        retried_requests=int(retried),
    )
    assert [] == missing
    assert 0 == duplicates
    assert fail_answers == retried
    assert total == bridge.metric("bridge_readings_delivered_total")
