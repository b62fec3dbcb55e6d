"""Numbers and tables as every report prints them: the bench, the leaderboard, the sweep comparison,
evaluate.py's class table and train.py's summary."""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path


def fmt(value, spec: str = ".4f", missing: str = "") -> str:
    """A number as the tables show it; `missing` for None and NaN (a value there was nothing to measure for)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return missing
    return format(value, spec)


def text_table(rows: Sequence[Sequence[str]], indent: str = "  ", right: bool = True) -> str:
    """Aligned plain text: the first column left, the others right (numbers) or left (right=False: text)."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join(
        indent
        + "  ".join(
            c.ljust(w) if i == 0 or not right else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))
        ).rstrip()
        for r in rows
    )


def markdown_table(rows: Sequence[dict[str, str]], columns: Sequence[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(r.get(c, "") for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_table(stem: Path, rows: Sequence[dict[str, str]], columns: Sequence[str]) -> str:
    """<stem>.csv and <stem>.md (a Markdown table, returned)."""
    with stem.with_suffix(".csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(columns), restval="")
        writer.writeheader()
        writer.writerows(rows)
    table = markdown_table(rows, columns)
    stem.with_suffix(".md").write_text(table)
    return table
