"""The SQLite spool: durability, ids, paging, completions, dead letters, space, schema, WAL."""

from __future__ import annotations

import os
import shutil
import sqlite3
import stat
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from bridge.errors import SpoolError, SpoolFullError
from bridge.models import Reading
from bridge.spool.store import SCHEMA_VERSION, DeadLetter, DeadLetterFilter, Reject, SpoolStore

T0 = 1631097600  # 2021-09-08 18:40:00 in Asia/Shanghai
BIG = 1 << 30
SMALL = 64 * 1024  # the smallest spool.max_bytes the configuration allows


def _reading(
    n: int = 0, *, device_id: str | None = "meter-0001", data: dict[str, str] | None = None
) -> Reading:
    return Reading(
        device_type="1",
        device_id=device_id,
        record_ts=T0 + n,
        record_time=f"2021-09-08 18:40:{n % 60:02d}",
        data={"P": "6.62", "F": "50.00"} if data is None else data,
        received_at=1000.0 + n,
    )


def _reject(topic: bytes = b"meters/1/m1/telemetry", payload: bytes = b"{not json") -> Reject:
    return Reject(topic, payload, "bad_json", "expected a JSON object", 1234.5)


def _count(path: Path, table: str) -> int:
    conn = sqlite3.connect(path)
    try:
        return int(conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0])  # noqa: S608
    finally:
        conn.close()


def _fill(spool: SpoolStore) -> int:
    """Insert large readings until the spool reports full; returns how many went in."""
    n = 0
    while not spool.is_full():
        spool.commit([_reading(n, data={"P": "1" * 3000})], [])
        n += 1
    return n


@pytest.fixture
def path(tmp_path: Path) -> Path:
    """Where the test's spool lives."""
    return tmp_path / "spool" / "energy-bridge.db"


@pytest.fixture
def spool(path: Path) -> Iterator[SpoolStore]:
    """An open spool with room to spare, closed at teardown."""
    opened = SpoolStore.open(path, max_bytes=BIG)
    try:
        yield opened
    finally:
        opened.close()


# -- durability -----------------------------------------------------------------------------


def test_spool_readings_survive_close_and_reopen(path: Path) -> None:
    """Test that committed readings are all there, field for field, after close and reopen."""
    readings = [_reading(1), _reading(2, device_id=None), _reading(3, data={"Ep_imp": "1.230"})]
    first = SpoolStore.open(path, max_bytes=BIG)
    ids = first.commit(readings, []).ids
    first.close()

    second = SpoolStore.open(path, max_bytes=BIG)
    try:
        rows = second.fetch_after(0, 10)
    finally:
        second.close()

    assert ids == [row.rid for row in rows]
    assert readings == [row.reading for row in rows]


def test_spool_readings_visible_to_a_second_connection_without_close(path: Path) -> None:
    """Test that rows are committed when commit returns, before the spool is ever closed."""
    writer = SpoolStore.open(path, max_bytes=BIG)
    try:
        ids = writer.commit([_reading(1), _reading(2)], []).ids
        reader = SpoolStore.open(path, max_bytes=BIG)
        try:
            rows = reader.fetch_after(0, 10)
            last_id = reader.last_id
        finally:
            reader.close()
    finally:
        writer.close()

    assert ids == [row.rid for row in rows]
    assert ids[-1] == last_id


def test_spool_readings_survive_a_crash(path: Path, tmp_path: Path) -> None:
    """Test that the files as a killed process leaves them (never closed) hold every row."""
    writer = SpoolStore.open(path, max_bytes=BIG)
    try:
        ids = writer.commit([_reading(1), _reading(2)], [_reject()]).ids
        # The on-disk state of a process killed right now: database plus an unmerged WAL.
        crashed = tmp_path / "crashed"
        crashed.mkdir()
        for suffix in ("", "-wal"):
            shutil.copyfile(f"{path}{suffix}", crashed / f"{path.name}{suffix}")
    finally:
        writer.close()

    recovered = SpoolStore.open(crashed / path.name, max_bytes=BIG)
    try:
        rows = recovered.fetch_after(0, 10)
        stats = recovered.stats()
        last_id = recovered.last_id
    finally:
        recovered.close()

    expected = (ids, {"mapping": 1, "cloud": 0}, ids[-1])
    assert expected == ([row.rid for row in rows], stats.dead_letters, last_id)


