"""Sparkplug B routes (``format: sparkplug-b``): ``spBv1.0`` messages -> readings.

Unlike the JSON mapping this is not pure: a DATA message names its metrics by aliases that an
earlier NBIRTH/DBIRTH of the same edge node defined, so the alias tables
(:class:`~bridge.intake.sparkplug.AliasTables`) are state. Every change to them is returned with
the message that made it (:attr:`Outcome.aliases`), for the spool to commit with that message,
before its acknowledgement; at start they are loaded back (:meth:`SparkplugIntake.load`), so a
resumed session's backlog still decodes after a restart.

What each message type becomes:

* NBIRTH / DBIRTH: the aliases (an NBIRTH first forgets the node's table) and, as births carry
  current values, readings;
* NDATA / DDATA: readings; an alias no birth defined sets the whole message aside
  (``unknown_alias``) and, on a route with ``request_rebirth``, asks the edge node for its births
  (NCMD ``Node Control/Rebirth``, at most once per node per :data:`REBIRTH_INTERVAL_SECS`);
* NDEATH, DDEATH, NCMD, DCMD and STATE: not readings; skipped, counted by reason.

deviceId is ``<edge node>/<device>`` for device messages and ``<edge node>`` for node messages
(the group is not part of it); recordTime is each metric's timestamp, else the payload's, else
the receive time. Metric name -> point through the route's ``points`` (``EE point: metric
name``); without ``points`` every numeric metric is sent under its own name, apart from the
protocol's own (``bdSeq``, ``Node Control/...``, ``Device Control/...``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Final
from zoneinfo import ZoneInfo

from bridge.config import PayloadFormat, Route
from bridge.errors import MappingError
from bridge.intake.mapping import MAX_DEVICE_ID, format_record_time
from bridge.intake.sparkplug import (
    NAMESPACE,
    AliasChange,
    AliasTables,
    Payload,
    SparkplugError,
    Topic,
    decode_payload,
    encode_rebirth,
    metric_text,
    parse_topic,
)
from bridge.models import Reading
from bridge.spool.store import AliasRow

__all__ = [
    "REBIRTH_INTERVAL_SECS",
    "REJECT_REASONS",
    "SKIP_REASONS",
    "Outcome",
    "SparkplugIntake",
]

REJECT_REASONS: Final[tuple[str, ...]] = (
    "bad_sparkplug",  # not a Sparkplug B topic of a known message type, or not its protobuf
    "unknown_alias",  # a DATA metric's alias was defined by no birth the bridge has seen
)
SKIP_REASONS: Final[tuple[str, ...]] = (
    "sparkplug_ndeath",
    "sparkplug_ddeath",
    "sparkplug_ncmd",
    "sparkplug_dcmd",
    "sparkplug_state",
    "sparkplug_no_values",  # a birth or DATA without one numeric metric to send
)
REBIRTH_INTERVAL_SECS: Final = 5.0
"""Shortest time between two rebirth requests to the same edge node."""

_MIN_TS: Final = 946_684_800  # 2000-01-01T00:00:00Z
_MAX_TS: Final = 4_133_980_800  # 2101-01-01T00:00:00Z (exclusive)
_PREFIX: Final = f"{NAMESPACE}/".encode()
_READINGS: Final = frozenset({"NBIRTH", "DBIRTH", "NDATA", "DDATA"})
_SKIPPED: Final = {
    kind: f"sparkplug_{kind.lower()}" for kind in ("NDEATH", "DDEATH", "NCMD", "DCMD")
}
_PROTOCOL_METRICS: Final = ("Node Control/", "Device Control/")
_MAX_ASKED: Final = 10_000


@dataclass(slots=True)
class Outcome:
    """What one Sparkplug message became.

    Attributes:
        readings: the readings to spool.
        aliases: the alias changes it made, to commit with it (also when it is rejected).
        skipped: a reason from :data:`SKIP_REASONS` when it is not a reading.
        error: why it is dead-lettered, when it is.
    """

    readings: list[Reading] = field(default_factory=list)
    aliases: list[AliasRow] = field(default_factory=list)
    skipped: str | None = None
    error: MappingError | None = None


@dataclass(slots=True, frozen=True)
class _Route:
    prefix: bytes
    label: str
    device_type: str
    points: dict[str, tuple[str, ...]]
    """metric name -> the points it fills; empty: identity."""
    request_rebirth: bool


def _compile(route: Route) -> _Route:
    points: dict[str, tuple[str, ...]] = {}
    for point, source in (route.points or {}).items():
        metric = source.name
        if metric is None:  # refused by the route's validation; for the type checker
            continue
        points[metric] = (*points.get(metric, ()), point)
    group = route.sparkplug_group
    prefix = _PREFIX if group is None else _PREFIX + group.encode() + b"/"
    return _Route(
        prefix, route.subscription, route.device_type or "", points, route.request_rebirth
    )


class SparkplugIntake:
    """Maps the messages of the ``sparkplug-b`` routes and keeps their alias tables.

    Args:
        routes: every configured route (those of other formats are left out).
        timezone: IANA zone of ``recordTime``.
        publish: sends ``(topic, payload)`` on the bridge's MQTT session, returning whether
            it was sent; ``None``: no rebirth requests.
        clock: monotonic seconds (rate limit of rebirth requests).
        max_points: most points in one reading.
    """

    def __init__(
        self,
        routes: Sequence[Route],
        timezone: str,
        *,
        publish: Callable[[str, bytes], bool] | None = None,
        clock: Callable[[], float] = time.monotonic,
        max_points: int = 1000,
    ) -> None:
        self._routes = tuple(_compile(r) for r in routes if r.format is PayloadFormat.SPARKPLUG_B)
        self._tz = ZoneInfo(timezone)
        self._tables = AliasTables()
        self._publish = publish
        self._clock = clock
        self._max_points = max_points
        self._asked: dict[str, float] = {}

    def __bool__(self) -> bool:
        """Whether any route is a Sparkplug B route."""
        return bool(self._routes)

    @property
    def labels(self) -> list[str]:
        """The routes' metric labels (their subscriptions)."""
        return [r.label for r in self._routes]

    def load(self, rows: Iterable[AliasRow]) -> None:
        """Take the alias tables the spool kept (at start, before any message)."""
        self._tables.load(AliasChange(*row) for row in rows)

    def route_of(self, topic: bytes) -> str | None:
        """The label of the Sparkplug route ``topic`` belongs to, ``None`` when none takes it."""
        route = self._route(topic)
        return None if route is None else route.label

    def _route(self, topic: bytes) -> _Route | None:
        if not topic.startswith(_PREFIX):
            return None
        for route in self._routes:
            if topic.startswith(route.prefix):
                return route
        return None

    def map(self, topic: bytes, payload: bytes, received_at: float) -> Outcome | None:
        """Turn one message into readings and alias changes.

        Returns:
            ``None`` when no Sparkplug route takes the topic (another route may), else the
            outcome; it never raises for bad input.
        """
        route = self._route(topic)
        if route is None:
            return None
        try:
            text = topic.decode("utf-8")
        except UnicodeDecodeError as exc:
            return Outcome(
                error=MappingError(
                    "bad_topic", f"topic is not valid UTF-8 ({exc.reason} at byte {exc.start})"
                )
            )
        levels = text.split("/")
        if len(levels) > 1 and levels[1] == "STATE":
            return Outcome(skipped="sparkplug_state")
        try:
            where = parse_topic(text)
        except SparkplugError as exc:
            return Outcome(error=MappingError("bad_sparkplug", str(exc)))
        kind = where.kind
        if kind in _SKIPPED:
            return Outcome(skipped=_SKIPPED[kind])
        if kind not in _READINGS or (kind[0] == "D") != (where.device is not None):
            return Outcome(
                error=MappingError(
                    "bad_sparkplug",
                    f"topic {text[:120]!r}: expected NBIRTH/NDATA/NDEATH/NCMD (edge node level)"
                    " or DBIRTH/DDATA/DDEATH/DCMD (device level)",
                )
            )
        if not payload:
            return Outcome(error=MappingError("empty_payload", "payload is empty"))
        try:
            decoded = decode_payload(payload)
        except SparkplugError as exc:
            return Outcome(error=MappingError("bad_sparkplug", f"payload: {exc}"))
        node = f"{where.group}/{where.edge}"
        outcome = Outcome()
        if kind.endswith("BIRTH"):
            changes = self._tables.birth(node, decoded, node=kind == "NBIRTH")
            outcome.aliases = [(c.edge, c.alias, c.name, c.datatype) for c in changes]
        try:
            outcome.readings = self._readings(route, where, node, decoded, received_at)
        except MappingError as exc:
            outcome.error = exc
            if exc.reason == "unknown_alias" and route.request_rebirth:
                self._ask_rebirth(where)
            return outcome
        if not outcome.readings:
            outcome.skipped = "sparkplug_no_values"
        return outcome

    def _readings(
        self, route: _Route, where: Topic, node: str, payload: Payload, received_at: float
    ) -> list[Reading]:
        device_id = where.device_id
        if len(device_id) > MAX_DEVICE_ID:
            raise MappingError(
                "device_id_too_long",
                f"deviceId has {len(device_id)} characters, more than the limit of {MAX_DEVICE_ID}",
            )
        points = route.points
        by_time: dict[int, dict[str, str]] = {}
        for metric in payload.metrics:
            resolved = self._tables.resolve(node, metric)
            if resolved is None:
                if metric.alias is None:
                    continue  # neither name nor alias: nothing tells what it is
                raise MappingError(
                    "unknown_alias",
                    f"metric alias {metric.alias} of edge node {node[:120]!r} was defined by no"
                    " birth the bridge has seen",
                )
            name, datatype = resolved
            if points:
                targets = points.get(name, ())
            elif name == "bdSeq" or name.startswith(_PROTOCOL_METRICS):
                continue
            else:
                targets = (name,)
            if not targets:
                continue
            value = metric_text(metric, datatype)
            if value is None:
                continue
            ms = metric.timestamp if metric.timestamp is not None else payload.timestamp
            data = by_time.setdefault(self._ts(ms, received_at), {})
            for point in targets:
                data[point] = value
            if len(data) > self._max_points:
                raise MappingError(
                    "too_many_points",
                    f"reading has more than {self._max_points} points",
                )
        return [
            Reading(
                route.device_type,
                device_id,
                ts,
                format_record_time(ts, self._tz),
                data,
                received_at,
            )
            for ts, data in by_time.items()
        ]

    @staticmethod
    def _ts(ms: int | None, received_at: float) -> int:
        if ms is None:
            ts = int(received_at)
            what = f"payload has no timestamp and the receive time {received_at!r}"
        else:
            ts = ms // 1000
            what = f"timestamp {ms} (ms)"
        if not _MIN_TS <= ts < _MAX_TS:
            raise MappingError("bad_time", f"{what} is outside the accepted years 2000-2100")
        return ts

    def _ask_rebirth(self, where: Topic) -> None:
        """Ask the edge node for its births, unless it was asked moments ago."""
        if self._publish is None:
            return
        node = f"{where.group}/{where.edge}"
        now = self._clock()
        last = self._asked.get(node)
        if last is not None and now - last < REBIRTH_INTERVAL_SECS:
            return
        topic = f"{NAMESPACE}/{where.group}/NCMD/{where.edge}"
        if self._publish(topic, encode_rebirth(int(time.time() * 1000))):
            if len(self._asked) >= _MAX_ASKED:
                self._asked.clear()
            self._asked[node] = now
