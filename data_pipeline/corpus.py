"""Documents from real text: the embedded default corpus (the running interpreter's standard
library source) or local .txt / .jsonl files (optionally .gz).

Bad input never stops a run: an empty file, a line that is not UTF-8, a JSONL line without the
text field are skipped and counted, and reported naming the file and line: by default as a warning
each (``warn``); ``llada prepare`` collects them into one summary line and a list beside its
manifest.
"""

from __future__ import annotations

import glob
import gzip
import json
import sys
import sysconfig
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, List, Optional

from data_pipeline.errors import DataConfigError

STDLIB = "stdlib"  # the input name of the embedded default corpus
STDLIB_SFT = "stdlib-sft"  # with --sft: pairs made from its functions (prepare_sft.py)


WARNINGS_PER_KIND = 20  # per process; the counters keep counting after that
_warned: Counter = Counter()


def warn(kind: str, msg: str) -> None:
    """One line on stderr naming the skipped input (file:line, or shard and sample key)."""
    _warned[kind] += 1
    if _warned[kind] <= WARNINGS_PER_KIND:
        print(f"llada: warning: {msg}", file=sys.stderr, flush=True)
    if _warned[kind] == WARNINGS_PER_KIND:
        print(f"llada: warning: further {kind} warnings are not shown (they are still counted)",
              file=sys.stderr, flush=True)


def stdlib_files() -> List[Path]:
    """Every .py file of the standard library, in a fixed order; third-party packages excluded."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [p for p in root.rglob("*.py") if "site-packages" not in p.parts
             and "dist-packages" not in p.parts]
    if not files:
        raise DataConfigError(f"prepare.inputs: stdlib: no .py files under {root}")
    return sorted(files)


def expand_inputs(patterns: List[str], key: str = "prepare.inputs", sft: bool = False
                  ) -> List[Path]:
    """Globs (recursive ``**`` allowed) and the word ``stdlib`` -> files, sorted per pattern.
    ``sft``: the inputs of SFT shards: JSONL files only (conversations), and ``stdlib-sft`` for
    the standard library's .py files, whose functions prepare turns into pairs."""
    files: List[Path] = []
    for pattern in patterns:
        if pattern == (STDLIB_SFT if sft else STDLIB):
            files.extend(stdlib_files())
            continue
        if pattern in (STDLIB, STDLIB_SFT):
            raise DataConfigError(f"{key}: {pattern} is an input of " + (
                "pretraining shards; SFT shards are made from stdlib-sft" if sft else
                "SFT shards (--sft); pretraining shards are made from stdlib"))
        matched = [Path(m) for m in sorted(glob.glob(pattern, recursive=True)) if Path(m).is_file()]
        if not matched:
            raise DataConfigError(f"{key}: {pattern!r} matches no file")
        other = [m for m in matched if sft and not is_jsonl(m)]
        if other:
            raise DataConfigError(f"{key}: {other[0]}: SFT shards are made from JSONL "
                                  "conversations (.jsonl, .jsonl.gz)")
        files.extend(matched)
    return list(dict.fromkeys(files))  # a file named by two globs is read once


def is_jsonl(path: Path) -> bool:
    return path.name.endswith((".jsonl", ".jsonl.gz"))


def _binary_lines(path: Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


@dataclass(frozen=True)
class Piece:
    """An input file whole, or (an uncompressed one, which can seek) the lines that begin in
    its bytes [start, end): a line belongs to the piece its first byte is in."""

    path: Path
    start: int = 0
    end: Optional[int] = None  # None: to the end of the file

    @property
    def whole(self) -> bool:
        return self.start == 0 and self.end is None

    def __str__(self) -> str:
        end = "" if self.end is None else self.end
        return str(self.path) if self.whole else f"{self.path} (bytes {self.start}-{end})"


# how a skipped input is reported: (kind, one line naming it); None: counted only
Report = Optional[Callable[[str, str], None]]


def skipper(counts: Counter, report: Report):
    """Count a skipped input of some kind and report it."""
    def skip(kind: str, msg: str) -> None:
        counts[kind] += 1
        if report is not None:
            report(kind, msg)
    return skip


def _raw_lines(piece: Piece) -> Iterator[tuple[str, bytes]]:
    """(where, bytes) of each line of a piece; ``where`` names the file and line (for a piece
    cut from a file: the line's byte offset)."""
    with _binary_lines(piece.path) as f:
        if piece.whole:
            for lineno, raw in enumerate(f, 1):
                yield f"{piece.path}:{lineno}", raw
            return
        pos = piece.start
        if pos > 0:  # the line running into `start` belongs to the piece before
            f.seek(pos - 1)
            pos += len(f.readline()) - 1
        while piece.end is None or pos < piece.end:
            raw = f.readline()
            if not raw:
                return
            yield f"{piece.path}: line at byte {pos}", raw
            pos += len(raw)


def read_lines(source: Path | Piece, counts: Counter, report: Report = warn
               ) -> Iterator[tuple[str, str]]:
    """(where, text) of every UTF-8 line; other lines are skipped and reported."""
    piece = source if isinstance(source, Piece) else Piece(Path(source))
    skip = skipper(counts, report)

    try:
        for where, raw in _raw_lines(piece):
            try:
                yield where, raw.decode("utf-8")
            except UnicodeDecodeError as e:
                skip("bad_lines", f"{where}: not UTF-8 ({e.reason} at byte {e.start}); line "
                     "skipped")
    except (OSError, EOFError, zlib.error) as e:  # a truncated/corrupt .gz, a file removed
        skip("unreadable_files", f"{piece.path}: unreadable ({type(e).__name__}: {e}); rest of "
             "file skipped")


def _whole_text(piece: Piece) -> str | None:
    try:
        if piece.whole:
            with _binary_lines(piece.path) as f:
                return f.read().decode("utf-8")
        return b"".join(raw for _, raw in _raw_lines(piece)).decode("utf-8")
    except (UnicodeDecodeError, OSError, EOFError, zlib.error):
        return None


def read_documents(source: Path | Piece, text_field: str = "text", counts: Counter | None = None,
                   report: Report = warn) -> Iterator[str]:
    """The documents of one file (or piece of one): the whole text for text, one per line for
    JSONL."""
    piece = source if isinstance(source, Piece) else Piece(Path(source))
    path = piece.path
    counts = Counter() if counts is None else counts
    skip = skipper(counts, report)

    found = False
    if is_jsonl(path):
        for where, line in read_lines(piece, counts, report):
            if not line.strip():
                continue
            try:
                text = json.loads(line)[text_field]
                if not isinstance(text, str):
                    raise TypeError
            except (json.JSONDecodeError, KeyError, TypeError, IndexError):
                skip("bad_lines", f"{where}: not a JSON object with a string "
                     f"{text_field!r} field; line skipped")
                continue
            if text.strip():
                found = True
                yield text
    else:
        text = _whole_text(piece)  # fast path: one decode of the whole file
        if text is None:  # not UTF-8 throughout (or unreadable): line by line, bad lines named
            text = "".join(line for _, line in read_lines(piece, counts, report))
        if text.strip():
            found = True
            yield text
    if not found:
        skip("empty_files", f"{piece}: no text (empty file); skipped")
