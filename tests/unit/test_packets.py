"""The MQTT edge's own PUBLISH reader, against paho's decoder and encoder as the reference."""

from __future__ import annotations

import contextlib
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from paho.mqtt._packet import decode_publish  # paho's own decoder: the reference
from paho.mqtt.enums import MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from bridge.intake.packets import MalformedPacket, fixed_header, parse_publish, pubacks


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _publish(
    topic: bytes,
    payload: bytes,
    *,
    qos: int = 1,
    mid: int = 7,
    dup: bool = False,
    retain: bool = False,
    properties: Properties | None = None,
    v5: bool = True,
) -> bytes:
    """A PUBLISH packet, its properties packed by paho."""
    variable = struct.pack("!H", len(topic)) + topic
    if qos:
        variable += struct.pack("!H", mid)
    if v5:
        props = properties if properties is not None else Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        variable += props.pack()  # type: ignore[no-untyped-call]
    body = variable + payload
    first = 0x30 | (0x08 if dup else 0) | (qos << 1) | (0x01 if retain else 0)
    return bytes([first]) + _varint(len(body)) + body


def _paho(packet: bytes, *, v5: bool) -> tuple[bytes, bytes, int, int, bool, bool]:
    first, _, header = fixed_header(packet, 0) or (0, 0, 0)
    result = decode_publish(
        first,
        packet[header:],
        MQTTProtocolVersion.MQTTv5 if v5 else MQTTProtocolVersion.MQTTv311,
    )
    return (
        bytes(result.topic),
        bytes(result.payload),
        result.mid,
        result.qos,
        result.dup,
        result.retain,
    )


def _ours(packet: bytes, *, v5: bool) -> tuple[bytes, bytes, int, int, bool, bool]:
    msg = parse_publish(packet, 0, len(packet), v5=v5)
    return msg.topic, msg.payload, msg.mid, msg.qos, msg.dup, msg.retain


# MQTT UTF-8 strings: no NUL, no surrogates (paho refuses to read them back).
_TEXT = st.characters(blacklist_categories=["Cs"], blacklist_characters="\x00")

_PROPERTY_SETTERS = {
    "PayloadFormatIndicator": st.integers(0, 1),
    "MessageExpiryInterval": st.integers(0, 2**32 - 1),
    "ContentType": st.text(_TEXT, max_size=20),
    "ResponseTopic": st.text(_TEXT, min_size=1, max_size=20),
    "CorrelationData": st.binary(max_size=20),
    "SubscriptionIdentifier": st.lists(st.integers(1, 2**28 - 1), min_size=1, max_size=3),
    "UserProperty": st.lists(
        st.tuples(st.text(_TEXT, max_size=8), st.text(_TEXT, max_size=8)), max_size=3
    ),
}


@st.composite
def _properties(draw: st.DrawFn) -> Properties:
    props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    for name in draw(st.sets(st.sampled_from(sorted(_PROPERTY_SETTERS)))):
        setattr(props, name, draw(_PROPERTY_SETTERS[name]))
    return props


@settings(max_examples=400, deadline=None)
@given(
    topic=st.binary(min_size=1, max_size=300),
    payload=st.binary(max_size=3000),
    qos=st.integers(0, 1),
    mid=st.integers(1, 65535),
    dup=st.booleans(),
    retain=st.booleans(),
    v5=st.booleans(),
    properties=_properties(),
)
def test_packets_publish_decodes_like_paho(
    topic: bytes,
    payload: bytes,
    qos: int,
    mid: int,
    dup: bool,
    retain: bool,
    v5: bool,
    properties: Properties,
) -> None:
    """Test that every well-formed QoS 0/1 PUBLISH decodes exactly as paho decodes it.

    Every well-formed QoS 0/1 PUBLISH, v3.1.1 or v5 with any properties (packed by
    paho), decodes to the same topic, payload, packet id and flags as paho's own decoder.
    """
    packet = _publish(
        topic, payload, qos=qos, mid=mid, dup=dup, retain=retain, properties=properties, v5=v5
    )

    assert _paho(packet, v5=v5) == _ours(packet, v5=v5)