def test_spool_open_creates_missing_directories(tmp_path: Path) -> None:
    """Test that opening a spool creates its parent directories."""
    path = tmp_path / "a" / "b" / "spool.db"

    SpoolStore.open(path, max_bytes=BIG).close()

    assert path.is_file()


def test_spool_new_file_and_its_wal_are_private(path: Path) -> None:
    """Test that the spool and its -wal/-shm files are private to the owner, whatever the umask.

    A new spool, and its -wal (and -shm) file after a write, are readable and
    writable by the owner only, even under a umask that would let everyone read them.
    """
    old = os.umask(0)
    try:
        spool = SpoolStore.open(path, max_bytes=BIG)
        try:
            spool.commit([_reading()], [])
            names = [path.name, path.name + "-wal", path.name + "-shm"]
            modes = {
                name: stat.S_IMODE((path.parent / name).stat().st_mode)
                for name in names
                if (path.parent / name).exists()
            }
        finally:
            spool.close()
    finally:
        os.umask(old)

    assert path.name + "-wal" in modes
    assert dict.fromkeys(modes, 0o600) == modes


# -- ids ------------------------------------------------------------------------------------


def test_spool_ids_grow_monotonically(spool: SpoolStore) -> None:
    """Test that each commit's ids follow the previous ones, in the order of the readings."""
    first = spool.commit([_reading(1), _reading(2), _reading(3)], []).ids
    second = spool.commit([_reading(4)], []).ids

    expected = ([1, 2, 3], [4], 4)
    assert expected == (first, second, spool.last_id)


def test_spool_ids_are_never_reused_after_deleting_everything(path: Path) -> None:
    """Test that ids keep growing after every row was deleted and the spool reopened."""
    first = SpoolStore.open(path, max_bytes=BIG)
    ids = first.commit([_reading(1), _reading(2), _reading(3)], []).ids
    first.commit([], [], delivered=ids)
    first.close()

    second = SpoolStore.open(path, max_bytes=BIG)
    try:
        last_before = second.last_id
        new_ids = second.commit([_reading(4)], []).ids
    finally:
        second.close()

    expected = (3, [4])
    assert expected == (last_before, new_ids)


def test_spool_commit_without_readings_returns_no_ids(spool: SpoolStore) -> None:
    """Test that a commit of rejects only assigns no reading ids and leaves last_id alone."""
    done = spool.commit([], [_reject()])

    expected: tuple[list[int], int, int] = ([], 0, 0)
    assert expected == (done.ids, done.already_sent, spool.last_id)


# -- reads ----------------------------------------------------------------------------------


def test_spool_fetch_after_pages_oldest_first(spool: SpoolStore) -> None:
    """Test that fetch_after pages through the rows by id with an id cursor and a limit."""
    ids = spool.commit([_reading(n) for n in range(7)], []).ids

    pages: list[list[int]] = []
    cursor = 0
    while page := spool.fetch_after(cursor, 3):
        pages.append([row.rid for row in page])
        cursor = page[-1].rid

    assert [ids[0:3], ids[3:6], ids[6:7]] == pages


def test_spool_fetch_after_skips_deleted_rows(spool: SpoolStore) -> None:
    """Test that fetch_after returns only rows still in the spool."""
    ids = spool.commit([_reading(n) for n in range(4)], []).ids
    spool.commit([], [], delivered=[ids[1]])

    rows = spool.fetch_after(ids[0], 10)

    assert [ids[2], ids[3]] == [row.rid for row in rows]


