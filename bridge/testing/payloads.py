"""Deterministic meter payloads for tests, the demo's checks and the benchmark.

Every reading carries a ``seq`` point, so a test can account for each one at the cloud
(:func:`seq_counts`) and predict its exact values (:func:`telemetry_points`).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from decimal import Decimal
from typing import Any, Final

__all__ = [
    "START_TS",
    "iter_telemetry",
    "meter_ids",
    "seq_counts",
    "telemetry_payload",
    "telemetry_points",
]

_TELEMETRY_POINTS: Final = ("Ua", "Ub", "Uc", "Ia", "Ib", "Ic", "P", "Q", "COSQ", "F", "Ep_imp")


START_TS: Final = 1_700_000_000
"""2023-11-14 22:13:20 UTC = recordTime ``2023-11-15 06:13:20`` in Asia/Shanghai."""


def meter_ids(n: int) -> list[str]:
    """``meter-0000`` .. ``meter-{n-1}``."""
    return [f"meter-{i:04d}" for i in range(n)]


def seq_counts(entries: Iterable[dict[str, Any]]) -> Counter[int]:
    """How often each ``seq`` point appears in the cloud's entries (for loss/duplicate counts)."""
    return Counter(int(e["data"]["seq"]) for e in entries if "seq" in e["data"])


def telemetry_points(seq: int) -> dict[str, str]:
    """The data points :func:`telemetry_payload` writes for ``seq``, as exact number text.

    Deterministic, so a test can predict what the cloud must receive: ``{"Ua": "226.10", ...,
    "seq": "7"}``.
    """
    phase = seq % 100
    ua, ub, uc = 226.0 + phase / 10, 227.0 + phase / 20, 228.5 - phase / 25
    ia, ib, ic = 10.0 + phase / 8, 11.25 + phase / 16, 9.5 + phase / 10
    cos_phi = 0.85 + (seq % 15) / 100
    s_kva = (ua * ia + ub * ib + uc * ic) / 1000
    values = (
        f"{ua:.2f}",
        f"{ub:.2f}",
        f"{uc:.2f}",
        f"{ia:.3f}",
        f"{ib:.3f}",
        f"{ic:.3f}",
        f"{s_kva * cos_phi:.3f}",
        f"{s_kva * (1 - cos_phi**2) ** 0.5:.3f}",
        f"{cos_phi:.2f}",
        f"{49.95 + (seq % 11) / 100:.2f}",
        f"{1000 + seq * 0.25:.2f}",
    )
    points = dict(zip(_TELEMETRY_POINTS, values, strict=True))
    points["seq"] = str(seq)
    return points


def telemetry_payload(
    seq: int, ts: int, **extra: Decimal | str | int | float | bool | None
) -> bytes:
    """A realistic one-reading JSON payload: ``ts``, 11 meter points and ``seq``.

    Values are JSON numbers written with fixed decimals (``"Ua": 226.10``); ``seq`` lets a
    test account for every reading. ``extra`` adds or replaces keys: a :class:`~decimal.Decimal`
    is written as that exact number text, anything else through ``json.dumps`` (so a ``str``
    becomes a JSON string).
    """
    parts = [f'"ts":{ts}']
    parts += [
        f'"{key}":{value}' for key, value in telemetry_points(seq).items() if key not in extra
    ]
    for key, value in extra.items():
        text = str(value) if isinstance(value, Decimal) else json.dumps(value)
        parts.append(f"{json.dumps(key)}:{text}")
    return ("{" + ",".join(parts) + "}").encode()


def iter_telemetry(
    device_ids: Sequence[str], count: int, start_ts: int, *, device_type: str = "1"
) -> Iterator[tuple[str, bytes]]:
    """Yield ``(topic, payload)`` for ``count`` readings per device, one second apart.

    ``seq`` runs 0..``count*len(device_ids)``-1 over the whole stream, readings interleaved
    across devices.
    """
    seq = 0
    for k in range(count):
        for device_id in device_ids:
            topic = f"meters/{device_type}/{device_id}/telemetry"
            yield topic, telemetry_payload(seq, start_ts + k)
            seq += 1
