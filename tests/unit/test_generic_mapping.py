"""The generic mapping: records, device ids and times found by paths, named points.

Also sums and scales, lenient values, time rules and aligned record times.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bridge.config import PayloadFormat, Route, load_settings
from bridge.errors import ConfigError, MappingError
from bridge.intake.mapping import REASONS, Mapper, _fixed_plan, _time_with_format
from bridge.models import Reading

NOW = 1_750_000_000.25  # 2025-06-15 23:06:40.25 in Asia/Shanghai

ISSUE_CONFIG = """\
routes:
  - topic: "gw/{deviceId}/data"
    device_type: "1"
    format: json
    records: "reported.meters"
    device_id: "addr"
    time: "timestamp"
    time_format: "%Y%m%d%H%M%S"
    align_secs: 60
    points:
      Ua: "Ua"
      Ia: "ENERGY.Current[0]"
      P:  {path: "ENERGY.Power", scale: "0.001"}
      Ep_imp: {sum: ["ENERGY.Total[0]", "ENERGY.Total[1]", "ENERGY.Total[2]"]}
    ignore: ["state", "unit"]
    on_non_numeric: reject
"""

TWO_METERS = b"""{"reported": {"meters": [
  {"addr": "m-1", "timestamp": 20240101120005, "Ua": 230.10, "state": "ON",
   "ENERGY": {"Current": [1.234, 1.1, 1.2], "Power": 2635, "Total": [100.001, 200.002, 300.0030]}},
  {"addr": 7, "timestamp": "20240101120159", "Ua": "229.9",
   "ENERGY": {"Current": [0.50], "Power": 1e3, "Total": [1, 2.5, null]}}]}}"""


def _route(**fields: Any) -> Route:
    fields.setdefault("topic", "gw/{deviceId}/data")
    fields.setdefault("device_type", "1")
    return Route(**fields)


def _map(payload: bytes | str | object, **fields: Any) -> list[Reading]:
    raw = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    return Mapper([_route(**fields)], "Asia/Shanghai").map(b"gw/gw-1/data", raw, NOW)


def _reject(payload: bytes | str | object, **fields: Any) -> MappingError:
    with pytest.raises(MappingError) as info:
        _map(payload, **fields)
    assert info.value.reason in REASONS
    return info.value


def _data(payload: object, **fields: Any) -> dict[str, str]:
    (reading,) = _map(payload, **fields)
    return reading.data


def test_generic_issue_example_maps_two_meters_exactly(tmp_path: Path) -> None:
    """Test that the issue's configuration, as written, maps a gateway message with two meters.

    Ids come from the records, times by format and aligned, values digit for digit.
    """
    config = tmp_path / "config.yaml"
    config.write_text(ISSUE_CONFIG)
    settings_ = load_settings(config)
    mapper = Mapper(settings_.routes, settings_.timezone)

    readings = mapper.map(b"gw/gw-1/data", TWO_METERS, NOW)

    expected = [
        ("m-1", 1704081600, "2024-01-01 12:00:00",
         {"Ua": "230.10", "Ia": "1.234", "P": "2.635", "Ep_imp": "600.0060"}),
        ("7", 1704081660, "2024-01-01 12:01:00", {"Ua": "229.9", "Ia": "0.50", "P": "1"}),
    ]  # fmt: skip
    assert expected == [(r.device_id, r.record_ts, r.record_time, r.data) for r in readings]
    assert [1704081660, 1704081720] == [r.hold_until for r in readings]


def test_generic_explain_names_each_points_source(tmp_path: Path) -> None:
    """Test that explain() gives, for each point, the path (or sum, or scale) it came from."""
    config = tmp_path / "config.yaml"
    config.write_text(ISSUE_CONFIG)
    settings_ = load_settings(config)

    traced = Mapper(settings_.routes, settings_.timezone).explain(b"gw/g/data", TWO_METERS, NOW)

    assert {
        "Ua": "Ua",
        "Ia": "ENERGY.Current[0]",
        "P": "ENERGY.Power * 0.001",
        "Ep_imp": "sum(ENERGY.Total[0], ENERGY.Total[1], ENERGY.Total[2])",
    } == traced[0][1]
    assert ["Ua", "Ia", "P"] == list(traced[1][1])


def test_generic_explain_of_flat_and_value_routes() -> None:
    """Test that explain() also names the sources for the flat and the value formats."""
    mapper = Mapper(
        [
            Route(renames={"voltage a": "Ua"}),
            Route(topic="m/{deviceType}/{deviceId}/{point}", format=PayloadFormat.VALUE),
        ],
        "UTC",
    )

    flat = mapper.explain(b"meters/1/m/telemetry", b'{"voltage a": 1, "P": 2}', NOW)
    value = mapper.explain(b"m/1/m/Ua", b"230.1", NOW)

    assert {"Ua": '"voltage a"', "P": "P"} == flat[0][1]
    assert {"Ua": "the payload (point from the topic)"} == value[0][1]


# --- records ---------------------------------------------------------------------------------


def test_generic_records_path_to_one_object_is_one_record() -> None:
    """Test that a records path that finds an object maps it as the one record."""
    assert {"Ua": "1"} == _data({"params": {"Ua": 1}}, records="params")


def test_generic_records_path_that_finds_nothing_is_no_points() -> None:
    """Test that a records path that finds nothing (or null) rejects with no_points."""
    assert "no_points" == _reject({"other": 1}, records="params").reason
    assert "no_points" == _reject({"params": None}, records="params").reason
    assert "no_points" == _reject({"params": []}, records="params").reason


def test_generic_records_default_is_the_payload_and_an_array_is_several() -> None:
    """Test that without records, an array payload is several records, an object one."""
    readings = _map([{"Ua": 1}, {"Ua": 2}], ignore=["x"])

    assert [{"Ua": "1"}, {"Ua": "2"}] == [r.data for r in readings]


def test_generic_records_that_are_not_objects_are_rejected_with_the_index() -> None:
    """Test that a record that is not an object is not_object, naming its index."""
    error = _reject({"m": [{"Ua": 1}, 5]}, records="m")

    assert ("not_object", True) == (error.reason, "[1]" in error.detail)


def test_generic_dollar_path_reads_the_whole_payload() -> None:
    """Test that a $. path reads the gateway's time beside its records."""
    (reading,) = _map(
        {"timestamp": 1700000000, "meters": [{"id": "a", "Ua": 1}]},
        records="meters",
        device_id="id",
        time="$.timestamp",
    )

    assert (1700000000, "a", {"Ua": "1"}) == (reading.record_ts, reading.device_id, reading.data)


