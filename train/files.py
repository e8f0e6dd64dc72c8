"""Run-folder files written so that a crash never leaves a half-written one.

`write_json` / `write_jsonl` write a temporary file beside the target and rename it into place (an
atomic replace on POSIX). `append_jsonl` adds one line; a line cut short by a crash is dropped when a
resumed run truncates the file to the lines its checkpoint knows.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable


def write_text_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary file and a rename."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: Path, value: Any) -> None:
    write_text_atomic(path, json.dumps(value, indent=1) + "\n")


def write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    write_text_atomic(path, "".join(json.dumps(row) + "\n" for row in rows))


def append_jsonl(path: Path, row: dict[str, Any]) -> None:
    with path.open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(row) + "\n")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The rows of a JSONL file ([] when it does not exist)."""
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
