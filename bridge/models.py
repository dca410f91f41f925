"""The bridge's own value types: the only types that cross from one stage to the next.

Plain slotted classes on purpose: they are created once per message on the hot path, where
pydantic validation would cost more than the rest of the pipeline together.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["Batch", "BatchKey", "Inbound", "Reading", "SpooledReading"]


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
    """

    topic: bytes
    payload: bytes
    received_at: float
    mid: int = 0
    qos: int = 0
    dup: bool = False


@dataclass(slots=True)
class Reading:
    """One device's values at one moment, ready for the push API.

    Attributes:
        device_type: Energy Expert device type code, as a string (``"1"`` for electric meters).
        device_id: the device id (system_id for types 12/13/17), ``None`` for types 15/16.
        record_ts: the reading's time, epoch seconds (UTC).
        record_time: ``record_ts`` in the configured timezone as ``YYYY-MM-DD HH:MM:SS``.
        data: data point name -> value as exact decimal text.
        received_at: when the message carrying it arrived, epoch seconds.
    """

    device_type: str
    device_id: str | None
    record_ts: int
    record_time: str
    data: dict[str, str]
    received_at: float


@dataclass(slots=True)
class SpooledReading:
    """A reading as stored in the spool, with its row id (``rid``)."""

    rid: int
    reading: Reading


@dataclass(slots=True, frozen=True)
class BatchKey:
    """How readings are partitioned into requests: one device type, one recordTime window."""

    device_type: str
    window: int  # record_ts // batch.window_secs


@dataclass(slots=True)
class Batch:
    """A request body ready to sign and send, and the spool rows it carries.

    Attributes:
        key: the partition the batch belongs to.
        body: the exact JSON bytes to send (serialized once).
        entries: one serialized ``devices[]`` entry per merged (deviceId, recordTime).
        entry_rids: for each entry, the spool row ids merged into it.
        oldest_received: the earliest ``received_at`` among its readings.
    """

    key: BatchKey
    body: bytes
    entries: list[bytes]
    entry_rids: list[list[int]]
    oldest_received: float
    attempts: int = 0
    received_ats: list[float] = field(default_factory=list)

    @property
    def rids(self) -> list[int]:
        """Every spool row id in the batch."""
        return [rid for group in self.entry_rids for rid in group]

    @property
    def size(self) -> int:
        """Number of ``devices[]`` entries."""
        return len(self.entries)
