"""Mapping MQTT messages to readings: formats, times, precision, deviceId rules, rejects."""

from __future__ import annotations

import json
import re
from decimal import Decimal
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bridge.config import PayloadFormat, Route
from bridge.errors import ConfigError, MappingError
from bridge.intake.mapping import REASONS, Mapper, format_record_time, parse_time
from bridge.models import NO_DEVICE_ID_TYPES, Reading, serialize_entry

SHANGHAI = ZoneInfo("Asia/Shanghai")
UTC = ZoneInfo("UTC")
TOPIC = b"meters/1/meter-0001/telemetry"
NOW = 1631097600.75  # 2021-09-08 18:40:00.75 in Asia/Shanghai
VALUE_ROUTE = Route(
    topic="meters/{deviceType}/{deviceId}/points/{point}", format=PayloadFormat.VALUE
)
RECORD_TIME = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d")


def _mapper(*routes: Route, timezone: str = "Asia/Shanghai", **limits: int) -> Mapper:
    return Mapper(list(routes) or [Route()], timezone, **limits)


def _one(payload: bytes | str, topic: bytes = TOPIC, mapper: Mapper | None = None) -> Reading:
    raw = payload.encode() if isinstance(payload, str) else payload
    (reading,) = (mapper or _mapper()).map(topic, raw, NOW)
    return reading


def _reject(
    payload: bytes | str, topic: bytes = TOPIC, mapper: Mapper | None = None
) -> MappingError:
    raw = payload.encode() if isinstance(payload, str) else payload
    with pytest.raises(MappingError) as info:
        (mapper or _mapper()).map(topic, raw, NOW)
    assert info.value.reason in REASONS
    return info.value


def _value_mapper(**route: object) -> Mapper:
    return _mapper(VALUE_ROUTE.model_copy(update=route))


# --- JSON format -----------------------------------------------------------------------------


def test_json_object_maps_to_one_reading() -> None:
    """Test that a JSON object becomes one reading with topic ids, exact values and time."""
    reading = _one('{"ts": 1631097600, "Ua": 220.1, "P": "6.62", "Ep_imp": 123456.78}')

    assert (
        Reading(
            device_type="1",
            device_id="meter-0001",
            record_ts=1631097600,
            record_time="2021-09-08 18:40:00",
            data={"Ua": "220.1", "P": "6.62", "Ep_imp": "123456.78"},
            received_at=NOW,
        )
        == reading
    )


def test_json_array_maps_to_one_reading_per_object() -> None:
    """Test that a JSON array of objects becomes several readings in order (back-fill)."""
    readings = _mapper().map(
        TOPIC, b'[{"ts": 1631097600, "Ua": 1}, {"ts": 1631097660, "Ua": 2}]', NOW
    )

    expected = [("2021-09-08 18:40:00", {"Ua": "1"}), ("2021-09-08 18:41:00", {"Ua": "2"})]
    assert expected == [(r.record_time, r.data) for r in readings]


def test_json_custom_time_key_is_not_a_point() -> None:
    """Test that the route's time_key is read as the time and every other key is a point."""
    mapper = _mapper(Route(time_key="time"))

    reading = _one('{"time": 1631097600, "ts": 5}', mapper=mapper)

    expected = (1631097600, {"ts": "5"})
    assert expected == (reading.record_ts, reading.data)


def test_json_null_points_are_skipped() -> None:
    """Test that points with a null value are left out of the reading."""
    expected = {"Ub": "1"}
    assert expected == _one('{"Ua": null, "Ub": 1}').data


def test_json_non_ascii_point_names_are_kept() -> None:
    """Test that point names outside ASCII (and JSON escapes of them) pass through."""
    expected = {"电压": "1", "é": "2"}
    assert expected == _one('{"电压": 1, "\\u00e9": 2}').data


def test_json_device_id_in_payload_is_not_the_device_id() -> None:
    """Test that a deviceId key in the payload is a point, with a hint about the topic."""
    error = _reject('{"deviceId": "meter-2", "Ua": 1}')

    expected = "bad_value"
    assert expected == error.reason
    assert "taken from the topic only" in error.detail


def test_json_topic_device_type_wins_over_route_device_type() -> None:
    """Test that a {deviceType} level is used even when the route also fixes device_type."""
    mapper = _mapper(Route(device_type="2"))

    expected = "1"
    assert expected == _one('{"Ua": 1}', mapper=mapper).device_type