# --- device id -------------------------------------------------------------------------------


def test_generic_device_id_route_needs_no_device_id_level() -> None:
    """Test that a route with device_id maps a topic without {deviceId} (COMPERE)."""
    mapper = Mapper([Route(topic="compere/all", device_type="1", device_id="meter.id")], "UTC")

    (reading,) = mapper.map(b"compere/all", b'{"meter": {"id": "GW1/M 7"}, "Ua": 1}', NOW)

    assert "GW1/M 7" == reading.device_id


def test_generic_device_id_number_keeps_its_text() -> None:
    """Test that a numeric device id is pushed as the exact text it had."""
    assert ["7.50"] == [r.device_id for r in _map(b'{"id": 7.50, "Ua": 1}', device_id="id")]


def test_generic_device_id_missing_falls_back_to_the_topic_or_is_rejected() -> None:
    """Test that a record without its id takes the topic's, and without either is rejected."""
    (reading,) = _map({"Ua": 1}, device_id="id")
    mapper = Mapper([Route(topic="all", device_type="1", device_id="id")], "UTC")
    with pytest.raises(MappingError) as info:
        mapper.map(b"all", b'{"Ua": 1}', NOW)

    assert ("gw-1", "missing_device_id") == (reading.device_id, info.value.reason)


@pytest.mark.parametrize("value", ["true", "{}", "[1]", "NaN"])
def test_generic_device_id_that_is_not_a_string_or_number_is_rejected(value: str) -> None:
    """Test that an id that is a boolean, an object, an array or NaN is rejected."""
    assert (
        "missing_device_id"
        == _reject(f'{{"id": {value}, "Ua": 1}}'.encode(), device_id="id").reason
    )


