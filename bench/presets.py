"""Micro-benchmark of ``Mapper.map`` for the presets beside the flat and generic routes.

Each route maps its own realistic payload (the flat route: the load generator's ten points plus
``seq``; the presets: corpus samples) in rounds that interleave the routes, so a shared, noisy
machine slows them alike; the result per route is the median over the rounds. CPU time of this
process (``time.process_time``) is the clock: other processes on the machine do not count.

Run as a file so that ``PYTHONPATH`` can point at another checkout for an A/B comparison::

    .venv/bin/python bench/presets.py                         # every route, 15 rounds
    PYTHONPATH=/tmp/other .venv/bin/python bench/presets.py --routes flat,generic

It prints one JSON line per route: ``{"route", "messages_per_cpu_s", "us_per_message",
"rounds_messages_per_cpu_s"}``, then one line naming the code that ran.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import bridge
from bridge.config import Route
from bridge.intake.mapping import Mapper

CORPUS = Path(__file__).parents[1] / "tests" / "data" / "payloads"
NOW = 1_788_945_300.0

_FLAT = (
    b'{"ts": %d, "Ua": 230.12, "Ub": 229.87, "Uc": 231.05, "Ia": 4.501, "Ib": 4.488,'
    b' "Ic": 4.512, "P": 3.106, "Q": 0.512, "F": 50.00, "Ep_imp": 15234.75, "seq": %d}'
)
_GENERIC = (
    b'{"reported": {"meters": [{"addr": "COM-001", "timestamp": 20240101120005, "Ua": 230.10,'
    b' "ENERGY": {"Current": [1.250, 1.1, 1.2], "Power": 2635, "Total": [100.001, 200.002,'
    b" 300.0030]}}]}}"
)


def _sample(file: str) -> bytes:
    return (CORPUS / file).read_bytes()


def _cases() -> dict[str, tuple[dict[str, Any], bytes, bytes]]:
    """Route name -> (route fields, topic, payload)."""
    cases: dict[str, tuple[dict[str, Any], bytes, bytes]] = {
        "flat": ({}, b"meters/1/meter-0007/telemetry", _FLAT % (1_788_945_240, 7)),
        "generic": (
            {
                "topic": "gw/{deviceId}/data",
                "device_type": "1",
                "records": "reported.meters",
                "device_id": "addr",
                "time": "timestamp",
                "time_format": "%Y%m%d%H%M%S",
                "points": {
                    "Ua": "Ua",
                    "Ia": "ENERGY.Current[0]",
                    "P": {"path": "ENERGY.Power", "scale": "0.001"},
                    "Ep_imp": {"sum": ["ENERGY.Total[0]", "ENERGY.Total[1]", "ENERGY.Total[2]"]},
                },
            },
            b"gw/gw-1/data",
            _GENERIC,
        ),
    }
    try:
        from bridge.intake.presets import PRESETS  # noqa: PLC0415 - absent before presets
    except ImportError:
        return cases
    if "tasmota" in PRESETS:
        cases["tasmota"] = (
            {"format": "tasmota"},
            b"tele/pow1/SENSOR",
            _sample("tasmota/pow_r2_single_phase.json"),
        )
        cases["tasmota-3phase"] = (
            {"format": "tasmota"},
            b"tele/tasmota/SENSOR",
            _sample("tasmota/three_phase_voltage_arrays.json"),
        )
        cases["shelly-gen2"] = (
            {"format": "shelly-gen2"},
            b"shellypro3em/status/em:0",
            _sample("shelly-gen2/pro3em_status_em0_getstatus.json"),
        )
        cases["mbmd"] = ({"format": "mbmd"}, b"mbmd/sdm1-1/Voltage/L1", b"231.400")
    return cases


def _runner(fields: dict[str, Any], topic: bytes, payload: bytes) -> Callable[[int], float]:
    mapper = Mapper([Route(**fields)], "Asia/Shanghai")
    mapper.map(topic, payload, NOW)  # warm the topic and time caches, as in a live bridge
    map_one = mapper.map

    def run(count: int) -> float:
        gc.disable()
        try:
            start = time.process_time()
            for _ in range(count):
                map_one(topic, payload, NOW)
            return time.process_time() - start
        finally:
            gc.enable()

    return run


def main(argv: list[str] | None = None) -> int:
    """Run the rounds and print the results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--routes", default="", help="comma-separated routes (default: all)")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--messages", type=int, default=20_000, help="per route and round")
    args = parser.parse_args(argv)
    cases = _cases()
    names = [n for n in args.routes.split(",") if n] or list(cases)
    runners = {name: _runner(*cases[name]) for name in names}
    rates: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(args.rounds):
        for name, run in runners.items():
            rates[name].append(args.messages / run(args.messages))
    for name in names:
        median = statistics.median(rates[name])
        line = {
            "route": name,
            "messages_per_cpu_s": round(median),
            "us_per_message": round(1e6 / median, 2),
            "rounds_messages_per_cpu_s": [round(r) for r in rates[name]],
        }
        print(json.dumps(line))
    print(json.dumps({"code": str(Path(bridge.__file__).parent), "python": sys.version.split()[0]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
