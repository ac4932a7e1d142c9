"""Atomic file writes: the one way patchdiff puts a file in place.

The content goes to a temporary `.NAME.*.tmp` file in the destination's folder, is flushed to disk, and
is renamed onto the destination. A crash leaves the old file or the new one, never half of one; the
temporary file is removed when writing fails (a killed process leaves it: `remove_temporaries` in
training/checkpoint.py clears a run's).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def atomic_write(path: str | os.PathLike, write_fn: Callable[[str], object]) -> None:
    """Call write_fn(tmp_path), fsync the file, then rename tmp_path onto path."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write_fn(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)  # the rename must not reach the disk before the content does
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))
