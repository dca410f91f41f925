"""The device registry: the plant's names for its meters -> the deviceIds Energy Expert knows.

A CSV file with the header ``source_id,device_id[,device_type]``: each row maps the id a route
produced (``source_id``) to the id pushed (``device_id``) and, when the column is there and not
empty, to another device type. Blank lines and lines starting with ``#`` are skipped; a UTF-8
byte order mark is allowed. A file with a problem is refused as a whole, naming its line, so a
half-read table never replaces a good one (at start: the bridge does not start; on SIGHUP: the
previous table stays).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from bridge.config import RegistrySettings, RegistryUnknown
from bridge.errors import ConfigError, MappingError
from bridge.models import Reading

__all__ = ["Registry", "RegistryEntry"]

_MAX_ID: Final = 128
_MAX_FILE_BYTES: Final = 64 * 1024 * 1024


@dataclass(slots=True, frozen=True)
class RegistryEntry:
    """Where one source id goes: the deviceId to push and, if set, the device type."""

    device_id: str
    device_type: str | None = None


class Registry:
    """A loaded registry; :meth:`apply` maps a message's readings through it.

    Args:
        entries: source id -> entry.
        reject_unknown: an id that is not in the table is rejected (``unknown_device``) instead
            of passing unchanged.
        path: the file it was read from (for messages).
    """

    def __init__(
        self,
        entries: dict[str, RegistryEntry],
        *,
        reject_unknown: bool = False,
        path: Path | None = None,
    ) -> None:
        self._entries = entries
        self.reject_unknown = reject_unknown
        self.path = path

    def __len__(self) -> int:
        """How many source ids the table maps."""
        return len(self._entries)

    @classmethod
    def load(cls, path: Path, *, reject_unknown: bool = False) -> Registry:
        """Read ``path``.

        Raises:
            ConfigError: (key ``registry.file``) the file cannot be read or a line is wrong;
                the message names the line.
        """
        try:
            raw = path.read_bytes()
        except OSError as exc:
            raise ConfigError("registry.file", f"cannot read {path}: {exc.strerror}") from None
        if len(raw) > _MAX_FILE_BYTES:
            raise ConfigError("registry.file", f"{path} is larger than 64 MiB")
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise ConfigError(
                "registry.file", f"{path} is not UTF-8 text (byte {exc.start})"
            ) from None
        return cls(_parse(text, path), reject_unknown=reject_unknown, path=path)

    @classmethod
    def from_settings(cls, settings: RegistrySettings) -> Registry | None:
        """Read the configured ``registry.file``; ``None`` when there is none.

        Raises:
            ConfigError: as :meth:`load`.
        """
        if settings.file is None:
            return None
        return cls.load(settings.file, reject_unknown=settings.unknown is RegistryUnknown.REJECT)

    def apply(self, readings: Sequence[Reading]) -> list[Reading]:
        """The readings with their deviceId (and device type) as the registry says.

        Raises:
            MappingError: ``unknown_device`` when a reading's id is not in the table and
                unknown ids are rejected.
        """
        entries = self._entries
        out: list[Reading] = []
        for reading in readings:
            source = reading.device_id
            entry = entries.get(source) if source is not None else None
            if entry is None:
                if self.reject_unknown and source is not None:
                    raise MappingError(
                        "unknown_device",
                        f"deviceId {source[:_MAX_ID]!r} is not in the device registry",
                    )
                out.append(reading)
                continue
            out.append(
                Reading.from_json(
                    entry.device_type or reading.device_type,
                    entry.device_id,
                    reading.record_ts,
                    reading.record_time,
                    reading.data_json,
                    reading.received_at,
                )
            )
        return out


def _parse(text: str, path: Path) -> dict[str, RegistryEntry]:
    lines = [
        (number, line)
        for number, line in enumerate(text.splitlines(), 1)
        if line.strip() and not line.lstrip().startswith("#")
    ]
    if not lines:
        raise ConfigError("registry.file", f"{path} is empty: expected a header line")
    header_number, header_line = lines[0]
    header = [name.strip() for name in next(csv.reader([header_line]))]
    if header not in (["source_id", "device_id"], ["source_id", "device_id", "device_type"]):
        raise ConfigError(
            "registry.file",
            f"{path} line {header_number}: the header must be source_id,device_id[,device_type]",
        )
    entries: dict[str, RegistryEntry] = {}
    reader = csv.reader(io.StringIO("\n".join(line for _, line in lines[1:])))
    for (number, _), row in zip(lines[1:], reader, strict=True):
        where = f"{path} line {number}"
        cells = [cell.strip() for cell in row]
        if len(cells) not in {2, len(header)}:
            raise ConfigError("registry.file", f"{where}: expected {len(header)} columns")
        source, device_id = cells[0], cells[1]
        device_type = cells[2] if len(cells) > 2 and cells[2] else None
        if not source or not device_id:
            raise ConfigError("registry.file", f"{where}: source_id and device_id are required")
        if len(source) > _MAX_ID or len(device_id) > _MAX_ID:
            raise ConfigError("registry.file", f"{where}: an id is longer than {_MAX_ID}")
        if device_type is not None and not (device_type.isascii() and device_type.isdigit()):
            raise ConfigError("registry.file", f"{where}: device_type must be digits such as 1")
        if source in entries:
            raise ConfigError("registry.file", f"{where}: source_id {source!r} appears twice")
        entries[source] = RegistryEntry(device_id, device_type)
    return entries
