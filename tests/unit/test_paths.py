"""Paths into a decoded payload: the compiler's grammar and the evaluation rules."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bridge.intake.paths import JsonPath, PathError, compile_path

DOC: dict[str, Any] = {
    "Ua": "230.1",
    "ENERGY": {"Current": ["1.1", "1.2", "1.3"], "Power": "2635"},
    "em:0": {"a voltage": "229.9"},
    "": {"x": "1"},
    "meters": [{"addr": "m-1"}, {"addr": "m-2"}],
}


@pytest.mark.parametrize(
    ("path", "steps", "from_root"),
    [
        ("Ua", ("Ua",), False),
        ("ENERGY.Current[0]", ("ENERGY", "Current", 0), False),
        ("meters[-1].addr", ("meters", -1, "addr"), False),
        ('"em:0"."a voltage"', ("em:0", "a voltage"), False),
        ('"".x', ("", "x"), False),
        ('"a\\"b"', ('a"b',), False),
        ("[0]", (0,), False),
        ("$.timestamp", ("timestamp",), True),
        ("$[1]", (1,), True),
        ("$", (), True),
        ("_x9.y_", ("_x9", "y_"), False),
    ],
)
def test_paths_compile_to_steps(path: str, steps: tuple[object, ...], from_root: bool) -> None:
    """Test that each form of the grammar compiles to its steps."""
    compiled = compile_path(path)

    assert (steps, from_root) == (compiled.steps, compiled.from_root)


@pytest.mark.parametrize(
    "path",
    [
        "",
        ".Ua",
        "Ua.",
        "Ua..P",
        "Ua[",
        "Ua[x]",
        "Ua[1",
        "em:0",
        "a b",
        '"open',
        "$Ua",
        "1abc",
        "a.[0]",
        "Ua[0]x",
        '"\\q"',
    ],
)
def test_paths_bad_syntax_is_refused(path: str) -> None:
    """Test that a path outside the grammar is refused with a PathError (a ValueError)."""
    with pytest.raises(PathError, match="path"):
        compile_path(path)


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("Ua", "230.1"),
        ("ENERGY.Current[0]", "1.1"),
        ("ENERGY.Current[-1]", "1.3"),
        ("ENERGY.Current[3]", None),
        ("ENERGY.Current[-4]", None),
        ('"em:0"."a voltage"', "229.9"),
        ('"".x', "1"),
        ("meters[1].addr", "m-2"),
        ("missing.deeper", None),
        ("Ua.deeper", None),
        ("Ua[0]", None),
        ("ENERGY[0]", None),
        ("ENERGY.Current.x", None),
    ],
)
def test_paths_find_the_value_or_none(path: str, expected: object) -> None:
    """Test that a path finds its value, and None where a step finds nothing or the wrong kind."""
    assert expected == compile_path(path).find(DOC, {})


def test_paths_dollar_reads_the_whole_payload() -> None:
    """Test that a path starting with $ reads the payload, not the record."""
    root = {"timestamp": "1700000000", "meters": [{"Ua": "1"}]}

    assert "1700000000" == compile_path("$.timestamp").find(root["meters"][0], root)
    assert root == compile_path("$").find({}, root)


def test_paths_top_key_is_a_single_record_key() -> None:
    """Test that top_key names the record key a one-step path reads, and only then."""
    assert ["Ua", None, None, None] == [
        compile_path(p).top_key for p in ("Ua", "a.b", "$.Ua", "[0]")
    ]


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=5),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner, max_size=4)
    ),
    max_leaves=20,
)


@given(doc=_JSON, steps=st.lists(st.text(max_size=4) | st.integers(-5, 5), max_size=5))
def test_paths_property_any_path_on_any_json_never_raises(doc: object, steps: list[object]) -> None:
    """Test that any quoted-name or index path compiles, and finds a value or None on any JSON."""
    text = "".join(f"[{s}]" if isinstance(s, int) else "." + json.dumps(s) for s in steps)
    path = compile_path("$" + text)

    assert isinstance(path, JsonPath)
    path.find(doc, doc)
