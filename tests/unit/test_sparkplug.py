"""Sparkplug B decoding against captured-shape vectors and the official protobuf runtime.

The vectors S1-S4 are payloads written for this project (topic and metric names invented;
Sparkplug has no standard names for meter quantities), checked by decoding them with Eclipse
Tahu's ``sparkplug_b.proto`` through protoc's Python output (tests/data/sparkplug/README.md).
The property tests build payloads with Google's protobuf runtime from a schema declared with
the proto's field numbers and types (tests/support/sparkplug.py), so the reader is checked
against an independent writer.
"""

from __future__ import annotations

import contextlib
import struct
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bridge.intake.sparkplug import (
    REBIRTH_METRIC,
    AliasTables,
    DataType,
    SparkplugError,
    decode_payload,
    encode_rebirth,
    metric_text,
    parse_topic,
)
from tests.support.sparkplug import Payload  # the reference writer: Google's protobuf runtime

S1_DBIRTH = bytes.fromhex(
    "0880b89e868032121c0a0a566f6c746167652f4c3110011880b89e86803220096500806643121e0a0b506f77"
    "65722f546f74616c10021880b89e868032200350a4f4ffff0f12230a0d456e657267792f496d706f72741003"
    "1880b89e868032200a695839b4c8d61cc84012190a0a43757272656e742f4c3210041880b89e86803220093801"
    "1801"
)
S2_DDATA_INT32 = bytes.fromhex("08e8bf9e8680321211100218e8bf9e868032200350a4f4ffff0f1802")
S3_DDATA_INT8_PYTHON = bytes.fromhex("08e8bf9e868032120e100518e8bf9e868032200150ff011803")
S4_DDATA_INT8_JAVA = bytes.fromhex("08e8bf9e8680321211100518e8bf9e868032200150ffffffff0f1803")


def test_sparkplug_vector_dbirth_decodes_names_aliases_types_and_values() -> None:
    """Test that the DBIRTH vector gives each metric's name, alias, type and exact value.

    The DBIRTH vector gives each metric's name, alias, type and exact value (the
    Float 230.5 as written, the Int32 -1500 with its sign, the null metric as no value).
    """
    payload = decode_payload(S1_DBIRTH)

    expected = [
        ("Voltage/L1", 1, DataType.FLOAT, "230.5"),
        ("Power/Total", 2, DataType.INT32, "-1500"),
        ("Energy/Import", 3, DataType.DOUBLE, "12345.678"),
        ("Current/L2", 4, DataType.FLOAT, None),
    ]
    assert (1718000000000, 1) == (payload.timestamp, payload.seq)
    assert expected == [
        (m.name, m.alias, m.datatype, metric_text(m, m.datatype)) for m in payload.metrics
    ]


def test_sparkplug_alias_only_data_resolves_through_the_birth() -> None:
    """Test that an alias-only DDATA is named and typed by the DBIRTH that defined it.

    An alias-only DDATA is named and typed by the DBIRTH that defined the alias,
    and both encoders' Int8 -1 (Tahu Python: 255, Tahu Java: 4294967295) read as -1.
    """
    tables = AliasTables()
    tables.birth("plant/node-1", decode_payload(S1_DBIRTH), node=False)
    names = []
    for raw in (S2_DDATA_INT32, S3_DDATA_INT8_PYTHON, S4_DDATA_INT8_JAVA):
        (metric,) = decode_payload(raw).metrics
        resolved = tables.resolve("plant/node-1", metric)
        names.append((resolved, metric_text(metric, resolved[1] if resolved else metric.datatype)))

    assert [(("Power/Total", 3), "-1500"), (None, "-1"), (None, "-1")] == names


def test_sparkplug_unknown_alias_is_unresolved_until_a_birth() -> None:
    """Test that an undefined alias resolves to nothing and NBIRTH forgets a node's aliases.

    An alias nobody defined resolves to nothing, and an NBIRTH forgets the node's
    aliases (a new session may reuse them for other metrics).
    """
    tables = AliasTables()
    (metric,) = decode_payload(S2_DDATA_INT32).metrics
    before = tables.resolve("g/e", metric)
    tables.birth("g/e", decode_payload(S1_DBIRTH), node=False)
    known = tables.resolve("g/e", metric)
    tables.birth("g/e", decode_payload(b""), node=True)

    assert (None, ("Power/Total", 3), None) == (before, known, tables.resolve("g/e", metric))


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("229.3", "229.3"),
        ("230.1", "230.1"),
        ("0.1", "0.1"),
        ("-40.25", "-40.25"),
        ("1e-05", "0.00001"),
        ("3.4028235e+38", "340282350000000000000000000000000000000"),
    ],
)
def test_sparkplug_float_is_the_shortest_text_of_the_32_bit_value(
    value: str, expected: str
) -> None:
    """Test that a Float metric is written as the shortest decimal of its 32-bit value.

    A Float metric is written as the shortest decimal that reads back as the same
    32-bit float (229.3 arrives as "229.3", never "229.3000030517578"), in plain notation.
    """
    message = Payload(metrics=[{"name": "P", "datatype": 9, "float_value": float(value)}])
    (metric,) = decode_payload(message.SerializeToString()).metrics

    text = metric_text(metric, metric.datatype)

    assert expected == text
    assert struct.pack("<f", float(value)) == struct.pack("<f", float(expected))


