"""The delivery promises across a real network (namespace, veth, delay proxy, nftables).

The broker and the cloud stand-in run in a network namespace of the test's own behind a veth
pair (``bridge.testing.RemoteHost``), with latency from a delay proxy on the path and loss or a
partition from nftables in the namespace.

Each scenario ends in an exact account and prints one ``SCENARIO`` line (the source of the
tables in docs/fault-scenarios.md): published (acknowledged to the publisher by the broker),
delivered (distinct readings the stub accepted), dead-lettered, duplicated, lost (asserted 0),
the bridge's peak RSS, and what explains the duplicates (asserted: no more duplicates than the
messages the broker sent again plus the rows the bridge sent to the cloud again). The network
mode (``netns`` or the ``loopback-proxy`` fallback) is printed too.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from bridge.testing import DelayProxy, RemoteHost
from bridge.testing.network import FaultUnsupported
from tests.support import (
    START_TS,
    BridgeFactory,
    BridgeProcess,
    Mosquitto,
    Publisher,
    StubProcess,
    iter_telemetry,
    meter_ids,
    seq_counts,
    wait_until,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TOTAL = 2_000
METERS = 50


@dataclass
class Link:
    """One network condition: one-way delay on both paths, loss in the namespace."""

    name: str
    delay_ms: float
    loss_percent: float = 0.0


LINKS = [Link("5ms", 5), Link("50ms", 50), Link("5ms+1%loss", 5, 1.0)]


@dataclass
class World:
    """The broker and the cloud behind the link, the proxies on the path, a bridge factory."""

    host: RemoteHost
    broker: Mosquitto
    stub: StubProcess
    mqtt_proxy: DelayProxy
    cloud_proxy: DelayProxy
    make_bridge: Callable[..., BridgeProcess]
    published: int = 0

    def bridge(self, **overrides: Any) -> BridgeProcess:
        """A bridge reaching the broker and the cloud through the proxies."""
        settings: dict[str, Any] = {
            "mqtt": {"client_id": "plant-bridge", "keepalive_secs": 5},
            "cloud": {"request_timeout_secs": 5},
        }
        for section, values in overrides.items():
            settings[section] = {**settings.get(section, {}), **values}
        return self.make_bridge(
            mqtt_port=self.mqtt_proxy.port,
            cloud_url=f"http://127.0.0.1:{self.cloud_proxy.port}",
            **settings,
        )

    def publish(self, count: int = TOTAL) -> int:
        """Publish the next ``count`` numbered readings straight to the broker (over the veth)."""
        items = list(iter_telemetry(meter_ids(METERS), TOTAL // METERS, START_TS))
        batch = items[self.published : self.published + count]
        with Publisher(self.broker.host, self.broker.port) as pub:
            done = pub.publish_many(batch, timeout=300)
        self.published += done
        return done


@pytest.fixture(params=LINKS, ids=[link.name for link in LINKS])
def world(
    request: pytest.FixtureRequest, tmp_path: Path, bridge_factory: BridgeFactory
) -> Iterator[World]:
    """The remote host with its broker and stub, and the link condition of the parameter."""
    link: Link = request.param
    with RemoteHost(tmp_path / "remote") as host:
        broker = host.mosquitto(persistence=True)
        stub = host.stub()
        mqtt_proxy = host.proxy(broker.port, delay_ms=link.delay_ms)
        cloud_proxy = host.proxy(stub.port, delay_ms=link.delay_ms)
        if link.loss_percent:
            try:
                host.loss(link.loss_percent)
            except FaultUnsupported:
                pytest.skip(f"loss needs a network namespace (mode {host.mode})")
        print(f"\nnetwork mode: {host.mode}; link {link.name}")
        yield World(host, broker, stub, mqtt_proxy, cloud_proxy, bridge_factory)


def _account(
    world: World, name: str, published: int, bridges: list[BridgeProcess], **extra: object
) -> None:
    """Wait for every reading, then print and check the scenario's account."""
    wait_until(
        lambda: len(seq_counts(world.stub.received())) >= TOTAL,
        120,
        message=lambda: f"all {TOTAL} readings ({len(seq_counts(world.stub.received()))} so far)",
    )
    counts = seq_counts(world.stub.received())
    lost = sorted(set(range(TOTAL)) - set(counts))
    duplicates = sum(c - 1 for c in counts.values() if c > 1)
    last = bridges[-1]
    dead = int(last.metric("bridge_messages_rejected_total"))
    peak = max(b.peak_rss_mb for b in bridges)
    # What can explain a duplicate, as the (last) bridge counted it: messages the broker sent
    # again (DUP) and rows sent to the cloud again (their push may have been stored).
    broker_resent = int(last.metric("bridge_mqtt_redelivered_messages_total"))
    rows_resent = int(last.metric("bridge_readings_redelivered_total"))
    fields = {
        "published": published,
        "delivered": len(counts),
        "dead_lettered": dead,
        "duplicated": duplicates,
        "lost": len(lost),
        "peak_rss_mb": peak,
        "broker_resent": broker_resent,
        "rows_resent": rows_resent,
        **extra,
    }
    print(
        f"SCENARIO {name} [{world.host.mode}]: "
        + " ".join(f"{key}={value}" for key, value in fields.items())
    )
    assert (TOTAL, [], 0) == (published, lost, dead)
    assert duplicates <= broker_resent + rows_resent, "a duplicate no counter explains"


