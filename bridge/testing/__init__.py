"""Real-process helpers shared by the tests, the demo, the benchmark and the dashboard renderer.

Public on purpose (like a ``testing`` module of fakes), so users and our own tests share them:

* :mod:`~bridge.testing.processes`: :class:`Mosquitto` (a private broker on a free loopback
  port), :class:`StubProcess` (the cloud stand-in as a child process, with a client of its
  ``/_stub`` API), :class:`BridgeProcess` (``energy-bridge run``) and small utilities;
* :mod:`~bridge.testing.mqtt`: a windowed QoS 1 :class:`Publisher` and a :class:`Subscriber`;
* :mod:`~bridge.testing.payloads`: deterministic meter payloads that can be accounted for;
* :mod:`~bridge.testing.prometheus`: a private :class:`Prometheus` with the deployment's rules;
* :mod:`~bridge.testing.network`: a real network for fault tests: :class:`RemoteHost` (the peers
  in a network namespace behind a veth, or on loopback as a fallback), :class:`NetNamespace`
  (nftables loss and partition) and :class:`DelayProxy` (latency and jitter, connection cuts).
"""

from __future__ import annotations

from bridge.testing.mqtt import Publisher, Subscriber
from bridge.testing.network import (
    DelayProxy,
    FaultUnsupported,
    MqttProbe,
    NetNamespace,
    NetnsMosquitto,
    NetnsStub,
    NetworkUnavailable,
    RemoteHost,
    mqtt_connect_ok,
    mqtt_ping_rtts,
    wait_mqtt_reachable,
)
from bridge.testing.payloads import (
    START_TS,
    iter_telemetry,
    meter_ids,
    seq_counts,
    telemetry_payload,
    telemetry_points,
)
from bridge.testing.processes import (
    LOOPBACK,
    TEST_ENV,
    BridgeProcess,
    Mosquitto,
    StubProcess,
    deep_merge,
    free_port,
    parse_metrics,
    port_accepts,
    wait_until,
    write_bridge_config,
)
from bridge.testing.prometheus import Prometheus

__all__ = [
    "LOOPBACK",
    "START_TS",
    "TEST_ENV",
    "BridgeProcess",
    "DelayProxy",
    "FaultUnsupported",
    "Mosquitto",
    "MqttProbe",
    "NetNamespace",
    "NetnsMosquitto",
    "NetnsStub",
    "NetworkUnavailable",
    "Prometheus",
    "Publisher",
    "RemoteHost",
    "StubProcess",
    "Subscriber",
    "deep_merge",
    "free_port",
    "iter_telemetry",
    "meter_ids",
    "mqtt_connect_ok",
    "mqtt_ping_rtts",
    "parse_metrics",
    "port_accepts",
    "seq_counts",
    "telemetry_payload",
    "telemetry_points",
    "wait_mqtt_reachable",
    "wait_until",
    "write_bridge_config",
]
