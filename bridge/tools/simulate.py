"""``energy-bridge simulate``: three-phase electric meters publishing telemetry over MQTT.

The simulator stands in for a plant's meters in demos, integration tests and the benchmark.
It is split in two:

* a pure part that turns a seed into messages: :func:`meter_readings` (one meter's endless
  readings), :func:`message_ticks` (every meter's messages, tick by tick, with malformed
  messages mixed in) and the payload encoders. Same seed, same messages.
* an I/O part: :class:`WindowedPublisher` (a paho client that never has more than ``window``
  QoS 1 publishes unacknowledged) and :func:`run_from_args`, which paces ticks in real time,
  prints progress to stderr and a one-line JSON summary to stdout.

Values are written as JSON number *text* with fixed decimals (``226.10``, ``49.98``), made with
string formatting rather than float ``repr``, because the bridge must forward exactly the text a
meter sent.

This is a test and demo tool: it is the one module besides the MQTT source that imports paho.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import random
import signal
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from enum import StrEnum
from types import FrameType
from typing import Any, Final, TextIO

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

__all__ = [
    "POINTS",
    "Message",
    "MessageKind",
    "SimulationOptions",
    "WindowedPublisher",
    "add_arguments",
    "encode_json_reading",
    "main",
    "malformed_payload",
    "message_ticks",
    "meter_id",
    "meter_readings",
    "per_point_meters",
    "run_from_args",
]

POINTS: Final = ("Ua", "Ub", "Uc", "Ia", "Ib", "Ic", "P", "Q", "COSQ", "F", "Ep_imp", "Ep_exp")
"""The data points of every reading, in payload order (``ts`` comes first and is not a point)."""

# paho numbers QoS > 0 publishes 1..65535 and refuses a number still in use, so the window must
# stay well below the id space.
_MAX_WINDOW: Final = 65_000
_LOAD_CLASSES: Final = (8.0, 25.0, 60.0)  # typical phase current (A): shop, floor, workshop


def meter_id(meter: int) -> str:
    """Return the device id of meter number ``meter`` (1-based): ``meter-0001``."""
    return f"meter-{meter:04d}"


def _clamp(value: float, low: float, high: float) -> float:
    return min(high, max(low, value))


def meter_readings(
    meter: int,
    start_ts: int,
    interval: float,
    rng: random.Random,
    *,
    nominal_voltage: float = 230.0,
    nominal_frequency: float = 50.0,
) -> Iterator[dict[str, str]]:
    """Yield one meter's readings forever, each a mapping of ``ts`` and :data:`POINTS` to text.

    Every value is JSON number text: ``ts`` whole epoch seconds; voltages, currents and ``F``
    with two decimals; ``P``/``Q`` (kW, kvar) and ``COSQ`` with three; energies (kWh) with two.

    The model: phase voltages scatter around ``nominal_voltage`` (within ±6 %); the load current
    follows a mean-reverting random walk around a per-meter base load, with small imbalance
    between phases; the power factor wanders within 0.85-0.99. ``P`` and ``Q`` are computed from
    the *written* U, I and COSQ (``P = Σ U·I·cosφ / 1000``), so a consumer can check them.
    ``Ep_imp`` grows by ``P·Δt`` between readings and never decreases; ``Ep_exp`` is constant
    (the meters only import).

    Args:
        meter: the meter's 1-based number; picks its load class.
        start_ts: epoch seconds of the first reading.
        interval: seconds between readings. ``ts`` of reading ``k`` is
            ``start_ts + floor(k * interval)``, moved on by one second when that would repeat
            the previous one, so every reading of a meter has its own second.
        rng: the source of randomness (seed it for reproducible readings).
        nominal_voltage: nominal phase voltage in volts.
        nominal_frequency: nominal grid frequency in hertz.

    Yields:
        ``{"ts": "1700000000", "Ua": "229.87", ..., "Ep_exp": "12.40"}``.
    """
    base_current = _LOAD_CLASSES[meter % len(_LOAD_CLASSES)] * rng.uniform(0.7, 1.3)
    load = base_current
    cos_phi = rng.uniform(0.88, 0.97)
    ep_imp = rng.uniform(1_000.0, 90_000.0)
    ep_exp = rng.uniform(0.0, 50.0)
    ep_exp_text = f"{ep_exp:.2f}"
    previous_ts: int | None = None
    for k in itertools.count():
        ts = start_ts + math.floor(k * interval)
        if previous_ts is not None and ts <= previous_ts:
            ts = previous_ts + 1
        # Mean-reverting walk: the load drifts but keeps returning to the meter's base load.
        load += 0.2 * (base_current - load) + rng.gauss(0.0, 0.05 * base_current)
        load = _clamp(load, 0.1 * base_current, 2.0 * base_current)
        cos_phi = _clamp(cos_phi + rng.gauss(0.0, 0.01), 0.85, 0.99)
        low, high = 0.94 * nominal_voltage, 1.06 * nominal_voltage
        voltages = [
            f"{_clamp(rng.gauss(nominal_voltage, 0.008 * nominal_voltage), low, high):.2f}"
            for _ in range(3)
        ]
        currents = [f"{max(0.01, load * rng.gauss(1.0, 0.04)):.2f}" for _ in range(3)]
        cos_text = f"{cos_phi:.3f}"
        apparent_kva = sum(float(u) * float(i) for u, i in zip(voltages, currents, strict=True))
        apparent_kva /= 1000.0
        cos_written = float(cos_text)
        p_kw = apparent_kva * cos_written
        q_kvar = apparent_kva * math.sqrt(max(0.0, 1.0 - cos_written * cos_written))
        if previous_ts is not None:
            ep_imp += p_kw * (ts - previous_ts) / 3600.0
        previous_ts = ts
        frequency = nominal_frequency + rng.uniform(-0.05, 0.05)
        yield {
            "ts": str(ts),
            "Ua": voltages[0],
            "Ub": voltages[1],
            "Uc": voltages[2],
            "Ia": currents[0],
            "Ib": currents[1],
            "Ic": currents[2],
            "P": f"{p_kw:.3f}",
            "Q": f"{q_kvar:.3f}",
            "COSQ": cos_text,
            "F": f"{frequency:.2f}",
            "Ep_imp": f"{ep_imp:.2f}",
            "Ep_exp": ep_exp_text,
        }


def encode_json_reading(reading: dict[str, str]) -> bytes:
    """Encode a reading from :func:`meter_readings` as a JSON object with number values.

    The values are inserted as they are (they are already JSON number text), so ``226.10``
    stays ``226.10`` on the wire.
    """
    return ("{" + ",".join(f'"{key}":{value}' for key, value in reading.items()) + "}").encode()


def per_point_meters(meters: int, fraction: float) -> frozenset[int]:
    """Return which of meters ``1..meters`` publish one topic per point, spread evenly.

    Meter ``i`` is chosen when ``floor(i * fraction)`` steps up at ``i``, which picks
    ``floor(meters * fraction)`` meters: with 50 meters and 0.1, meters 10, 20, 30, 40, 50.
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be within 0..1, got {fraction}")
    return frozenset(
        i for i in range(1, meters + 1) if math.floor(i * fraction) > math.floor((i - 1) * fraction)
    )


