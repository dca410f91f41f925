"""Sparkplug B routes: births and DATA -> readings, alias state, skips, rejects, rebirths.

Payloads are written with Google's protobuf runtime (tests/support/sparkplug.py); metric and
node names are invented (Sparkplug has no standard names for meter quantities).
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bridge.config import PayloadFormat, Route
from bridge.intake.sparkplug import REBIRTH_METRIC, decode_payload
from bridge.intake.sparkplug_route import REBIRTH_INTERVAL_SECS, Outcome, SparkplugIntake
from tests.support.sparkplug import BOOLEAN, DOUBLE, FLOAT, INT32, INT64, STRING, spb

T_MS = 1_700_000_000_000  # 2023-11-14 22:13:20 UTC = 2023-11-15 06:13:20 in Asia/Shanghai
NOW = 1_700_000_100.0

NBIRTH = spb(
    {"name": "bdSeq", "datatype": INT64, "long_value": 0},
    {"name": "Node Control/Rebirth", "datatype": BOOLEAN, "boolean_value": False},
    {"name": "Cabinet/Temperature", "alias": 9, "datatype": DOUBLE, "double_value": 31.5},
    timestamp=T_MS,
    seq=0,
)
DBIRTH = spb(
    {"name": "Voltage", "alias": 1, "datatype": FLOAT, "float_value": 230.0},
    {"name": "Power", "alias": 2, "datatype": INT32, "int_value": 1500},
    {"name": "Model", "alias": 3, "datatype": STRING, "string_value": "DTSU666"},
    timestamp=T_MS,
    seq=1,
)
DDATA = spb(
    {"alias": 2, "timestamp": T_MS + 60_000, "datatype": INT32, "int_value": 4294967178},
    {"alias": 1, "timestamp": T_MS + 60_000, "datatype": FLOAT, "float_value": 229.3},
    timestamp=T_MS + 61_000,
    seq=2,
)
N = "spBv1.0/plant/NBIRTH/edge-1"
D = "spBv1.0/plant/DBIRTH/edge-1/meter-1"
DD = "spBv1.0/plant/DDATA/edge-1/meter-1"


class Clock:
    """A hand-moved monotonic clock."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        """The time the test last set."""
        return self.now


def _intake(
    published: list[tuple[str, bytes]] | None = None, clock: Clock | None = None, **route: Any
) -> SparkplugIntake:
    sent = published if published is not None else []

    def publish(topic: str, payload: bytes) -> bool:
        sent.append((topic, payload))
        return True

    return SparkplugIntake(
        [Route(format=PayloadFormat.SPARKPLUG_B, device_type="1", **route)],
        "Asia/Shanghai",
        publish=publish,
        clock=clock or Clock(),
    )


def _map(intake: SparkplugIntake, topic: str, payload: bytes) -> Outcome:
    outcome = intake.map(topic.encode(), payload, NOW)
    assert outcome is not None
    return outcome


def _entries(outcome: Outcome) -> list[tuple[str | None, str, dict[str, str]]]:
    return [(r.device_id, r.record_time, r.data) for r in outcome.readings]


def test_sparkplug_route_births_and_alias_only_data_become_exact_readings() -> None:
    """Test that births are readings and an alias-only DDATA is read with its DBIRTH's types.

    Int32 -118 (4294967178 on the wire) reads as "-118", Float 229.3 as "229.3"; node messages
    get the edge node's id, device messages edge/device.
    """
    intake = _intake()

    births = _entries(_map(intake, N, NBIRTH)) + _entries(_map(intake, D, DBIRTH))
    data = _map(intake, DD, DDATA)

    assert [
        ("edge-1", "2023-11-15 06:13:20", {"Cabinet/Temperature": "31.5"}),
        ("edge-1/meter-1", "2023-11-15 06:13:20", {"Voltage": "230", "Power": "1500"}),
    ] == births
    assert [("edge-1/meter-1", "2023-11-15 06:14:20", {"Power": "-118", "Voltage": "229.3"})] == (
        _entries(data)
    )
    assert ("1", None, None) == (data.readings[0].device_type, data.skipped, data.error)


def test_sparkplug_route_metric_timestamps_split_readings_and_payload_time_is_the_fallback() -> (
    None
):
    """Test that metrics with different timestamps make one reading each.

    A metric without its own timestamp takes the payload's.
    """
    intake = _intake()
    _map(intake, D, DBIRTH)
    payload = spb(
        {"alias": 1, "timestamp": T_MS, "float_value": 229.5},
        {"alias": 2, "int_value": 7},
        timestamp=T_MS + 1_000,
    )

    outcome = _map(intake, DD, payload)

    assert [
        ("edge-1/meter-1", "2023-11-15 06:13:20", {"Voltage": "229.5"}),
        ("edge-1/meter-1", "2023-11-15 06:13:21", {"Power": "7"}),
    ] == _entries(outcome)


def test_sparkplug_route_points_pick_and_rename_metrics() -> None:
    """Test that a route's points (EE point: metric name) send exactly those points."""
    intake = _intake(points={"Ua": "Voltage", "P": "Power"})
    _map(intake, D, DBIRTH)

    outcome = _map(intake, DD, DDATA)

    assert [{"P": "-118", "Ua": "229.3"}] == [r.data for r in outcome.readings]


