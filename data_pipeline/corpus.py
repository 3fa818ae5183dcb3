"""Documents from real text: the embedded default corpus (the running interpreter's standard
library source) or local .txt / .jsonl files (optionally .gz)."""

from __future__ import annotations

import glob
import gzip
import json
import sysconfig
import warnings
from pathlib import Path
from typing import Iterator, List

from framework.config import ConfigError, DataConfig


def stdlib_files() -> List[Path]:
    """Every .py file of the standard library, in a fixed order; third-party packages excluded."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [p for p in root.rglob("*.py") if "site-packages" not in p.parts
             and "dist-packages" not in p.parts]
    if not files:
        raise ConfigError(f"data.source=stdlib: no .py files under {root}")
    return sorted(files)


def expand_paths(patterns: List[str]) -> List[Path]:
    files: List[Path] = []
    for pattern in patterns:
        matched = sorted(glob.glob(pattern, recursive=True))
        if not matched:
            raise ConfigError(f"data.paths: {pattern!r} matches no file")
        files.extend(Path(m) for m in matched if Path(m).is_file())
    return files


def corpus_files(cfg: DataConfig) -> List[Path]:
    return stdlib_files() if cfg.source == "stdlib" else expand_paths(cfg.paths)


def _open_text(path: Path):
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8", errors="strict")
    return open(path, "r", encoding="utf-8", errors="strict")


def read_documents(path: Path, jsonl_text_field: str = "text") -> Iterator[str]:
    """The documents of one file: the whole file for text, one per line for JSONL.

    Unreadable input is skipped with a warning naming the file (and line): a bad file never stops
    a run, and the warning says what was lost.
    """
    is_jsonl = path.name.endswith((".jsonl", ".jsonl.gz"))
    try:
        with _open_text(path) as f:
            if not is_jsonl:
                text = f.read()
                if text.strip():
                    yield text
                return
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    text = json.loads(line)[jsonl_text_field]
                except (json.JSONDecodeError, KeyError, TypeError):
                    warnings.warn(f"{path}:{lineno}: no {jsonl_text_field!r} field; line skipped")
                    continue
                if isinstance(text, str) and text.strip():
                    yield text
    except (UnicodeDecodeError, OSError, EOFError) as e:
        warnings.warn(f"{path}: unreadable ({type(e).__name__}: {e}); rest of file skipped")
