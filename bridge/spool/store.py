"""The durable spool: SQLite in WAL mode; every SQL statement of energy-bridge is here.

It is the only place a reading lives between the broker's acknowledgement and the cloud's
``"success"``.

Lifecycle: :meth:`SpoolStore.open` creates or migrates the schema; every method then runs on ONE
thread (the one :class:`bridge.spool.thread.SpoolThread` owns, or the ``dlq`` command's), in
transactions that either happen whole or not at all. A reading is inserted before its MQTT
message is acknowledged, and deleted only when the cloud accepted it or it is moved to the
dead-letter table with its reason.

Row ids are ``AUTOINCREMENT``: they only ever grow, so a reader can page through the spool
with an id cursor and never miss a row.

Dead letters come from two sources with a byte budget each, so a flood of garbage payloads
can never evict the readings the cloud refused: ``mapping`` (messages that could not be mapped:
topic, payload, reason) and ``cloud`` (readings the cloud refused). What each source holds is
kept in ``dead_letter_usage`` by triggers, in the same transaction as the change, so it is right
whichever process changed the table (``energy-bridge dlq purge`` beside a running bridge).
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from bridge.errors import SpoolError, SpoolFullError
from bridge.models import Reading, SpooledReading

__all__ = [
    "DEAD_LETTER_SOURCES",
    "SCHEMA_VERSION",
    "AliasRow",
    "Committed",
    "DeadLetter",
    "DeadLetterFilter",
    "DeadLetterRow",
    "Reject",
    "SpoolStats",
    "SpoolStore",
]

SCHEMA_VERSION: Final = 3
"""1: readings, dead_letters, meta. 2: dead_letter_usage kept by triggers. 3: sparkplug_aliases."""

AliasRow = tuple[str, int | None, str, int]
"""One change to a Sparkplug edge node's alias table: (edge node, alias, metric name, data
type); an alias of ``None`` resets the node's table (an NBIRTH)."""

DEAD_LETTER_SOURCES: Final = ("mapping", "cloud")
"""``mapping``: a message that could not be mapped; ``cloud``: a reading the cloud refused."""