def test_resumed_backlog_drains_across_the_network(world: World) -> None:
    """Test that a session backlog beyond receive maximum 100 drains completely on reconnect.

    A backlog queued in the bridge's session while it was away drains completely
    when it comes back, with receive maximum 100 and the broker a network away. (Old: acks
    were sent only after SUBACK, so the acks of the backlog's first window were dropped and the
    session wedged: 100 delivered, then nothing, for the life of the connection.)
    """
    first = world.bridge(mqtt={"receive_maximum": 100})
    first.terminate()
    published = world.publish()
    second = world.bridge(mqtt={"receive_maximum": 100})
    _account(world, "resume_backlog", published, [first, second])


def test_broker_restart_mid_stream_loses_nothing_across_the_network(world: World) -> None:
    """Test that a broker restart while the bridge drains its queue loses nothing.

    A broker restart (persistence on) while the bridge drains what the broker
    queued loses nothing: the bridge reconnects across the link and resumes its session.
    """
    bridge = world.bridge(mqtt={"receive_maximum": 100})
    published = world.publish(TOTAL // 2)
    wait_until(lambda: len(world.stub.received()) >= TOTAL // 8, 60, message="some delivered")
    world.broker.restart()
    published += world.publish(TOTAL - TOTAL // 2)
    _account(world, "broker_restart", published, [bridge])


def test_sigkill_mid_stream_loses_nothing_across_the_network(world: World) -> None:
    """Test that a bridge SIGKILLed in the middle of a stream and restarted loses nothing."""
    bridge = world.bridge()
    publisher = _background(world)
    wait_until(lambda: len(world.stub.received()) >= TOTAL // 4, 60, message="a quarter")
    bridge.kill()
    bridge.start().wait_ready(60)
    published = publisher.result()
    _account(world, "sigkill", published, [bridge])


def test_cloud_outage_mid_stream_loses_nothing_across_the_network(world: World) -> None:
    """Test that a 10 s cloud outage mid-stream loses nothing: the spool drains afterwards.

    A 10 s cloud outage in the middle of a stream loses nothing: the readings wait
    in the spool and drain once the cloud is back.
    """
    bridge = world.bridge()
    publisher = _background(world)
    wait_until(lambda: len(world.stub.received()) >= TOTAL // 4, 60, message="a quarter")
    world.stub.set_faults(outage=True)
    time.sleep(10)  # the outage's length, not a wait for a condition
    world.stub.set_faults(outage=False)
    published = publisher.result()
    _account(world, "cloud_outage", published, [bridge])


def test_partition_longer_than_the_keepalive_loses_nothing(
    tmp_path: Path, bridge_factory: BridgeFactory
) -> None:
    """Test that a 20 s partition mid-stream loses nothing once the link heals.

    A 20 s partition (keepalive 5 s: the bridge notices the dead link, the broker
    drops the connection) in the middle of a stream loses nothing once the link heals.
    """
    with RemoteHost(tmp_path / "remote") as host:
        broker = host.mosquitto(persistence=True)
        stub = host.stub()
        world = World(
            host,
            broker,
            stub,
            host.proxy(broker.port, delay_ms=5),
            host.proxy(stub.port, delay_ms=5),
            bridge_factory,
        )
        bridge = world.bridge()
        publisher = _background(world, rate=200)
        wait_until(lambda: len(stub.received()) >= 200, 60, message="some readings")
        host.partition()
        time.sleep(20)  # the partition's length, not a wait for a condition
        disconnected = bridge.metric("bridge_mqtt_connected") == 0
        host.heal()
        published = publisher.result()
        _account(world, "partition_20s", published, [bridge], saw_disconnect=disconnected)
        assert disconnected


class _Background:
    """A publisher thread; :meth:`result` joins it and returns how many were acknowledged."""

    def __init__(self, world: World, rate: float) -> None:
        self._world = world
        self._rate = rate
        self._count = 0
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True, name="publisher")
        self._thread.start()

    def _run(self) -> None:
        items = list(iter_telemetry(meter_ids(METERS), TOTAL // METERS, START_TS))
        try:
            with Publisher(self._world.broker.host, self._world.broker.port) as pub:
                for start in range(0, len(items), 50):
                    self._count += pub.publish_many(items[start : start + 50], timeout=300)
                    time.sleep(50 / self._rate)  # the publishing rate
        except BaseException as exc:  # reported in the test's thread
            self._error = exc

    def result(self) -> int:
        """Wait for the last acknowledgement (publishing survives broker restarts)."""
        self._thread.join(300)
        if self._error is not None:
            raise self._error
        return self._count


def _background(world: World, rate: float = 500) -> _Background:
    return _Background(world, rate)
