"""The device registry file: how it maps ids, and how it refuses a bad file naming the line."""

from __future__ import annotations

from pathlib import Path

import pytest

from bridge.errors import ConfigError, MappingError
from bridge.intake.registry import Registry
from bridge.models import Reading


def _reading(device_id: str | None, device_type: str = "1") -> Reading:
    return Reading(device_type, device_id, 1631097600, "2021-09-08 18:40:00", {"Ua": "226.1"}, 1.0)


def _load(tmp_path: Path, text: str, *, reject_unknown: bool = False) -> Registry:
    path = tmp_path / "registry.csv"
    path.write_text(text, encoding="utf-8")
    return Registry.load(path, reject_unknown=reject_unknown)


def test_registry_maps_ids_and_types_and_passes_the_rest(tmp_path: Path) -> None:
    """Test that a listed id takes the registry's deviceId and type; others pass unchanged.

    A listed id becomes the registry's deviceId (and device type where the row has
    one), and an id that is not listed passes unchanged with unknown: pass.
    """
    registry = _load(
        tmp_path,
        "\ufeffsource_id,device_id,device_type\n"
        "# the main incomer\n"
        "addr-01, EE-METER-0001 ,\n"
        "\n"
        "pv-inverter,EE-PV-7,12\n",
    )

    mapped = registry.apply([_reading("addr-01"), _reading("pv-inverter"), _reading("other")])

    expected = [("1", "EE-METER-0001"), ("12", "EE-PV-7"), ("1", "other")]
    assert expected == [(r.device_type, r.device_id) for r in mapped]
    assert {"Ua": "226.1"} == mapped[0].data


def test_registry_unknown_ids_are_rejected_when_asked(tmp_path: Path) -> None:
    """Test that with unknown: reject an unlisted id is an unknown_device rejection.

    With unknown: reject an id the registry does not list is an unknown_device
    rejection (dead-lettered with the message), and listed ids still map.
    """
    registry = _load(tmp_path, "source_id,device_id\na,A\n", reject_unknown=True)

    with pytest.raises(MappingError) as info:
        registry.apply([_reading("a"), _reading("b")])

    assert "unknown_device" == info.value.reason
    assert ["A"] == [r.device_id for r in registry.apply([_reading("a")])]


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ("id,device\n", "line 1"),
        ("source_id,device_id\na,A\na,B\n", "line 3"),
        ("source_id,device_id\na,\n", "line 2"),
        ("source_id,device_id,device_type\na,A,one\n", "line 2"),
        ("source_id,device_id\na,A,1,2\n", "line 2"),
        ("source_id,device_id\n" + "x" * 200 + ",A\n", "line 2"),
        ("", "empty"),
    ],
)
def test_registry_bad_file_is_refused_naming_the_line(tmp_path: Path, text: str, line: str) -> None:
    """Test that a bad registry file is refused as a whole, naming its line.

    A file with a wrong header, a duplicate or empty id, a bad type, extra columns
    or an overlong id is refused as a whole, naming its line (key registry.file).
    """
    with pytest.raises(ConfigError) as info:
        _load(tmp_path, text)

    assert ("registry.file", True) == (info.value.key, line in info.value.message)


def test_registry_missing_file_is_a_config_error(tmp_path: Path) -> None:
    """Test that a registry file that cannot be read is a ConfigError naming registry.file."""
    with pytest.raises(ConfigError) as info:
        Registry.load(tmp_path / "missing.csv")

    assert "registry.file" == info.value.key
