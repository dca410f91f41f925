"""``energy-bridge dlq``: look at, replay and purge the dead-letter store.

Dead letters live in the spool (table ``dead_letters``): messages that could not be mapped
(source ``mapping``: topic, payload and reason) and readings the cloud refused for good (source
``cloud``: the reading and the cloud's code). Safe to run while the bridge runs: SQLite in WAL
mode serialises the writers, and the bridge picks replayed readings up from the spool.

* ``list``    one JSON line per entry, newest first (filters: reason, source, topic, time);
* ``show ID`` one entry in full, payload as text (or base64 when it is not UTF-8);
* ``replay``  maps ``mapping`` entries again with the *current* routes (after a config fix) and
  re-queues ``cloud`` entries as they were; what maps is moved into the spool, what still fails
  stays with its new reason. ``--dry-run`` only reports;
* ``purge``   deletes the matching entries (``--yes`` required).
"""

from __future__ import annotations

import argparse
import base64
import sqlite3
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson

from bridge.config import load_settings
from bridge.errors import ConfigError, MappingError
from bridge.intake.mapping import Mapper
from bridge.models import Reading
from bridge.spool.store import Spool

__all__ = ["add_arguments", "run_from_args"]

_COLUMNS = (
    "id, at, source, reason, detail, topic, payload, device_type, device_id, record_time,"
    " data, received_at"
)


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


def _where(args: argparse.Namespace) -> tuple[str, list[Any]]:
    clauses: list[str] = []
    values: list[Any] = []
    for column, value in (("reason", args.reason), ("source", args.source)):
        if value is not None:
            clauses.append(f"{column} = ?")
            values.append(value)
    if args.topic is not None:
        clauses.append("instr(topic, ?) > 0")
        values.append(args.topic)
    if args.since is not None:
        clauses.append("at >= ?")
        values.append(args.since)
    if args.until is not None:
        clauses.append("at < ?")
        values.append(args.until)
    if args.id:
        clauses.append(f"id IN ({','.join('?' * len(args.id))})")
        values.extend(args.id)
    sql = (" WHERE " + " AND ".join(clauses)) if clauses else ""
    return sql, values


def _entry(row: sqlite3.Row, *, full: bool) -> dict[str, Any]:
    doc = {
        "id": row["id"],
        "at": datetime.fromtimestamp(row["at"]).isoformat(timespec="seconds"),
        "source": row["source"],
        "reason": row["reason"],
        "detail": row["detail"],
    }
    if row["source"] == "mapping":
        doc["topic"] = row["topic"]
    else:
        doc.update(deviceType=row["device_type"], deviceId=row["device_id"])
        doc["recordTime"] = row["record_time"]
    if full:
        payload = row["payload"]
        if payload is not None:
            try:
                doc["payload"] = bytes(payload).decode("utf-8")
            except UnicodeDecodeError:
                doc["payload_base64"] = base64.b64encode(bytes(payload)).decode()
        if row["data"] is not None:
            doc["data"] = orjson.loads(row["data"])
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
    spool = Spool.open(path, max_bytes=settings.spool.max_bytes)
    conn = spool.connection
    conn.row_factory = sqlite3.Row
    try:
        if args.action == "show":
            row = conn.execute(
                f"SELECT {_COLUMNS} FROM dead_letters WHERE id = ?",  # noqa: S608
                (args.id,),
            ).fetchone()
            if row is None:
                sys.stderr.write(f"dlq: no dead letter {args.id}\n")
                return 1
            _print(_entry(row, full=True), pretty=True)
            return 0
        where, values = _where(args)
        limit = f" LIMIT {int(args.limit)}" if args.limit is not None else ""
        rows = conn.execute(
            f"SELECT {_COLUMNS} FROM dead_letters{where} ORDER BY id DESC{limit}",  # noqa: S608
            values,
        ).fetchall()
        if args.action == "list":
            for row in rows:
                _print(_entry(row, full=False))
            return 0
        if args.action == "purge":
            if not args.yes:
                sys.stderr.write(f"dlq: {len(rows)} entries match; add --yes to delete them\n")
                return 1
            ids = [row["id"] for row in rows]
            spool.purge_dead_letters(ids)
            _print({"purged": len(ids)})
            return 0
        return _replay(spool, settings, rows, dry_run=args.dry_run)
    finally:
        spool.close()


def _replay(spool: Spool, settings: Any, rows: list[sqlite3.Row], *, dry_run: bool) -> int:
    mapper = Mapper(
        settings.routes, settings.timezone, max_payload_bytes=settings.mqtt.max_payload_bytes
    )
    moved: list[tuple[int, list[Reading]]] = []
    still: dict[str, int] = {}
    for row in rows:
        if row["source"] == "cloud":
            reading = Reading(
                row["device_type"],
                row["device_id"],
                0,
                row["record_time"],
                orjson.loads(row["data"]),
                row["received_at"] or time.time(),
            )
            moved.append((row["id"], [reading]))
            continue
        try:
            readings = mapper.map(
                str(row["topic"]).encode(), bytes(row["payload"] or b""), row["received_at"]
            )
        except MappingError as exc:
            still[exc.reason] = still.get(exc.reason, 0) + 1
            continue
        moved.append((row["id"], readings))
    if not dry_run and moved:
        spool.replay_dead_letters(moved)
    _print(
        {
            "replayed": len(moved),
            "readings": sum(len(r) for _, r in moved),
            "still_rejected": still,
            "dry_run": dry_run,
        }
    )
    return 0
