"""Paths into a decoded JSON payload: a small JMESPath-style subset, compiled once at config load.

Grammar (no spaces)::

    path   := "$" | "$" step+ | first step*
    first  := name | index
    step   := "." name | index
    name   := identifier | quoted
    identifier := [A-Za-z_][A-Za-z0-9_]*
    quoted := '"' JSON string characters '"'    (for keys with ":", spaces, "." or no name)
    index  := "[" "-"? digits "]"               (negative counts from the end)

``ENERGY.Current[0]``, ``"em:0".a_voltage``, ``meters[-1]``, ``""``. A path starting with
``$`` reads the whole payload instead of the current record (``$.timestamp``).

Evaluation never raises: a step that finds no key, an index out of range, or a value of the
wrong kind (a key asked of an array) gives ``None``, as JSON ``null`` does.
"""

from __future__ import annotations

import json
import re
from typing import Any, Final

__all__ = ["JsonPath", "PathError", "compile_path"]

_IDENTIFIER: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_INDEX: Final = re.compile(r"\[(-?[0-9]{1,9})\]")
_QUOTED: Final = re.compile(r'"(?:[^"\\]|\\.)*"')
MAX_PATH_CHARS: Final = 1000


class PathError(ValueError):
    """A path that does not follow the grammar; the message says where and why."""


class JsonPath:
    """A compiled path: the steps (key names and indexes) and where it starts.

    Attributes:
        text: the path as written.
        steps: each step, a ``str`` key or an ``int`` index.
        from_root: whether the path reads the whole payload (``$``) instead of the record.
    """

    __slots__ = ("from_root", "steps", "text")

    def __init__(self, text: str, steps: tuple[str | int, ...], *, from_root: bool) -> None:
        self.text = text
        self.steps = steps
        self.from_root = from_root

    @property
    def top_key(self) -> str | None:
        """The key when the path is one key of the record (``Ua``), else ``None``."""
        if not self.from_root and len(self.steps) == 1 and type(self.steps[0]) is str:
            return self.steps[0]
        return None

    def find(self, record: Any, root: Any) -> Any:
        """The value the path points at in ``record`` (or ``root`` for ``$`` paths), or ``None``."""
        node = root if self.from_root else record
        for step in self.steps:
            if isinstance(step, str):
                if type(node) is not dict:
                    return None
                node = node.get(step)
            else:
                if type(node) is not list or not -len(node) <= step < len(node):
                    return None
                node = node[step]
        return node

    def __repr__(self) -> str:
        """``JsonPath('ENERGY.Current[0]')``."""
        return f"JsonPath({self.text!r})"


def compile_path(text: str) -> JsonPath:
    """Compile ``text`` (see the module docstring for the grammar).

    Raises:
        PathError: naming the position and what was expected there.
    """
    if not isinstance(text, str):
        raise PathError(f"a path must be a string, got a {type(text).__name__}")
    if not text:
        raise PathError('a path cannot be empty (a key with no name is written "")')
    if len(text) > MAX_PATH_CHARS:
        raise PathError(f"a path has at most {MAX_PATH_CHARS} characters")
    from_root = text.startswith("$")
    pos = 1 if from_root else 0
    steps: list[str | int] = []
    first = not from_root
    while pos < len(text):
        char = text[pos]
        if char == "[":
            match = _INDEX.match(text, pos)
            if match is None:
                raise PathError(_where(text, pos, "an index such as [0] or [-1]"))
            steps.append(int(match.group(1)))
            pos = match.end()
        else:
            if not first:
                if char != ".":
                    raise PathError(_where(text, pos, "'.' or '['"))
                pos += 1
            name, pos = _name(text, pos)
            steps.append(name)
        first = False
    return JsonPath(text, tuple(steps), from_root=from_root)


def _name(text: str, pos: int) -> tuple[str, int]:
    if text[pos : pos + 1] == '"':
        match = _QUOTED.match(text, pos)
        if match is None:
            raise PathError(_where(text, pos, 'a closing " of the quoted name'))
        try:
            name = json.loads(match.group(0))
        except ValueError:
            raise PathError(_where(text, pos, "a quoted name with valid escapes")) from None
        return str(name), match.end()
    match = _IDENTIFIER.match(text, pos)
    if match is None:
        raise PathError(_where(text, pos, 'a name (letters, digits, _; quote others: "em:0")'))
    return match.group(0), match.end()


def _where(text: str, pos: int, expected: str) -> str:
    found = repr(text[pos]) if pos < len(text) else "the end"
    return f"bad path {text[:80]!r}: expected {expected} at character {pos + 1}, found {found}"
