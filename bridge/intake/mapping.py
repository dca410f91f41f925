"""Topic + payload -> :class:`~bridge.models.Reading`: pure, no I/O, run once per MQTT message.

A message is matched against the configured route templates level by level (the first
matching route wins). ``{deviceType}``, ``{deviceId}`` and ``{point}`` each capture one topic
level; ``deviceId`` and ``deviceType`` are read from the topic only, never from the payload (a
``deviceId`` key in a JSON payload is just another data point, and is rejected as such unless
it happens to hold a number).

Payload formats:

``json``
    A JSON object is one reading, a JSON array of objects is several (back-filled history).
    Every key is a data point except the route's ``time_key`` (default ``ts``); of keys sent
    twice in one object the last wins, as in any JSON parser.
``value``
    A bare value for the point named by ``{point}``: a JSON number (``226.1``), a JSON string
    (``"226.1"``) or an object ``{"value": 226.1, "ts": ...}`` (the time under ``time_key``,
    else ``ts``; other keys such as a unit are ignored).

Values become strings without losing or inventing digits: a JSON number keeps the exact text
it was sent with, a JSON string passes through unchanged but must look like a finite decimal
number (``-?digits[.digits][e[+-]digits]``, ASCII only, no spaces). ``null`` points are
skipped. Renames and exact decimal scale factors from the route are applied afterwards.

Times (``time_key`` in the payload, else the receive time) are epoch seconds or milliseconds
(``> 1e11`` means milliseconds) as a number or numeric string, ISO 8601 with ``Z`` or an
offset, or ``YYYY-MM-DD HH:MM:SS`` / ISO without offset in the configured timezone (DST
ambiguity resolved with ``fold=0``). Fractions of a second are floored. As a sanity bound the
instant must lie in the years 2000-2100 UTC (``2000-01-01T00:00:00Z`` up to, not including,
``2101-01-01T00:00:00Z``); a ``null`` time counts as missing.

Every rejection raises :class:`~bridge.errors.MappingError` with one of :data:`REASONS` and a
sentence that quotes at most a short excerpt of the payload.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from datetime import date, datetime
from decimal import (
    MAX_EMAX,
    MAX_PREC,
    MIN_EMIN,
    Context,
    Decimal,
    Inexact,
    InvalidOperation,
    Overflow,
    Underflow,
)
from functools import lru_cache
from typing import Any, Final
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from bridge.config import PayloadFormat, Route
from bridge.errors import ConfigError, MappingError
from bridge.models import NO_DEVICE_ID_TYPES, Reading

__all__ = ["REASONS", "Mapper", "format_record_time", "parse_time"]

REASONS: Final[tuple[str, ...]] = (
    "bad_topic",  # the topic is not valid UTF-8
    "topic_too_long",  # the topic has more than 1024 bytes (bounds the caches' memory)
    "no_route",  # no route template matches the topic
    "bad_device_type",  # deviceType is not a non-empty string of ASCII digits
    "missing_device_id",  # deviceId is required for this type but absent or an empty level
    "device_id_too_long",  # deviceId has more than 128 characters
    "bad_point",  # a point name is empty, not valid Unicode, or doubled by renames
    "payload_too_large",  # payload exceeds max_payload_bytes (checked before decoding)
    "empty_payload",  # zero-length payload, e.g. a retained message being cleared
    "bad_encoding",  # the payload is not valid UTF-8
    "bad_json",  # not parseable as JSON, or nested too deeply to parse
    "not_object",  # json format: top level (or an array element) is not a JSON object
    "too_many_readings",  # a JSON array holds more than max_readings objects
    "too_many_points",  # a reading holds more than max_points data points
    "no_points",  # nothing left to send: empty array, empty object, or only null values
    "bad_value",  # a point value is not a finite number or numeric string
    "bad_time",  # the time is unparseable, negative, or outside 2000-2100
    "mapping_failed",  # the mapping itself failed (a bug): logged with its traceback
)

_MIN_TS: Final = 946_684_800  # 2000-01-01T00:00:00Z
_MAX_TS: Final = 4_133_980_800  # 2101-01-01T00:00:00Z (exclusive)
_MS_THRESHOLD: Final = 100_000_000_000  # epoch values above this are milliseconds
_MAX_EPOCH_TEXT: Final = 40  # longer numeric time strings cannot be in range
_UNIX_EPOCH_ORDINAL: Final = date(1970, 1, 1).toordinal()

_CACHE_SIZE: Final = 16_384
MAX_TOPIC_BYTES: Final = 1024
"""Longer topics are rejected: the topic cache and the metrics hold topics, so their length
bounds the memory those take (16,384 cached topics, at most 16 MiB)."""
MAX_DEVICE_ID: Final = 128
"""Longer device ids are rejected (the device freshness table holds up to 100,000 of them)."""
_EXCERPT: Final = 60
_MAX_SCALED_EXPONENT: Final = 1000  # bounds the length of format(d, "f") output
_MAX_EXPONENT_DIGITS: Final = 6

_NUMBER_TEXT: Final = re.compile(r"-?[0-9]+(?:\.[0-9]+)?(?:[eE][-+]?[0-9]+)?")
_DIGITS: Final = "0123456789"

# Scaling must be exact: unbounded precision, and any rounding is an error, not a result.
_EXACT: Final = Context(
    prec=MAX_PREC,
    Emax=MAX_EMAX,
    Emin=MIN_EMIN,
    traps=[InvalidOperation, Inexact, Overflow, Underflow],
)


class _Num(str):
    """The exact source text of a JSON number (marks it apart from a JSON string)."""

    __slots__ = ()


class _Const(str):
    """``NaN``, ``Infinity`` or ``-Infinity`` as found in the JSON text."""

    __slots__ = ()


def _loads(text: str) -> Any:
    try:
        return _DECODER(text)
    except json.JSONDecodeError as exc:
        start = max(0, exc.pos - 20)
        near = _clip(text[start : exc.pos + 20])
        raise MappingError(
            "bad_json",
            f"payload is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
            f" (char {exc.pos}), near {near}",
        ) from None
    except RecursionError:
        raise MappingError("bad_json", "payload JSON is nested too deeply to parse") from None


_DECODER: Final = json.JSONDecoder(parse_float=_Num, parse_int=_Num, parse_constant=_Const).decode


def _clip(text: str) -> str:
    """Quote ``text`` for an error message, cut to a short excerpt.

    The excerpt is of the quoted form: an escaped control character takes four characters.
    """
    quoted = repr(text[: _EXCERPT + 1])
    if len(text) > _EXCERPT or len(quoted) > _EXCERPT + 2:
        return quoted[: _EXCERPT + 1] + "'..."
    return quoted


def _describe(value: object) -> str:
    """Render a JSON value the way it appeared in the payload, briefly."""
    if value is True:
        return "true"
    if value is False:
        return "false"
    if value is None:
        return "null"
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, _Num | _Const):
        return value if len(value) <= _EXCERPT else value[:_EXCERPT] + "..."
    if isinstance(value, str):
        return _clip(value)
    if isinstance(value, int) and value.bit_length() > 128:
        return "a very large number"  # repr() of huge ints is slow or even refused
    if isinstance(value, int | float):
        return repr(value)
    return type(value).__name__


def _is_number_text(text: str) -> bool:
    """Return whether ``text`` is a finite decimal number in the accepted notation."""
    if not text.isascii():
        return False
    body = text[1:] if text[:1] == "-" else text
    if body.isdigit():
        return True
    head, dot, tail = body.partition(".")
    if dot and head.isdigit() and tail.isdigit():
        return True
    return _NUMBER_TEXT.fullmatch(text) is not None and _exponent_in_range(text)


def _exponent_in_range(text: str) -> bool:
    """Whether a number's exponent (``1e5``) has at most 6 digits.

    No meter measures past that, and larger ones are beyond what a decimal can hold
    (``6e5555...`` broke it).
    """
    mark = max(text.find("e"), text.find("E"))
    return mark < 0 or len(text[mark + 1 :].lstrip("+-")) <= _MAX_EXPONENT_DIGITS


def _value_text(value: object, point: str) -> str | None:
    """Return the exact text of a point value, ``None`` for null.

    Raises:
        MappingError: ``bad_value`` when the value is not a finite number or numeric string.
    """
    if isinstance(value, str):
        kind = type(value)
        if kind is _Num:
            text = str(value)
            if ("e" not in text and "E" not in text) or _exponent_in_range(text):
                return text
            expected = "expected a number with an exponent of at most 6 digits"
        elif kind is _Const:
            expected = "expected a finite number"
        elif _is_number_text(value):
            return value
        else:
            expected = "expected a finite decimal number such as '226.1'"
    elif value is None:
        return None
    else:
        expected = "expected a number or a numeric string"
    hint = ""
    if point in {"deviceId", "deviceType"}:
        hint = f" ({point} is taken from the topic only, never from the payload)"
    raise MappingError(
        "bad_value", f"point {_clip(point)} has value {_describe(value)}: {expected}{hint}"
    )


def _bad_time(value: object, why: str) -> MappingError:
    return MappingError("bad_time", f"time {_describe(value)} {why}")


def _checked(ts: int, value: object) -> int:
    if _MIN_TS <= ts < _MAX_TS:
        return ts
    raise _bad_time(value, "is outside the accepted years 2000-2100 (UTC)")


def _epoch_from_number(value: object, whole: int) -> int:
    """Turn a non-negative floored epoch (seconds or milliseconds) into checked seconds."""
    if whole > _MS_THRESHOLD:
        whole //= 1000
    return _checked(whole, value)


def _epoch_from_text(text: str, tz: ZoneInfo) -> int:
    if text[4:5] == "-":
        return _epoch_from_datetime_text(text, tz)
    if text.isascii():
        if text.isdigit():
            if len(text) > _MAX_EPOCH_TEXT:
                raise _bad_time(text, "is outside the accepted years 2000-2100 (UTC)")
            return _epoch_from_number(text, int(text))
        head, dot, tail = text.partition(".")
        if dot and head.isdigit() and tail.isdigit():
            if len(head) > _MAX_EPOCH_TEXT:
                raise _bad_time(text, "is outside the accepted years 2000-2100 (UTC)")
            # Non-negative, so truncating the fraction floors it.
            return _epoch_from_number(text, int(head))
        if _NUMBER_TEXT.fullmatch(text):
            if text[:1] == "-":
                raise _bad_time(text, "is a negative epoch")
            if not _exponent_in_range(text):
                raise _bad_time(text, "is outside the accepted years 2000-2100 (UTC)")
            number = Decimal(text)
            if number.adjusted() > _MAX_EPOCH_TEXT:
                raise _bad_time(text, "is outside the accepted years 2000-2100 (UTC)")
            return _epoch_from_number(text, int(number))
    return _epoch_from_datetime_text(text, tz)


def _epoch_from_datetime_text(text: str, tz: ZoneInfo) -> int:
    """Parse ``YYYY-MM-DD[T ]HH:MM:SS[.fff][Z|±HH[:MM]]`` strictly."""
    if (
        len(text) < 19
        or text[4] != "-"
        or text[7] != "-"
        or text[10] not in "Tt "
        or text[13] != ":"
        or text[16] != ":"
    ):
        raise _bad_time(
            text,
            "is neither an epoch number nor 'YYYY-MM-DD HH:MM:SS' / ISO 8601 with optional offset",
        )
    fields = (text[0:4], text[5:7], text[8:10], text[11:13], text[14:16], text[17:19])
    joined = "".join(fields)
    if not (joined.isascii() and joined.isdigit()):
        raise _bad_time(text, "has non-digit date or time fields")
    year, month, day, hour, minute, second = map(int, fields)
    rest = text[19:]
    if rest[:1] in {".", ","}:
        fraction = rest[1:]
        rest = fraction.lstrip(_DIGITS)
        if len(rest) == len(fraction):
            raise _bad_time(text, "has an empty fraction of a second")
    offset: int | None = None
    if rest in {"Z", "z"}:
        offset = 0
    elif rest:
        offset = _parse_offset(rest, text)
    if not 1999 <= year <= 2101 or hour > 23 or minute > 59 or second > 59:
        raise _bad_time(text, "has a field out of range (or a year outside 2000-2100)")
    try:
        if offset is None:
            naive_ts = datetime(year, month, day, hour, minute, second, tzinfo=tz).timestamp()
            return _checked(int(naive_ts), text)
        days = date(year, month, day).toordinal() - _UNIX_EPOCH_ORDINAL
    except ValueError:
        raise _bad_time(text, "is not a real calendar date") from None
    return _checked(days * 86400 + hour * 3600 + minute * 60 + second - offset, text)


def _parse_offset(rest: str, text: str) -> int:
    """Return the UTC offset in seconds of ``±HH``, ``±HHMM`` or ``±HH:MM``."""
    sign = rest[0]
    digits = rest[1:].replace(":", "", 1) if len(rest) == 6 and rest[3] == ":" else rest[1:]
    if sign not in {"+", "-"} or len(digits) not in {2, 4} or not digits.isascii():
        raise _bad_time(text, "has an unreadable UTC offset (use Z, +08:00 or +0800)")
    if not digits.isdigit():
        raise _bad_time(text, "has an unreadable UTC offset (use Z, +08:00 or +0800)")
    hours = int(digits[:2])
    minutes = int(digits[2:] or "0")
    if hours > 23 or minutes > 59:
        raise _bad_time(text, "has a UTC offset out of range")
    seconds = hours * 3600 + minutes * 60
    return -seconds if sign == "-" else seconds


def parse_time(value: object, tz: ZoneInfo) -> int:
    """Turn a payload time into epoch seconds (UTC).

    Accepts epoch seconds or milliseconds (``> 1e11``) as an ``int``, a finite ``float`` or a
    numeric string (fractions floored), ISO 8601 with ``Z`` or an offset, and
    ``YYYY-MM-DD HH:MM:SS`` or ISO 8601 without offset, which is read in ``tz`` (``fold=0``).

    Args:
        value: the time as found in the payload.
        tz: the zone in which times without offset are read.

    Returns:
        Epoch seconds, floored, between 2000-01-01 and 2101-01-01 UTC.

    Raises:
        MappingError: ``bad_time`` for any other type or text, booleans, negative epochs and
            instants outside the years 2000-2100.
    """
    if isinstance(value, str):
        if type(value) is _Const:
            raise _bad_time(value, "is not a finite number")
        return _epoch_from_text(value, tz)
    if isinstance(value, bool):
        raise _bad_time(value, "is a boolean, not a time")
    if isinstance(value, int):
        if value < 0:
            raise _bad_time(value, "is a negative epoch")
        return _epoch_from_number(value, value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise _bad_time(value, "is not a finite number")
        if value < 0:
            raise _bad_time(value, "is a negative epoch")
        return _epoch_from_number(value, math.floor(value))
    raise MappingError(
        "bad_time", f"time is {_describe(value)}: expected an epoch number or a date-time string"
    )


@lru_cache(maxsize=_CACHE_SIZE)
def format_record_time(ts: int, tz: ZoneInfo) -> str:
    """Format epoch seconds as the API's ``recordTime`` in ``tz``.

    Args:
        ts: epoch seconds (UTC).
        tz: the configured timezone.

    Returns:
        ``YYYY-MM-DD HH:MM:SS`` local to ``tz``, without offset.
    """
    return datetime.fromtimestamp(ts, tz).isoformat(" ")[:19]


class _Matcher:
    """One route, compiled for matching and mapping."""

    __slots__ = (
        "fixed_type",
        "id_index",
        "is_json",
        "levels",
        "literals",
        "point_index",
        "renames",
        "scale",
        "template",
        "time_key",
        "type_index",
    )

    def __init__(self, route: Route, where: str) -> None:
        parts = route.topic.split("/")
        self.template = route.topic
        self.levels = len(parts)
        self.literals = tuple(
            (i, level) for i, level in enumerate(parts) if not level.startswith("{")
        )
        self.type_index = parts.index("{deviceType}") if "{deviceType}" in parts else -1
        self.id_index = parts.index("{deviceId}") if "{deviceId}" in parts else -1
        self.point_index = parts.index("{point}") if "{point}" in parts else -1
        self.fixed_type = route.device_type or ""
        self.is_json = route.format is PayloadFormat.JSON
        self.time_key = route.time_key
        self.renames = dict(route.renames)
        self.scale = {point: Decimal(factor) for point, factor in route.scale.items()}
        if self.type_index < 0:
            if not (self.fixed_type.isascii() and self.fixed_type.isdigit()):
                raise ConfigError(f"{where}.device_type", "must be a string of digits, e.g. '1'")
            if self.id_index < 0 and self.fixed_type not in NO_DEVICE_ID_TYPES:
                raise ConfigError(
                    f"{where}.topic",
                    f"device type {self.fixed_type} needs a deviceId: add a {{deviceId}} level",
                )
        for old, new in self.renames.items():
            if not new:
                raise ConfigError(f"{where}.renames", f"{old!r} is renamed to an empty name")


class Mapper:
    """Maps MQTT messages to readings according to the configured routes.

    Stateless apart from bounded caches (resolved topics, formatted record times), so one
    instance can serve the whole process; it is not meant to be shared between threads.
    """

    __slots__ = (
        "_matchers",
        "_max_payload_bytes",
        "_max_points",
        "_max_readings",
        "_subscriptions",
        "_time_cache",
        "_topic_cache",
        "_tz",
    )

    def __init__(
        self,
        routes: Sequence[Route],
        timezone: str,
        *,
        max_payload_bytes: int = 262144,
        max_points: int = 1000,
        max_readings: int = 10000,
    ) -> None:
        """Compile the routes.

        Args:
            routes: route templates in priority order (the first match wins).
            timezone: IANA zone of ``recordTime`` and of times given without offset.
            max_payload_bytes: larger payloads are rejected before decoding.
            max_points: most data points in one reading.
            max_readings: most readings (array elements) in one message.

        Raises:
            ConfigError: for an unknown timezone, no routes, or a route that can never map.
            ValueError: for a limit below 1.
        """
        if min(max_payload_bytes, max_points, max_readings) < 1:
            raise ValueError("max_payload_bytes, max_points and max_readings must be >= 1")
        if not routes:
            raise ConfigError("routes", "at least one route is required")
        try:
            self._tz = ZoneInfo(timezone)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ConfigError("timezone", f"unknown IANA timezone {timezone!r}") from exc
        self._matchers = tuple(_Matcher(r, f"routes[{i}]") for i, r in enumerate(routes))
        self._subscriptions = [route.subscription for route in routes]
        self._max_payload_bytes = max_payload_bytes
        self._max_points = max_points
        self._max_readings = max_readings
        self._topic_cache: dict[bytes, tuple[_Matcher, str, str | None, str]] = {}
        self._time_cache: dict[int, str] = {}

    @property
    def subscriptions(self) -> list[str]:
        """MQTT topic filters, one per route, each placeholder replaced by ``+``."""
        return list(self._subscriptions)

    def route_of(self, topic: bytes) -> str:
        """The template of the route ``topic`` maps through, ``"none"`` when it matches none.

        A metric label: low cardinality (one value per configured route).
        """
        resolved = self._topic_cache.get(topic)
        if resolved is None:
            try:
                resolved = self._resolve(topic)
            except MappingError:
                return "none"
        return resolved[0].template

    def map(self, topic: bytes, payload: bytes, received_at: float) -> list[Reading]:
        """Turn one MQTT message into readings.

        Args:
            topic: the topic as received (raw bytes).
            payload: the payload bytes.
            received_at: arrival time, epoch seconds; the reading time when the payload has none.

        Returns:
            One reading per JSON object (at least one).

        Raises:
            MappingError: with a reason from :data:`REASONS` when the message cannot be mapped.
        """
        resolved = self._topic_cache.get(topic)
        if resolved is None:
            resolved = self._resolve(topic)
        matcher, device_type, device_id, _ = resolved
        if len(payload) > self._max_payload_bytes:
            raise MappingError(
                "payload_too_large",
                f"payload has {len(payload)} bytes, more than the limit of"
                f" {self._max_payload_bytes}",
            )
        if not payload:
            raise MappingError("empty_payload", "payload is empty")
        try:
            text = payload.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise MappingError(
                "bad_encoding", f"payload is not valid UTF-8 ({exc.reason} at byte {exc.start})"
            ) from None
        doc = _loads(text)
        if not matcher.is_json:
            return [self._value_reading(resolved, doc, received_at)]
        if type(doc) is dict:
            return [self._reading(matcher, device_type, device_id, doc, received_at)]
        if type(doc) is not list:
            raise MappingError(
                "not_object",
                f"payload is {_describe(doc)}: expected a JSON object or an array of objects",
            )
        if not doc:
            raise MappingError("no_points", "payload is an empty array: no readings")
        if len(doc) > self._max_readings:
            raise MappingError(
                "too_many_readings",
                f"payload holds {len(doc)} readings, more than the limit of {self._max_readings}",
            )
        readings = []
        for index, item in enumerate(doc):
            try:
                if type(item) is not dict:
                    raise MappingError(  # noqa: TRY301 - re-raised below with the index
                        "not_object", f"element is {_describe(item)}: expected a JSON object"
                    )
                readings.append(self._reading(matcher, device_type, device_id, item, received_at))
            except MappingError as exc:
                raise MappingError(exc.reason, f"reading [{index}]: {exc.detail}") from None
        return readings

    def _resolve(self, topic: bytes) -> tuple[_Matcher, str, str | None, str]:
        if len(topic) > MAX_TOPIC_BYTES:
            raise MappingError(
                "topic_too_long",
                f"topic has {len(topic)} bytes, more than the limit of {MAX_TOPIC_BYTES}",
            )
        try:
            text = topic.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise MappingError(
                "bad_topic", f"topic is not valid UTF-8 ({exc.reason} at byte {exc.start})"
            ) from None
        levels = text.split("/")
        count = len(levels)
        for matcher in self._matchers:
            if matcher.levels != count:
                continue
            for index, literal in matcher.literals:
                if levels[index] != literal:
                    break
            else:
                break
        else:
            raise MappingError("no_route", f"topic {_clip(text)} matches no route")
        if matcher.type_index >= 0:
            device_type = levels[matcher.type_index]
            if not (device_type.isascii() and device_type.isdigit()):
                raise MappingError(
                    "bad_device_type",
                    f"topic {_clip(text)} has device type {_clip(device_type)}:"
                    " expected digits such as '1'",
                )
        else:
            device_type = matcher.fixed_type
        # Types 15 and 16 send no deviceId, but one found in the topic is kept: it keeps the
        # readings of different sources apart (they are batched separately).
        device_id = (levels[matcher.id_index] if matcher.id_index >= 0 else "") or None
        if device_type not in NO_DEVICE_ID_TYPES and not device_id:
            raise MappingError(
                "missing_device_id",
                f"topic {_clip(text)} gives no deviceId, which device type {device_type} requires",
            )
        if device_id is not None and len(device_id) > MAX_DEVICE_ID:
            raise MappingError(
                "device_id_too_long",
                f"deviceId has {len(device_id)} characters, more than the limit of {MAX_DEVICE_ID}",
            )
        point = ""
        if matcher.point_index >= 0:
            point = levels[matcher.point_index]
            if not point:
                raise MappingError("bad_point", f"topic {_clip(text)} has an empty point level")
            point = matcher.renames.get(point, point)
        resolved = (matcher, device_type, device_id, point)
        cache = self._topic_cache
        if len(cache) >= _CACHE_SIZE:
            cache.clear()
        cache[topic] = resolved
        return resolved

    def _record_time(self, ts: int) -> str:
        cache = self._time_cache
        text = cache.get(ts)
        if text is None:
            if len(cache) >= _CACHE_SIZE:
                cache.clear()
            text = cache[ts] = format_record_time(ts, self._tz)
        return text

    def _time(self, raw: object, received_at: float) -> int:
        if raw is None:
            # Only our own clock lands here; a clock far off (never synced) must not pass.
            if not _MIN_TS <= received_at < _MAX_TS:
                raise MappingError(
                    "bad_time",
                    f"payload has no time and the receive time {received_at!r} is outside"
                    " the years 2000-2100 (is the clock set?)",
                )
            return int(received_at)
        return parse_time(raw, self._tz)

    def _reading(
        self,
        matcher: _Matcher,
        device_type: str,
        device_id: str | None,
        obj: dict[str, Any],
        received_at: float,
    ) -> Reading:
        time_key = matcher.time_key
        raw_time = obj.get(time_key)
        count = len(obj) - (time_key in obj)
        if count > self._max_points:
            raise MappingError(
                "too_many_points",
                f"reading has {count} points, more than the limit of {self._max_points}",
            )
        renames = matcher.renames
        data: dict[str, str] = {}
        for key, value in obj.items():
            if key == time_key:
                continue
            if type(value) is _Num and "e" not in value and "E" not in value:
                text = str(value)
            else:
                maybe = _value_text(value, key)
                if maybe is None:
                    continue
                text = maybe
            if not key.isascii():
                _check_point_name(key)
            elif not key:
                raise MappingError("bad_point", "reading has a point with an empty name")
            if renames:
                key = renames.get(key, key)  # noqa: PLW2901 - the renamed point name
                if key in data:
                    raise MappingError(
                        "bad_point", f"two points are named {_clip(key)} after renames"
                    )
            data[key] = text
        if not data:
            raise MappingError("no_points", "reading has no data points with a value")
        if matcher.scale:
            _apply_scale(data, matcher.scale)
        ts = self._time(raw_time, received_at)
        return Reading(device_type, device_id, ts, self._record_time(ts), data, received_at)

    def _value_reading(
        self, resolved: tuple[_Matcher, str, str | None, str], doc: Any, received_at: float
    ) -> Reading:
        matcher, device_type, device_id, point = resolved
        raw_time = None
        value = doc
        if type(doc) is dict:
            if "value" not in doc:
                raise MappingError(
                    "bad_value",
                    f"payload for point {_clip(point)} is an object without a 'value' key",
                )
            value = doc["value"]
            raw_time = doc.get(matcher.time_key)
            if raw_time is None:
                raw_time = doc.get("ts")
        text = _value_text(value, point)
        if text is None:
            raise MappingError("no_points", f"point {_clip(point)} has value null")
        data = {point: text}
        if matcher.scale:
            _apply_scale(data, matcher.scale)
        ts = self._time(raw_time, received_at)
        return Reading(device_type, device_id, ts, self._record_time(ts), data, received_at)


def _check_point_name(name: str) -> None:
    """Reject point names JSON escapes made unencodable (lone surrogates)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise MappingError(
            "bad_point", f"point name {_clip(name)} is not valid Unicode (lone surrogate)"
        ) from None


def _apply_scale(data: dict[str, str], scale: dict[str, Decimal]) -> None:
    """Multiply the scaled points in place, exactly, formatted without exponent."""
    for point, factor in scale.items():
        text = data.get(point)
        if text is None:
            continue
        try:
            product = _EXACT.multiply(Decimal(text), factor)
        except ArithmeticError:
            raise MappingError(
                "bad_value", f"point {_clip(point)} value {_clip(text)} cannot be scaled exactly"
            ) from None
        exponent = product.as_tuple().exponent
        if (
            not isinstance(exponent, int)
            or exponent < -_MAX_SCALED_EXPONENT
            or product.adjusted() > _MAX_SCALED_EXPONENT
        ):
            raise MappingError(
                "bad_value", f"point {_clip(point)} value {_clip(text)} is too large to scale"
            )
        data[point] = format(product, "f")