# What a dead letter costs against its budget: its variable-size columns plus a row overhead.
_DEAD_SIZE = (
    "(64 + length(coalesce({r}.payload, '')) + length(coalesce({r}.topic, ''))"
    " + length({r}.detail) + length(coalesce({r}.data, '')))"
)

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS readings (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    device_type TEXT    NOT NULL,
    device_id   TEXT,
    record_ts   INTEGER NOT NULL,
    record_time TEXT    NOT NULL,
    data        BLOB    NOT NULL,   -- JSON of {{point: "exact text"}}
    received_at REAL    NOT NULL,
    sent        INTEGER NOT NULL DEFAULT 0  -- 1 once handed to the cloud at least once
);
CREATE TABLE IF NOT EXISTS dead_letters (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    at          REAL    NOT NULL,
    source      TEXT    NOT NULL,   -- 'mapping' (never spooled) or 'cloud' (refused by the API)
    reason      TEXT    NOT NULL,   -- stable code: bad_json, InvalidParameter, ...
    detail      TEXT    NOT NULL,
    topic       TEXT,
    payload     BLOB,
    device_type TEXT,
    device_id   TEXT,
    record_time TEXT,
    data        BLOB,
    received_at REAL
);
CREATE INDEX IF NOT EXISTS dead_letters_reason ON dead_letters (reason);
CREATE INDEX IF NOT EXISTS dead_letters_source ON dead_letters (source, id);
CREATE TABLE IF NOT EXISTS dead_letter_usage (
    source  TEXT PRIMARY KEY,
    entries INTEGER NOT NULL,
    bytes   INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS sparkplug_aliases (
    edge     TEXT    NOT NULL,   -- '<group>/<edge node>'
    alias    INTEGER NOT NULL,
    name     TEXT    NOT NULL,
    datatype INTEGER NOT NULL,
    PRIMARY KEY (edge, alias)
) WITHOUT ROWID;
CREATE TRIGGER IF NOT EXISTS dead_letter_added AFTER INSERT ON dead_letters BEGIN
    UPDATE dead_letter_usage SET entries = entries + 1, bytes = bytes + {_DEAD_SIZE.format(r="NEW")}
    WHERE source = NEW.source;
END;
CREATE TRIGGER IF NOT EXISTS dead_letter_removed AFTER DELETE ON dead_letters BEGIN
    UPDATE dead_letter_usage SET entries = entries - 1, bytes = bytes - {_DEAD_SIZE.format(r="OLD")}
    WHERE source = OLD.source;
END;
"""  # noqa: S608 - the size expression is a constant of this module

_INSERT_READING = (
    "INSERT INTO readings (id, device_type, device_id, record_ts, record_time, data, received_at)"
    " VALUES (?, ?, ?, ?, ?, ?, ?)"
)
_DEAD_COLUMNS = (
    "id, at, source, reason, detail, topic, payload, device_type, device_id, record_time, data,"
    " received_at"
)


@dataclass(slots=True, frozen=True)
class Reject:
    """A message that could not be mapped, on its way to the dead-letter table."""

    topic: bytes
    payload: bytes
    reason: str
    detail: str
    received_at: float


@dataclass(slots=True, frozen=True)
class DeadLetter:
    """A spooled reading the cloud refused permanently."""

    rid: int
    reason: str
    detail: str


@dataclass(slots=True, frozen=True)
class DeadLetterFilter:
    """Which dead letters a ``dlq`` command works on (every field narrows; none: all)."""

    reason: str | None = None
    source: str | None = None
    topic: str | None = None
    """Topics containing this text."""
    since: float | None = None
    """Dead-lettered at or after (epoch seconds)."""
    until: float | None = None
    """Dead-lettered before (epoch seconds)."""
    ids: tuple[int, ...] = ()
    limit: int | None = None


@dataclass(slots=True, frozen=True)
class DeadLetterRow:
    """One row of the dead-letter table."""

    id: int
    at: float
    source: str
    reason: str
    detail: str
    topic: str | None
    payload: bytes | None
    device_type: str | None
    device_id: str | None
    record_time: str | None
    data: bytes | None
    received_at: float | None


@dataclass(slots=True, frozen=True)
class SpoolStats:
    """What the spool holds right now."""

    readings: int
    used_bytes: int
    oldest_received_at: float | None
    dead_letters: dict[str, int]
    """Entries per source (``mapping``, ``cloud``)."""
    dead_letter_bytes: dict[str, int]
    """Bytes counted against each source's budget."""
    last_id: int
    full: bool


@dataclass(slots=True)
class Committed:
    """What one :meth:`SpoolStore.commit` did.

    Attributes:
        ids: the new readings' row ids, in the order given.
        already_sent: how many of the rows to mark as sent had been sent before.
        evicted: dead letters dropped per source to stay within the budget.
    """

    ids: list[int] = field(default_factory=list)
    already_sent: int = 0
    evicted: dict[str, int] = field(default_factory=dict)


def _sqlite_failure(path: Path, exc: sqlite3.Error) -> SpoolError:
    if isinstance(exc, sqlite3.OperationalError) and "full" in str(exc).lower():
        return SpoolFullError(f"spool {path}: {exc}")
    return SpoolError(f"spool {path}: {exc}")


@contextlib.contextmanager
def _transaction(conn: sqlite3.Connection, path: Path) -> Iterator[None]:
    """One write transaction, applied whole or not at all.

    Every SQLite failure becomes a :class:`SpoolError`, a full disk a :class:`SpoolFullError`,
    and nothing of the transaction is left behind.
    """
    try:
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield
            conn.execute("COMMIT")
        except BaseException:
            # SQLite may already have rolled back (e.g. on SQLITE_FULL); a second ROLLBACK
            # would fail and hide the real error.
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
    except sqlite3.Error as exc:
        raise _sqlite_failure(path, exc) from exc


def _schema_version(conn: sqlite3.Connection, path: Path) -> int | None:
    has_meta = conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta'"
    ).fetchone()
    if not has_meta:
        return None
    row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    if row is None:
        return None
    try:
        version = int(row[0])
    except ValueError:
        raise SpoolError(f"spool {path} has an unreadable schema version {row[0]!r}") from None
    if version > SCHEMA_VERSION:
        raise SpoolError(
            f"spool {path} has schema version {version}, newer than this energy-bridge"
            f" understands ({SCHEMA_VERSION}); upgrade the bridge"
        )
    return version


