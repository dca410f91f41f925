"""Configuration: defaults, YAML file, environment overrides, validation naming the key."""

from __future__ import annotations

import os
import typing
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import BaseModel

from bridge.config import (
    CloudSettings,
    PayloadFormat,
    Route,
    Settings,
    has_daylight_saving,
    load_settings,
)
from bridge.errors import ConfigError
from bridge.tools.cloud_stub import KEYS_ENV

ROUTE = "meters/{deviceType}/{deviceId}/telemetry"


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep ENERGY_BRIDGE_* variables of the surrounding shell out of every test."""
    for name in list(os.environ):
        if name.upper().startswith("ENERGY_BRIDGE_"):
            monkeypatch.delenv(name)


@pytest.fixture
def write(tmp_path: Path) -> typing.Callable[[str], Path]:
    """Write YAML text to a config file and return its path."""

    def _write(text: str) -> Path:
        path = tmp_path / "energy-bridge.yaml"
        path.write_text(text, encoding="utf-8")
        return path

    return _write


def _error(path: Path) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    return info.value


# -- defaults and sources -------------------------------------------------------------------


def test_config_defaults() -> None:
    """Test that without a file the documented defaults apply."""
    settings = load_settings()

    assert ("127.0.0.1", 1883) == (settings.mqtt.host, settings.mqtt.port)
    assert [ROUTE] == [route.topic for route in settings.routes]
    assert Path("./energy-bridge.db") == settings.spool.path
    assert "127.0.0.1:9108" == settings.http.listen
    assert ("127.0.0.1", 9108) == (settings.http.host, settings.http.port)
    assert "Asia/Shanghai" == settings.timezone


def test_config_empty_file_gives_defaults(write: typing.Callable[[str], Path]) -> None:
    """Test that an empty file is the same as no file."""
    assert load_settings() == load_settings(write(""))


def test_config_yaml_file_is_read(write: typing.Callable[[str], Path]) -> None:
    """Test that values in the YAML file replace the defaults, the rest stays default."""
    path = write(
        "mqtt:\n"
        "  host: broker.plant.local\n"
        "  port: 8883\n"
        "batch:\n"
        "  max_devices: 50\n"
        "cloud:\n"
        "  endpoint: https://energyexpertexternal.cn-hangzhou.aliyuncs.com/\n"
        "timezone: UTC\n"
    )

    settings = load_settings(path)

    assert ("broker.plant.local", 8883) == (settings.mqtt.host, settings.mqtt.port)
    assert 50 == settings.batch.max_devices
    assert "https://energyexpertexternal.cn-hangzhou.aliyuncs.com" == settings.cloud.endpoint
    assert "UTC" == settings.timezone
    assert 512 * 1024 == settings.batch.max_bytes


def test_config_environment_overrides_the_file(
    write: typing.Callable[[str], Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Test that ENERGY_BRIDGE_MQTT__PORT beats the file, other file keys of the section stay."""
    path = write("mqtt:\n  host: broker.plant.local\n  port: 1885\n")
    monkeypatch.setenv("ENERGY_BRIDGE_MQTT__PORT", "1884")

    settings = load_settings(path)

    assert ("broker.plant.local", 1884) == (settings.mqtt.host, settings.mqtt.port)


def test_config_environment_without_file(monkeypatch: pytest.MonkeyPatch) -> None:
    """Test that environment variables apply when no file is given."""
    monkeypatch.setenv("ENERGY_BRIDGE_MQTT__PORT", "1884")
    monkeypatch.setenv("ENERGY_BRIDGE_TIMEZONE", "Europe/Berlin")

    settings = load_settings()

    assert (1884, "Europe/Berlin") == (settings.mqtt.port, settings.timezone)


def test_config_environment_value_is_validated(monkeypatch: pytest.MonkeyPatch) -> None:
    """Test that a bad value from the environment is a ConfigError naming its key."""
    monkeypatch.setenv("ENERGY_BRIDGE_MQTT__PORT", "not-a-port")

    with pytest.raises(ConfigError) as info:
        load_settings()

    assert "mqtt.port" == info.value.key


