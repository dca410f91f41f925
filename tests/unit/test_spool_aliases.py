"""The spool keeps Sparkplug alias tables: committed with their messages, read back at start.

A schema 2 spool gains the table when a newer bridge opens it.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from bridge.errors import SpoolError
from bridge.spool.store import SCHEMA_VERSION, Reject, SpoolStore

BIG = 1 << 30


def _reject() -> Reject:
    return Reject(b"spBv1.0/g/DDATA/e/d", b"\x08\x01", "unknown_alias", "alias 7", 1234.5)


def test_spool_aliases_committed_with_messages_are_read_back_after_reopening(
    tmp_path: Path,
) -> None:
    """Test that alias changes commit in order and survive closing and reopening the spool.

    A reset forgets the node's earlier aliases; another node keeps its own.
    """
    path = tmp_path / "spool.db"
    store = SpoolStore.open(path, max_bytes=BIG)
    store.commit([], [], aliases=[("g/e1", 1, "Old", 9), ("g/e2", 1, "Other", 3)])
    store.commit(
        [],
        [_reject()],
        aliases=[("g/e1", None, "", 0), ("g/e1", 2, "Voltage", 9), ("g/e1", 2, "Voltage", 10)],
    )
    store.close()

    reopened = SpoolStore.open(path, max_bytes=BIG)
    try:
        rows = reopened.sparkplug_aliases()
    finally:
        reopened.close()

    assert [("g/e1", 2, "Voltage", 10), ("g/e2", 1, "Other", 3)] == rows


def test_spool_aliases_of_a_failed_commit_are_not_kept(tmp_path: Path) -> None:
    """Test that alias changes belong to their transaction.

    When it fails, neither they nor the dead letters committed with them are kept.
    """
    store = SpoolStore.open(tmp_path / "spool.db", max_bytes=BIG)
    try:
        with pytest.raises(SpoolError):
            store.commit(
                [],
                [_reject()],
                # A name of NULL breaks the NOT NULL constraint after the first change.
                aliases=[("g/e1", 1, "V", 9), ("g/e1", 2, None, 9)],  # type: ignore[list-item]
            )
        kept = (store.sparkplug_aliases(), store.dead_letters())
    finally:
        store.close()

    assert ([], []) == kept


def test_spool_schema_2_gains_the_alias_table_on_open(tmp_path: Path) -> None:
    """Test that a spool written by schema 2 (no sparkplug_aliases) is migrated on open."""
    path = tmp_path / "spool.db"
    SpoolStore.open(path, max_bytes=BIG).close()
    conn = sqlite3.connect(path)
    with conn:
        conn.execute("DROP TABLE sparkplug_aliases")
        conn.execute("UPDATE meta SET value = '2' WHERE key = 'schema_version'")
    conn.close()

    store = SpoolStore.open(path, max_bytes=BIG)
    try:
        store.commit([], [], aliases=[("g/e", 5, "P", 3)])
        rows = store.sparkplug_aliases()
    finally:
        store.close()
    conn = sqlite3.connect(path)
    try:
        version = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    finally:
        conn.close()

    assert ([("g/e", 5, "P", 3)], (str(SCHEMA_VERSION),), 3) == (rows, version, SCHEMA_VERSION)