def _migrate(conn: sqlite3.Connection) -> None:
    """Create what is missing and bring ``dead_letter_usage`` in line with the table."""
    # executescript commits on its own; every statement of the schema is idempotent.
    conn.executescript(_SCHEMA)
    with _transaction(conn, Path("")):
        conn.executemany(
            "INSERT OR IGNORE INTO dead_letter_usage (source, entries, bytes) VALUES (?, 0, 0)",
            [(source,) for source in DEAD_LETTER_SOURCES],
        )
        version = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        if version is None or int(version[0]) < SCHEMA_VERSION:
            # Version 1 had no usage table: count what is there once, the triggers keep it.
            conn.execute(
                "UPDATE dead_letter_usage SET"  # noqa: S608 - a constant size expression
                " entries = (SELECT count(*) FROM dead_letters d"
                "            WHERE d.source = dead_letter_usage.source),"
                f" bytes = (SELECT coalesce(sum({_DEAD_SIZE.format(r='d')}), 0)"
                "          FROM dead_letters d WHERE d.source = dead_letter_usage.source)"
            )
            conn.execute(
                "INSERT OR REPLACE INTO meta (key, value) VALUES ('schema_version', ?)",
                (str(SCHEMA_VERSION),),
            )


def _topic_text(topic: bytes) -> str:
    return topic.decode("utf-8", errors="backslashreplace")


