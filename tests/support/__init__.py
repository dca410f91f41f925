"""What the tests share.

The real-process helpers of :mod:`bridge.testing` (re-exported), the fixture signatures,
the captured vendor vectors and the deployment-file readers.
"""

from __future__ import annotations

from bridge.testing import (
    LOOPBACK,
    START_TS,
    BridgeProcess,
    Mosquitto,
    Publisher,
    StubProcess,
    Subscriber,
    deep_merge,
    free_port,
    iter_telemetry,
    meter_ids,
    parse_metrics,
    port_accepts,
    seq_counts,
    telemetry_payload,
    telemetry_points,
    wait_until,
    write_bridge_config,
)
from tests.support.fixtures import BridgeFactory, MosquittoFactory, StubFactory
from tests.support.vectors import PUSH_VECTORS, load_push_vector, push_vector_names

__all__ = [
    "LOOPBACK",
    "PUSH_VECTORS",
    "START_TS",
    "BridgeFactory",
    "BridgeProcess",
    "Mosquitto",
    "MosquittoFactory",
    "Publisher",
    "StubFactory",
    "StubProcess",
    "Subscriber",
    "deep_merge",
    "free_port",
    "iter_telemetry",
    "load_push_vector",
    "meter_ids",
    "parse_metrics",
    "port_accepts",
    "push_vector_names",
    "seq_counts",
    "telemetry_payload",
    "telemetry_points",
    "wait_until",
    "write_bridge_config",
]