def test_json_first_matching_route_wins() -> None:
    """Test that routes are tried in order and the first match decides the format."""
    mapper = _mapper(
        Route(topic="meters/{deviceType}/{deviceId}/{point}", format=PayloadFormat.VALUE),
        Route(),
    )

    expected = {"telemetry": "42"}
    assert expected == _one("42", mapper=mapper).data


def test_json_subscriptions_replace_placeholders_with_plus() -> None:
    """Test that each route yields one topic filter with + for every placeholder."""
    mapper = _mapper(Route(), VALUE_ROUTE, Route(topic="site/pv/{deviceId}", device_type="12"))

    expected = [
        "meters/+/+/telemetry",
        "meters/+/+/points/+",
        "site/pv/+",
    ]
    assert expected == mapper.subscriptions


def test_json_repeated_topic_maps_the_same() -> None:
    """Test that a topic seen before (resolved from the cache) maps like the first time."""
    mapper = _mapper()

    first = _one('{"Ua": 1}', mapper=mapper)
    second = _one('{"Ua": 1}', mapper=mapper)

    assert first == second


# --- value format ----------------------------------------------------------------------------

VALUE_TOPIC = b"meters/1/meter-0001/points/Ua"


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        ("226.1", "226.1"),
        ("50.00", "50.00"),
        ('"226.1"', "226.1"),
        ("  226.1\n", "226.1"),
        (' "0.1" ', "0.1"),
        ("-3", "-3"),
        ("1E-7", "1E-7"),
    ],
)
def test_value_bare_value_keeps_its_text(payload: str, expected: str) -> None:
    """Test that a bare number or numeric string becomes the point's exact text."""
    reading = _one(payload, VALUE_TOPIC, _value_mapper())

    assert (expected, 1631097600) == (reading.data["Ua"], reading.record_ts)


def test_value_object_carries_value_and_time() -> None:
    """Test that {"value": x, "ts": t} gives the value and the time."""
    reading = _one('{"value": 226.1, "ts": 1631097600000}', VALUE_TOPIC, _value_mapper())

    expected = ({"Ua": "226.1"}, "2021-09-08 18:40:00")
    assert expected == (reading.data, reading.record_time)


def test_value_object_reads_the_routes_time_key() -> None:
    """Test that the value object's time is read under the route's time_key."""
    mapper = _value_mapper(time_key="at")

    reading = _one('{"value": 1, "at": "2021-09-08 18:40:00"}', VALUE_TOPIC, mapper)

    expected = 1631097600
    assert expected == reading.record_ts


def test_value_object_falls_back_to_ts() -> None:
    """Test that a value object with a custom time_key still accepts the time under ts."""
    mapper = _value_mapper(time_key="at")

    expected = 1631097600
    assert expected == _one('{"value": 1, "ts": 1631097600}', VALUE_TOPIC, mapper).record_ts


def test_value_object_ignores_other_keys() -> None:
    """Test that keys besides value and the time (a unit, say) are ignored."""
    reading = _one('{"value": 1, "unit": "V"}', VALUE_TOPIC, _value_mapper())

    expected = {"Ua": "1"}
    assert expected == reading.data


def test_value_object_without_value_is_rejected() -> None:
    """Test that an object without a value key is a bad value."""
    expected = "bad_value"
    assert expected == _reject('{"v": 1}', VALUE_TOPIC, _value_mapper()).reason


def test_value_null_has_no_points() -> None:
    """Test that a null value leaves nothing to send."""
    expected = "no_points"
    assert expected == _reject("null", VALUE_TOPIC, _value_mapper()).reason


def test_value_renames_and_scale_apply_to_the_topic_point() -> None:
    """Test that the point from the topic is renamed, then scaled under its new name."""
    mapper = _value_mapper(renames={"energy": "Ep_imp"}, scale={"Ep_imp": "0.001"})

    reading = _one("123456", b"meters/1/meter-0001/points/energy", mapper)

    expected = {"Ep_imp": "123.456"}
    assert expected == reading.data


def test_value_empty_point_level_is_rejected() -> None:
    """Test that an empty {point} level is a bad point."""
    expected = "bad_point"
    assert expected == _reject("1", b"meters/1/meter-0001/points/", _value_mapper()).reason