class MessageKind(StrEnum):
    """What a simulated MQTT message carries."""

    JSON = "json"
    """A whole reading as a JSON object on ``{prefix}/{type}/{id}/telemetry``."""
    POINT = "point"
    """One point as a bare value on ``{prefix}/{type}/{id}/points/{point}``."""
    MALFORMED = "malformed"
    """A payload no route can read, on a meter's JSON telemetry topic."""


@dataclass(frozen=True, slots=True)
class Message:
    """One MQTT message to publish.

    Attributes:
        topic: the topic.
        payload: the payload bytes.
        kind: what the payload is.
        meter: the 1-based number of the meter it belongs to.
    """

    topic: str
    payload: bytes
    kind: MessageKind
    meter: int


@dataclass(frozen=True, slots=True, kw_only=True)
class SimulationOptions:
    """What to simulate (the pure part; pacing and MQTT are :func:`run_from_args`'s business).

    Attributes:
        meters: number of meters, ``meter-0001`` upwards.
        interval: seconds between two readings of one meter.
        device_type: Energy Expert device type code in the topics.
        topic_prefix: first topic level.
        per_point_fraction: share of meters that publish one topic per point.
        malformed_every: every ``N``-th message is malformed (``N >= 2``); ``0`` for none.
        nominal_voltage: nominal phase voltage in volts.
    """

    meters: int = 50
    interval: float = 5.0
    device_type: str = "1"
    topic_prefix: str = "meters"
    per_point_fraction: float = 0.1
    malformed_every: int = 0
    nominal_voltage: float = 230.0


