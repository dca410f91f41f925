"""Presets (``format: <name>``): every sample of the payload corpus through the mapper.

Also the default maps and what replaces them, the topics, and the property that any JSON on any
preset topic gives readings, a skip or a reason.
"""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bridge.config import PayloadFormat, Route
from bridge.errors import ConfigError, MappingError, MessageSkipped
from bridge.intake.mapping import REASONS, Mapper
from bridge.intake.presets import PRESETS, SKIP_REASONS
from bridge.models import Reading

NOW = 1_788_945_300.5  # 2026-09-09 17:15:00.5 in Asia/Shanghai
NOW_TIME = "2026-09-09 17:15:00"
CORPUS = Path(__file__).parents[1] / "data" / "payloads"
INDEX: list[dict[str, Any]] = json.loads((CORPUS / "index.json").read_text(encoding="utf-8"))
SAMPLES = [entry for entry in INDEX if entry["family"] in PRESETS]

# Samples published on a topic the preset's default topics do not cover: the route's topic.
TOPICS = {
    "tasmota/teleinfo_three_phase_power_current_arrays.json": "{deviceId}/tele/SENSOR",
    "tasmota/teleinfo_custom_fulltopic_period_space.json": (
        "emoncms/ch2i/factory/{deviceId}/tele/SENSOR"
    ),
    "shelly-gen2/pro3em_notifystatus_em0.json": "aiida/{deviceId}/events/rpc",
    "shelly-gen2/pro3em_notifystatus_emdata0.json": "aiida/{deviceId}/events/rpc",
}
# Points a preset converts (W -> kW, var -> kvar, Wh -> kWh, sums of phases): these compare by
# decimal value; every other point must be the source text digit for digit.
CONVERTED = {
    "tasmota": {"P", "Pa", "Q", "Ep_imp"},
    "shelly-gen2": {"P", "Pa", "Ep_imp", "Ep_exp"},
    "shelly-gen1": {"Pa"},
    "mbmd": {"P", "Pa", "Q", "S"},
    "zigbee2mqtt": {"P", "Pa"},
    "victron": {"P", "Pa"},
}
# recordTime where the payload carries a time (Asia/Shanghai); else the receive time.
RECORD_TIMES = {
    "tasmota/pow_r2_single_phase.json": "2018-02-15 17:37:10",  # naive local
    "shelly-gen2/pro3em_notifystatus_em0.json": "2025-09-05 16:10:29",  # 1757059829.08 floored
    "shelly-gen2/pro3em_notifystatus_emdata0.json": "2025-09-05 16:18:00",  # 1757060280.21
    "neuron/values_format_doc.json": "2022-04-15 15:06:28",  # 1650006388943 ms
    "alink/property_post_doc.json": "2018-04-23 09:58:42",  # 1524448722000 ms
    "thingsboard/device_ts_values.json": "2016-01-01 20:00:00",  # 1451649600512 ms
}
# What the corpus gives in a note, not in `expected` (several readings a message).
SEVERAL = {
    "alink/batch_post_doc.json": [
        ("meter01", "2018-04-23 09:58:42", {"WF": "3"}),
        ("meter01", "2018-04-23 09:58:42", {"WF": "4"}),
    ],
    "alink/pack_post_gateway_two_meters.json": [
        ("meter-A", "2026-09-09 17:14:00", {"Ua": "229.8", "Ia": "12.35", "Ep_imp": "40213.27"}),
        ("meter-B", "2026-09-09 17:14:00", {"Ua": "231.2", "Ia": "3.02", "Ep_imp": "812.5"}),
    ],
    "thingsboard/device_array_ts_values.json": [
        ("me", "2016-01-01 20:00:00", {"temperature": "22.5", "humidity": "61"}),
        ("me", "2016-01-01 20:00:01", {"temperature": "22.7", "humidity": "60"}),
    ],
    "thingsboard/gateway_two_devices_two_times.json": [
        ("Device A", "2017-01-01 08:00:00", {"temperature": "42", "humidity": "80"}),
        ("Device A", "2017-01-01 08:00:01", {"temperature": "43", "humidity": "82"}),
        ("Device B", "2017-01-01 08:00:00", {"temperature": "42", "humidity": "80"}),
    ],
    "thingsboard/gateway_meter_made_up.json": [
        (
            "Meter-01",
            "2026-09-09 17:14:00",
            {
                "Ua": "230.12",
                "Ub": "229.87",
                "Uc": "231.05",
                "Ia": "4.501",
                "P": "3.106",
                "Ep_imp": "15234.75",
            },
        ),
        (
            "Meter-02",
            "2026-09-09 17:14:00",
            {"Ua": "229.5", "Ia": "0.82", "P": "0.188", "Ep_imp": "907.1"},
        ),
    ],
}


