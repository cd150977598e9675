"""The one exception family for user mistakes.

Library code raises :class:`BdpruningError` for anything the user can fix (a missing file, a
wrong HDF5 key, an unknown layer name). The CLI turns it into a one-line message and exit
code 2; everything else is a bug and keeps its traceback.
"""

from __future__ import annotations

from os import PathLike

__all__ = ["BdpruningError", "file_error"]


class BdpruningError(Exception):
    """A problem with the user's input, reported as one line."""


def file_error(path: str | PathLike[str], problem: str) -> BdpruningError:
    """Build an error that names the file and the problem: ``PATH: problem``."""
    return BdpruningError(f"{path}: {problem}")