def malformed_payload(reading: dict[str, str], rng: random.Random) -> bytes:
    """Return a payload that no route can read, derived from ``reading``.

    One of: JSON cut off in the middle, bytes that are not UTF-8, or a top-level JSON value
    that is neither an object nor an array of objects.
    """
    choice = rng.randrange(3)
    if choice == 0:
        whole = encode_json_reading(reading)
        return whole[: max(1, len(whole) // 2)]
    if choice == 1:
        return b"\xff\xfe" + encode_json_reading(reading)[2:] + b"\xc3"
    return b"[" + ",".join(reading.values()).encode() + b"]"


def message_ticks(
    options: SimulationOptions, start_ts: int, rng: random.Random
) -> Iterator[list[Message]]:
    """Yield, tick after tick, the messages of every meter's next reading (endless).

    Meters chosen by :func:`per_point_meters` send one message per point (bare value, no
    ``ts``: the bridge stamps them on arrival); the others send one JSON object. When
    ``options.malformed_every`` is ``N > 0``, message number ``N, 2N, 3N, ...`` of the whole
    stream (1-based) is a malformed one, inserted *before* the next good message; so after ``T``
    messages exactly ``T // N`` were malformed and no reading is lost to make room.

    Args:
        options: what to simulate.
        start_ts: epoch seconds of every meter's first reading.
        rng: the seed of everything; each meter gets its own generator drawn from it.
    """
    if options.meters < 1:
        raise ValueError("meters must be at least 1")
    if options.malformed_every < 0 or options.malformed_every == 1:
        raise ValueError("malformed_every must be 0 (never) or at least 2")
    per_point = per_point_meters(options.meters, options.per_point_fraction)
    streams = {
        m: meter_readings(
            m,
            start_ts,
            options.interval,
            random.Random(rng.getrandbits(64)),
            nominal_voltage=options.nominal_voltage,
        )
        for m in range(1, options.meters + 1)
    }
    malformed_rng = random.Random(rng.getrandbits(64))
    every = options.malformed_every
    sent = 0
    while True:
        tick: list[Message] = []
        for m, stream in streams.items():
            reading = next(stream)
            base = f"{options.topic_prefix}/{options.device_type}/{meter_id(m)}"
            good: list[Message]
            if m in per_point:
                good = [
                    Message(f"{base}/points/{point}", reading[point].encode(), MessageKind.POINT, m)
                    for point in POINTS
                ]
            else:
                good = [
                    Message(f"{base}/telemetry", encode_json_reading(reading), MessageKind.JSON, m)
                ]
            for message in good:
                if every and (sent + 1) % every == 0:
                    tick.append(
                        Message(
                            f"{base}/telemetry",
                            malformed_payload(reading, malformed_rng),
                            MessageKind.MALFORMED,
                            m,
                        )
                    )
                    sent += 1
                tick.append(message)
                sent += 1
        yield tick


class WindowedPublisher:
    """A paho-mqtt (MQTT v5) publisher with at most ``window`` unacknowledged messages.

    paho numbers QoS 1/2 publishes 1..65535 and refuses a number that is still in flight, so
    publishing a long burst without waiting for PUBACKs loses messages. :meth:`publish` blocks
    while ``window`` messages are unacknowledged. QoS 0 messages count as acknowledged once
    written to the socket.

    Lifecycle: construct, :meth:`connect`, :meth:`publish` any number of times,
    :meth:`wait_all`, :meth:`close`. Also a context manager (connects on enter, closes on exit).
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        client_id: str | None = None,
        window: int = 1000,
        keepalive: int = 30,
    ) -> None:
        """Prepare the client; nothing connects until :meth:`connect`.

        Args:
            host: broker host.
            port: broker port.
            client_id: MQTT client id; a random ``simulate-...`` id when ``None``.
            window: most unacknowledged messages at once (1..65000).
            keepalive: MQTT keepalive in seconds.
        """
        if not 1 <= window <= _MAX_WINDOW:
            raise ValueError(f"window must be within 1..{_MAX_WINDOW}, got {window}")
        self.host = host
        self.port = port
        self.window = window
        self.keepalive = keepalive
        self.client_id = client_id or f"simulate-{uuid.uuid4().hex[:12]}"
        self._cond = threading.Condition()
        self._connected = False
        self._connect_error: str | None = None
        self._submitted = 0
        self._acked = 0
        self._failed = 0
        self._dropped = 0
        self._max_outstanding = 0
        self._client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            protocol=MQTTProtocolVersion.MQTTv5,
        )
        # Let paho send the whole window at once; our own counter is the real limit.
        self._client.max_inflight_messages = window
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_publish = self._on_publish

    # paho calls these on its network thread while holding its own locks: they only touch
    # our counters under our condition, and publish() never holds the condition while calling
    # into paho, so the two lock orders cannot cross.
    def _on_connect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: mqtt.ConnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        with self._cond:
            if reason_code.is_failure:
                self._connect_error = str(reason_code)
            else:
                self._connected = True
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

    def _on_publish(
        self,
        client: mqtt.Client,
        userdata: Any,
        mid: int,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        with self._cond:
            self._acked += 1
            if reason_code.is_failure:
                self._failed += 1
            self._cond.notify_all()

    @property
    def submitted(self) -> int:
        """Messages handed to paho so far."""
        return self._submitted

    @property
    def acked(self) -> int:
        """Messages acknowledged (PUBACK/PUBCOMP, or written for QoS 0), failures included."""
        return self._acked

    @property
    def failed(self) -> int:
        """Messages the broker acknowledged with a failure reason code."""
        return self._failed

    @property
    def dropped(self) -> int:
        """QoS 0 messages paho discarded because the client was disconnected."""
        return self._dropped

    @property
    def outstanding(self) -> int:
        """Messages handed to paho and not acknowledged yet."""
        with self._cond:
            return self._submitted - self._acked

    @property
    def max_outstanding(self) -> int:
        """The most messages that were ever unacknowledged at once."""
        return self._max_outstanding

    @property
    def connected(self) -> bool:
        """Whether the client is connected right now."""
        return self._connected

    def connect(self, timeout: float = 10.0) -> None:
        """Connect (clean start) and start paho's network thread; wait for the CONNACK.

        Raises:
            ConnectionError: the broker refused the connection or did not answer in time.
        """
        try:
            self._client.connect(self.host, self.port, keepalive=self.keepalive, clean_start=True)
        except OSError as exc:
            raise ConnectionError(f"cannot connect to {self.host}:{self.port}: {exc}") from exc
        self._client.loop_start()
        with self._cond:
            ok = self._cond.wait_for(
                lambda: self._connected or self._connect_error is not None, timeout
            )
            error = self._connect_error
        if error is not None or not ok:
            self.close()
            raise ConnectionError(
                f"broker {self.host}:{self.port} refused: {error}"
                if error
                else f"no CONNACK from {self.host}:{self.port} within {timeout}s"
            )

    def publish(
        self,
        topic: str,
        payload: bytes,
        qos: int = 1,
        *,
        timeout: float = 60.0,
        abort: threading.Event | None = None,
        retain: bool = False,
    ) -> bool:
        """Publish once fewer than ``window`` messages are unacknowledged.

        Args:
            topic: the topic.
            payload: the payload.
            qos: 0, 1 or 2.
            retain: ask the broker to keep the message as the topic's retained one.
            timeout: longest wait for room in the window.
            abort: when set while waiting, give up and return ``False``.

        Returns:
            ``True`` when the message was handed to paho, ``False`` when ``abort`` was set.

        Raises:
            TimeoutError: the window stayed full for ``timeout`` seconds.
            RuntimeError: paho refused the message.
        """
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._submitted - self._acked >= self.window:
                if abort is not None and abort.is_set():
                    return False
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(
                        f"{self.window} messages unacknowledged for {timeout}s "
                        f"(connected: {self._connected})"
                    )
                # Short slices so that ``abort`` is noticed promptly.
                self._cond.wait(min(remaining, 0.1))
            self._submitted += 1
            self._max_outstanding = max(self._max_outstanding, self._submitted - self._acked)
        try:
            info = self._client.publish(topic, payload, qos=qos, retain=retain)
        except BaseException:
            self._unsubmit()
            raise
        if info.rc == MQTTErrorCode.MQTT_ERR_NO_CONN and qos == 0:
            # paho drops QoS 0 messages while disconnected (they will never be acknowledged).
            self._unsubmit(dropped=True)
        elif info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
            # NO_CONN with QoS > 0 is fine: paho keeps the message and resends it on reconnect.
            self._unsubmit()
            raise RuntimeError(f"paho refused to publish on {topic}: {mqtt.error_string(info.rc)}")
        return True

    def _unsubmit(self, *, dropped: bool = False) -> None:
        with self._cond:
            self._submitted -= 1
            self._dropped += dropped
            self._cond.notify_all()

    def wait_all(self, timeout: float) -> bool:
        """Wait until every submitted message is acknowledged; ``False`` on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: self._acked >= self._submitted, timeout)

    def close(self) -> None:
        """Disconnect and stop the network thread. Safe to call more than once."""
        self._client.disconnect()
        self._client.loop_stop()
        with self._cond:
            self._connected = False

    def __enter__(self) -> WindowedPublisher:
        """Connect."""
        self.connect()
        return self

    def __exit__(self, *exc_info: object) -> None:
        """Close."""
        self.close()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``simulate`` command's options to ``parser``."""
    parser.add_argument("--host", default="127.0.0.1", help="broker host (default %(default)s)")
    parser.add_argument("--port", type=int, default=1883, help="broker port (default %(default)s)")
    parser.add_argument(
        "--meters", type=int, default=50, help="number of meters (default %(default)s)"
    )
    parser.add_argument(
        "--interval",
        type=float,
        default=5.0,
        help="seconds between two readings of a meter; 0 = as fast as possible "
        "(default %(default)s)",
    )
    parser.add_argument(
        "--count", type=int, default=None, help="readings per meter (default: unlimited)"
    )
    parser.add_argument("--duration", type=float, default=None, help="stop after this many seconds")
    parser.add_argument(
        "--device-type", default="1", help="device type code in the topics (default %(default)s)"
    )
    parser.add_argument(
        "--topic-prefix", default="meters", help="first topic level (default %(default)s)"
    )
    parser.add_argument(
        "--per-point-fraction",
        type=float,
        default=0.1,
        help="share of meters publishing one topic per point, "
        "{prefix}/{type}/{id}/points/{point}, as bare values (default %(default)s)",
    )
    parser.add_argument(
        "--malformed-every",
        type=int,
        default=0,
        help="make every N-th message (N >= 2) malformed; 0 = never (default %(default)s)",
    )
    parser.add_argument(
        "--qos", type=int, choices=(0, 1, 2), default=1, help="MQTT QoS (default %(default)s)"
    )
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: random)")
    parser.add_argument(
        "--max-inflight",
        type=int,
        default=1000,
        help="most unacknowledged publishes at once (default %(default)s)",
    )
    parser.add_argument(
        "--nominal-voltage",
        type=float,
        default=230.0,
        help="nominal phase voltage in volts (default %(default)s)",
    )


