"""The generic mapping end to end: the issue's route, exactly as written.

It runs through the real bridge process, mosquitto and the cloud stand-in.
"""

from __future__ import annotations

import time

import pytest
import yaml

from tests.support import BridgeFactory, Mosquitto, Publisher, StubProcess, wait_until

pytestmark = pytest.mark.integration

ISSUE_ROUTES = """\
routes:
  - topic: "gw/{deviceId}/data"        # the existing template syntax
    device_type: "1"
    format: json                       # json | value | a preset name (section 2)
    records: "reported.meters"         # optional path to an array of records (or one object)
    device_id: "addr"                  # optional path inside a record; else the topic's {deviceId}
    time: "timestamp"                  # optional path of the time inside a record
    time_format: "%Y%m%d%H%M%S"        # optional, for times that are not epoch / ISO / "Y-m-d H:M:S"
    align_secs: 60                     # optional: floor recordTime to a multiple (merges partial messages)
    points:                            # optional: exactly these Energy Expert points, from these paths
      Ua: "Ua"
      Ia: "ENERGY.Current[0]"
      P:  {path: "ENERGY.Power", scale: "0.001"}                 # W -> kW, exact decimal
      Ep_imp: {sum: ["ENERGY.Total[0]", "ENERGY.Total[1]", "ENERGY.Total[2]"]}
    ignore: ["state", "unit"]          # without `points`: keys skipped, not rejected
    on_non_numeric: reject             # without `points`: reject (today's rule) | skip
"""  # noqa: E501 - the issue's text as written

TWO_METERS = b"""{"reported": {"meters": [
  {"addr": "COM-001", "timestamp": 20240101120005, "Ua": 230.10, "state": "ON",
   "ENERGY": {"Current": [1.250, 1.1, 1.2], "Power": 2635, "Total": [100.001, 200.002, 300.0030]}},
  {"addr": "COM-002", "timestamp": "20240101120017", "Ua": "229.9", "unit": "V",
   "ENERGY": {"Current": [0.50, 0.4, 0.3], "Power": 12.5, "Total": [0.1, 0.2, 0.3]}}
]}}"""
# The same gateway, 30 s later in the same minute: one meter's current only (a partial message).
PARTIAL = b"""{"reported": {"meters": [
  {"addr": "COM-001", "timestamp": "20240101120035", "ENERGY": {"Current": [1.300]}}
]}}"""


def test_generic_issue_route_delivers_two_meters_digit_for_digit(
    mosquitto: Mosquitto, stub: StubProcess, bridge_factory: BridgeFactory
) -> None:
    """Test that the issue's route, as written, makes one exact entry per meter and minute.

    A gateway message with two meters and a partial message of the same minute become one entry
    per meter, every value exact.
    """
    bridge = bridge_factory(routes=yaml.safe_load(ISSUE_ROUTES)["routes"], batch={"linger_secs": 2})
    with Publisher(mosquitto.host, mosquitto.port) as pub:
        pub.publish_many([("gw/gw-1/data", TWO_METERS), ("gw/gw-1/data", PARTIAL)])
    wait_until(
        lambda: bridge.metric("bridge_readings_delivered_total") >= 3, 30, message="delivered"
    )
    time.sleep(1.0)  # a second entry for a meter would arrive within the linger

    entries = sorted(stub.received(), key=lambda e: e["deviceId"])
    assert [
        {
            "deviceType": "1",
            "deviceId": "COM-001",
            "recordTime": "2024-01-01 12:00:00",
            "data": {"Ua": "230.10", "Ia": "1.300", "P": "2.635", "Ep_imp": "600.0060"},
        },
        {
            "deviceType": "1",
            "deviceId": "COM-002",
            "recordTime": "2024-01-01 12:00:00",
            "data": {"Ua": "229.9", "Ia": "0.50", "P": "0.0125", "Ep_imp": "0.6"},
        },
    ] == [{k: e[k] for k in ("deviceType", "deviceId", "recordTime", "data")} for e in entries]
    assert 0 == bridge.metric("bridge_messages_rejected_total")
