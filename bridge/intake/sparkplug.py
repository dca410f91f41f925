"""Sparkplug B: the protobuf payload read without generated code, and the alias tables.

Sparkplug B (Eclipse Tahu, ``sparkplug_b.proto``) publishes ``spBv1.0/<group>/<type>/<edge>[/
<device>]`` with a protobuf ``Payload``: a timestamp, a sequence number and metrics, each with a
name (in births), an alias (in births and data), a timestamp, a data type and one value. Only
the fields a reading needs are decoded, straight from the wire format (varints, fixed32/64 and
length-delimited fields; unknown fields skipped as protobuf requires), so no protobuf runtime or
generated module is needed. Values are rendered as exact decimal text:

* Int8/16/32 arrive as ``uint32`` and Int64 as ``uint64``; they are read at their declared
  width and sign (an Int32 of -1500 is 4294965796 on the wire, and -1500 here; Tahu's Python
  writes an Int8 of -1 as 255, its Java as 4294967295: both give -1);
* Float is a 32-bit float: written as the shortest text that reads back as the same 32-bit
  value (229.3, not 229.3000030517578); Double as the shortest for 64 bits;
* booleans, strings, dates, bytes, data sets, templates and null metrics carry no number and
  are left out.

:class:`AliasTables` keeps, per edge node, alias -> (metric name, data type) from NBIRTH and
DBIRTH; a new NBIRTH resets the node's table. It is state the mapping needs, so its changes are
handed to the spool with the messages that made them (and loaded back at start).
"""

from __future__ import annotations

import contextlib
import math
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from decimal import Decimal
from enum import IntEnum
from typing import Final

__all__ = [
    "NAMESPACE",
    "REBIRTH_METRIC",
    "AliasTables",
    "DataType",
    "Metric",
    "Payload",
    "SparkplugError",
    "Topic",
    "decode_payload",
    "encode_rebirth",
    "metric_text",
    "parse_topic",
]

NAMESPACE: Final = "spBv1.0"
REBIRTH_METRIC: Final = "Node Control/Rebirth"


class SparkplugError(ValueError):
    """The topic or payload is not Sparkplug B (a reason for a dead letter)."""


class DataType(IntEnum):
    """Sparkplug B metric data types (``sparkplug_b.proto``, enum DataType)."""

    UNKNOWN = 0
    INT8 = 1
    INT16 = 2
    INT32 = 3
    INT64 = 4
    UINT8 = 5
    UINT16 = 6
    UINT32 = 7
    UINT64 = 8
    FLOAT = 9
    DOUBLE = 10
    BOOLEAN = 11
    STRING = 12
    DATETIME = 13
    TEXT = 14


_SIGNED_BITS: Final = {DataType.INT8: 8, DataType.INT16: 16, DataType.INT32: 32, DataType.INT64: 64}
_UNSIGNED_BITS: Final = {
    DataType.UINT8: 8,
    DataType.UINT16: 16,
    DataType.UINT32: 32,
    DataType.UINT64: 64,
}


@dataclass(slots=True, frozen=True)
class Topic:
    """A Sparkplug topic: ``spBv1.0/<group>/<kind>/<edge>[/<device>]``."""

    group: str
    kind: str
    edge: str
    device: str | None

    @property
    def device_id(self) -> str:
        """The deviceId readings get: ``<edge>/<device>``, or ``<edge>`` for the node itself."""
        return self.edge if self.device is None else f"{self.edge}/{self.device}"


def parse_topic(topic: str) -> Topic:
    """Split a Sparkplug B topic.

    Raises:
        SparkplugError: not a ``spBv1.0`` topic with a message type and an edge node.
    """
    levels = topic.split("/")
    if len(levels) not in {4, 5} or levels[0] != NAMESPACE or not all(levels[1:]):
        raise SparkplugError(f"not a Sparkplug B topic: {topic[:120]!r}")
    return Topic(levels[1], levels[2], levels[3], levels[4] if len(levels) == 5 else None)