def _check_args(args: argparse.Namespace) -> str | None:
    problems = [
        (args.meters < 1, "--meters must be at least 1"),
        (args.interval < 0, "--interval must not be negative"),
        (args.count is not None and args.count < 1, "--count must be at least 1"),
        (args.duration is not None and args.duration <= 0, "--duration must be positive"),
        (not 0.0 <= args.per_point_fraction <= 1.0, "--per-point-fraction must be within 0..1"),
        (
            args.malformed_every < 0 or args.malformed_every == 1,
            "--malformed-every must be 0 or >= 2",
        ),
        (not 1 <= args.max_inflight <= _MAX_WINDOW, f"--max-inflight must be 1..{_MAX_WINDOW}"),
        (not 1 <= args.port <= 65535, "--port must be 1..65535"),
        (args.nominal_voltage <= 0, "--nominal-voltage must be positive"),
    ]
    return next((message for failed, message in problems if failed), None)


class _Progress:
    """Prints ``published N (R/s)`` to stderr once per second from its own thread."""

    def __init__(self, publisher: WindowedPublisher, out: TextIO) -> None:
        self._publisher = publisher
        self._out = out
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="simulate-progress", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        last_count, last_time = 0, time.monotonic()
        while not self._stop.wait(1.0):
            now, count = time.monotonic(), self._publisher.acked
            rate = (count - last_count) / max(now - last_time, 1e-9)
            print(f"published {count} ({rate:.0f}/s)", file=self._out, flush=True)
            last_count, last_time = count, now