def _mapper(family: str, **fields: Any) -> Mapper:
    return Mapper([Route(format=PayloadFormat(family), **fields)], "Asia/Shanghai")


def _sample(entry: dict[str, Any]) -> list[Reading]:
    """Map one corpus sample through a route of its family.

    The route has the default topics unless the sample's publisher used another.
    """
    fields = {"topic": TOPICS[entry["file"]]} if entry["file"] in TOPICS else {}
    mapper = _mapper(entry["family"], **fields)
    return mapper.map(entry["topic"].encode(), (CORPUS / entry["file"]).read_bytes(), NOW)


def _assert_points(family: str, expected: dict[str, str], actual: dict[str, str]) -> None:
    assert set(expected) == set(actual), actual
    for point, text in expected.items():
        if point in CONVERTED.get(family, set()):
            assert Decimal(text) == Decimal(actual[point]), point
            assert "e" not in actual[point].lower(), point  # plain notation
        else:
            assert text == actual[point], point


@pytest.mark.parametrize(
    "entry",
    [e for e in SAMPLES if e["is_reading"] and e.get("expected")],
    ids=lambda e: e["file"],
)
def test_presets_corpus_reading_digit_for_digit(entry: dict[str, Any]) -> None:
    """Test that a corpus reading maps to its expected device and points at the right time.

    Each value is digit for digit (converted values by exact decimal value).
    """
    readings = _sample(entry)
    assert 1 == len(readings)
    (reading,) = readings
    assert entry["expected"]["deviceId"] == reading.device_id
    assert "1" == reading.device_type
    _assert_points(entry["family"], entry["expected"]["points"], reading.data)
    assert RECORD_TIMES.get(entry["file"], reading.record_time) == reading.record_time
    if any(k in entry.get("note", "") for k in ("no time", "receive time")):
        assert NOW_TIME == reading.record_time


@pytest.mark.parametrize("file", sorted(SEVERAL))
def test_presets_corpus_several_readings_a_message(file: str) -> None:
    """Test that a batch, a gateway pack and gateway telemetry give a reading per device and time.

    Each is exact; a gateway's own string-only status gives none.
    """
    (entry,) = [e for e in SAMPLES if e["file"] == file]
    actual = [(r.device_id, r.record_time, r.data) for r in _sample(entry)]
    assert SEVERAL[file] == actual


@pytest.mark.parametrize(
    "entry",
    [e for e in SAMPLES if e["is_reading"] and not e.get("expected") and e["file"] not in SEVERAL],
    ids=lambda e: e["file"],
)
def test_presets_corpus_reading_without_expectation_is_never_rejected(
    entry: dict[str, Any],
) -> None:
    """Test that a corpus message without an indexed mapping maps or is skipped, never rejected.

    It is skipped for a quantity without a type-1 point or a copy on another topic; never
    dead-lettered.
    """
    try:
        readings = _sample(entry)
    except MessageSkipped as exc:
        assert exc.reason in {"unmapped", "duplicate"}  # noqa: PT017
        return
    assert readings
    assert all(r.data for r in readings)


@pytest.mark.parametrize(
    "entry", [e for e in SAMPLES if not e["is_reading"]], ids=lambda e: e["file"]
)
def test_presets_corpus_non_reading_is_skipped_with_a_reason(entry: dict[str, Any]) -> None:
    """Test that a corpus message that is not a reading is skipped with a known reason.

    LWT, STATE, online, Homie `$`, bridge state, null values, replies: skipped, not rejected.
    """
    with pytest.raises(MessageSkipped) as info:
        _sample(entry)
    assert info.value.reason in SKIP_REASONS


def test_presets_corpus_covers_every_preset() -> None:
    """Test that every preset has corpus samples, readings and non-readings both."""
    for name in PRESETS:
        assert {True, False} == {e["is_reading"] for e in SAMPLES if e["family"] == name}, name


@pytest.mark.parametrize(
    ("entry_file", "reason"),
    [
        ("tasmota/lwt_online.txt", "availability"),
        ("tasmota/sonoff_pow_state.json", "device_state"),
        ("shelly-gen2/plus1_online.txt", "availability"),
        ("shelly-gen2/plus1_notifystatus_switch_temperature.json", "unmapped"),
        ("shelly-gen1/em3_online_true.txt", "availability"),
        ("mbmd/homie_name.txt", "metadata"),
        ("mbmd/homie_property_value.txt", "duplicate"),
        ("zigbee2mqtt/device_availability.json", "availability"),
        ("victron/pvinverter_l2_power_null.json", "no_value"),
        ("victron/pvinverter_ac_power_empty.txt", "no_value"),
        ("alink/batch_post_reply.json", "device_state"),
        ("thingsboard/gateway_connect.json", "device_state"),
        ("neuron/values_format_all_errors.json", "unmapped"),
    ],
)
def test_presets_skip_reason_names_the_kind_of_message(entry_file: str, reason: str) -> None:
    """Test that each kind of non-reading is counted under its own reason."""
    (entry,) = [e for e in SAMPLES if e["file"] == entry_file]
    with pytest.raises(MessageSkipped) as info:
        _sample(entry)
    assert reason == info.value.reason


