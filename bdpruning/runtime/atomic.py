"""Atomic writes: a result is either complete at its final path or absent.

The temporaries are made private (``tempfile``: 0700 directories, 0600 files) and get the
permissions the user's umask gives any new file before they are renamed into place.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from ..errors import file_error

__all__ = ["atomic_dir", "atomic_file", "atomic_path", "prepare_out_dir", "write_json"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _as_created(path: str | os.PathLike[str], directory: bool) -> None:
    """Give ``path`` the mode a plain ``mkdir``/``open`` would have given it under the umask."""
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


def prepare_out_dir(out: str | os.PathLike[str], force: bool) -> Path:
    """Refuse an existing output directory unless ``force``; return the path."""
    out = Path(out)
    if out.exists() and not force:
        raise file_error(out, "output directory exists (use --force to replace it)")
    if out.exists() and not out.is_dir():
        raise file_error(out, "exists and is not a directory")
    return out


@contextlib.contextmanager
def atomic_dir(out: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary sibling directory that replaces ``out`` only on success."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        _as_created(tmp, directory=True)
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        old = out.with_name(f".{out.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike[str], mode: str = "w") -> Iterator:
    """Open a temporary sibling of ``path`` for writing; rename it over ``path`` on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        _as_created(tmp, directory=False)
        with os.fdopen(fd, mode) as handle:
            yield handle
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary sibling path to write; it replaces ``path`` only on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        _as_created(tmp, directory=False)
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_json(path: str | os.PathLike[str], data: object) -> None:
    """Write ``data`` as indented JSON with a final newline, atomically: the one form of every
    JSON file bdpruning writes."""
    with atomic_file(path) as handle:
        handle.write(json.dumps(data, indent=2) + "\n")