@dataclass(slots=True)
class Metric:
    """One metric as it was on the wire (``value`` is the raw field, ``None`` when absent)."""

    name: str | None = None
    alias: int | None = None
    timestamp: int | None = None
    datatype: int | None = None
    is_null: bool = False
    value: int | float | bool | str | bytes | None = None
    wire: int = -1
    """The field number the value came in (10 int, 11 long, 12 float, 13 double ...)."""
    raw: bytes = b""
    """The 4 or 8 bytes of a float or double value, as sent (for exact rendering)."""


@dataclass(slots=True)
class Payload:
    """A Sparkplug B payload: timestamp (ms), sequence number and metrics."""

    timestamp: int | None = None
    seq: int | None = None
    metrics: list[Metric] = field(default_factory=list)


# -- the protobuf wire format -------------------------------------------------------------------


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    value = 0
    shift = 0
    while True:
        if pos >= len(buf):
            raise SparkplugError("payload ends inside a varint")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value & 0xFFFFFFFFFFFFFFFF, pos
        shift += 7
        if shift >= 70:
            raise SparkplugError("varint longer than 10 bytes")


def _fields(buf: bytes) -> Iterable[tuple[int, int, int | bytes]]:
    """(field number, wire type, value) of each field; varints as int, the rest as bytes."""
    pos = 0
    end = len(buf)
    while pos < end:
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise SparkplugError("field number 0")
        if wire == 0:
            value, pos = _varint(buf, pos)
            yield number, wire, value
        elif wire == 1:
            if pos + 8 > end:
                raise SparkplugError("payload ends inside a 64-bit field")
            yield number, wire, buf[pos : pos + 8]
            pos += 8
        elif wire == 2:
            length, pos = _varint(buf, pos)
            if pos + length > end:
                raise SparkplugError("a length-delimited field runs past the payload")
            yield number, wire, buf[pos : pos + length]
            pos += length
        elif wire == 5:
            if pos + 4 > end:
                raise SparkplugError("payload ends inside a 32-bit field")
            yield number, wire, buf[pos : pos + 4]
            pos += 4
        else:
            raise SparkplugError(f"wire type {wire} is not protobuf 3")


def _metric(buf: bytes) -> Metric:
    metric = Metric()
    for number, wire, value in _fields(buf):
        if number == 1 and wire == 2 and isinstance(value, bytes):
            metric.name = _text(value)
        elif number == 2 and wire == 0 and isinstance(value, int):
            metric.alias = value
        elif number == 3 and wire == 0 and isinstance(value, int):
            metric.timestamp = value
        elif number == 4 and wire == 0 and isinstance(value, int):
            metric.datatype = value
        elif number == 7 and wire == 0 and isinstance(value, int):
            metric.is_null = bool(value)
        elif number in {10, 11} and wire == 0 and isinstance(value, int):
            metric.value, metric.wire = value, number
        elif number == 12 and wire == 5 and isinstance(value, bytes):
            metric.value, metric.wire, metric.raw = struct.unpack("<f", value)[0], number, value
        elif number == 13 and wire == 1 and isinstance(value, bytes):
            metric.value, metric.wire, metric.raw = struct.unpack("<d", value)[0], number, value
        elif number == 14 and wire == 0 and isinstance(value, int):
            metric.value, metric.wire = bool(value), number
        elif number == 15 and wire == 2 and isinstance(value, bytes):
            metric.value, metric.wire = _text(value), number
        elif number >= 16:
            metric.wire = number  # bytes, data set, template, extension: no number
    return metric


