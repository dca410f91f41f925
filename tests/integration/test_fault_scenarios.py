"""Fault scenarios on real processes, each ending with an exact account of every reading.

Every test publishes numbered readings (a ``seq`` point) with QoS 1 to a private mosquitto,
runs ``energy-bridge run`` against the cloud stub, injects one fault and reconciles what the
stub accepted against what the broker acknowledged to the publisher:

* ``published``: messages the broker acknowledged (PUBACK) to the publisher;
* ``delivered``: distinct readings (by ``seq``) the stub accepted;
* ``dead_lettered``: messages the bridge refused and kept in its ``dead_letters`` table;
* ``duplicates``: readings the stub accepted more than once;
* ``lost``: readings the bridge had (or should have had) and never delivered: always 0.

Each test prints one line ``SCENARIO name: published=.. delivered=.. dead_lettered=..
duplicates=.. lost=.. peak_rss_mb=..`` (peak RSS of the bridge process, ``VmHWM``), followed
by numbers particular to the scenario; ``docs/fault-scenarios.md`` collects them.
Run them with ``scripts/test -k fault_scenarios`` (add ``-s`` to see the lines).

The last tests pin down gaps found while writing these scenarios, since fixed.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import signal
import sqlite3
import string
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

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
    telemetry_payload,
    telemetry_points,
    wait_until,
)

pytestmark = pytest.mark.integration

RECEIVE_MAXIMUM = 2048  # the bridge's default mqtt.receive_maximum


# ---------------------------------------------------------------------------------------------
# accounting helpers


def _get_json(url: str, timeout: float = 30.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 - loopback
        return json.loads(response.read())


class _Tally:
    """What the stub accepted, by ``seq``; each :meth:`update` fetches only the new entries."""

    def __init__(self, stub: StubProcess) -> None:
        self._stub = stub
        self._since = 0
        self.seqs: Counter[int] = Counter()
        self.entries = 0

    def update(self) -> _Tally:
        """Fetch the entries accepted since the last call."""
        while True:
            page = _get_json(f"{self._stub.url}/_stub/received?since={self._since}&limit=20000")
            for entry in page["entries"]:
                self.entries += 1
                seq = entry["data"].get("seq")
                if seq is not None:
                    self.seqs[int(seq)] += 1
            self._since = int(page["next"])
            if not page["more"]:
                return self

    @property
    def distinct(self) -> int:
        """Distinct ``seq`` values accepted so far."""
        return len(self.seqs)

    @property
    def duplicates(self) -> int:
        """Accepted entries beyond the first of each ``seq``."""
        return sum(count - 1 for count in self.seqs.values() if count > 1)

    def missing(self, expected: Iterable[int]) -> list[int]:
        """The expected ``seq`` values never accepted, sorted."""
        return sorted(set(expected) - self.seqs.keys())

    def has_all(self, expected: set[int]) -> bool:
        """Whether every expected ``seq`` was accepted (a predicate for wait_until)."""
        self.update()
        return expected <= self.seqs.keys()


def _status_value(pid: int | None, field: str) -> int:
    """A ``kB`` field of ``/proc/<pid>/status`` (``VmHWM``, ``VmRSS``)."""
    assert pid is not None, "the process is not running"
    for line in Path(f"/proc/{pid}/status").read_text(encoding="ascii").splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/{pid}/status")


def _peak_rss_mb(bridge: BridgeProcess) -> float:
    """The bridge's peak resident set size so far (``VmHWM``), MiB; read before stopping it."""
    return round(_status_value(bridge.pid, "VmHWM") / 1024, 1)


def _summary(
    name: str,
    *,
    published: int,
    delivered: int,
    dead_lettered: int,
    duplicates: int,
    lost: int,
    peak_rss_mb: float,
    **extra: object,
) -> None:
    line = (
        f"SCENARIO {name}: published={published} delivered={delivered}"
        f" dead_lettered={dead_lettered} duplicates={duplicates} lost={lost}"
        f" peak_rss_mb={peak_rss_mb}"
    )
    line += "".join(f" {key}={value}" for key, value in extra.items())
    print("\n" + line)