def test_spool_stats_counts_rows_and_oldest(spool: SpoolStore) -> None:
    """Test that stats() counts readings and dead letters and reports the oldest received_at."""
    empty = spool.stats()
    ids = spool.commit([_reading(5), _reading(2), _reading(9)], [_reject()]).ids
    spool.commit([], [], delivered=[ids[1]])

    stats = spool.stats()

    expected = [(0, None, {"mapping": 0, "cloud": 0}), (2, 1005.0, {"mapping": 1, "cloud": 0})]
    assert expected == [
        (each.readings, each.oldest_received_at, each.dead_letters) for each in (empty, stats)
    ]
    assert spool.used_bytes() == stats.used_bytes


# -- completions ----------------------------------------------------------------------------


def test_spool_delivered_rows_are_deleted(spool: SpoolStore) -> None:
    """Test that rows the cloud accepted are deleted and the others stay."""
    ids = spool.commit([_reading(1), _reading(2), _reading(3)], []).ids

    spool.commit([], [], delivered=[ids[0], ids[2]])

    expected = ([ids[1]], 0)
    assert expected == (
        [row.rid for row in spool.fetch_after(0, 10)],
        sum(spool.stats().dead_letters.values()),
    )


def test_spool_dead_rows_move_to_dead_letters(spool: SpoolStore) -> None:
    """Test that a refused row leaves the spool for dead_letters with its reason and data."""
    reading = _reading(1, data={"Ua": "220.10", "P": "6.62"})
    ids = spool.commit([reading, _reading(2)], []).ids

    spool.commit(
        [], [], dead=[DeadLetter(ids[0], "InvalidParameter", "devices[0].data.Ua is invalid")]
    )

    (letter,) = spool.dead_letters()
    assert [ids[1]] == [row.rid for row in spool.fetch_after(0, 10)]
    expected = {
        "source": "cloud",
        "reason": "InvalidParameter",
        "detail": "devices[0].data.Ua is invalid",
        "topic": None,
        "payload": None,
        "device_type": "1",
        "device_id": "meter-0001",
        "record_time": reading.record_time,
    }
    assert expected == {key: getattr(letter, key) for key in expected}
    assert reading.data == orjson.loads(letter.data or b"")


def test_spool_rejects_land_in_dead_letters(spool: SpoolStore) -> None:
    """Test that unmappable messages are kept with topic, payload, reason and detail."""
    spool.commit([], [_reject(b"meters/1/m1/telemetry", b"{not json")])

    (letter,) = spool.dead_letters()

    expected = {
        "source": "mapping",
        "reason": "bad_json",
        "detail": "expected a JSON object",
        "topic": "meters/1/m1/telemetry",
        "payload": b"{not json",
        "device_type": None,
        "device_id": None,
        "record_time": None,
        "data": None,
    }
    assert expected == {key: getattr(letter, key) for key in expected}
    assert not spool.stats().readings


def test_spool_reject_topic_that_is_not_utf8_is_kept_readable(spool: SpoolStore) -> None:
    """Test that a topic with invalid UTF-8 is stored with backslash escapes, not dropped."""
    spool.commit([], [_reject(b"meters/\xff/telemetry")])

    (letter,) = spool.dead_letters()

    expected = "meters/\\xff/telemetry"
    assert expected == letter.topic


def test_spool_dead_letters_newest_first_and_filtered(spool: SpoolStore) -> None:
    """Test that dead_letters() lists newest first, filters by reason and honours limit."""
    ids = spool.commit([_reading(1)], [_reject(b"t/1")]).ids
    spool.commit([], [], dead=[DeadLetter(ids[0], "InvalidParameter", "bad")])
    spool.commit([], [_reject(b"t/2")])

    reasons = [letter.reason for letter in spool.dead_letters()]
    topics = [letter.topic for letter in spool.dead_letters(DeadLetterFilter(reason="bad_json"))]
    limited = spool.dead_letters(DeadLetterFilter(limit=1))

    expected = (["bad_json", "InvalidParameter", "bad_json"], ["t/2", "t/1"], ["t/2"])
    assert expected == (reasons, topics, [letter.topic for letter in limited])


