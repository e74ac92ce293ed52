"""Vectorised conversion of raw OMOP columns (csv text or stored parquet types) to the spec types.

Each converter returns the typed array plus a boolean mask of cells that held something but could
not be converted (the validator turns those rows into `unparsable_date` / `unparsable_number`).
Everything runs on whole arrays with pyarrow.compute and numpy, because it runs inside Ray Data
`map_batches` on batches of ~100k rows.

Accepted text:
  numbers   integers (optionally written `12.0`), decimals, exponents; NaN/infinity are unparsable.
  dates     `YYYY-MM-DD`, `YYYYMMDD`, or a datetime (its date part is used).
  datetimes `YYYY-MM-DD[ T]HH:MM[:SS[.ffffff]]` with an optional `Z`/`+hh:mm` suffix (ignored:
            OMOP datetimes are wall-clock), or a date alone (midnight).
  Whitespace around values and runs of whitespace (including no-break spaces) inside them are
  normalised first. `NA`, `NULL` and `\\N` count as empty in typed columns.

Date columns of plain integers (stored as integers, or text where every cell is an integer) are
read per column (per batch) by `IntegerDates.mode`:
  auto             every cell has 8 digits -> YYYYMMDD (a cell with an impossible month/day is
                   unparsable); no cell has 8 digits and every cell, read as days since 1970,
                   falls in [1900-01-01, latest_day] (not all 0, a common placeholder) -> days
                   since 1970; anything else (a mix, all zeros, or values out of that range:
                   epoch seconds, spreadsheet serials for recent dates) is refused with
                   IntegerDateError, never guessed.
  days_since_1970  every cell is days since 1970 (outside 0001..9999 -> unparsable).
  yyyymmdd         every cell is YYYYMMDD (other cells unparsable).
A text column mixing ISO dates and integers is read cell by cell (8-digit cells as YYYYMMDD).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ehrfm.omop.spec import ColumnSpec

_NULL_TOKENS = pa.array(["", "na", "null", "\\n"])
_INT_TEXT = r"^[+-]?\d+(\.0*)?$"
_FLOAT_TEXT = r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$"
_DATETIME_TEXT = (
    r"^(?P<y>\d{4})-(?P<m>\d{2})-(?P<d>\d{2})"
    r"(?:[ T](?P<H>\d{2}):(?P<M>\d{2})(?::(?P<S>\d{2})(?:\.(?P<f>\d+))?)?(?:Z|[+-]\d{2}:?\d{2})?)?$"
)
_SAFE_INT_DIGITS = 18  # up to 18 digits always fit in int64; longer ones are checked one by one
_US_PER_DAY = 86_400_000_000


INTEGER_DATE_MODES = ("auto", "days_since_1970", "yyyymmdd")
_FIRST_DETECTED_DAY = -25_567  # 1900-01-01: auto-detected days since 1970 start here
_INTEGER_TEXT = r"^[+-]?\d+$"


class ColumnTypeError(TypeError):
    """A stored column type that cannot hold the spec type (e.g. bool where a date belongs)."""


class IntegerDateError(ValueError):
    """A date column of plain integers whose form cannot be decided; `cells` integer cells."""

    def __init__(self, cells: int) -> None:
        super().__init__(f"{cells} integer cells are neither all YYYYMMDD nor all days since 1970")
        self.cells = cells


@dataclass(frozen=True)
class IntegerDates:
    """How date columns of plain integers are read (see the module docstring)."""

    mode: str = "auto"
    latest_day: int | None = None  # auto-detection upper bound (days since 1970); None = today

    def detection_bounds(self) -> tuple[int, int]:
        latest = self.latest_day
        if latest is None:
            latest = int(np.datetime64("today", "D").astype(np.int64))
        return _FIRST_DETECTED_DAY, latest


def _as_array(values: pa.Array | pa.ChunkedArray) -> pa.Array:
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks() if values.num_chunks != 1 else values.chunk(0)
    if pa.types.is_dictionary(values.type):
        values = values.dictionary_decode()
    return values


def _is_text(dtype: pa.DataType) -> bool:
    return pa.types.is_string(dtype) or pa.types.is_large_string(dtype) or pa.types.is_string_view(dtype)


def normalise_text(values: pa.Array) -> pa.Array:
    """Trimmed text with inner whitespace runs collapsed; empty and NA/NULL tokens become null."""
    text = pc.utf8_trim_whitespace(pc.cast(values, pa.string()))
    text = pc.replace_substring_regex(text, pattern=r"[\s\x{00A0}\x{2007}\x{202F}]+", replacement=" ")
    is_null_token = pc.is_in(pc.utf8_lower(text), value_set=_NULL_TOKENS)
    return pc.if_else(is_null_token, pa.scalar(None, pa.string()), text)


def _mask(values: pa.Array) -> np.ndarray:
    """Boolean array as numpy with nulls as False."""
    return pc.fill_null(values, False).to_numpy(zero_copy_only=False).astype(bool)


def _present(values: pa.Array) -> np.ndarray:
    return _mask(pc.is_valid(values))


def _ints_from_text(text: pa.Array) -> tuple[pa.Array, np.ndarray]:
    matched = _mask(pc.match_substring_regex(text, _INT_TEXT))
    digits = pc.replace_substring_regex(text, pattern=r"^\+|\.0*$", replacement="")
    short = matched & _mask(pc.less_equal(pc.utf8_length(pc.utf8_ltrim(digits, "-")), _SAFE_INT_DIGITS))
    out = pc.cast(pc.if_else(pa.array(short), digits, pa.scalar(None, pa.string())), pa.int64())
    long_rows = np.flatnonzero(matched & ~short)
    bad = _present(text) & ~matched
    if long_rows.size:  # rare: 19+ digit ids; check the int64 range one value at a time
        values = pc.fill_null(out, 0).to_numpy(zero_copy_only=False).copy()
        mask = ~_present(out)
        for row in long_rows:
            number = int(digits[row].as_py())
            if -(2**63) <= number < 2**63:
                values[row], mask[row] = number, False
            else:
                bad[row] = True
        out = pa.array(values, type=pa.int64(), mask=mask)
    return out, bad


def _floats_from_text(text: pa.Array) -> tuple[pa.Array, np.ndarray]:
    matched = _mask(pc.match_substring_regex(text, _FLOAT_TEXT))
    out = pc.cast(pc.if_else(pa.array(matched), text, pa.scalar(None, pa.string())), pa.float64())
    return _drop_nonfinite(out, bad=_present(text) & ~matched)


def _drop_nonfinite(values: pa.Array, bad: np.ndarray) -> tuple[pa.Array, np.ndarray]:
    nonfinite = _present(values) & ~_mask(pc.is_finite(values))
    if nonfinite.any():
        values = pc.if_else(pa.array(nonfinite), pa.scalar(None, pa.float64()), values)
    return values, bad | nonfinite


def _field_ints(parts: pa.StructArray, name: str, default: str) -> np.ndarray:
    field = pc.struct_field(parts, name)
    field = pc.if_else(pc.equal(field, ""), default, field)
    return pc.cast(pc.fill_null(field, default), pa.int64()).to_numpy(zero_copy_only=False)


def days_from_ymd(year: np.ndarray, month: np.ndarray, day: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(valid mask, days since 1970-01-01) for calendar parts; 2021-02-30 or month 13 is invalid."""
    valid = (year >= 1) & (year <= 9999) & (month >= 1) & (month <= 12)
    month_index = np.where(valid, (year - 1970) * 12 + (month - 1), 0)
    first_day = month_index.astype("datetime64[M]").astype("datetime64[D]").astype(np.int64)
    next_first = (month_index + 1).astype("datetime64[M]").astype("datetime64[D]").astype(np.int64)
    valid &= (day >= 1) & (day <= next_first - first_day)
    return valid, np.where(valid, first_day + day - 1, 0)