@pytest.mark.parametrize(
    "name",
    [
        "ENERGY_BRIDGE_MQQT__PORT",  # a typo in the section
        "ENERGY_BRIDGE_TIMEZON",  # a typo in a top-level key
        "energy_bridge_mqqt__port",  # read case-insensitively, so checked so too
        "ENERGY_BRIDGE_MQTT__TLS__ENABLED__X",  # below a plain setting
        "ENERGY_BRIDGE_ROUTES__0__TOPIC",  # list items are not addressed by index
    ],
)
def test_config_environment_variable_that_is_no_setting_is_refused(
    monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    """Test that an ENERGY_BRIDGE_* variable that names no setting fails, naming only it.

    An ENERGY_BRIDGE_* variable that names no setting fails, naming the
    variable and never its value.
    """
    monkeypatch.setenv(name, "1884-value-kept-private")

    with pytest.raises(ConfigError) as info:
        load_settings()

    assert name in str(info.value)
    assert "value-kept-private" not in str(info.value)


def test_config_environment_typo_suggests_the_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    """Test that a misspelt section is reported with the setting it probably means."""
    monkeypatch.setenv("ENERGY_BRIDGE_MQQT__PORT", "1884")

    with pytest.raises(ConfigError) as info:
        load_settings()

    expected = (
        "the environment variable ENERGY_BRIDGE_MQQT__PORT is not a setting (did you mean"
        " ENERGY_BRIDGE_MQTT__PORT?); settings are ENERGY_BRIDGE_<SECTION>__<KEY>, see the"
        " configuration reference"
    )
    assert ("", expected) == (info.value.key, info.value.message)


def test_config_environment_settings_and_tool_variables_still_work(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Test that every real setting, section and tool variable in the environment is accepted.

    Real settings of every depth, whole sections and lists as JSON, and the
    variables of the project's tools (the cloud stub's keys) are all accepted.
    """
    monkeypatch.setenv("ENERGY_BRIDGE_MQTT__PORT", "1884")
    monkeypatch.setenv("energy_bridge_log__level", "debug")
    monkeypatch.setenv("ENERGY_BRIDGE_MQTT__TLS__INSECURE", "false")
    monkeypatch.setenv("ENERGY_BRIDGE_CLOUD", '{"max_in_flight": 8}')
    monkeypatch.setenv(
        "ENERGY_BRIDGE_ROUTES", '[{"topic": "plant/{deviceId}", "device_type": "1"}]'
    )
    monkeypatch.setenv("ENERGY_BRIDGE_TIMEZONE", "UTC")
    monkeypatch.setenv(KEYS_ENV, "testid:testsecret")

    settings = load_settings()

    assert (1884, "DEBUG", 8, "plant/{deviceId}", "UTC") == (
        settings.mqtt.port,
        settings.log.level,
        settings.cloud.max_in_flight,
        settings.routes[0].topic,
        settings.timezone,
    )


@pytest.mark.parametrize(
    ("zone", "dst"),
    [
        ("Europe/Berlin", True),
        ("America/New_York", True),
        ("Australia/Sydney", True),  # southern hemisphere: DST over the new year
        ("Asia/Shanghai", False),
        ("UTC", False),
        ("Asia/Kolkata", False),
    ],
)
def test_config_has_daylight_saving(zone: str, dst: bool) -> None:
    """Test that zones whose clocks change during the year are told from those that do not."""
    assert dst == has_daylight_saving(zone)


def test_config_settings_are_frozen() -> None:
    """Test that loaded settings cannot be changed afterwards."""
    settings = load_settings()

    with pytest.raises(ValueError, match="frozen"):
        settings.mqtt.port = 1


# -- errors name their key ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("mqtt:\n  prot: 1884\n", "mqtt.prot"),
        ("mqttt:\n  port: 1884\n", "mqttt"),
        ("cloud:\n  credentials:\n    sorce: env\n", "cloud.credentials.sorce"),
        (f"routes:\n  - topic: '{ROUTE}'\n    formt: json\n", "routes[0].formt"),
    ],
)
def test_config_unknown_key_is_named(
    write: typing.Callable[[str], Path], text: str, key: str
) -> None:
    """Test that an unknown key is a ConfigError with its dotted path, saying it is unknown."""
    error = _error(write(text))

    assert key == error.key
    assert "unknown" in error.message
    assert str(error).startswith(f"{key}: ")


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("batch:\n  max_devices: many\n", "batch.max_devices"),
        ("batch:\n  max_devices: 0\n", "batch.max_devices"),
        ("mqtt:\n  port: 70000\n", "mqtt.port"),
        ("mqtt:\n  tls:\n    enabled: perhaps\n", "mqtt.tls.enabled"),
        ("spool:\n  synchronous: sometimes\n", "spool.synchronous"),
        ("spool:\n  max_bytes: 1024\n", "spool.max_bytes"),
        ("log:\n  level: trace\n", "log.level"),
        ("routes: []\n", "routes"),
    ],
)
def test_config_wrong_value_names_the_key(
    write: typing.Callable[[str], Path], text: str, key: str
) -> None:
    """Test that a value of the wrong type or out of range is a ConfigError naming its key."""
    assert key == _error(write(text)).key


def test_config_several_problems_report_the_first_and_a_count(
    write: typing.Callable[[str], Path],
) -> None:
    """Test that with several bad keys the error names the first and counts the others."""
    error = _error(write("mqtt:\n  port: x\nbatch:\n  max_devices: y\n"))

    assert "mqtt.port" == error.key
    assert "(and 1 more problem)" in error.message


def test_config_bad_timezone(write: typing.Callable[[str], Path]) -> None:
    """Test that a timezone unknown to the IANA database is refused."""
    error = _error(write("timezone: Mars/Olympus_Mons\n"))

    assert "timezone" == error.key
    assert "Mars/Olympus_Mons" in error.message


@pytest.mark.parametrize(
    "endpoint",
    [
        "energyexpertexternal.cn-hangzhou.aliyuncs.com",
        "ftp://energyexpertexternal.cn-hangzhou.aliyuncs.com",
        "https://",
        "https://energyexpertexternal.cn-hangzhou.aliyuncs.com/api/v1/data/increment/push",
        "https://energyexpertexternal.cn-hangzhou.aliyuncs.com?region=cn-hangzhou",
    ],
)
def test_config_bad_endpoint(write: typing.Callable[[str], Path], endpoint: str) -> None:
    """Test that an endpoint without scheme and host, or with a path or query, is refused."""
    assert "cloud.endpoint" == _error(write(f"cloud:\n  endpoint: '{endpoint}'\n")).key


@pytest.mark.parametrize(
    ("endpoint", "warned"),
    [
        ("http://127.0.0.1:8080", False),
        ("http://127.0.0.2:8080", False),
        ("http://[::1]:8080", False),
        ("http://localhost:8080", False),
        ("http://192.0.2.10:8080", True),
        ("http://cloud-stub:8080", True),
        ("http://127.0.0.1.example.com", True),
        ("https://energyexpertexternal.cn-hangzhou.aliyuncs.com", False),
    ],
)
def test_config_plain_http_beyond_loopback(endpoint: str, warned: bool) -> None:
    """Test which endpoints count as unencrypted traffic leaving the machine."""
    assert warned == CloudSettings(endpoint=endpoint).plain_http_beyond_loopback


@pytest.mark.parametrize(
    ("route", "key"),
    [
        ("topic: 'meters/{deviceType}/{serial}/telemetry'", "routes[0].topic"),
        ("topic: 'meters/{deviceType}/+/telemetry'", "routes[0].topic"),
        ("topic: 'meters/{deviceType}/{deviceId}/#'", "routes[0].topic"),
        ("topic: 'meters/{deviceType}/id-{deviceId}/telemetry'", "routes[0].topic"),
        ("topic: 'meters/{deviceType}/{deviceId}/{deviceId}'", "routes[0].topic"),
        ("topic: 'meters/{deviceType}/{deviceId}/telemetry'\n    format: value", "routes[0]"),
        ("topic: 'meters/{deviceId}/telemetry'", "routes[0]"),
    ],
)
def test_config_route_placeholders_are_validated(
    write: typing.Callable[[str], Path], route: str, key: str
) -> None:
    """Test that bad route templates are refused with the route's key."""
    assert key == _error(write(f"routes:\n  - {route}\n")).key


@pytest.mark.parametrize(
    "route",
    [
        {"topic": "meters/{deviceId}/telemetry", "device_type": "1"},
        {"topic": "plant/{deviceType}/{deviceId}/points/{point}", "format": "value"},
        {"topic": "site/weather", "device_type": "15"},
    ],
)
def test_config_valid_route_templates_are_accepted(route: dict[str, str]) -> None:
    """Test that templates with a fixed device type or a {point} level for values pass."""
    assert route["topic"] == Route.model_validate(route).topic


@pytest.mark.parametrize("factor", ["abc", "NaN", "Infinity", "-inf", "", "1/1000"])
def test_config_scale_must_be_a_finite_decimal(
    write: typing.Callable[[str], Path], factor: str
) -> None:
    """Test that a scale factor that is not a finite decimal is refused."""
    error = _error(write(f"routes:\n  - scale: {{Ep_imp: '{factor}'}}\n"))

    assert "routes[0].scale" == error.key
    assert "finite decimal" in error.message


def test_config_scale_keeps_the_exact_text(write: typing.Callable[[str], Path]) -> None:
    """Test that valid scale factors are kept as the exact decimal text given."""
    settings = load_settings(write("routes:\n  - scale: {Ep_imp: '0.001', P: '1000', Q: '1E-3'}\n"))

    assert {"Ep_imp": "0.001", "P": "1000", "Q": "1E-3"} == settings.routes[0].scale


def test_config_credentials_file_source_needs_both_files(
    write: typing.Callable[[str], Path],
) -> None:
    """Test that source 'file' without both the id and the secret file is refused."""
    only_id = "cloud:\n  credentials:\n    source: file\n    access_key_id_file: /run/id\n"
    only_secret = "cloud:\n  credentials:\n    source: file\n    access_key_secret_file: /run/s\n"
    both = only_id + "    access_key_secret_file: /run/s\n"

    assert "cloud.credentials" == _error(write(only_id)).key
    assert "cloud.credentials" == _error(write(only_secret)).key
    assert Path("/run/s") == load_settings(write(both)).cloud.credentials.access_key_secret_file


@pytest.mark.parametrize("listen", ["9108", "127.0.0.1", ":9108", "localhost:http", "h:65536"])
def test_config_http_listen_must_be_host_port(
    write: typing.Callable[[str], Path], listen: str
) -> None:
    """Test that http.listen must be host:port with a numeric port in range."""
    assert "http.listen" == _error(write(f"http:\n  listen: '{listen}'\n")).key


def test_config_http_listen_accepts_bracketed_ipv6(write: typing.Callable[[str], Path]) -> None:
    """Test that an IPv6 listen address splits into host and port."""
    http = load_settings(write("http:\n  listen: '[::1]:9200'\n")).http

    assert ("::1", 9200) == (http.host, http.port)


# -- the file itself ------------------------------------------------------------------------


def test_config_invalid_yaml(write: typing.Callable[[str], Path]) -> None:
    """Test that a file that is not YAML is a ConfigError with an empty key."""
    error = _error(write("mqtt: [\n  port: 1884\n"))

    assert "" == error.key
    assert "not valid YAML" in error.message


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("  password: {secret}: x", "line 3, column 33: mapping values are not allowed here"),
        ("  password: *{secret}", "line 3, column 13: found undefined alias '...'"),
        ('  password: "{secret}\\q"', "line 3, column 35: found unknown escape character 'q'"),
    ],
)
def test_config_yaml_syntax_error_gives_line_and_column_never_the_text(
    write: typing.Callable[[str], Path], line: str, expected: str
) -> None:
    """Test that a YAML error on the password line never quotes the line.

    A YAML error on the password line names line, column and problem, and
    neither the error nor its chained causes quote the line (the password).
    """
    secret = "s3cr3t-pa55-v4lue-xy"
    path = write("mqtt:\n  username: plant\n" + line.format(secret=secret) + "\nbatch: {}\n")

    error = _error(path)

    assert f"config file {path} is not valid YAML: {expected}" == error.message
    assert (None, True) == (error.__cause__, error.__suppress_context__)
    assert "pa55" not in str(error)


