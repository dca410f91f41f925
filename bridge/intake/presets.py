"""Presets (``format: <name>``): the device families plants use, as data plus small hooks.

A preset knows three things about a family:

* the topics it publishes on (a route without ``topic`` subscribes to all of them; a
  preset's topic may use ``+`` for a level it ignores and a final ``#`` for the rest);
* how one message becomes records, in a hook: where the device id, the time and the values
  are, and which messages on those topics are not readings (skipped with one of
  :data:`SKIP_REASONS`, counted, never dead-lettered);
* a default map from the family's names to Energy Expert type-1 points, each point a list of
  candidate sources tried in order (the first that gives a number wins), converted exactly
  (decimal) to V, A, kW, kvar, kWh, Hz and power factor as a fraction. Those units are an
  inference (the API names the points, not their units): see the README. Families whose names
  are user-defined (Neuron tags, Alink identifiers, ThingsBoard keys) map by identity: every
  numeric value is sent under its own name.

A route's ``points`` replaces the preset's map (paths into the same records); the mapper
applies either with the code of the generic mapping (:mod:`bridge.intake.mapping`). Hooks are
pure and never raise anything but :class:`~bridge.errors.MessageSkipped` and
:class:`~bridge.errors.MappingError`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Final, NamedTuple

from bridge.errors import MappingError, MessageSkipped

__all__ = ["PRESETS", "SKIP_REASONS", "Message", "Preset", "Record", "Rule"]

SKIP_REASONS: Final[tuple[str, ...]] = (
    "availability",  # online/offline: Tasmota LWT, Shelly online, z2m availability, mbmd status
    "device_state",  # state, info, settings, replies: Tasmota STATE, Shelly relay, z2m bridge
    "metadata",  # Homie `$` attributes, Home Assistant discovery `.../config`
    "duplicate",  # a copy of values read on another topic (mbmd's Homie values, z2m attributes)
    "no_value",  # a withdrawn value: Victron `{"value": null}` or a zero-byte payload
    "unmapped",  # nothing in the message maps to a point (a switch's temperature, a string)
)

_KILO: Final = "0.001"  # W -> kW, var -> kvar, Wh -> kWh


class Message(NamedTuple):
    """One MQTT message as a preset's hook sees it.

    Attributes:
        levels: the topic's levels.
        after_id: the levels after the route's ``{deviceId}`` level (empty without one).
        device_id: the topic's ``{deviceId}``, ``None`` without one.
        payload: the payload bytes, not yet decoded (a Tasmota ``LWT`` is not JSON).
    """

    levels: list[str]
    after_id: list[str]
    device_id: str | None
    payload: bytes


class Record(NamedTuple):
    """What a hook found: the values the points' paths read, and the record's id and time.

    The id and time are ``None`` when the record has none: then the topic's id and the receive
    time apply.
    """

    values: dict[str, Any]
    device_id: str | None = None
    time: object = None


class Rule(NamedTuple):
    """One candidate source of a point: a path, or the exact sum of several; then a factor."""

    path: str | None = None
    sum: tuple[str, ...] = ()
    scale: str | None = None


Decode = Callable[[bytes], Any]
"""Decodes a payload as JSON keeping every number's exact text (the mapper's decoder)."""


class Preset(NamedTuple):
    """A device family: its topics, its hook and its default map (``None``: identity)."""

    name: str
    topics: tuple[str, ...]
    read: Callable[[Message, Decode], list[Record]]
    points: Mapping[str, tuple[Rule, ...]] | None


def _skip(reason: str, detail: str) -> MessageSkipped:
    return MessageSkipped(reason, detail)


def _nested(keys: list[str], value: object) -> dict[str, Any]:
    """``{"Ac": {"L1": {"Voltage": value}}}`` from ``["Ac", "L1", "Voltage"]``."""
    out: Any = value
    for key in reversed(keys):
        out = {key: out}
    return out  # type: ignore[no-any-return]


def _object(doc: object, what: str) -> dict[str, Any]:
    if type(doc) is not dict:
        raise MappingError("not_object", f"{what} is not a JSON object")
    return doc


def _p(path: str, scale: str | None = None) -> Rule:
    return Rule(path=path, scale=scale)


def _phases(head: str, scale: str | None = None) -> tuple[Rule, ...]:
    """A Tasmota scalar, else the sum of its array's phases (three, or two channels).

    The scalar is tried first, as single-phase devices are the common case (an array is no
    number).
    """
    return (
        _p(head, scale),
        Rule(sum=(f"{head}[0]", f"{head}[1]", f"{head}[2]"), scale=scale),
        Rule(sum=(f"{head}[0]", f"{head}[1]"), scale=scale),
    )


# --- tasmota ------------------------------------------------------------------------------

_TASMOTA_SKIPS: Final = {"LWT": "availability", "STATE": "device_state", "RESULT": "device_state"}

TASMOTA_POINTS: Final[Mapping[str, tuple[Rule, ...]]] = {
    "Ua": (_p("ENERGY.Voltage"), _p("ENERGY.Voltage[0]")),
    "Ub": (_p("ENERGY.Voltage[1]"),),
    "Uc": (_p("ENERGY.Voltage[2]"),),
    "Ia": (_p("ENERGY.Current"), _p("ENERGY.Current[0]")),
    "Ib": (_p("ENERGY.Current[1]"),),
    "Ic": (_p("ENERGY.Current[2]"),),
    "P": _phases("ENERGY.Power", _KILO),
    "Pa": (_p("ENERGY.Power[0]", _KILO),),  # arrays only: a scalar Power is P
    "Q": _phases("ENERGY.ReactivePower", _KILO),
    "Ep_imp": _phases("ENERGY.Total"),
    "COSQ": (_p("ENERGY.Factor"),),  # single phase only: an array gives none
    "F": (_p("ENERGY.Frequency"), _p("ENERGY.Frequency[0]")),
}


def _tasmota(msg: Message, decode: Decode) -> list[Record]:
    """``tele/<topic>/SENSOR``: the whole payload is the record, ``Time`` naive local."""
    kind = msg.levels[-1]
    if kind != "SENSOR":
        reason = _TASMOTA_SKIPS.get(kind, "device_state")
        raise _skip(reason, f"Tasmota {kind} message: not a SENSOR reading")
    doc = _object(decode(msg.payload), "Tasmota SENSOR payload")
    return [Record(doc, None, doc.get("Time"))]


# --- shelly-gen2 --------------------------------------------------------------------------

SHELLY_GEN2_POINTS: Final[Mapping[str, tuple[Rule, ...]]] = {
    "Ua": (_p('"em:0".a_voltage'), _p('"em1:0".voltage')),
    "Ub": (_p('"em:0".b_voltage'),),
    "Uc": (_p('"em:0".c_voltage'),),
    "Ia": (_p('"em:0".a_current'), _p('"em1:0".current')),
    "Ib": (_p('"em:0".b_current'),),
    "Ic": (_p('"em:0".c_current'),),
    "P": (_p('"em:0".total_act_power', _KILO), _p('"em1:0".act_power', _KILO)),
    "Pa": (_p('"em:0".a_act_power', _KILO),),
    "Ep_imp": (_p('"emdata:0".total_act', _KILO), _p('"em1data:0".total_act_energy', _KILO)),
    "Ep_exp": (
        _p('"emdata:0".total_act_ret', _KILO),
        _p('"em1data:0".total_act_ret_energy', _KILO),
    ),
}
_NOTIFY: Final = frozenset({"NotifyStatus", "NotifyFullStatus"})


def _shelly_gen2(msg: Message, decode: Decode) -> list[Record]:
    """Shelly Gen2: ``<id>/status/<component>`` and ``<id>/events/rpc`` notifications.

    A status has no time; a notification gives the device in ``src`` and the time in
    ``params.ts``. The record is ``{component: status}`` either way.
    """
    levels = msg.levels
    if levels[-1] == "online":
        raise _skip("availability", "Shelly online message")
    if len(levels) >= 2 and levels[-2] == "status":
        doc = _object(decode(msg.payload), "Shelly status payload")
        return [Record({levels[-1]: doc})]
    if levels[-2:] == ["events", "rpc"]:
        doc = _object(decode(msg.payload), "Shelly RPC notification")
        method = doc.get("method")
        if method not in _NOTIFY:
            raise _skip("device_state", f"Shelly notification {str(method)[:40]!r}: not a status")
        params = _object(doc.get("params"), "params of a Shelly NotifyStatus")
        src = doc.get("src")
        device = src if isinstance(src, str) and src else None
        values = {k: v for k, v in params.items() if k != "ts"}
        return [Record(values, device, params.get("ts"))]
    raise _skip("device_state", "Shelly message that is neither a status nor a notification")


# --- shelly-gen1 --------------------------------------------------------------------------

# emeter index 0/1/2 taken as phase A/B/C (a Shelly 3EM; on a Shelly EM index 1 is a second
# channel). Per-phase power factors and energy counters have no type-1 point: not mapped.
SHELLY_GEN1_POINTS: Final[Mapping[str, tuple[Rule, ...]]] = {
    "Ua": (_p('emeter."0".voltage'),),
    "Ub": (_p('emeter."1".voltage'),),
    "Uc": (_p('emeter."2".voltage'),),
    "Ia": (_p('emeter."0".current'),),
    "Ib": (_p('emeter."1".current'),),
    "Ic": (_p('emeter."2".current'),),
    "Pa": (_p('emeter."0".power', _KILO),),
}


def _shelly_gen1(msg: Message, decode: Decode) -> list[Record]:
    """Shelly Gen1: ``shellies/<id>/emeter/<i>/<quantity>``, one bare value a topic.

    The record is nested by the levels after the id (``emeter."0".voltage``).
    """
    rest = msg.after_id
    if rest == ["online"]:
        raise _skip("availability", "Shelly online message")
    if len(rest) == 3 and rest[0] == "emeter":
        return [Record(_nested(rest, decode(msg.payload)))]
    raise _skip("device_state", "Shelly message that is not an emeter value")


# --- mbmd ---------------------------------------------------------------------------------

MBMD_POINTS: Final[Mapping[str, tuple[Rule, ...]]] = {
    "Ua": (_p("Voltage.L1"),),
    "Ub": (_p("Voltage.L2"),),
    "Uc": (_p("Voltage.L3"),),
    "Ia": (_p("Current.L1"),),
    "Ib": (_p("Current.L2"),),
    "Ic": (_p("Current.L3"),),
    "P": (_p("Power", _KILO),),
    "Pa": (_p("Power.L1", _KILO),),
    "Q": (_p("ReactivePower", _KILO),),
    "S": (_p("ApparentPower", _KILO),),
    "Ep_imp": (_p("Import"),),
    "Ep_exp": (_p("Export"),),
    "F": (_p("Frequency"),),
    "COSQ": (_p("Cosphi"),),
}


def _mbmd(msg: Message, decode: Decode) -> list[Record]:
    """mbmd: ``mbmd/<device>/<Measurement>[/L1]`` (``%.3f`` text).

    ``mbmd/status`` and Homie ``homie/<device>/...`` are not readings (Homie repeats the values
    mbmd publishes).
    """
    rest = msg.after_id
    if any(level.startswith("$") for level in msg.levels):
        raise _skip("metadata", "Homie attribute")
    if not rest:
        raise _skip("availability", "mbmd status message")
    if rest[0] == "meter":
        raise _skip("duplicate", "Homie copy of an mbmd value")
    return [Record(_nested(rest, decode(msg.payload)))]


# --- zigbee2mqtt --------------------------------------------------------------------------

Z2M_POINTS: Final[Mapping[str, tuple[Rule, ...]]] = {
    "Ua": (_p("voltage_a"), _p("voltage")),
    "Ub": (_p("voltage_b"), _p("voltage_phase_b")),
    "Uc": (_p("voltage_c"), _p("voltage_phase_c")),
    "Ia": (_p("current_a"), _p("current")),
    "Ib": (_p("current_b"), _p("current_phase_b")),
    "Ic": (_p("current_c"), _p("current_phase_c")),
    "P": (_p("power", _KILO),),
    "Pa": (_p("power_a", _KILO),),
    "Ep_imp": (_p("energy"),),
    "COSQ": (_p("power_factor"),),
    "F": (_p("ac_frequency"),),
}


def _zigbee2mqtt(msg: Message, decode: Decode) -> list[Record]:
    """``zigbee2mqtt/<friendly name>``: the device state object (units V, A, W, kWh)."""
    if msg.device_id == "bridge":
        raise _skip("device_state", "zigbee2mqtt bridge message")
    rest = msg.after_id
    if rest == ["availability"]:
        raise _skip("availability", "zigbee2mqtt availability message")
    if rest:
        raise _skip("duplicate", "zigbee2mqtt attribute or command topic")
    return [Record(_object(decode(msg.payload), "zigbee2mqtt payload"))]


# --- victron ------------------------------------------------------------------------------

VICTRON_POINTS: Final[Mapping[str, tuple[Rule, ...]]] = {
    "Ua": (_p("Ac.L1.Voltage"),),
    "Ub": (_p("Ac.L2.Voltage"),),
    "Uc": (_p("Ac.L3.Voltage"),),
    "Ia": (_p("Ac.L1.Current"),),
    "Ib": (_p("Ac.L2.Current"),),
    "Ic": (_p("Ac.L3.Current"),),
    "P": (_p("Ac.Power", _KILO),),
    "Pa": (_p("Ac.L1.Power", _KILO),),
    "Ep_imp": (_p("Ac.Energy.Forward"),),
    "Ep_exp": (_p("Ac.Energy.Reverse"),),
}


def _victron(msg: Message, decode: Decode) -> list[Record]:
    """Victron: ``N/<portal>/<service>/<instance>/<path>`` with ``{"value": x}``.

    The device is ``<portal>/<service>/<instance>``, the record nested by the D-Bus path.
    """
    rest = msg.after_id
    if len(rest) < 3:
        raise _skip("device_state", "Victron message without service, instance and path")
    if not msg.payload:
        raise _skip("no_value", "Victron zero-byte payload: the value is gone from the D-Bus")
    doc = _object(decode(msg.payload), "Victron payload")
    if "value" not in doc:
        raise MappingError("bad_value", "Victron payload has no 'value' key")
    value = doc["value"]
    if value is None:
        raise _skip("no_value", "Victron value null: invalid on the D-Bus")
    device = "/".join(level for level in (msg.device_id, rest[0], rest[1]) if level)
    return [Record(_nested(rest[2:], value), device)]


# --- neuron -------------------------------------------------------------------------------


def _neuron(msg: Message, decode: Decode) -> list[Record]:
    """Neuron: an upload's ``values`` (or ``tags[]``) of ``node`` at ``timestamp`` (ms).

    A tag in ``errors`` or with an ``error`` is never sent.
    """
    doc = _object(decode(msg.payload), "Neuron upload")
    errors = doc.get("errors")
    failed = errors if type(errors) is dict else {}
    values = doc.get("values")
    tags = doc.get("tags")
    if type(values) is dict:
        found = {k: v for k, v in values.items() if k not in failed}
    elif type(tags) is list:
        found = {
            tag["name"]: tag["value"]
            for tag in tags
            if type(tag) is dict
            and isinstance(tag.get("name"), str)
            and "value" in tag
            and "error" not in tag
            and tag["name"] not in failed
        }
    else:
        raise _skip("device_state", "Neuron message without values or tags: not an upload")
    node = doc.get("node")
    if not isinstance(node, str) or not node:
        raise MappingError("missing_device_id", "Neuron upload without a 'node' name")
    return [Record(found, node, doc.get("timestamp"))]


# --- alink --------------------------------------------------------------------------------


def _alink_properties(props: object, device: str | None) -> list[Record]:
    """Alink properties as one record per time.

    The forms read: ``{id: {value, time}}``, ``{id: [{value, time}, ...]}`` and flat ``{id:
    value}``.
    """
    if type(props) is not dict:
        return []
    groups: dict[str | None, dict[str, Any]] = {}
    for name, item in props.items():
        for entry in item if type(item) is list else [item]:
            if type(entry) is dict and "value" in entry:
                when = entry.get("time")
                if when is not None and not isinstance(when, str):
                    raise MappingError("bad_time", f"Alink property {name[:40]!r} time")
                groups.setdefault(when, {})[name] = entry["value"]
            else:
                groups.setdefault(None, {})[name] = entry
    return [Record(values, device, when) for when, values in groups.items()]


def _alink(msg: Message, decode: Decode) -> list[Record]:
    """Alink: ``.../thing/event/property/post``, ``batch/post`` and the gateway's ``pack/post``.

    A ``pack/post`` holds ``subDevices[]``, each named by ``identity.deviceName``; replies are
    not readings.
    """
    last = msg.levels[-1]
    if last.endswith("_reply"):
        raise _skip("device_state", "Alink reply")
    if last != "post":
        raise _skip("device_state", "Alink message that is not a property post")
    doc = _object(decode(msg.payload), "Alink message")
    params = _object(doc.get("params"), "params of an Alink message")
    kind = msg.levels[-2] if len(msg.levels) >= 2 else ""
    if kind not in {"batch", "pack"}:
        return _alink_properties(params, None)
    records = _alink_properties(params.get("properties"), None)
    subs = params.get("subDevices")
    for sub in subs if type(subs) is list else []:
        if type(sub) is not dict:
            continue
        identity = sub.get("identity")
        name = identity.get("deviceName") if type(identity) is dict else None
        if not isinstance(name, str) or not name:
            raise MappingError("missing_device_id", "Alink sub-device without deviceName")
        records += _alink_properties(sub.get("properties"), name)
    return records


# --- thingsboard --------------------------------------------------------------------------


def _thingsboard_entries(doc: object, device: str | None) -> list[Record]:
    """``{ts, values}``, a flat object, or an array of either."""
    records = []
    for item in doc if type(doc) is list else [doc]:
        if type(item) is not dict:
            raise MappingError("not_object", "ThingsBoard telemetry entry is not an object")
        values = item.get("values")
        if type(values) is dict:
            records.append(Record(values, device, item.get("ts")))
        else:
            records.append(Record(item, device))
    return records


def _thingsboard(msg: Message, decode: Decode) -> list[Record]:
    """ThingsBoard: device telemetry and the gateway's ``v1/gateway/telemetry``.

    Device telemetry is ``{ts, values}`` or flat, or arrays of them; the gateway's is keyed by
    device name. Other gateway messages are not readings.
    """
    levels = msg.levels
    if levels[-1] != "telemetry":
        raise _skip("device_state", "ThingsBoard message that is not telemetry")
    doc = decode(msg.payload)
    if len(levels) >= 2 and levels[-2] == "gateway":
        records: list[Record] = []
        for name, entries in _object(doc, "ThingsBoard gateway telemetry").items():
            if not name:
                raise MappingError("missing_device_id", "ThingsBoard gateway device named ''")
            records += _thingsboard_entries(entries, name)
        return records
    return _thingsboard_entries(doc, None)


PRESETS: Final[Mapping[str, Preset]] = {
    p.name: p
    for p in (
        Preset("tasmota", ("tele/{deviceId}/#",), _tasmota, TASMOTA_POINTS),
        Preset(
            "shelly-gen2",
            ("{deviceId}/status/+", "{deviceId}/events/rpc", "{deviceId}/online"),
            _shelly_gen2,
            SHELLY_GEN2_POINTS,
        ),
        Preset("shelly-gen1", ("shellies/{deviceId}/#",), _shelly_gen1, SHELLY_GEN1_POINTS),
        Preset("mbmd", ("mbmd/{deviceId}/#", "homie/{deviceId}/#"), _mbmd, MBMD_POINTS),
        Preset("zigbee2mqtt", ("zigbee2mqtt/{deviceId}/#",), _zigbee2mqtt, Z2M_POINTS),
        Preset("victron", ("N/{deviceId}/#",), _victron, VICTRON_POINTS),
        Preset("neuron", ("/neuron/#",), _neuron, None),
        Preset(
            "alink",
            ("/sys/+/{deviceId}/thing/event/property/#",),
            _alink,
            None,
        ),
        Preset("thingsboard", ("v1/devices/{deviceId}/#", "v1/gateway/#"), _thingsboard, None),
    )
}
"""Every preset by its ``format`` name."""
