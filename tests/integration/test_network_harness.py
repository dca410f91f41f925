"""The network harness itself (bridge.testing.network).

A namespace behind a veth, nftables loss and partition, the delay proxy, the loopback
fallback and a teardown that leaves nothing.

Each test prints the mode it ran in (``netns`` or ``loopback-proxy``) and, on failure, the
harness's state (addresses, nftables table, proxy counters, the peers' log tails). Tests that
need packets to be dropped skip in ``loopback-proxy`` mode.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import select
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from bridge.testing import (
    LOOPBACK,
    DelayProxy,
    FaultUnsupported,
    Mosquitto,
    MqttProbe,
    NetNamespace,
    Publisher,
    RemoteHost,
    StubProcess,
    Subscriber,
    mqtt_connect_ok,
    mqtt_ping_rtts,
    port_accepts,
    telemetry_payload,
    wait_mqtt_reachable,
    wait_until,
)
from bridge.testing.network import ADDRESS_POOL, cleanup_stale_namespaces

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

TOPIC = "meters/1/meter-0001/telemetry"


def _ms(seconds: list[float]) -> str:
    return ", ".join(f"{value * 1000:.2f}" for value in seconds) + " ms"


@pytest.fixture
def remote(tmp_path: Path) -> Iterator[RemoteHost]:
    """A started remote host (a namespace when possible); stopped at teardown."""
    host = RemoteHost(tmp_path / "remote").start()
    print(f"network mode: {host.mode} address={host.address} ({host.fallback_reason or 'ok'})")
    try:
        yield host
    finally:
        print(host.describe())  # shown by pytest only when the test failed
        host.stop()


def _require_netns(host: RemoteHost) -> None:
    if host.mode != "netns":
        pytest.skip(f"needs a network namespace ({host.fallback_reason})")


def _require_loss(host: RemoteHost) -> None:
    _require_netns(host)
    if not host.supports_loss:
        pytest.skip("needs nft (apt-get install nftables)")


def _netns_names() -> list[str]:
    result = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    return [line.split()[0] for line in result.stdout.splitlines() if line.strip()]


def _link_names() -> list[str]:
    result = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True)
    return [line.split(":")[1].strip().split("@")[0] for line in result.stdout.splitlines()]


# ---------------------------------------------------------------------------------------------
# the namespace


def test_broker_in_namespace_is_reachable_at_veth_address_and_not_on_loopback(
    remote: RemoteHost,
) -> None:
    """Test that mosquitto and the stub run in their own namespace, on its veth address only."""
    _require_netns(remote)
    assert remote.netns is not None
    assert ipaddress.IPv4Address(remote.address) in ADDRESS_POOL
    assert ipaddress.IPv4Address(remote.host_address) in ADDRESS_POOL
    assert remote.netns.network is not None
    assert remote.netns.network.prefixlen == 30

    broker = remote.mosquitto()
    stub = remote.stub()
    assert broker.host == remote.address
    assert stub.host == remote.address
    assert stub.url == f"http://{remote.address}:{stub.port}"
    for pid in (broker.pid, stub.pid):
        assert os.readlink(f"/proc/{pid}/ns/net") != os.readlink("/proc/self/ns/net")

    assert port_accepts(remote.address, broker.port)
    assert not port_accepts(LOOPBACK, broker.port)
    assert not port_accepts(LOOPBACK, stub.port)
    assert stub.stats()["requests"] == 0  # the /_stub API answers over the veth

    payload = telemetry_payload(1, 1_700_000_000)
    with (
        Subscriber(remote.address, broker.port, ["meters/#"]) as subscriber,
        Publisher(remote.address, broker.port) as publisher,
    ):
        publisher.publish(TOPIC, payload)
        assert subscriber.wait_for(1) == [(TOPIC, payload)]
    # mosquitto saw the clients come from the host end of the veth, not from loopback
    wait_until(
        lambda: f"from {remote.host_address}:" in broker.log_text(),
        5,
        message="a connection from the veth's host address in mosquitto's log",
    )


def test_full_loss_and_partition_time_out_connections_and_heal_restores(
    remote: RemoteHost,
) -> None:
    """Test that full loss and a partition make connects time out, and heal() restores them.

    100 % loss and a partition make connects time out (not refused), hold an
    established connection, and heal() restores both.
    """
    _require_loss(remote)
    broker = remote.mosquitto()
    address = (remote.address, broker.port)

    for fault in ("loss", "partition"):
        with MqttProbe(*address) as probe:
            probe.ping()
            if fault == "loss":
                remote.loss(100)
            else:
                remote.partition()
            with pytest.raises(TimeoutError):
                MqttProbe(*address, timeout=1.0)
            probe.send_ping()
            with pytest.raises(TimeoutError):
                probe.recv_pong(timeout=1.0)
            dropped = remote.dropped_packets()
            assert dropped > 0

            remote.heal()
            # The held ping is answered once TCP retransmits: the connection survived.
            assert probe.recv_pong(timeout=15.0) > 1.0
            wait_mqtt_reachable(*address, timeout=10)
            assert probe.ping() < 1.0
        print(f"{fault}: {dropped} packets dropped while cut off")


def test_one_percent_loss_still_delivers_every_qos1_message(remote: RemoteHost) -> None:
    """Test that with 1 % loss each way every QoS 1 message arrives, in order.

    With 1 % loss each way every QoS 1 message from a publisher on the host
    reaches a subscriber on the host, through the broker in the namespace, in order.
    """
    _require_loss(remote)
    broker = remote.mosquitto()
    count = 2000
    remote.loss(1)
    items = [(TOPIC, telemetry_payload(seq, 1_700_000_000 + seq)) for seq in range(count)]
    with (
        Subscriber(remote.address, broker.port, ["meters/#"]) as subscriber,
        Publisher(remote.address, broker.port, window=20) as publisher,
    ):
        assert publisher.publish_many(items, timeout=90) == count
        received = subscriber.wait_for(count, timeout=60)
    dropped = remote.dropped_packets()
    print(f"1 % loss: {count} QoS 1 messages delivered, {dropped} packets dropped on the way")
    assert received == items
    assert dropped > 0


# ---------------------------------------------------------------------------------------------
# the delay proxy


@pytest.mark.parametrize("delay_ms", [5, 50])
def test_proxy_adds_the_configured_delay_each_way(remote: RemoteHost, delay_ms: int) -> None:
    """Test that a PINGREQ -> PINGRESP through the proxy takes at least 2 x its delay."""
    broker = remote.mosquitto()
    direct = mqtt_ping_rtts(remote.address, broker.port, count=5)
    proxy = remote.proxy(broker.port, delay_ms=delay_ms)
    proxied = mqtt_ping_rtts(*proxy.address, count=5)
    print(f"[{remote.mode}] direct: {_ms(direct)}; through {delay_ms} ms proxy: {_ms(proxied)}")
    assert min(proxied) >= 2 * delay_ms / 1000
    assert proxy.bytes_up > 0
    assert proxy.bytes_down > 0
    assert proxy.connections_total == 1


def test_jitter_never_reorders_bytes(remote: RemoteHost) -> None:
    """Test that a jittered path delivers a QoS 1 stream intact and in order, both ways."""
    broker = remote.mosquitto()
    to_broker = remote.proxy(broker.port, delay_ms=2, jitter_ms=10)
    from_broker = remote.proxy(broker.port, delay_ms=2, jitter_ms=10)
    rtts = mqtt_ping_rtts(*to_broker.address, count=10)
    assert min(rtts) >= 2 * 2 / 1000
    items = [(TOPIC, telemetry_payload(seq, 1_700_000_000 + seq)) for seq in range(300)]
    with (
        Subscriber(*from_broker.address, ["meters/#"]) as subscriber,
        Publisher(*to_broker.address, window=50) as publisher,
    ):
        publisher.publish_many(items, timeout=60)
        assert subscriber.wait_for(len(items), timeout=30) == items
    print(f"[{remote.mode}] jittered RTTs: {_ms(rtts)}")


def test_cut_connections_resets_every_proxied_connection(remote: RemoteHost) -> None:
    """Test that cut_connections() resets all proxied connections and new ones still work."""
    broker = remote.mosquitto()
    proxy = remote.proxy(broker.port, delay_ms=1)
    probes = [MqttProbe(*proxy.address) for _ in range(3)]
    try:
        for probe in probes:
            probe.ping()
        assert remote.cut_connections() == 3
        for probe in probes:
            with pytest.raises(ConnectionError):
                probe.ping(timeout=5.0)
        wait_until(lambda: proxy.active_connections == 0, 5, message="no proxied connections")
        assert mqtt_connect_ok(*proxy.address, timeout=5.0)
        assert proxy.cut_connections == 3
    finally:
        for probe in probes:
            probe.close()


def test_proxy_stops_cleanly_and_bounds_its_buffers(tmp_path: Path) -> None:
    """Test that the proxy binds, forwards to a refused target by closing, and stops (twice)."""
    proxy = DelayProxy(LOOPBACK, 0, LOOPBACK, 9, delay_ms=1)  # discard port: nobody listens
    assert proxy.max_queued_chunks * proxy.chunk_size <= 1 << 20
    with proxy:
        assert proxy.running
        assert proxy.port != 0
        assert not mqtt_connect_ok(*proxy.address, timeout=2.0)
        wait_until(lambda: proxy.upstream_failures == 1, 5, message="one upstream failure")
    assert not proxy.running
    assert not port_accepts(*proxy.address)
    proxy.stop()


# ---------------------------------------------------------------------------------------------
# the fallback and the teardown


def test_loopback_proxy_mode_keeps_the_api(tmp_path: Path) -> None:
    """Test the loopback fallback: proxy latency, frozen proxies, loss refused.

    Test the fallback: peers on loopback, latency from the proxy, partition freezes the
    proxies, loss is refused with FaultUnsupported.
    """
    with RemoteHost(tmp_path / "remote", mode="loopback-proxy") as host:
        print(f"network mode: {host.mode} ({host.fallback_reason})")
        assert host.mode == "loopback-proxy"
        assert host.netns is None
        assert host.address == LOOPBACK
        broker = host.mosquitto()
        assert broker.host == LOOPBACK
        proxy = host.proxy(broker.port, delay_ms=20)
        assert min(mqtt_ping_rtts(*proxy.address, count=3)) >= 0.040

        host.loss(0)
        with pytest.raises(FaultUnsupported):
            host.loss(1)

        with MqttProbe(*proxy.address) as probe:
            host.partition()
            assert not mqtt_connect_ok(*proxy.address, timeout=1.0)
            probe.send_ping()
            with pytest.raises(TimeoutError):
                probe.recv_pong(timeout=1.0)
            host.heal()
            assert probe.recv_pong(timeout=5.0) >= 1.0
        wait_mqtt_reachable(*proxy.address, timeout=10)
    assert not broker.running
    assert not proxy.running


def test_teardown_leaves_no_namespace_veth_or_process_behind(tmp_path: Path) -> None:
    """Test that stop() leaves no namespace, veth or peer behind, and is idempotent.

    stop() deletes namespace and veth and kills the peers, for two hosts at once
    on distinct /30s, and is idempotent.
    """
    hosts = [RemoteHost(tmp_path / f"remote-{i}").start() for i in range(2)]
    try:
        for host in hosts:
            _require_netns(host)
        nets = [host.netns.network for host in hosts if host.netns is not None]
        assert nets[0] is not None
        assert nets[1] is not None
        assert not nets[0].overlaps(nets[1])
        names = [host.netns.name for host in hosts if host.netns is not None]
        ifnames = [host.netns.host_ifname for host in hosts if host.netns is not None]
        assert set(names) <= set(_netns_names())
        assert set(ifnames) <= set(_link_names())
        peers: list[Mosquitto | StubProcess]
        peers = [hosts[0].mosquitto(), hosts[0].stub(), hosts[1].mosquitto()]
        proxy = hosts[0].proxy(peers[0].port, delay_ms=1)
        assert mqtt_connect_ok(*proxy.address, timeout=5.0)
        hosts[1].partition()
    finally:
        for host in hosts:
            host.stop()
    assert not set(names) & set(_netns_names())
    assert not set(ifnames) & set(_link_names())
    assert not any(peer.running for peer in peers)
    assert not proxy.running
    for host in hosts:
        host.stop()  # again: nothing to do, no error
    # A client still aiming at a deleted namespace fails at once; nothing leaves the machine.
    with pytest.raises(OSError, match="No route to host") as refused:
        socket.create_connection((hosts[0].address, peers[0].port), timeout=5)
    assert refused.value.errno == errno.EHOSTUNREACH


def test_namespace_of_a_killed_process_is_cleaned_up(tmp_path: Path) -> None:
    """Test that the namespace of an owner killed by SIGKILL is cleaned up by the next one.

    A namespace whose owner died by SIGKILL (no teardown ran) is deleted by
    cleanup_stale_namespaces(), which every new namespace runs first.
    """
    probe = NetNamespace()
    try:
        probe.create()
    except Exception as exc:
        pytest.skip(f"needs a network namespace ({exc})")
    probe.delete()
    code = (
        "import sys, time\n"
        "from bridge.testing.network import NetNamespace\n"
        "ns = NetNamespace().create()\n"
        "print(ns.name, flush=True)\n"
        "time.sleep(60)\n"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=tmp_path
    )
    try:
        assert child.stdout is not None
        readable, _, _ = select.select([child.stdout], [], [], 30)
        assert readable, "the child made no namespace within 30 s"
        name = child.stdout.readline().strip()
        assert name in _netns_names()
        assert name not in cleanup_stale_namespaces()  # its owner is alive: left alone
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(10)
        if child.stdout is not None:
            child.stdout.close()
    assert name in _netns_names()  # no teardown ran
    assert name in cleanup_stale_namespaces()
    assert name not in _netns_names()