def _alias_bomb(levels: int, width: int) -> str:
    """Billion laughs under a route's ``scale``: ``width ** levels`` strings from a few lines."""
    lines = ["routes:", '  - topic: "meters/{deviceType}/{deviceId}/telemetry"', "    renames:"]
    lines.append(f"      l0: &l0 [{', '.join(['lol'] * width)}]")
    for level in range(1, levels):
        lines.append(f"      l{level}: &l{level} [{', '.join([f'*l{level - 1}'] * width)}]")
    lines += ["    scale:", f"      Ep_imp: *l{levels - 1}"]
    return "\n".join(lines) + "\n"


@pytest.mark.timeout(20)
def test_config_yaml_alias_bomb_is_refused(write: typing.Callable[[str], Path]) -> None:
    """Test that a billion-laughs document (73 aliases, 9**9 values) is refused, and fast."""
    error = _error(write(_alias_bomb(9, 9)))

    assert "" == error.key
    assert "aliases expand to more than" in error.message


@pytest.mark.timeout(20)
def test_config_yaml_with_too_many_aliases_is_refused(write: typing.Callable[[str], Path]) -> None:
    """Test that a document with more aliases than any config needs is refused, naming why."""
    error = _error(write(_alias_bomb(2, 150)))

    assert "" == error.key
    assert "more than 100 YAML aliases" in error.message


