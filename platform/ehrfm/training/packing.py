"""Packed training windows: several persons' windows laid into rows of one fixed length.

A person's window (cut by `ehrfm.training.windows` exactly as in the unpacked batch: w tokens, w - 1
(input, target) pairs) becomes one contiguous segment of `prefix_length + w - 1` positions: first the
prefix slots where the model puts that person's PRS soft tokens, then the inputs. Segments go into
rows of `prefix_length + context` positions by first-fit-decreasing bin packing, so at a median
timeline far shorter than the context most positions hold real tokens instead of padding.

Packing is a pure, deterministic function of the batch (ties broken by the person's order), which
keeps resume exact: the same Ray batch gives the same packed tensors. Numpy only.
"""

from __future__ import annotations

import numpy as np

from ehrfm.constants import PAD_ID

PACKED_KEYS = ("tokens", "targets", "ages", "segment", "positions", "prefix_slot")


def first_fit_decreasing(sizes: np.ndarray, capacity: int) -> tuple[np.ndarray, np.ndarray, int]:
    """(row, offset) of each item and the number of rows: items by decreasing size (ties: the earlier
    item first), each into the first row with room. Items of size 0 are not placed (row -1)."""
    sizes = np.asarray(sizes, dtype=np.int64)
    if len(sizes) and (sizes.max() > capacity or sizes.min() < 0):
        raise ValueError(f"item sizes must be in [0, {capacity}], got {sizes.min()}..{sizes.max()}")
    rows = np.full(len(sizes), -1, dtype=np.int64)
    offsets = np.zeros(len(sizes), dtype=np.int64)
    free = np.empty(len(sizes), dtype=np.int64)  # room left in each open row (at most one row per item)
    used = 0
    for item in np.argsort(-sizes, kind="stable"):
        size = sizes[item]
        if size == 0:
            continue
        fits = np.flatnonzero(free[:used] >= size)
        row = int(fits[0]) if len(fits) else used
        if row == used:
            free[used] = capacity
            used += 1
        rows[item], offsets[item] = row, capacity - free[row]
        free[row] -= size
    return rows, offsets, used


def pack_windows(
    token_rows: np.ndarray, age_rows: np.ndarray, window_lengths: np.ndarray, prefix_length: int, context: int
) -> dict[str, np.ndarray]:
    """Unpacked windows -> the packed arrays of the packed-batch interface (rows of prefix + context).

    token_rows / age_rows: [N, context + 1] windows, right-padded; window_lengths: [N] real tokens w.
    Returns tokens/targets (PAD at prefix slots and padding), ages (0 there), segment (person index,
    -1 at padding), positions (rotary position inside the segment, as the unpacked model numbers
    them), prefix_slot (j at the j-th prefix slot, else -1); all [R, prefix + context].
    """
    persons = len(window_lengths)
    inputs = np.clip(np.asarray(window_lengths, dtype=np.int64) - 1, 0, context)
    sizes = np.where(inputs > 0, prefix_length + inputs, 0)  # a window with no target adds nothing
    length = prefix_length + context
    rows, offsets, count = first_fit_decreasing(sizes, length)
    person = np.repeat(np.arange(persons), sizes)
    local = np.arange(int(sizes.sum())) - np.repeat(np.cumsum(sizes) - sizes, sizes)  # position in segment
    row, col = rows[person], offsets[person] + local
    event = local - prefix_length  # index into the person's window; < 0 at prefix slots
    is_event = event >= 0
    source = np.maximum(event, 0)
    out = {
        "tokens": np.full((count, length), PAD_ID, dtype=np.int64),
        "targets": np.full((count, length), PAD_ID, dtype=np.int64),
        "ages": np.zeros((count, length), dtype=np.int32),
        "segment": np.full((count, length), -1, dtype=np.int64),
        "positions": np.zeros((count, length), dtype=np.int64),
        "prefix_slot": np.full((count, length), -1, dtype=np.int64),
    }
    out["tokens"][row, col] = np.where(is_event, token_rows[person, source], PAD_ID)
    out["targets"][row, col] = np.where(is_event, token_rows[person, source + 1], PAD_ID)
    out["ages"][row, col] = np.where(is_event, age_rows[person, source], 0)
    out["segment"][row, col] = person
    out["positions"][row, col] = local
    out["prefix_slot"][row, col] = np.where(is_event, -1, local)
    return out
