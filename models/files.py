"""Files and folders written so that a crash never leaves a half-written one under the final name.

`atomic_path` hands out a temporary path beside the target and renames it into place once the
writer is done (an atomic replace on POSIX); `write_json` / `write_jsonl` / `write_text_atomic` use
it. `append_jsonl` adds one line: a line cut short by a crash is dropped when a resumed run truncates
the file to the lines its checkpoint knows. `replace_dir` puts a finished folder in the place of an
existing one with one atomic exchange, so the folder is never missing while it is replaced.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import shutil
import sys
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator

logger = logging.getLogger(__name__)

_AT_FDCWD, _RENAME_EXCHANGE = -100, 2  # linux/fcntl.h, linux/fs.h


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it replaces `path`, on error it is removed."""
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}{path.suffix}")
    try:
        yield tmp
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


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


def replace_dir(src: Path, dst: Path) -> None:
    """Move the finished folder `src` to `dst`, replacing an existing `dst`.

    On Linux the two folders are swapped by one `renameat2(RENAME_EXCHANGE)`, so `dst` always exists
    and is always complete. Where that call is missing (other systems, a filesystem without it) the
    old folder is renamed away first, which leaves `dst` missing for the moment between two renames;
    that is logged.
    """
    if not dst.exists():
        src.rename(dst)
        return
    if not _exchange(src, dst):
        logger.warning("%s: no atomic folder exchange here; replacing it with two renames", dst)
        old = dst.parent / f".{dst.name}.old-{uuid.uuid4().hex[:8]}"
        dst.rename(old)
        src.rename(dst)
        src = old
    shutil.rmtree(src)  # after the exchange `src` holds the old folder


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2); False where the system cannot."""
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    errno = ctypes.get_errno()
    if errno in (38, 22):  # ENOSYS, EINVAL: the kernel or the filesystem does not support the flag
        return False
    raise OSError(errno, f"cannot exchange {a} and {b}: {os.strerror(errno)}")
