"""Small file helpers shared by the data pipeline and the framework (which may import us)."""

from __future__ import annotations

import os
from pathlib import Path


def atomic_write(path: Path, data: bytes, durable: bool = False) -> None:
    """Write-then-rename: a crash never leaves a truncated file under the final name.
    ``durable``: the bytes reach the disk before the rename (checkpoint metadata, pointers)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        if durable:
            f.flush()
            os.fsync(f.fileno())
    tmp.replace(path)
