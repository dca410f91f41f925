"""The durable spool: SQLite in WAL mode, the only place a reading lives between the broker's
acknowledgement and the cloud's ``"success"``.

Lifecycle: :meth:`Spool.open` creates or migrates the schema; every method then runs on ONE
thread (the one :class:`bridge.spool.thread.SpoolWriter` owns), in transactions that either
happen whole or not at all. A reading is inserted before its MQTT message is acknowledged, and
deleted only when the cloud accepted it or it is moved to the dead-letter table with its reason.

Row ids are ``AUTOINCREMENT``: they only ever grow, so a reader can page through the spool
with an id cursor and never miss a row.
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import orjson

from bridge.errors import SpoolError, SpoolFullError
from bridge.models import Reading, SpooledReading

__all__ = ["SCHEMA_VERSION", "DeadLetter", "Reject", "Spool", "SpoolStats"]

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS readings (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    device_type TEXT    NOT NULL,
    device_id   TEXT,
    record_ts   INTEGER NOT NULL,
    record_time TEXT    NOT NULL,
    data        BLOB    NOT NULL,   -- orjson of {point: "exact text"}
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
"""


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
class SpoolStats:
    """What the spool holds right now."""

    readings: int
    used_bytes: int
    oldest_received_at: float | None
    dead_letters: int
    last_id: int
    full: bool


@contextlib.contextmanager
def _transaction(conn: sqlite3.Connection) -> Iterator[None]:
    try:
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
    except sqlite3.Error as exc:
        raise SpoolError(f"spool write failed: {exc}") from exc


# What a dead letter costs, in bytes (its variable-size columns plus a row overhead).
_DEAD_OVERHEAD = 64
_DEAD_SIZE = (
    f"{_DEAD_OVERHEAD} + length(coalesce(payload, '')) + length(coalesce(topic, ''))"
    " + length(detail) + length(coalesce(data, ''))"
)


def _check_version(conn: sqlite3.Connection, path: Path) -> None:
    has_meta = conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta'"
    ).fetchone()
    if not has_meta:
        return
    row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    if row is None:
        return
    try:
        version = int(row[0])
    except ValueError:
        raise SpoolError(f"spool {path} has an unreadable schema version {row[0]!r}") from None
    if version > SCHEMA_VERSION:
        raise SpoolError(
            f"spool {path} has schema version {version}, newer than this energy-bridge"
            f" understands ({SCHEMA_VERSION}); upgrade the bridge"
        )


def _topic_text(topic: bytes) -> str:
    return topic.decode("utf-8", errors="backslashreplace")


