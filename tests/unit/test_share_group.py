"""Shared subscriptions in the settings: `mqtt.share_group`, `{hostname}`, what `check` says."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from bridge.config import MqttSettings, Route, Settings, load_settings, per_point_warning
from bridge.errors import ConfigError

PER_POINT = {"topic": "meters/{deviceType}/{deviceId}/points/{point}", "format": "value"}


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep ENERGY_BRIDGE_* variables of the surrounding shell out of every test."""
    for name in list(os.environ):
        if name.upper().startswith("ENERGY_BRIDGE_"):
            monkeypatch.delenv(name)


def test_share_group_is_off_by_default_and_filters_stay_plain() -> None:
    """Test that without share_group the subscription is the route's filter itself."""
    mqtt = MqttSettings()
    assert (None, "meters/+/+/telemetry") == (mqtt.share_group, mqtt.shared("meters/+/+/telemetry"))


def test_share_group_prefixes_every_filter() -> None:
    """Test that share_group turns a filter into $share/<group>/<filter>."""
    mqtt = MqttSettings(share_group="eb")
    assert "$share/eb/meters/+/+/telemetry" == mqtt.shared("meters/+/+/telemetry")


@pytest.mark.parametrize("group", ["", "a/b", "a+", "#"])
def test_share_group_refuses_names_that_are_not_one_level(tmp_path: Path, group: str) -> None:
    """Test that a share group with a topic separator or wildcard is refused naming the key."""
    path = tmp_path / "c.yaml"
    path.write_text(json.dumps({"mqtt": {"share_group": group}}), encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    assert "mqtt.share_group" in str(info.value)


def test_share_group_with_mqtt_v311_is_refused_naming_the_key(tmp_path: Path) -> None:
    """Test that share_group with protocol v311 stops the start, naming mqtt.share_group."""
    path = tmp_path / "c.yaml"
    path.write_text('{"mqtt": {"share_group": "eb", "protocol": "v311"}}', encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    assert "mqtt.share_group needs mqtt.protocol v5" in str(info.value)


def test_client_id_hostname_placeholder_becomes_the_host_name() -> None:
    """Test that {hostname} in mqtt.client_id is replaced by this machine's host name."""
    mqtt = MqttSettings(client_id="energy-bridge-{hostname}")
    assert f"energy-bridge-{socket.gethostname()}" == mqtt.client_id


def test_client_id_from_the_environment_expands_too(monkeypatch: pytest.MonkeyPatch) -> None:
    """Test that ENERGY_BRIDGE_MQTT__CLIENT_ID={hostname} is expanded like the file's value."""
    monkeypatch.setenv("ENERGY_BRIDGE_MQTT__CLIENT_ID", "{hostname}")
    assert socket.gethostname() == load_settings().mqtt.client_id


def test_per_point_routes_with_share_group_are_warned_about() -> None:
    """Test that a per-point route under a share group gets a warning naming the broker knob."""
    routes = [Route(), Route.model_validate(PER_POINT)]
    shared = Settings(mqtt=MqttSettings(share_group="eb"), routes=routes)
    warning = per_point_warning(shared)
    assert warning is not None
    assert "meters/{deviceType}/{deviceId}/points/{point}" in warning
    assert "hash_topic" in warning
    assert None is per_point_warning(Settings(routes=routes))
    assert None is per_point_warning(Settings(mqtt=MqttSettings(share_group="eb")))


def test_check_warns_about_per_point_routes_in_a_share_group(tmp_path: Path) -> None:
    """Test that `energy-bridge check` lists the per-point warning and shows the shared id."""
    path = tmp_path / "c.yaml"
    path.write_text(
        json.dumps(
            {"mqtt": {"share_group": "eb", "client_id": "eb-{hostname}"}, "routes": [PER_POINT]}
        ),
        encoding="utf-8",
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("ENERGY_BRIDGE_")}
    result = subprocess.run(
        [sys.executable, "-m", "bridge", "check", "--config", str(path)],
        capture_output=True,
        text=True,
        env=env,
        check=False,
        timeout=60,
    )
    assert 0 == result.returncode, result.stderr
    out = json.loads(result.stdout)
    assert f"eb-{socket.gethostname()}" == out["settings"]["mqtt"]["client_id"]
    assert any("mqtt.share_group with per-point" in w for w in out["warnings"])