def test_presets_home_assistant_discovery_is_metadata() -> None:
    """Test that a Home Assistant discovery config on a preset's topic is skipped."""
    mapper = _mapper("zigbee2mqtt", topic="homeassistant/#")
    with pytest.raises(MessageSkipped) as info:
        mapper.map(b"homeassistant/sensor/0x00158d/power/config", b'{"name":"power"}', NOW)
    assert "metadata" == info.value.reason


# --- topics and maps -------------------------------------------------------------------------


def test_presets_route_without_topic_subscribes_to_the_presets_topics() -> None:
    """Test that a preset route without topic takes every default topic of the preset.

    An explicit topic replaces them.
    """
    assert ["+/status/+", "+/events/rpc", "+/online"] == _mapper("shelly-gen2").subscriptions
    assert ["tele/+/#"] == _mapper("tasmota").subscriptions
    assert ["/sys/+/+/thing/event/property/#"] == _mapper("alink").subscriptions
    explicit = _mapper("tasmota", topic="{deviceId}/tele/SENSOR")
    assert ["+/tele/SENSOR"] == explicit.subscriptions
    with pytest.raises(MappingError, match="no_route"):
        explicit.map(b"tele/pow1/SENSOR", b'{"ENERGY":{"Voltage":230}}', NOW)


def test_presets_route_defaults_to_device_type_1() -> None:
    """Test that a preset route needs no device_type: its map is for type-1 points."""
    assert "1" == Route(format=PayloadFormat.TASMOTA).device_type
    assert "7" == Route(format=PayloadFormat.TASMOTA, device_type="7").device_type


def test_presets_route_points_replace_the_presets_map() -> None:
    """Test that a route's points replace the preset's map: only the named points are sent.

    They are read from paths into the preset's records.
    """
    mapper = _mapper(
        "tasmota",
        points={"Ua": "ENERGY.Voltage", "S": {"path": "ENERGY.ApparentPower", "scale": "0.001"}},
    )
    payload = (CORPUS / "tasmota/pow_r2_single_phase.json").read_bytes()
    (reading,) = mapper.map(b"tele/pow1/SENSOR", payload, NOW)
    assert {"Ua": "227", "S": "2.650"} == reading.data
    assert "2018-02-15 17:37:10" == reading.record_time


def test_presets_route_points_name_per_point_sources() -> None:
    """Test that on a per-point preset a route's points read the nested topic levels."""
    mapper = _mapper("shelly-gen1", points={"Pb": {"path": 'emeter."1".power', "scale": "0.001"}})
    (reading,) = mapper.map(b"shellies/em3/emeter/1/power", b"1200.5", NOW)
    assert {"Pb": "1.2005"} == reading.data


def test_presets_identity_families_send_numeric_values_under_their_names() -> None:
    """Test that Neuron, Alink and ThingsBoard send every numeric value under its own name.

    Strings, booleans and objects are skipped; `points` maps EE point: source name.
    """
    payload = b'{"ts":1788945240000,"values":{"voltage_a":230.1,"state":"ON","ok":true}}'
    (reading,) = _mapper("thingsboard").map(b"v1/devices/m1/telemetry", payload, NOW)
    assert {"voltage_a": "230.1"} == reading.data
    (renamed,) = _mapper("thingsboard", points={"Ua": "voltage_a"}).map(
        b"v1/devices/m1/telemetry", payload, NOW
    )
    assert {"Ua": "230.1"} == renamed.data


def test_presets_align_secs_merges_per_point_messages() -> None:
    """Test that align_secs on a per-point preset gives its readings one aligned time and a hold.

    So the batcher merges them into one entry.
    """
    mapper = _mapper("mbmd", align_secs=10)
    first = mapper.map(b"mbmd/sdm1-1/Voltage/L1", b"231.400", NOW)[0]
    second = mapper.map(b"mbmd/sdm1-1/Current/L1", b"1.250", NOW + 3)[0]
    assert first.record_time == second.record_time == "2026-09-09 17:15:00"
    assert first.hold_until == second.hold_until == 1_788_945_310


def test_presets_tasmota_two_channel_arrays_are_summed() -> None:
    """Test that a Tasmota with two channels (Power [a, b]) sends their exact sum as P."""
    payload = b'{"Time":"2024-01-01T00:00:00","ENERGY":{"Power":[12.5,0.75],"Voltage":230}}'
    (reading,) = _mapper("tasmota").map(b"tele/plug/SENSOR", payload, NOW)
    assert {"Ua": "230", "P": "0.01325", "Pa": "0.0125"} == reading.data