# --- time ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ts", "expected"),
    [
        ("1631097600", 1631097600),
        ("1631097600.999", 1631097600),
        ("1631097600123", 1631097600),
        ("1631097600999.9", 1631097600),
        ("1.6310976E9", 1631097600),
        ("1.631097600999e12", 1631097600),
        ('"1631097600"', 1631097600),
        ('"1631097600.5"', 1631097600),
        ('"1631097600123"', 1631097600),
        ('"2021-09-08 18:40:00"', 1631097600),
        ('"2021-09-08T18:40:00"', 1631097600),
        ('"2021-09-08T18:40:00.999"', 1631097600),
        ('"2021-09-08T10:40:00Z"', 1631097600),
        ('"2021-09-08T10:40:00+00:00"', 1631097600),
        ('"2021-09-08T10:40:00.5+00:00"', 1631097600),
        ('"2021-09-08T18:40:00+08:00"', 1631097600),
        ('"2021-09-08T18:40:00+0800"', 1631097600),
        ('"2021-09-08T18:40:00+08"', 1631097600),
        ('"2021-09-08T05:40:00-05:00"', 1631097600),
        ('"2021-09-08T10:40:00,25z"', 1631097600),
        ("null", 1631097600),
    ],
)
def test_time_forms_give_the_same_instant(ts: str, expected: int) -> None:
    """Test that every accepted time form is read as the same instant in Asia/Shanghai."""
    reading = _one(f'{{"ts": {ts}, "Ua": 1}}')

    assert (expected, "2021-09-08 18:40:00") == (reading.record_ts, reading.record_time)


def test_time_missing_uses_the_receive_time_floored() -> None:
    """Test that a payload without time gets the receive time, floored to the second."""
    reading = _one('{"Ua": 1}')

    expected = (1631097600, "2021-09-08 18:40:00")
    assert expected == (reading.record_ts, reading.record_time)


def test_time_utc_configured_formats_in_utc() -> None:
    """Test that with timezone UTC, recordTime is UTC and naive times are read as UTC."""
    mapper = _mapper(timezone="UTC")

    by_epoch = _one('{"ts": 1631097600, "Ua": 1}', mapper=mapper)
    by_naive = _one('{"ts": "2021-09-08 10:40:00", "Ua": 1}', mapper=mapper)

    expected = [(1631097600, "2021-09-08 10:40:00")] * 2
    assert expected == [(r.record_ts, r.record_time) for r in (by_epoch, by_naive)]


def test_time_offset_is_converted_to_the_configured_zone() -> None:
    """Test that an ISO time with +00:00 is converted to Asia/Shanghai for recordTime."""
    reading = _one('{"ts": "2021-09-08T00:00:00+00:00", "Ua": 1}')

    expected = "2021-09-08 08:00:00"
    assert expected == reading.record_time


def test_time_dst_ambiguous_local_time_takes_the_first() -> None:
    """Test that an ambiguous local time (DST end) is read with fold=0, the earlier instant."""
    berlin = ZoneInfo("Europe/Berlin")

    ts = parse_time("2021-10-31 02:30:00", berlin)

    expected = (1635640200, "2021-10-31 02:30:00")
    assert expected == (ts, format_record_time(ts, berlin))


def test_time_parse_accepts_python_numbers() -> None:
    """Test that parse_time takes ints and finite floats, seconds or milliseconds."""
    expected = [1631097600] * 3
    assert expected == [
        parse_time(1631097600, UTC),
        parse_time(1631097600.9, UTC),
        parse_time(1631097600999, UTC),
    ]


def test_time_format_record_time_formats_in_the_zone() -> None:
    """Test that epoch 1631097600 is 2021-09-08 18:40:00 in Asia/Shanghai."""
    expected = "2021-09-08 18:40:00"
    assert expected == format_record_time(1631097600, SHANGHAI)


def test_time_bounds_are_2000_to_2100_utc() -> None:
    """Test that the accepted instants run from 2000-01-01 to the end of 2100, UTC."""
    expected = 946684800
    assert expected == parse_time("2000-01-01T00:00:00Z", UTC)
    expected = 4133980799
    assert expected == parse_time("2100-12-31T23:59:59Z", UTC)
    for outside in ("1999-12-31T23:59:59Z", "2101-01-01T00:00:00Z", 946684799, 4133980800):
        with pytest.raises(MappingError):
            parse_time(outside, UTC)


