"""Configuration: one validated, frozen tree, loaded once at start.

Sources, lowest to highest precedence: built-in defaults, the YAML file given with
``--config``, then environment variables ``ENERGY_BRIDGE_<SECTION>__<KEY>`` (for example
``ENERGY_BRIDGE_MQTT__PORT=1884``). Unknown keys are rejected; every error names its key.
Cloud credentials are *not* configuration: they come from the vendor's standard variables
``ALIBABA_CLOUD_ACCESS_KEY_ID`` / ``..._SECRET`` / ``ALIBABA_CLOUD_SECURITY_TOKEN`` or from
files named under ``cloud.credentials`` (see :mod:`bridge.credentials`).
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import re
import socket
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from decimal import Decimal, InvalidOperation
from enum import StrEnum
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
)

from bridge.errors import ConfigError
from bridge.intake.paths import PathError, compile_path
from bridge.intake.presets import PRESETS

__all__ = [
    "ENV_PREFIX",
    "HOSTNAME_PLACEHOLDER",
    "TOOL_VARIABLES",
    "BadTime",
    "BatchSettings",
    "CloudSettings",
    "CredentialsSettings",
    "HttpSettings",
    "LogSettings",
    "MetricsSettings",
    "MqttSettings",
    "NonNumeric",
    "PayloadFormat",
    "PointSource",
    "RegistrySettings",
    "RegistryUnknown",
    "Route",
    "Settings",
    "SpoolSettings",
    "TlsSettings",
    "check_environment",
    "has_daylight_saving",
    "load_settings",
    "per_point_warning",
]

ENV_PREFIX = "ENERGY_BRIDGE_"
"""Prefix of the environment variables that set settings (``ENERGY_BRIDGE_MQTT__PORT``)."""
TOOL_VARIABLES = frozenset({"ENERGY_BRIDGE_STUB_KEYS"})
"""``ENERGY_BRIDGE_*`` variables that are not settings but belong to the project's tools (the
cloud stub's keys): the bridge ignores them instead of refusing them as unknown."""

_PLACEHOLDER = re.compile(r"\{([A-Za-z_]+)\}")
_KNOWN_FIELDS = {"deviceType", "deviceId", "point"}
HOSTNAME_PLACEHOLDER = "{hostname}"
"""In ``mqtt.client_id``, replaced by this machine's host name (a pod's name on Kubernetes)."""
_PRESET_NAMES = frozenset(PRESETS)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


class MqttProtocol(StrEnum):
    """MQTT protocol version spoken to the broker."""

    V5 = "v5"
    V311 = "v311"


class TlsSettings(_Section):
    """TLS to the broker. Server verification is on whenever TLS is on."""

    enabled: bool = False
    """Connect with TLS (usually port 8883)."""
    ca_file: Path | None = None
    """CA bundle used to verify the broker; the system store when unset."""
    cert_file: Path | None = None
    """Client certificate (PEM) for mutual TLS."""
    key_file: Path | None = None
    """Private key (PEM) of the client certificate."""
    insecure: bool = False
    """Skip verification of the broker's certificate and host name. Never in production."""


class MqttSettings(_Section):
    """The plant's MQTT broker and the bridge's persistent session on it."""

    host: str = "127.0.0.1"
    """Broker host name or address."""
    port: int = Field(default=1883, ge=1, le=65535)
    """Broker port."""
    client_id: str = Field(default="energy-bridge", min_length=1, max_length=128)
    """Fixed client id: the broker keeps the session (and unacknowledged messages) under it.
    ``{hostname}`` in it is replaced by the host name (the pod name in a StatefulSet)."""
    protocol: MqttProtocol = MqttProtocol.V5
    """``v5`` (recommended) or ``v311``."""
    username: str | None = None
    """Broker user name."""
    password: SecretStr | None = None
    """Broker password (prefer ``password_file``)."""
    password_file: Path | None = None
    """File holding the broker password (a mounted secret); re-read on reconnect."""
    keepalive_secs: int = Field(default=30, ge=5, le=3600)
    """MQTT keepalive interval."""
    session_expiry_secs: int = Field(default=7 * 24 * 3600, ge=0)
    """How long the broker keeps the session while the bridge is away (MQTT v5)."""
    receive_maximum: int = Field(default=2048, ge=1, le=65535)
    """MQTT v5 Receive Maximum: QoS 1 messages the broker may have unacknowledged at once."""
    reconnect_min_secs: float = Field(default=0.5, gt=0)
    """First reconnect delay cap; the delay doubles up to ``reconnect_max_secs``, full jitter."""
    reconnect_max_secs: float = Field(default=30.0, gt=0)
    """Largest reconnect delay."""
    max_payload_bytes: int = Field(default=256 * 1024, ge=64)
    """Larger payloads are rejected; the dead letter keeps their first KiB as evidence."""
    tls: TlsSettings = TlsSettings()
    """TLS options."""
    share_group: str | None = None
    """Share the load with other replicas through the broker: every route is subscribed as
    ``$share/<share_group>/<filter>`` (MQTT v5). Each replica needs its own ``client_id``
    (``{hostname}`` in it helps) and its own spool."""

    @field_validator("client_id")
    @classmethod
    def _expand_client_id(cls, value: str) -> str:
        # A StatefulSet pod's host name is its pod name: one setting, a stable id per replica.
        expanded = value.replace(HOSTNAME_PLACEHOLDER, socket.gethostname())
        if len(expanded) > 128:
            raise ValueError(
                f"is {len(expanded)} characters once {{hostname}} is replaced; 128 at most"
            )
        return expanded

    @field_validator("share_group")
    @classmethod
    def _check_share_group(cls, value: str | None) -> str | None:
        if value is not None and (not value or any(c in value for c in "/+#")):
            raise ValueError("must be a non-empty name without '/', '+' or '#'")
        return value

    @model_validator(mode="after")
    def _check_shared_protocol(self) -> MqttSettings:
        if self.share_group is not None and self.protocol is not MqttProtocol.V5:
            raise ValueError(
                "mqtt.share_group needs mqtt.protocol v5: the bridge ends a drained replica's"
                " session and bounds in-flight messages with v5 properties"
            )
        return self

    def shared(self, topic_filter: str) -> str:
        """``topic_filter`` as this replica subscribes it.

        That is ``$share/<group>/<filter>`` when ``share_group`` is set, else the filter
        unchanged.
        """
        if self.share_group is None:
            return topic_filter
        return f"$share/{self.share_group}/{topic_filter}"


