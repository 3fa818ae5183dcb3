"""benchmarks/RESULTS.md: one section per benchmark, one table row per run."""

from __future__ import annotations

import datetime
import os
import platform
from pathlib import Path
from typing import List

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
PREAMBLE = ("# Benchmark results\n\nEach row: one run; every ratio compares against a reference "
            "measured in the same run (the machines are shared and noisy).\n")


def machine() -> str:
    import torch
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, CPU"


def today() -> str:
    return datetime.date.today().isoformat()


def record(section: str, intro: str, header: List[str], rows: List[List[str]]) -> None:
    """Print the table and append its rows to the section's table (created when missing)."""
    head = "| " + " | ".join(header) + " |\n|" + "---|" * len(header) + "\n"
    lines = "".join("| " + " | ".join(r) + " |\n" for r in rows)
    print(head + lines, end="")
    text = RESULTS.read_text() if RESULTS.exists() else PREAMBLE
    title = f"## {section}\n"
    if title not in text:
        text = text.rstrip("\n") + f"\n\n{title}\n{intro}\n\n{head}"
        text += lines
    else:
        start = text.index(title)
        nxt = text.find("\n## ", start + len(title))
        end = len(text) if nxt < 0 else nxt + 1
        body = text[start:end].rstrip("\n") + "\n" + lines
        text = text[:start] + body + ("\n" + text[end:] if nxt >= 0 else "")
    RESULTS.write_text(text)
