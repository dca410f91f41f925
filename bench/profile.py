"""Where the bridge's time goes: py-spy samples of the bridge process under the live load.

``python -m bench --profile DIR`` runs one extra ``live`` repetition, and one extra ``spool``
repetition when that scenario is selected (neither is counted in the figures), with
``py-spy record`` attached to the bridge, writes the collapsed stacks to
``DIR/bridge-<scenario>.txt`` (any flame-graph tool reads them) and prints the functions
with the largest share of samples: *self* (the sample's innermost frame, where the CPU
actually was) and *total* (anywhere on the stack). Needs ``py-spy`` on the PATH or in the
interpreter's ``bin`` (``pip install py-spy``) and permission to ptrace the bridge.
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

__all__ = ["PySpy", "top_functions"]

_LINE = re.compile(r"^(?P<stack>.*) (?P<count>\d+)$")
# Innermost frames that mean "this thread waits", which py-spy sometimes samples as active:
# the spool thread blocked in its executor's queue (checked against /proc per-thread CPU).
_IDLE_LEAVES = frozenset({"_worker (concurrent/futures/thread.py)"})
_FRAME_LINE = re.compile(r":\d+\)$")


def _py_spy() -> str:
    candidate = Path(sys.executable).with_name("py-spy")
    if candidate.exists():
        return str(candidate)
    found = shutil.which("py-spy")
    if found is None:
        raise FileNotFoundError("py-spy not found: pip install py-spy")
    return found


class PySpy:
    """``py-spy record`` attached to one process until :meth:`stop`.

    Args:
        pid: the process to sample (all its threads).
        out: the collapsed-stack output file (``--format raw``).
        rate: samples per second.
    """

    def __init__(self, pid: int, out: Path, *, rate: int = 200) -> None:
        self.out = out
        self._argv = [
            _py_spy(),
            "record",
            "--pid",
            str(pid),
            "--rate",
            str(rate),
            "--format",
            "raw",
            "--output",
            str(out),
        ]
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> PySpy:
        """Start sampling."""
        log = self.out.with_suffix(".log").open("wb")
        self._proc = subprocess.Popen(
            self._argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
        return self

    def stop(self) -> None:
        """Stop sampling (SIGINT: py-spy writes its output) and wait for the file."""
        if self._proc is None:
            return
        self._proc.send_signal(signal.SIGINT)
        try:
            self._proc.wait(60)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait(10)


def _function(frame: str) -> str:
    # "on_message (bridge/ingest.py:97)" -> "on_message (bridge/ingest.py)"
    return _FRAME_LINE.sub(")", frame.strip())


def _short(name: str) -> str:
    # Shorten site-packages paths for the report.
    return re.sub(r"\([^()]*/site-packages/", "(", re.sub(r"\(/[^()]*/(bridge/)", r"(\1", name))


def _module(frame: str) -> str | None:
    match = re.search(r"\((bridge/[^():]*)", frame)
    return match.group(1) if match else None


def top_functions(collapsed: Path, limit: int = 15) -> dict[str, Any]:
    """Shares of the samples in ``collapsed`` (py-spy ``--format raw``), in percent.

    Returns:
        ``samples``; ``self_pct``: functions by samples where they were the innermost frame;
        ``bridge_total_pct``: the bridge's own functions by samples anywhere on the stack;
        ``by_module_pct``: each sample charged to the innermost ``bridge/`` module on its
        stack (so paho's work counts for ``intake/mqtt.py``, SQLite's for ``spool/store.py``);
        ``by_thread_pct``: event loop (main thread) versus worker threads;
        ``idle_excluded_pct``: samples left out because the thread was waiting for work.
    """
    total = 0
    self_counts: Counter[str] = Counter()
    total_counts: Counter[str] = Counter()
    module_counts: Counter[str] = Counter()
    thread_counts: Counter[str] = Counter()
    idle = 0
    for raw in collapsed.read_text(encoding="utf-8", errors="replace").splitlines():
        match = _LINE.match(raw)
        if match is None:
            continue
        count = int(match["count"])
        frames = [_short(_function(f)) for f in match["stack"].split(";") if f]
        # py-spy puts "process ..." / "thread ..." pseudo-frames first when asked to; skip.
        frames = [f for f in frames if not f.startswith(("process ", "thread "))]
        if not frames:
            continue
        if frames[-1] in _IDLE_LEAVES:
            idle += count
            continue
        total += count
        self_counts[frames[-1]] += count
        for name in set(frames):
            if _module(name) is not None and not name.startswith(("<module>", "main ", "_run ")):
                total_counts[name] += count
        modules = [m for m in map(_module, frames) if m is not None]
        module = modules[-1] if modules else "(not under bridge/)"
        if module == "bridge/cli.py":
            module = "(event loop itself: uvloop, under bridge/cli.py)"
        module_counts[module] += count
        worker = any(f.startswith("Thread._bootstrap ") for f in frames)
        thread_counts["worker threads (spool, connect)" if worker else "event loop"] += count

    def share(counter: Counter[str], n: int = limit) -> list[list[Any]]:
        return [[name, round(100 * k / total, 1)] for name, k in counter.most_common(n)]

    return {
        "samples": total,
        "idle_excluded_pct": round(100 * idle / max(1, idle + total), 1),
        "self_pct": share(self_counts),
        "bridge_total_pct": share(total_counts),
        "by_module_pct": share(module_counts, 20),
        "by_thread_pct": share(thread_counts),
    }