def test_sparkplug_route_alias_changes_are_returned_for_the_spool() -> None:
    """Test that an NBIRTH reports a reset then its aliases, and a DBIRTH its aliases."""
    intake = _intake()

    node = _map(intake, N, NBIRTH).aliases
    device = _map(intake, D, DBIRTH).aliases

    assert [("plant/edge-1", None, "", 0), ("plant/edge-1", 9, "Cabinet/Temperature", DOUBLE)] == (
        node
    )
    assert [
        ("plant/edge-1", 1, "Voltage", FLOAT),
        ("plant/edge-1", 2, "Power", INT32),
        ("plant/edge-1", 3, "Model", STRING),
    ] == device


def test_sparkplug_route_loaded_aliases_decode_data_after_a_restart() -> None:
    """Test that alias changes loaded into a new intake decode a later DDATA, as at a restart.

    The changes a first intake returned are loaded into a new one, as from the spool.
    """
    first = _intake()
    rows = _map(first, N, NBIRTH).aliases + _map(first, D, DBIRTH).aliases
    second = _intake()

    second.load(rows)

    assert [{"Power": "-118", "Voltage": "229.3"}] == [
        r.data for r in _map(second, DD, DDATA).readings
    ]


def test_sparkplug_route_unknown_alias_is_rejected_and_a_rebirth_requested_once() -> None:
    """Test that a DATA with an undefined alias is rejected, and rebirth asked once per interval.

    It is rejected as unknown_alias; on a route with request_rebirth the node is asked for its
    births (NCMD Node Control/Rebirth) once per interval, not once per message.
    """
    published: list[tuple[str, bytes]] = []
    clock = Clock()
    intake = _intake(published, clock, request_rebirth=True)

    first = _map(intake, DD, DDATA)
    _map(intake, DD, DDATA)
    clock.now += REBIRTH_INTERVAL_SECS
    _map(intake, DD, DDATA)

    assert first.error is not None
    assert ("unknown_alias", []) == (first.error.reason, first.readings)
    assert ["spBv1.0/plant/NCMD/edge-1"] * 2 == [topic for topic, _ in published]
    (metric,) = decode_payload(published[0][1]).metrics
    assert (REBIRTH_METRIC, BOOLEAN, True) == (metric.name, metric.datatype, metric.value)


def test_sparkplug_route_without_request_rebirth_asks_nothing() -> None:
    """Test that an unknown alias on a route without request_rebirth publishes nothing."""
    published: list[tuple[str, bytes]] = []
    intake = _intake(published)

    outcome = _map(intake, DD, DDATA)

    assert (["unknown_alias"], []) == ([outcome.error.reason if outcome.error else ""], published)


def test_sparkplug_route_new_nbirth_forgets_the_nodes_aliases() -> None:
    """Test that a new NBIRTH resets the node's aliases: the old DBIRTH's no longer resolve."""
    intake = _intake()
    _map(intake, N, NBIRTH)
    _map(intake, D, DBIRTH)

    _map(intake, N, NBIRTH)
    outcome = _map(intake, DD, DDATA)

    assert outcome.error is not None
    assert "unknown_alias" == outcome.error.reason