def test_spool_mark_sent_counts_rows_already_marked(spool: SpoolStore) -> None:
    """Test that mark_sent returns how many of the rows had been marked before."""
    ids = spool.commit([_reading(n) for n in range(4)], []).ids

    first = spool.commit([], [], mark_sent=ids[:2]).already_sent
    second = spool.commit([], [], mark_sent=ids).already_sent
    third = spool.commit([], [], mark_sent=ids[1:]).already_sent

    expected = (0, 2, 3)
    assert expected == (first, second, third)


def test_spool_commit_is_all_or_nothing(spool: SpoolStore) -> None:
    """Test that a commit failing halfway writes none of its readings, rejects or deletions."""
    ids = spool.commit([_reading(1)], []).ids
    broken = _reading(2)
    broken.record_time = None  # type: ignore[assignment]  # violates NOT NULL

    with pytest.raises(SpoolError):
        spool.commit([_reading(3), broken], [_reject()], delivered=ids)

    rows = spool.fetch_after(0, 10)
    expected = (ids, 0, ids[-1])
    assert expected == (
        [row.rid for row in rows],
        sum(spool.stats().dead_letters.values()),
        spool.last_id,
    )


# -- space ----------------------------------------------------------------------------------


def test_spool_full_spool_refuses_and_writes_nothing(tmp_path: Path) -> None:
    """Test that a full spool refuses readings (with their rejects) and stores nothing."""
    path = tmp_path / "full.db"
    spool = SpoolStore.open(path, max_bytes=SMALL)
    try:
        filled = _fill(spool)
        last_id = spool.last_id

        with pytest.raises(SpoolFullError):
            spool.commit([_reading(99)], [_reject()])

        stats = spool.stats()
    finally:
        spool.close()

    assert filled > 0
    expected = (filled, 0, filled)
    assert expected == (stats.readings, sum(stats.dead_letters.values()), last_id)
    assert expected[:2] == (_count(path, "readings"), _count(path, "dead_letters"))


def test_spool_full_of_readings_still_takes_dead_letters(tmp_path: Path) -> None:
    """Test that dead letters have their own budget: a full spool still stores a reject."""
    path = tmp_path / "full.db"
    spool = SpoolStore.open(path, max_bytes=SMALL)
    try:
        _fill(spool)
        spool.commit([], [_reject()])
        dead = sum(spool.stats().dead_letters.values())
    finally:
        spool.close()
    assert 1 == dead


def test_spool_dead_letters_past_their_budget_evict_the_oldest(tmp_path: Path) -> None:
    """Test that garbage cannot fill the spool: the oldest dead letters give way, counted."""
    spool = SpoolStore.open(tmp_path / "dead.db", max_bytes=SMALL, dead_letter_max_bytes=100_000)
    try:
        evicted = 0
        for n in range(40):
            done = spool.commit([], [Reject(b"t", b"x" * 10_000, "bad_json", f"junk {n}", 1.0)])
            evicted += done.evicted.get("mapping", 0)
        kept = spool.dead_letters(DeadLetterFilter(limit=100))
        spool.commit([_reading(1)], [])  # readings are not held back by the garbage
    finally:
        spool.close()
    assert 30 <= evicted < 40
    assert "junk 39" == kept[0].detail
    assert len(kept) == 40 - evicted


def test_spool_full_spool_still_takes_completions(tmp_path: Path) -> None:
    """Test that deliveries, dead letters and sent marks still commit when the spool is full."""
    spool = SpoolStore.open(tmp_path / "full.db", max_bytes=SMALL)
    try:
        _fill(spool)
        ids = [row.rid for row in spool.fetch_after(0, 100)]

        already = spool.commit([], [], mark_sent=ids).already_sent
        spool.commit([], [], delivered=ids[:2], dead=[DeadLetter(ids[2], "InvalidParameter", "")])
        remaining = [row.rid for row in spool.fetch_after(0, 100)]
        dead = sum(spool.stats().dead_letters.values())
    finally:
        spool.close()

    expected = (0, ids[3:], 1)
    assert expected == (already, remaining, dead)


