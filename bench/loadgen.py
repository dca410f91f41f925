"""A raw-socket MQTT 3.1.1 QoS 1 publisher, many times faster than the bridge it feeds.

A paho publisher in Python tops out near 6,000 messages/s on the benchmark machine, below what
the bridge must be measured at. This one encodes every PUBLISH packet before the clock starts,
joins them into chunks of a few hundred packets and writes each chunk with one ``sendall``; a
reader thread per connection counts the PUBACKs. The protocol rules it keeps:

* packet ids cycle 1..65535 per connection, and a connection never has more than ``window``
  (default 10,000, well under 65,535) publishes without a PUBACK, so no id is reused while
  still in flight;
* it waits for every PUBACK before it sends DISCONNECT: when :func:`publish` returns, the broker
  has taken responsibility for every message (QoS 1).

The workload (:class:`Workload`): reading ``seq`` (0..N-1) comes from meter ``seq % meters``
on topic ``meters/1/meter-NNNN/telemetry``; its payload is one JSON object with ten data points
plus a ``seq`` point, and ``ts`` advances one second per reading of a meter, because readings of
one device with the same recordTime are merged by design.

Run ``python -m bench.loadgen --port 1883 --readings 100000`` to try it on its own (it prints
its rate as JSON); count with ``mosquitto_sub -p 1883 -q 1 -t 'meters/#' -C 100000``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import socket
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

__all__ = ["PublishResult", "Workload", "connect_packet", "publish", "publish_packet"]

_PUBACK = 0x40
_CONNACK = 0x20
_DISCONNECT = b"\xe0\x00"
_POINTS = (
    b'{"ts":%d,"Ua":%d.%d,"Ub":%d.%d,"Uc":%d.%d,"Ia":%d.%02d,"Ib":%d.%02d,"Ic":%d.%02d,'
    b'"P":%d.%d,"Q":%d.%d,"PF":0.%02d,"Ep_imp":%d.%d,"seq":%d}'
)


def _remaining_length(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def connect_packet(client_id: str, *, keepalive: int = 0, clean: bool = True) -> bytes:
    """Return an MQTT 3.1.1 CONNECT packet (no will, no credentials).

    Args:
        client_id: the client identifier.
        keepalive: seconds; 0 turns keepalive off, so no PINGREQ is ever needed.
        clean: the clean-session flag.
    """
    cid = client_id.encode()
    body = (
        b"\x00\x04MQTT\x04"
        + bytes([0x02 if clean else 0x00])
        + keepalive.to_bytes(2, "big")
        + len(cid).to_bytes(2, "big")
        + cid
    )
    return b"\x10" + _remaining_length(len(body)) + body


def publish_packet(topic: bytes, payload: bytes, packet_id: int) -> bytes:
    """Return a QoS 1 PUBLISH packet (no retain, no DUP)."""
    length = 2 + len(topic) + 2 + len(payload)
    return b"".join(
        (
            b"\x32",
            _remaining_length(length),
            len(topic).to_bytes(2, "big"),
            topic,
            packet_id.to_bytes(2, "big"),
            payload,
        )
    )


@dataclass(frozen=True, slots=True)
class Workload:
    """``readings`` numbered readings spread round-robin over ``meters`` meters.

    Attributes:
        readings: how many readings (``seq`` 0..readings-1).
        meters: how many meters; reading ``seq`` belongs to meter ``seq % meters``.
        base_ts: epoch seconds of each meter's first reading; the k-th reading of a meter has
            ``ts = base_ts + k``.
    """

    readings: int
    meters: int
    base_ts: int

    def meter_of(self, seq: int) -> int:
        """The meter number (from 1) of reading ``seq``."""
        return seq % self.meters + 1

    def ts_of(self, seq: int) -> int:
        """The ``ts`` of reading ``seq``."""
        return self.base_ts + seq // self.meters

    def topic(self, seq: int) -> bytes:
        """The topic of reading ``seq``."""
        return b"meters/1/meter-%04d/telemetry" % self.meter_of(seq)

    def payload(self, seq: int) -> bytes:
        """The JSON payload of reading ``seq``: ten points, ``seq`` and ``ts``."""
        v = seq * 7919  # any spread of plausible values will do
        return _POINTS % (
            self.ts_of(seq),
            220 + v % 20,
            v % 10,
            221 + v % 19,
            (v + 3) % 10,
            219 + v % 21,
            (v + 7) % 10,
            5 + v % 40,
            v % 100,
            5 + v % 41,
            (v + 11) % 100,
            5 + v % 39,
            (v + 23) % 100,
            10 + v % 900,
            v % 10,
            v % 300,
            (v + 5) % 10,
            80 + v % 20,
            1_000_000 + seq,
            v % 10,
            seq,
        )


@dataclass(slots=True)
class PublishResult:
    """What :func:`publish` measured (all times are ``time.time()`` epoch seconds).

    Attributes:
        chunk: readings per chunk; reading ``seq`` went out in chunk ``seq // chunk``.
        chunk_times: when the write of each chunk began.
        first_send: when the first chunk began.
        last_send: when the last chunk was written.
        last_ack: when the last PUBACK arrived.
    """

    chunk: int
    chunk_times: list[float] = field(default_factory=list)
    first_send: float = 0.0
    last_send: float = 0.0
    last_ack: float = 0.0

    def sent_at(self, seq: int) -> float:
        """When reading ``seq`` was written to the socket (start of its chunk's write)."""
        return self.chunk_times[seq // self.chunk]

    @property
    def rate(self) -> float:
        """Readings per second from the first write to the last PUBACK."""
        span = self.last_ack - self.first_send
        return (len(self.chunk_times) * self.chunk) / span if span > 0 else 0.0


class _Connection:
    """One MQTT connection: a socket, its packet-id counter and a PUBACK-counting reader."""

    def __init__(self, host: str, port: int, client_id: str, window: int) -> None:
        self.sock = socket.create_connection((host, port), timeout=10)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 * 1024 * 1024)
        self.sock.sendall(connect_packet(client_id))
        connack = _recv_exactly(self.sock, 4)
        if connack[0] != _CONNACK or connack[3] != 0:
            raise ConnectionError(f"broker refused the connection: CONNACK {connack.hex()}")
        self.sock.settimeout(None)
        self.window = window
        self.next_id = 1
        self.sent = 0
        self.acked = 0
        self.expected = 0
        self.last_ack = 0.0
        self.error: BaseException | None = None
        self.cond = threading.Condition()
        self.reader = threading.Thread(target=self._read, name=f"puback-{client_id}", daemon=True)

    def packet_ids(self, count: int) -> list[int]:
        """Take the next ``count`` packet ids (1..65535, cycling)."""
        first = self.next_id
        ids = [(first - 1 + i) % 65535 + 1 for i in range(count)]
        self.next_id = ids[-1] % 65535 + 1
        return ids

    def _read(self) -> None:
        try:
            self._count_pubacks()
        except BaseException as exc:  # noqa: BLE001 - handed to the sending thread
            with self.cond:
                self.error = exc
                self.cond.notify_all()

    def _count_pubacks(self) -> None:
        rest = b""
        while True:
            with self.cond:
                if self.expected and self.acked >= self.expected:
                    return
            data = self.sock.recv(1 << 16)
            if not data:
                raise ConnectionError("broker closed the connection")
            data = rest + data
            whole = len(data) - len(data) % 4
            rest = data[whole:]
            # Only PUBACKs (4 bytes: 0x40 0x02 id id) can arrive: keepalive is off.
            if data[0:whole:4].count(_PUBACK) != whole // 4:
                raise ConnectionError(f"unexpected packet from the broker: {data[:8].hex()}")
            now = time.time()
            with self.cond:
                self.acked += whole // 4
                self.last_ack = now
                self.cond.notify_all()

    def wait_room(self, count: int, deadline: float) -> None:
        """Block until ``count`` more publishes fit in the window."""
        with self.cond:
            while self.sent - self.acked + count > self.window:
                self._check(deadline)
                self.cond.wait(0.05)

    def wait_all(self, deadline: float) -> None:
        """Block until every publish was acknowledged."""
        with self.cond:
            while self.acked < self.expected:
                self._check(deadline)
                self.cond.wait(0.05)

    def _check(self, deadline: float) -> None:
        if self.error is not None:
            raise ConnectionError(f"publisher connection failed: {self.error}") from self.error
        if time.monotonic() > deadline:
            raise TimeoutError(f"PUBACKs missing: {self.acked} of {self.sent} acknowledged")

    def close(self) -> None:
        """Send DISCONNECT and close the socket."""
        with contextlib.suppress(OSError):
            self.sock.sendall(_DISCONNECT)
        self.sock.close()


def _recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        more = sock.recv(size - len(data))
        if not more:
            raise ConnectionError("broker closed the connection during CONNECT")
        data += more
    return data


def publish(
    host: str,
    port: int,
    workload: Workload,
    *,
    seqs: Sequence[int] | None = None,
    connections: int = 2,
    rate: float | None = None,
    chunk: int | None = None,
    window: int = 10_000,
    client_id: str = "bench-loadgen",
    timeout: float = 600.0,
) -> PublishResult:
    """Publish the workload's readings at QoS 1 and wait for every PUBACK.

    Packets are encoded before the first write, so only the writes are timed.

    Args:
        host: the broker's address.
        port: the broker's port.
        workload: what to publish.
        seqs: which readings (all of them when ``None``), in this order.
        connections: parallel connections; chunk ``j`` goes out on connection ``j % connections``.
        rate: readings per second; as fast as possible when ``None``. Paced in small chunks
            (about 2 ms of readings each) on a fixed schedule, so a late chunk is followed
            by on-time ones rather than a burst.
        chunk: readings per write; 256 flat out, ``rate / 500`` paced, when ``None``.
        window: most unacknowledged publishes per connection (must stay below 65,535).
        client_id: prefix of the connections' client ids.
        timeout: seconds before giving up.

    Returns:
        When each chunk was written, and the first/last write and last PUBACK times.

    Raises:
        ConnectionError: the broker refused or dropped a connection.
        TimeoutError: not every PUBACK arrived within ``timeout``.
    """
    if not 0 < window < 65_535:
        raise ValueError("window must be between 1 and 65534")
    order = list(range(workload.readings)) if seqs is None else list(seqs)
    if chunk is None:
        chunk = 256 if rate is None else max(1, round(rate / 500))
    chunk = min(chunk, window)
    conns = [
        _Connection(host, port, f"{client_id}-{i}", window) for i in range(max(1, connections))
    ]
    try:
        topics = {m: workload.topic(m - 1) for m in range(1, workload.meters + 1)}
        chunks: list[list[bytes]] = [[] for _ in conns]
        sizes: list[list[int]] = [[] for _ in conns]
        for j, start in enumerate(range(0, len(order), chunk)):
            conn_index = j % len(conns)
            conn = conns[conn_index]
            part = order[start : start + chunk]
            ids = conn.packet_ids(len(part))
            chunks[conn_index].append(
                b"".join(
                    publish_packet(topics[workload.meter_of(seq)], workload.payload(seq), pid)
                    for seq, pid in zip(part, ids, strict=True)
                )
            )
            sizes[conn_index].append(len(part))
        for conn, conn_sizes in zip(conns, sizes, strict=True):
            conn.expected = sum(conn_sizes)
            conn.reader.start()
        n_chunks = sum(len(c) for c in chunks)
        times = [0.0] * n_chunks
        deadline = time.monotonic() + timeout
        start_wall = time.time()
        start_mono = time.monotonic()
        errors: list[BaseException] = []

        def send(index: int) -> None:
            conn = conns[index]
            try:
                for k, (data, size) in enumerate(zip(chunks[index], sizes[index], strict=True)):
                    j = k * len(conns) + index
                    if rate is not None:
                        due = start_mono + j * chunk / rate
                        pause = due - time.monotonic()
                        if pause > 0:
                            time.sleep(pause)
                    conn.wait_room(size, deadline)
                    times[j] = time.time()
                    with conn.cond:
                        conn.sent += size
                    conn.sock.sendall(data)
                conn.wait_all(deadline)
            except BaseException as exc:  # noqa: BLE001 - re-raised by the caller
                errors.append(exc)

        threads = [
            threading.Thread(target=send, args=(i,), name=f"publish-{i}", daemon=True)
            for i in range(len(conns))
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout + 5)
        if errors:
            raise errors[0]
        result = PublishResult(chunk=chunk, chunk_times=times)
        result.first_send = min(times) if times else start_wall
        result.last_send = max(times) if times else start_wall
        result.last_ack = max(c.last_ack for c in conns)
        return result
    finally:
        for conn in conns:
            conn.close()


def main(argv: Sequence[str] | None = None) -> int:
    """Publish a workload to a broker and print the measured rate as one JSON line."""
    parser = argparse.ArgumentParser(prog="python -m bench.loadgen", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--readings", type=int, default=100_000)
    parser.add_argument("--meters", type=int, default=200)
    parser.add_argument("--connections", type=int, default=2)
    parser.add_argument("--rate", type=float, default=None, help="readings/s (default: flat out)")
    args = parser.parse_args(argv)
    workload = Workload(args.readings, args.meters, int(time.time()) - args.readings)
    result = publish(args.host, args.port, workload, connections=args.connections, rate=args.rate)
    print(
        json.dumps(
            {
                "readings": args.readings,
                "publish_s": round(result.last_ack - result.first_send, 3),
                "readings_per_s": round(result.rate),
            }
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
