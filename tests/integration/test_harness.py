"""The test harness itself: private brokers, the publisher window, config and metrics helpers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bridge.config import load_settings
from tests.support import (
    BridgeFactory,
    Mosquitto,
    MosquittoFactory,
    Publisher,
    StubFactory,
    StubProcess,
    Subscriber,
    free_port,
    iter_telemetry,
    parse_metrics,
    port_accepts,
    push_vector_names,
    telemetry_payload,
    telemetry_points,
    wait_until,
    write_bridge_config,
)

TOPIC = "meters/1/meter-0001/telemetry"


def test_mosquitto_starts_on_free_loopback_port(mosquitto: Mosquitto) -> None:
    """Test that the broker fixture listens on 127.0.0.1 on a port other than 1883."""
    assert mosquitto.running
    assert mosquitto.port != 1883
    assert mosquitto.host == "127.0.0.1"
    assert port_accepts(mosquitto.host, mosquitto.port)
    assert f"listener {mosquitto.port} 127.0.0.1\n" in mosquitto.config_text()
    assert "user root\n" in mosquitto.config_text()
    assert "persistence true\n" in mosquitto.config_text()


def test_mosquitto_delivers_qos1_message(mosquitto: Mosquitto) -> None:
    """Test that a QoS 1 message published to the broker reaches a subscriber."""
    payload = telemetry_payload(1, 1_700_000_000)
    with (
        Subscriber(mosquitto.host, mosquitto.port, ["meters/#"]) as subscriber,
        Publisher(mosquitto.host, mosquitto.port) as publisher,
    ):
        publisher.publish(TOPIC, payload)
        assert [(TOPIC, payload)] == subscriber.wait_for(1)


def test_mosquitto_restart_keeps_queued_message_of_persistent_session(
    mosquitto: Mosquitto,
) -> None:
    """Test that a clean broker restart keeps a message queued for an offline persistent session."""
    subscriber = Subscriber(
        mosquitto.host, mosquitto.port, ["meters/#"], client_id="keeper", session_expiry=3600
    )
    # clean_start=False even on the first connect: mosquitto 2.0 saves only such sessions.
    subscriber.connect(clean_start=False)
    subscriber.disconnect()
    payload = telemetry_payload(2, 1_700_000_001)
    with Publisher(mosquitto.host, mosquitto.port) as publisher:
        publisher.publish(TOPIC, payload)

    mosquitto.restart()

    try:
        subscriber.connect(clean_start=False)
        assert subscriber.session_present
        assert [(TOPIC, payload)] == subscriber.wait_for(1)
    finally:
        subscriber.close()


def test_mosquitto_kill_and_restart_keeps_autosaved_session(mosquitto: Mosquitto) -> None:
    """Test that after SIGKILL the broker restarts on its port with the last autosaved state."""
    subscriber = Subscriber(
        mosquitto.host, mosquitto.port, ["meters/#"], client_id="survivor", session_expiry=3600
    )
    subscriber.connect(clean_start=False)
    subscriber.disconnect()
    port = mosquitto.port
    # The session is on disk once an autosave (every second) happened after it was created.
    saved_after = mosquitto.db_path.stat().st_mtime_ns if mosquitto.db_path.exists() else 0
    wait_until(
        lambda: mosquitto.db_path.exists() and mosquitto.db_path.stat().st_mtime_ns > saved_after,
        timeout=10,
        message="an autosave of the persistence file",
    )

    mosquitto.restart(hard=True)

    assert port == mosquitto.port
    payload = telemetry_payload(3, 1_700_000_002)
    try:
        subscriber.connect(clean_start=False)
        assert subscriber.session_present
        with Publisher(mosquitto.host, mosquitto.port) as publisher:
            publisher.publish(TOPIC, payload)
        assert [(TOPIC, payload)] == subscriber.wait_for(1)
    finally:
        subscriber.close()


def test_mosquitto_context_manager_kills_broker(tmp_path: Path) -> None:
    """Test that leaving a Mosquitto context kills the broker and frees its port."""
    with Mosquitto(tmp_path / "m", persistence=False) as broker:
        assert broker.running
    assert not broker.running
    assert not port_accepts(broker.host, broker.port)


def test_mosquitto_factory_applies_queue_and_inflight_options(
    mosquitto_factory: MosquittoFactory,
) -> None:
    """Test that factory options end up in the generated broker config."""
    broker = mosquitto_factory(persistence=False, max_inflight=7, max_queued_messages=50)
    config = broker.config_text()
    assert "max_inflight_messages 7\n" in config
    assert "max_queued_messages 50\n" in config
    assert "persistence false\n" in config


def test_publisher_window_bounds_unacknowledged_messages(mosquitto: Mosquitto) -> None:
    """Test that the publisher never has more than its window of messages unacknowledged."""
    devices = [f"meter-{n:04d}" for n in range(10)]
    with (
        Subscriber(mosquitto.host, mosquitto.port, ["meters/#"]) as subscriber,
        Publisher(mosquitto.host, mosquitto.port, window=10) as publisher,
    ):
        mosquitto.pause()  # no PUBACKs while frozen: the window must fill and block
        try:
            with pytest.raises(TimeoutError):
                publisher.publish_many(iter_telemetry(devices, 10, 1_700_000_000), timeout=1.0)
            assert publisher.submitted == 10
            assert publisher.outstanding == 10
        finally:
            mosquitto.resume()
        wait_until(lambda: publisher.acked == 10, timeout=10, message="the 10 held PUBACKs")

        assert publisher.publish_many(iter_telemetry(devices, 100, 1_700_000_100)) == 1000

        assert publisher.max_outstanding == 10
        assert len(subscriber.wait_for(1010)) == 1010


def test_free_port_is_bindable_loopback_port() -> None:
    """Test that free_port returns a port that is not the system broker's and is closed."""
    port = free_port()
    assert port != 1883
    assert not port_accepts("127.0.0.1", port)