def test_spool_is_full_follows_used_bytes(tmp_path: Path) -> None:
    """Test that is_full() turns on at max_bytes and off again once rows are deleted."""
    spool = SpoolStore.open(tmp_path / "full.db", max_bytes=SMALL)
    try:
        before = spool.is_full()
        _fill(spool)
        full_used = spool.used_bytes()
        ids = [row.rid for row in spool.fetch_after(0, 100)]
        spool.commit([], [], delivered=ids)
        after = spool.is_full()
        emptied_used = spool.used_bytes()
    finally:
        spool.close()

    assert before is False
    assert full_used >= SMALL
    assert after is False
    assert emptied_used < full_used


def _limit_pages(spool: SpoolStore, extra: int) -> None:
    """Let the spool's connection grow by only ``extra`` pages: SQLite's way to fake a full disk."""
    conn = spool._conn  # noqa: SLF001 - fault injection: max_page_count is per connection
    pages = int(conn.execute("PRAGMA page_count").fetchone()[0])
    conn.execute(f"PRAGMA max_page_count = {pages + extra}")


def test_spool_disk_full_writes_nothing_and_recovers(spool: SpoolStore) -> None:
    """Test that a commit hitting a full disk writes nothing and the next commit works."""
    ids = spool.commit([_reading(0)], []).ids
    _limit_pages(spool, 4)

    with pytest.raises(SpoolError):
        spool.commit([_reading(n, data={"P": "1" * 3000}) for n in range(1, 20)], [_reject()])
    stats = spool.stats()
    new_ids = spool.commit([_reading(20)], []).ids

    expected = (1, 0, [ids[0] + 1])
    assert expected == (stats.readings, sum(stats.dead_letters.values()), new_ids)


def test_spool_disk_full_raises_spool_full_error(spool: SpoolStore) -> None:
    """Test that a full disk is reported as SpoolFullError, so the caller pauses and retries."""
    _limit_pages(spool, 4)

    with pytest.raises(SpoolFullError):
        spool.commit([_reading(n, data={"P": "1" * 3000}) for n in range(20)], [])


def test_spool_mark_sent_handles_more_rows_than_one_statement(spool: SpoolStore) -> None:
    """Test that mark_sent counts correctly across its 500-id chunks."""
    ids = spool.commit([_reading(n) for n in range(1201)], []).ids

    first = spool.commit([], [], mark_sent=ids[:700]).already_sent
    second = spool.commit([], [], mark_sent=ids).already_sent

    expected = (0, 700)
    assert expected == (first, second)


# -- schema and journal ---------------------------------------------------------------------


def test_spool_newer_schema_version_is_refused(path: Path) -> None:
    """Test that a spool written by a newer energy-bridge raises SpoolError on open."""
    SpoolStore.open(path, max_bytes=BIG).close()
    conn = sqlite3.connect(path)
    with conn:
        conn.execute(
            "UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(SCHEMA_VERSION + 1),)
        )
    conn.close()

    with pytest.raises(SpoolError, match="schema version"):
        SpoolStore.open(path, max_bytes=BIG)


def test_spool_records_its_schema_version(path: Path) -> None:
    """Test that a new spool stores the schema version it was created with."""
    SpoolStore.open(path, max_bytes=BIG).close()
    conn = sqlite3.connect(path)
    try:
        row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    finally:
        conn.close()

    assert (str(SCHEMA_VERSION),) == row


def test_spool_file_that_is_not_a_database_is_refused(path: Path) -> None:
    """Test that opening a file that is not SQLite raises SpoolError."""
    path.parent.mkdir(parents=True)
    path.write_bytes(b"this is not a database" * 100)

    with pytest.raises(SpoolError):
        SpoolStore.open(path, max_bytes=BIG)


def test_spool_journal_mode_is_wal(spool: SpoolStore, path: Path) -> None:
    """Test that the spool runs in WAL mode, as seen from a fresh connection."""
    conn = sqlite3.connect(path)
    try:
        mode = conn.execute("PRAGMA journal_mode").fetchone()[0]
    finally:
        conn.close()

    expected = "wal"
    assert expected == mode
