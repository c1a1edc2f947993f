"""Atomic file output: write under a temporary name in the destination folder, then rename.

``tempfile.mkstemp`` creates files with mode 0600; :func:`publish` gives the finished file the
permissions a plain ``open(path, "w")`` would have (0666 minus the umask) before the rename,
so outputs are readable by collaborators as users expect.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

__all__ = ["temp_path", "publish"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def temp_path(path: str | os.PathLike[str]) -> Path:
    """A new empty temporary file next to ``path`` (same folder, so the rename is atomic)."""
    path = Path(path)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    return Path(name)


def publish(tmp: str | os.PathLike[str], path: str | os.PathLike[str]) -> None:
    """Give ``tmp`` default permissions and rename it to ``path`` atomically."""
    os.chmod(tmp, 0o666 & ~_umask())
    os.replace(tmp, path)
