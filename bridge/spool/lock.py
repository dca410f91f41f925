"""One bridge per spool: an exclusive ``flock`` on ``<spool>.lock``, held while the bridge runs.

Two bridges on one spool would both push every row. ``energy-bridge run`` takes this lock
before it opens the spool and keeps it until it exits; a second one finds it taken and refuses
to start, naming the process that holds it. The kernel releases the lock when its holder exits,
however it exits (SIGKILL, a crash), so a stale lock cannot keep the next start out: the file
may stay behind, its lock does not.

The ``dlq`` commands do not take it: SQLite serialises their writes with the bridge's, and the
bridge picks up what they change (see :mod:`bridge.spool.dlq`).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

from bridge.errors import SpoolError, SpoolLockedError

__all__ = ["SpoolLock", "lock_path"]


def lock_path(spool: Path) -> Path:
    """The lock file of the spool at ``spool``: the same name with ``.lock`` appended."""
    return spool.with_name(spool.name + ".lock")


class SpoolLock:
    """The exclusive lock on one spool; :meth:`acquire` it, :meth:`release` it (or exit).

    Args:
        spool: the spool database file the lock is for.
    """

    def __init__(self, spool: Path) -> None:
        self.spool = spool
        self.path = lock_path(spool)
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        """Whether this object holds the lock."""
        return self._fd is not None

    def acquire(self) -> SpoolLock:
        """Take the lock without waiting and write our pid into the lock file.

        Returns:
            ``self``.

        Raises:
            SpoolLockedError: another process holds it (the message names its pid).
            SpoolError: the lock file cannot be created or locked.
        """
        if self._fd is not None:
            return self
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise SpoolError(f"cannot create the spool lock {self.path}: {exc.strerror}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_pid(fd)
            os.close(fd)
            who = f"energy-bridge pid {holder}" if holder else "another energy-bridge process"
            raise SpoolLockedError(
                f"spool {self.spool} is in use by {who} (lock {self.path})"
            ) from None
        except OSError as exc:
            os.close(fd)
            raise SpoolError(f"cannot lock the spool lock {self.path}: {exc.strerror}") from exc
        # Ours now: say who holds it, for the next one that finds it taken.
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        """Let go of the lock (closing the file releases it); the file stays."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)

    def __enter__(self) -> SpoolLock:
        """Acquire."""
        return self.acquire()

    def __exit__(self, *exc_info: object) -> None:
        """Release."""
        self.release()


def _read_pid(fd: int) -> int | None:
    """The pid written in a lock file, ``None`` when it holds none (yet)."""
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None
