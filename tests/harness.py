"""Real-process helpers for integration tests: mosquitto, the cloud stub, the bridge, a publisher.

Every helper is a small class with one lifecycle: construct (nothing runs), ``start()``, use,
``stop()``/``terminate()``/``kill()``, possibly ``start()`` again. Everything listens on
127.0.0.1 and a free port, never on the system broker's 1883. Processes are also killed when
the test process exits (``atexit``) or dies (``PR_SET_PDEATHSIG`` on Linux), so a crashed test
run leaves nothing behind.

Waiting is always on a condition with a deadline (:func:`wait_until`), never a bare sleep.
"""

from __future__ import annotations

import json
import os
import secrets
import threading
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any, Final, Protocol

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from bridge.simulate import WindowedPublisher
from bridge.testing import (
    LOOPBACK,
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

__all__ = [
    "LOOPBACK",
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
    "push_vectors_dir",
    "seq_counts",
    "telemetry_payload",
    "telemetry_points",
    "wait_until",
    "write_bridge_config",
]

# ---------------------------------------------------------------------------------------------
# MQTT clients for tests


class Publisher:
    """A paho-mqtt 2.x (MQTT v5) test publisher with a bounded window of unacknowledged QoS 1.

    Never more than ``window`` (≤ 1000 by default) messages are unacknowledged: paho numbers
    messages 1..65535, and a burst beyond that would reuse ids still in flight.
    Lifecycle: construct (connects), publish, :meth:`close`; also a context manager.
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        client_id: str | None = None,
        window: int = 1000,
        connect_timeout: float = 10.0,
    ) -> None:
        """Connect to the broker (clean start) and start the network thread."""
        self._inner = WindowedPublisher(
            host, port, client_id=client_id or f"test-pub-{secrets.token_hex(4)}", window=window
        )
        self._inner.connect(connect_timeout)

    @property
    def window(self) -> int:
        """Most unacknowledged messages at once."""
        return self._inner.window

    @property
    def max_outstanding(self) -> int:
        """The most messages that were ever unacknowledged at once."""
        return self._inner.max_outstanding

    @property
    def outstanding(self) -> int:
        """Messages sent and not acknowledged yet."""
        return self._inner.outstanding

    @property
    def acked(self) -> int:
        """Messages acknowledged so far."""
        return self._inner.acked

    @property
    def submitted(self) -> int:
        """Messages handed to paho so far."""
        return self._inner.submitted

    def publish_many(
        self, items: Iterable[tuple[str, bytes]], qos: int = 1, timeout: float = 60.0
    ) -> int:
        """Publish every ``(topic, payload)`` and wait for all acknowledgements.

        Returns:
            How many messages were published.

        Raises:
            TimeoutError: the window stayed full, or the last acks did not come, in time.
            AssertionError: the broker acknowledged a message with a failure reason code.
        """
        deadline = time.monotonic() + timeout
        count = 0
        for topic, payload in items:
            self._inner.publish(topic, payload, qos, timeout=max(0.0, deadline - time.monotonic()))
            count += 1
        if not self._inner.wait_all(max(0.0, deadline - time.monotonic())):
            raise TimeoutError(
                f"{self._inner.outstanding} of {count} messages unacknowledged after {timeout}s"
            )
        if self._inner.failed:
            raise AssertionError(f"the broker refused {self._inner.failed} message(s)")
        return count

    def publish(self, topic: str, payload: bytes, qos: int = 1, timeout: float = 10.0) -> None:
        """Publish one message and wait for its acknowledgement."""
        self.publish_many([(topic, payload)], qos=qos, timeout=timeout)

    def close(self) -> None:
        """Disconnect. Safe to call twice."""
        self._inner.close()

    def __enter__(self) -> Publisher:
        """Return self (already connected)."""
        return self

    def __exit__(self, *exc_info: object) -> None:
        """Close."""
        self.close()


class Subscriber:
    """A paho-mqtt 2.x (MQTT v5) test subscriber that collects messages.

    With ``session_expiry > 0`` and ``clean_start=False`` the broker keeps its session (and
    queues QoS 1 messages) while it is disconnected, so a test can check what a broker keeps.
    Note: mosquitto 2.0 writes a session to its persistence file only when the client's last
    CONNECT had clean start *off*; a session begun with clean start on survives a disconnect
    but not a broker restart. Connect with ``clean_start=False`` from the first time.
    Lifecycle: construct, :meth:`connect` (subscribes), :meth:`wait_for`, :meth:`disconnect`
    and :meth:`connect` again as often as needed, :meth:`close`.
    """

    def __init__(
        self,
        host: str,
        port: int,
        topics: Sequence[str],
        *,
        qos: int = 1,
        client_id: str | None = None,
        session_expiry: int = 0,
    ) -> None:
        """Describe the subscriber; nothing connects until :meth:`connect`."""
        self.host = host
        self.port = port
        self.topics = list(topics)
        self.qos = qos
        self.client_id = client_id or f"test-sub-{secrets.token_hex(4)}"
        self.session_expiry = session_expiry
        self.messages: list[tuple[str, bytes]] = []
        self.session_present: bool | None = None
        self._cond = threading.Condition()
        self._connected = False
        self._subscribed = False
        self._client: mqtt.Client | None = None

    def connect(self, *, clean_start: bool = True, timeout: float = 10.0) -> Subscriber:
        """Connect, subscribe to :attr:`topics` and wait for the SUBACK."""
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            protocol=MQTTProtocolVersion.MQTTv5,
        )
        client.on_connect = self._on_connect
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        client.on_disconnect = self._on_disconnect
        properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        properties.SessionExpiryInterval = self.session_expiry
        with self._cond:
            self._connected = self._subscribed = False
        self._client = client
        client.connect(
            self.host, self.port, clean_start=clean_start, properties=properties, keepalive=30
        )
        client.loop_start()
        with self._cond:
            ok = self._cond.wait_for(lambda: self._subscribed, timeout)
        if not ok:
            self.close()
            raise TimeoutError(f"no CONNACK/SUBACK from {self.host}:{self.port} in {timeout}s")
        return self

    def _on_connect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: mqtt.ConnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        with self._cond:
            self._connected = not reason_code.is_failure
            self.session_present = flags.session_present
        client.subscribe([(topic, self.qos) for topic in self.topics])

    def _on_subscribe(
        self,
        client: mqtt.Client,
        userdata: Any,
        mid: int,
        reason_codes: list[ReasonCode],
        properties: Properties | None,
    ) -> None:
        with self._cond:
            self._subscribed = True
            self._cond.notify_all()

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        with self._cond:
            self.messages.append((message.topic, bytes(message.payload)))
            self._cond.notify_all()

    def _on_disconnect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: mqtt.DisconnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        with self._cond:
            self._connected = False
            self._cond.notify_all()

    def wait_for(self, count: int, timeout: float = 10.0) -> list[tuple[str, bytes]]:
        """Wait until at least ``count`` messages arrived; return all so far.

        Raises:
            AssertionError: fewer arrived within ``timeout`` seconds.
        """
        with self._cond:
            if not self._cond.wait_for(lambda: len(self.messages) >= count, timeout):
                raise AssertionError(
                    f"got {len(self.messages)} of {count} messages within {timeout}s"
                )
            return list(self.messages)

    def disconnect(self) -> None:
        """Disconnect normally (the broker keeps the session if it has an expiry)."""
        if self._client is not None:
            self._client.disconnect()
            self._client.loop_stop()
            self._client = None

    def close(self) -> None:
        """Disconnect if connected. Safe to call twice."""
        self.disconnect()

    def __enter__(self) -> Subscriber:
        """Connect."""
        return self.connect()

    def __exit__(self, *exc_info: object) -> None:
        """Close."""
        self.close()


# ---------------------------------------------------------------------------------------------
# payloads


_TELEMETRY_POINTS: Final = ("Ua", "Ub", "Uc", "Ia", "Ib", "Ic", "P", "Q", "COSQ", "F", "Ep_imp")


START_TS: Final = 1_700_000_000
"""2023-11-14 22:13:20 UTC = recordTime ``2023-11-15 06:13:20`` in Asia/Shanghai."""


def push_vectors_dir() -> Path | None:
    """``shared/vectors/push`` beside the clone, or under ``$ENERGY_BRIDGE_SHARED``."""
    beside_clone = Path(__file__).resolve().parents[2] / "shared" / "vectors" / "push"
    if beside_clone.is_dir():
        return beside_clone
    shared = os.environ.get("ENERGY_BRIDGE_SHARED")
    if shared and (Path(shared) / "vectors" / "push").is_dir():
        return Path(shared) / "vectors" / "push"
    return None


def load_push_vector(name: str) -> dict[str, Any]:
    """A captured vendor-SDK request (``<name>.json``) with ``body`` as bytes and, when present,
    ``canonical_txt``; skips the test when the shared folder is not there."""
    folder = push_vectors_dir()
    if folder is None:
        pytest.skip(
            "push vectors not found: expected ../shared/vectors/push beside the clone "
            "or ENERGY_BRIDGE_SHARED pointing to the shared folder"
        )
    vector: dict[str, Any] = json.loads((folder / f"{name}.json").read_text(encoding="utf-8"))
    vector["body"] = vector["body_text"].encode()
    canonical_file = folder / f"{name}.canonical.txt"
    if canonical_file.exists():
        vector["canonical_txt"] = canonical_file.read_text(encoding="utf-8")
    return vector


def meter_ids(n: int) -> list[str]:
    """``meter-0000`` .. ``meter-{n-1}``."""
    return [f"meter-{i:04d}" for i in range(n)]


def seq_counts(entries: Iterable[dict[str, Any]]) -> Counter[int]:
    """How often each ``seq`` point appears in the cloud's entries (for loss/duplicate counts)."""
    return Counter(int(e["data"]["seq"]) for e in entries if "seq" in e["data"])


def telemetry_points(seq: int) -> dict[str, str]:
    """The data points :func:`telemetry_payload` writes for ``seq``, as exact number text.

    Deterministic, so a test can predict what the cloud must receive: ``{"Ua": "226.10", ...,
    "seq": "7"}``.
    """
    phase = seq % 100
    ua, ub, uc = 226.0 + phase / 10, 227.0 + phase / 20, 228.5 - phase / 25
    ia, ib, ic = 10.0 + phase / 8, 11.25 + phase / 16, 9.5 + phase / 10
    cos_phi = 0.85 + (seq % 15) / 100
    s_kva = (ua * ia + ub * ib + uc * ic) / 1000
    values = (
        f"{ua:.2f}",
        f"{ub:.2f}",
        f"{uc:.2f}",
        f"{ia:.3f}",
        f"{ib:.3f}",
        f"{ic:.3f}",
        f"{s_kva * cos_phi:.3f}",
        f"{s_kva * (1 - cos_phi**2) ** 0.5:.3f}",
        f"{cos_phi:.2f}",
        f"{49.95 + (seq % 11) / 100:.2f}",
        f"{1000 + seq * 0.25:.2f}",
    )
    points = dict(zip(_TELEMETRY_POINTS, values, strict=True))
    points["seq"] = str(seq)
    return points


def telemetry_payload(
    seq: int, ts: int, **extra: Decimal | str | int | float | bool | None
) -> bytes:
    """A realistic one-reading JSON payload: ``ts``, 11 meter points and ``seq``.

    Values are JSON numbers written with fixed decimals (``"Ua": 226.10``); ``seq`` lets a
    test account for every reading. ``extra`` adds or replaces keys: a :class:`~decimal.Decimal`
    is written as that exact number text, anything else through ``json.dumps`` (so a ``str``
    becomes a JSON string).
    """
    parts = [f'"ts":{ts}']
    parts += [
        f'"{key}":{value}' for key, value in telemetry_points(seq).items() if key not in extra
    ]
    for key, value in extra.items():
        text = str(value) if isinstance(value, Decimal) else json.dumps(value)
        parts.append(f"{json.dumps(key)}:{text}")
    return ("{" + ",".join(parts) + "}").encode()


def iter_telemetry(
    device_ids: Sequence[str], count: int, start_ts: int, *, device_type: str = "1"
) -> Iterator[tuple[str, bytes]]:
    """Yield ``(topic, payload)`` for ``count`` readings per device, one second apart.

    ``seq`` runs 0..``count*len(device_ids)``-1 over the whole stream, readings interleaved
    across devices.
    """
    seq = 0
    for k in range(count):
        for device_id in device_ids:
            topic = f"meters/{device_type}/{device_id}/telemetry"
            yield topic, telemetry_payload(seq, start_ts + k)
            seq += 1


# ---------------------------------------------------------------------------------------------
# fixture signatures (the fixtures live in conftest.py), for annotating test arguments


class MosquittoFactory(Protocol):
    """The ``mosquitto_factory`` fixture: private brokers with custom options."""

    def __call__(
        self,
        *,
        persistence: bool = True,
        max_inflight: int | None = None,
        max_queued_messages: int = 0,
        extra_conf: str = "",
        start: bool = True,
    ) -> Mosquitto:
        """Create (and by default start) a broker that is killed at teardown."""
        ...


class StubFactory(Protocol):
    """The ``stub_factory`` fixture: cloud stubs with extra CLI arguments."""

    def __call__(
        self, *args: str, env: dict[str, str] | None = None, start: bool = True
    ) -> StubProcess:
        """Create (and by default start) a cloud stub that is killed at teardown."""
        ...


class BridgeFactory(Protocol):
    """The ``bridge_factory`` fixture: bridge processes wired to the test broker and stub."""

    def __call__(
        self,
        *,
        mqtt_port: int | None = None,
        cloud_url: str | None = None,
        config: Path | None = None,
        env: dict[str, str] | None = None,
        start: bool = True,
        ready_timeout: float | None = 30.0,
        **overrides: Any,
    ) -> BridgeProcess:
        """Create (and by default start and await) a bridge that is killed at teardown."""
        ...
