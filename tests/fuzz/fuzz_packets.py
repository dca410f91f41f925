"""Differential fuzzing of the MQTT edge's own PUBLISH reader against paho (atheris).

Coverage-guided: any bytes either decode to what paho decodes, or are refused by both (or by
ours alone, for what we leave to paho); ours never raises anything but MalformedPacket.

    .venv/bin/python tests/fuzz/fuzz_packets.py tests/fuzz/corpus/packets -max_total_time=600
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports():
    from paho.mqtt._packet import decode_publish
    from paho.mqtt.enums import MQTTProtocolVersion

    from bridge.intake.packets import MalformedPacket, fixed_header, parse_publish


def check(data: bytes) -> None:
    """One input: the first byte picks the protocol, the rest is the packet."""
    if not data:
        return
    v5 = bool(data[0] & 1)
    packet = data[1:]
    try:
        header = fixed_header(packet, 0)
    except MalformedPacket:
        return
    if header is None:
        return
    first, length, header_length = header
    end = min(len(packet), header_length + length)
    try:
        ours = parse_publish(packet, 0, end, v5=v5)
    except MalformedPacket:
        return
    try:
        theirs = decode_publish(
            first,
            packet[header_length:end],
            MQTTProtocolVersion.MQTTv5 if v5 else MQTTProtocolVersion.MQTTv311,
        )
    except Exception:  # paho refuses more (empty v3 topics, bad UTF-8 in properties)
        return
    mine = (ours.topic, ours.payload, ours.mid, ours.qos, ours.dup, ours.retain)
    reference = (
        bytes(theirs.topic),
        bytes(theirs.payload),
        theirs.mid,
        theirs.qos,
        theirs.dup,
        theirs.retain,
    )
    if mine != reference:
        raise AssertionError(f"ours {mine!r} != paho {reference!r}")


def main() -> None:
    """Run libFuzzer over :func:`check` with the command line's options."""
    atheris.Setup(sys.argv, check)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