def test_config_yaml_alias_that_contains_itself_is_refused(
    write: typing.Callable[[str], Path],
) -> None:
    """Test that a recursive alias is a ConfigError, not a crash."""
    error = _error(write("routes: &r [*r]\n"))

    assert ("", True) == (error.key, "contains itself" in error.message)


@pytest.mark.parametrize(
    "text",
    ["0b_\r\n", "mqtt:\n  password: 0x_\n", "timezone: 2024-13-01\n"],
)
def test_config_yaml_value_that_looks_like_a_number_or_date_is_a_config_error(
    write: typing.Callable[[str], Path], text: str
) -> None:
    """Test that a value PyYAML takes for a number or date but cannot build is a ConfigError.

    `0b_` (found by the config fuzzer), `0x_` and `2024-13-01` made PyYAML raise a
    bare ValueError; the error names no key (the file is not read yet) and says to quote it.
    """
    error = _error(write(text))

    assert ("", True) == (error.key, "quote it to keep it as text" in error.message)


def test_config_yaml_few_aliases_are_fine(write: typing.Callable[[str], Path]) -> None:
    """Test that ordinary use of anchors and aliases (a shared scale) still loads."""
    settings = load_settings(
        write(
            "routes:\n"
            "  - topic: 'meters/{deviceType}/{deviceId}/telemetry'\n"
            "    scale: &kwh {Ep_imp: '0.001', Ep_exp: '0.001'}\n"
            "  - topic: 'plant/{deviceId}/data'\n"
            "    device_type: '1'\n"
            "    scale: *kwh\n"
        )
    )

    assert (
        settings.routes[0].scale
        == settings.routes[1].scale
        == {
            "Ep_imp": "0.001",
            "Ep_exp": "0.001",
        }
    )


