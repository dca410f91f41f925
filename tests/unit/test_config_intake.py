"""Configuration of Sparkplug B routes and of the device registry."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from bridge.config import PayloadFormat, RegistryUnknown, Route, Settings, load_settings
from bridge.errors import ConfigError


def test_config_sparkplug_route_subscribes_to_the_namespace_or_its_group() -> None:
    """Test that a sparkplug-b route subscribes to spBv1.0/# or spBv1.0/<group>/#."""
    every = Route(format=PayloadFormat.SPARKPLUG_B, device_type="1")
    one = Route(format=PayloadFormat.SPARKPLUG_B, device_type="1", sparkplug_group="plant")

    assert (PayloadFormat.SPARKPLUG_B, "spBv1.0/#", "spBv1.0/plant/#") == (
        every.format,
        every.subscription,
        one.subscription,
    )


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({}, "needs device_type"),
        ({"device_type": "x"}, "needs device_type"),
        ({"device_type": "1", "topic": "a/{deviceId}"}, "not topic"),
        ({"device_type": "1", "sparkplug_group": "a/b"}, "one topic level"),
        ({"device_type": "1", "sparkplug_group": "#"}, "one topic level"),
        ({"device_type": "1", "scale": {"P": "0.001"}}, "does not use scale"),
        ({"device_type": "1", "renames": {"a": "b"}, "time_key": "t"}, "renames, time_key"),
    ],
)
def test_config_sparkplug_route_refuses_what_cannot_work(
    fields: dict[str, str], message: str
) -> None:
    """Test that a sparkplug-b route needs a device type, takes no topic and one group level."""
    with pytest.raises(ValidationError, match=message):
        Route(format=PayloadFormat.SPARKPLUG_B, **fields)  # type: ignore[arg-type]


def test_config_sparkplug_options_need_the_sparkplug_format() -> None:
    """Test that Sparkplug-only keys on a JSON route are refused, not ignored.

    The keys are sparkplug_group, request_rebirth and a point named by metric (not a path).
    """
    for fields in (
        {"request_rebirth": True},
        {"sparkplug_group": "g"},
        {"points": {"a": {"name": "b"}}},
    ):
        with pytest.raises(ValidationError, match=r"needs? format 'sparkplug-b'"):
            Route(**fields)


def test_config_sparkplug_points_are_metric_names_taken_as_they_stand() -> None:
    """Test that a sparkplug-b route reads a bare string point as a metric name, nothing else.

    Slashes and spaces are allowed (a path would refuse them); paths, sums and scales are
    refused.
    """
    route = Route(
        format=PayloadFormat.SPARKPLUG_B,
        device_type="1",
        points={"Ua": "Voltage/L1", "P": "Power Total"},  # type: ignore[dict-item]
    )
    assert route.points is not None
    assert {"Ua": "Voltage/L1", "P": "Power Total"} == {
        point: source.name for point, source in route.points.items()
    }
    with pytest.raises(ValidationError, match="a sparkplug-b point is a metric name"):
        Route(
            format=PayloadFormat.SPARKPLUG_B,
            device_type="1",
            points={"P": {"path": "Power", "scale": "0.001"}},  # type: ignore[dict-item]
        )


def test_config_route_points_default_to_none() -> None:
    """Test that a route has no points map unless one is given."""
    assert Route().points is None


def test_config_registry_from_yaml(tmp_path: Path) -> None:
    """Test that registry.file and registry.unknown are read from the file."""
    config = tmp_path / "bridge.yaml"
    config.write_text("registry:\n  file: ids.csv\n  unknown: reject\n", encoding="utf-8")

    settings = load_settings(config)

    assert (Path("ids.csv"), RegistryUnknown.REJECT) == (
        settings.registry.file,
        settings.registry.unknown,
    )
    assert (None, RegistryUnknown.PASS) == (Settings().registry.file, Settings().registry.unknown)


def test_config_registry_unknown_mode_is_checked(tmp_path: Path) -> None:
    """Test that an unknown registry.unknown mode names the key."""
    config = tmp_path / "bridge.yaml"
    config.write_text("registry:\n  unknown: drop\n", encoding="utf-8")

    with pytest.raises(ConfigError) as caught:
        load_settings(config)

    assert "registry.unknown" == caught.value.key