def _healthz(bridge: BridgeProcess) -> int:
    try:
        return bridge.get("/healthz", timeout=2.0)[0]
    except OSError:
        return 0


def _json_events(bridge: BridgeProcess) -> list[dict[str, Any]]:
    """The bridge's JSON log lines, parsed (the harness's own header lines are skipped)."""
    return [json.loads(line) for line in bridge.log_text().splitlines() if line.startswith("{")]


def _spool_readonly(bridge: BridgeProcess) -> sqlite3.Connection:
    """The bridge's spool, opened read-only (the bridge may still be writing to it)."""
    path = bridge.config_path.parent / "spool.db"
    return sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)


class _PacedPublisher:
    """Publishes ``items`` from a thread on one connection, at ``rate`` messages per second.

    Messages go out in chunks of ``chunk``, each chunk published and acknowledged before the
    next; :attr:`published` counts acknowledged messages, so the first ``published`` items are
    exactly the ones the broker took. :meth:`stop` ends the stream after the current chunk.
    """

    def __init__(
        self, mosquitto: Mosquitto, items: Iterable[tuple[str, bytes]], *, rate: float, chunk: int
    ) -> None:
        self.published = 0
        self.errors: list[BaseException] = []
        self._mosquitto = mosquitto
        self._items = items
        self._rate = rate
        self._chunk = chunk
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="paced-publisher")

    def start(self) -> _PacedPublisher:
        """Start publishing in the background."""
        self._thread.start()
        return self

    @property
    def running(self) -> bool:
        """Whether the stream is still being published."""
        return self._thread.is_alive()

    def stop(self) -> None:
        """End the stream after the chunk being published."""
        self._stop.set()

    def join(self, timeout: float) -> None:
        """Wait for the end of the stream; fail on a timeout or a publisher error."""
        self._thread.join(timeout)
        assert not self._thread.is_alive(), f"publisher still running after {timeout}s"
        assert [] == self.errors

    def _run(self) -> None:
        try:
            with Publisher(self._mosquitto.host, self._mosquitto.port) as pub:
                began = time.monotonic()
                iterator = iter(self._items)
                while not self._stop.is_set():
                    chunk = list(itertools.islice(iterator, self._chunk))
                    if not chunk:
                        return
                    self.published += pub.publish_many(chunk, timeout=60)
                    ahead = began + self.published / self._rate - time.monotonic()
                    if ahead > 0:
                        self._stop.wait(ahead)  # pacing the stream, not waiting for a condition
        except BaseException as exc:  # reported by join()
            self.errors.append(exc)


# ---------------------------------------------------------------------------------------------
# 1. repeated SIGKILL