def test_generic_too_many_points_is_rejected() -> None:
    """Test that a record with more points than max_points is rejected, skipped keys aside."""
    record = {f"p{i}": i for i in range(5)} | {"state": "ON"}
    mapper = Mapper([_route(ignore=["state"])], "UTC", max_points=4)

    with pytest.raises(MappingError) as info:
        mapper.map(b"gw/g/data", json.dumps(record).encode(), NOW)
    (reading,) = Mapper([_route(ignore=["state"])], "UTC", max_points=5).map(
        b"gw/g/data", json.dumps(record).encode(), NOW
    )

    assert ("too_many_points", 5) == (info.value.reason, len(reading.data))


def test_generic_device_id_too_long_is_rejected() -> None:
    """Test that an id found in the payload obeys the same length limit as a topic's."""
    assert "device_id_too_long" == _reject({"id": "x" * 129, "Ua": 1}, device_id="id").reason


# --- points ----------------------------------------------------------------------------------


def test_generic_points_missing_null_or_non_numeric_are_left_out() -> None:
    """Test that with points, a path finding nothing, null or a word leaves the point out."""
    points = {"Ua": "a", "Ub": "b", "Uc": "c", "Ia": "d", "F": '"f:1"'}

    data = _data(b'{"a": null, "c": "ON", "d": true, "f:1": 50.00}', points=points)

    assert {"F": "50.00"} == data


def test_generic_points_none_left_is_no_points() -> None:
    """Test that when no named point has a value, the message is no_points."""
    assert "no_points" == _reject({"a": None}, points={"Ua": "a", "Ub": "b"}).reason


@pytest.mark.parametrize(
    ("parts", "scale", "expected"),
    [
        (["0.1", "0.2"], None, "0.3"),
        (["100.001", "200.002", "300.0030"], None, "600.0060"),
        (["1e3", "1"], None, "1001"),
        (["1.5", "-0.5"], "0.001", "0.0010"),
        (['"12.5"', "1"], "1000", "13500.0"),
    ],
)
def test_generic_sum_is_exact_and_scaled_after(
    parts: list[str], scale: str | None, expected: str
) -> None:
    """Test that a sum is exact decimal, scaled afterwards, written without exponent."""
    payload = f'{{"T": [{", ".join(parts)}]}}'.encode()
    source: dict[str, Any] = {"sum": [f"T[{i}]" for i in range(len(parts))]}
    if scale is not None:
        source["scale"] = scale

    assert {"E": expected} == _data(payload, points={"E": source})


def test_generic_sum_needs_all_its_parts() -> None:
    """Test that a sum with a missing, null or non-numeric part leaves its point out."""
    points = {"E": {"sum": ["T[0]", "T[1]", "T[2]"]}, "Ua": "Ua"}

    assert {"Ua": "1"} == _data(b'{"T": [1, null, 2], "Ua": 1}', points=points)
    assert {"Ua": "1"} == _data(b'{"T": [1, 2], "Ua": 1}', points=points)
    assert {"Ua": "1"} == _data(b'{"T": [1, "x", 2], "Ua": 1}', points=points)


@pytest.mark.parametrize(
    ("value", "expected"),
    [("2635", "2.635"), ("1E+2", "0.1"), ("-0.5", "-0.0005"), ('"7"', "0.007")],
)
def test_generic_point_scale_is_exact_plain_decimal(value: str, expected: str) -> None:
    """Test that a point's scale is exact and written in plain notation."""
    payload = f'{{"P": {value}}}'.encode()

    assert {"P": expected} == _data(payload, points={"P": {"path": "P", "scale": "0.001"}})


def test_generic_point_huge_exponent_cannot_be_scaled() -> None:
    """Test that a value too large to convert exactly is bad_value, not a hang."""
    payload = b'{"P": 1e999999}'

    assert "bad_value" == _reject(payload, points={"P": {"path": "P", "scale": "2"}}).reason


