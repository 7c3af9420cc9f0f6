"""JSON Lines streaming I/O for the command line: every input line read as it comes (a bad
line is an error in its place, never a skipped line), every output line valid JSON in UTF-8."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any, BinaryIO

from worldpm_reward.samples import loads_json


def read_lines(f: BinaryIO) -> Iterator[tuple[int, Any]]:
    """(line number, parsed object or an error string) for EVERY line, read as it comes:
    blank, undecodable (not UTF-8) and invalid lines are errors in place, so the output has
    one line per input line, in order."""
    for lineno, raw in enumerate(f, start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            yield lineno, f"line {lineno}: not UTF-8 (invalid byte at column {exc.start + 1})"
            continue
        if not line.strip():
            yield lineno, f"line {lineno}: blank line"
            continue
        try:
            obj = loads_json(line)
        except json.JSONDecodeError as exc:
            yield lineno, f"line {lineno}: invalid JSON ({exc.msg} at column {exc.colno})"
            continue
        except (ValueError, RecursionError) as exc:
            yield lineno, f"line {lineno}: invalid JSON ({exc})"
            continue
        if not isinstance(obj, dict):
            yield lineno, f"line {lineno}: expected a JSON object, got {type(obj).__name__}"
            continue
        yield lineno, obj


#: Line-break characters that json.dumps leaves unescaped (it escapes everything below U+0020).
_LINE_BREAKS = {0x85: "\\u0085", 0x2028: "\\u2028", 0x2029: "\\u2029"}


def json_line(out: dict[str, Any]) -> str:
    """One output line: valid JSON and valid UTF-8 whatever the input held (a lone surrogate
    from a JSON escape is written escaped), and one line for every reader: the characters
    that ``str.splitlines`` and some JSONL readers take as line breaks (U+0085, U+2028,
    U+2029) are written as JSON escapes."""
    line = json.dumps(out, ensure_ascii=False, allow_nan=False)
    try:
        line.encode("utf-8")
    except UnicodeEncodeError:
        line = json.dumps(out, ensure_ascii=True, allow_nan=False)
    return line.translate(_LINE_BREAKS) + "\n"


_SAMPLE_PREFIX = re.compile(r"^sample \d+(?=[,:])")


def line_error(lineno: int, error: str) -> str:
    """A scorer's error with its position in the scored chunk replaced by the input line."""
    named, n = _SAMPLE_PREFIX.subn(f"line {lineno}", error, count=1)
    return named if n else f"line {lineno}: {error}"


__all__ = ["json_line", "line_error", "read_lines"]
