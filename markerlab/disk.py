"""Free space before a big write: one line naming the path, what it needs and what is free.

    from markerlab.disk import check_free_space
    check_free_space(run_dir / "merged", need_bytes)   # UserError: "runs/x/merged: needs 15.2 GB, 3.1 GB free"

Call it before writing anything large (a merged checkpoint, evaluation parts),
once the size is known: running out of space half way is a traceback and a
half-written directory, and on a 7B model it costs minutes before it happens.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from .errors import UserError


def format_bytes(n: int | float) -> str:
    """Decimal units, as `df -H` prints them: 15.2 GB, 340.0 MB."""
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


def free_bytes(path: str | os.PathLike) -> int:
    """Free bytes (for this user) on the file system that holds, or will hold, `path`."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:  # the target need not exist yet
        p = p.parent
    return shutil.disk_usage(p).free


def check_free_space(path: str | os.PathLike, need_bytes: int, hint: str = "") -> int:
    """Raise UserError unless `need_bytes` fit where `path` will be written; returns the free bytes.

    `hint` (what to do about it) is appended to the message.
    """
    free = free_bytes(path)
    if need_bytes > free:
        raise UserError(f"{path}: needs {format_bytes(need_bytes)}, {format_bytes(free)} free"
                        + (f"; {hint}" if hint else ""))
    return free