def test_presets_neuron_tag_in_errors_is_never_sent() -> None:
    """Test that a Neuron tag listed in errors is left out even when values has it too."""
    payload = b'{"timestamp":1788945292880,"node":"m","values":{"Ua":1,"Ia":2},"errors":{"Ia":1}}'
    (reading,) = _mapper("neuron").map(b"/neuron/mqtt", payload, NOW)
    assert {"Ua": "1"} == reading.data


@pytest.mark.parametrize(
    ("fields", "key"),
    [
        ({"records": "a"}, "routes[0]"),
        ({"device_id": "a"}, "routes[0]"),
        ({"time": "a"}, "routes[0]"),
        ({"topic": "a/#/b"}, "routes[0].topic"),
        ({"format": "json", "topic": "a/{deviceId}/#", "device_type": "1"}, "routes[0].topic"),
        ({"format": "tasmotta"}, "routes[0].format"),
    ],
)
def test_presets_config_errors_name_their_key(
    tmp_path: Path, fields: dict[str, Any], key: str
) -> None:
    """Test that what a preset route cannot take is refused at load, naming the key."""
    from bridge.config import load_settings  # noqa: PLC0415

    route = {"format": "tasmota", **fields}
    config = tmp_path / "c.yaml"
    config.write_text(json.dumps({"routes": [route]}), encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_settings(config)
    assert key == info.value.key


# --- property ----------------------------------------------------------------------------------

_NAMES = ["SENSOR", "LWT", "STATE", "status", "em:0", "emdata:0", "events", "rpc", "online",
          "emeter", "0", "1", "voltage", "power", "Voltage", "L1", "Power", "Ac", "Energy",
          "meter", "$name", "availability", "bridge", "telemetry", "gateway", "post", "batch",
          "pack", "post_reply", "config", "x"]  # fmt: skip
_KEYS = ["ENERGY", "Time", "Voltage", "Power", "Total", "Factor", "value", "values", "ts",
         "time", "params", "properties", "subDevices", "identity", "deviceName", "method",
         "src", "node", "tags", "name", "errors", "timestamp", "em:0", "a_voltage",
         "total_act_power", "voltage", "power", "Device A", ""]  # fmt: skip
_JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(10**20), 10**20)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=6)
    | st.sampled_from(["NotifyStatus", "1757059829.08", "2018-02-15T17:37:10", "1e999", "x"]),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.sampled_from(_KEYS) | st.text(max_size=3), inner, max_size=5)
    ),
    max_leaves=30,
)


@st.composite
def _topics(draw: st.DrawFn, template: str) -> str:
    levels = []
    for level in template.split("/"):
        if level == "#":
            levels += draw(st.lists(st.sampled_from(_NAMES) | st.text(max_size=3), max_size=4))
        elif level in {"+", "{deviceId}"}:
            levels.append(draw(st.sampled_from(["bridge", "dev-1", ""]) | st.text(max_size=4)))
        else:
            levels.append(level)
    return "/".join(levels)


_PRESET_TOPICS = st.sampled_from(
    [(name, topic) for name, preset in PRESETS.items() for topic in preset.topics]
)


@settings(max_examples=400, deadline=None)
@given(
    data=st.data(),
    preset_topic=_PRESET_TOPICS,
    doc=_JSON,
    raw=st.none() | st.binary(max_size=8),
)
def test_presets_property_any_json_on_any_preset_topic_gives_readings_a_skip_or_a_reason(
    data: st.DataObject, preset_topic: tuple[str, str], doc: object, raw: bytes | None
) -> None:
    """Test that any JSON on any preset topic gives readings, a skip or a rejection, with reason.

    This holds for bytes too; the reasons are known ones, and nothing else happens.
    """
    name, template = preset_topic
    topic = data.draw(_topics(template))
    payload = raw if raw is not None else json.dumps(doc).encode()
    mapper = _mapper(name)
    try:
        readings = mapper.map(topic.encode("utf-8", "surrogatepass"), payload, NOW)
    except MessageSkipped as exc:
        assert exc.reason in SKIP_REASONS  # noqa: PT017 - any input: one of three outcomes
        return
    except MappingError as exc:
        assert exc.reason in REASONS  # noqa: PT017
        return
    assert readings
    for reading in readings:
        assert reading.data
        assert reading.device_id
        assert 19 == len(reading.record_time)
        reading.data_json.decode()


def test_presets_every_preset_is_a_format() -> None:
    """Test that every preset can be named as a route's format, and only presets are."""
    assert set(PRESETS) == {f.value for f in PayloadFormat if f.preset}
    assert not PayloadFormat.JSON.preset
    assert not PayloadFormat.VALUE.preset
