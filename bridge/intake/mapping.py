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

A JSON route with any of the generic keys (``records``, ``device_id``, ``time``,
``time_format``, ``align_secs``, ``points``, ``ignore``, ``on_non_numeric``, ``on_bad_time``,
``max_age_days``) is read by the generic mapping instead: the ``records`` path gives the records
(default: the payload, an array being several), each record's device id, time and points are
found by paths (:mod:`bridge.intake.paths`), named points are taken leniently (a missing, null
or non-numeric value leaves its point out), sums and scales are exact. The flat route keeps its
own code: it is the hot path.

A preset (``format: tasmota`` ...) is such a route whose defaults come from
:mod:`bridge.intake.presets`: its topics (a final ``#`` there takes any further levels), a hook
that finds the records, their device ids and times and raises
:class:`~bridge.errors.MessageSkipped` for the family's messages that are not readings, and a
default map of points (each a list of candidate sources, the first that gives a number wins),
replaced by the route's ``points`` when it has them.

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

from bridge.config import BadTime, NonNumeric, PayloadFormat, Route
from bridge.errors import ConfigError, MappingError, MessageSkipped
from bridge.intake.paths import JsonPath, compile_path
from bridge.intake.presets import PRESETS, Message
from bridge.models import NO_DEVICE_ID_TYPES, Reading

__all__ = ["REASONS", "Mapper", "Traced", "format_record_time", "parse_time"]

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
_MAX_SCALE_DIGITS: Final = 100  # a points scale factor: digits and magnitude
_MAX_FORMATTED_TIME: Final = 64  # longer texts are not read with a route's time_format

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


def _decode(payload: bytes) -> Any:
    """The payload as JSON, every number kept as its exact text.

    Raises:
        MappingError: ``empty_payload``, ``bad_encoding`` or ``bad_json``.
    """
    if not payload:
        raise MappingError("empty_payload", "payload is empty")
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MappingError(
            "bad_encoding", f"payload is not valid UTF-8 ({exc.reason} at byte {exc.start})"
        ) from None
    return _loads(text)


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
    if text[8:9] in {"T", "t"} and len(text) >= 15 and text[:8].isdigit():
        # ISO 8601 basic (20151212T121212Z): read as the extended form it abbreviates.
        extended = f"{text[0:4]}-{text[4:6]}-{text[6:8]}T{text[9:11]}:{text[11:13]}:{text[13:15]}"
        rest = text[15:]
        if rest[:1] in {"+", "-"} and len(rest) == 5:
            rest = f"{rest[:3]}:{rest[3:]}"
        return _epoch_from_datetime_text(extended + rest, tz)
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


Traced = list[tuple[Reading, dict[str, str]]]
"""Readings, each with the source of each of its points (a path, a sum, the topic)."""


def _numeric_text(value: object) -> str | None:
    """The exact text of a number or numeric string, ``None`` for anything else.

    Anything else is null, a word, a boolean, an object, an array, NaN: this is the lenient form
    of :func:`_value_text`.
    """
    if not isinstance(value, str):
        return None
    kind = type(value)
    if kind is _Num:
        if ("e" not in value and "E" not in value) or _exponent_in_range(value):
            return str(value)
        return None
    if kind is _Const or not _is_number_text(value):
        return None
    return value


def _bounded(number: Decimal, point: str, text: str) -> Decimal:
    """``number`` if its digits stay within what is converted exactly, else ``bad_value``.

    The bound limits the work and the length of the plain text.
    """
    exponent = number.as_tuple().exponent
    if (
        not isinstance(exponent, int)
        or exponent < -_MAX_SCALED_EXPONENT
        or number.adjusted() > _MAX_SCALED_EXPONENT
    ):
        raise MappingError(
            "bad_value", f"point {_clip(point)} value {_clip(text)} is too large to convert"
        )
    return number


def _exact_decimal(text: str, point: str) -> Decimal:
    """``text`` as a Decimal whose digits stay within what is converted exactly."""
    if len(text) <= _MAX_SCALED_EXPONENT and "e" not in text and "E" not in text:
        return Decimal(text)  # at most 1000 digits: in bounds without looking closer
    return _bounded(Decimal(text), point, text)


def _key_path(key: str) -> str:
    """``key`` written as a path: as it is when it is an identifier, else quoted."""
    if key.isascii() and key.isidentifier():
        return key
    return json.dumps(key, ensure_ascii=False)


def _device_id_text(found: object, path: str) -> str | None:
    """The device id a ``device_id`` path found, as it stands; ``None`` for an empty one."""
    if not isinstance(found, str) or type(found) is _Const:
        raise MappingError(
            "missing_device_id",
            f"device_id {_clip(path)} is {_describe(found)}: expected a string or a number",
        )
    text = str(found)
    if len(text) > MAX_DEVICE_ID:
        raise MappingError(
            "device_id_too_long",
            f"deviceId has {len(text)} characters, more than the limit of {MAX_DEVICE_ID}",
        )
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise MappingError(
                "missing_device_id", f"device_id {_clip(path)} is not valid Unicode"
            ) from None
    return text or None


_FIXED_WIDTHS: Final = {"Y": 4, "m": 2, "d": 2, "H": 2, "M": 2, "S": 2}
_FIELD_ORDER: Final = "YmdHMS"


def _fixed_plan(fmt: str) -> tuple[int, tuple[tuple[int, int, int], ...], str] | None:
    """The plan for reading a fixed-width ``%Y %m %d %H %M %S`` format without ``strptime``.

    For a format of only those fields and literal characters: its text length, each field as
    (index into ``YmdHMS``, start, end), and the text with the fields blanked; ``None`` for any
    other format (read by ``strptime``).
    """
    fields: list[tuple[int, int, int]] = []
    template: list[str] = []
    i = 0
    while i < len(fmt):
        char = fmt[i]
        if char == "%":
            directive = fmt[i + 1 : i + 2]
            width = _FIXED_WIDTHS.get(directive)
            if width is None:
                return None
            start = len(template)
            fields.append((_FIELD_ORDER.index(directive), start, start + width))
            template.extend(" " * width)
            i += 2
        else:
            template.append(char)
            i += 1
    kinds = [kind for kind, _, _ in fields]
    if len(set(kinds)) != len(kinds) or not {0, 1, 2, 3} <= set(kinds) or " " in fmt:
        return None
    return len(template), tuple(fields), "".join(template)


def _fixed_fields(
    text: str, plan: tuple[int, tuple[tuple[int, int, int], ...], str]
) -> list[int] | None:
    """The six date-time fields of ``text`` read by a fixed-width plan (``None``: no fit)."""
    length, fields, template = plan
    if len(text) != length or not text.isascii():
        return None
    values = [0, 0, 0, 0, 0, 0]
    blanked = list(text)
    for kind, start, end in fields:
        part = text[start:end]
        if not part.isdigit():
            return None
        values[kind] = int(part)
        blanked[start:end] = " " * (end - start)
    return values if "".join(blanked) == template else None


def _time_with_format(
    raw: object,
    fmt: str,
    tz: ZoneInfo,
    plan: tuple[int, tuple[tuple[int, int, int], ...], str] | None = None,
) -> int | None:
    """Epoch seconds of ``raw`` read with the ``strptime`` format ``fmt`` (naive times in ``tz``).

    ``None`` when it does not fit the format. ``plan`` (:func:`_fixed_plan`) reads fixed-width
    digit formats without ``strptime``, which is slow (other texts still go to ``strptime``,
    which also takes fields written with fewer digits).
    """
    if not isinstance(raw, str) or type(raw) is _Const or len(raw) > _MAX_FORMATTED_TIME:
        return None
    values = None if plan is None else _fixed_fields(str(raw), plan)
    if values is not None:
        year, month, day, hour, minute, second = values
        try:
            ts = math.floor(datetime(year, month, day, hour, minute, second, tzinfo=tz).timestamp())
        except (OverflowError, ValueError):
            return None
        return _checked(ts, raw)
    try:
        parsed = datetime.strptime(str(raw), fmt)
    except ValueError:
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=tz)
    try:
        ts = math.floor(parsed.timestamp())
    except (OverflowError, ValueError):
        return None
    return _checked(ts, raw)


