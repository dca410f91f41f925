"""Logging set-up: one line per event with stable field names.

JSON lines when stderr is not a terminal (for log shippers), readable ``key=value`` lines on a
terminal. Fields come from ``extra={...}``; the message is a short constant event name.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

import orjson

__all__ = ["Throttled", "setup_logging"]

_STANDARD = frozenset(
    logging.LogRecord("", 0, "", 0, "", None, None).__dict__.keys() | {"message", "asctime"}
)


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in record.__dict__.items() if k not in _STANDARD}


class JsonFormatter(logging.Formatter):
    """``{"ts", "level", "logger", "event", ...fields}`` per line."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
        }
        doc.update(_fields(record))
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(doc, default=str).decode()


class TextFormatter(logging.Formatter):
    """``HH:MM:SS level logger event key=value ...`` per line."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%H:%M:%S", time.localtime(record.created))
        extras = " ".join(f"{k}={v}" for k, v in _fields(record).items())
        line = f"{stamp} {record.levelname:<7} {record.name:<14} {record.getMessage()}"
        if extras:
            line += "  " + extras
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def setup_logging(level: str = "INFO", fmt: str = "auto") -> None:
    """Configure the root logger once (stderr)."""
    use_json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if use_json else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # aiohttp's access log and paho's own logger are not ours to print.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


class Throttled:
    """Logs one line per key per ``interval`` seconds and says how many were folded into it.

    Repeated identical failures (the same push error, the same reject reason) then cost one
    line a minute instead of one per request, and the count keeps them visible.
    """

    def __init__(self, logger: logging.Logger, interval: float = 60.0) -> None:
        self._logger = logger
        self._interval = interval
        self._last: dict[str, tuple[float, int]] = {}

    def log(self, key: str, level: int, event: str, fields: dict[str, Any]) -> bool:
        """Log ``event`` with ``fields`` unless ``key`` was logged within the interval.

        Returns:
            Whether a line was written.
        """
        now = time.monotonic()
        last, folded = self._last.get(key, (-1e18, 0))
        if now - last < self._interval:
            self._last[key] = (last, folded + 1)
            return False
        self._last[key] = (now, 0)
        self._logger.log(level, event, extra={**fields, "repeated_since_last_line": folded})
        return True

    def reset(self) -> None:
        """Forget every key (e.g. after recovery, so the next failure is logged at once)."""
        self._last.clear()
