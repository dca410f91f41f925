"""The `energy-bridge` command line: check, config errors, the README's config reference."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from pydantic import BaseModel

from bridge.config import Settings

ROOT = Path(__file__).resolve().parents[2]
SECRET = "s3cr3t-value-never-printed"


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bridge", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=60,
        check=False,
    )


def test_check_prints_effective_settings_with_secrets_masked(tmp_path: Path) -> None:
    """Test that `check` shows the settings but never the broker password or AccessKey secret."""
    config = tmp_path / "bridge.yaml"
    config.write_text(f"mqtt:\n  username: plant\n  password: {SECRET}\n", encoding="utf-8")
    result = _cli(
        "check",
        "--config",
        str(config),
        env={"ALIBABA_CLOUD_ACCESS_KEY_ID": "myid", "ALIBABA_CLOUD_ACCESS_KEY_SECRET": SECRET},
    )
    assert 0 == result.returncode, result.stderr
    doc = json.loads(result.stdout)
    assert "****" == doc["settings"]["mqtt"]["password"]
    assert "myid" in doc["credentials"]
    assert SECRET not in result.stdout + result.stderr


def test_check_reports_a_credential_with_a_line_break_and_fails() -> None:
    """Test that `check` reports a malformed credential by name, never value, and exits 1.

    `check` reports the malformed credential `run` would refuse, naming the
    variable (never the value), and exits 1.
    """
    result = _cli(
        "check",
        env={
            "ALIBABA_CLOUD_ACCESS_KEY_ID": "myid",
            "ALIBABA_CLOUD_ACCESS_KEY_SECRET": SECRET[:6] + "\r\n" + SECRET[6:],
        },
    )
    assert 1 == result.returncode, result.stderr
    doc = json.loads(result.stdout)
    expected = (
        "cloud credentials: the environment variable ALIBABA_CLOUD_ACCESS_KEY_SECRET contains"
        " a line break: a credential is one line of printable ASCII without spaces"
    )
    assert [expected] == doc["errors"]
    assert "NOT USABLE" in doc["credentials"]
    assert "value-never" not in result.stdout + result.stderr


def _check_warnings(timezone: str) -> list[str]:
    result = _cli("check", env={"ENERGY_BRIDGE_TIMEZONE": timezone})
    assert 0 == result.returncode, result.stderr
    warnings: list[str] = json.loads(result.stdout).get("warnings", [])
    return warnings


def test_check_warns_about_a_timezone_with_daylight_saving() -> None:
    """Test that `check` explains the recordTime ambiguity of a DST zone, and only then.

    `check` explains the recordTime ambiguity of a DST zone (Europe/Berlin) and
    suggests a zone without DST, and says nothing of the kind for Asia/Shanghai.
    """
    berlin = [w for w in _check_warnings("Europe/Berlin") if w.startswith("timezone")]
    shanghai = [w for w in _check_warnings("Asia/Shanghai") if w.startswith("timezone")]

    expected = (
        "timezone Europe/Berlin has daylight saving time: recordTime is local time without an"
        " offset, so when the clocks go back two readings an hour apart get the same recordTime"
        " (and when they go forward an hour of recordTimes never occurs); use a zone without"
        " DST, e.g. Asia/Shanghai (UTC+8, most likely the API's own) or UTC"
    )
    assert ([expected], []) == (berlin, shanghai)


def test_check_sample_prints_the_push_body_with_exact_values() -> None:
    """Test that `check --sample` shows the request body a message would become."""
    result = _cli(
        "check",
        "--sample",
        "meters/1/m-1/telemetry",
        '{"ts": 1631097600, "Ua": 226.10, "F": 50.00}',
    )
    assert 0 == result.returncode, result.stderr
    body = json.loads(result.stdout)["sample"]["push_bodies"][0]
    assert {
        "deviceType": "1",
        "devices": [
            {
                "deviceId": "m-1",
                "recordTime": "2021-09-08 18:40:00",
                "data": {"Ua": "226.10", "F": "50.00"},
            }
        ],
    } == body


def test_check_sample_shows_each_points_source_for_a_generic_route(tmp_path: Path) -> None:
    """Test that `check --sample` lists a generic route's readings with each point's source.

    The source is the path, sum or scale the point came from.
    """
    config = tmp_path / "bridge.yaml"
    config.write_text(
        "routes:\n"
        "  - topic: gw/{deviceId}/data\n"
        "    device_type: '1'\n"
        "    records: meters\n"
        "    device_id: addr\n"
        "    points:\n"
        "      Ua: Ua\n"
        "      P: {path: ENERGY.Power, scale: '0.001'}\n"
        "      Ep_imp: {sum: ['T[0]', 'T[1]']}\n",
        encoding="utf-8",
    )
    payload = '{"meters": [{"addr": "a", "Ua": 230.10, "ENERGY": {"Power": 2635}, "T": [1.5, 2]}]}'

    result = _cli("check", "--config", str(config), "--sample", "gw/g/data", payload)

    assert 0 == result.returncode, result.stderr
    (reading,) = json.loads(result.stdout)["sample"]["readings"]
    assert {
        "deviceType": "1",
        "deviceId": "a",
        "points": {
            "Ua": {"value": "230.10", "from": "Ua"},
            "P": {"value": "2.635", "from": "ENERGY.Power * 0.001"},
            "Ep_imp": {"value": "3.5", "from": "sum(T[0], T[1])"},
        },
    } == {k: reading[k] for k in ("deviceType", "deviceId", "points")}


def test_check_sample_reports_the_reject_reason_and_fails() -> None:
    """Test that a message that cannot be mapped gives its reason and a non-zero exit."""
    result = _cli("check", "--sample", "meters/1/m-1/telemetry", "not json")
    assert 1 == result.returncode
    assert "bad_json" == json.loads(result.stdout)["sample"]["rejected"]["reason"]


def test_bad_config_fails_at_start_naming_the_key(tmp_path: Path) -> None:
    """Test that `run` with a bad setting exits at once with a message naming the key."""
    config = tmp_path / "bridge.yaml"
    config.write_text("batch:\n  max_devices: lots\n", encoding="utf-8")
    result = _cli("run", "--config", str(config))
    assert 2 == result.returncode
    assert "batch.max_devices" in result.stderr


def test_bad_environment_override_names_the_key_and_variable() -> None:
    """Test that a bad ENERGY_BRIDGE_* value is reported with its key and variable name."""
    result = _cli("check", env={"ENERGY_BRIDGE_MQTT__PORT": "not-a-port"})
    assert 2 == result.returncode
    assert "mqtt.port" in result.stderr
    assert "ENERGY_BRIDGE_MQTT__PORT" in result.stderr


def test_misspelt_environment_variable_fails_naming_it() -> None:
    """Test that an unknown ENERGY_BRIDGE_* variable stops the command (exit 2), named.

    An ENERGY_BRIDGE_* variable that is no setting stops the command (exit 2)
    with a message naming the variable, instead of being ignored.
    """
    result = _cli("check", env={"ENERGY_BRIDGE_MQQT__PORT": "1884"})
    assert 2 == result.returncode
    assert "ENERGY_BRIDGE_MQQT__PORT is not a setting" in result.stderr
    assert "" == result.stdout


def test_environment_overrides_the_file(tmp_path: Path) -> None:
    """Test that ENERGY_BRIDGE_<SECTION>__<KEY> wins over the YAML file."""
    config = tmp_path / "bridge.yaml"
    config.write_text("mqtt:\n  port: 1999\n", encoding="utf-8")
    result = _cli("check", "--config", str(config), env={"ENERGY_BRIDGE_MQTT__PORT": "1884"})
    assert 1884 == json.loads(result.stdout)["settings"]["mqtt"]["port"]


def _keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    out: list[str] = []
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out += _keys(ann, f"{prefix}{name}.")
        else:
            out.append(prefix + name)
    return out


def test_readme_documents_every_setting() -> None:
    """Test that the README's configuration reference lists every config key."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    missing = [key for key in _keys(Settings) if f"| `{key}` |" not in readme]
    assert [] == missing


