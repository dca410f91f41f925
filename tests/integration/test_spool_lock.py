"""One bridge per spool, on real processes; the `dlq` commands still work beside it.

A second `energy-bridge run` on a spool in use refuses to start.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.support import (
    START_TS,
    BridgeFactory,
    Mosquitto,
    Publisher,
    StubProcess,
    telemetry_payload,
    wait_until,
)

pytestmark = pytest.mark.integration


def test_second_bridge_on_the_same_spool_refuses_to_start(
    mosquitto: Mosquitto, stub: StubProcess, bridge_factory: BridgeFactory
) -> None:
    """Test that a second bridge on a spool in use exits at once, naming the lock's holder.

    A second bridge with the same config exits at once with one line naming the
    spool, the first bridge's pid and the lock file, while the first keeps delivering and
    `energy-bridge dlq list` works beside it.
    """
    first = bridge_factory()
    second = bridge_factory(config=first.config_path, ready_timeout=None)
    wait_until(lambda: not second.running, 20, message=lambda: f"exit\n{second.describe()}")
    spool = first.config_path.parent / "spool.db"

    output = [
        line for line in second.log_text().splitlines() if line and not line.startswith("====")
    ]
    expected = [
        f"energy-bridge: spool {spool} is in use by energy-bridge pid {first.pid}"
        f" (lock {spool}.lock)"
    ]
    assert (expected, True) == (output, second.returncode not in {0, None})

    with Publisher(mosquitto.host, mosquitto.port) as pub:
        pub.publish("meters/1/m-1/telemetry", telemetry_payload(0, START_TS))
    wait_until(lambda: len(stub.received()) == 1, 20, message="the first bridge delivering")
    dlq = subprocess.run(
        [sys.executable, "-m", "bridge", "dlq", "--config", str(first.config_path), "list"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=os.environ,
    )
    assert (0, "", True) == (dlq.returncode, dlq.stderr, first.running)