def _text(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SparkplugError(f"a string is not UTF-8 ({exc.reason})") from None


def decode_payload(buf: bytes) -> Payload:
    """Decode a Sparkplug B ``Payload``.

    Raises:
        SparkplugError: the bytes are not a protobuf message of that shape.
    """
    payload = Payload()
    for number, wire, value in _fields(buf):
        if number == 1 and wire == 0 and isinstance(value, int):
            payload.timestamp = value
        elif number == 2 and wire == 2 and isinstance(value, bytes):
            payload.metrics.append(_metric(value))
        elif number == 3 and wire == 0 and isinstance(value, int):
            payload.seq = value
    return payload


def _put_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def encode_rebirth(timestamp_ms: int) -> bytes:
    """The NCMD payload that asks an edge node to publish its births again."""
    name = REBIRTH_METRIC.encode()
    metric = (
        b"\x0a"
        + _put_varint(len(name))
        + name
        + b"\x18"
        + _put_varint(timestamp_ms)
        + b"\x20"
        + _put_varint(DataType.BOOLEAN)
        + b"\x70\x01"
    )
    return b"\x08" + _put_varint(timestamp_ms) + b"\x12" + _put_varint(len(metric)) + metric


# -- values ---------------------------------------------------------------------------------------


def _plain(text: str) -> str:
    """``1e-05`` -> ``0.00001``: values are sent in plain decimal notation."""
    if "e" in text or "E" in text:
        return format(Decimal(text), "f")
    return text


def _float32_text(raw: bytes) -> str | None:
    value = struct.unpack("<f", raw)[0]
    if not math.isfinite(value):
        return None
    for digits in range(1, 10):
        text = f"{value:.{digits}g}"
        with contextlib.suppress(OverflowError):  # rounded up past the largest float32
            if struct.pack("<f", float(text)) == raw:
                return _plain(text)
    return _plain(repr(value))  # pragma: no cover - 9 significant digits always round-trip


def metric_text(metric: Metric, datatype: int | None) -> str | None:
    """The metric's value as exact decimal text, or ``None`` when it carries no number.

    Args:
        metric: the decoded metric.
        datatype: its data type (from the metric, else from the birth that defined its alias).
    """
    if metric.is_null or metric.value is None:
        return None
    value = metric.value
    if metric.wire in {10, 11} and isinstance(value, int) and not isinstance(value, bool):
        if datatype in _SIGNED_BITS:
            bits = _SIGNED_BITS[DataType(datatype)]
            value &= (1 << bits) - 1
            if value >= 1 << (bits - 1):
                value -= 1 << bits
            return str(value)
        if datatype in _UNSIGNED_BITS:
            return str(value & ((1 << _UNSIGNED_BITS[DataType(datatype)]) - 1))
        if datatype in {None, DataType.UNKNOWN}:
            return str(value)
        return None  # a DateTime or another type carried as an integer
    if metric.wire == 12:
        return _float32_text(metric.raw)
    if metric.wire == 13 and isinstance(value, float):
        return _plain(repr(value)) if math.isfinite(value) else None
    return None


# -- aliases ----------------------------------------------------------------------------------


@dataclass(slots=True, frozen=True)
class AliasChange:
    """One change to an edge node's alias table: an entry, or a reset (``alias`` None)."""

    edge: str
    alias: int | None
    name: str = ""
    datatype: int = 0


class AliasTables:
    """alias -> (name, datatype) per edge node (``group/edge``), from the node's births."""

    def __init__(self) -> None:
        self._tables: dict[str, dict[int, tuple[str, int]]] = {}

    def load(self, changes: Iterable[AliasChange]) -> None:
        """Apply stored changes (at start), in order."""
        for change in changes:
            self._apply(change)

    def birth(self, edge: str, payload: Payload, *, node: bool) -> list[AliasChange]:
        """Learn a birth's aliases; an NBIRTH first forgets the node's table.

        Returns:
            The changes made (for the spool to keep).
        """
        changes = [AliasChange(edge, None)] if node else []
        for metric in payload.metrics:
            if metric.alias is not None and metric.name:
                changes.append(AliasChange(edge, metric.alias, metric.name, metric.datatype or 0))
        for change in changes:
            self._apply(change)
        return changes

    def resolve(self, edge: str, metric: Metric) -> tuple[str, int | None] | None:
        """The metric's name and data type, from itself or its alias; ``None`` if unknown."""
        if metric.name:
            return metric.name, metric.datatype
        if metric.alias is None:
            return None
        known = self._tables.get(edge, {}).get(metric.alias)
        if known is None:
            return None
        return known[0], metric.datatype if metric.datatype else known[1]

    def knows(self, edge: str) -> bool:
        """Whether a birth of the edge node has been seen."""
        return edge in self._tables

    def _apply(self, change: AliasChange) -> None:
        if change.alias is None:
            self._tables[change.edge] = {}
        else:
            self._tables.setdefault(change.edge, {})[change.alias] = (change.name, change.datatype)
