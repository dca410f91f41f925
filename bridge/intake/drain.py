"""``energy-bridge session drain --client-id ID``: take over a gone replica's MQTT session.

A shared-subscription member that leaves without unsubscribing (killed, or its node gone)
keeps its session on the broker: Mosquitto goes on queueing its round-robin share there, and
its unacknowledged messages stay with it. For a replica that will not come back this command:

1. connects as that client, resuming its session (clean start off);
2. unsubscribes the session's shared filters at once, so the broker assigns it no more;
3. takes every message the broker holds for it, maps it with this bridge's routes and commits
   the readings (and dead letters) to THIS bridge's spool, acknowledging each message only
   after its commit, as the bridge does; a running bridge on that spool picks the rows up;
4. once nothing has arrived for ``--quiet-secs``, disconnects with session expiry 0: the
   broker discards the session.

Safe beside the running bridge whose spool it writes (SQLite serialises the writers; the
bridge notices rows it did not write). Do not run it for a replica that is still running: the
broker would hand the session back and forth between the two (a takeover); the command then
stops with what it committed, and nothing is lost either way.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from bridge.config import Settings, load_settings
from bridge.errors import BridgeError, ConfigError, MappingError
from bridge.intake.mapping import Mapper
from bridge.intake.mqtt import broker_password, tls_context
from bridge.models import Reading
from bridge.spool.store import Reject, SpoolStore

__all__ = ["SessionDrain", "add_arguments", "run_from_args"]

_COMMIT_EVERY_SECS = 0.2


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``session`` command's actions to ``parser``."""
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    p = actions.add_parser(
        "drain",
        help="take everything the broker holds for a gone replica's client id into this"
        " bridge's spool, then end that session",
    )
    p.add_argument("--config", type=Path, help="YAML config (broker, routes, spool.path)")
    p.add_argument("--client-id", required=True, help="the gone replica's mqtt.client_id")
    p.add_argument(
        "--quiet-secs",
        type=float,
        default=3.0,
        help="end once nothing has arrived for this long (default 3)",
    )
    p.add_argument(
        "--timeout", type=float, default=600.0, help="give up after this long (default 600)"
    )


@dataclass(slots=True)
class DrainReport:
    """What one drain did."""

    client_id: str
    session_present: bool = False
    messages: int = 0
    readings: int = 0
    rejected: int = 0
    session_ended: bool = False
    problem: str | None = None
    spool: str = ""

    def as_dict(self) -> dict[str, Any]:
        """The report as printed."""
        return {
            "client_id": self.client_id,
            "session_present": self.session_present,
            "messages": self.messages,
            "readings": self.readings,
            "rejected": self.rejected,
            "session_ended": self.session_ended,
            "spool": self.spool,
            **({"problem": self.problem} if self.problem else {}),
        }


@dataclass(slots=True)
class _Inbound:
    topic: bytes
    payload: bytes
    mid: int
    qos: int
    received_at: float


@dataclass(slots=True)
class _State:
    lock: threading.Lock = field(default_factory=threading.Lock)
    inbox: list[_Inbound] = field(default_factory=list)
    connack: threading.Event = field(default_factory=threading.Event)
    connack_reason: ReasonCode | None = None
    session_present: bool = False
    unsubscribed: threading.Event = field(default_factory=threading.Event)
    disconnected: threading.Event = field(default_factory=threading.Event)
    last_message_at: float = field(default_factory=time.monotonic)