@pytest.mark.parametrize(
    "ts",
    [
        "true",
        "false",
        "-1631097600",
        "-1.6e9",
        '"-1631097600"',
        "0",
        "12",
        "4133980800",
        "1e40",
        "1e999999999",
        "NaN",
        "Infinity",
        "{}",
        "[1631097600]",
        '""',
        '"yesterday"',
        '"1631097600 "',
        '"2021-09-08"',
        '"2021-09-08T18:40"',
        '"2021-02-30 00:00:00"',
        '"2021-09-08 24:00:00"',
        '"2021-09-08 18:40:60"',
        '"2021-09-08 18:40:00 +08:00"',
        '"2021-09-08T18:40:00+8"',
        '"2021-09-08T18:40:00+24:00"',
        '"2021-09-08T18:40:00."',
        '"2021-09-08T18:40:00Zulu"',
        '"1999-12-31 23:59:59"',
        '"2102-01-01 00:00:00"',
        '"0000-01-01 00:00:00"',
        '"\uff12\uff10\uff12\uff11-09-08 18:40:00"',
        '"' + "9" * 5000 + '"',
    ],
)
def test_time_rejects_anything_else(ts: str) -> None:
    """Test that booleans, negatives, out-of-range and unreadable times are bad_time."""
    error = _reject(f'{{"ts": {ts}, "Ua": 1}}')

    expected = "bad_time"
    assert expected == error.reason
    assert len(error.detail) < 200


def test_time_receive_time_out_of_range_is_rejected() -> None:
    """Test that a receive time from an unset clock (1970) is not used as the reading time."""
    with pytest.raises(MappingError) as info:
        _mapper().map(TOPIC, b'{"Ua": 1}', 12.0)

    expected = "bad_time"
    assert expected == info.value.reason


# --- precision -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "number",
    [
        "50.00",
        "226.1",
        "0.1",
        "1E-7",
        "1e3",
        "-0",
        "-0.0",
        "123456789012345678901234567890123456789",
        "123456789012345.123456789012345",
        "0.000000000000000000000000000001",
        "1.5E+300",
    ],
)
def test_precision_json_numbers_keep_their_exact_text(number: str) -> None:
    """Test that a JSON number becomes the exact text it was sent with, never via float."""
    expected = {"x": number}
    assert expected == _one(f'{{"x": {number}}}').data


@pytest.mark.parametrize(
    "text", ["50.00", "226.1", "007", "-1.5e-3", "123456789012345678901234567890.123"]
)
def test_precision_numeric_strings_pass_unchanged(text: str) -> None:
    """Test that a numeric JSON string passes through exactly as sent."""
    expected = {"x": text}
    assert expected == _one(json.dumps({"x": text})).data


# --- renames and scale -----------------------------------------------------------------------


def test_renames_rename_points() -> None:
    """Test that points are renamed old -> new and others are kept."""
    mapper = _mapper(Route(renames={"voltage_a": "Ua"}))

    expected = {"Ua": "226.1", "P": "1"}
    assert expected == _one('{"voltage_a": 226.1, "P": 1}', mapper=mapper).data


def test_renames_collision_is_rejected() -> None:
    """Test that a rename onto a point that is also sent is a bad point, not a silent drop."""
    mapper = _mapper(Route(renames={"voltage_a": "Ua"}))

    expected = "bad_point"
    assert expected == _reject('{"voltage_a": 1, "Ua": 2}', mapper=mapper).reason


@pytest.mark.parametrize(
    ("value", "factor", "expected"),
    [
        ("123456", "0.001", "123.456"),
        ('"123456"', "0.001", "123.456"),
        ("1.5", "1000", "1500.0"),
        ("1e3", "2", "2000"),
        ("1E-7", "10", "0.0000010"),
        (
            "123456789012345678901234567890.123456789",
            "0.001",
            "123456789012345678901234567.890123456789",
        ),
        ("-2", "0.5", "-1.0"),
    ],
)
def test_scale_multiplies_exactly(value: str, factor: str, expected: str) -> None:
    """Test that scale multiplies with exact decimals and formats without exponent."""
    mapper = _mapper(Route(renames={"e": "Ep_imp"}, scale={"Ep_imp": factor}))

    reading = _one(f'{{"e": {value}, "P": 1.10}}', mapper=mapper)

    assert {"Ep_imp": expected, "P": "1.10"} == reading.data


def test_scale_of_huge_exponent_is_rejected() -> None:
    """Test that scaling a value whose plain notation would be enormous is a bad value."""
    mapper = _mapper(Route(scale={"x": "1"}))

    expected = "bad_value"
    assert expected == _reject('{"x": 1e999999999}', mapper=mapper).reason


