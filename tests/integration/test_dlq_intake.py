"""`energy-bridge dlq replay` of Sparkplug B and registry dead letters.

They replay against the alias tables the spool holds now and the registry file as it is now.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

from bridge.spool.store import Reject, SpoolStore
from tests.support.sparkplug import FLOAT, INT32, spb

T_MS = 1_700_000_000_000  # 2023-11-15 06:13:20 in Asia/Shanghai


def _dlq(tmp_path: Path, *args: str) -> list[dict[str, object]]:
    argv = [sys.executable, "-m", "bridge", "dlq", "--spool", str(tmp_path / "spool.db")]
    result = subprocess.run(
        [*argv, "--config", str(tmp_path / "bridge.yaml"), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=os.environ,
    )
    assert 0 == result.returncode, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


def test_dlq_replay_decodes_unknown_aliases_learned_since_and_maps_ids_through_the_registry(
    tmp_path: Path,
) -> None:
    """Test that unknown_alias and unknown_device dead letters replay once the cause is gone.

    A DDATA dead-lettered for an unknown alias replays once the spool knows the alias (a later
    DBIRTH), and an unknown_device entry once the registry lists it; both readings get the
    registry's deviceIds.
    """
    (tmp_path / "ids.csv").write_text(
        "source_id,device_id\nedge-1/meter-1,EE-0001\nm-9,EE-0009\n", encoding="utf-8"
    )
    (tmp_path / "bridge.yaml").write_text(
        yaml.safe_dump(
            {
                "routes": [
                    {"topic": "meters/{deviceType}/{deviceId}/telemetry"},
                    {"format": "sparkplug-b", "device_type": "1"},
                ],
                "registry": {"file": str(tmp_path / "ids.csv"), "unknown": "reject"},
            }
        ),
        encoding="utf-8",
    )
    ddata = spb(
        {"alias": 2, "int_value": 4294967178},
        {"alias": 1, "float_value": 229.3},
        timestamp=T_MS,
    )
    spool = SpoolStore.open(tmp_path / "spool.db", max_bytes=1 << 30)
    spool.commit(
        [],
        [
            Reject(b"spBv1.0/plant/DDATA/edge-1/meter-1", ddata, "unknown_alias", "alias 2", 1.0),
            Reject(
                b"meters/1/m-9/telemetry", b'{"ts": 1700000000, "Ua": 1}', "unknown_device", "", 2.0
            ),
        ],
    )
    spool.commit(
        [], [], aliases=[("plant/edge-1", 1, "Ua", FLOAT), ("plant/edge-1", 2, "P", INT32)]
    )
    spool.close()

    (summary,) = _dlq(tmp_path, "replay")

    spool = SpoolStore.open(tmp_path / "spool.db", max_bytes=1 << 30)
    try:
        rows = sorted((r.reading.device_id or "", r.reading.data) for r in spool.fetch_after(0, 10))
        left = spool.dead_letters()
    finally:
        spool.close()
    assert (2, {}, []) == (summary["replayed"], summary["still_rejected"], left)
    assert [("EE-0001", {"P": "-118", "Ua": "229.3"}), ("EE-0009", {"Ua": "1"})] == rows