class SessionDrain:
    """Resumes ``client_id``'s session, moves what it holds into ``store``, ends it.

    Args:
        settings: this bridge's settings (broker, TLS, routes, share group).
        client_id: the gone replica's client id.
        store: this bridge's spool (opened; not closed here).
    """

    def __init__(self, settings: Settings, client_id: str, store: SpoolStore) -> None:
        self._settings = settings
        self._client_id = client_id
        self._store = store
        self._mapper = Mapper(
            settings.routes, settings.timezone, max_payload_bytes=settings.mqtt.max_payload_bytes
        )
        self._filters = [settings.mqtt.shared(f) for f in self._mapper.subscriptions]
        self._state = _State()
        self._client = self._make_client()

    def run(self, *, quiet_secs: float, timeout: float) -> DrainReport:
        """Drain; returns what was done (``problem`` set when the session was not ended)."""
        report = DrainReport(self._client_id, spool=str(self._store.path))
        s = self._settings.mqtt
        state = self._state
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        # Non-zero, so that the DISCONNECT may set it to 0 (MQTT v5 3.14.2.2.2).
        props.SessionExpiryInterval = max(1, s.session_expiry_secs)
        props.ReceiveMaximum = s.receive_maximum
        deadline = time.monotonic() + timeout
        try:
            self._client.connect(
                s.host, s.port, s.keepalive_secs, clean_start=False, properties=props
            )
        except (OSError, ValueError) as exc:
            report.problem = f"cannot connect to {s.host}:{s.port}: {exc}"
            return report
        self._client.loop_start()
        try:
            if not state.connack.wait(15.0) or state.connack_reason is None:
                report.problem = "no CONNACK within 15 s"
                return report
            if state.connack_reason.is_failure:
                report.problem = f"broker refused the connection: {state.connack_reason}"
                return report
            report.session_present = state.session_present
            while time.monotonic() < deadline:
                self._commit_and_ack(report)
                if state.disconnected.is_set():
                    report.problem = (
                        "the broker closed the connection (is a replica with this client id"
                        " still running?); what arrived was committed"
                    )
                    return report
                quiet = time.monotonic() - state.last_message_at >= quiet_secs
                if state.unsubscribed.is_set() and quiet:
                    break
                time.sleep(_COMMIT_EVERY_SECS)
            else:
                report.problem = f"still receiving after {timeout:g} s; run it again"
                return report
            self._commit_and_ack(report)
            # Expiry 0 on DISCONNECT: the broker discards the session and what it held.
            end = Properties(PacketTypes.DISCONNECT)  # type: ignore[no-untyped-call]
            end.SessionExpiryInterval = 0
            self._client.disconnect(properties=end)
            report.session_ended = state.disconnected.wait(10.0)
            if not report.session_ended:
                report.problem = "the disconnect was not confirmed within 10 s"
            return report
        finally:
            self._client.loop_stop()

    # -- the spool side (caller's thread) ---------------------------------------------------

    def _commit_and_ack(self, report: DrainReport) -> None:
        with self._state.lock:
            taken, self._state.inbox = self._state.inbox, []
        if not taken:
            return
        readings: list[Reading] = []
        rejects: list[Reject] = []
        for msg in taken:
            try:
                readings.extend(self._mapper.map(msg.topic, msg.payload, msg.received_at))
            except MappingError as exc:
                rejects.append(
                    Reject(msg.topic, msg.payload, exc.reason, exc.detail, msg.received_at)
                )
        # Raises (nothing acked) when the spool is full or broken: the broker keeps them.
        self._store.commit(readings, rejects)
        for msg in taken:
            if msg.qos:
                self._client.ack(msg.mid, msg.qos)
        report.messages += len(taken)
        report.readings += len(readings)
        report.rejected += len(rejects)

    # -- the broker side (paho's thread) ----------------------------------------------------

    def _make_client(self) -> paho.Client:
        s = self._settings.mqtt
        client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self._client_id,
            protocol=MQTTProtocolVersion.MQTTv5,
            reconnect_on_failure=False,
            manual_ack=True,
        )
        if s.username is not None:
            client.username_pw_set(s.username, broker_password(s))
        if s.tls.enabled:
            client.tls_set_context(tls_context(s.tls))
            client.tls_insecure_set(s.tls.insecure)
        client.on_connect = self._on_connect
        client.on_unsubscribe = self._on_unsubscribe
        client.on_message = self._on_message
        client.on_disconnect = self._on_disconnect
        return client

    def _on_connect(
        self,
        client: paho.Client,
        _u: object,
        flags: paho.ConnectFlags,
        reason: ReasonCode,
        _props: Properties | None,
    ) -> None:
        state = self._state
        state.connack_reason = reason
        state.session_present = bool(flags.session_present)
        if not reason.is_failure:
            # First of all: the broker must assign this session no new share.
            client.unsubscribe(list(self._filters))
        state.connack.set()

    def _on_unsubscribe(
        self,
        _c: paho.Client,
        _u: object,
        _mid: int,
        _reasons: list[ReasonCode],
        _props: Properties | None,
    ) -> None:
        with self._state.lock:
            self._state.last_message_at = time.monotonic()
        self._state.unsubscribed.set()

    def _on_message(self, _c: paho.Client, _u: object, msg: paho.MQTTMessage) -> None:
        inbound = _Inbound(msg._topic, bytes(msg.payload), msg.mid, msg.qos, time.time())
        with self._state.lock:
            self._state.inbox.append(inbound)
            self._state.last_message_at = time.monotonic()

    def _on_disconnect(
        self,
        _c: paho.Client,
        _u: object,
        _flags: paho.DisconnectFlags,
        _reason: ReasonCode,
        _props: Properties | None,
    ) -> None:
        self._state.disconnected.set()


def run_from_args(args: argparse.Namespace) -> int:
    """Run ``session drain``; prints one JSON report, returns 0 when the session was ended."""
    settings = load_settings(args.config)
    if args.client_id == settings.mqtt.client_id:
        raise ConfigError(
            "mqtt.client_id",
            f"{args.client_id!r} is this bridge's own client id: drain another replica's",
        )
    store = SpoolStore.open(
        settings.spool.path,
        max_bytes=settings.spool.max_bytes,
        synchronous=settings.spool.synchronous.value,
        dead_letter_max_bytes=settings.spool.dead_letter_max_bytes,
    )
    try:
        report = SessionDrain(settings, args.client_id, store).run(
            quiet_secs=args.quiet_secs, timeout=args.timeout
        )
    except (BridgeError, OSError) as exc:
        sys.stderr.write(f"energy-bridge: session drain stopped: {exc}\n")
        return 1
    finally:
        store.close()
    sys.stdout.write(orjson.dumps(report.as_dict()).decode() + "\n")
    return 0 if report.problem is None else 1
