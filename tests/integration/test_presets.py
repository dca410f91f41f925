"""Presets end to end: corpus samples of every preset family on their own topics.

They are published to a private mosquitto, through the real bridge process to the cloud
stand-in.
"""

from __future__ import annotations

import json
import time
from decimal import Decimal
from pathlib import Path

import pytest

from bridge.intake.presets import PRESETS
from tests.support import BridgeFactory, Mosquitto, Publisher, StubProcess, wait_until

pytestmark = pytest.mark.integration

CORPUS = Path(__file__).parents[1] / "data" / "payloads"
INDEX = {e["file"]: e for e in json.loads((CORPUS / "index.json").read_text(encoding="utf-8"))}

# One route per family, each with the preset's default topics (no topic, no device_type).
ROUTES = [{"format": name} for name in PRESETS]

READINGS = [
    "tasmota/pow_r2_single_phase.json",
    "tasmota/three_phase_voltage_arrays.json",
    "shelly-gen2/pro3em_status_em0.json",
    "shelly-gen2/pro3em_status_emdata0.json",
    "shelly-gen1/em3_emeter0_voltage.txt",
    "shelly-gen1/em3_emeter1_voltage.txt",
    "shelly-gen1/em3_emeter2_voltage.txt",
    "shelly-gen1/em3_emeter0_current.txt",
    "mbmd/sdm1-1_Voltage_L1.txt",
    "mbmd/sdm1-1_Power.txt",
    "mbmd/sdm1-1_Import.txt",
    "zigbee2mqtt/spm02v2_three_phase_abc.json",
    "victron/grid30_Ac_L1_Voltage.json",
    "victron/grid30_Ac_L1_Current.json",
    "victron/grid30_Ac_Power.json",
    "victron/grid30_Ac_Energy_Reverse.json",
    "neuron/values_format_meter.json",
    "alink/property_post_flat_meter.json",
    "thingsboard/device_ts_values.json",
]
# Several devices in one message: what the index gives in its note.
GATEWAYS = {
    "alink/pack_post_gateway_two_meters.json": {
        "meter-A": {"Ua": "229.8", "Ia": "12.35", "Ep_imp": "40213.27"},
        "meter-B": {"Ua": "231.2", "Ia": "3.02", "Ep_imp": "812.5"},
    },
    "thingsboard/gateway_meter_made_up.json": {
        "Meter-01": {
            "Ua": "230.12",
            "Ub": "229.87",
            "Uc": "231.05",
            "Ia": "4.501",
            "P": "3.106",
            "Ep_imp": "15234.75",
        },
        "Meter-02": {"Ua": "229.5", "Ia": "0.82", "P": "0.188", "Ep_imp": "907.1"},
    },
}
NON_READINGS = {
    "tasmota/lwt_online.txt": "availability",
    "tasmota/sonoff_pow_state.json": "device_state",
    "shelly-gen2/plus1_online.txt": "availability",
    "shelly-gen1/em3_online_true.txt": "availability",
    "mbmd/homie_name.txt": "metadata",
    "mbmd/status_connected.txt": "availability",
    "zigbee2mqtt/device_availability.json": "availability",
    "victron/pvinverter_l2_power_null.json": "no_value",
    "victron/pvinverter_ac_power_empty.txt": "no_value",
    "neuron/values_format_all_errors.json": "unmapped",
    "alink/batch_post_reply.json": "device_state",
    "thingsboard/gateway_connect.json": "device_state",
}
RECORD_TIMES = {
    "pow1": "2018-02-15 17:37:10",  # Tasmota Time, naive local (Asia/Shanghai)
    "tasmota": "2025-02-16 21:28:28",
    "meter-01": "2026-09-09 17:14:52",  # Neuron timestamp 1788945292880 ms
    "meter-A": "2026-09-09 17:14:00",  # Alink time 1788945240000 ms
    "me": "2016-01-01 20:00:00",  # ThingsBoard ts 1451649600512 ms
}


def _expected() -> dict[str, dict[str, str]]:
    """The points each device must arrive with (a device's per-point messages merged)."""
    devices: dict[str, dict[str, str]] = {}
    for file in READINGS:
        expected = INDEX[file]["expected"]
        devices.setdefault(expected["deviceId"], {}).update(expected["points"])
    for meters in GATEWAYS.values():
        for device, points in meters.items():
            devices.setdefault(device, {}).update(points)
    return devices


def test_presets_every_family_through_the_bridge_digit_for_digit(
    mosquitto: Mosquitto, stub: StubProcess, bridge_factory: BridgeFactory
) -> None:
    """Test that every preset family's corpus samples arrive exact and non-readings are skipped.

    Samples on the families' own topics reach the stand-in with every value exact (converted
    ones by decimal value) and the device's time; the families' non-readings are skipped by
    reason, none dead-lettered.
    """
    bridge = bridge_factory(routes=ROUTES, batch={"linger_secs": 1})
    files = [*READINGS, *GATEWAYS, *NON_READINGS]
    with Publisher(mosquitto.host, mosquitto.port) as pub:
        pub.publish_many([(INDEX[f]["topic"], (CORPUS / f).read_bytes()) for f in files])
    expected = _expected()
    wait_until(
        lambda: (
            bridge.metric("bridge_messages_skipped_total") >= len(NON_READINGS)
            and {e["deviceId"] for e in stub.received()} >= set(expected)
        ),
        60,
        message="every device delivered and every non-reading skipped",
    )
    time.sleep(1.5)  # a further entry would arrive within the linger

    arrived: dict[str, dict[str, str]] = {}
    for entry in stub.received():
        assert "1" == entry["deviceType"]
        device = entry["deviceId"]
        if device in RECORD_TIMES:
            assert RECORD_TIMES[device] == entry["recordTime"], device
        arrived.setdefault(device, {}).update(entry["data"])
    assert set(expected) == set(arrived)
    for device, points in expected.items():
        assert set(points) == set(arrived[device]), device
        for point, text in points.items():
            actual = arrived[device][point]
            assert Decimal(text) == Decimal(actual), (device, point)
            if text != actual:  # only a conversion may change the text, never the value
                assert point in {"P", "Pa", "Q", "Ep_imp", "Ep_exp"}, (device, point, actual)
    for reason in set(NON_READINGS.values()):
        count = sum(1 for r in NON_READINGS.values() if r == reason)
        assert count == bridge.metric("bridge_messages_skipped_total", reason=reason), reason
    assert 0 == bridge.metric("bridge_messages_rejected_total")
    assert 0 == bridge.metric("bridge_dead_letters", source="mapping")