class _Spec:
    """The generic mapping of one route (records, device id, time, points), compiled."""

    __slots__ = (
        "align",
        "device_id",
        "max_age",
        "points",
        "receive_time_on_bad_time",
        "records",
        "skip_keys",
        "skip_non_numeric",
        "time",
        "time_fallback",
        "time_format",
        "time_plan",
    )

    def __init__(self, route: Route, where: str) -> None:
        self.records = None if route.records is None else compile_path(route.records)
        self.device_id = None if route.device_id is None else compile_path(route.device_id)
        if route.time is not None:
            self.time = compile_path(route.time)
        else:
            self.time = JsonPath(_key_path(route.time_key), (route.time_key,), from_root=False)
        # A value route without a time path falls back to "ts", as it always did.
        self.time_fallback = "ts" if route.time is None else None
        self.time_format = route.time_format
        self.time_plan = None if route.time_format is None else _fixed_plan(route.time_format)
        self.align = route.align_secs or 0
        self.max_age = None if route.max_age_days is None else route.max_age_days * 86400
        self.receive_time_on_bad_time = route.on_bad_time is BadTime.RECEIVE_TIME
        self.skip_non_numeric = route.on_non_numeric is NonNumeric.SKIP
        # The keys the id and the time are read under are not points (``meta.id``: ``meta``).
        skip = set(route.ignore)
        for path in (self.device_id, self.time):
            if path is not None and not path.from_root and path.steps:
                first = path.steps[0]
                if isinstance(first, str):
                    skip.add(first)
        self.skip_keys = frozenset(skip)
        self.points: tuple[tuple[str, tuple[_Candidate, ...]], ...] = ()
        if route.format.preset:
            # Non-numeric values are never a reason to reject; the hook finds id and time.
            self.skip_non_numeric = True
            self.skip_keys = frozenset(route.ignore)
        if route.points is not None:
            for name, source in route.points.items():
                if source.scale is not None and not _scale_in_bounds(Decimal(source.scale)):
                    raise ConfigError(
                        f"{where}.points.{name}.scale",
                        f"use a factor of at most {_MAX_SCALE_DIGITS} digits and magnitude",
                    )
            self.points = tuple(
                (name, (_candidate(source.path, source.sum, source.scale),))
                for name, source in route.points.items()
            )
        elif route.format.preset:
            table = PRESETS[route.format.value].points or {}
            self.points = tuple(
                (name, tuple(_candidate(r.path, r.sum or None, r.scale) for r in rules))
                for name, rules in table.items()
            )


