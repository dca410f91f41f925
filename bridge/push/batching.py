"""The batcher: pure, clock injected, partitioned by :class:`~bridge.models.BatchKey`.

Readings enter in spool order. Each goes to the open batch of its (deviceType, recordTime
window); readings of the same device at the same recordTime merge into one ``devices[]`` entry
(later values win per point). A batch is closed when it reaches ``max_devices`` entries or about
``max_bytes`` of body, ``linger_secs`` after its first reading, under memory pressure, or on
shutdown. A batch holding a reading with a ``hold_until`` (a route's ``align_secs``: partial
messages of one device and aligned window merge into one entry) also waits until that time
has passed, plus ``linger_secs`` for stragglers. Closing builds every entry once, from the
points' JSON text each reading already carries (re-serialized only where readings merged);
the body is those bytes joined.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from bridge.models import (
    NO_DEVICE_ID_TYPES,
    Batch,
    BatchKey,
    Reading,
    SpooledReading,
    build_body,
    compact_json,
    serialize_entry,
)

__all__ = ["Batcher", "split_entries"]

# Bytes of JSON around the values of one entry: {"deviceId":"","recordTime":"","data":{}} etc.
_ENTRY_OVERHEAD = 48


@dataclass(slots=True)
class _Entry:
    device_id: str | None
    first: Reading
    rids: list[int]
    received_ats: list[float]
    size: int
    merged: dict[str, str] | None = None
    """The points of every reading merged so far (later values win); ``None`` while the entry
    holds one reading, whose JSON text is then sent as it is."""

    def merge(self, reading: Reading) -> None:
        if self.merged is None:
            self.merged = dict(self.first.data)
        self.merged.update(reading.data)

    def serialize(self) -> bytes:
        data_json = self.first.data_json if self.merged is None else compact_json(self.merged)
        return serialize_entry(self.device_id, self.first.record_time, data_json)


@dataclass(slots=True)
class _Open:
    key: BatchKey
    opened_at: float
    entries: dict[tuple[str | None, str], _Entry] = field(default_factory=dict)
    size: int = 0
    readings: int = 0
    hold_until: float = 0.0

    def deadline(self, linger: float) -> float:
        """When the batch is due: linger after its first reading, or after its hold."""
        return max(self.opened_at, self.hold_until) + linger


class Batcher:
    """Groups spooled readings into request-sized batches.

    Args:
        max_devices: most entries per batch.
        max_bytes: most body bytes per batch.
        window_secs: recordTime window of a partition.
        linger_secs: how long an open batch waits after its first reading.
        max_pending: readings held in open batches before the oldest batches are closed early
            (in a held batch a reading merged into an existing entry does not count).
        clock: wall-clock seconds, the scale of ``Reading.received_at`` (injected for tests).
    """

    def __init__(
        self,
        *,
        max_devices: int,
        max_bytes: int,
        window_secs: int,
        linger_secs: float,
        max_pending: int = 50_000,
        clock: Callable[[], float],
    ) -> None:
        self.max_devices = max_devices
        self.max_bytes = max_bytes
        self.window_secs = window_secs
        self.linger_secs = linger_secs
        self.max_pending = max_pending
        self.clock = clock
        """The wall clock linger is measured on (injected for tests)."""
        self._open: dict[BatchKey, _Open] = {}
        self.pending = 0

    def add(self, item: SpooledReading) -> list[Batch]:
        """Add one reading; returns the batches this closed (usually none)."""
        reading = item.reading
        no_id = reading.device_type in NO_DEVICE_ID_TYPES
        key = BatchKey(
            reading.device_type,
            reading.record_ts // self.window_secs,
            reading.device_id if no_id else None,
        )
        batch = self._open.get(key)
        if batch is None:
            # Linger counts from the first reading's arrival, not from when it reached the
            # batcher: a backlog read back from the spool goes out at once.
            batch = self._open[key] = _Open(key, min(self.clock(), reading.received_at))
        device_id = None if no_id else reading.device_id
        ekey = (device_id, reading.record_time)
        entry = batch.entries.get(ekey)
        # The points' JSON text is made once per reading (and kept: it is what is sent).
        added = len(reading.data_json)
        if entry is None:
            size = _ENTRY_OVERHEAD + len(device_id or "") + len(reading.record_time) + added
            batch.entries[ekey] = _Entry(
                device_id, reading, [item.rid], [reading.received_at], size
            )
            batch.size += size + 1
        else:
            entry.merge(reading)
            entry.rids.append(item.rid)
            entry.received_ats.append(reading.received_at)
            # An upper bound: points overwritten by the merge are counted twice.
            entry.size += added
            batch.size += added
        batch.hold_until = max(batch.hold_until, reading.hold_until)
        # A reading merged into a held entry costs a row id and a few points, not a reading's
        # memory: held windows count by entry, or partial messages of many meters would
        # pass max_pending and be closed early, half merged.
        counted = entry is None or not batch.hold_until
        batch.readings += counted
        self.pending += counted
        out: list[Batch] = []
        # A held batch is not closed when full: it is split into requests when its window
        # has closed (closing it early would send its entries half merged).
        if not batch.hold_until and (
            len(batch.entries) >= self.max_devices or batch.size >= self.max_bytes
        ):
            out.extend(self._close(key))
        if self.pending > self.max_pending:
            out.extend(self._relieve())
        return out

    def due(self) -> list[Batch]:
        """Close and return every batch whose linger time has passed."""
        now = self.clock()
        linger = self.linger_secs
        expired = [k for k, b in self._open.items() if now >= b.deadline(linger)]
        return [batch for key in expired for batch in self._close(key)]

    def next_deadline(self) -> float | None:
        """Clock time at which the next open batch becomes due, ``None`` when none is open."""
        if not self._open:
            return None
        return min(b.deadline(self.linger_secs) for b in self._open.values())

    def flush(self) -> list[Batch]:
        """Close every open batch (shutdown, or the input ran dry during a drain)."""
        return [batch for key in list(self._open) for batch in self._close(key)]

    @property
    def open_batches(self) -> int:
        """How many partitions have an open batch."""
        return len(self._open)

    def _relieve(self) -> list[Batch]:
        out: list[Batch] = []
        for key in sorted(self._open, key=lambda k: self._open[k].opened_at):
            if self.pending <= self.max_pending // 2:
                break
            out.extend(self._close(key))
        return out

    def _close(self, key: BatchKey) -> list[Batch]:
        batch = self._open.pop(key)
        self.pending -= batch.readings
        return split_entries(
            key,
            [(e.serialize(), e.rids, e.received_ats) for e in batch.entries.values()],
            self.max_bytes,
            self.max_devices,
        )


def split_entries(
    key: BatchKey,
    entries: list[tuple[bytes, list[int], list[float]]],
    max_bytes: int,
    max_devices: int | None = None,
) -> list[Batch]:
    """Pack serialized entries, in order, into batches whose body fits ``max_bytes``.

    A batch also holds at most ``max_devices`` entries, when given. An entry larger than
    ``max_bytes`` on its own still goes out, alone: it cannot be split, and the service decides
    whether it is acceptable.
    """
    head = len(build_body(key.device_type, []))
    out: list[Batch] = []
    current: list[tuple[bytes, list[int], list[float]]] = []
    size = head
    for item in entries:
        extra = len(item[0]) + (1 if current else 0)
        if current and (
            size + extra > max_bytes or (max_devices is not None and len(current) >= max_devices)
        ):
            out.append(_make_batch(key, current))
            current, size = [], head
            extra = len(item[0])
        current.append(item)
        size += extra
    if current:
        out.append(_make_batch(key, current))
    return out


def _make_batch(key: BatchKey, items: list[tuple[bytes, list[int], list[float]]]) -> Batch:
    return Batch.of(
        key,
        [entry for entry, _, _ in items],
        [rids for _, rids, _ in items],
        [received for _, _, received in items],
    )
