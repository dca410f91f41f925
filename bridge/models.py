"""The bridge's own value types and the wire form of a push request body.

They are the only types that cross from one stage to the next.

Plain slotted classes on purpose: they are created once per message on the hot path, where
pydantic validation would cost more than the rest of the pipeline together.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, NamedTuple

import orjson

__all__ = [
    "NO_DEVICE_ID_TYPES",
    "Batch",
    "BatchKey",
    "Inbound",
    "Reading",
    "SpooledReading",
    "build_body",
    "compact_json",
    "serialize_entry",
]

NO_DEVICE_ID_TYPES: Final = frozenset({"15", "16"})
"""Device types whose ``devices[]`` entries carry no ``deviceId`` (API reference)."""


def compact_json(obj: object) -> bytes:
    """``orjson.dumps`` into an exactly sized ``bytes``.

    orjson (3.13) hands back a bytes object that keeps a 4 KiB allocation whatever its length;
    serialized points and entries live as long as their batch, so each is copied once into a
    block of its own size (measured: ~4,100 -> ~190 bytes of memory per entry).
    """
    return bytes(memoryview(orjson.dumps(obj)))


@dataclass(slots=True)
class Inbound:
    """One MQTT message as the bridge sees it, after it left paho.

    Not frozen on purpose: one is made per message, and a frozen dataclass pays for
    ``object.__setattr__`` on every field.

    Attributes:
        topic: the topic as raw bytes (topics need not be valid UTF-8 on the wire).
        payload: the payload bytes.
        received_at: wall-clock time of arrival, epoch seconds.
        mid: the MQTT message id (0 for QoS 0).
        qos: the QoS the message was delivered with.
        dup: the MQTT DUP flag (a redelivery by the broker).
        retained_replay: a retained copy sent again on a resumed session (not a reading).
        oversized: the real size of a packet larger than the bridge reads (its payload is cut
            short), 0 otherwise.
    """

    topic: bytes
    payload: bytes
    received_at: float
    mid: int = 0
    qos: int = 0
    dup: bool = False
    retained_replay: bool = False
    oversized: int = 0


class Reading:
    """One device's values at one moment, ready for the push API.

    The points are held as a dict, as JSON text, or both: whichever form a reading was made
    from is kept, and the other is computed once, when first asked for. A reading fresh from
    the mapping is serialized once (for the spool, the batch size and the request body); a
    reading read back from the spool is never decoded unless a batch merges it with another.

    Attributes:
        device_type: Energy Expert device type code, as a string (``"1"`` for electric meters).
        device_id: the device id (system_id for types 12/13/17); for types 15/16, which send
            none, the topic's id when it has one (it keeps sources apart), else ``None``.
        record_ts: the reading's time, epoch seconds (UTC).
        record_time: ``record_ts`` in the configured timezone as ``YYYY-MM-DD HH:MM:SS``.
        received_at: when the message carrying it arrived, epoch seconds.
        hold_until: wall-clock time before which the batcher keeps the reading's entry open
            for more readings of its aligned window (``align_secs``); 0 for none. Not stored
            in the spool: a reading read back is not held.
    """

    __slots__ = ("_data", "_json", "device_id", "device_type", "hold_until", "received_at",
                 "record_time", "record_ts")  # fmt: skip

    def __init__(  # noqa: PLR0917 - the fields in order, as the API reference lists them
        self,
        device_type: str,
        device_id: str | None,
        record_ts: int,
        record_time: str,
        data: dict[str, str],
        received_at: float,
        *,
        hold_until: float = 0.0,
    ) -> None:
        """Make a reading from its points as a dict (data point name -> exact decimal text)."""
        self.hold_until = hold_until
        self.device_type = device_type
        self.device_id = device_id
        self.record_ts = record_ts
        self.record_time = record_time
        self._data: dict[str, str] | None = data
        self._json: bytes | None = None
        self.received_at = received_at

    @classmethod
    def from_json(  # noqa: PLR0917 - the same fields as __init__
        cls,
        device_type: str,
        device_id: str | None,
        record_ts: int,
        record_time: str,
        data_json: bytes,
        received_at: float,
    ) -> Reading:
        """Make a reading from its points as JSON text (as the spool keeps them)."""
        reading = cls.__new__(cls)
        reading.device_type = device_type
        reading.device_id = device_id
        reading.record_ts = record_ts
        reading.record_time = record_time
        # The class's own alternate constructor: it fills the private slots __init__ would.
        reading._data = None  # noqa: SLF001
        reading._json = data_json  # noqa: SLF001
        reading.received_at = received_at
        reading.hold_until = 0.0
        return reading

    @property
    def data(self) -> dict[str, str]:
        """Data point name -> value as exact decimal text."""
        if self._data is None:
            self._data = orjson.loads(self._json or b"{}")
        return self._data

    @property
    def data_json(self) -> bytes:
        """The points as compact JSON text: ``{"Ua":"226.1",...}``."""
        if self._json is None:
            self._json = compact_json(self._data)
        return self._json

    def _key(self) -> tuple[object, ...]:
        return (
            self.device_type,
            self.device_id,
            self.record_ts,
            self.record_time,
            self.data,
            self.received_at,
        )

    def __eq__(self, other: object) -> bool:
        """Equal when every field and every point are equal."""
        if not isinstance(other, Reading):
            return NotImplemented
        return self._key() == other._key()

    __hash__ = None  # type: ignore[assignment]  # mutable, like the dataclass it replaces

    def __repr__(self) -> str:
        """``Reading('1', 'meter-1', 1631097600, '2021-09-08 18:40:00', {...}, 1000.0)``."""
        return (
            f"Reading({self.device_type!r}, {self.device_id!r}, {self.record_ts!r},"
            f" {self.record_time!r}, {self.data!r}, {self.received_at!r})"
        )


@dataclass(slots=True)
class SpooledReading:
    """A reading as stored in the spool, with its row id (``rid``)."""

    rid: int
    reading: Reading


class BatchKey(NamedTuple):
    """How readings are partitioned into requests: one device type, one recordTime window.

    For the types whose entries carry no deviceId (15, 16), also one source: readings of two
    sources at the same recordTime would otherwise merge into one entry. A named tuple, not a
    frozen dataclass: it is made and hashed for every reading the batcher takes, and a tuple's
    construction, hash and equality run in C.
    """

    device_type: str
    window: int  # record_ts // batch.window_secs
    source: str | None = None


def serialize_entry(device_id: str | None, record_time: str, data_json: bytes) -> bytes:
    """One ``devices[]`` entry as JSON bytes (deviceId omitted when ``None``).

    ``data_json`` is the points' JSON text, spliced in as it is (it was serialized once).
    """
    if device_id is None:
        return b'{"recordTime":%b,"data":%b}' % (orjson.dumps(record_time), data_json)
    return b'{"deviceId":%b,"recordTime":%b,"data":%b}' % (
        orjson.dumps(device_id),
        orjson.dumps(record_time),
        data_json,
    )


def build_body(device_type: str, entries: list[bytes]) -> bytes:
    """The request body for ``entries``: ``{"deviceType": ..., "devices": [...]}``."""
    return b"".join(
        (b'{"deviceType":', orjson.dumps(device_type), b',"devices":[', b",".join(entries), b"]}")
    )


@dataclass(slots=True)
class Batch:
    """A request body ready to sign and send, and the spool rows it carries.

    Attributes:
        key: the partition the batch belongs to.
        body: the exact JSON bytes to send (serialized once).
        entries: one serialized ``devices[]`` entry per merged (deviceId, recordTime).
        entry_rids: for each entry, the spool row ids merged into it.
        entry_received: for each entry, when each of its readings arrived (same order).
    """

    key: BatchKey
    body: bytes
    entries: list[bytes]
    entry_rids: list[list[int]]
    entry_received: list[list[float]]

    @classmethod
    def of(
        cls, key: BatchKey, entries: list[bytes], rids: list[list[int]], received: list[list[float]]
    ) -> Batch:
        """A batch of serialized entries, with the body they make."""
        return cls(key, build_body(key.device_type, entries), entries, rids, received)

    @property
    def rids(self) -> list[int]:
        """Every spool row id in the batch."""
        return [rid for group in self.entry_rids for rid in group]

    @property
    def received_ats(self) -> list[float]:
        """When each reading of the batch arrived (one per row id, same order)."""
        return [t for group in self.entry_received for t in group]

    @property
    def size(self) -> int:
        """Number of ``devices[]`` entries."""
        return len(self.entries)

    def slice(self, start: int, stop: int) -> Batch:
        """The entries ``start:stop`` as a batch of their own (to isolate a refused entry)."""
        return Batch.of(
            self.key,
            self.entries[start:stop],
            self.entry_rids[start:stop],
            self.entry_received[start:stop],
        )