class PayloadFormat(StrEnum):
    """How a route's payload is read."""

    JSON = "json"
    """A JSON object (one reading) or an array of objects (several readings, e.g. back-fill)."""
    VALUE = "value"
    """A bare value for the one point named by ``{point}`` in the topic."""
    SPARKPLUG_B = "sparkplug-b"
    """Sparkplug B protobuf on ``spBv1.0/<group>/<type>/<edge>[/<device>]`` (no ``topic``:
    the route subscribes to the namespace, or to ``sparkplug_group``)."""
    TASMOTA = "tasmota"
    """Preset: Tasmota ``tele/<topic>/SENSOR`` (``ENERGY``, arrays for three phases)."""
    SHELLY_GEN2 = "shelly-gen2"
    """Preset: Shelly Gen2/Gen3 meters (``status/em:0``, ``em1:N``, ``emdata:0``, NotifyStatus)."""
    SHELLY_GEN1 = "shelly-gen1"
    """Preset: Shelly Gen1 meters, one value per ``emeter/<i>/<quantity>`` topic."""
    MBMD = "mbmd"
    """Preset: mbmd, one value per ``<Measurement>[/L1]`` topic."""
    ZIGBEE2MQTT = "zigbee2mqtt"
    """Preset: zigbee2mqtt device state objects."""
    VICTRON = "victron"
    """Preset: Victron Venus OS ``N/<portal>/<service>/<instance>/<path>`` ``{"value": x}``."""
    NEURON = "neuron"
    """Preset: EMQX Neuron uploads (``values`` or ``tags[]``), tag names as points."""
    ALINK = "alink"
    """Preset: Alibaba Cloud IoT Alink property posts (single, batch, gateway pack)."""
    THINGSBOARD = "thingsboard"
    """Preset: ThingsBoard device telemetry and gateway telemetry, keys as points."""

    @property
    def preset(self) -> bool:
        """Whether the format is one of the presets of :mod:`bridge.intake.presets`."""
        return self.value in PRESETS


class NonNumeric(StrEnum):
    """What a route without ``points`` does with a value that is not a number."""

    REJECT = "reject"
    """Dead-letter the message (``bad_value``)."""
    SKIP = "skip"
    """Leave the key out: strings that are not numbers, booleans, objects and arrays."""


class BadTime(StrEnum):
    """What a reading whose own time is implausible or unreadable gets."""

    REJECT = "reject"
    """Dead-letter the message (``bad_time``)."""
    RECEIVE_TIME = "receive_time"
    """Use the time the message arrived instead."""


def _checked_path(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError(f"a path must be a string, got a {type(value).__name__}")  # noqa: TRY004
    try:
        compile_path(value)
    except PathError as exc:
        raise ValueError(str(exc)) from None
    return value


def _checked_decimal(value: object, what: str) -> str:
    if isinstance(value, bool) or not isinstance(value, str | int | float | Decimal):
        # Not its text: a list or mapping may be huge (and str() of it slow). A ValueError,
        # which pydantic reports with the key (a TypeError it would not).
        raise ValueError(  # noqa: TRY004
            f"{what} must be a finite decimal, got a {type(value).__name__}"
        )
    try:
        ok = Decimal(str(value)).is_finite()
    except InvalidOperation:
        ok = False
    if not ok:
        raise ValueError(f"{what} must be a finite decimal, got {value!r}")
    # YAML numbers are accepted: the shortest text of a float is what the user typed.
    return str(value)


class PointSource(_Section):
    """Where one Energy Expert point comes from: a path, or the exact sum of several.

    Either form takes an optional exact decimal factor. The first form is written as a bare path
    string.
    """

    path: str | None = None
    """Path of the value inside the record (``ENERGY.Power``)."""
    sum: list[str] | None = Field(default=None, min_length=1, max_length=100)
    """Paths whose values are added exactly; the point is left out unless all are found."""
    scale: str | None = None
    """Exact decimal factor applied last (``"0.001"``: W -> kW)."""
    name: str | None = Field(default=None, min_length=1, max_length=1024)
    """``sparkplug-b`` only: a metric name taken as it stands (written as a bare string there)."""

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, value: object) -> object:
        if isinstance(value, str):
            return {"path": _checked_path(value)}
        return value

    @field_validator("path")
    @classmethod
    def _check_path(cls, value: str | None) -> str | None:
        return None if value is None else _checked_path(value)

    @field_validator("sum")
    @classmethod
    def _check_sum(cls, value: list[str] | None) -> list[str] | None:
        if value is not None:
            for index, path in enumerate(value):
                try:
                    _checked_path(path)
                except ValueError as exc:
                    raise ValueError(f"[{index}]: {exc}") from None
        return value

    @field_validator("scale", mode="before")
    @classmethod
    def _check_scale(cls, value: object) -> object:
        return None if value is None else _checked_decimal(value, "scale")

    @model_validator(mode="after")
    def _one_source(self) -> PointSource:
        if sum(x is not None for x in (self.path, self.sum, self.name)) != 1:
            raise ValueError("give exactly one of path or sum")
        return self