def _scale_in_bounds(scale: Decimal) -> bool:
    """Whether a points scale factor's digits and magnitude keep products bounded."""
    return (
        abs(scale.adjusted()) <= _MAX_SCALE_DIGITS
        and len(scale.as_tuple().digits) <= _MAX_SCALE_DIGITS
    )


_Candidate = tuple[tuple[JsonPath, ...], bool, Decimal | None, str]
"""One source of a point: its paths, whether they are summed, the factor, its description."""


def _candidate(path: str | None, parts: Sequence[str] | None, scale: str | None) -> _Candidate:
    texts = list(parts) if parts is not None else [path or ""]
    described = texts[0] if parts is None else f"sum({', '.join(texts)})"
    factor = None if scale is None else Decimal(scale)
    if scale is not None:
        described += f" * {scale}"
    return (tuple(compile_path(text) for text in texts), parts is not None, factor, described)


class _Matcher:
    """One route, compiled for matching and mapping."""

    __slots__ = (
        "fixed_type",
        "id_index",
        "is_json",
        "levels",
        "literals",
        "point_index",
        "preset",
        "renames",
        "scale",
        "spec",
        "tail",
        "template",
        "time_key",
        "type_index",
    )

    def __init__(self, route: Route, topic: str, where: str) -> None:
        parts = topic.split("/")
        self.template = topic
        # A final "#" (presets only) takes any number of further levels, none included.
        self.tail = parts[-1] == "#"
        if self.tail:
            parts.pop()
        self.levels = len(parts)
        self.literals = tuple(
            (i, level) for i, level in enumerate(parts) if level[:1] != "{" and level != "+"
        )
        self.preset = PRESETS[route.format.value] if route.format.preset else None
        self.type_index = parts.index("{deviceType}") if "{deviceType}" in parts else -1
        self.id_index = parts.index("{deviceId}") if "{deviceId}" in parts else -1
        self.point_index = parts.index("{point}") if "{point}" in parts else -1
        self.fixed_type = route.device_type or ""
        self.is_json = route.format is PayloadFormat.JSON
        self.time_key = route.time_key
        self.renames = dict(route.renames)
        self.scale = {point: Decimal(factor) for point, factor in route.scale.items()}
        self.spec = _Spec(route, where) if route.generic else None
        id_in_payload = route.device_id is not None or self.preset is not None
        if self.type_index < 0:
            if not (self.fixed_type.isascii() and self.fixed_type.isdigit()):
                raise ConfigError(f"{where}.device_type", "must be a string of digits, e.g. '1'")
            if (
                self.id_index < 0
                and self.fixed_type not in NO_DEVICE_ID_TYPES
                and not id_in_payload
            ):
                raise ConfigError(
                    f"{where}.topic",
                    f"device type {self.fixed_type} needs a deviceId: add a {{deviceId}} level"
                    " or a device_id path",
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
        "_trace",
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
        self._matchers = tuple(
            _Matcher(route, topic, f"routes[{i}]")
            for i, route in enumerate(routes)
            # Sparkplug B routes have no templates: bridge.intake.sparkplug_route maps them.
            for topic in route.topics
        )
        self._subscriptions = [sub for route in routes for sub in route.subscriptions]
        self._max_payload_bytes = max_payload_bytes
        self._max_points = max_points
        self._max_readings = max_readings
        self._topic_cache: dict[bytes, tuple[_Matcher, str, str | None, str]] = {}
        self._time_cache: dict[int, str] = {}
        self._trace: Traced | None = None

    @property
    def subscriptions(self) -> list[str]:
        """MQTT topic filters, one per route template, each placeholder replaced by ``+``."""
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
            MessageSkipped: when a preset's message is not a reading (with a reason from
                :data:`~bridge.intake.presets.SKIP_REASONS`).
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
        if matcher.preset is not None:
            return self._preset_readings(matcher, device_type, device_id, topic, payload,
                                         received_at)  # fmt: skip
        doc = _decode(payload)
        if not matcher.is_json:
            return [self._value_reading(resolved, doc, received_at)]
        if matcher.spec is not None:
            return self._records(matcher, matcher.spec, device_type, device_id, doc, received_at)
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

    def explain(self, topic: bytes, payload: bytes, received_at: float) -> Traced:
        """Like :meth:`map`, with each reading the source of each of its points.

        A source is a path, a sum or the topic's ``{point}``: what ``energy-bridge check
        --sample`` shows.

        Raises:
            MappingError: as :meth:`map`.
            MessageSkipped: as :meth:`map`.
        """
        matcher = (self._topic_cache.get(topic) or self._resolve(topic))[0]
        if matcher.spec is not None and (matcher.is_json or matcher.preset is not None):
            self._trace = []
            try:
                self.map(topic, payload, received_at)
                return self._trace
            finally:
                self._trace = None
        readings = self.map(topic, payload, received_at)
        if not matcher.is_json:
            return [
                (r, dict.fromkeys(r.data, "the payload (point from the topic)")) for r in readings
            ]
        inverse = {new: old for old, new in matcher.renames.items()}
        return [(r, {p: _key_path(inverse.get(p, p)) for p in r.data}) for r in readings]

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
            if matcher.levels != count and not (matcher.tail and count > matcher.levels):
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
        if (
            device_type not in NO_DEVICE_ID_TYPES
            and not device_id
            and (matcher.spec is None or matcher.spec.device_id is None)
            and matcher.preset is None
        ):
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

    def _records(  # noqa: PLR0917 - the resolved topic and the message
        self,
        matcher: _Matcher,
        spec: _Spec,
        device_type: str,
        device_id: str | None,
        doc: Any,
        received_at: float,
    ) -> list[Reading]:
        """The generic mapping: one reading per record the route's paths find."""
        if spec.records is not None:
            found = spec.records.find(doc, doc)
            if found is None:
                raise MappingError(
                    "no_points",
                    f"records path {_clip(spec.records.text)} finds nothing in the payload",
                )
            records = found if type(found) is list else [found]
        elif type(doc) is list:
            records = doc
        elif type(doc) is dict:
            records = [doc]
        else:
            raise MappingError(
                "not_object",
                f"payload is {_describe(doc)}: expected a JSON object or an array of objects",
            )
        if not records:
            raise MappingError("no_points", "payload holds no records: no readings")
        if len(records) > self._max_readings:
            raise MappingError(
                "too_many_readings",
                f"payload holds {len(records)} records, more than the limit of"
                f" {self._max_readings}",
            )
        readings = []
        for index, record in enumerate(records):
            try:
                if type(record) is not dict:
                    raise MappingError(  # noqa: TRY301 - re-raised below with the index
                        "not_object", f"record is {_describe(record)}: expected a JSON object"
                    )
                readings.append(
                    self._record(matcher, spec, device_type, device_id, record, doc, received_at)
                )
            except MappingError as exc:
                if len(records) == 1:
                    raise
                raise MappingError(exc.reason, f"record [{index}]: {exc.detail}") from None
        return readings

    def _record(  # noqa: PLR0917 - the resolved topic and the message
        self,
        matcher: _Matcher,
        spec: _Spec,
        device_type: str,
        topic_id: str | None,
        record: dict[str, Any],
        root: Any,
        received_at: float,
    ) -> Reading:
        device_id = topic_id
        if spec.device_id is not None:
            found = spec.device_id.find(record, root)
            if found is not None:
                device_id = _device_id_text(found, spec.device_id.text)
            if device_id is None and device_type not in NO_DEVICE_ID_TYPES:
                raise MappingError(
                    "missing_device_id",
                    f"device_id {_clip(spec.device_id.text)} finds no id in the record,"
                    f" which device type {device_type} requires",
                )
        sources: dict[str, str] = {}
        if spec.points:
            data = _points(spec, record, root, sources)
        else:
            data = self._all_points(matcher, spec, record, sources)
        if not data:
            raise MappingError("no_points", "record has no data points with a value")
        raw_time = spec.time.find(record, root)
        return self._finish(
            matcher, spec, (device_type, device_id), data, sources, raw_time, received_at
        )

    def _finish(  # noqa: PLR0917 - the parts of a reading
        self,
        matcher: _Matcher,
        spec: _Spec,
        device: tuple[str, str | None],
        data: dict[str, str],
        sources: dict[str, str],
        raw_time: object,
        received_at: float,
    ) -> Reading:
        """A reading of the points found, scaled and timed by the route's rules.

        The time is aligned (and held) when the route says so; traced for :meth:`explain`.
        """
        device_type, device_id = device
        if len(data) > self._max_points:
            raise MappingError(
                "too_many_points",
                f"record has {len(data)} points, more than the limit of {self._max_points}",
            )
        if matcher.scale:
            _apply_scale(data, matcher.scale)
        ts = self._device_time(spec, raw_time, received_at)
        hold_until = 0.0
        if spec.align:
            ts -= ts % spec.align
            hold_until = min(ts, received_at) + spec.align
        reading = Reading(
            device_type,
            device_id,
            ts,
            self._record_time(ts),
            data,
            received_at,
            hold_until=hold_until,
        )
        if self._trace is not None:
            self._trace.append((reading, sources))
        return reading

    def _preset_readings(  # noqa: PLR0917 - the resolved topic and the message
        self,
        matcher: _Matcher,
        device_type: str,
        topic_id: str | None,
        topic: bytes,
        payload: bytes,
        received_at: float,
    ) -> list[Reading]:
        """Map a preset's message: its hook finds the records, the points are read from each.

        The points are the route's, or the preset's; a message with nothing to send is skipped,
        not rejected.
        """
        preset = matcher.preset
        spec = matcher.spec
        assert preset is not None  # noqa: S101 - set with spec
        assert spec is not None  # noqa: S101 - a preset's route is generic
        levels = topic.decode("utf-8").split("/")
        if levels[0] == "homeassistant" and levels[-1] == "config":
            raise MessageSkipped("metadata", "Home Assistant discovery message")
        after_id = levels[matcher.id_index + 1 :] if matcher.id_index >= 0 else []
        records = preset.read(Message(levels, after_id, topic_id, payload), _decode)
        if len(records) > self._max_readings:
            raise MappingError(
                "too_many_readings",
                f"payload holds {len(records)} records, more than the limit of"
                f" {self._max_readings}",
            )
        readings = []
        for record in records:
            sources: dict[str, str] = {}
            values = record.values
            if spec.points:
                data = _points(spec, values, values, sources)
            else:
                data = self._all_points(matcher, spec, values, sources)
            if not data:
                continue  # a gateway's own status beside its meters, a string-only entry
            device_id = topic_id
            if record.device_id is not None:
                device_id = _device_id_text(record.device_id, f"the {preset.name} device id")
            if device_id is None and device_type not in NO_DEVICE_ID_TYPES:
                raise MappingError(
                    "missing_device_id",
                    f"the {preset.name} message gives no deviceId, which device type"
                    f" {device_type} requires",
                )
            device = (device_type, device_id)
            readings.append(
                self._finish(matcher, spec, device, data, sources, record.time, received_at)
            )
        if not readings:
            raise MessageSkipped(
                "unmapped", f"no value in this {preset.name} message maps to a point"
            )
        return readings

    def _all_points(
        self, matcher: _Matcher, spec: _Spec, record: dict[str, Any], sources: dict[str, str]
    ) -> dict[str, str]:
        """Every key of the record but the skipped ones is a point (the flat rule)."""
        skip = spec.skip_keys
        if len(record) - len(skip) > self._max_points:
            raise MappingError(
                "too_many_points",
                f"record has {len(record)} keys, more than the limit of {self._max_points}",
            )
        renames = matcher.renames
        lenient = spec.skip_non_numeric
        data: dict[str, str] = {}
        for key, value in record.items():
            if key in skip:
                continue
            text = _numeric_text(value) if lenient else _value_text(value, key)
            if text is None:
                continue
            if not key.isascii():
                _check_point_name(key)
            elif not key:
                raise MappingError("bad_point", "record has a point with an empty name")
            name = renames.get(key, key) if renames else key
            if name in data:
                raise MappingError("bad_point", f"two points are named {_clip(name)} after renames")
            data[name] = text
            sources[name] = _key_path(key)
        return data

    def _device_time(self, spec: _Spec, raw: object, received_at: float) -> int:
        """The record's time by the route's rules (format, age, what a bad time gets)."""
        if raw is None:
            return self._time(None, received_at)
        try:
            ts = None
            if spec.time_format is not None:
                ts = _time_with_format(raw, spec.time_format, self._tz, spec.time_plan)
            if ts is None:
                ts = parse_time(raw, self._tz)
            if spec.max_age is not None and ts < received_at - spec.max_age:
                raise _bad_time(
                    raw, f"is more than {spec.max_age / 86400:g} days before its arrival"
                )
        except MappingError:
            if not spec.receive_time_on_bad_time:
                raise
            return self._time(None, received_at)
        return ts

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
        spec = matcher.spec
        if spec is None:
            ts = self._time(raw_time, received_at)
            return Reading(device_type, device_id, ts, self._record_time(ts), data, received_at)
        if type(doc) is dict:
            raw_time = spec.time.find(doc, doc)
            if raw_time is None and spec.time_fallback is not None:
                raw_time = doc.get(spec.time_fallback)
        ts = self._device_time(spec, raw_time, received_at)
        hold_until = 0.0
        if spec.align:
            ts -= ts % spec.align
            hold_until = min(ts, received_at) + spec.align
        return Reading(
            device_type,
            device_id,
            ts,
            self._record_time(ts),
            data,
            received_at,
            hold_until=hold_until,
        )


def _points(
    spec: _Spec, record: dict[str, Any], root: Any, sources: dict[str, str]
) -> dict[str, str]:
    """The route's named points: each from its path, or the exact sum of its paths, scaled.

    A value that is missing, null or not a number leaves its point out (a sum: any part).
    """
    data: dict[str, str] = {}
    for name, candidates in spec.points:
        for candidate in candidates:
            text = _point_value(name, candidate, record, root)
            if text is not None:
                data[name] = text
                sources[name] = candidate[3]
                break
    return data


def _point_value(name: str, candidate: _Candidate, record: dict[str, Any], root: Any) -> str | None:
    """The exact text of one candidate source of point ``name``, ``None`` when it finds none."""
    paths, is_sum, scale, _ = candidate
    if is_sum:
        number = Decimal(0)
        for path in paths:
            text = _numeric_text(path.find(record, root))
            if text is None:
                return None
            number = _EXACT.add(number, _exact_decimal(text, name))
    else:
        text = _numeric_text(paths[0].find(record, root))
        if text is None or scale is None:
            return text
        number = _exact_decimal(text, name)
    if scale is not None:
        number = _EXACT.multiply(number, scale)
    # Parts and factors are bounded (parts above, factors at config load): so is the result.
    return format(number, "f")


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