@pytest.mark.parametrize("text", ["- mqtt\n- batch\n", "just a string\n", "42\n"])
def test_config_top_level_must_be_a_mapping(write: typing.Callable[[str], Path], text: str) -> None:
    """Test that a YAML document that is not a mapping is a ConfigError with an empty key."""
    error = _error(write(text))

    assert "" == error.key
    assert "mapping" in error.message


def test_config_missing_file(tmp_path: Path) -> None:
    """Test that a missing config file is a ConfigError naming the file."""
    path = tmp_path / "nowhere.yaml"

    error = _error(path)

    assert "" == error.key
    assert str(path) in error.message


def test_config_file_that_is_not_utf8(tmp_path: Path) -> None:
    """Test that a config file in another encoding is a ConfigError with an empty key."""
    path = tmp_path / "latin1.yaml"
    path.write_bytes("# Anlage K\u00f6ln\nmqtt:\n  port: 1884\n".encode("latin-1"))

    assert "" == _error(path).key


@pytest.mark.parametrize(("text", "key"), [("on: true\n", "True"), ("1884: mqtt\n", "1884")])
def test_config_top_level_key_that_is_not_a_string(
    write: typing.Callable[[str], Path], text: str, key: str
) -> None:
    """Test that a top-level key YAML reads as a bool or number is a ConfigError naming it.

    A top-level key YAML reads as a bool or number is a ConfigError naming that
    key as YAML read it and saying how to fix it (quote the key).
    """
    error = _error(write(text))

    assert (key, True) == (error.key, "quote the key" in error.message)


