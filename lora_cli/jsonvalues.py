"""Typed values read from JSON files that people and other tools write (a checkpoint's config.json, PEFT's
adapter_config.json, an adapter's metadata): what each kind of value must be, and the words of a one-line
complaint when it is not. Nothing is coerced: "64" is not 64, 4.5 is not a whole number, "false" is not false;
a JSON int is a good number.
"""

from __future__ import annotations

import json
import math
from typing import Any, Callable

# kind -> (test, what a good value is, how to write one)
KINDS: dict[str, tuple[Callable[[Any], bool], str, str]] = {
    "size": (lambda v: type(v) is int and v > 0, "a whole number above 0", "a whole number"),
    "count": (lambda v: type(v) is int and v >= 0, "a whole number (0 or more)", "a whole number"),
    "number": (lambda v: type(v) in (int, float) and math.isfinite(v), "a finite number", "a number"),
    "positive": (lambda v: type(v) in (int, float) and math.isfinite(v) and v > 0, "a finite number above 0",
                 "a number above 0"),
    "probability": (lambda v: type(v) in (int, float) and 0 <= v < 1, "a probability from 0 up to (not including) 1",
                    "a number"),
    "bool": (lambda v: type(v) is bool, "true or false", "true or false"),
    "text": (lambda v: type(v) is str, "text", "text"),
    "object": (lambda v: type(v) is dict, "a JSON object", "a JSON object"),
    "names": (lambda v: type(v) is list and all(type(x) is str for x in v), "a list of names",
              "a JSON list of names"),
}


def shown(value: Any, limit: int = 60) -> str:
    """A value as JSON spells it (NaN, Infinity, "text"), shortened for a one-line message."""
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def complaint(value: Any, kind: str, example: Any = None, nullable: bool = False, what: str | None = None,
              how: str | None = None) -> tuple[str, str] | None:
    """None when `value` is of `kind` (or null where `nullable`); else (what is wrong, what to do):
    ('"64" is not a whole number above 0', 'write 64 without quotes'). example: a good value to show;
    what / how: words for a good value and how to write one, instead of the kind's own."""
    test, good, write = KINDS[kind]
    if test(value) or (value is None and nullable):
        return None
    try:
        unquoted = isinstance(value, str) and kind != "text" and test(json.loads(value))
    except ValueError:
        unquoted = False
    if unquoted:  # "64" for 64, "true" for true
        advice = f"write {value} without quotes"
    else:
        advice = "write " + (how or write)
        if example is not None and kind != "bool":
            advice += f" such as {json.dumps(example)}"
        if nullable:
            advice += ", or null"
    return f"{shown(value)} is not {what or good}", advice


def finite_or_null(value: Any) -> Any:
    """`value` with every NaN or infinite float as None, so that json.dumps writes JSON that other tools read
    (Python writes NaN and Infinity, which JSON has not): a model that gives non-finite numbers reports null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite_or_null(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_null(v) for v in value]
    return value


def lone_surrogate(value: Any) -> tuple[str, str] | None:
    """(where, escape) of a string or key in `value` (its dicts and lists walked) holding half of a UTF-16 surrogate
    pair, which JSON's and YAML's "\\ud800" escape gives alone and UTF-8 cannot hold: where is the dotted key it
    sits under ("" at the top), escape the half as written ("\\ud800"). None when there is none."""
    stack: list[tuple[str, Any]] = [("", value)]
    while stack:
        where, item = stack.pop()
        if isinstance(item, dict):
            stack.extend((f"{where}.{k}" if where else str(k), v) for k, v in item.items())
            stack.extend((where, k) for k in item if isinstance(k, str))
        elif isinstance(item, list):
            stack.extend((where, v) for v in item)
        elif isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError as exc:
                return where, f"\\u{ord(item[exc.start]):04x}"
    return None