@pytest.mark.parametrize(
    ("topic", "reason"),
    [
        ("spBv1.0/plant/NDEATH/edge-1", "sparkplug_ndeath"),
        ("spBv1.0/plant/DDEATH/edge-1/meter-1", "sparkplug_ddeath"),
        ("spBv1.0/plant/NCMD/edge-1", "sparkplug_ncmd"),
        ("spBv1.0/plant/DCMD/edge-1/meter-1", "sparkplug_dcmd"),
        ("spBv1.0/STATE/scada-1", "sparkplug_state"),
    ],
)
def test_sparkplug_route_messages_that_are_not_readings_are_skipped(
    topic: str, reason: str
) -> None:
    """Test that deaths, commands and host STATE are skipped by reason, not rejected."""
    outcome = _map(_intake(), topic, spb({"name": "bdSeq", "datatype": INT64, "long_value": 3}))

    assert (reason, None, []) == (outcome.skipped, outcome.error, outcome.readings)


def test_sparkplug_route_data_without_numbers_is_skipped() -> None:
    """Test that a DATA whose metrics carry no number (a string, a null) is skipped."""
    intake = _intake()
    _map(intake, D, DBIRTH)

    outcome = _map(
        intake, DD, spb({"alias": 3, "string_value": "x"}, {"alias": 1, "is_null": True})
    )

    assert ("sparkplug_no_values", None) == (outcome.skipped, outcome.error)


@pytest.mark.parametrize(
    ("topic", "payload", "reason"),
    [
        (DD, b"\x12\x05\x0a", "bad_sparkplug"),  # a length past the end
        ("spBv1.0/plant/DDATA/edge-1", DDATA, "bad_sparkplug"),  # DDATA without a device
        ("spBv1.0/plant/NDATA/edge-1/meter-1", DDATA, "bad_sparkplug"),
        ("spBv1.0/plant/FOO/edge-1", DDATA, "bad_sparkplug"),
        ("spBv1.0/plant", DDATA, "bad_sparkplug"),
        (DD, b"", "empty_payload"),
        (DD, spb({"name": "V", "float_value": 1.0}, timestamp=1000), "bad_time"),
    ],
)
def test_sparkplug_route_bad_messages_are_rejected_with_a_reason(
    topic: str, payload: bytes, reason: str
) -> None:
    """Test that malformed Sparkplug messages get a reject reason, never an exception."""
    outcome = _map(_intake(), topic, payload)

    assert outcome.error is not None
    assert (reason, []) == (outcome.error.reason, outcome.readings)


def test_sparkplug_route_with_a_group_takes_only_that_group() -> None:
    """Test that a route with sparkplug_group subscribes to its group only.

    Other topics are left to other routes.
    """
    route = Route(format=PayloadFormat.SPARKPLUG_B, device_type="1", sparkplug_group="plant")
    intake = SparkplugIntake([route], "Asia/Shanghai")

    assert "spBv1.0/plant/#" == route.subscription
    assert intake.map(b"spBv1.0/other/NBIRTH/edge-1", NBIRTH, NOW) is None
    assert intake.map(b"meters/1/m/telemetry", b"{}", NOW) is None
    assert ["spBv1.0/plant/#"] == [
        intake.route_of(b"spBv1.0/plant/NBIRTH/edge-1"),
    ]


def test_sparkplug_route_named_data_metrics_need_no_birth() -> None:
    """Test that DATA metrics sent with their names (no aliases) map without any birth."""
    outcome = _map(
        _intake(),
        "spBv1.0/plant/NDATA/edge-2",
        spb({"name": "Ua", "datatype": FLOAT, "float_value": 229.3}, timestamp=T_MS),
    )

    assert [("edge-2", "2023-11-15 06:13:20", {"Ua": "229.3"})] == _entries(outcome)


@settings(max_examples=300, deadline=None)
@given(
    kind=st.sampled_from(["NBIRTH", "DBIRTH", "NDATA", "DDATA", "NDEATH", "XDATA", "STATE"]),
    device=st.sampled_from(["", "/meter-1", "/a/b"]),
    payload=st.binary(max_size=200),
)
def test_sparkplug_route_never_raises_on_any_payload(
    kind: str, device: str, payload: bytes
) -> None:
    """Test that any bytes on any Sparkplug topic give readings, a skip or a reason, never raise.

    The alias state stays usable afterwards.
    """
    intake = _intake(request_rebirth=True)
    _map(intake, D, DBIRTH)

    outcome = _map(intake, f"spBv1.0/plant/{kind}/edge-1{device}", payload)

    assert (outcome.error is None) or (outcome.readings == [] and outcome.skipped is None)
    if "BIRTH" not in kind:  # a birth may define the aliases anew
        assert [{"Power": "-118", "Voltage": "229.3"}] == [
            r.data for r in _map(intake, DD, DDATA).readings
        ]
