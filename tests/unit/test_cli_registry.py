"""The device registry on the command line.

`check` and `run` refuse a bad file naming its line; `check --sample` shows the ids the registry
maps to.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("ENERGY_BRIDGE_")}
    return subprocess.run(
        [sys.executable, "-m", "bridge", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )


def _config(tmp_path: Path, csv: str, unknown: str = "pass") -> Path:
    ids = tmp_path / "ids.csv"
    ids.write_text(csv, encoding="utf-8")
    config = tmp_path / "bridge.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "registry": {"file": str(ids), "unknown": unknown},
                "spool": {"path": str(tmp_path / "spool.db")},
            }
        ),
        encoding="utf-8",
    )
    return config


def test_check_and_run_refuse_a_bad_registry_naming_the_file_and_line(tmp_path: Path) -> None:
    """Test that a registry row with too many columns fails `check` and `run` (exit 2).

    The message names the file and its line.
    """
    config = _config(tmp_path, "source_id,device_id\nm-1,EE-1\nm-2,EE-2,1,extra\n")

    results = [_cli(command, "--config", str(config)) for command in ("check", "run")]

    expected = f"registry.file: {tmp_path / 'ids.csv'} line 3"
    assert [(2, True), (2, True)] == [(r.returncode, expected in r.stderr) for r in results]


def test_check_sample_maps_the_device_id_through_the_registry(tmp_path: Path) -> None:
    """Test that `check --sample` shows the registry's deviceId and type, or unknown_device.

    An unlisted id gets the unknown_device reason with `unknown: reject`.
    """
    config = _config(tmp_path, "source_id,device_id,device_type\nm-1,EE-0001,2\n", "reject")
    payload = '{"ts": 1631097600, "Ua": 226.10}'

    known = _cli("check", "--config", str(config), "--sample", "meters/1/m-1/telemetry", payload)
    unknown = _cli("check", "--config", str(config), "--sample", "meters/1/m-9/telemetry", payload)

    out = json.loads(known.stdout)
    body = out["sample"]["push_bodies"][0]
    assert ("2", "EE-0001", 1) == (
        body["deviceType"],
        body["devices"][0]["deviceId"],
        out["registry"]["entries"],
    )
    assert (1, "unknown_device") == (
        unknown.returncode,
        json.loads(unknown.stdout)["sample"]["rejected"]["reason"],
    )