# --- deviceId and deviceType -----------------------------------------------------------------


@pytest.mark.parametrize("device_type", ["1", "12", "13", "17"])
def test_device_id_is_kept_for_types_that_need_it(device_type: str) -> None:
    """Test that types 1/12/13/17 carry the topic's deviceId (system_id for 12/13/17)."""
    reading = _one('{"P": 1}', f"meters/{device_type}/sys-9/telemetry".encode())

    expected = (device_type, "sys-9")
    assert expected == (reading.device_type, reading.device_id)


@pytest.mark.parametrize("device_type", ["15", "16"])
def test_device_id_is_omitted_for_types_15_and_16(device_type: str) -> None:
    """Test that types 15/16 never send a deviceId, even when the topic has one.

    Types 15/16 never send a deviceId, even when the topic has one; the topic's id
    stays with the reading only to keep the sources apart (see the batching tests).
    """
    reading = _one('{"P": 1}', f"meters/{device_type}/sys-9/telemetry".encode())
    no_level = _one(
        '{"P": 1}',
        f"site/{device_type}/data".encode(),
        _mapper(Route(topic="site/{deviceType}/data")),
    )

    entry = serialize_entry(
        None if reading.device_type in NO_DEVICE_ID_TYPES else reading.device_id,
        reading.record_time,
        reading.data_json,
    )
    expected = (device_type, "sys-9", None, False)
    assert expected == (
        reading.device_type,
        reading.device_id,
        no_level.device_id,
        b"deviceId" in entry,
    )


@pytest.mark.parametrize("device_type", ["1", "12", "13", "17"])
def test_device_id_missing_is_rejected(device_type: str) -> None:
    """Test that a required deviceId that is an empty level or absent is missing_device_id."""
    no_id = _mapper(Route(topic="site/{deviceType}/data"))

    empty_level = _reject('{"P": 1}', f"meters/{device_type}//telemetry".encode())
    no_level = _reject('{"P": 1}', f"site/{device_type}/data".encode(), no_id)

    expected = ["missing_device_id"] * 2
    assert expected == [empty_level.reason, no_level.reason]


@pytest.mark.parametrize("device_type", ["15", "16"])
def test_device_id_not_needed_without_a_level(device_type: str) -> None:
    """Test that a route without {deviceId} works for types 15/16."""
    fixed = _mapper(Route(topic="site/weather", device_type=device_type))
    by_topic = _mapper(Route(topic="site/{deviceType}/data"))

    expected = [None, None]
    assert expected == [
        _one('{"P": 1}', b"site/weather", fixed).device_id,
        _one('{"P": 1}', f"site/{device_type}/data".encode(), by_topic).device_id,
    ]


def test_device_type_fixed_by_route() -> None:
    """Test that route.device_type gives the type when the template has no {deviceType}."""
    mapper = _mapper(Route(topic="plant/pv/{deviceId}", device_type="12"))

    reading = _one('{"P": 1}', b"plant/pv/system-1", mapper)

    expected = ("12", "system-1")
    assert expected == (reading.device_type, reading.device_id)


@pytest.mark.parametrize("level", ["", "meter", "1a", "-1", "\u0661", "1.0"])
def test_device_type_must_be_digits(level: str) -> None:
    """Test that a deviceType level other than ASCII digits is bad_device_type."""
    topic = f"meters/{level}/meter-1/telemetry".encode()

    expected = "bad_device_type"
    assert expected == _reject('{"P": 1}', topic).reason