# -- the model as documentation -------------------------------------------------------------


def _fields(model: type[BaseModel], prefix: str = "") -> Iterator[tuple[str, str | None]]:
    for name, info in model.model_fields.items():
        yield prefix + name, info.description
        for arg in typing.get_args(info.annotation) or (info.annotation,):
            if isinstance(arg, type) and issubclass(arg, BaseModel):
                yield from _fields(arg, f"{prefix}{name}.")


def test_config_every_field_has_a_description() -> None:
    """Test that every field of every section is documented (the config reads as its docs)."""
    fields = dict(_fields(Settings))

    assert [] == [name for name, description in fields.items() if not description]
    assert {"mqtt.tls.ca_file", "routes.scale", "cloud.credentials.source"} <= set(fields)


# -- routes ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("topic", "subscription"),
    [
        (ROUTE, "meters/+/+/telemetry"),
        ("plant/{deviceType}/{deviceId}/points/{point}", "plant/+/+/points/+"),
        ("site/{deviceId}", "site/+"),
    ],
)
def test_config_route_subscription_turns_placeholders_into_plus(
    topic: str, subscription: str
) -> None:
    """Test that Route.subscription is the template with each placeholder replaced by +."""
    value = "{point}" in topic
    route = Route(
        topic=topic, device_type="1", format=PayloadFormat.VALUE if value else PayloadFormat.JSON
    )

    assert subscription == route.subscription


@pytest.mark.parametrize("key", ["_cli_parse_args", "_env_file", "_secrets_dir", "_case_sensitive"])
def test_config_keys_that_are_settings_source_options_are_refused(
    write: typing.Callable[[str], Path], key: str
) -> None:
    """Test that pydantic-settings' instruction keys are refused as unknown keys.

    A top-level key pydantic-settings would take as an instruction (parse the
    command line and exit, read a dotenv file) is refused as an unknown key, naming it. Found
    by the config fuzzer: `_cli_parse_args: true` made `check` parse its own argv and exit.
    """
    error = _error(write(f"{key}: true\n"))

    assert (key, True) == (error.key, "unknown key" in error.message)
