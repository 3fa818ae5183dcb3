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


def jsonl_records(path: Path, key: str):
    """(line number, record) of every non-blank line of a JSONL file; a missing file or a line
    that is not JSON is a DataConfigError naming ``key``, the file and the line."""
    import json

    from data_pipeline.errors import DataConfigError

    path = Path(path)
    if not path.is_file():
        raise DataConfigError(f"{key}: file not found: {path}")
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield n, json.loads(line)
            except json.JSONDecodeError as e:
                raise DataConfigError(f"{key}: {path}:{n}: not JSON ({e.msg})") from None
