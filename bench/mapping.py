"""``python -m bench.mapping``: CPU time of :meth:`Mapper.map` per message, in one process.

The flat route (the default, the live hot path) on a 12-point telemetry payload, the same
payload through a generic route (``ignore`` set), and the issue's generic route (records,
device_id, time_format, align_secs, points with a sum and a scale) on a two-meter gateway
message. Process CPU time, rounds interleaved, the minimum and median reported: on a shared
machine the minimum is the number to compare between commits.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Sequence

from bridge.config import PointSource, Route
from bridge.intake.mapping import Mapper
from bridge.testing.payloads import telemetry_payload

GATEWAY = b"""{"reported": {"meters": [
  {"addr": "COM-001", "timestamp": 20240101120005, "Ua": 230.10, "state": "ON",
   "ENERGY": {"Current": [1.250, 1.1, 1.2], "Power": 2635, "Total": [100.001, 200.002, 300.0030]}},
  {"addr": "COM-002", "timestamp": "20240101120017", "Ua": "229.9", "unit": "V",
   "ENERGY": {"Current": [0.50, 0.4, 0.3], "Power": 12.5, "Total": [0.1, 0.2, 0.3]}}]}}"""
ISSUE_ROUTE = Route(
    topic="gw/{deviceId}/data",
    device_type="1",
    records="reported.meters",
    device_id="addr",
    time="timestamp",
    time_format="%Y%m%d%H%M%S",
    align_secs=60,
    points={
        "Ua": PointSource(path="Ua"),
        "Ia": PointSource(path="ENERGY.Current[0]"),
        "P": PointSource(path="ENERGY.Power", scale="0.001"),
        "Ep_imp": PointSource(sum=["ENERGY.Total[0]", "ENERGY.Total[1]", "ENERGY.Total[2]"]),
    },
)


def _cases(count: int) -> dict[str, Callable[[], None]]:
    flat = Mapper([Route()], "Asia/Shanghai")
    lenient = Mapper([Route(ignore=["state"])], "Asia/Shanghai")
    issue = Mapper([ISSUE_ROUTE], "Asia/Shanghai")
    messages = [
        (
            f"meters/1/meter-{i % 200:04d}/telemetry".encode(),
            telemetry_payload(i, 1_700_000_000 + i),
        )
        for i in range(count)
    ]

    def run(mapper: Mapper, items: Sequence[tuple[bytes, bytes]]) -> Callable[[], None]:
        def loop() -> None:
            for topic, payload in items:
                mapper.map(topic, payload, 1.7e9)

        return loop

    return {
        "flat_route": run(flat, messages),
        "flat_payload_generic_route": run(lenient, messages),
        "issue_route_two_meters": run(issue, [(b"gw/gw-1/data", GATEWAY)] * count),
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Time each case for ``--rounds`` rounds of ``--count`` messages; print microseconds."""
    parser = argparse.ArgumentParser(prog="python -m bench.mapping")
    parser.add_argument("--count", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args(argv)
    cases = _cases(args.count)
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(args.rounds):
        for name, loop in cases.items():
            started = time.process_time()
            loop()
            times[name].append((time.process_time() - started) / args.count * 1e6)
    for name, runs in times.items():
        print(
            f"{name}: min {min(runs):.2f} us, median {statistics.median(runs):.2f} us per message"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