def test_generic_unconverted_values_keep_their_text() -> None:
    """Test that a point taken as it is keeps its exact source text, also in arrays."""
    payload = b'{"ENERGY": {"Voltage": [251.00, 252, 253.10]}}'
    points = {"Ua": "ENERGY.Voltage[0]", "Uc": "ENERGY.Voltage[-1]"}

    assert {"Ua": "251.00", "Uc": "253.10"} == _data(payload, points=points)


# --- without points --------------------------------------------------------------------------


def test_generic_ignore_skips_keys_and_the_rest_is_still_strict() -> None:
    """Test that ignored keys are skipped, while another word is still rejected by default."""
    assert {"Ua": "1"} == _data({"Ua": 1, "state": "ON", "unit": "V"}, ignore=["state", "unit"])
    assert "bad_value" == _reject({"Ua": 1, "online": True}, ignore=["state"]).reason


def test_generic_on_non_numeric_skip_drops_words_booleans_objects_and_arrays() -> None:
    """Test that on_non_numeric: skip drops every value that is not a number."""
    payload = b'{"Ua": 1, "s": "ON", "b": true, "o": {"x": 1}, "a": [1], "n": null, "N": NaN}'

    assert {"Ua": "1"} == _data(payload, on_non_numeric="skip")


def test_generic_device_id_and_time_keys_are_not_points() -> None:
    """Test that the record's id and time keys are not sent as points."""
    (reading,) = _map({"id": "m", "t": 1700000000, "Ua": 1}, device_id="id", time="t")

    assert ("m", 1700000000, {"Ua": "1"}) == (reading.device_id, reading.record_ts, reading.data)


def test_generic_old_keys_still_apply() -> None:
    """Test that renames, scale and time_key work beside the new keys."""
    (reading,) = _map(
        {"when": 1700000000, "voltage": 2, "e": 1500},
        time_key="when",
        renames={"voltage": "Ua", "e": "Ep_imp"},
        scale={"Ep_imp": "0.001"},
        ignore=["x"],
    )

    assert (1700000000, {"Ua": "2", "Ep_imp": "1.500"}) == (reading.record_ts, reading.data)


# --- times -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ('"20151212T121212Z"', 1449922332),
        ('"20151212T201212+0800"', 1449922332),
        ('"20151212T201212"', 1449922332),  # naive: Asia/Shanghai
        ("1449922332.999", 1449922332),
        ('"1449922332.5"', 1449922332),
        ("1449922332999.5", 1449922332),
        ('"2015-12-12 20:12:12"', 1449922332),
    ],
)
def test_generic_time_forms(value: str, expected: int) -> None:
    """Test that ISO basic, fractional epochs (floored) and today's forms are read."""
    (reading,) = _map(f'{{"t": {value}, "Ua": 1}}'.encode(), time="t")

    assert expected == reading.record_ts


@pytest.mark.parametrize(
    ("fmt", "value", "expected"),
    [
        ("%Y%m%d%H%M%S", "20151212201212", 1449922332),
        ("%Y%m%d%H%M%S", '"20151212201212"', 1449922332),
        ("%d/%m/%Y %H:%M", '"12/12/2015 20:12"', 1449922320),
        ("%d/%m/%Y %H:%M:%S%z", '"12/12/2015 12:12:12+0000"', 1449922332),
        ("%d/%m/%Y %H:%M", "1449922332", 1449922332),  # not the format: read as today
    ],
)
def test_generic_time_format(fmt: str, value: str, expected: int) -> None:
    """Test that time_format is tried first, naive in the timezone, then today's forms."""
    (reading,) = _map(f'{{"t": {value}, "Ua": 1}}'.encode(), time="t", time_format=fmt)

    assert expected == reading.record_ts


def test_generic_bad_time_rejects_by_default_or_takes_the_receive_time() -> None:
    """Test that an implausible device clock is bad_time, or the receive time when asked."""
    payload = b'{"t": "1970-01-01 08:00:00", "Ua": 1}'

    assert "bad_time" == _reject(payload, time="t").reason
    assert [int(NOW)] == [r.record_ts for r in _map(payload, time="t", on_bad_time="receive_time")]


