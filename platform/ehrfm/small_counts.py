"""The small-count rule for every human-facing output (reports, subgroup tables, the model card,
MLflow params and report files): person counts from 1 to the threshold are shown as `<=threshold`,
0 may be shown; a larger count hidden by complementary suppression is shown as `hidden`.

All of Us (and most biobank) dissemination rules forbid showing participant counts of 1-20, and
also any count that can be recovered by subtraction from what is shown (complementary
suppression): a subgroup's events when its non-events are small, and one suppressed cell of a
partition whose total is shown. The threshold is 20, or `EHRFM_SMALL_COUNT_THRESHOLD`.

Operator logs of row counts (preprocess/validate summaries, quarantine accounts) are about rows
and files, not people, and are not routed through this rule.
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Mapping, Sequence
from typing import Any

DEFAULT_THRESHOLD = 20
THRESHOLD_ENV = "EHRFM_SMALL_COUNT_THRESHOLD"
# report.json / metrics.json keys that hold person counts; (total, part) pairs suppress together
COUNT_KEYS = ("n", "n_positive", "n_test", "n_test_positive", "n_genotyped", "test_rows_already_begun")
COUNT_PAIRS = (("n", "n_positive"), ("n_test", "n_test_positive"))
HIDDEN = "hidden"  # a count above the threshold, hidden so that a small one cannot be subtracted out


def threshold() -> int:
    """The configured threshold (environment variable, else 20)."""
    value = os.environ.get(THRESHOLD_ENV)
    if value is None:
        return DEFAULT_THRESHOLD
    if not value.isdigit():
        raise ValueError(f"{THRESHOLD_ENV}={value!r}: expected a non-negative integer")
    return int(value)


def label(limit: int | None = None) -> str:
    """What a suppressed count reads as."""
    return f"<={threshold() if limit is None else limit}"


def _is_count(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def is_small(count: Any, limit: int | None = None) -> bool:
    """1 <= count <= threshold (published strings count as suppressed)."""
    if isinstance(count, str):
        return count.startswith("<=") or count == HIDDEN
    if not _is_count(count):
        return False
    return 0 < count <= (threshold() if limit is None else limit)


def show(count: Any, limit: int | None = None, hidden: bool = False) -> str:
    """A count for publication: the label when small, HIDDEN when `hidden` (complementary suppression)."""
    if isinstance(count, str):
        return count
    if not _is_count(count):
        return "n/a"
    if is_small(count, limit):
        return label(limit)
    return HIDDEN if hidden else str(int(count))


def binary_hidden(n: Any, events: Any, limit: int | None = None) -> tuple[bool, bool]:
    """(hide n, hide events) for a group of n persons with `events` events: events are hidden when
    they are small, or n is shown and the non-events (n - events) are small."""
    hide_n = is_small(n, limit)
    if not (_is_count(n) and _is_count(events)):
        return hide_n, is_small(events, limit)
    return hide_n, is_small(events, limit) or (not hide_n and is_small(n - events, limit))


def complement(counts: Sequence[Any], hidden: Sequence[bool]) -> list[bool]:
    """Hidden cells of a partition whose total is shown: one hidden cell alone would be the total
    minus the rest, so the smallest other nonzero cell is hidden with it."""
    hidden = list(hidden)
    if sum(hidden) == 1:
        candidates = [i for i, c in enumerate(counts) if not hidden[i] and _is_count(c) and c > 0]
        if candidates:
            hidden[min(candidates, key=lambda i: counts[i])] = True
    return hidden


def partition_hidden(
    n: Sequence[Any], events: Sequence[Any], limit: int | None = None
) -> tuple[list[bool], list[bool]]:
    """(hide n, hide events) per group of a partition of the persons (the levels of one attribute,
    the PRS deciles), whose overall n and events are shown elsewhere: primary suppression, the
    events/non-events pair, then the columns' complements, repeated until nothing changes."""
    hide_n = [is_small(v, limit) for v in n]
    hide_e = [binary_hidden(a, b, limit)[1] for a, b in zip(n, events)]
    non_events = [a - b if _is_count(a) and _is_count(b) else None for a, b in zip(n, events)]
    while True:
        before = (list(hide_n), list(hide_e))
        hide_n = complement(n, hide_n)
        hide_e = complement(events, hide_e)
        hide_non = complement(non_events, [a or b for a, b in zip(hide_n, hide_e)])
        hide_e = [e or (h and not a) for e, h, a in zip(hide_e, hide_non, hide_n)]
        if (hide_n, hide_e) == before:
            return hide_n, hide_e


def public_partition(cells: Mapping[str, Any], limit: int | None = None) -> dict[str, Any]:
    """The cells of a partition whose total is shown: small cells as the label, and one more
    (complementary) when a single hidden cell could be recovered by subtraction."""
    names = list(cells)
    counts = [cells[name] for name in names]
    hidden = complement(counts, [is_small(c, limit) for c in counts])
    return {name: show(c, limit, hidden=True) if h else c for name, c, h in zip(names, counts, hidden)}


def public_json(value: Any, limit: int | None = None) -> Any:
    """A copy of a report dict with every person count in COUNT_KEYS shown by the rule (pairs
    suppressed together); other values unchanged."""
    if isinstance(value, list):
        return [public_json(v, limit) for v in value]
    if not isinstance(value, Mapping):
        return value
    out = {k: public_json(v, limit) for k, v in value.items()}
    hidden: dict[str, bool] = {}
    for total, part in COUNT_PAIRS:
        if total in value and part in value:
            hidden[total], hidden[part] = binary_hidden(value[total], value[part], limit)
    for key in COUNT_KEYS:
        if key in value and _is_count(value[key]):
            out[key] = (
                show(value[key], limit, hidden.get(key, False))
                if is_small(value[key], limit) or hidden.get(key)
                else value[key]
            )
    return out