@pytest.mark.slow
def test_repeated_sigkill_during_a_20000_reading_stream_loses_nothing(
    mosquitto: Mosquitto, stub: StubProcess, bridge_factory: BridgeFactory
) -> None:
    """Test that five SIGKILLs at random moments of a 20,000-reading stream lose no reading.

    The moments are drawn from a seeded generator, measured from each (re)start, so some kills
    land while the restarted bridge is still replaying its spool and reconnecting. The cloud
    answers after 150 ms, as a real one does, so most kills find pushes in flight: the bridge
    sends those again after its restart; a push the stub stored before the kill arrives twice
    and is counted as a duplicate.
    """
    rng = random.Random(20_000)
    kills = 5
    total = 20_000
    stub.set_faults(latency_ms=150)
    bridge = bridge_factory()
    items = list(iter_telemetry(meter_ids(100), total // 100, START_TS))
    publisher = _PacedPublisher(mosquitto, items, rate=800, chunk=100).start()
    tally = _Tally(stub)
    peak = 0.0
    delivered_at_kill = []
    for _ in range(kills):
        # The random moment; the loop waits on nothing else, so this sleep *is* the fault.
        time.sleep(rng.uniform(0.5, 4.0))
        assert publisher.running, "the stream ended before every kill happened"
        peak = max(peak, _peak_rss_mb(bridge))
        assert -signal.SIGKILL == bridge.kill()
        delivered_at_kill.append(tally.update().distinct)
        bridge.start()
    bridge.wait_ready(30)
    publisher.join(120)
    expected = set(range(total))
    wait_until(lambda: tally.has_all(expected), 120, message=lambda: "every reading")
    wait_until(lambda: bridge.metric("bridge_spool_readings") == 0, 15, message="spool empty")
    peak = max(peak, _peak_rss_mb(bridge))
    missing = tally.missing(expected)
    _summary(
        "repeated_sigkill",
        published=publisher.published,
        delivered=tally.distinct,
        dead_lettered=0,
        duplicates=tally.duplicates,
        lost=len(missing),
        peak_rss_mb=peak,
        kills=kills,
        delivered_at_each_kill="/".join(map(str, delivered_at_kill)),
    )
    assert total == publisher.published
    assert [] == missing
    assert total == tally.distinct
    # The stub counts equal entries itself: the two accounts agree.
    assert tally.duplicates == stub.stats()["duplicates"]
    # Only the commit->ack and push->delete windows of each crash can duplicate.
    assert tally.duplicates <= kills * 1_000


# ---------------------------------------------------------------------------------------------
# 2. broker restart without persistence


def test_broker_restart_without_persistence_loses_only_what_the_broker_held(
    mosquitto_factory: MosquittoFactory, stub: StubProcess, bridge_factory: BridgeFactory
) -> None:
    """Test that a broker restart without persistence loses only messages it held in memory.

    Phase A: 2,000 readings while the bridge keeps up (all received, committed, acknowledged).
    Phase B: the bridge is frozen (SIGSTOP: a bridge that fell behind) while 6,000 more are
    published: the broker writes at most Receive Maximum (2,048) of them to the bridge's socket
    and keeps the rest queued *in its memory*; then the broker restarts with persistence off.
    While it is down a publisher cannot connect, so no reading can be published then. Phase C:
    2,000 readings after the bridge reconnected on a fresh session.

    Expected: every reading of A and C, and every reading of B that reached the bridge's socket,
    is delivered (the bridge commits what it read even though the connection to acknowledge
    it on is gone); exactly the tail of B the broker still held is lost, by the broker.
    """
    broker = mosquitto_factory(persistence=False)
    bridge = bridge_factory(
        mqtt_port=broker.port, mqtt={"reconnect_min_secs": 0.2, "reconnect_max_secs": 1}
    )
    pid = bridge.pid
    assert pid is not None
    n_a, n_b, n_c = 2_000, 6_000, 2_000
    total = n_a + n_b + n_c
    items = list(iter_telemetry(meter_ids(100), total // 100, START_TS))
    tally = _Tally(stub)
    with Publisher(broker.host, broker.port) as pub:
        published = pub.publish_many(items[:n_a])
    wait_until(lambda: tally.has_all(set(range(n_a))), 30, message="phase A delivered")

    os.kill(pid, signal.SIGSTOP)
    try:
        with Publisher(broker.host, broker.port) as pub:
            published += pub.publish_many(items[n_a : n_a + n_b])
        broker.stop()
        with pytest.raises(ConnectionError):
            Publisher(broker.host, broker.port, connect_timeout=2)
        broker.start()
    finally:
        os.kill(pid, signal.SIGCONT)
    wait_until(
        lambda: (
            bridge.metric("bridge_mqtt_reconnects_total") >= 1
            and bridge.metric("bridge_mqtt_connected") == 1
        ),
        30,
        message="the bridge reconnected and subscribed again",
    )
    with Publisher(broker.host, broker.port) as pub:
        published += pub.publish_many(items[n_a + n_b :])
    phase_c = set(range(n_a + n_b, total))
    wait_until(lambda: tally.has_all(phase_c), 30, message="phase C delivered")
    wait_until(lambda: bridge.metric("bridge_spool_readings") == 0, 15, message="spool empty")
    received = int(bridge.metric("bridge_messages_received_total"))
    peak = _peak_rss_mb(bridge)

    missing = tally.missing(range(total))
    dropped_by_broker = published - received
    lost = received - tally.distinct  # received by the bridge and never delivered
    sessions = [
        event.get("session_present")
        for event in _json_events(bridge)
        if event["event"] == "mqtt connected"
    ]
    _summary(
        "broker_restart_without_persistence",
        published=published,
        delivered=tally.distinct,
        dead_lettered=0,
        duplicates=tally.duplicates,
        lost=lost,
        peak_rss_mb=peak,
        received_by_bridge=received,
        dropped_by_broker=dropped_by_broker,
        phase_b_reached_bridge=n_b - len(missing),
    )
    assert total == published
    assert 0 == lost
    assert 0 == tally.duplicates
    # Nothing of phases A and C is missing; what is missing is the tail of phase B that the
    # broker still held when it restarted, in publish order.
    assert list(range(n_a + n_b - len(missing), n_a + n_b)) == missing
    assert len(missing) == dropped_by_broker
    assert n_b - RECEIVE_MAXIMUM <= dropped_by_broker <= n_b
    # The restarted broker had forgotten the session; the bridge subscribed again anyway.
    assert [False, False] == sessions


# ---------------------------------------------------------------------------------------------
# 3. cloud outage of 60 s with 10 minutes of backlog


def _live_stream(meters: list[str], first_seq: int, first_ts: int) -> Iterator[tuple[str, bytes]]:
    """Every meter's reading each second, forever; ``seq`` from ``first_seq``."""
    seq = first_seq
    for k in itertools.count():
        for device_id in meters:
            yield f"meters/1/{device_id}/telemetry", telemetry_payload(seq, first_ts + k)
            seq += 1


@pytest.mark.slow
@pytest.mark.timing  # the backlog must be published within the outage; the drain rate is asserted
def test_cloud_outage_of_60_seconds_then_backlog_drains(
    mosquitto: Mosquitto, stub: StubProcess, bridge_factory: BridgeFactory
) -> None:
    """Test that a 60 s cloud outage with 10 minutes of meter backlog loses nothing and drains.

    200 meters publish one reading a second throughout. During the outage the meters'
    10-minute back-fill (200 x 600 readings, timestamps one second apart per meter) is
    published as fast as the broker takes it. After the outage the drain time and rate of the
    backlog are measured.
    """
    outage_secs = 60.0
    meters = meter_ids(200)
    backlog_minutes = 10
    backlog_total = len(meters) * backlog_minutes * 60
    live_first_seq = 1_000_000
    bridge = bridge_factory()
    tally = _Tally(stub)
    live = _PacedPublisher(
        mosquitto,
        _live_stream(meters, live_first_seq, START_TS + backlog_minutes * 60),
        rate=len(meters),
        chunk=len(meters),
    ).start()
    wait_until(lambda: tally.update().distinct >= 2 * len(meters), 30, message="live readings")

    stub.set_faults(outage=True)
    outage_began = time.monotonic()
    delivered_before = tally.update().entries
    backlog = iter_telemetry(meters, backlog_minutes * 60, START_TS)
    with Publisher(mosquitto.host, mosquitto.port) as pub:
        assert backlog_total == pub.publish_many(backlog, timeout=180)
    burst_secs = time.monotonic() - outage_began
    wait_until(
        lambda: bridge.metric("bridge_spool_readings") >= backlog_total,
        60,
        message="the backlog spooled",
    )
    assert 200 == _healthz(bridge)
    remaining = outage_secs - (time.monotonic() - outage_began)
    assert remaining > 0, f"publishing the backlog took {burst_secs:.0f}s, longer than the outage"
    time.sleep(remaining)  # the outage lasts its 60 s; nothing to wait for meanwhile
    lag_at_recovery = bridge.metric("bridge_spool_oldest_reading_age_seconds")
    spooled_at_recovery = int(bridge.metric("bridge_spool_readings"))
    assert delivered_before == tally.update().entries  # nothing got through the outage
    stub.set_faults(outage=False)
    recovered = time.monotonic()
    delivered_at_recovery = tally.distinct

    backlog_seqs = set(range(backlog_total))
    wait_until(lambda: tally.has_all(backlog_seqs), 240, interval=0.5, message="backlog drained")
    drain_secs = time.monotonic() - recovered
    drained = tally.distinct - delivered_at_recovery
    live.stop()
    live.join(30)
    expected = backlog_seqs | set(range(live_first_seq, live_first_seq + live.published))
    wait_until(lambda: tally.has_all(expected), 60, message="every reading")
    wait_until(lambda: bridge.metric("bridge_spool_readings") == 0, 15, message="spool empty")
    peak = _peak_rss_mb(bridge)
    missing = tally.missing(expected)
    _summary(
        "cloud_outage_60s",
        published=backlog_total + live.published,
        delivered=tally.distinct,
        dead_lettered=int(bridge.metric("bridge_readings_dead_lettered_total")),
        duplicates=tally.duplicates,
        lost=len(missing),
        peak_rss_mb=peak,
        backlog=backlog_total,
        backlog_publish_secs=round(burst_secs, 1),
        spooled_at_recovery=spooled_at_recovery,
        lag_at_recovery_secs=round(lag_at_recovery),
        drain_secs=round(drain_secs, 1),
        drain_rate_per_s=round(drained / drain_secs),
        mqtt_reconnects=int(bridge.metric("bridge_mqtt_reconnects_total")),
    )
    assert [] == missing
    assert 0 == tally.duplicates
    assert spooled_at_recovery >= backlog_total
    # Taking in 120,000 readings at full speed never starved the MQTT keepalive.
    assert 0 == bridge.metric("bridge_mqtt_reconnects_total")
    # The drain outpaces the meters many times over (200 readings/s keep arriving meanwhile).
    assert drained / drain_secs > 5 * len(meters)


# ---------------------------------------------------------------------------------------------
# 4. a slow cloud


def _mosquitto_lines_about(mosquitto: Mosquitto, client_id: str) -> list[str]:
    return [line for line in mosquitto.log_text().splitlines() if client_id in line]


@pytest.mark.slow
def test_slow_cloud_keeps_memory_bounded_and_the_session_alive(
    mosquitto: Mosquitto, stub: StubProcess, bridge_factory: BridgeFactory
) -> None:
    """Test that a cloud answering after 2 s keeps memory bounded and the MQTT session up.

    30,000 readings are published at 500 a second for 60 s while every push takes 2 s: the
    bridge can push 4 x 100 readings per 2 s, so a backlog of about 18,000 builds up (more than
    the batcher holds in memory: the feeder pages it from the spool). Keepalive is 5 s, so a
    blocked event loop would show as a keepalive timeout. Then the cloud answers at normal
    speed again and the backlog drains.
    """
    stub.set_faults(latency_ms=2000)
    bridge = bridge_factory(mqtt={"keepalive_secs": 5})
    config = yaml.safe_load(bridge.config_path.read_text(encoding="utf-8"))
    client_id = config["mqtt"]["client_id"]
    total = 30_000
    items = iter_telemetry(meter_ids(100), total // 100, START_TS)
    publisher = _PacedPublisher(mosquitto, items, rate=500, chunk=250).start()
    tally = _Tally(stub)
    rss: list[int] = []
    connected: list[float] = []
    health: list[int] = []
    backlog: list[float] = []
    deadline = time.monotonic() + 120
    while publisher.running and time.monotonic() < deadline:  # sample while the stream lasts
        rss.append(_status_value(bridge.pid, "VmRSS"))
        metrics = bridge.metrics()
        connected.append(metrics["bridge_mqtt_connected"])
        backlog.append(metrics["bridge_spool_readings"])
        health.append(_healthz(bridge))
        time.sleep(1.0)
    publisher.join(30)
    delivered_slow = tally.update().distinct
    stub.set_faults(latency_ms=0)
    recovered = time.monotonic()
    expected = set(range(total))
    wait_until(lambda: tally.has_all(expected), 120, interval=0.5, message="every reading")
    drain_secs = time.monotonic() - recovered
    wait_until(lambda: bridge.metric("bridge_spool_readings") == 0, 15, message="spool empty")
    peak = _peak_rss_mb(bridge)
    reconnects = bridge.metric("bridge_mqtt_reconnects_total")
    about_client = _mosquitto_lines_about(mosquitto, client_id)
    missing = tally.missing(expected)
    _summary(
        "slow_cloud_2s",
        published=publisher.published,
        delivered=tally.distinct,
        dead_lettered=0,
        duplicates=tally.duplicates,
        lost=len(missing),
        peak_rss_mb=peak,
        delivered_while_slow=delivered_slow,
        max_backlog=int(max(backlog)),
        rss_mb_first_last=f"{rss[0] / 1024:.0f}/{rss[-1] / 1024:.0f}",
        drain_after_recovery_secs=round(drain_secs, 1),
        mqtt_reconnects=int(reconnects),
    )
    assert total == publisher.published
    assert [] == missing
    assert 0 == tally.duplicates
    # The fault happened: the backlog outgrew what the batcher keeps in memory (10,000).
    assert max(backlog) > 10_000
    assert 0 == reconnects
    assert {1.0} == set(connected)
    assert {200} == set(health)
    assert [] == [line for line in about_client if "exceeded timeout" in line]
    connects = [line for line in about_client if "New client connected" in line]
    assert 1 == len(connects), about_client
    assert "k5)" in connects[0]  # the broker saw the 5 s keepalive
    assert peak < 150


# ---------------------------------------------------------------------------------------------
# 5. a garbage flood


def _garbage(rng: random.Random) -> list[tuple[str, bytes, str]]:
    """Bad messages as ``(topic, payload, expected reason)``.

    The 64 KiB payload limit is checked before any decoding, so a 100,000-level nesting (at
    least 200,000 bytes closed) and 10,000 points (about 110 KB) are rejected as too large;
    a 32,000-level nesting and 6,000 points are sent as well, which fit under the limit and
    reach the JSON parser and the point-count check.
    """
    topic = "meters/1/garbage-0001/telemetry"
    good_ts = b'"ts":1700000000'
    bad: list[tuple[str, bytes, str]] = []
    for _ in range(2_000):  # random bytes; 0xff never occurs in UTF-8
        bad.append((topic, b"\xff" + rng.randbytes(rng.randint(0, 2000)), "bad_encoding"))
    for _ in range(1_000):  # random text that is not JSON
        text = "".join(rng.choices(string.printable, k=rng.randint(1, 500)))
        bad.append((topic, ("~" + text).encode(), "bad_json"))
    for fill in b"xyz":  # 200 KiB against the 64 KiB limit
        prefix = b'{"ts":1700000000,"Ua":226.1,"pad":"'
        body = prefix + bytes([fill]) * (200 * 1024 - len(prefix) - 2) + b'"}'
        bad.append((topic, body, "payload_too_large"))
    bad.append((topic, b"[" * 100_000 + b"]" * 100_000, "payload_too_large"))
    bad.append((topic, b"[" * 32_000 + b"]" * 32_000, "bad_json"))
    bad.append((topic, b'{"a":' * 10_000 + b"1" + b"}" * 10_000, "bad_json"))
    bad.append((topic, b"[" * 60_000, "bad_json"))
    for constant in (b"NaN", b"Infinity", b"-Infinity"):
        bad.append((topic, b"{" + good_ts + b',"Ua":' + constant + b"}", "bad_value"))
    bad.append((topic, b'{"ts":NaN,"Ua":226.1}', "bad_time"))
    bad.append((topic, b'{"ts":Infinity,"Ua":226.1}', "bad_time"))

    def points(n: int) -> bytes:
        return b"{" + good_ts + b"".join(b',"p%d":1' % i for i in range(n)) + b"}"

    bad.append((topic, points(10_000), "payload_too_large"))
    bad.append((topic, points(6_000), "too_many_points"))
    bad.append((topic, points(1_001), "too_many_points"))
    for ts in (
        b'"yesterday"',
        b"true",
        b"-5",
        b"99999999999999999999",
        b'"2023-13-45 25:61:61"',
        b"[]",
        b"{}",
        b'"1700000000abc"',
        b"17e300",
    ):
        bad.append((topic, b'{"ts":' + ts + b',"Ua":226.1}', "bad_time"))
    bad += [(topic, b"", "empty_payload")] * 20
    bad += [
        (topic, b"[1,2]", "not_object"),
        (topic, b"42", "not_object"),
        (topic, b'"text"', "not_object"),
        (topic, b"{}", "no_points"),
        (topic, b"[]", "no_points"),
        (topic, b'{"ts":1700000000,"Ua":null}', "no_points"),
        (topic, b'{"ts":1700000000,"Ua":"abc"}', "bad_value"),
        (topic, b'{"ts":1700000000,"Ua":[226.1]}', "bad_value"),
        (topic, b'{"ts":1700000000,"Ua":true}', "bad_value"),
        (topic, b'{"ts":1700000000,"":1}', "bad_point"),
        (topic, b'{"ts":1700000000,"\\ud800":1}', "bad_point"),
        ("meters/x1/garbage-0001/telemetry", b'{"Ua":226.1}', "bad_device_type"),
        ("meters/1//telemetry", b'{"Ua":226.1}', "missing_device_id"),
    ]
    return bad


def test_garbage_flood_is_rejected_and_valid_readings_around_it_arrive(
    mosquitto: Mosquitto, stub: StubProcess, bridge_factory: BridgeFactory
) -> None:
    """Test that a flood of bad messages is dead-lettered by reason and the valid ones arrive.

    Every bad message is followed by a valid reading. Each bad one must be counted under its
    reason in ``bridge_messages_rejected_total`` and stored in ``dead_letters`` (the oversized
    ones keep only their first KiB), every valid reading arrives (including one with exactly
    the 1,000 points allowed), and ``/healthz`` answers 200 throughout.

    Topics that are not UTF-8 are not sent: mosquitto refuses them at PUBLISH (it closes the
    publisher's connection), so they never reach the bridge.
    """
    bridge = bridge_factory(mqtt={"max_payload_bytes": 64 * 1024})
    rng = random.Random(5)
    bad = _garbage(rng)
    rng.shuffle(bad)
    messages: list[tuple[str, bytes]] = []
    valid = 0
    for topic, payload, _ in bad:
        messages.append((topic, payload))
        messages.append(
            (
                f"meters/1/meter-{valid % 10:04d}/telemetry",
                telemetry_payload(valid, START_TS + valid),
            )
        )
        valid += 1
    # At the limit: 999 points plus seq, exactly the 1,000 points one reading may carry.
    at_limit = {f"p{i}": "1" for i in range(999)} | {"seq": str(valid)}
    messages.append(
        (
            "meters/1/meter-1000/telemetry",
            json.dumps({"ts": START_TS, **{k: int(v) for k, v in at_limit.items()}}).encode(),
        )
    )
    valid += 1

    statuses: list[int] = []
    polling = threading.Event()

    def poll_healthz() -> None:
        while not polling.is_set():
            statuses.append(_healthz(bridge))
            polling.wait(0.05)  # sampling interval

    poller = threading.Thread(target=poll_healthz, daemon=True, name="healthz-poller")
    poller.start()
    tally = _Tally(stub)
    try:
        with Publisher(mosquitto.host, mosquitto.port) as pub:
            published = pub.publish_many(messages, timeout=120)
        expected = set(range(valid))
        wait_until(lambda: tally.has_all(expected), 60, message="every valid reading")
        wait_until(
            lambda: bridge.metric("bridge_messages_received_total") == len(messages),
            30,
            message="every message received",
        )
    finally:
        polling.set()
        poller.join(10)
    assert bridge.running
    peak = _peak_rss_mb(bridge)

    expected_reasons = Counter(reason for _, _, reason in bad)
    counted = {
        reason: int(bridge.metric("bridge_messages_rejected_total", reason=reason))
        for reason in expected_reasons
    }
    with _spool_readonly(bridge) as db:
        rows = db.execute(
            "SELECT source, reason, topic, payload FROM dead_letters ORDER BY id"
        ).fetchall()
    db.close()
    by_seq = {int(e["data"]["seq"]): e for e in stub.received()}
    missing = tally.missing(range(valid))
    _summary(
        "garbage_flood",
        published=published,
        delivered=tally.distinct,
        dead_lettered=len(rows),
        duplicates=tally.duplicates,
        lost=len(missing),
        peak_rss_mb=peak,
        bad_messages=len(bad),
        reasons=len(expected_reasons),
        healthz_samples=len(statuses),
    )
    assert len(messages) == published
    assert [] == missing
    assert 0 == tally.duplicates
    assert dict(expected_reasons) == counted
    assert len(bad) == int(bridge.metric("bridge_messages_rejected_total"))
    assert valid == int(bridge.metric("bridge_messages_accepted_total"))
    # Dead letters in arrival order: each with its topic and payload, oversized ones cut to
    # their first KiB.
    expected_rows = [
        (
            "mapping",
            reason,
            topic,
            payload[:1024] if reason == "payload_too_large" else payload,
        )
        for topic, payload, reason in bad
    ]
    assert len(expected_rows) == len(rows)
    assert expected_rows == [(s, r, t, bytes(p or b"")) for s, r, t, p in rows]
    assert telemetry_points(0) == by_seq[0]["data"]
    assert at_limit == by_seq[valid - 1]["data"]
    assert statuses
    assert {200} == set(statuses)
    # One log line per reason (the flood took well under a minute), not one per message.
    reject_lines = Counter(
        event["reason"]
        for event in _json_events(bridge)
        if event["event"] == "message rejected, dead-lettered"
    )
    assert dict.fromkeys(expected_reasons, 1) == dict(reject_lines)


# ---------------------------------------------------------------------------------------------
# gaps found while writing the scenarios (fixed; kept as regression tests)


def test_garbage_cannot_fill_the_spool_and_hold_back_valid_readings(
    mosquitto: Mosquitto, stub: StubProcess, bridge_factory: BridgeFactory
) -> None:
    """Test that dead letters cannot take the room that valid readings need.

    The README: bad input "never blocks or loses the messages around it". 40 bad payloads of
    60 KB (2.4 MB of dead letters) go to a bridge with a 1 MiB spool, then 100 valid readings.
    """
    bridge = bridge_factory(spool={"max_bytes": 1024 * 1024})
    total = 100
    with Publisher(mosquitto.host, mosquitto.port) as pub:
        pub.publish_many([("meters/1/garbage-0001/telemetry", b"~" + b"x" * 60_000)] * 40)
        wait_until(
            lambda: bridge.metric("bridge_messages_rejected_total") == 40,
            30,
            message="40 rejects",
        )
        wait_until(
            lambda: bridge.metric("bridge_dead_letters_evicted_total") > 0,
            10,
            message="the oldest garbage given up to keep the dead-letter budget",
        )
        pub.publish_many(iter_telemetry(meter_ids(2), total // 2, START_TS))
    tally = _Tally(stub)
    wait_until(
        lambda: tally.has_all(set(range(total))),
        10,
        message=lambda: f"the valid readings (spool full: {bridge.metric('bridge_spool_full')})",
    )


def test_push_the_cloud_stored_after_the_bridge_gave_up_arrives_twice_and_is_counted(
    mosquitto: Mosquitto, stub: StubProcess, bridge_factory: BridgeFactory
) -> None:
    """Test that a push that timed out but was stored is sent again and counted as redelivered.

    The cloud takes 1.5 s, the bridge waits 1 s: every attempt times out, and a real service
    still stores each one it had read. Afterwards the cloud is fast again.
    """
    stub.set_faults(latency_ms=1500)
    bridge = bridge_factory(cloud={"request_timeout_secs": 1.0, "retry_max_secs": 0.5})
    total = 10
    with Publisher(mosquitto.host, mosquitto.port) as pub:
        pub.publish_many(iter_telemetry(meter_ids(total), 1, START_TS))
    wait_until(
        lambda: bridge.metric("bridge_push_requests_total", code="timeout") >= 2,
        30,
        message="two timed-out attempts",
    )
    assert bridge.metric("bridge_readings_redelivered_total") >= total
    stub.set_faults(latency_ms=0)
    tally = _Tally(stub)
    wait_until(lambda: tally.has_all(set(range(total))), 30, message="every reading")
    # The attempts the bridge gave up on finish at the cloud within their 1.5 s.
    wait_until(
        lambda: tally.update().duplicates >= total, 5, message="the timed-out attempt stored"
    )
