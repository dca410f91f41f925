"""The MQTT source: the service's one paho session (the tools and the test helpers use paho too).

paho's socket work runs on the asyncio event loop (``add_reader``/``add_writer`` on paho's
socket), so messages reach the bridge without a thread hand-off per message. Only the blocking
TCP/TLS connect runs in a worker thread; the socket callbacks paho makes from there are moved
to the loop with ``call_soon_threadsafe``.

Delivery contract: subscriptions are QoS 1 on a persistent session (fixed client id, clean
start off, session expiry); every message waits in the source's inbox with an ack token until
the consumer takes it (:meth:`MqttSource.receive`), and is acknowledged only when the consumer
calls :meth:`MqttSource.ack` after the spool commit. Tokens from an earlier connection are not
acked (their message ids belong to a dead connection; the broker redelivers those messages).
The source knows nothing of its consumer: messages flow out through ``receive``, acks and
backpressure (``pause``/``resume``) come back in.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from bridge.config import MqttProtocol, MqttSettings, TlsSettings
from bridge.health import Health
from bridge.intake.packets import PUBLISH, MalformedPacket, fixed_header, parse_publish, pubacks
from bridge.logs import Throttled
from bridge.models import Inbound
from bridge.push.retry import backoff
from bridge.stage import Finished
from bridge.telemetry import Metrics

__all__ = ["AckToken", "MqttSource", "Received", "broker_password", "tls_context"]

log = logging.getLogger("bridge.mqtt")

AckToken = tuple[int, int]  # (connection generation, message id)
Received = tuple[Inbound, AckToken | None]
"""A message and its ack token (``None`` for QoS 0, which needs no ack)."""

_READ_CHUNK = 256 * 1024
_CHUNKS_PER_WAKEUP = 8
_QOS_2_OR_OTHER = 0xF4
"""Masks a fixed header's first byte to PUBLISH (0x30) only for QoS 0 or 1 PUBLISH packets."""
_PUBLISH = 0x30
_HEADER_ALLOWANCE = 70_000
"""Bytes a PUBLISH may carry besides its payload: a topic of up to 64 KiB and properties."""
_MIN_PACKET_LIMIT = 1024 * 1024
_SESSION_TAKEN_OVER = 142
"""MQTT v5 DISCONNECT reason code: another connection took over this client id's session."""
_SHORT_CONNECTION_SECS = 10.0
"""A connection the broker closes sooner than this after CONNACK counts as a flap."""
_FLAP_WINDOW_SECS = 60.0
_FLAPS_NOT_READY = 3


def tls_context(tls: TlsSettings) -> ssl.SSLContext:
    """The TLS context for the broker connection (``mqtt.tls``)."""
    ctx = ssl.create_default_context(cafile=str(tls.ca_file) if tls.ca_file else None)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if tls.cert_file is not None:
        ctx.load_cert_chain(str(tls.cert_file), str(tls.key_file) if tls.key_file else None)
    if tls.insecure:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def broker_password(settings: MqttSettings) -> str | None:
    """The broker password (``password_file`` read now, else ``password``).

    Raises:
        OSError: ``password_file`` cannot be read.
    """
    if settings.password_file is not None:
        return settings.password_file.read_text(encoding="utf-8").strip()
    if settings.password is not None:
        return settings.password.get_secret_value()
    return None