def test_packets_topic_alias_is_reported() -> None:
    """Test that a v5 Topic Alias property is found.

    A v5 Topic Alias property is found (the bridge never allows one, so a packet
    carrying it is not taken for an empty topic).
    """
    props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    props.TopicAlias = 3
    props.UserProperty = [("a", "b")]

    packet = _publish(b"", b"x", properties=props)
    msg = parse_publish(packet, 0, len(packet), v5=True)

    assert (b"", 3) == (msg.topic, msg.topic_alias)


@given(
    packets=st.lists(
        st.tuples(st.binary(min_size=1, max_size=50), st.binary(max_size=300)), max_size=20
    ),
    others=st.lists(
        st.sampled_from([b"\xd0\x00", b"\x90\x03\x00\x01\x01", b"\x20\x03\x00\x00\x00"])
    ),
)
def test_packets_fixed_headers_frame_a_stream(
    packets: list[tuple[bytes, bytes]], others: list[bytes]
) -> None:
    """Test that walking fixed headers finds each packet's boundary exactly.

    Walking fixed headers over a stream of packets (PUBLISH mixed with PINGRESP,
    SUBACK, CONNACK) finds each packet's boundary exactly, and nothing past a cut.
    """
    frames = [_publish(t, p) for t, p in packets] + others
    stream = b"".join(frames)
    found = []
    pos = 0
    while (header := fixed_header(stream, pos)) is not None:
        _, length, header_length = header
        found.append(stream[pos : pos + header_length + length])
        pos += header_length + length
        if pos >= len(stream):
            break

    assert frames == found
    assert fixed_header(stream[:1], 0) is None


@pytest.mark.parametrize(
    "packet",
    [
        b"\x30\x05\x00\x09abc",  # topic longer than the packet
        b"\x32\x05\x00\x01a\x00",  # packet id cut short
        b"\x32\x05\x00\x01a\x00\x00",  # packet id 0 with QoS 1 (and the length is wrong)
        b"\x32\x06\x00\x01a\x00\x00x",  # packet id 0 with QoS 1
        b"\x30\x04\x00\x01a\x05",  # v5: properties longer than the packet
        b"\x30\x05\x00\x01a\x01\x99",  # v5: a property not allowed in a PUBLISH
        b"\x34\x04\x00\x01ab",  # QoS 2
        b"\x20\x02\x00\x00",  # not a PUBLISH
    ],
)
def test_packets_malformed_publish_is_refused(packet: bytes) -> None:
    """Test that a malformed PUBLISH raises MalformedPacket, never anything else.

    A PUBLISH that is cut short, lies about its parts or is not QoS 0/1 raises
    MalformedPacket (the connection is then closed by paho), never anything else.
    """
    with pytest.raises(MalformedPacket):
        parse_publish(packet, 0, len(packet), v5=True)


def test_packets_remaining_length_over_four_bytes_is_malformed() -> None:
    """Test that a remaining length of more than 4 bytes is refused."""
    with pytest.raises(MalformedPacket):
        fixed_header(b"\x30\xff\xff\xff\xff\x01", 0)


@given(data=st.binary(max_size=200), v5=st.booleans())
def test_packets_any_bytes_parse_or_are_malformed(data: bytes, v5: bool) -> None:
    """Test that any bytes either decode or raise MalformedPacket; nothing else escapes."""
    with contextlib.suppress(MalformedPacket):
        parse_publish(data, 0, len(data), v5=v5)


def test_packets_pubacks_are_paho_pubacks_in_order() -> None:
    """Test that the bulk PUBACKs are byte for byte the packets paho sends, in order."""
    mids = [1, 258, 65535]

    assert b"".join(struct.pack("!BBH", 0x40, 2, mid) for mid in mids) == pubacks(mids)