# --- rejects ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("topic", "payload", "reason"),
    [
        (b"meters/1/\xff/telemetry", b'{"P": 1}', "bad_topic"),
        (b"meters/1/meter-1/status", b'{"P": 1}', "no_route"),
        (b"meters/1/meter-1", b'{"P": 1}', "no_route"),
        (b"meters/1/meter-1/telemetry/x", b'{"P": 1}', "no_route"),
        (TOPIC, b"", "empty_payload"),
        (TOPIC, b'{"P": "\xe9"}', "bad_encoding"),
        (TOPIC, b"\xef\xbb\xbf{}", "bad_json"),
        (TOPIC, b'{"P": 1', "bad_json"),
        (TOPIC, b'{"P": 01}', "bad_json"),
        (TOPIC, b"[" * 100_000 + b"]" * 100_000, "bad_json"),
        (TOPIC, b'{"a": ' * 30_000 + b"1" + b"}" * 30_000, "bad_json"),
        (TOPIC, b"42", "not_object"),
        (TOPIC, b'"x"', "not_object"),
        (TOPIC, b"null", "not_object"),
        (TOPIC, b'[{"P": 1}, 2]', "not_object"),
        (TOPIC, b"[]", "no_points"),
        (TOPIC, b"{}", "no_points"),
        (TOPIC, b'{"ts": 1631097600}', "no_points"),
        (TOPIC, b'{"P": null}', "no_points"),
        (TOPIC, b'[{"P": 1}, {}]', "no_points"),
        (TOPIC, b'{"": 1}', "bad_point"),
        (TOPIC, b'{"\\ud800": 1}', "bad_point"),
        (TOPIC, b'{"P": true}', "bad_value"),
        (TOPIC, b'{"P": false}', "bad_value"),
        (TOPIC, b'{"P": {"v": 1}}', "bad_value"),
        (TOPIC, b'{"P": [1]}', "bad_value"),
        (TOPIC, b'{"P": NaN}', "bad_value"),
        (TOPIC, b'{"P": Infinity}', "bad_value"),
        (TOPIC, b'{"P": -Infinity}', "bad_value"),
        (TOPIC, b'{"ts": 1631097600, "P": 1, "Q": "x"}', "bad_value"),
        (TOPIC, b'{"ts": "soon", "P": 1}', "bad_time"),
    ],
)
def test_reject_gives_its_reason(topic: bytes, payload: bytes, reason: str) -> None:
    """Test that each kind of bad message is rejected with its reason code."""
    assert reason == _reject(payload, topic).reason


@pytest.mark.parametrize(
    "text",
    [
        "",
        " 1",
        "1 ",
        "1,5",
        "+1",
        ".5",
        "5.",
        "1_000",
        "0x10",
        "NaN",
        "Infinity",
        "\u0661\u0662",
        "1e",
        "--1",
    ],
)
def test_reject_non_numeric_strings(text: str) -> None:
    """Test that a JSON string value must be a finite decimal number in plain notation."""
    error = _reject(json.dumps({"Ua": text}))

    expected = ("bad_value", True)
    assert expected == (error.reason, "'Ua'" in error.detail)


def test_reject_detail_names_the_point() -> None:
    """Test that a bad value's detail is a sentence naming the point and the value."""
    error = _reject('{"Ua": true}')

    expected = "point 'Ua' has value true: expected a number or a numeric string"
    assert expected == error.detail


def test_reject_detail_names_the_array_element() -> None:
    """Test that a reject inside an array names the element's index."""
    error = _reject('[{"Ua": 1}, {"Ua": 2}, {"Ua": "x"}]')

    assert error.detail.startswith("reading [2]: point 'Ua'")


def test_reject_detail_stays_short() -> None:
    """Test that details quote at most a short excerpt of a large payload."""
    long_name = "p" * 100_000
    payloads = [
        json.dumps({long_name: "v" * 100_000}),
        json.dumps({"Ua": "v" * 100_000}),
        '{"Ua": ' + "1" * 100_000 + "x}",
        json.dumps({"ts": "2" * 100_000, "Ua": 1}),
    ]

    lengths = [len(_reject(p, mapper=_mapper(max_payload_bytes=1 << 20)).detail) for p in payloads]

    expected = [True] * 4
    assert expected == [n < 200 for n in lengths]


def test_reject_payload_too_large_before_decoding() -> None:
    """Test that an oversized payload is rejected by size, whatever its bytes."""
    mapper = _mapper(max_payload_bytes=64)

    too_large = _reject(b"\xff" * 65, mapper=mapper)
    at_limit = _one(b'{"x": 1}' + b" " * 56, mapper=mapper)

    expected = ("payload_too_large", {"x": "1"})
    assert expected == (too_large.reason, at_limit.data)


def test_reject_too_many_points() -> None:
    """Test that a reading above max_points is rejected (the time key does not count)."""
    mapper = _mapper(max_points=2)

    at_limit = _one('{"ts": 1631097600, "a": 1, "b": 2}', mapper=mapper)
    too_many = _reject('{"a": 1, "b": 2, "c": 3}', mapper=mapper)

    expected = ({"a": "1", "b": "2"}, "too_many_points")
    assert expected == (at_limit.data, too_many.reason)