def test_readme_starts_with_the_demo_and_test_commands() -> None:
    """Test that the README's first commands are the demo and the test command CI runs."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    first_block = readme.split("```sh", 1)[1].split("```", 1)[0]
    assert ["scripts/demo", "scripts/test"] == [
        line.split()[0] for line in first_block.strip().splitlines()
    ]
    assert "exec scripts/test" in (ROOT / ".ci" / "run").read_text(encoding="utf-8")


def test_check_sample_on_a_preset_shows_sources_or_the_skip_reason(tmp_path: Path) -> None:
    """Test that `check --sample` on a preset shows each point's source, or the skip reason.

    A point's source is the preset's default; a message that is not a reading shows the skip
    reason, and the command exits 0.
    """
    config = tmp_path / "bridge.yaml"
    config.write_text("routes:\n  - format: tasmota\n", encoding="utf-8")
    sensor = '{"Time":"2018-02-15T17:37:10","ENERGY":{"Power":[490,0,10],"Voltage":230}}'

    result = _cli("check", "--config", str(config), "--sample", "tele/t1/SENSOR", sensor)
    skipped = _cli("check", "--config", str(config), "--sample", "tele/t1/LWT", "Online")

    assert 0 == result.returncode, result.stderr
    (reading,) = json.loads(result.stdout)["sample"]["readings"]
    assert {
        "Ua": {"value": "230", "from": "ENERGY.Voltage"},
        "P": {
            "value": "0.500",
            "from": "sum(ENERGY.Power[0], ENERGY.Power[1], ENERGY.Power[2]) * 0.001",
        },
        "Pa": {"value": "0.490", "from": "ENERGY.Power[0] * 0.001"},
    } == reading["points"]
    assert "2018-02-15 17:37:10" == reading["recordTime"]
    assert 0 == skipped.returncode
    assert "availability" == json.loads(skipped.stdout)["sample"]["skipped"]["reason"]
