"""The simulator's clock: days since 1970-01-01 as float64, and the quarter-year hazard grid.

Hazards are piecewise constant on a global calendar grid of quarter years (1948 .. 2025), with
covariates taken at each step's midpoint. The simulator and the oracle both evaluate hazards
through `step_midpoint`, so the oracle integrates exactly the hazards that drew the onsets.
"""

from __future__ import annotations

import numpy as np

DAYS_PER_YEAR = 365.25
US_PER_DAY = 86_400_000_000


def day_number(iso_date: str) -> int:
    """Days since 1970-01-01 of an ISO date."""
    return int(np.datetime64(iso_date, "D").astype(np.int64))


GRID_START = float(day_number("1948-01-01"))
SIM_END = float(day_number("2025-01-01"))  # data cut-off: nothing happens on or after this day
STEP_DAYS = DAYS_PER_YEAR / 4.0
N_STEPS = int(np.ceil((SIM_END - GRID_START) / STEP_DAYS))
STEP_START = GRID_START + STEP_DAYS * np.arange(N_STEPS)
STEP_END = STEP_START + STEP_DAYS
STEP_MID = STEP_START + STEP_DAYS / 2.0


def step_midpoint(days: np.ndarray) -> np.ndarray:
    """Midpoint of the grid step holding each time (times outside the grid are clamped)."""
    step = np.clip(np.floor((np.asarray(days, dtype=np.float64) - GRID_START) / STEP_DAYS), 0, N_STEPS - 1)
    return GRID_START + (step + 0.5) * STEP_DAYS


def to_datetime64(days: np.ndarray, unit: str = "us") -> np.ndarray:
    """Float days -> numpy datetime64 (NaT where not finite)."""
    days = np.asarray(days, dtype=np.float64)
    per_unit = {"us": US_PER_DAY, "ms": US_PER_DAY // 1000, "s": 86_400, "D": 1}[unit]
    finite = np.isfinite(days)
    ticks = np.where(finite, np.round(np.where(finite, days, 0.0) * per_unit), 0).astype(np.int64)
    out = ticks.astype(f"datetime64[{unit}]")
    out[~finite] = np.datetime64("NaT")
    return out


def from_datetime64(values: np.ndarray) -> np.ndarray:
    """numpy datetime64 (any unit) -> float days (NaN for NaT)."""
    values = np.asarray(values)
    if values.dtype.kind != "M":
        values = values.astype("datetime64[us]")
    as_us = values.astype("datetime64[us]")
    out = as_us.astype(np.int64).astype(np.float64) / US_PER_DAY
    out[np.isnat(as_us)] = np.nan
    return out