class Route(_Section):
    """A topic template plus the way its payloads are read.

    Without any of the generic mapping keys (``records``, ``device_id``, ``time``, ``points``
    ...), a JSON payload is one flat object (or an array of them) whose every key but the time
    is a point. A preset (``format: <name>``) sets its own topics, records, ids, times and
    points (:mod:`bridge.intake.presets`); ``points`` replaces its map, ``topic`` its topics.
    """

    format: PayloadFormat = PayloadFormat.JSON
    """Payload format: ``json``, ``value`` or a preset's name (``tasmota`` ...)."""
    topic: str = "meters/{deviceType}/{deviceId}/telemetry"
    """Topic template; ``{deviceType}``, ``{deviceId}`` and ``{point}`` each take one level.
    A preset's route may use ``+`` for a level and a final ``#``; without ``topic`` it takes
    the preset's topics."""
    device_type: str | None = None
    """Fixed device type for topics without ``{deviceType}``."""
    time_key: str = "ts"
    """Key of the reading's time in a JSON payload; every other key is a data point."""
    renames: dict[str, str] = Field(default_factory=dict)
    """Point renames applied before sending, e.g. ``{voltage_a: Ua}``."""
    scale: dict[str, str] = Field(default_factory=dict)
    """Exact decimal factors per point (after renames), e.g. ``{Ep_imp: "0.001"}`` for Wh->kWh."""
    records: str | None = None
    """Path to the array of records (or one record object) in the payload; default: the
    payload itself (an array is several records)."""
    device_id: str | None = None
    """Path of the record's own device id (pushed as it stands); else the topic's
    ``{deviceId}``. A route with it needs no ``{deviceId}`` level."""
    time: str | None = None
    """Path of the record's time (``$.`` for the payload's); default: the key ``time_key``."""
    time_format: str | None = None
    """``strptime`` format for times that are not epoch / ISO 8601 / ``Y-m-d H:M:S``
    (``"%Y%m%d%H%M%S"``); tried first. Naive times are read in ``timezone``."""
    align_secs: int | None = Field(default=None, ge=1, le=86400)
    """Floor recordTime to a multiple of this many seconds; readings of one device in one
    aligned window merge into one entry (held until the window has closed)."""
    points: dict[str, PointSource] | None = None
    """Exactly these Energy Expert points, each from a path (or a sum, with a scale); values
    that are missing, null or not numbers leave their point out. ``sparkplug-b``: each from a
    metric name as it stands (``{Ua: "Voltage/L1"}``); without ``points`` every numeric metric
    is sent under its own name."""
    ignore: list[str] = Field(default_factory=list)
    """Without ``points``: record keys that are not points (skipped, not rejected)."""
    on_non_numeric: NonNumeric = NonNumeric.REJECT
    """Without ``points``: ``reject`` a message with a non-numeric value, or ``skip`` the key."""
    on_bad_time: BadTime = BadTime.REJECT
    """A record time outside 2000-2100, older than ``max_age_days`` or unreadable: ``reject``
    (dead-letter, counted) or use the ``receive_time``."""
    max_age_days: float | None = Field(default=None, gt=0)
    """Record times older than this (before the receive time) are bad times."""
    sparkplug_group: str | None = Field(default=None, min_length=1)
    """``sparkplug-b``: only this Sparkplug group (``spBv1.0/<group>/#``); all groups when
    unset."""
    request_rebirth: bool = False
    """``sparkplug-b``: on a metric alias no birth defined, ask the edge node to publish its
    births again (NCMD ``Node Control/Rebirth``, at most once per node every few seconds)."""

    @model_validator(mode="before")
    @classmethod
    def _sparkplug_names(cls, value: object) -> object:
        # A sparkplug-b route's points name metrics ("Voltage/L1", "Inputs/A 1"), which are
        # not paths: a bare string there is a name, taken as it stands.
        if (
            isinstance(value, dict)
            and value.get("format") == PayloadFormat.SPARKPLUG_B.value
            and isinstance(value.get("points"), dict)
        ):
            value = {
                **value,
                "points": {
                    point: {"name": source} if isinstance(source, str) else source
                    for point, source in value["points"].items()
                },
            }
        return value

    @field_validator("topic")
    @classmethod
    def _check_topic(cls, value: str, info: ValidationInfo) -> str:
        names = _PLACEHOLDER.findall(value)
        unknown = set(names) - _KNOWN_FIELDS
        if unknown:
            raise ValueError(
                f"unknown placeholder(s) {sorted(unknown)}; use {sorted(_KNOWN_FIELDS)}"
            )
        if len(names) != len(set(names)):
            raise ValueError("a placeholder appears twice")
        for level in value.split("/"):
            if ("{" in level or "}" in level) and not _PLACEHOLDER.fullmatch(level):
                raise ValueError(f"placeholder must fill a whole topic level: {level!r}")
        levels = value.split("/")
        fmt = info.data.get("format")
        if isinstance(fmt, PayloadFormat) and fmt.preset:
            if "#" in levels[:-1]:
                raise ValueError("'#' can only be the last level")
        elif "+" in levels or "#" in levels:
            raise ValueError(
                "use {placeholders}, not MQTT wildcards, in a route template"
                " (a preset's route may use + and a final #)"
            )
        return value

    @field_validator("scale", mode="before")
    @classmethod
    def _check_scale(cls, value: object) -> object:
        if not isinstance(value, dict):
            return value  # the type check reports it
        return {k: _checked_decimal(v, f"scale for {k!r}") for k, v in value.items()}

    @field_validator("records", "device_id", "time")
    @classmethod
    def _check_paths(cls, value: str | None) -> str | None:
        return None if value is None else _checked_path(value)

    @field_validator("time_format")
    @classmethod
    def _check_time_format(cls, value: str | None) -> str | None:
        if value is None:
            return None
        sample = datetime(2021, 9, 8, 18, 40, tzinfo=UTC)
        try:
            back = datetime.strptime(sample.strftime(value), value)
        except ValueError:
            back = None
        if back is None or back.replace(tzinfo=None) != sample.replace(tzinfo=None):
            raise ValueError(
                "must be a strptime format naming the year, month, day, hour and minute,"
                " e.g. '%Y%m%d%H%M%S'"
            )
        return value

    @field_validator("points")
    @classmethod
    def _check_points(cls, value: dict[str, PointSource] | None) -> object:
        if value is not None:
            if not value:
                raise ValueError("name at least one point, or leave points out")
            for name in value:
                if not name or not name.isprintable():
                    raise ValueError(f"point name {name!r} must be printable and not empty")
                try:
                    name.encode("utf-8")
                except UnicodeEncodeError:
                    raise ValueError(f"point name {name!r} is not valid Unicode") from None
        return value

    @model_validator(mode="before")
    @classmethod
    def _preset_device_type(cls, value: object) -> object:
        # A preset's default map is for type-1 points (electricity meters).
        if (
            isinstance(value, dict)
            and value.get("format") in _PRESET_NAMES
            and value.get("device_type") is None
            and "{deviceType}" not in str(value.get("topic", ""))
        ):
            return {**value, "device_type": "1"}
        return value

    @model_validator(mode="after")
    def _check_fields(self) -> Route:
        names = set(_PLACEHOLDER.findall(self.topic))
        if self.format.preset:
            for key in ("records", "device_id", "time"):
                if getattr(self, key) is not None:
                    raise ValueError(
                        f"{key} does not apply to format {self.format.value!r}:"
                        " the preset finds it (use points to choose values)"
                    )
        if "deviceType" not in names and self.device_type is None:
            raise ValueError("topic has no {deviceType}: set device_type")
        if self.format is PayloadFormat.VALUE:
            if "point" not in names:
                raise ValueError("format 'value' needs a {point} level in the topic")
            for key in ("records", "device_id", "points"):
                if getattr(self, key) is not None:
                    raise ValueError(f"{key} does not apply to format 'value' (one value a topic)")
        if self.time is not None and "time_key" in self.model_fields_set:
            raise ValueError("set time (a path) or time_key, not both")
        if self.format is PayloadFormat.SPARKPLUG_B:
            _check_sparkplug(self)
        else:
            if self.sparkplug_group is not None or self.request_rebirth:
                raise ValueError("sparkplug_group and request_rebirth need format 'sparkplug-b'")
            named = [p for p, src in (self.points or {}).items() if src.name is not None]
            if named:
                raise ValueError(
                    f"points {named}: a source by name (not a path) needs format 'sparkplug-b'"
                )
        return self

    def with_defaults(self, defaults: Mapping[str, Any]) -> Route:
        """This route with ``defaults`` for the keys the user did not set.

        This is how a preset (a device family's topic, records, id, time and points) becomes a
        route. Keys the user set win; the result is validated like any route.

        Raises:
            pydantic.ValidationError: when the merged route is not valid.
        """
        merged = {**defaults, **self.model_dump(include=self.model_fields_set)}
        return Route.model_validate(merged)

    @property
    def generic(self) -> bool:
        """Whether the route uses any of the generic mapping keys or a preset.

        Otherwise a JSON payload takes the flat fast path.
        """
        optional = (self.records, self.device_id, self.time, self.time_format, self.align_secs,
                    self.points, self.max_age_days)  # fmt: skip
        return (
            self.format.preset
            or any(key is not None for key in optional)
            or bool(self.ignore)
            or self.on_non_numeric is NonNumeric.SKIP
            or self.on_bad_time is BadTime.RECEIVE_TIME
        )

    @property
    def topics(self) -> tuple[str, ...]:
        """The route's topic templates: its ``topic``, or a preset's defaults when it has none.

        A ``sparkplug-b`` route has none: its messages are read by the Sparkplug intake, not
        matched.
        """
        if self.format is PayloadFormat.SPARKPLUG_B:
            return ()
        if self.format.preset and "topic" not in self.model_fields_set:
            return PRESETS[self.format.value].topics
        return (self.topic,)

    @property
    def subscription(self) -> str:
        """The MQTT topic filter that covers this template (the first, for a preset)."""
        return self.subscriptions[0]

    @property
    def subscriptions(self) -> tuple[str, ...]:
        """The MQTT topic filters that cover the route's templates.

        For ``sparkplug-b`` that is the Sparkplug namespace, or its ``sparkplug_group``.
        """
        if self.format is PayloadFormat.SPARKPLUG_B:
            if self.sparkplug_group is None:
                return ("spBv1.0/#",)
            return (f"spBv1.0/{self.sparkplug_group}/#",)
        return tuple(_PLACEHOLDER.sub("+", topic) for topic in self.topics)


