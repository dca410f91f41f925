"""Write readings straight into a spool file, as the bridge would have stored them.

Filling the spool through the bridge with the cloud down takes as long as the ingest path
needs for every reading; the ``spool`` scenario measures the other half (spool -> cloud), so it
starts from a spool written here with :class:`bridge.spool.store.SpoolStore`
itself. Each reading is
exactly what the bridge's mapping makes of the load generator's payload: the same points with
the same exact text, ``recordTime`` in the configured timezone.
"""

from __future__ import annotations

import time
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

from bench.loadgen import Workload
from bridge.models import Reading
from bridge.spool.store import SpoolStore

__all__ = ["fill_spool", "reading_of"]

_COMMIT_ROWS = 50_000


def _points(payload: bytes) -> dict[str, str]:
    # The load generator's payloads are flat objects of plain numbers: split, keep the text.
    points = {}
    for item in payload[1:-1].split(b","):
        key, _, value = item.partition(b":")
        points[key[1:-1].decode()] = value.decode()
    return points


def reading_of(workload: Workload, seq: int, tz: ZoneInfo, received_at: float) -> Reading:
    """The reading the bridge stores for the load generator's message ``seq``."""
    data = _points(workload.payload(seq))
    ts = int(data.pop("ts"))
    record_time = datetime.fromtimestamp(ts, tz).strftime("%Y-%m-%d %H:%M:%S")
    meter = workload.meter_of(seq)
    return Reading("1", f"meter-{meter:04d}", ts, record_time, data, received_at)


def fill_spool(
    path: Path, workload: Workload, *, timezone: str = "Asia/Shanghai", max_bytes: int = 1 << 40
) -> float:
    """Create a spool at ``path`` holding every reading of ``workload``; return seconds taken.

    Rows are committed in transactions of 50,000 with ``synchronous=NORMAL`` (a file made for
    one benchmark needs no fsync per commit); the file is closed (checkpointed) at the end.
    """
    started = time.monotonic()
    tz = ZoneInfo(timezone)
    spool = SpoolStore.open(path, max_bytes=max_bytes, synchronous="normal")
    try:
        now = time.time()
        for start in range(0, workload.readings, _COMMIT_ROWS):
            stop = min(start + _COMMIT_ROWS, workload.readings)
            spool.commit([reading_of(workload, seq, tz, now) for seq in range(start, stop)], [])
    finally:
        spool.close()
    return time.monotonic() - started