def test_generic_max_age_days_makes_old_times_bad() -> None:
    """Test that a time older than max_age_days before arrival is a bad time."""
    old = {"t": int(NOW) - 3 * 86400, "Ua": 1}
    recent = {"t": int(NOW) - 86400, "Ua": 1}

    assert "bad_time" == _reject(old, time="t", max_age_days=2).reason
    assert [int(NOW) - 86400] == [r.record_ts for r in _map(recent, time="t", max_age_days=2)]
    assert [int(NOW)] == [
        r.record_ts for r in _map(old, time="t", max_age_days=2, on_bad_time="receive_time")
    ]


def test_generic_align_floors_the_time_and_holds_until_the_window_closes() -> None:
    """Test that align_secs floors recordTime and holds the reading to its window's end."""
    (reading,) = _map({"t": 1700000059, "Ua": 1}, time="t", align_secs=60)
    (live,) = _map({"Ua": 1}, align_secs=900)

    assert (1700000040, "2023-11-15 06:14:00", 1700000100) == (
        reading.record_ts,
        reading.record_time,
        reading.hold_until,
    )
    assert (1749999600, 1749999600 + 900) == (live.record_ts, live.hold_until)


def test_generic_value_route_takes_time_rules_and_align() -> None:
    """Test that a per-point route aligns its times and reads its time path and format."""
    route = Route(
        topic="m/{deviceId}/{point}",
        device_type="1",
        format=PayloadFormat.VALUE,
        time="at",
        time_format="%Y%m%d%H%M%S",
        align_secs=60,
    )
    mapper = Mapper([route], "Asia/Shanghai")

    (reading,) = mapper.map(b"m/x/Ua", b'{"value": 230.1, "at": "20231115061433"}', NOW)

    assert ("2023-11-15 06:14:00", {"Ua": "230.1"}) == (reading.record_time, reading.data)


# --- configuration ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("route", "key"),
    [
        ({"points": {"Ia": "ENERGY.Current[x]"}}, "routes[0].points.Ia"),
        ({"points": {"E": {"sum": ["a", "b..c"]}}}, "routes[0].points.E.sum"),
        ({"points": {"E": {"path": "a", "sum": ["b"]}}}, "routes[0].points.E"),
        ({"points": {"E": {"path": "a", "scale": "x"}}}, "routes[0].points.E.scale"),
        ({"points": {}}, "routes[0].points"),
        ({"points": {"": "a"}}, "routes[0].points"),
        ({"points": {"U\ta": "a"}}, "routes[0].points"),
        ({"records": "a b"}, "routes[0].records"),
        ({"device_id": ""}, "routes[0].device_id"),
        ({"time": "$x"}, "routes[0].time"),
        ({"time_format": "%H:%M"}, "routes[0].time_format"),
        ({"align_secs": 0}, "routes[0].align_secs"),
        ({"on_non_numeric": "drop"}, "routes[0].on_non_numeric"),
        ({"time": "t", "time_key": "t"}, "routes[0]"),
        ({"topic": "v/{deviceId}/{point}", "format": "value", "points": {"a": "b"}}, "routes[0]"),
    ],
)
def test_generic_config_errors_name_the_key(
    route: dict[str, Any], key: str, tmp_path: Path
) -> None:
    """Test that a bad generic key fails at config load, naming it."""
    route = {"topic": "gw/{deviceId}/data", "device_type": "1", **route}
    config = tmp_path / "config.yaml"
    config.write_text(json.dumps({"routes": [route]}))

    with pytest.raises(ConfigError) as info:
        load_settings(config)

    assert key == info.value.key


def test_generic_config_route_without_id_level_or_path_is_refused() -> None:
    """Test that a type-1 route with neither {deviceId} nor device_id cannot be built."""
    with pytest.raises(ConfigError, match="device_id path"):
        Mapper([Route(topic="all", device_type="1", ignore=["x"])], "UTC")


# --- properties ------------------------------------------------------------------------------

_JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(10**20), 10**20)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8)
    | st.sampled_from(["20151212T121212Z", "1.5", "2021-09-08 18:40:00", "1700000000"]),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(
            st.sampled_from(["a", "b", "t", "id", "", "x:y"]) | st.text(max_size=3),
            inner,
            max_size=5,
        )
    ),
    max_leaves=25,
)
_PATH = st.lists(
    st.sampled_from(["a", "b", "t", "id", '"x:y"', '""', "[0]", "[-1]", "[2]"]), min_size=1,
    max_size=4,
).map(lambda steps: ".".join(steps).replace(".[", "["))  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(
    doc=_JSON,
    path=_PATH,
    other=_PATH,
    use_points=st.booleans(),
    options=st.fixed_dictionaries(
        {},
        optional={
            "align_secs": st.integers(1, 3600),
            "on_non_numeric": st.sampled_from(["reject", "skip"]),
            "on_bad_time": st.sampled_from(["reject", "receive_time"]),
            "time_format": st.just("%Y%m%d%H%M%S"),
            "max_age_days": st.just(30.0),
        },
    ),
)
def test_generic_property_any_json_and_path_gives_readings_or_a_reason(
    doc: object, path: str, other: str, use_points: bool, options: dict[str, Any]
) -> None:
    """Test that for any JSON and any paths, the mapper returns readings or a reason."""
    fields: dict[str, Any] = {
        "time": other,
        "device_id": "$" + ("" if path.startswith("[") else ".") + path,
        **options,
    }
    if use_points:
        fields["points"] = {"P": path, "E": {"sum": [path, other], "scale": "0.001"}}
    else:
        fields["records"] = path
    try:
        readings = _map(doc, **fields)
    except MappingError as exc:
        assert exc.reason in REASONS  # noqa: PT017 - any input: a reason or readings
        return
    for reading in readings:
        assert reading.data
        assert 19 == len(reading.record_time)
        reading.data_json.decode()


@settings(max_examples=300, deadline=None)
@given(
    moment=st.datetimes(min_value=datetime(2000, 1, 2), max_value=datetime(2100, 12, 30)),
    fmt=st.sampled_from(
        ["%Y%m%d%H%M%S", "%Y-%m-%d %H:%M", "%d/%m/%Y %H:%M:%S", "%H%M%S%d%m%Y", "%Y%m%d%H%M%S%z"]
    ),
    mangle=st.sampled_from(["", "0", "x", "-1"]),
)
def test_generic_property_fixed_width_formats_read_as_strptime_does(
    moment: datetime, fmt: str, mangle: str
) -> None:
    """Test that the fast reader of fixed-width digit formats agrees with strptime."""
    tz = ZoneInfo("Asia/Shanghai")
    text = moment.replace(tzinfo=UTC).strftime(fmt) + mangle
    plan = _fixed_plan(fmt)

    def read(use_plan: bool) -> object:
        try:
            return _time_with_format(text, fmt, tz, plan if use_plan else None)
        except MappingError as exc:
            return exc.reason

    assert read(use_plan=False) == read(use_plan=True)


def test_generic_config_scale_factor_too_large_is_refused() -> None:
    """Test that a points scale beyond 100 digits of magnitude fails at load, naming it."""
    route = _route(points={"P": {"path": "P", "scale": "1e-999"}})

    with pytest.raises(ConfigError) as info:
        Mapper([route], "UTC")

    assert "routes[0].points.P.scale" == info.value.key


def test_generic_route_defaults_express_a_preset() -> None:
    """Test that a preset's defaults fill the keys a user left out, and the user's keys win.

    A route's points replace the preset's map.
    """
    preset = {
        "topic": "tele/{deviceId}/SENSOR",
        "time": "Time",
        "on_non_numeric": "skip",
        "points": {"Ua": "ENERGY.Voltage", "P": {"path": "ENERGY.Power", "scale": "0.001"}},
    }
    user = Route.model_validate({"device_type": "1", "points": {"Ua": "ENERGY.Voltage[0]"}})

    route = user.with_defaults(preset)
    (reading,) = Mapper([route], "UTC").map(
        b"tele/plug-1/SENSOR",
        b'{"Time": "2018-02-15T17:37:10", "ENERGY": {"Voltage": [227, 228], "Power": 2635}}',
        NOW,
    )

    assert ("tele/{deviceId}/SENSOR", "1") == (route.topic, route.device_type)
    assert ("plug-1", 1518716230, {"Ua": "227"}) == (
        reading.device_id,
        reading.record_ts,
        reading.data,
    )
