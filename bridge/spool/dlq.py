"""``energy-bridge dlq``: look at, replay and purge the dead-letter store.

Dead letters live in the spool (table ``dead_letters``): messages that could not be mapped
(source ``mapping``: topic, payload and reason) and readings the cloud refused for good (source
``cloud``: the reading and the cloud's code). Safe to run while the bridge runs: SQLite in WAL
mode serialises the writers, the bridge picks replayed readings up from the spool, and the
dead-letter budgets are kept by the database itself (triggers), so they stay right.

* ``list``    one JSON line per entry, newest first (filters: reason, source, topic, time);
* ``show ID`` one entry in full, payload as text (or base64 when it is not UTF-8);
* ``replay``  maps ``mapping`` entries again with the *current* routes and device registry
  (after a config fix; Sparkplug B messages with the alias tables the spool holds now) and
  re-queues ``cloud`` entries as they were; what maps is moved into the spool, what still fails
  stays with its new reason. ``--dry-run`` only reports;
* ``purge``   deletes the matching entries (``--yes`` required).
"""

from __future__ import annotations

import argparse
import base64
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson

from bridge.config import Settings, load_settings
from bridge.errors import ConfigError, MappingError, MessageSkipped
from bridge.intake.mapping import Mapper
from bridge.intake.registry import Registry
from bridge.intake.sparkplug_route import SparkplugIntake
from bridge.models import Reading
from bridge.spool.store import DeadLetterFilter, DeadLetterRow, SpoolStore

__all__ = ["add_arguments", "run_from_args"]


def _when(text: str) -> float:
    """Epoch seconds from ``1700000000`` or an ISO 8601 time (naive = local time)."""
    try:
        return float(text)
    except ValueError:
        pass
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not a time: {text!r} (epoch or ISO 8601)") from exc


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``dlq`` command's sub-commands and filters to ``parser``."""
    parser.add_argument("--config", type=Path, help="YAML config (for spool.path and routes)")
    parser.add_argument("--spool", type=Path, help="spool file (default: spool.path)")
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    for name, help_text in (
        ("list", "list dead letters, newest first"),
        ("replay", "map matching entries again and move what maps into the spool"),
        ("purge", "delete matching entries"),
    ):
        p = actions.add_parser(name, help=help_text)
        p.add_argument("--reason", help="only this reason code (bad_json, InvalidParameter ...)")
        p.add_argument("--source", choices=("mapping", "cloud"), help="only this source")
        p.add_argument("--topic", help="only topics containing this text")
        p.add_argument("--since", type=_when, help="dead-lettered at or after (epoch or ISO)")
        p.add_argument("--until", type=_when, help="dead-lettered before (epoch or ISO)")
        p.add_argument("--id", type=int, action="append", help="only this entry (repeatable)")
        p.add_argument("--limit", type=int, default=None, help="at most this many entries")
        if name == "replay":
            p.add_argument("--dry-run", action="store_true", help="report, change nothing")
        if name == "purge":
            p.add_argument("--yes", action="store_true", help="really delete")
    show = actions.add_parser("show", help="show one entry in full")
    show.add_argument("id", type=int)


def _filter(args: argparse.Namespace) -> DeadLetterFilter:
    return DeadLetterFilter(
        reason=args.reason,
        source=args.source,
        topic=args.topic,
        since=args.since,
        until=args.until,
        ids=tuple(args.id or ()),
        limit=args.limit,
    )


def _entry(row: DeadLetterRow, *, full: bool) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "id": row.id,
        "at": datetime.fromtimestamp(row.at).isoformat(timespec="seconds"),
        "source": row.source,
        "reason": row.reason,
        "detail": row.detail,
    }
    if row.source == "mapping":
        doc["topic"] = row.topic
    else:
        doc.update(deviceType=row.device_type, deviceId=row.device_id)
        doc["recordTime"] = row.record_time
    if full:
        if row.payload is not None:
            try:
                doc["payload"] = row.payload.decode("utf-8")
            except UnicodeDecodeError:
                doc["payload_base64"] = base64.b64encode(row.payload).decode()
        if row.data is not None:
            doc["data"] = orjson.loads(row.data)
    return doc


def _print(doc: dict[str, Any], *, pretty: bool = False) -> None:
    option = orjson.OPT_INDENT_2 if pretty else 0
    sys.stdout.write(orjson.dumps(doc, option=option).decode() + "\n")


def run_from_args(args: argparse.Namespace) -> int:
    """Run one ``dlq`` action; returns the exit status."""
    settings = load_settings(args.config)
    path: Path = args.spool or settings.spool.path
    if not path.exists():
        raise ConfigError("spool.path", f"no spool at {path}")
    spool = SpoolStore.open(path, max_bytes=settings.spool.max_bytes)
    try:
        if args.action == "show":
            found = spool.dead_letters(DeadLetterFilter(ids=(args.id,)))
            if not found:
                sys.stderr.write(f"dlq: no dead letter {args.id}\n")
                return 1
            _print(_entry(found[0], full=True), pretty=True)
            return 0
        rows = spool.dead_letters(_filter(args))
        if args.action == "list":
            for row in rows:
                _print(_entry(row, full=False))
            return 0
        if args.action == "purge":
            if not args.yes:
                sys.stderr.write(f"dlq: {len(rows)} entries match; add --yes to delete them\n")
                return 1
            spool.purge_dead_letters([row.id for row in rows])
            _print({"purged": len(rows)})
            return 0
        return _replay(spool, settings, rows, dry_run=args.dry_run)
    finally:
        spool.close()


def _replay(
    spool: SpoolStore, settings: Settings, rows: list[DeadLetterRow], *, dry_run: bool
) -> int:
    mapper = Mapper(
        settings.routes, settings.timezone, max_payload_bytes=settings.mqtt.max_payload_bytes
    )
    registry = Registry.from_settings(settings.registry)
    # The running bridge owns the alias tables: births replayed here change this copy only.
    sparkplug = SparkplugIntake(settings.routes, settings.timezone)
    if sparkplug:
        sparkplug.load(spool.sparkplug_aliases())
    moved: list[tuple[int, list[Reading]]] = []
    still: list[tuple[int, str, str]] = []
    for row in rows:
        if row.source == "cloud":
            reading = Reading.from_json(
                row.device_type or "",
                row.device_id,
                0,
                row.record_time or "",
                row.data or b"{}",
                row.received_at or time.time(),
            )
            moved.append((row.id, [reading]))
            continue
        topic, payload = (row.topic or "").encode(), row.payload or b""
        at = row.received_at or time.time()
        try:
            outcome = sparkplug.map(topic, payload, at) if sparkplug else None
            if outcome is None:
                readings = mapper.map(topic, payload, at)
            elif outcome.error is not None:
                raise outcome.error
            else:
                readings = outcome.readings  # none when it is not a reading: it goes too
            if registry is not None:
                readings = registry.apply(readings)
        except MappingError as exc:
            still.append((row.id, exc.reason, exc.detail))
            continue
        except MessageSkipped:
            readings = []  # not a reading under today's routes: nothing to keep
        moved.append((row.id, readings))
    if not dry_run and (moved or still):
        spool.replay_dead_letters(moved, still)
    reasons: dict[str, int] = {}
    for _, reason, _ in still:
        reasons[reason] = reasons.get(reason, 0) + 1
    _print(
        {
            "replayed": len(moved),
            "readings": sum(len(r) for _, r in moved),
            "still_rejected": reasons,
            "dry_run": dry_run,
        }
    )
    return 0