def _calendar_from_text(text: pa.Array, with_time: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(valid mask, days since 1970-01-01, microseconds into the day) for date/datetime text."""
    text = pc.replace_substring_regex(text, pattern=r"^(\d{4})(\d{2})(\d{2})$", replacement=r"\1-\2-\3")
    parts = pc.extract_regex(text, _DATETIME_TEXT)
    year, month, day = (_field_ints(parts, key, "1") for key in ("y", "m", "d"))
    valid, days = days_from_ymd(year, month, day)
    valid &= _present(parts)
    micros = np.zeros(len(text), dtype=np.int64)
    if with_time:
        hour, minute, second = (_field_ints(parts, key, "0") for key in ("H", "M", "S"))
        valid &= (hour < 24) & (minute < 60) & (second < 60)
        fraction = pc.fill_null(pc.utf8_slice_codeunits(pc.struct_field(parts, "f"), 0, 6), "")
        scale = 10 ** (6 - pc.utf8_length(fraction).to_numpy(zero_copy_only=False).astype(np.int64))
        frac_digits = pc.if_else(pc.equal(fraction, ""), "0", fraction)
        frac_us = pc.cast(frac_digits, pa.int64()).to_numpy(zero_copy_only=False) * scale
        micros = ((hour * 60 + minute) * 60 + second) * 1_000_000 + frac_us
    return valid, days, micros


def _dates_from_text(text: pa.Array) -> tuple[pa.Array, np.ndarray]:
    valid, days, _ = _calendar_from_text(text, with_time=False)
    out = pa.array(np.where(valid, days, 0).astype(np.int32), type=pa.date32(), mask=~valid)
    return out, _present(text) & ~valid


def _datetimes_from_text(text: pa.Array) -> tuple[pa.Array, np.ndarray]:
    valid, days, micros = _calendar_from_text(text, with_time=True)
    stamps = np.where(valid, days * _US_PER_DAY + micros, 0)
    out = pa.array(stamps, type=pa.timestamp("us"), mask=~valid)
    return out, _present(text) & ~valid


_TEXT_PARSERS = {
    "int": _ints_from_text,
    "float": _floats_from_text,
    "date": _dates_from_text,
    "datetime": _datetimes_from_text,
}


def _wall_clock(values: pa.Array) -> pa.Array:
    """Timestamps with a time zone -> naive local wall-clock time; naive ones unchanged."""
    if pa.types.is_timestamp(values.type) and values.type.tz is not None:
        return pc.local_timestamp(values)
    return values


def _int_from_stored(values: pa.Array) -> tuple[pa.Array, np.ndarray]:
    dtype = values.type
    if pa.types.is_integer(dtype):
        if pa.types.is_uint64(dtype):
            too_big = _mask(pc.greater(values, np.iinfo(np.int64).max))
            values = pc.if_else(pa.array(too_big), pa.scalar(None, dtype), values)
            return pc.cast(values, pa.int64()), too_big
        return pc.cast(values, pa.int64()), np.zeros(len(values), dtype=bool)
    if pa.types.is_floating(dtype):  # e.g. ids exported as DOUBLE: whole finite values only
        numbers = pc.fill_null(pc.cast(values, pa.float64()), 0.0).to_numpy(zero_copy_only=False)
        with np.errstate(invalid="ignore"):
            whole = np.isfinite(numbers) & (np.floor(numbers) == numbers) & (np.abs(numbers) < 2.0**63)
        bad = _present(values) & ~whole
        out = pa.array(np.where(whole, numbers, 0).astype(np.int64), type=pa.int64(), mask=~(whole & _present(values)))
        return out, bad
    if pa.types.is_decimal(dtype):  # through text keeps large decimals exact and rejects fractions
        return _ints_from_text(normalise_text(values))
    raise ColumnTypeError(str(dtype))


def _float_from_stored(values: pa.Array) -> tuple[pa.Array, np.ndarray]:
    dtype = values.type
    if pa.types.is_decimal(dtype):  # via text: arrow's direct decimal->double cast is not correctly rounded
        return _floats_from_text(pc.cast(values, pa.string()))
    if pa.types.is_integer(dtype) or pa.types.is_floating(dtype):
        return _drop_nonfinite(pc.cast(values, pa.float64()), np.zeros(len(values), dtype=bool))
    raise ColumnTypeError(str(dtype))


def _date_from_stored(values: pa.Array) -> tuple[pa.Array, np.ndarray]:
    dtype = values.type
    if pa.types.is_date(dtype) or pa.types.is_timestamp(dtype):
        return pc.cast(_wall_clock(values), pa.date32()), np.zeros(len(values), dtype=bool)
    raise ColumnTypeError(str(dtype))


def _datetime_from_stored(values: pa.Array) -> tuple[pa.Array, np.ndarray]:
    dtype = values.type
    if pa.types.is_timestamp(dtype):
        return pc.cast(_wall_clock(values), pa.timestamp("us"), safe=False), np.zeros(len(values), dtype=bool)
    if pa.types.is_date(dtype):
        return pc.cast(pc.cast(values, pa.date32()), pa.timestamp("us")), np.zeros(len(values), dtype=bool)
    raise ColumnTypeError(str(dtype))


_STORED_PARSERS = {
    "int": _int_from_stored,
    "float": _float_from_stored,
    "date": _date_from_stored,
    "datetime": _datetime_from_stored,
}


def to_text(values: pa.Array | pa.ChunkedArray) -> pa.Array:
    """Any column as strings (for quarantine files and string-typed spec columns)."""
    values = _as_array(values)
    if _is_text(values.type):
        return pc.cast(values, pa.string())
    try:
        return pc.cast(values, pa.string())
    except (pa.ArrowNotImplementedError, pa.ArrowInvalid):
        return pa.array([None if v is None else str(v) for v in values.to_pylist()], type=pa.string())


def _dates_from_ints(
    ints: np.ndarray, present: np.ndarray, with_time: bool, rules: IntegerDates
) -> tuple[pa.Array, np.ndarray]:
    """A date/datetime column from plain integers, read as YYYYMMDD or days since 1970 (module docstring)."""
    magnitude = np.abs(ints)
    eight = present & (magnitude >= 10_000_000) & (magnitude <= 99_999_999)
    mode = rules.mode
    if mode == "auto":
        low, high = rules.detection_bounds()
        if not (present & ~eight).any():
            mode = "yyyymmdd"
        elif not eight.any() and (ints[present] != 0).any() and not (present & ((ints < low) | (ints > high))).any():
            mode = "days_since_1970"
        else:
            raise IntegerDateError(int(present.sum()))
    if mode == "yyyymmdd":
        valid, days = days_from_ymd(ints // 10_000, ints // 100 % 100, ints % 100)
        valid &= present & eight & (ints > 0)
    else:
        valid = present & (ints >= _FIRST_DAY) & (ints <= _LAST_DAY)
        days = np.where(valid, ints, 0)
    if with_time:
        out = pa.array(np.where(valid, days * _US_PER_DAY, 0), type=pa.timestamp("us"), mask=~valid)
    else:
        out = pa.array(np.where(valid, days, 0).astype(np.int32), type=pa.date32(), mask=~valid)
    return out, present & ~valid


def _integer_cells(values: pa.Array) -> tuple[np.ndarray, np.ndarray] | None:
    """(int64 values, present mask) when every non-empty cell is a plain integer, else None."""
    if pa.types.is_integer(values.type):
        present = _present(values)
        return pc.fill_null(pc.cast(values, pa.int64(), safe=False), 0).to_numpy(zero_copy_only=False), present
    if not _is_text(values.type):
        return None
    text = normalise_text(values)
    present = _present(text)
    if not present.any() or not _mask(pc.match_substring_regex(text, _INTEGER_TEXT))[present].all():
        return None
    signed = pc.replace_substring_regex(text, pattern=r"^\+", replacement="")
    if _mask(pc.greater(pc.utf8_length(pc.utf8_ltrim(signed, "-")), _SAFE_INT_DIGITS)).any():
        return None  # far beyond any date: the text parser marks them unparsable
    return pc.fill_null(pc.cast(signed, pa.int64()), 0).to_numpy(zero_copy_only=False), present


def convert_column(
    values: pa.Array | pa.ChunkedArray, column: ColumnSpec, integer_dates: IntegerDates | None = None
) -> tuple[pa.Array, np.ndarray]:
    """(values in the spec type, mask of non-empty cells that could not be converted).

    Raises ColumnTypeError when the stored type can never hold the spec type, IntegerDateError when
    a date column of plain integers has no single readable form (see the module docstring).
    """
    values = _as_array(values)
    if pa.types.is_null(values.type):
        return pa.nulls(len(values), column.arrow_type), np.zeros(len(values), dtype=bool)
    dated = column.kind in ("date", "datetime")
    if dated and pa.types.is_integer(values.type):
        return _dates_from_ints(*_integer_cells(values), column.kind == "datetime", integer_dates or IntegerDates())
    if column.kind == "string":
        if not (
            _is_text(values.type)
            or pa.types.is_integer(values.type)
            or pa.types.is_floating(values.type)
            or pa.types.is_decimal(values.type)
            or pa.types.is_temporal(values.type)
        ):
            raise ColumnTypeError(str(values.type))
        return to_text(values), np.zeros(len(values), dtype=bool)
    if _is_text(values.type):
        clean = _strict_cast(values, column)
        if clean is not None:
            return clean
        cells = _integer_cells(values) if dated else None
        if cells is not None:
            return _dates_from_ints(*cells, column.kind == "datetime", integer_dates or IntegerDates())
        return _TEXT_PARSERS[column.kind](normalise_text(values))
    return _STORED_PARSERS[column.kind](values)


_FIRST_DAY, _LAST_DAY = -719_162, 2_932_896  # 0001-01-01 and 9999-12-31 as days since 1970


def _strict_cast(text: pa.Array, column: ColumnSpec) -> tuple[pa.Array, np.ndarray] | None:
    """Fast path for clean columns: arrow's strict cast, or None when any cell needs the full parser.

    Arrow accepts exactly canonical cells (`-12`, `2021-02-28`, `2021-02-28 10:00:00`) and rejects
    padding, tokens, `+12`, `12.0` and impossible dates, which then go through the regex parsers.
    """
    try:
        out = pc.cast(text, column.arrow_type)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return None
    no_bad = np.zeros(len(text), dtype=bool)
    if column.kind == "float":
        return _drop_nonfinite(out, no_bad)
    if column.kind in ("date", "datetime") and out.null_count < len(out):
        days = pc.cast(out, pa.date32()) if column.kind == "datetime" else out
        low, high = (v.as_py() for v in pc.min_max(pc.cast(days, pa.int32())).values())
        if low < _FIRST_DAY or high > _LAST_DAY:
            return None
    return out, no_bad