def test_reject_too_many_readings() -> None:
    """Test that an array above max_readings is rejected."""
    mapper = _mapper(max_readings=2)

    at_limit = mapper.map(TOPIC, b'[{"a": 1}, {"a": 2}]', NOW)
    too_many = _reject('[{"a": 1}, {"a": 2}, {"a": 3}]', mapper=mapper)

    expected = (2, "too_many_readings")
    assert expected == (len(at_limit), too_many.reason)


def test_reject_reasons_are_unique() -> None:
    """Test that REASONS lists each reason code once."""
    assert len(set(REASONS)) == len(REASONS)


# --- configuration ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("routes", "timezone", "key"),
    [
        ([Route(topic="pv/{deviceId}", device_type="pv")], "UTC", "routes[0].device_type"),
        ([Route(), Route(topic="pv/data", device_type="1")], "UTC", "routes[1].topic"),
        ([Route(renames={"a": ""})], "UTC", "routes[0].renames"),
        ([Route()], "Mars/Olympus", "timezone"),
        ([], "UTC", "routes"),
    ],
)
def test_config_unusable_routes_are_rejected(routes: list[Route], timezone: str, key: str) -> None:
    """Test that a route that could never map, or a bad timezone, fails at construction."""
    with pytest.raises(ConfigError) as info:
        Mapper(routes, timezone)

    assert key == info.value.key


# --- properties ------------------------------------------------------------------------------

PROPERTY_ROUTES = [
    Route(),
    Route(topic="meters/{deviceType}/{deviceId}/{point}", format=PayloadFormat.VALUE),
    Route(
        topic="inv/{deviceId}",
        device_type="15",
        time_key="time",
        renames={"a": "b"},
        scale={"b": "0.001", "c": "1000"},
    ),
]
LEVELS = st.sampled_from(["1", "12", "15", "16", "a", "c", "value", ""]) | st.text(max_size=5)
TYPES = st.sampled_from(["1", "12", "15", "16"])
TOPICS = (
    st.binary(max_size=40)
    | st.lists(LEVELS, min_size=1, max_size=5).map("/".join).map(str.encode)
    | st.builds("meters/{}/{}/telemetry".format, TYPES | LEVELS, LEVELS).map(str.encode)
    | st.builds("meters/{}/{}/{}".format, TYPES | LEVELS, LEVELS, LEVELS).map(str.encode)
    | st.builds("inv/{}".format, LEVELS).map(str.encode)
)
RECEIVED_AT = st.floats(1e9, 2e9) | st.floats()
JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.decimals().map(str)
    | st.text(max_size=8)
    | st.sampled_from(["1631097600", "2021-09-08 18:40:00", "1e999999999", "NaN", "\ud800"]),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(
            st.sampled_from(["ts", "time", "a", "b", "c", "value", ""]), inner, max_size=7
        )
    ),
    max_leaves=12,
)
RAW_VALUES = st.decimals(allow_nan=False, allow_infinity=False).map(str) | st.sampled_from(
    ["null", "true", "NaN", '"1.5"', '"x"', "1631097600", "1631097600123", '"2021-09-08 18:40:00"']
)
RAW_OBJECTS = st.dictionaries(
    st.sampled_from(["a", "b", "c", "d", "ts", "time", "value"]), RAW_VALUES, max_size=6
).map(lambda obj: "{" + ", ".join(f'"{k}": {v}' for k, v in obj.items()) + "}")
PAYLOADS = (
    st.binary(max_size=64)
    | JSON_VALUES.map(lambda v: json.dumps(v).encode("utf-8", "surrogatepass"))
    | RAW_VALUES.map(str.encode)
    | RAW_OBJECTS.map(str.encode)
    | st.lists(RAW_OBJECTS, max_size=3).map(lambda objs: ("[" + ", ".join(objs) + "]").encode())
)


