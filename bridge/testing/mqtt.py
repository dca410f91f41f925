"""MQTT clients for tests, the demo and the benchmark.

A publisher with a bounded window of unacknowledged QoS 1 messages, and a subscriber that
collects what it receives.

Like the service's own MQTT edge these wrap paho-mqtt; unlike it they run paho's network thread
(they are tools, not the hot path).
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Iterable, Sequence
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from bridge.tools.simulate import WindowedPublisher

__all__ = ["Publisher", "Subscriber"]


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
        self,
        items: Iterable[tuple[str, bytes]],
        qos: int = 1,
        timeout: float = 60.0,
        *,
        retain: bool = False,
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
            self._inner.publish(
                topic, payload, qos, timeout=max(0.0, deadline - time.monotonic()), retain=retain
            )
            count += 1
        if not self._inner.wait_all(max(0.0, deadline - time.monotonic())):
            raise TimeoutError(
                f"{self._inner.outstanding} of {count} messages unacknowledged after {timeout}s"
            )
        if self._inner.failed:
            raise AssertionError(f"the broker refused {self._inner.failed} message(s)")
        return count

    def publish(
        self,
        topic: str,
        payload: bytes,
        qos: int = 1,
        timeout: float = 10.0,
        *,
        retain: bool = False,
    ) -> None:
        """Publish one message and wait for its acknowledgement."""
        self.publish_many([(topic, payload)], qos=qos, timeout=timeout, retain=retain)

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