_INT_RANGES = {
    DataType.INT8: (-(2**7), 2**7 - 1, "int_value"),
    DataType.INT16: (-(2**15), 2**15 - 1, "int_value"),
    DataType.INT32: (-(2**31), 2**31 - 1, "int_value"),
    DataType.INT64: (-(2**63), 2**63 - 1, "long_value"),
    DataType.UINT8: (0, 2**8 - 1, "int_value"),
    DataType.UINT16: (0, 2**16 - 1, "int_value"),
    DataType.UINT32: (0, 2**32 - 1, "int_value"),
    DataType.UINT64: (0, 2**64 - 1, "long_value"),
}


@st.composite
def _int_metric(draw: st.DrawFn) -> tuple[dict[str, Any], str]:
    datatype = draw(st.sampled_from(sorted(_INT_RANGES)))
    low, high, field = _INT_RANGES[datatype]
    value = draw(st.integers(low, high))
    bits = 64 if field == "long_value" else 32
    wire = value & ((1 << bits) - 1)  # two's complement in the field's width (Tahu Java)
    return {"name": "x", "datatype": int(datatype), field: wire}, str(value)


@settings(max_examples=300, deadline=None)
@given(
    metrics=st.lists(_int_metric(), max_size=5),
    doubles=st.lists(st.floats(allow_nan=False, allow_infinity=False), max_size=3),
    timestamp=st.integers(0, 2**64 - 1),
)
def test_sparkplug_values_read_like_the_official_runtime_wrote_them(
    metrics: list[tuple[dict[str, Any], str]], doubles: list[float], timestamp: int
) -> None:
    """Test that payloads from Google's protobuf runtime decode to exactly what was written.

    Payloads written by Google's protobuf runtime decode to the same timestamp and,
    for every integer type and Double, exactly the value that was written.
    """
    fields = [m for m, _ in metrics] + [
        {"name": "d", "datatype": 10, "double_value": d} for d in doubles
    ]
    message = Payload(timestamp=timestamp, seq=7, metrics=fields)

    payload = decode_payload(message.SerializeToString())

    expected = [text for _, text in metrics] + [repr(d) for d in doubles]
    got = [metric_text(m, m.datatype) for m in payload.metrics]
    assert (timestamp, 7) == (payload.timestamp, payload.seq)
    assert [float(e) for e in expected] == [float(g) for g in got if g is not None]
    assert list(expected[: len(metrics)]) == got[: len(metrics)]


@pytest.mark.parametrize(
    ("fields", "why"),
    [
        ({"datatype": 11, "boolean_value": True}, "boolean"),
        ({"datatype": 12, "string_value": "on"}, "string"),
        ({"datatype": 13, "long_value": 1718000000000}, "datetime"),
        ({"datatype": 3, "is_null": True}, "null"),
    ],
)
def test_sparkplug_metrics_without_a_number_carry_no_value(
    fields: dict[str, Any], why: str
) -> None:
    """Test that booleans, strings, dates and null metrics give no value (they are left out)."""
    message = Payload(metrics=[{"name": why, **fields}])
    (metric,) = decode_payload(message.SerializeToString()).metrics

    assert metric_text(metric, metric.datatype) is None


def test_sparkplug_rebirth_request_is_what_the_runtime_reads() -> None:
    """Test that the rebirth NCMD reads as one Boolean "Node Control/Rebirth" = true.

    The NCMD payload asking for a rebirth reads, with the official runtime, as
    one Boolean metric "Node Control/Rebirth" = true.
    """
    message = Payload()
    message.ParseFromString(encode_rebirth(1718000000000))

    (metric,) = message.metrics
    assert (REBIRTH_METRIC, 11, True, 1718000000000) == (
        metric.name,
        metric.datatype,
        metric.boolean_value,
        message.timestamp,
    )


@given(data=st.binary(max_size=300))
def test_sparkplug_any_bytes_decode_or_raise_sparkplug_error(data: bytes) -> None:
    """Test that any bytes decode or raise SparkplugError, nothing else."""
    with contextlib.suppress(SparkplugError):
        for metric in decode_payload(data).metrics:
            metric_text(metric, metric.datatype)


@pytest.mark.parametrize(
    ("topic", "expected"),
    [
        ("spBv1.0/plant/DDATA/edge-1/meter-7", ("plant", "DDATA", "edge-1/meter-7")),
        ("spBv1.0/plant/NBIRTH/edge-1", ("plant", "NBIRTH", "edge-1")),
    ],
)
def test_sparkplug_topic_gives_group_kind_and_device_id(
    topic: str, expected: tuple[str, str, str]
) -> None:
    """Test that the deviceId is <edge>/<device> for device messages and <edge> for the node.

    The deviceId is <edge>/<device> for device messages and <edge> for the node's
    own, without the group.
    """
    parsed = parse_topic(topic)

    assert expected == (parsed.group, parsed.kind, parsed.device_id)


@pytest.mark.parametrize(
    "topic", ["spBv1.0/STATE/host", "spAv1.0/g/NDATA/e", "spBv1.0//NDATA/e", "x"]
)
def test_sparkplug_other_topics_are_refused(topic: str) -> None:
    """Test that a topic that is not spBv1.0/<group>/<type>/<edge>[/<device>] is refused."""
    with pytest.raises(SparkplugError):
        parse_topic(topic)