@settings(max_examples=1500, deadline=None)
@given(topic=TOPICS, payload=PAYLOADS, received_at=RECEIVED_AT)
def test_property_any_message_maps_or_raises_mapping_error(
    topic: bytes, payload: bytes, received_at: float
) -> None:
    """Test that any topic and payload bytes give readings or a MappingError, nothing else."""
    mapper = Mapper(PROPERTY_ROUTES, "Asia/Shanghai", max_payload_bytes=512, max_points=5)
    try:
        readings = mapper.map(topic, payload, received_at)
    except MappingError as exc:
        error: MappingError | None = exc
    else:
        error = None
    if error is not None:
        assert error.reason in REASONS
        assert len(error.detail) < 300
        return
    assert readings
    for reading in readings:
        assert isinstance(reading, Reading)
        assert reading.data
        assert all(type(k) is str and k and type(v) is str for k, v in reading.data.items())
        assert RECORD_TIME.fullmatch(reading.record_time)
        assert reading.device_type.isdigit()
        # Types 15/16 send no deviceId; one from the topic only keeps sources apart.
        assert reading.device_type in {"15", "16"} or reading.device_id
        json.dumps(reading.data).encode()
        for key, value in reading.data.items():
            key.encode()
            assert Decimal(value).is_finite()


@given(number=st.decimals(allow_nan=False, allow_infinity=False))
def test_property_decimal_json_number_round_trips(number: Decimal) -> None:
    """Test that any finite decimal sent as JSON number text comes back digit for digit."""
    text = str(number)
    mapper = _mapper(Route(), VALUE_ROUTE)

    expected = [{"x": text}, {"Ua": text}]
    assert expected == [
        _one(f'{{"x": {text}}}', mapper=mapper).data,
        _one(text, VALUE_TOPIC, mapper).data,
    ]


NUMBER_TEXT = (
    st.decimals(allow_nan=False, allow_infinity=False).map(str)
    | st.integers().map(str)
    | st.floats(allow_nan=False, allow_infinity=False).map(repr)
)


@given(
    points=st.dictionaries(
        st.text(min_size=1).filter(lambda k: k != "ts"), NUMBER_TEXT, min_size=1, max_size=50
    ),
    quoted=st.booleans(),
)
def test_property_numeric_object_round_trips_all_points(
    points: dict[str, str], quoted: bool
) -> None:
    """Test that every numeric point of a JSON object arrives with its exact text."""
    body = ", ".join(
        f"{json.dumps(key)}: {json.dumps(value) if quoted else value}"
        for key, value in points.items()
    )

    assert points == _one(f"{{{body}}}").data


@given(
    value=st.integers()
    | st.floats()
    | st.text()
    | st.booleans()
    | st.none()
    | st.decimals().map(str)
    | st.datetimes().map(str)
    | st.datetimes(timezones=st.timezones()).map(lambda d: d.isoformat())
)
def test_property_parse_time_gives_an_in_range_epoch_or_bad_time(value: object) -> None:
    """Test that parse_time returns seconds in 2000-2100 or raises bad_time, for any input."""
    try:
        ts = parse_time(value, SHANGHAI)
    except MappingError as exc:
        reason: str | None = exc.reason
    else:
        reason = None
        assert 946684800 <= ts < 4133980800
    assert reason in {None, "bad_time"}


def test_long_topics_and_device_ids_are_rejected_to_bound_memory() -> None:
    """Test that an overlong topic or deviceId is rejected with its own reason.

    A topic over 1024 bytes and a deviceId over 128 characters are rejected with
    their own reasons (1,000 distinct 60 kB ids used to cost ~180 MB of caches).
    """
    long_id = "m" * 129
    long_topic = ("meters/1/" + "m" * 1100 + "/telemetry").encode()

    expected = ["device_id_too_long", "topic_too_long"]
    assert expected == [
        _reject('{"P": 1}', f"meters/1/{long_id}/telemetry".encode()).reason,
        _reject('{"P": 1}', long_topic).reason,
    ]
    assert _one('{"P": 1}', f"meters/1/{'m' * 128}/telemetry".encode()).data == {"P": "1"}


def test_numbers_with_absurd_exponents_are_rejected_not_raised() -> None:
    """Test that an exponent past what a decimal holds is a reject, not an exception.

    A value or time like 6e5555...5 (an exponent past what a decimal holds) is a
    bad_value / bad_time reject, not an exception that would stop the ingest loop. Found by
    the mapping fuzzer.
    """
    huge = "6e" + "5" * 60

    expected = ["bad_time", "bad_value", "bad_value"]
    assert expected == [
        _reject(f'{{"ts": {huge}, "Ua": 1}}').reason,
        _reject(f'{{"Ua": {huge}}}').reason,
        _reject(f'{{"Ua": "{huge}"}}').reason,
    ]
    assert {"Ua": "1e123456"} == _one('{"Ua": 1e123456}').data