def run_from_args(args: argparse.Namespace) -> int:
    """Run the simulator with parsed ``args`` until count, duration or SIGINT/SIGTERM.

    Ticks (one reading of every meter) are published ``interval`` seconds apart in real time.
    On stop it waits (bounded) for the outstanding PUBACKs, then prints one line of JSON to
    stdout: ``{"published": N, "malformed": M, "meters": X, "readings": R, "unacked": U}``
    where ``published`` counts acknowledged messages of any kind, ``malformed`` the malformed
    ones among them and ``readings`` the meter readings sent whole.

    Returns:
        0 on success, 1 when the broker cannot be reached or messages stayed unacknowledged,
        2 for invalid arguments.
    """
    problem = _check_args(args)
    if problem:
        print(f"simulate: {problem}", file=sys.stderr)
        return 2
    options = SimulationOptions(
        meters=args.meters,
        interval=args.interval,
        device_type=str(args.device_type),
        topic_prefix=args.topic_prefix,
        per_point_fraction=args.per_point_fraction,
        malformed_every=args.malformed_every,
        nominal_voltage=args.nominal_voltage,
    )
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    # Signal handlers can only be installed from the main thread (e.g. not when a demo runs
    # the simulator in a worker thread; it stops it with count or duration instead).
    previous = (
        {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        if threading.current_thread() is threading.main_thread()
        else {}
    )
    publisher = WindowedPublisher(args.host, args.port, window=args.max_inflight)
    try:
        publisher.connect()
    except ConnectionError as exc:
        print(f"simulate: {exc}", file=sys.stderr)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        return 1
    progress = _Progress(publisher, sys.stderr)
    progress.start()
    ticks = message_ticks(options, int(time.time()), random.Random(args.seed))
    try:
        readings, malformed = _publish_ticks(publisher, ticks, args, stop)
        complete = publisher.wait_all(timeout=30.0)
    except TimeoutError as exc:
        print(f"simulate: {exc}", file=sys.stderr)
        readings = malformed = 0
        complete = False
    finally:
        progress.stop()
        publisher.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    summary = {
        "published": publisher.acked - publisher.failed,
        "malformed": malformed,
        "meters": options.meters,
        "readings": readings,
        "unacked": publisher.submitted - publisher.acked,
    }
    print(json.dumps(summary), flush=True)
    return 0 if complete and publisher.failed == 0 else 1


def _publish_ticks(
    publisher: WindowedPublisher,
    ticks: Iterator[list[Message]],
    args: argparse.Namespace,
    stop: threading.Event,
) -> tuple[int, int]:
    """Publish ticks ``args.interval`` apart until count, duration or ``stop``.

    Returns:
        Whole readings sent and malformed messages sent.
    """
    readings = malformed = 0
    started = time.monotonic()
    deadline = math.inf if args.duration is None else started + args.duration
    for index, tick in enumerate(ticks):
        if args.count is not None and index >= args.count:
            break
        due = started + index * args.interval
        if due >= deadline or stop.wait(max(0.0, due - time.monotonic())):
            break
        needed = Counter(m.meter for m in tick if m.kind is not MessageKind.MALFORMED)
        sent: Counter[int] = Counter()
        for message in tick:
            if time.monotonic() >= deadline:
                stop.set()
            if stop.is_set() or not publisher.publish(
                message.topic, message.payload, args.qos, abort=stop, timeout=3600.0
            ):
                break
            if message.kind is MessageKind.MALFORMED:
                malformed += 1
            else:
                sent[message.meter] += 1
        # A reading counts once all its messages are out (a stop may fall inside a tick).
        readings += sum(1 for meter, count in sent.items() if count == needed[meter])
        if stop.is_set():
            break
    return readings, malformed


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m bridge.tools.simulate`` (as ``energy-bridge simulate``)."""
    parser = argparse.ArgumentParser(
        prog="energy-bridge simulate", description="Simulate three-phase meters over MQTT."
    )
    add_arguments(parser)
    return run_from_args(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
