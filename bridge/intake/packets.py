"""MQTT PUBLISH packets read straight from the socket's bytes, and PUBACKs written in bulk.

At thousands of messages a second, paho's per-packet Python (three reads per packet, a state
dict, v5 Properties objects, an MQTTMessage, a callback under a lock) was the largest share of
the bridge's CPU. The MQTT edge therefore cuts the received bytes into packets itself, decodes
QoS 0/1 PUBLISH packets here, and hands every other packet (CONNACK, SUBACK, PINGRESP,
DISCONNECT, and anything unusual) to paho, which still speaks the session.

Layouts (MQTT 3.1.1 section 3.3, MQTT 5.0 section 3.3)::

    fixed header   0x3 | DUP<<3 | QoS<<1 | RETAIN,  remaining length (1-4 byte varint)
    variable       topic (u16 length + bytes), packet id (u16, QoS > 0 only),
                   v5 only: properties (varint length + properties)
    payload        the rest

Nothing here allocates more than the packet it returns; every function is pure and fuzzed
(``tests/fuzz/fuzz_packets.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

__all__ = [
    "PUBLISH",
    "MalformedPacket",
    "Publish",
    "fixed_header",
    "parse_publish",
    "pubacks",
]

PUBLISH: Final = 0x30
_TOPIC_ALIAS: Final = 0x23


class MalformedPacket(ValueError):
    """The bytes are not a packet of the protocol: the connection must be closed."""


@dataclass(slots=True)
class Publish:
    """A decoded PUBLISH packet.

    Attributes:
        topic: the topic name as raw bytes (empty when a topic alias stands for it).
        payload: the application message.
        mid: the packet id, 0 for QoS 0.
        qos: 0 or 1 (2 is left to paho).
        dup: the DUP flag.
        retain: the RETAIN flag.
        topic_alias: the v5 Topic Alias property, when present (we never allow one).
    """

    topic: bytes
    payload: bytes
    mid: int
    qos: int
    dup: bool
    retain: bool
    topic_alias: int | None = None


def fixed_header(buf: bytes | bytearray, pos: int) -> tuple[int, int, int] | None:
    """The fixed header of the packet at ``buf[pos:]``.

    Returns:
        ``(first byte, remaining length, header length)``, or ``None`` when the header is not
        all there yet.

    Raises:
        MalformedPacket: the remaining length runs over its 4 bytes.
    """
    end = len(buf)
    if pos + 1 >= end:
        return None
    first = buf[pos]
    value = 0
    shift = 0
    i = pos + 1
    while True:
        if i >= end:
            return None
        byte = buf[i]
        value |= (byte & 0x7F) << shift
        i += 1
        if not byte & 0x80:
            return first, value, i - pos
        shift += 7
        if shift >= 28:
            raise MalformedPacket("remaining length longer than 4 bytes")


def _varint(buf: bytes | bytearray, pos: int, end: int) -> tuple[int, int]:
    """A variable byte integer at ``pos``; returns (value, position after it)."""
    value = 0
    shift = 0
    while True:
        if pos >= end:
            raise MalformedPacket("variable byte integer runs past the packet")
        byte = buf[pos]
        value |= (byte & 0x7F) << shift
        pos += 1
        if not byte & 0x80:
            return value, pos
        shift += 7
        if shift >= 28:
            raise MalformedPacket("variable byte integer longer than 4 bytes")


def parse_publish(buf: bytes | bytearray, start: int, end: int, *, v5: bool) -> Publish:
    """Decode the PUBLISH packet whose fixed header starts at ``start`` and that ends at ``end``.

    Args:
        buf: the received bytes.
        start: where the packet starts (its first byte).
        end: where it ends (exclusive).
        v5: the connection speaks MQTT 5 (the packet has properties).

    Raises:
        MalformedPacket: the packet is not a well-formed PUBLISH with QoS 0 or 1.
    """
    if not 0 <= start < end <= len(buf):
        raise MalformedPacket("no packet in the given range")
    first = buf[start]
    if first & 0xF0 != PUBLISH:
        raise MalformedPacket(f"not a PUBLISH packet (type {first >> 4})")
    qos = (first >> 1) & 0x03
    if qos > 1:
        raise MalformedPacket(f"QoS {qos} is not read here")
    header = fixed_header(buf, start)
    if header is None or start + header[2] + header[1] != end:
        raise MalformedPacket("the packet's length does not match its header")
    pos = start + header[2]
    if pos + 2 > end:
        raise MalformedPacket("topic length runs past the packet")
    topic_end = pos + 2 + ((buf[pos] << 8) | buf[pos + 1])
    if topic_end > end:
        raise MalformedPacket("topic runs past the packet")
    topic = bytes(buf[pos + 2 : topic_end])
    pos = topic_end
    mid = 0
    if qos:
        if pos + 2 > end:
            raise MalformedPacket("packet id runs past the packet")
        mid = (buf[pos] << 8) | buf[pos + 1]
        if mid == 0:
            raise MalformedPacket("packet id 0 with QoS 1")
        pos += 2
    alias = None
    if v5:
        length, pos = _varint(buf, pos, end)
        props_end = pos + length
        if props_end > end:
            raise MalformedPacket("properties run past the packet")
        if length:
            alias = _topic_alias(buf, pos, props_end)
        pos = props_end
    return Publish(
        topic, bytes(buf[pos:end]), mid, qos, bool(first & 0x08), bool(first & 0x01), alias
    )


# Property identifier -> size of its value (0: variable byte integer, -1: u16-prefixed data,
# -2: a pair of u16-prefixed strings), for the properties a PUBLISH may carry (MQTT 5, 2.2.2.2).
_PUBLISH_PROPERTIES: Final = {
    0x01: 1,  # Payload Format Indicator
    0x02: 4,  # Message Expiry Interval
    0x03: -1,  # Content Type
    0x08: -1,  # Response Topic
    0x09: -1,  # Correlation Data
    0x0B: 0,  # Subscription Identifier
    0x23: 2,  # Topic Alias
    0x26: -2,  # User Property
}


def _topic_alias(buf: bytes | bytearray, pos: int, end: int) -> int | None:
    """Walk the properties; returns the Topic Alias if one is there."""
    alias = None
    while pos < end:
        ident = buf[pos]
        pos += 1
        size = _PUBLISH_PROPERTIES.get(ident)
        if size is None:
            raise MalformedPacket(f"property 0x{ident:02x} is not allowed in a PUBLISH")
        if size == 0:
            _, pos = _varint(buf, pos, end)
        elif size > 0:
            if pos + size > end:
                raise MalformedPacket("property runs past the properties")
            if ident == _TOPIC_ALIAS:
                alias = (buf[pos] << 8) | buf[pos + 1]
            pos += size
        else:
            for _ in range(-size):
                if pos + 2 > end:
                    raise MalformedPacket("property runs past the properties")
                pos += 2 + ((buf[pos] << 8) | buf[pos + 1])
            if pos > end:
                raise MalformedPacket("property runs past the properties")
    return alias


def pubacks(mids: list[int]) -> bytes:
    """PUBACK packets for ``mids``, in order, as one block of bytes.

    All say success: the v5 reason code and properties may then be left out, which makes the
    packet the same as in 3.1.1.
    """
    return b"".join([b"\x40\x02" + mid.to_bytes(2, "big") for mid in mids])