def _check_sparkplug(route: Route) -> None:
    """A ``sparkplug-b`` route: a fixed device type, the namespace instead of a topic."""
    if "topic" in route.model_fields_set:
        raise ValueError(
            "format 'sparkplug-b' subscribes to spBv1.0/#: set sparkplug_group to narrow it,"
            " not topic"
        )
    unused = sorted(
        key
        for key in (
            "time_key",
            "renames",
            "scale",
            "records",
            "device_id",
            "time",
            "time_format",
            "align_secs",
            "ignore",
            "on_non_numeric",
            "on_bad_time",
            "max_age_days",
        )
        if key in route.model_fields_set
    )
    if unused:
        raise ValueError(
            f"format 'sparkplug-b' does not use {', '.join(unused)}: name the points with"
            " points (EE point: metric name)"
        )
    if route.device_type is None or not (
        route.device_type.isascii() and route.device_type.isdigit()
    ):
        raise ValueError("format 'sparkplug-b' needs device_type, a string of digits such as '1'")
    not_names = sorted(p for p, src in (route.points or {}).items() if src.name is None)
    if not_names:
        raise ValueError(
            f"points {not_names}: a sparkplug-b point is a metric name (EE point: metric name),"
            " not a path, sum or scale"
        )
    group = route.sparkplug_group
    if group is not None and any(c in group for c in "/+#"):
        raise ValueError("sparkplug_group is one topic level: no '/', '+' or '#'")