class Spool:
    """SQLite-backed store of undelivered readings and dead letters (single-threaded use)."""

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
        # Dead letters have their own budget, so garbage can never fill the spool and hold
        # back valid readings; past it the oldest dead letters give way (and are counted).
        total_dead = f"SELECT coalesce(sum({_DEAD_SIZE}), 0) FROM dead_letters"  # noqa: S608
        self._dead_bytes = int(conn.execute(total_dead).fetchone()[0])
        self.dead_letters_evicted = 0
        self._page_size = int(conn.execute("PRAGMA page_size").fetchone()[0])
        row = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'readings'").fetchone()
        self._last_id = int(row[0]) if row else 0
        # Kept in memory: count(*) scans the table, too slow with a million rows spooled.
        self._count = int(conn.execute("SELECT count(*) FROM readings").fetchone()[0])
        self._dead_count = int(conn.execute("SELECT count(*) FROM dead_letters").fetchone()[0])

    @classmethod
    def open(
        cls,
        path: Path,
        *,
        max_bytes: int,
        synchronous: str = "full",
        dead_letter_max_bytes: int | None = None,
    ) -> Spool:
        """Open (and create or migrate) the spool at ``path``.

        Raises:
            SpoolError: the file cannot be opened, is not a spool, or is from a newer version
                (checked before anything is written to it).
        """
        conn: sqlite3.Connection | None = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(
                str(path), isolation_level=None, check_same_thread=False, timeout=30
            )
            _check_version(conn, path)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute(f"PRAGMA synchronous={'FULL' if synchronous == 'full' else 'NORMAL'}")
            conn.execute("PRAGMA temp_store=MEMORY")
            # executescript commits on its own; the schema statements are idempotent.
            conn.executescript(_SCHEMA)
            conn.execute(
                "INSERT OR IGNORE INTO meta (key, value) VALUES ('schema_version', ?)",
                (str(SCHEMA_VERSION),),
            )
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
        """The highest row id ever assigned (ids are never reused)."""
        return self._last_id

    def close(self) -> None:
        """Checkpoint and close the database."""
        # Closing must not fail because a checkpoint could not run.
        with contextlib.suppress(sqlite3.Error):
            self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        self._conn.close()

    # -- space ------------------------------------------------------------------------------

    def used_bytes(self) -> int:
        """Bytes held by live pages (freed pages are reused, so they do not count)."""
        pages = self._conn.execute("PRAGMA page_count").fetchone()[0]
        free = self._conn.execute("PRAGMA freelist_count").fetchone()[0]
        return int(pages - free) * self._page_size

    def is_full(self) -> bool:
        """Whether the readings (dead letters not counted) have reached ``max_bytes``."""
        return self.used_bytes() - self._dead_bytes >= self.max_bytes

    # -- the one write transaction ----------------------------------------------------------

    def commit(
        self,
        readings: Sequence[Reading],
        rejects: Sequence[Reject],
        delivered: Sequence[int] = (),
        dead: Sequence[DeadLetter] = (),
        mark_sent: Sequence[int] = (),
    ) -> tuple[list[int], int]:
        """Apply one group of changes in a single transaction.

        Args:
            readings: new readings to insert (their messages are acked after this returns).
            rejects: unmappable messages for the dead-letter table.
            delivered: row ids the cloud accepted: deleted.
            dead: rows the cloud refused permanently: moved to the dead-letter table.
            mark_sent: row ids about to be pushed: flagged so a later resend is counted.

        Returns:
            The new rows' ids (same order as ``readings``) and how many of ``mark_sent``
            were already flagged (readings being sent again).

        Raises:
            SpoolFullError: inserting would pass ``max_bytes`` or the disk is full; in that case
                nothing at all was written and the caller must retry. The size check is made
                before the transaction, so one group commit may pass ``max_bytes`` by its own
                size; the next one is refused.
            SpoolError: any other database failure; nothing was written.
        """
        if readings and self.is_full():
            raise SpoolFullError(
                f"spool {self.path} holds {self.used_bytes()} bytes, spool.max_bytes is "
                f"{self.max_bytes}"
            )
        conn = self._conn
        first = 0
        already_sent = 0
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                # Read under the write lock: another process (`energy-bridge dlq replay`)
                # may have added rows since our last commit.
                row = conn.execute(
                    "SELECT seq FROM sqlite_sequence WHERE name = 'readings'"
                ).fetchone()
                first = (int(row[0]) if row else 0) + 1
                if readings:
                    # A generator, not a list: orjson's bytes keep a 4 KiB block each, and
                    # thousands of them at once would be a needless peak.
                    conn.executemany(
                        "INSERT INTO readings (id, device_type, device_id, record_ts, record_time,"
                        " data, received_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                        (
                            (
                                first + i,
                                r.device_type,
                                r.device_id,
                                r.record_ts,
                                r.record_time,
                                orjson.dumps(r.data),
                                r.received_at,
                            )
                            for i, r in enumerate(readings)
                        ),
                    )
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
                gone = list(delivered) + [d.rid for d in dead]
                deleted = 0
                if gone:
                    cur = conn.executemany(
                        "DELETE FROM readings WHERE id = ?", [(i,) for i in gone]
                    )
                    deleted = cur.rowcount
                if mark_sent:
                    already_sent = self._mark_sent(mark_sent)
                added_dead = sum(
                    _DEAD_OVERHEAD + len(j.payload) + len(j.topic) + len(j.detail) for j in rejects
                ) + sum(_DEAD_OVERHEAD + 256 + len(d.detail) for d in dead)
                evicted, freed = self._evict_dead_letters(added_dead)
                conn.execute("COMMIT")
            except BaseException:
                # SQLite may already have rolled back (e.g. on SQLITE_FULL); a second
                # ROLLBACK would fail and hide the real error.
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
        except sqlite3.OperationalError as exc:
            if "full" in str(exc).lower():
                raise SpoolFullError(f"spool {self.path}: {exc}") from exc
            raise SpoolError(f"spool {self.path}: {exc}") from exc
        except sqlite3.Error as exc:
            raise SpoolError(f"spool {self.path}: {exc}") from exc
        self._last_id = max(self._last_id, first - 1 + len(readings))
        self._count += len(readings) - deleted
        self._dead_count += len(rejects) + len(dead) - evicted
        self._dead_bytes += added_dead - freed
        self.dead_letters_evicted += evicted
        return list(range(first, first + len(readings))), already_sent

    def _evict_dead_letters(self, incoming: int) -> tuple[int, int]:
        """Delete the oldest dead letters so ``incoming`` more bytes fit the budget."""
        excess = self._dead_bytes + incoming - self.dead_letter_max_bytes
        if excess <= 0:
            return 0, 0
        victims: list[int] = []
        freed = 0
        for dead_id, size in self._conn.execute(
            f"SELECT id, {_DEAD_SIZE} FROM dead_letters ORDER BY id LIMIT 10000"  # noqa: S608
        ):
            if freed >= excess:
                break
            victims.append(dead_id)
            freed += int(size)
        self._conn.executemany("DELETE FROM dead_letters WHERE id = ?", [(i,) for i in victims])
        return len(victims), freed

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
        """Rows with id greater than ``after_id``, oldest first, at most ``limit``."""
        rows = self._conn.execute(
            "SELECT id, device_type, device_id, record_ts, record_time, data, received_at"
            " FROM readings WHERE id > ? ORDER BY id LIMIT ?",
            (after_id, limit),
        ).fetchall()
        return [
            SpooledReading(
                row[0], Reading(row[1], row[2], row[3], row[4], orjson.loads(row[5]), row[6])
            )
            for row in rows
        ]

    def stats(self) -> SpoolStats:
        """Counts and the age anchor of the oldest undelivered reading."""
        # Row ids follow arrival, so the lowest id is (nearly) the oldest: an index seek,
        # where min(received_at) would scan the table.
        row = self._conn.execute("SELECT received_at FROM readings ORDER BY id LIMIT 1").fetchone()
        # Another process (`energy-bridge dlq replay`) may have added rows.
        seq = self._conn.execute(
            "SELECT seq FROM sqlite_sequence WHERE name = 'readings'"
        ).fetchone()
        seq_id = int(seq[0]) if seq else 0
        if seq_id > self._last_id:
            self._last_id = seq_id
            self._count = int(self._conn.execute("SELECT count(*) FROM readings").fetchone()[0])
            self._dead_count = int(
                self._conn.execute("SELECT count(*) FROM dead_letters").fetchone()[0]
            )
        used = self.used_bytes()
        return SpoolStats(
            self._count,
            used,
            row[0] if row else None,
            self._dead_count,
            self._last_id,
            used - self._dead_bytes >= self.max_bytes,
        )

    @property
    def connection(self) -> sqlite3.Connection:
        """The SQLite connection, for read-only tooling (``energy-bridge dlq``)."""
        return self._conn

    def purge_dead_letters(self, ids: Sequence[int]) -> None:
        """Delete dead letters by id, in one transaction."""
        with _transaction(self._conn):
            self._conn.executemany("DELETE FROM dead_letters WHERE id = ?", [(i,) for i in ids])
        self._dead_count = max(0, self._dead_count - len(ids))

    def replay_dead_letters(self, moves: Sequence[tuple[int, Sequence[Reading]]]) -> None:
        """Put readings back into the spool and delete their dead letters, atomically.

        Cloud dead letters keep ``recordTime`` but not ``record_ts``: replayed with 0, they
        share one batching partition, and each entry is still sent with its own recordTime.
        """
        with _transaction(self._conn):
            row = self._conn.execute(
                "SELECT seq FROM sqlite_sequence WHERE name = 'readings'"
            ).fetchone()
            next_id = (int(row[0]) if row else 0) + 1
            values = []
            for _, readings in moves:
                for r in readings:
                    values.append(
                        (
                            next_id,
                            r.device_type,
                            r.device_id,
                            r.record_ts,
                            r.record_time,
                            orjson.dumps(r.data),
                            r.received_at,
                        )
                    )
                    next_id += 1
            self._conn.executemany(
                "INSERT INTO readings (id, device_type, device_id, record_ts, record_time, data,"
                " received_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                values,
            )
            self._conn.executemany(
                "DELETE FROM dead_letters WHERE id = ?", [(dead_id,) for dead_id, _ in moves]
            )

    def dead_letters(
        self, *, reason: str | None = None, limit: int = 100
    ) -> list[dict[str, object]]:
        """Dead letters, newest first, optionally filtered by reason code."""
        sql = (
            "SELECT id, at, source, reason, detail, topic, payload, device_type, device_id,"
            " record_time, data FROM dead_letters"
        )
        args: list[object] = []
        if reason is not None:
            sql += " WHERE reason = ?"
            args.append(reason)
        sql += " ORDER BY id DESC LIMIT ?"
        args.append(limit)
        cols = [
            "id",
            "at",
            "source",
            "reason",
            "detail",
            "topic",
            "payload",
            "device_type",
            "device_id",
            "record_time",
            "data",
        ]
        return [dict(zip(cols, row, strict=True)) for row in self._conn.execute(sql, args)]


def _chunks(items: Sequence[int], size: int) -> Iterable[Sequence[int]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