def _chunks(items: Sequence[int], size: int) -> Iterable[Sequence[int]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


class SpoolStore:
    """SQLite-backed store of undelivered readings and dead letters (one thread at a time).

    Args:
        conn: an open connection (use :meth:`open`).
        path: the database file, for messages.
        max_bytes: readings (dead letters not counted) refused past this size.
        dead_letter_max_bytes: the budget of each dead-letter source; past it the oldest
            dead letters of that source give way (counted).
    """

    def __init__(
        self,
        conn: sqlite3.Connection,
        path: Path,
        max_bytes: int,
        dead_letter_max_bytes: int | None = None,
    ) -> None:
        self._conn = conn
        self.path = path
        self.max_bytes = max_bytes
        self.dead_letter_max_bytes = (
            dead_letter_max_bytes if dead_letter_max_bytes is not None else max_bytes // 10
        )
        self._page_size = int(conn.execute("PRAGMA page_size").fetchone()[0])
        self._last_id = self._sequence()
        # Kept in memory: count(*) scans the table, too slow with a million rows spooled.
        self._count = self._count_readings()

    @classmethod
    def open(
        cls,
        path: Path,
        *,
        max_bytes: int,
        synchronous: str = "full",
        dead_letter_max_bytes: int | None = None,
    ) -> SpoolStore:
        """Open (and create or migrate) the spool at ``path``.

        A new spool file is readable by its owner only: it holds readings and payloads.

        Raises:
            SpoolError: the file cannot be opened, is not a spool, or is from a newer version
                (checked before anything is written to it).
        """
        conn: sqlite3.Connection | None = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            if not path.exists():
                # SQLite creates the -wal and -shm files with the database file's mode.
                fd = os.open(path, os.O_CREAT | os.O_WRONLY, 0o600)
                os.close(fd)
            conn = sqlite3.connect(
                str(path), isolation_level=None, check_same_thread=False, timeout=30
            )
            _schema_version(conn, path)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute(f"PRAGMA synchronous={'FULL' if synchronous == 'full' else 'NORMAL'}")
            conn.execute("PRAGMA temp_store=MEMORY")
            _migrate(conn)
            return cls(conn, path, max_bytes, dead_letter_max_bytes)
        except (sqlite3.Error, OSError) as exc:
            if conn is not None:
                conn.close()
            raise SpoolError(f"cannot open spool {path}: {exc}") from exc
        except SpoolError:
            if conn is not None:
                conn.close()
            raise

    @property
    def last_id(self) -> int:
        """The highest row id this store has seen assigned (ids are never reused)."""
        return self._last_id

    def close(self) -> None:
        """Checkpoint and close the database."""
        # Closing must not fail because a checkpoint could not run.
        with contextlib.suppress(sqlite3.Error):
            self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        self._conn.close()

    # -- ids and counts ---------------------------------------------------------------------

    def _sequence(self) -> int:
        row = self._conn.execute(
            "SELECT seq FROM sqlite_sequence WHERE name = 'readings'"
        ).fetchone()
        return int(row[0]) if row else 0

    def _count_readings(self) -> int:
        return int(self._conn.execute("SELECT count(*) FROM readings").fetchone()[0])

    def refresh(self) -> int:
        """Take note of rows another process added (``energy-bridge dlq replay``).

        Returns:
            :attr:`last_id`, which grew if there were such rows.
        """
        seq = self._sequence()
        if seq > self._last_id:
            self._last_id = seq
            self._count = self._count_readings()
        return self._last_id

    # -- space ------------------------------------------------------------------------------

    def used_bytes(self) -> int:
        """Bytes held by live pages (freed pages are reused, so they do not count)."""
        pages = self._conn.execute("PRAGMA page_count").fetchone()[0]
        free = self._conn.execute("PRAGMA freelist_count").fetchone()[0]
        return int(pages - free) * self._page_size

    def dead_letter_usage(self) -> dict[str, tuple[int, int]]:
        """Source -> (entries, bytes) of the dead-letter store."""
        return {
            str(source): (int(entries), int(size))
            for source, entries, size in self._conn.execute(
                "SELECT source, entries, bytes FROM dead_letter_usage"
            )
        }

    def is_full(self) -> bool:
        """Whether the readings (dead letters not counted) have reached ``max_bytes``."""
        dead = sum(size for _, size in self.dead_letter_usage().values())
        return self.used_bytes() - dead >= self.max_bytes

    # -- the one write transaction ----------------------------------------------------------

    def commit(
        self,
        readings: Sequence[Reading],
        rejects: Sequence[Reject] = (),
        delivered: Sequence[int] = (),
        dead: Sequence[DeadLetter] = (),
        mark_sent: Sequence[int] = (),
        *,
        aliases: Sequence[AliasRow] = (),
    ) -> Committed:
        """Apply one group of changes in a single transaction.

        Args:
            readings: new readings to insert (their messages are acked after this returns).
            rejects: unmappable messages for the dead-letter table.
            delivered: row ids the cloud accepted: deleted.
            dead: rows the cloud refused permanently: moved to the dead-letter table.
            mark_sent: row ids about to be pushed: flagged so a later resend is counted.
            aliases: Sparkplug alias changes the committed messages made, in order.

        Returns:
            The new rows' ids, how many of ``mark_sent`` had been sent before, and how many
            dead letters were evicted.

        Raises:
            SpoolFullError: inserting would pass ``max_bytes`` or the disk is full; in that case
                nothing at all was written and the caller must retry. The size check is made
                before the transaction, so one group commit may pass ``max_bytes`` by its own
                size; the next one is refused.
            SpoolError: any other database failure; nothing was written.
        """
        try:
            if readings and self.is_full():
                raise SpoolFullError(
                    f"spool {self.path} holds {self.used_bytes()} bytes, spool.max_bytes is "
                    f"{self.max_bytes}"
                )
        except sqlite3.Error as exc:
            raise _sqlite_failure(self.path, exc) from exc
        conn = self._conn
        done = Committed()
        count = self._count
        with _transaction(conn, self.path):
            # Read under the write lock: another process (`energy-bridge dlq replay`) may have
            # added rows since our last commit; then the in-memory count is recounted.
            before = self._sequence()
            if before > self._last_id:
                count = self._count_readings()
            done.ids = self._insert_readings(before + 1, readings)
            if rejects:
                conn.executemany(
                    "INSERT INTO dead_letters (at, source, reason, detail, topic, payload,"
                    " received_at) VALUES (?, 'mapping', ?, ?, ?, ?, ?)",
                    [
                        (
                            time.time(),
                            j.reason,
                            j.detail,
                            _topic_text(j.topic),
                            j.payload,
                            j.received_at,
                        )
                        for j in rejects
                    ],
                )
            if dead:
                conn.executemany(
                    "INSERT INTO dead_letters (at, source, reason, detail, device_type,"
                    " device_id, record_time, data, received_at)"
                    " SELECT ?, 'cloud', ?, ?, device_type, device_id, record_time, data,"
                    " received_at FROM readings WHERE id = ?",
                    [(time.time(), d.reason, d.detail, d.rid) for d in dead],
                )
            gone = [*delivered, *(d.rid for d in dead)]
            deleted = 0
            if gone:
                deleted = conn.executemany(
                    "DELETE FROM readings WHERE id = ?", [(i,) for i in gone]
                ).rowcount
            if mark_sent:
                done.already_sent = self._mark_sent(mark_sent)
            if aliases:
                self._change_aliases(aliases)
            if rejects:
                done.evicted["mapping"] = self._evict_dead_letters("mapping")
            if dead:
                done.evicted["cloud"] = self._evict_dead_letters("cloud")
        self._last_id = max(self._last_id, before + len(readings))
        self._count = count + len(readings) - deleted
        return done

    def _insert_readings(self, first: int, readings: Sequence[Reading]) -> list[int]:
        """Insert ``readings`` with ids from ``first`` on (inside a transaction)."""
        if readings:
            self._conn.executemany(
                _INSERT_READING,
                [
                    (
                        first + i,
                        r.device_type,
                        r.device_id,
                        r.record_ts,
                        r.record_time,
                        r.data_json,
                        r.received_at,
                    )
                    for i, r in enumerate(readings)
                ],
            )
        return list(range(first, first + len(readings)))

    def _change_aliases(self, changes: Sequence[AliasRow]) -> None:
        """Apply alias changes in order, inside the caller's transaction.

        Births are rare, so one statement per change is cheap.
        """
        conn = self._conn
        for edge, alias, name, datatype in changes:
            if alias is None:
                conn.execute("DELETE FROM sparkplug_aliases WHERE edge = ?", (edge,))
            else:
                conn.execute(
                    "INSERT OR REPLACE INTO sparkplug_aliases (edge, alias, name, datatype)"
                    " VALUES (?, ?, ?, ?)",
                    (edge, alias, name, datatype),
                )

    def sparkplug_aliases(self) -> list[AliasRow]:
        """Every stored Sparkplug alias, as changes that rebuild the tables (read at start)."""
        try:
            return [
                (str(edge), int(alias), str(name), int(datatype))
                for edge, alias, name, datatype in self._conn.execute(
                    "SELECT edge, alias, name, datatype FROM sparkplug_aliases ORDER BY edge, alias"
                )
            ]
        except sqlite3.Error as exc:
            raise _sqlite_failure(self.path, exc) from exc

    def _evict_dead_letters(self, source: str) -> int:
        """Delete the oldest dead letters of ``source`` until it fits its budget."""
        row = self._conn.execute(
            "SELECT bytes FROM dead_letter_usage WHERE source = ?", (source,)
        ).fetchone()
        excess = (int(row[0]) if row else 0) - self.dead_letter_max_bytes
        if excess <= 0:
            return 0
        victims: list[int] = []
        freed = 0
        for dead_id, size in self._conn.execute(
            f"SELECT id, {_DEAD_SIZE.format(r='dead_letters')} FROM dead_letters"  # noqa: S608
            " WHERE source = ? ORDER BY id LIMIT 10000",
            (source,),
        ):
            if freed >= excess:
                break
            victims.append(dead_id)
            freed += int(size)
        self._conn.executemany("DELETE FROM dead_letters WHERE id = ?", [(i,) for i in victims])
        return len(victims)

    def _mark_sent(self, rids: Sequence[int]) -> int:
        conn = self._conn
        before = 0
        for chunk in _chunks(rids, 500):
            marks = ",".join("?" * len(chunk))
            before += conn.execute(
                f"SELECT count(*) FROM readings WHERE sent > 0 AND id IN ({marks})",  # noqa: S608
                chunk,
            ).fetchone()[0]
            conn.execute(
                f"UPDATE readings SET sent = 1 WHERE sent = 0 AND id IN ({marks})",  # noqa: S608
                chunk,
            )
        return int(before)

    # -- reads ------------------------------------------------------------------------------

    def fetch_after(self, after_id: int, limit: int) -> list[SpooledReading]:
        """Rows with id greater than ``after_id``, oldest first, at most ``limit``.

        The points stay the JSON text they were stored as; they are decoded only if a batch
        has to merge them with another reading of the same device and time.
        """
        rows = self._conn.execute(
            "SELECT id, device_type, device_id, record_ts, record_time, data, received_at"
            " FROM readings WHERE id > ? ORDER BY id LIMIT ?",
            (after_id, limit),
        ).fetchall()
        return [
            SpooledReading(
                row[0], Reading.from_json(row[1], row[2], row[3], row[4], row[5], row[6])
            )
            for row in rows
        ]

    def stats(self) -> SpoolStats:
        """Counts, sizes and the age anchor of the oldest undelivered reading (reads only)."""
        # Row ids follow arrival, so the lowest id is (nearly) the oldest: an index seek,
        # where min(received_at) would scan the table.
        row = self._conn.execute("SELECT received_at FROM readings ORDER BY id LIMIT 1").fetchone()
        usage = self.dead_letter_usage()
        used = self.used_bytes()
        dead_bytes = {source: size for source, (_, size) in usage.items()}
        return SpoolStats(
            readings=self._count,
            used_bytes=used,
            oldest_received_at=row[0] if row else None,
            dead_letters={source: entries for source, (entries, _) in usage.items()},
            dead_letter_bytes=dead_bytes,
            last_id=self._last_id,
            full=used - sum(dead_bytes.values()) >= self.max_bytes,
        )

    # -- the dead-letter store (energy-bridge dlq) ------------------------------------------

    def dead_letters(self, where: DeadLetterFilter | None = None) -> list[DeadLetterRow]:
        """Dead letters matching ``where`` (all when ``None``), newest first."""
        where = where or DeadLetterFilter()
        clauses: list[str] = []
        values: list[Any] = []
        for column, value in (("reason", where.reason), ("source", where.source)):
            if value is not None:
                clauses.append(f"{column} = ?")
                values.append(value)
        if where.topic is not None:
            clauses.append("instr(topic, ?) > 0")
            values.append(where.topic)
        if where.since is not None:
            clauses.append("at >= ?")
            values.append(where.since)
        if where.until is not None:
            clauses.append("at < ?")
            values.append(where.until)
        if where.ids:
            clauses.append(f"id IN ({','.join('?' * len(where.ids))})")
            values.extend(where.ids)
        sql = f"SELECT {_DEAD_COLUMNS} FROM dead_letters"  # noqa: S608 - fixed column list
        if clauses:
            sql += " WHERE " + " AND ".join(clauses)
        sql += " ORDER BY id DESC"
        if where.limit is not None:
            sql += " LIMIT ?"
            values.append(where.limit)
        return [
            DeadLetterRow(
                id=row[0],
                at=row[1],
                source=row[2],
                reason=row[3],
                detail=row[4],
                topic=row[5],
                payload=None if row[6] is None else bytes(row[6]),
                device_type=row[7],
                device_id=row[8],
                record_time=row[9],
                data=None if row[10] is None else bytes(row[10]),
                received_at=row[11],
            )
            for row in self._conn.execute(sql, values)
        ]

    def purge_dead_letters(self, ids: Sequence[int]) -> None:
        """Delete dead letters by id, in one transaction."""
        with _transaction(self._conn, self.path):
            self._conn.executemany("DELETE FROM dead_letters WHERE id = ?", [(i,) for i in ids])

    def replay_dead_letters(
        self,
        moves: Sequence[tuple[int, Sequence[Reading]]],
        still: Sequence[tuple[int, str, str]] = (),
    ) -> None:
        """Put readings back into the spool and delete their dead letters, atomically.

        Args:
            moves: (dead letter id, the readings it maps to now).
            still: (dead letter id, reason, detail) of entries that still fail: they stay,
                with the reason they fail for now.

        Cloud dead letters keep ``recordTime`` but not ``record_ts``: replayed with 0, they
        share one batching partition, and each entry is still sent with its own recordTime.
        """
        with _transaction(self._conn, self.path):
            readings = [r for _, group in moves for r in group]
            self._insert_readings(self._sequence() + 1, readings)
            self._conn.executemany(
                "DELETE FROM dead_letters WHERE id = ?", [(dead_id,) for dead_id, _ in moves]
            )
            self._conn.executemany(
                "UPDATE dead_letters SET reason = ?, detail = ? WHERE id = ?",
                [(reason, detail, dead_id) for dead_id, reason, detail in still],
            )