class _BufferedClient(paho.Client):
    """paho with one receive buffer shared with the MQTT edge's own packet reader.

    The edge reads the socket in large chunks into ``rbuf`` and decodes PUBLISH packets itself
    (:meth:`MqttSource._take_packets`); paho reads every other packet from the same buffer
    through ``_sock_recv``, so its three or more reads per packet cost no system calls.

    It also keeps memory bounded whatever the broker sends: of a PUBLISH larger than
    ``max_packet`` bytes, paho is given only the first ``max_packet`` bytes (the topic, the
    properties and the start of the payload) and its last byte; the rest is read from the
    socket and dropped as it arrives. ``oversized`` then holds the packet's real size until
    the message is handed on, so it is rejected (and dead-lettered with its first KiB) instead
    of taking the process's memory (a 100 MB publish used to add 300 MB).
    """

    def __init__(self, *args: Any, max_packet: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.rbuf = bytearray()
        self.max_packet = max_packet
        self.oversized = 0

    def _sock_recv(self, bufsize: int) -> bytes:
        packet = self._in_packet
        if (
            packet["have_remaining"]
            and packet["remaining_length"] > self.max_packet
            and packet["command"] & 0xF0 == _PUBLISH
        ):
            bufsize = self._guard_oversized(packet, bufsize)
        buf = self.rbuf
        if not buf:
            buf += self._recv_chunk()
            if not buf:
                return b""  # end of stream: paho handles the lost connection
        chunk = bytes(buf[:bufsize])
        del buf[:bufsize]
        return chunk

    @property
    def in_packet(self) -> bool:
        """Whether paho is in the middle of reading a packet."""
        return bool(self._in_packet["command"])

    def recv_raw(self) -> bytes:
        """One read from the socket (raises BlockingIOError when there is nothing)."""
        return self._recv_chunk()

    def note_received(self) -> None:
        """Bytes arrived: the keepalive's clock (paho sets it only for what it reads)."""
        self._last_bytes_received = time.monotonic()

    def queue_raw(self, command: int, packet: bytes) -> None:
        """Queue bytes for paho to write, in order with its own packets."""
        self._packet_queue(command, packet, 0, 1)

    def _recv_chunk(self) -> bytes:
        return super()._sock_recv(_READ_CHUNK)

    def _guard_oversized(self, packet: Any, bufsize: int) -> int:
        """Drop the body of an oversized PUBLISH past ``max_packet``.

        Returns what paho may read now; raises BlockingIOError while dropped bytes are still
        to come.
        """
        self.oversized = packet["remaining_length"]
        kept = len(packet["packet"])
        if kept < self.max_packet:
            return min(bufsize, self.max_packet - kept)
        # Keep the packet's very last byte for paho, so it completes the packet as usual.
        while packet["to_process"] > 1:
            if not self.rbuf:
                data = self._recv_chunk()
                if not data:
                    return bufsize  # end of stream: paho's next read sees it
                self.rbuf += data
            dropped = min(len(self.rbuf), packet["to_process"] - 1)
            del self.rbuf[:dropped]
            packet["to_process"] -= dropped
        return 1


class MqttSource:
    """Keeps a persistent QoS 1 session on the broker; its messages wait for :meth:`receive`.

    Args:
        settings: the ``mqtt`` section.
        subscriptions: topic filters to subscribe to on every connect.
        metrics, health: observability.
    """

    def __init__(
        self,
        settings: MqttSettings,
        subscriptions: Sequence[str],
        metrics: Metrics,
        health: Health,
    ) -> None:
        self._settings = settings
        # With mqtt.share_group every filter is "$share/<group>/<filter>"; the messages still
        # carry their own topics, so nothing past the subscription changes.
        self._subscriptions = [settings.shared(t) for t in subscriptions]
        self._unsubscribed: asyncio.Future[None] | None = None
        self._leaving = False
        self._last_message_at = 0.0
        self._inbox: list[Received] = []
        self._inbox_limit = max(1_000, settings.receive_maximum)
        self._mail = asyncio.Event()
        self._finished = Finished()
        self._metrics = metrics
        self._health = health
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0
        self._client = self._make_client()
        self._generation = 0
        # Acks belong to the connection: they may be sent from CONNACK on (a resumed session's
        # backlog arrives before the SUBACK), not only once subscribed.
        self._session_up = False
        self._session_present = False
        self._flaps: list[float] = []
        self._connected_at = 0.0
        self._connected = asyncio.Event()
        self._disconnected = asyncio.Event()
        self._connack: asyncio.Future[ReasonCode] | None = None
        self._sock: Any = None
        self._paused = False
        self._stopping = False
        self._connects = 0
        self._reconnect_log = Throttled(log)
        health.set("mqtt", "not connected yet")

    # -- public -----------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        """Whether the session is up and subscribed."""
        return self._connected.is_set()

    def ack(self, tokens: Sequence[AckToken]) -> int:
        """Acknowledge committed messages, in the order received; returns how many were sent.

        Messages whose connection is gone cannot be acknowledged: the broker will send them
        again, and they will be stored twice. They are counted as redelivered readings.
        """
        sent = 0
        if self._session_up:
            generation = self._generation
            mids = [mid for gen, mid in tokens if gen == generation]
            if mids:
                # One write for the whole group, in the order received.
                self._client.queue_raw(paho.PUBACK, pubacks(mids))
            sent = len(mids)
        if sent < len(tokens):
            self._metrics.readings_redelivered.inc(len(tokens) - sent)
        return sent

    def publish(self, topic: str, payload: bytes) -> bool:
        """Publish at QoS 0 on the session (a Sparkplug rebirth request).

        Returns whether it was sent, which it is not while the session is down.
        """
        if not self._session_up:
            return False
        try:
            info = self._client.publish(topic, payload, qos=0)
        except ValueError:
            return False  # a topic paho refuses (wildcards, too long)
        return info.rc == paho.MQTT_ERR_SUCCESS

    async def receive(self) -> list[Received]:
        """Every message received since the last call, oldest first; waits for at least one."""
        while not self._inbox:
            self._mail.clear()
            await self._mail.wait()
        return self.receive_nowait()

    def receive_nowait(self) -> list[Received]:
        """Every message received since the last call (maybe none)."""
        taken, self._inbox = self._inbox, []
        return taken

    def pause(self) -> None:
        """Stop reading the socket (backpressure); the broker's flow control holds the rest."""
        if not self._paused:
            self._paused = True
            if self._sock is not None and self._loop is not None:
                self._loop.remove_reader(self._sock)

    def resume(self) -> None:
        """Read the socket again."""
        if self._paused:
            self._paused = False
            if self._sock is not None and self._loop is not None:
                self._loop.add_reader(self._sock, self._on_readable)
                self._loop.call_soon(self._on_readable)

    async def run(self) -> None:
        """Connect, subscribe, and reconnect with capped full-jitter backoff until stopped."""
        try:
            await self._keep_connected()
        finally:
            self._finished.set()

    async def _keep_connected(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        misc = asyncio.create_task(self._misc_loop(), name="mqtt-misc")
        attempt = 0
        try:
            while not self._stopping:
                problem = await self._connect_once()
                if problem is None:
                    await self._disconnected.wait()
                    if self._stopping:
                        break
                    problem = "connection lost"
                    if time.monotonic() - self._connected_at < _SHORT_CONNECTION_SECS:
                        # Closed right after it was made: typically another client with our
                        # client id taking the session. Reconnecting at once would take it
                        # back and start a loop with that client: back off instead.
                        self._note_flap()
                        problem = "connection closed right after it was made"
                    else:
                        attempt = 0
                self._health.set(
                    "mqtt", self._flapping_problem() or f"broker {self._where}: {problem}"
                )
                attempt += 1
                delay = backoff(
                    attempt,
                    initial=self._settings.reconnect_min_secs,
                    cap=self._settings.reconnect_max_secs,
                )
                self._reconnect_log.log(
                    problem,
                    logging.WARNING,
                    "mqtt disconnected, reconnecting",
                    {"broker": self._where, "reason": problem, "delay_secs": round(delay, 2)},
                )
                await asyncio.sleep(delay)
        finally:
            misc.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await misc

    async def leave_share_group(self, deadline: float, *, quiet_secs: float = 0.5) -> bool:
        """Unsubscribe every route, then keep reading until the broker has sent what it holds.

        Used on a graceful stop with ``mqtt.share_group``: the broker stops assigning this
        replica a share, and the messages it had already assigned to us (in flight and queued
        in our session) arrive meanwhile and are committed and acknowledged as usual, so few
        are left in the session when it disconnects. Reading ends after ``quiet_secs`` without
        a message, or at ``deadline``. Nothing is subscribed again until the next connect.

        Returns:
            Whether the broker confirmed the unsubscribe (UNSUBACK) before ``deadline``.
        """
        assert self._loop is not None  # noqa: S101 - set in run()
        if not self._session_up or not self._subscriptions:
            return False
        self._leaving = True
        self._unsubscribed = self._loop.create_future()
        result, _mid = self._client.unsubscribe(list(self._subscriptions))
        if result != paho.MQTT_ERR_SUCCESS:
            return False
        confirmed = False
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(
                asyncio.shield(self._unsubscribed), max(0.0, deadline - time.monotonic())
            )
            confirmed = True
        if confirmed:
            log.info(
                "unsubscribed from the share group", extra={"group": self._settings.share_group}
            )
            self._metrics.mqtt_subscriptions.set(0)
            self._last_message_at = max(self._last_message_at, time.monotonic())
            while time.monotonic() < deadline and self._session_up:
                idle = time.monotonic() - self._last_message_at
                if idle >= quiet_secs and not self._paused and not self._inbox:
                    break
                await asyncio.sleep(min(0.1, max(0.0, deadline - time.monotonic())))
        return confirmed

    async def stop(self, deadline: float) -> None:
        """Disconnect cleanly (unacknowledged messages stay with the broker) and end :meth:`run`.

        The disconnect gets at least two seconds, whatever ``deadline`` says: it is what tells
        the broker the session is ours again next time.
        """
        self._stopping = True
        if self._session_up:
            self._client.disconnect()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._disconnected.wait(), 2.0)
        self._close_socket()
        self._disconnected.set()
        await self._finished.wait(max(deadline, time.monotonic() + 2.0))

    # -- connection -------------------------------------------------------------------------

    @property
    def _where(self) -> str:
        return f"{self._settings.host}:{self._settings.port}"

    async def _connect_once(self) -> str | None:
        """One connection attempt; returns ``None`` when connected and subscribed."""
        assert self._loop is not None  # noqa: S101 - set in run()
        s = self._settings
        self._disconnected.clear()
        self._connack = self._loop.create_future()
        try:
            password = broker_password(s)
        except OSError as exc:
            return f"cannot read mqtt.password_file: {exc.strerror}"
        if s.username is not None:
            self._client.username_pw_set(s.username, password)
        kwargs: dict[str, Any] = {}
        if s.protocol is MqttProtocol.V5:
            props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            props.SessionExpiryInterval = s.session_expiry_secs
            props.ReceiveMaximum = s.receive_maximum
            # The broker must not send us more than this (it drops such messages itself). Up
            # to it, oversized messages still arrive and are dead-lettered with their first
            # KiB, reading no more than max_payload_bytes of them (_BufferedClient); v3.1.1
            # has no such property: there the client's guard alone bounds memory, and
            # mosquitto's message_size_limit can bound it broker-side.
            props.MaximumPacketSize = max(_MIN_PACKET_LIMIT, 4 * s.max_payload_bytes) + (
                _HEADER_ALLOWANCE
            )
            kwargs = {"clean_start": False, "properties": props}
        try:
            await self._loop.run_in_executor(
                None, lambda: self._client.connect(s.host, s.port, s.keepalive_secs, **kwargs)
            )
        except (OSError, ssl.SSLError, ValueError) as exc:
            self._close_socket()
            return f"{type(exc).__name__}: {exc}"
        try:
            reason = await asyncio.wait_for(asyncio.shield(self._connack), 15.0)
        except TimeoutError:
            self._client.disconnect()
            self._close_socket()
            return "no CONNACK within 15 s"
        if reason.is_failure:
            self._close_socket()
            return f"broker refused the connection: {reason}"
        return None

    def _make_client(self) -> _BufferedClient:
        s = self._settings
        v5 = s.protocol is MqttProtocol.V5
        client = _BufferedClient(
            CallbackAPIVersion.VERSION2,
            client_id=s.client_id,
            clean_session=None if v5 else False,
            protocol=MQTTProtocolVersion.MQTTv5 if v5 else MQTTProtocolVersion.MQTTv311,
            reconnect_on_failure=False,
            manual_ack=True,
            max_packet=s.max_payload_bytes + _HEADER_ALLOWANCE,
        )
        client.connect_timeout = 10.0
        client.max_inflight_messages_set(100)
        if s.tls.enabled:
            client.tls_set_context(tls_context(s.tls))
            client.tls_insecure_set(s.tls.insecure)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_subscribe = self._on_subscribe
        client.on_unsubscribe = self._on_unsubscribe
        client.on_message = self._on_paho_message
        client.on_socket_open = self._on_socket_open
        client.on_socket_close = self._on_socket_close
        client.on_socket_register_write = self._on_register_write
        client.on_socket_unregister_write = self._on_unregister_write
        return client

    def _close_socket(self) -> None:
        if self._sock is not None and self._loop is not None:
            self._loop.remove_reader(self._sock)
            self._loop.remove_writer(self._sock)
        self._sock = None

    # -- paho callbacks (all on the loop, except socket_open/register_write during connect) ---

    def _in_loop(self, fn: Callable[[], None]) -> None:
        assert self._loop is not None  # noqa: S101
        if threading.get_ident() == self._loop_thread:
            fn()
        else:
            # paho calls these from the connect thread; loop methods are not thread-safe.
            self._loop.call_soon_threadsafe(fn)

    def _on_socket_open(self, _c: paho.Client, _u: object, sock: Any) -> None:
        def attach() -> None:
            assert self._loop is not None  # noqa: S101
            self._client.rbuf.clear()  # nothing of an old connection may be parsed as new
            self._sock = sock
            if not self._paused:
                self._loop.add_reader(sock, self._on_readable)

        self._in_loop(attach)

    def _on_socket_close(self, _c: paho.Client, _u: object, sock: Any) -> None:
        def detach() -> None:
            assert self._loop is not None  # noqa: S101
            self._loop.remove_reader(sock)
            self._loop.remove_writer(sock)
            if self._sock is sock:
                self._sock = None

        self._in_loop(detach)

    def _on_register_write(self, _c: paho.Client, _u: object, sock: Any) -> None:
        def register() -> None:
            assert self._loop is not None  # noqa: S101
            self._loop.add_writer(sock, self._on_writable)

        self._in_loop(register)

    def _on_unregister_write(self, _c: paho.Client, _u: object, sock: Any) -> None:
        def unregister() -> None:
            assert self._loop is not None  # noqa: S101
            self._loop.remove_writer(sock)

        self._in_loop(unregister)

    def _on_readable(self) -> None:
        """Read what the socket has and cut it into packets (see :mod:`bridge.intake.packets`).

        QoS 0/1 PUBLISH packets are decoded here, in one pass over the buffer; everything else
        (and a PUBLISH too large to read whole) is handed to paho, which reads it from the
        same buffer and keeps the session's state.
        """
        client = self._client
        for _ in range(_CHUNKS_PER_WAKEUP):
            if self._paused or self._sock is None:
                return
            if len(self._inbox) >= self._inbox_limit:
                # The consumer is behind: leave the rest in the socket (the broker's flow
                # control holds it) until the inbox is taken; the selector wakes us again.
                return
            try:
                data = client.recv_raw()
            except BlockingIOError:
                return
            except OSError:
                client.loop_read()  # paho reads the error again and closes the connection
                return
            if not data:
                client.loop_read()  # end of stream: paho handles the lost connection
                return
            client.rbuf += data
            client.note_received()
            self._take_packets()
        # A TLS socket may hold decrypted bytes the selector does not report: come back after
        # other tasks had their turn.
        assert self._loop is not None  # noqa: S101
        self._loop.call_soon(self._on_readable)

    def _take_packets(self) -> None:
        client = self._client
        buf = client.rbuf
        inbox = self._inbox
        v5 = self._settings.protocol is MqttProtocol.V5
        limit = client.max_packet
        generation = self._generation
        resumed = self._session_present
        received_at = time.time()
        pos = 0
        before = len(inbox)
        while True:
            if client.in_packet:
                # paho is in the middle of a packet (an oversized PUBLISH): it reads on.
                del buf[:pos]
                pos = 0
                if client.loop_read() != paho.MQTT_ERR_SUCCESS or client.in_packet:
                    break
                continue
            try:
                header = fixed_header(buf, pos)
            except MalformedPacket:
                header = None
                client.loop_read()  # paho finds the same fault and closes the connection
                break
            if header is None:
                break
            first, length, header_length = header
            end = pos + header_length + length
            if first & _QOS_2_OR_OTHER == PUBLISH and length <= limit:
                if end > len(buf):
                    break
                try:
                    msg = parse_publish(buf, pos, end, v5=v5)
                except MalformedPacket:
                    del buf[:pos]
                    pos = 0
                    client.loop_read()  # paho finds the same fault and closes the connection
                    break
                pos = end
                inbound = Inbound(
                    msg.topic,
                    msg.payload,
                    received_at,
                    msg.mid,
                    msg.qos,
                    msg.dup,
                    # A retained copy on a resumed session was seen when it was published.
                    retained_replay=msg.retain and resumed,
                )
                inbox.append((inbound, (generation, msg.mid) if msg.qos else None))
                continue
            if length <= limit and end > len(buf):
                break  # paho gets whole packets only (an oversized PUBLISH excepted)
            del buf[:pos]
            pos = 0
            if client.loop_read() != paho.MQTT_ERR_SUCCESS:
                break
            # That packet may have been the CONNACK of a new connection: the messages after it
            # belong to that connection (their acks are sent, not dropped as stale).
            generation = self._generation
            resumed = self._session_present
        del buf[:pos]
        if len(inbox) > before:
            self._last_message_at = time.monotonic()
            self._mail.set()

    def _on_writable(self) -> None:
        self._client.loop_write()

    async def _misc_loop(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            self._client.loop_misc()
            if self._connected.is_set():
                # Ends the takeover condition once a minute has passed without one.
                self._health.set("mqtt", self._flapping_problem())

    def _on_connect(
        self,
        client: paho.Client,
        _u: object,
        _flags: paho.ConnectFlags,
        reason: ReasonCode,
        _props: Properties | None,
    ) -> None:
        if self._connack is not None and not self._connack.done():
            self._connack.set_result(reason)
        if reason.is_failure:
            return
        self._generation += 1
        self._connected_at = time.monotonic()
        self._session_up = True
        self._session_present = bool(_flags.session_present)
        self._connects += 1
        if self._connects > 1:
            self._metrics.mqtt_reconnects.inc()
        # Subscribe on every connect: a broker may have lost the session whatever
        # session-present says. Retained copies only for a subscription the broker did not
        # have (retain handling 1): on a resumed session they were seen before.
        # After leaving the share group (stopping), a reconnect takes no new share.
        if self._leaving:
            pass
        elif self._settings.protocol is MqttProtocol.V5:
            options = SubscribeOptions(qos=1, retainHandling=1)
            client.subscribe([(t, options) for t in self._subscriptions])
        else:
            client.subscribe([(t, 1) for t in self._subscriptions])
        log.info(
            "mqtt connected",
            extra={
                "broker": self._where,
                "session_present": bool(_flags.session_present),
                "client_id": self._settings.client_id,
            },
        )

    def _on_subscribe(
        self,
        _c: paho.Client,
        _u: object,
        _mid: int,
        reasons: list[ReasonCode],
        _props: Properties | None,
    ) -> None:
        refused = [t for t, r in zip(self._subscriptions, reasons, strict=False) if r.is_failure]
        if refused:
            self._health.set("mqtt", f"broker refused subscription(s) {refused}")
            self._metrics.mqtt_subscriptions.set(len(self._subscriptions) - len(refused))
            log.error("subscription refused", extra={"topics": refused})
            return
        self._metrics.mqtt_subscriptions.set(len(self._subscriptions))
        self._metrics.mqtt_connected.set(1)
        self._connected.set()
        self._health.set("mqtt", self._flapping_problem())

    def _on_unsubscribe(
        self,
        _c: paho.Client,
        _u: object,
        _mid: int,
        _reasons: list[ReasonCode],
        _props: Properties | None,
    ) -> None:
        if self._unsubscribed is not None and not self._unsubscribed.done():
            self._unsubscribed.set_result(None)

    def _on_disconnect(
        self,
        _c: paho.Client,
        _u: object,
        _flags: paho.DisconnectFlags,
        reason: ReasonCode,
        _props: Properties | None,
    ) -> None:
        self._session_up = False
        self._connected.clear()
        self._metrics.mqtt_connected.set(0)
        self._metrics.mqtt_subscriptions.set(0)
        if reason.value == _SESSION_TAKEN_OVER:
            # Said plainly by v5 brokers that send it (EMQX, HiveMQ); mosquitto 2.0 just
            # closes the old connection, which the short-connection rule catches.
            self._metrics.mqtt_session_takeovers.inc()
        if not self._stopping:
            log.info("mqtt connection closed", extra={"reason": str(reason)})
        self._disconnected.set()

    def _note_flap(self) -> None:
        """The broker closed a connection right after it was made."""
        now = time.monotonic()
        self._flaps = [t for t in self._flaps if now - t < _FLAP_WINDOW_SECS]
        self._flaps.append(now)
        self._metrics.mqtt_short_connections.inc()
        self._reconnect_log.log(
            "flap",
            logging.ERROR,
            "the broker closed the connection right after it was made; is another client"
            " using the same mqtt.client_id?",
            {"client_id": self._settings.client_id, "in_last_minute": len(self._flaps)},
        )

    def _flapping_problem(self) -> str | None:
        """Not ready while connections keep being closed at once.

        The usual cause: two bridges with one client id, each taking the session from the
        other; the acks of the lost connection are lost.
        """
        now = time.monotonic()
        recent = [t for t in self._flaps if now - t < _FLAP_WINDOW_SECS]
        if len(recent) < _FLAPS_NOT_READY:
            return None
        return (
            f"the broker closed {len(recent)} connections right after CONNACK in the last"
            f" {_FLAP_WINDOW_SECS:.0f} s: another client may be using mqtt.client_id"
            f" {self._settings.client_id!r} (session takeover)"
        )

    def _on_paho_message(self, _c: paho.Client, _u: object, msg: paho.MQTTMessage) -> None:
        # msg.topic decodes UTF-8 and raises on bad bytes; mapping decides with the raw bytes.
        inbound = Inbound(
            msg._topic,
            bytes(msg.payload),
            time.time(),
            msg.mid,
            msg.qos,
            bool(msg.dup),
            # A retained copy on a resumed session was seen when it was published.
            retained_replay=bool(msg.retain) and self._session_present,
            oversized=self._client.oversized,
        )
        self._client.oversized = 0
        self._inbox.append((inbound, (self._generation, msg.mid) if msg.qos > 0 else None))
        self._last_message_at = time.monotonic()
        self._mail.set()
