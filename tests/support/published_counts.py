"""What the small-count acceptance tests read: the person-count cells of published markdown tables
and CSVs, and the check that none of them shows a number from 1 to 20."""

from __future__ import annotations

import re
from collections.abc import Iterable

import polars as pl

COUNT_COLUMNS = ("n", "events", "n (events)", "count")
LABEL = re.compile(r"<=\d+")


def markdown_count_cells(markdown: str, columns: Iterable[str] = COUNT_COLUMNS) -> list[str]:
    """Every cell under a count-column header in every markdown table of `markdown`."""
    wanted, cells, header = set(columns), [], None
    for line in markdown.splitlines():
        if not line.startswith("|"):
            header = None
            continue
        row = [c.strip() for c in line.strip().strip("|").split("|")]
        if header is None:
            header = row
        elif not set(line) <= set("|-: "):
            cells += [cell for name, cell in zip(header, row) if name in wanted]
    return cells


def csv_count_cells(path, columns: Iterable[str] = ("n", "events")) -> list[str]:
    table = pl.read_csv(path, infer_schema=False)
    return [cell for c in columns if c in table.columns for cell in table[c].to_list()]


def small_numbers(cells: Iterable[str]) -> list[str]:
    """The cells that show a count from 1 to 20 (the suppression label itself aside)."""
    return [cell for cell in cells if any(1 <= int(v) <= 20 for v in re.findall(r"\d+", LABEL.sub("", cell)))]