def test_wait_until_returns_first_truthy_result() -> None:
    """Test that wait_until returns the predicate's first truthy value."""
    calls = iter([0, "", "ready", "later"])
    assert wait_until(lambda: next(calls), timeout=5, interval=0.001) == "ready"


def test_wait_until_raises_with_description_on_timeout() -> None:
    """Test that wait_until fails with the awaited condition named in the message."""
    with pytest.raises(AssertionError, match=r"timed out after 0\.05s waiting for the moon"):
        wait_until(lambda: False, timeout=0.05, interval=0.01, message=lambda: "the moon")


def test_telemetry_payload_writes_fixed_decimal_numbers() -> None:
    """Test that payload values are JSON numbers whose text keeps its fixed decimals."""
    payload = telemetry_payload(7, 1_700_000_000, Ua=None)
    parsed = json.loads(payload, parse_float=str, parse_int=str)
    expected = {k: v for k, v in telemetry_points(7).items() if k != "Ua"}
    assert {"ts": "1700000000", **expected, "Ua": None} == parsed
    assert b'"Ub":227.35' in payload
    assert b'"F":50.02' in payload
    assert 12 <= len(parsed) <= 14


def test_parse_metrics_sums_samples_by_name_and_labels() -> None:
    """Test that metrics are keyed by name plus label block and repeated samples are summed."""
    text = (
        "# HELP eb_pushed_total Readings pushed.\n"
        "# TYPE eb_pushed_total counter\n"
        'eb_pushed_total{outcome="ok"} 3.0\n'
        'eb_pushed_total{outcome="ok"} 2.0\n'
        'eb_pushed_total{outcome="bad json"} 1 1700000000000\n'
        "eb_spool_rows 42\n"
        'eb_latency_seconds_bucket{le="+Inf"} 5\n'
    )
    assert parse_metrics(text) == {
        'eb_pushed_total{outcome="ok"}': 5.0,
        'eb_pushed_total{outcome="bad json"}': 1.0,
        "eb_spool_rows": 42.0,
        'eb_latency_seconds_bucket{le="+Inf"}': 5.0,
    }


def test_write_bridge_config_produces_valid_settings(tmp_path: Path) -> None:
    """Test that the generated config validates and deep-merges overrides."""
    path = write_bridge_config(
        tmp_path,
        mqtt_port=18830,
        cloud_url="http://127.0.0.1:18080",
        http_port=19108,
        batch={"max_devices": 5},
        cloud={"max_in_flight": 2},
    )

    settings = load_settings(path)

    assert settings.mqtt.port == 18830
    assert settings.mqtt.client_id.startswith("bridge-test-")
    assert settings.cloud.endpoint == "http://127.0.0.1:18080"
    assert settings.cloud.max_in_flight == 2
    assert settings.cloud.retry_initial_secs == 0.1
    assert settings.batch.max_devices == 5
    assert settings.batch.linger_secs == 0.2
    assert tmp_path / "spool.db" == settings.spool.path
    assert settings.http.listen == "127.0.0.1:19108"


def test_push_vectors_are_in_the_repository() -> None:
    """Test that the captured vendor requests are inside the repository (tests/data).

    The captured vendor requests are in tests/data, so no test depends on a folder
    outside the repository.
    """
    assert {"push_v3_ak", "push_v3_sts", "push_v3_sts_prodhost_offline"} <= set(push_vector_names())


def test_stub_process_learns_url_and_restarts_on_same_port(stub_factory: StubFactory) -> None:
    """Test that the stub's URL is read from its stdout and a restart keeps the port."""
    stub = stub_factory()
    port = stub.port

    assert stub.received() == []
    assert isinstance(stub.stats(), dict)
    assert stub.set_faults(error_rate=0.5)["error_rate"] == 0.5
    stub.reset()
    stub.restart()

    assert stub.port == port
    assert port_accepts(stub.host, stub.port)
    assert stub.url == f"http://127.0.0.1:{port}"


def test_bridge_process_starts_ready_and_delivers(
    mosquitto: Mosquitto, stub: StubProcess, bridge_factory: BridgeFactory
) -> None:
    """Test that a bridge from the factory gets ready, exposes metrics and delivers a reading."""
    bridge = bridge_factory()
    payload = telemetry_payload(1, 1_700_000_000)

    with Publisher(mosquitto.host, mosquitto.port) as publisher:
        publisher.publish(TOPIC, payload)
    entries = wait_until(stub.received, timeout=20, message="the reading at the stub")

    assert [e["deviceId"] for e in entries] == ["meter-0001"]
    assert entries[0]["data"]["Ua"] == telemetry_points(1)["Ua"] == "226.10"
    assert bridge.metrics()
    assert bridge.terminate() == 0
