"""The spool lock: one bridge per spool, the holder named, released with the holder."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from bridge.errors import SpoolLockedError
from bridge.spool.lock import SpoolLock, lock_path


def test_spool_lock_second_taker_is_refused_naming_the_holder(tmp_path: Path) -> None:
    """Test that a second lock on the same spool fails with the holder's pid and the lock file."""
    spool = tmp_path / "energy-bridge.db"
    with SpoolLock(spool), pytest.raises(SpoolLockedError) as info:
        SpoolLock(spool).acquire()

    expected = (
        f"spool {spool} is in use by energy-bridge pid {os.getpid()} "
        f"(lock {tmp_path / 'energy-bridge.db.lock'})"
    )
    assert expected == str(info.value)


def test_spool_lock_is_free_again_after_release(tmp_path: Path) -> None:
    """Test that a released lock can be taken again, and the file holds the new holder's pid."""
    spool = tmp_path / "spool" / "energy-bridge.db"
    SpoolLock(spool).acquire().release()

    with SpoolLock(spool) as lock:
        held = lock.held
        text = lock_path(spool).read_text()

    assert (True, f"{os.getpid()}\n") == (held, text)


def test_spool_lock_is_released_when_its_holder_dies(tmp_path: Path) -> None:
    """Test that the lock of a process killed without cleaning up is free (no stale lock)."""
    spool = tmp_path / "energy-bridge.db"
    code = (
        "import os, sys\n"
        "from pathlib import Path\n"
        "from bridge.spool.lock import SpoolLock\n"
        f"SpoolLock(Path({str(spool)!r})).acquire()\n"
        "os._exit(0)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)

    with SpoolLock(spool) as lock:
        assert lock.held


def test_spool_lock_file_is_private(tmp_path: Path) -> None:
    """Test that the lock file is readable by its owner only."""
    spool = tmp_path / "energy-bridge.db"
    old = os.umask(0)
    try:
        with SpoolLock(spool):
            mode = stat.S_IMODE(lock_path(spool).stat().st_mode)
    finally:
        os.umask(old)

    assert 0o600 == mode
