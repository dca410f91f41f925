"""The vendor SDK's captured push requests, kept in ``tests/data/vectors/push``.

See the README there for where they came from. A missing vector is a failure, never a skip.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Final

__all__ = ["PUSH_VECTORS", "load_push_vector", "push_vector_names"]

PUSH_VECTORS: Final = Path(__file__).resolve().parents[1] / "data" / "vectors" / "push"


def push_vector_names() -> list[str]:
    """The names (``push_v3_ak`` ...) of every captured request in :data:`PUSH_VECTORS`."""
    return sorted(p.stem for p in PUSH_VECTORS.glob("push_*.json"))


def load_push_vector(name: str) -> dict[str, Any]:
    """A captured vendor-SDK request (``<name>.json``).

    ``body`` is bytes; ``canonical_txt`` is there when the capture has one.

    Raises:
        FileNotFoundError: the vector is not in the repository (a failure, not a skip).
    """
    path = PUSH_VECTORS / f"{name}.json"
    vector: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    vector["body"] = vector["body_text"].encode()
    canonical_file = PUSH_VECTORS / f"{name}.canonical.txt"
    if canonical_file.exists():
        vector["canonical_txt"] = canonical_file.read_text(encoding="utf-8")
    return vector
