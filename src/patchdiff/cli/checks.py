"""Checks the commands make before any expensive work, so that a bad output path fails in a second
with one line naming the flag, not after an hour of sampling or feature extraction."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def _probe(folder: Path, flag: str, path: Path) -> None:
    """Create (and remove) a file in `folder`: the only reliable test that writing there works."""
    existing = next((p for p in (folder, *folder.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise ValueError(f"{flag} {path}: {existing} is a file, not a folder; choose another path")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".patchdiff-probe-")
        os.close(fd)
        os.remove(tmp)
    except OSError as error:
        raise ValueError(
            f"{flag} {path}: cannot write there ({error.strerror or error}); choose another path"
        ) from None
    finally:
        # Leave no folder behind that this check made; the command makes it again when it writes.
        for made in [folder, *folder.parents]:
            if existing is not None and made == existing:
                break
            try:
                made.rmdir()
            except OSError:
                break


def writable_dir(path: Path, flag: str) -> None:
    """`path` is (or can become) a folder we may write files into."""
    if path.exists() and not path.is_dir():
        raise ValueError(f"{flag} {path} is a file, not a folder; choose another path")
    _probe(path, flag, path)


def writable_file(path: Path, flag: str) -> None:
    """`path` can be written as a file (its folder is writable and it is not a folder itself)."""
    if path.is_dir():
        raise ValueError(f"{flag} {path} is a folder; give a file name, e.g. {path / 'out'}")
    _probe(path.parent, flag, path)