class CredentialsSource(StrEnum):
    """Where cloud credentials come from."""

    ENV = "env"
    """``ALIBABA_CLOUD_ACCESS_KEY_ID`` / ``_SECRET`` / ``ALIBABA_CLOUD_SECURITY_TOKEN``."""
    FILE = "file"
    """The files named below (mounted secrets), re-read on SIGHUP."""
    CHAIN = "chain"
    """The vendor's ``alibabacloud-credentials`` default chain (RAM role, STS, OIDC)."""


class CredentialsSettings(_Section):
    """Cloud AccessKey / STS credentials source. No secret is ever written here."""

    source: CredentialsSource = CredentialsSource.ENV
    """``env``, ``file`` or ``chain``."""
    access_key_id_file: Path | None = None
    """File holding the AccessKey id (source ``file``)."""
    access_key_secret_file: Path | None = None
    """File holding the AccessKey secret (source ``file``)."""
    security_token_file: Path | None = None
    """File holding an STS token (source ``file``, optional)."""

    @model_validator(mode="after")
    def _check_files(self) -> CredentialsSettings:
        if self.source is CredentialsSource.FILE and (
            self.access_key_id_file is None or self.access_key_secret_file is None
        ):
            raise ValueError("source 'file' needs access_key_id_file and access_key_secret_file")
        return self


