"""``python -m bench --against node-red``, its energy-bridge side run for real (no timings).

The Node-RED side needs Node-RED installed from npm, which the test suite does not do; its flow
and JavaScript are covered by ``tests/unit/test_bench_nodered.py``. Here the same runner takes
the bridge through the quick ``live`` scenario end to end: broker, paced generator, bridge,
signature-checking stub, accounting, the bare paho baseline and the printed table.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from bench import against
from bench.scenarios import Options, Scenarios

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


def test_quick_live_scenario_for_the_bridge_anchor(tmp_path: Path) -> None:
    """Test that the live scenario's bridge side delivers every reading once and reports CPU.

    Every process's CPU is reported; Node-RED is not needed.
    """
    options = Options(
        readings=2_000,
        meters=20,
        spool_readings=2_000,
        connections=1,
        synchronous="full",
        linger_secs=0.2,
        protocol="v5",
        max_in_flight=4,
        bridge_overrides={},
        workdir=tmp_path,
    )
    runner = against.Against(Scenarios(options), publish_rate=30_000, red_js=None)
    emitted: list[dict[str, Any]] = []
    lines = against.run(runner, ["live"], 1, emitted.append, {"readings": 2_000})
    assert lines == emitted
    (line,) = lines
    assert line["scenario"] == "live"
    assert line["node_red"] is None
    bridge = line["bridge"]
    assert bridge["lost"] == 0
    assert bridge["duplicated"] == 0
    assert bridge["readings_per_s"] > 0
    for process in ("consumer", "broker", "stub", "generator"):
        assert f"{process}_cpu_s_per_100k" in bridge
    assert bridge["peak_rss_mb"] > 0
    assert line["bare_paho_readings_per_s"] > 0
    text = against.table(lines)
    assert "| live | energy-bridge |" in text
    assert "| live | Node-RED | not run |" in text