class CloudSettings(_Section):
    """The Energy Expert push API."""

    endpoint: str = "http://127.0.0.1:8080"
    """Base URL incl. scheme, e.g. ``https://energyexpertexternal.cn-hangzhou.aliyuncs.com``.
    The default is the local stand-in (``energy-bridge cloud-stub``)."""
    max_in_flight: int = Field(default=32, ge=1, le=256)
    """Upper bound of concurrent push requests. The adaptive limit starts at
    ``initial_in_flight``, opens up towards this while requests wait and the cloud answers
    (a slow cloud), and halves on throttling."""
    initial_in_flight: int = Field(default=4, ge=1, le=256)
    """Concurrent push requests at start (at most ``max_in_flight``); also sizes the
    in-memory hand-over to the pusher."""
    request_timeout_secs: float = Field(default=15.0, gt=0)
    """Total timeout of one push request."""
    connect_timeout_secs: float = Field(default=5.0, gt=0)
    """Timeout to establish the connection."""
    retry_initial_secs: float = Field(default=0.5, gt=0)
    """Backoff cap of the first retry; doubles per attempt, full jitter."""
    retry_max_secs: float = Field(default=30.0, gt=0)
    """Largest backoff between attempts of one batch."""
    retry_after_max_secs: float = Field(default=60.0, gt=0, le=3600)
    """Longest wait an ``x-acs-retry-after`` answer is honoured for (a larger or absurd value
    is cut to this)."""
    verify_tls: bool = True
    """Verify the endpoint's TLS certificate. Never turn off in production."""
    user_agent: str = "energy-bridge/0.1"
    """User-Agent header (signed)."""
    credentials: CredentialsSettings = CredentialsSettings()
    """Credentials source."""

    @field_validator("endpoint")
    @classmethod
    def _check_endpoint(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in {"http", "https"} or not parts.hostname:
            raise ValueError("must be a full URL with scheme, e.g. https://host")
        if parts.path not in {"", "/"} or parts.query:
            raise ValueError("give the base URL only; the push path is added by the bridge")
        return value.rstrip("/")

    @property
    def plain_http_beyond_loopback(self) -> bool:
        """Whether the endpoint is plain ``http://`` to a host that is not this machine.

        Not a loopback address, not ``localhost``: readings and signed requests would travel
        unencrypted.
        """
        parts = urlsplit(self.endpoint)
        if parts.scheme != "http":
            return False
        host = (parts.hostname or "").lower()
        if host == "localhost" or host.endswith(".localhost"):
            return False
        try:
            return not ipaddress.ip_address(host).is_loopback
        except ValueError:
            return True  # a host name: wherever it points, it is not known to be this machine


class BatchSettings(_Section):
    """How readings are grouped into requests."""

    max_devices: int = Field(default=100, ge=1, le=10_000)
    """Most ``devices[]`` entries in one request."""
    max_bytes: int = Field(default=512 * 1024, ge=1024)
    """Largest request body in bytes."""
    linger_secs: float = Field(default=1.0, ge=0)
    """How long a batch waits for more readings after its first one."""
    window_secs: int = Field(default=60, ge=1)
    """Readings are grouped by deviceType and recordTime window of this many seconds."""


class SyncMode(StrEnum):
    """SQLite ``synchronous`` setting of the spool."""

    FULL = "full"
    """fsync on every commit: acknowledged readings survive power loss."""
    NORMAL = "normal"
    """fsync at checkpoints only: survives process crashes, not power loss. Faster."""


class SpoolSettings(_Section):
    """The local durable spool (SQLite, WAL)."""

    path: Path = Path("./energy-bridge.db")
    """Spool database file."""
    max_bytes: int = Field(default=1024**3, ge=64 * 1024)
    """Stop acknowledging MQTT messages once the spool holds this much."""
    dead_letter_max_bytes: int | None = Field(default=None, ge=64 * 1024)
    """Budget of the dead-letter store, apart from ``max_bytes``; past it the oldest dead
    letters are dropped (counted). Default: a tenth of ``max_bytes``."""
    synchronous: SyncMode = SyncMode.FULL
    """``full`` or ``normal``."""
    commit_max_rows: int = Field(default=5000, ge=1)
    """Most messages in one group commit."""


class HttpSettings(_Section):
    """The metrics and health endpoint."""

    listen: str = "127.0.0.1:9108"
    """``host:port`` for ``/metrics``, ``/healthz``, ``/readyz``; loopback by default."""

    @field_validator("listen")
    @classmethod
    def _check_listen(cls, value: str) -> str:
        host, sep, port = value.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ValueError("must be host:port, e.g. 127.0.0.1:9108")
        return value

    @property
    def host(self) -> str:
        """Host part of ``listen``."""
        return self.listen.rpartition(":")[0].strip("[]")

    @property
    def port(self) -> int:
        """Port part of ``listen``."""
        return int(self.listen.rpartition(":")[2])


class MetricsSettings(_Section):
    """Per-device freshness, kept to two series whatever the number of devices."""

    device_silent_after_secs: float = Field(default=300.0, gt=0)
    """A device that sent nothing for this long counts in ``bridge_devices_silent``."""
    max_tracked_devices: int = Field(default=100_000, ge=1)
    """Most devices whose last reading time is remembered (memory bound)."""


class RegistryUnknown(StrEnum):
    """What happens to a deviceId the device registry does not list."""

    PASS = "pass"  # noqa: S105 - a mode, not a password
    """It is pushed as the route produced it."""
    REJECT = "reject"
    """The message is dead-lettered with reason ``unknown_device``."""


class RegistrySettings(_Section):
    """The device registry: the plant's ids -> the deviceIds Energy Expert knows."""

    file: Path | None = None
    """CSV with the header ``source_id,device_id[,device_type]``; re-read on SIGHUP (a bad
    file keeps the previous table). No registry when unset."""
    unknown: RegistryUnknown = RegistryUnknown.PASS
    """``pass`` or ``reject`` (dead letter ``unknown_device``) an id the file does not list."""


class LogFormat(StrEnum):
    """Log line format."""

    AUTO = "auto"
    """JSON when stderr is not a terminal, readable text on a terminal."""
    JSON = "json"
    TEXT = "text"


class LogSettings(_Section):
    """Logging."""

    level: str = "INFO"
    """DEBUG, INFO, WARNING or ERROR."""
    format: LogFormat = LogFormat.AUTO
    """``auto``, ``json`` or ``text``."""

    @field_validator("level")
    @classmethod
    def _check_level(cls, value: str) -> str:
        if value.upper() not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
            raise ValueError("must be DEBUG, INFO, WARNING or ERROR")
        return value.upper()


class Settings(BaseSettings):
    """Everything energy-bridge can be told."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
        use_attribute_docstrings=True,
    )

    mqtt: MqttSettings = MqttSettings()
    """The broker."""
    routes: list[Route] = Field(default_factory=lambda: [Route()], min_length=1)
    """Topic templates and payload formats; the default is the JSON telemetry route."""
    cloud: CloudSettings = CloudSettings()
    """The push API."""
    batch: BatchSettings = BatchSettings()
    """Batching."""
    spool: SpoolSettings = SpoolSettings()
    """The durable spool."""
    http: HttpSettings = HttpSettings()
    """Metrics and health endpoint."""
    log: LogSettings = LogSettings()
    """Logging."""
    metrics: MetricsSettings = MetricsSettings()
    """Metrics options."""
    registry: RegistrySettings = RegistrySettings()
    """The device registry."""
    timezone: str = "Asia/Shanghai"
    """IANA zone recordTime is written in, and in which times without offset are read."""
    shutdown_grace_secs: float = Field(default=10.0, ge=0)
    """On SIGTERM, how long in-flight pushes may take before the bridge exits anyway."""

    @field_validator("timezone")
    @classmethod
    def _check_timezone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError(f"unknown IANA timezone {value!r}") from exc
        return value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Read the environment, then the file (passed as init kwargs); nothing else.

        The environment overrides the file. No dotenv file and no secrets directory are read.
        """
        return (env_settings, init_settings)


def per_point_warning(settings: Settings) -> str | None:
    """What ``mqtt.share_group`` breaks in these routes, ``None`` when nothing.

    A per-point route (``format: value``, a ``{point}`` level) sends one device's points in
    separate messages; shared among replicas they land on different replicas, each of which
    pushes its part as a separate partial entry for the same device and time.
    """
    if settings.mqtt.share_group is None:
        return None
    per_point = [
        r.topic for r in settings.routes if r.format is PayloadFormat.VALUE or "{point}" in r.topic
    ]
    if not per_point:
        return None
    return (
        f"mqtt.share_group with per-point route(s) {per_point}: one device's points can land on"
        " different replicas and reach the cloud as separate partial entries for the same"
        " recordTime; make the broker keep a topic's messages on one member (EMQX:"
        " shared_subscription_strategy hash_topic or hash_clientid; mosquitto and HiveMQ"
        " have no such setting) or publish whole readings"
    )


def has_daylight_saving(zone: str, *, around: datetime | None = None) -> bool:
    """Whether the clocks of IANA ``zone`` change within a year before or after ``around``.

    ``around`` is now when ``None``. A change means the UTC offset is not the same all year
    (daylight saving time).

    In such a zone local time without an offset, as ``recordTime`` is, is ambiguous: when the
    clocks go back, two instants an hour apart have the same local time.
    """
    tz = ZoneInfo(zone)
    start = (around or datetime.now(UTC)) - timedelta(days=366)
    offsets = {(start + timedelta(days=day)).astimezone(tz).utcoffset() for day in range(733)}
    return len(offsets) > 1


def _format_loc(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


MAX_YAML_ALIASES = 100
"""More aliases (``*name``) than this in a config file are refused: no configuration needs
them, and a few dozen nested ones expand to billions of values (an alias bomb)."""
MAX_YAML_VALUES = 100_000
"""A config file whose aliases expand to more values than this is refused, however few."""


class _ConfigYamlError(Exception):
    """The YAML is well-formed but refused (alias bomb, recursive alias)."""


class _BoundedLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that counts aliases as it composes and refuses too many."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.aliases = 0

    def compose_node(self, parent: yaml.Node | None, index: int) -> yaml.Node | None:
        if self.check_event(yaml.AliasEvent):
            self.aliases += 1
            if self.aliases > MAX_YAML_ALIASES:
                event: yaml.Event = self.peek_event()  # type: ignore[no-untyped-call]
                mark = event.start_mark
                where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
                raise _ConfigYamlError(
                    f"{where}more than {MAX_YAML_ALIASES} YAML aliases (*name): refused"
                )
        return super().compose_node(parent, index)


def _expanded_size(root: yaml.Node) -> int:
    """How many values the document has once every alias is expanded; stops past the limit.

    Raises:
        _ConfigYamlError: past :data:`MAX_YAML_VALUES`, or an alias inside its own anchor.
    """
    sizes: dict[int, int] = {}  # id(node) -> expanded size; -1 while being counted

    def size(node: yaml.Node) -> int:
        known = sizes.get(id(node))
        if known is not None:
            if known < 0:
                raise _ConfigYamlError("an alias refers to a value that contains itself")
            return known
        sizes[id(node)] = -1
        children: list[yaml.Node] = []
        if isinstance(node, yaml.SequenceNode):
            children = list(node.value)
        elif isinstance(node, yaml.MappingNode):
            children = [part for pair in node.value for part in pair]
        total = 1
        for child in children:
            total += size(child)
            if total > MAX_YAML_VALUES:
                raise _ConfigYamlError(
                    f"its aliases expand to more than {MAX_YAML_VALUES} values"
                    " (an alias bomb?): refused"
                )
        sizes[id(node)] = total
        return total

    return size(root)


def _safe_load(text: str) -> Any:
    """``yaml.safe_load`` that refuses alias bombs before building anything from them."""
    loader = _BoundedLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _expanded_size(node)
        try:
            return loader.construct_document(node)
        except (ValueError, OverflowError) as exc:
            # PyYAML's resolvers take `0b_`, `0x` or `2024-13-01` for numbers and dates, and
            # its constructors then fail on them with a bare ValueError. Not the exception's
            # text: it may quote the value (a password, say).
            raise _ConfigYamlError(
                "a value looks like a number or a date but is not one (such as 0b_, 0x or"
                f" 2024-13-01: {type(exc).__name__}); quote it to keep it as text"
            ) from None
    finally:
        loader.dispose()


_QUOTED = re.compile(r"'([^']*)'")


def _redact_quoted(text: str) -> str:
    r"""``text`` with quoted source text (an alias or tag name) replaced by ``'...'``.

    A quoted single character or escape (``'q'``, ``'\t'``) is kept: it tells what to fix.
    """

    def keep_short(match: re.Match[str]) -> str:
        inner = match.group(1)
        short = len(inner) <= 1 or (inner.startswith("\\") and len(inner) <= 6)
        return match.group(0) if short else "'...'"

    return _QUOTED.sub(keep_short, text)


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """Where and what the YAML error is (line, column, problem), without the source text."""
    if isinstance(exc, yaml.reader.ReaderError):
        return f"character #x{exc.character:04x} at position {exc.position} is not allowed"
    if isinstance(exc, yaml.MarkedYAMLError):
        mark = exc.problem_mark or exc.context_mark
        problem = _redact_quoted(exc.problem or exc.context or "syntax error")
        if mark is None:
            return problem
        return f"line {mark.line + 1}, column {mark.column + 1}: {problem}"
    return type(exc).__name__


def _not_a_setting(name: str) -> str | None:
    """Why the ``ENERGY_BRIDGE_*`` variable ``name`` sets nothing, ``None`` when it does.

    ``ENERGY_BRIDGE_<SECTION>__<KEY>`` at any depth, or a whole section or list as JSON
    (``ENERGY_BRIDGE_ROUTES``), names a setting; names are read case-insensitively.
    """
    parts = name.upper().removeprefix(ENV_PREFIX).lower().split("__")
    model: type[BaseModel] | None = Settings
    for depth, part in enumerate(parts):
        if model is None or part not in model.model_fields:
            hint = ""
            if model is not None:
                close = difflib.get_close_matches(part, list(model.model_fields), n=1)
                if close:
                    fixed = ENV_PREFIX + "__".join([*parts[:depth], close[0], *parts[depth + 1 :]])
                    hint = f" (did you mean {fixed.upper()}?)"
            return (
                f"the environment variable {name} is not a setting{hint}; settings are"
                f" {ENV_PREFIX}<SECTION>__<KEY>, see the configuration reference"
            )
        annotation = model.model_fields[part].annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            model = annotation
        else:
            model = None
    return None


def check_environment(environ: Mapping[str, str] | None = None) -> None:
    """Refuse ``ENERGY_BRIDGE_*`` variables that set nothing (a typo would be ignored).

    Args:
        environ: the environment; ``os.environ`` when ``None``.

    Raises:
        ConfigError: naming the first such variable (never its value).
    """
    environ = os.environ if environ is None else environ
    unknown = sorted(
        name
        for name in environ
        if name.upper().startswith(ENV_PREFIX) and name.upper() not in TOOL_VARIABLES
        if _not_a_setting(name) is not None
    )
    if unknown:
        message = _not_a_setting(unknown[0]) or ""
        more = len(unknown) - 1
        if more:
            message += f" (and {more} more: {', '.join(unknown[1:])})"
        raise ConfigError("", message)


def load_settings(path: Path | None = None) -> Settings:
    """Load and validate the configuration.

    Args:
        path: a YAML file, or ``None`` for defaults plus environment.

    Returns:
        The frozen settings.

    Raises:
        ConfigError: naming the first offending key (``mqtt.port``) and what is wrong.
    """
    data: dict[str, Any] = {}
    if path is not None:
        try:
            loaded = _safe_load(path.read_text(encoding="utf-8"))
        except _ConfigYamlError as exc:
            raise ConfigError("", f"config file {path}: {exc}") from None
        except RecursionError:
            raise ConfigError("", f"config file {path} is nested too deeply") from None
        except OSError as exc:
            raise ConfigError("", f"cannot read config file {path}: {exc.strerror}") from exc
        except UnicodeDecodeError as exc:
            raise ConfigError(
                "", f"config file {path} is not UTF-8 text (byte {exc.start}): save it as UTF-8"
            ) from None
        except yaml.YAMLError as exc:
            # Never the exception's text: it quotes the offending line, password and all.
            raise ConfigError(
                "", f"config file {path} is not valid YAML: {_yaml_problem(exc)}"
            ) from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError("", f"config file {path} must hold a mapping at the top level")
        for key in loaded:
            if not isinstance(key, str):
                raise ConfigError(
                    str(key),
                    f"top-level key {key!r} is not a name (YAML reads on/off/yes/no and numbers"
                    " as values: quote the key)",
                )
            if key not in Settings.model_fields:
                # Checked here, not left to the model: pydantic-settings takes keyword
                # arguments such as _cli_parse_args or _env_file as instructions (parse the
                # command line, read a dotenv file) instead of settings.
                raise ConfigError(
                    key, "unknown key (check the spelling; see the configuration reference)"
                )
        data = loaded
    check_environment()
    try:
        return Settings(**data)
    except SettingsError as exc:
        # An ENERGY_BRIDGE_* variable holding malformed JSON (for a list or a section).
        match = re.search(r'field "([^"]+)"', str(exc))
        field = match.group(1) if match else ""
        raise ConfigError(
            field,
            f"the environment variable {ENV_PREFIX}{field.upper()} is not valid JSON",
        ) from None
    except ValidationError as exc:
        first = exc.errors()[0]
        key = _format_loc(tuple(first["loc"]))
        message = first["msg"]
        env_name = ENV_PREFIX + "__".join(str(p).upper() for p in first["loc"])
        if env_name in os.environ:
            message += f" (from the environment variable {env_name})"
        if first["type"] == "extra_forbidden":
            message = "unknown key (check the spelling; see the configuration reference)"
        more = len(exc.errors()) - 1
        if more:
            message += f" (and {more} more problem{'s' if more > 1 else ''})"
        raise ConfigError(key, message) from None
