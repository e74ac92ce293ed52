"""PRS readers (pgsc_calc aggregated scores, plink2 `.sscore`, wide tables) and their validation.

The readers keep every row of the file, duplicates included, and remember which cells the file
actually held (`present`), so that `validate_prs` can report each problem instead of a reader
silently resolving it. `validate_prs` then maps samples to persons and decides, with a count per
reason, which samples are excluded:
  duplicate_sample_id  a later row for a sample id already seen (the first row is kept)
  unmapped_sample      the sample id is not in the sample map
  unknown_person_id    the mapped person is not in the person table
  duplicate_person_id  a later sample mapped to a person who already has one
  no_scores            not a single finite score
Problems that do not exclude a sample are counted too: non-finite values (NaN/inf, kept as
missing), unparsable values, and samples whose PGS set is incomplete (missing = NaN).

A pgsc_calc file whose chunks were scored with different scoring files is refused, not counted:
its samplesets (when several are read) must hold the same PGS ids, and no two samples may hold
score sets where each has a PGS the other lacks (a sample lacking some rows is only incomplete).
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

FORMATS = ("pgsc_calc", "sscore", "wide")
EXCLUSION_REASONS = ("duplicate_sample_id", "unmapped_sample", "unknown_person_id", "duplicate_person_id", "no_scores")
_NUMBER_TEXT = r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$"
_NONFINITE_TOKENS = pa.array(["nan", "+nan", "-nan", "inf", "+inf", "-inf", "infinity", "+infinity", "-infinity"])
_SSCORE_NON_SCORES = {"NAMED_ALLELE_DOSAGE_SUM"}
_ID_COLUMNS = ("sample_id", "iid")
MATCH_REPORT = "match_report.json"  # `ehrfm score_prs` writes it beside its scores, with target_build


class PrsFormatError(ValueError):
    """A PRS file that cannot be read: names the file, column and counts, never values."""


@dataclass
class PRSScores:
    """Scores of n samples for K PGS. `values` NaN = missing; `present`: cells where the file held a
    number (NaN and infinity included; absent cells and unparsable text are not present)."""

    sample_ids: np.ndarray  # str [n]
    pgs_ids: list[str]
    values: np.ndarray  # float32 [n, K]
    present: np.ndarray | None = None  # bool [n, K]; None = every cell present
    person_ids: np.ndarray | None = None  # int64 [n], set by validate_prs
    source: str = ""  # file name the scores came from
    fmt: str = ""
    unparsable_values: int = 0  # cells whose text was not a number (stored as NaN)

    def __post_init__(self) -> None:
        self.sample_ids = np.asarray(self.sample_ids, dtype=str)
        self.values = np.asarray(self.values, dtype=np.float32).reshape(len(self.sample_ids), len(self.pgs_ids))
        if self.present is None:
            self.present = np.ones(self.values.shape, dtype=bool)

    def __len__(self) -> int:
        return len(self.sample_ids)


# ---- text helpers -------------------------------------------------------------------------------
def _open_text(path: Path) -> io.TextIOBase:
    raw = path.open("rb")
    if path.name.lower().endswith(".gz"):
        raw = gzip.GzipFile(fileobj=raw)  # type: ignore[assignment]
    return io.TextIOWrapper(raw, encoding="utf-8-sig", newline="")


def _first_line(path: Path) -> str:
    with _open_text(path) as handle:
        return handle.readline().rstrip("\r\n")


def _read_text_table(path: Path) -> pa.Table:
    """A whitespace/tab/comma separated text table with a header, every column as strings."""
    header = _first_line(path)
    if not header.strip():
        raise PrsFormatError(f"{path.name}: empty file (no header line)")
    delimiter = "\t" if "\t" in header else ("," if "," in header else " ")
    names = next(csv.reader(io.StringIO(header), delimiter=delimiter, skipinitialspace=delimiter == " "))
    names = [n.strip().lstrip("#") for n in names if n.strip()]
    bad_lines = 0

    def count_bad(_row: pacsv.InvalidRow) -> str:
        nonlocal bad_lines
        bad_lines += 1
        return "skip"

    with _open_text(path) as handle:
        data = handle.read().encode("utf-8")
    table = pacsv.read_csv(
        io.BytesIO(data),
        read_options=pacsv.ReadOptions(column_names=names, skip_rows=1),
        parse_options=pacsv.ParseOptions(delimiter=delimiter, invalid_row_handler=count_bad, ignore_empty_lines=True),
        convert_options=pacsv.ConvertOptions(
            column_types={n: pa.string() for n in names}, strings_can_be_null=True, null_values=[""]
        ),
    )
    if bad_lines:
        raise PrsFormatError(f"{path.name}: {bad_lines} line(s) do not have the {len(names)} header fields")
    return table


def _parse_numbers(values: pa.Array | pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray, int]:
    """(float64 values, NaN where missing/unparsable; mask of cells holding a number; unparsable count).

    NaN and infinity count as numbers (present, non-finite); unparsable text counts as missing.
    """
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    if not (pa.types.is_string(values.type) or pa.types.is_large_string(values.type)):
        if not (
            pa.types.is_integer(values.type)
            or pa.types.is_floating(values.type)
            or pa.types.is_decimal(values.type)
            or pa.types.is_null(values.type)
        ):
            raise TypeError(str(values.type))
        present = values.is_valid().to_numpy(zero_copy_only=False)
        numbers = pc.fill_null(pc.cast(values, pa.float64()), np.nan).to_numpy(zero_copy_only=False)
        return numbers, present, 0
    text = pc.utf8_trim_whitespace(pc.cast(values, pa.string()))
    text = pc.if_else(pc.equal(text, ""), pa.scalar(None, pa.string()), text)
    present = text.is_valid().to_numpy(zero_copy_only=False)
    numeric = pc.fill_null(pc.match_substring_regex(text, _NUMBER_TEXT), False)
    token = pc.fill_null(pc.is_in(pc.utf8_lower(text), value_set=_NONFINITE_TOKENS), False)
    parsable = pc.or_(numeric, token)
    numbers = pc.cast(pc.if_else(parsable, text, pa.scalar(None, pa.string())), pa.float64())
    numbers = pc.fill_null(numbers, np.nan).to_numpy(zero_copy_only=False)
    parsed = parsable.to_numpy(zero_copy_only=False)
    unparsable = present & ~parsed
    return numbers, present & parsed, int(unparsable.sum())


def _ids(values: pa.Array | pa.ChunkedArray, path: Path, column: str) -> np.ndarray:
    text = pc.utf8_trim_whitespace(pc.cast(values, pa.string()))
    missing = int(pc.sum(pc.or_(pc.is_null(text), pc.equal(pc.fill_null(text, ""), ""))).as_py() or 0)
    if missing:
        raise PrsFormatError(f"{path.name}: column {column} has {missing} empty sample id(s)")
    return np.asarray(text.to_pylist(), dtype=str)


def _find_column(table: pa.Table, candidates: Sequence[str], path: Path, what: str) -> str:
    lookup = {name.lower(): name for name in table.column_names}
    for candidate in candidates:
        if candidate.lower() in lookup:
            return lookup[candidate.lower()]
    raise PrsFormatError(f"{path.name}: no {what} column (looked for {', '.join(candidates)})")


# ---- the three formats --------------------------------------------------------------------------
def _read_pgsc_calc(path: Path, column: str, sampleset: str | None) -> PRSScores:
    """pgsc_calc long format: one row per (sampleset, IID, PGS) with SUM/DENOM/AVG."""
    table = _read_text_table(path)
    id_col = _find_column(table, ["IID"], path, "sample id")
    pgs_col = _find_column(table, ["PGS"], path, "PGS id")
    value_col = _find_column(table, [column], path, f"score ({column})")
    if sampleset is not None:
        set_col = _find_column(table, ["sampleset"], path, "sampleset")
        table = table.filter(pc.equal(table[set_col], sampleset))
    sample_ids = _ids(table[id_col], path, id_col)
    pgs_text = _ids(table[pgs_col], path, pgs_col)
    numbers, present_cells, unparsable = _parse_numbers(table[value_col])
    samples, sample_code = _codes_in_order(sample_ids)
    pgs_ids, pgs_code = _codes_in_order(pgs_text)
    k = len(pgs_ids)
    # a repeated (sample, PGS) pair opens a further row for that sample: nothing is overwritten
    pair = sample_code.astype(np.int64) * max(k, 1) + pgs_code
    order = np.argsort(pair, kind="stable")
    sorted_pair = pair[order]
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_pair)) + 1] if len(pair) else np.zeros(0, np.int64)
    group_start = np.repeat(starts, np.diff(np.r_[starts, len(pair)]))
    occurrence = np.empty(len(pair), dtype=np.int64)
    occurrence[order] = np.arange(len(pair)) - group_start
    row_key = sample_code.astype(np.int64) * (occurrence.max(initial=0) + 1) + occurrence
    row_keys, row_index = np.unique(row_key, return_inverse=True)  # sorted by sample first appearance
    values = np.full((len(row_keys), k), np.nan, dtype=np.float32)
    present = np.zeros((len(row_keys), k), dtype=bool)
    values[row_index, pgs_code] = numbers
    present[row_index, pgs_code] = present_cells
    has_row = np.zeros((len(row_keys), k), dtype=bool)
    has_row[row_index, pgs_code] = True
    if sampleset is None and "sampleset" in table.column_names:
        _check_sampleset_scores(path, _ids(table["sampleset"], path, "sampleset"), pgs_code, k, sample_code)
    _check_sample_scores(path, has_row)
    row_samples = samples[row_keys // (occurrence.max(initial=0) + 1)]
    return PRSScores(
        row_samples, pgs_ids.tolist(), values, present, source=path.name, fmt="pgsc_calc", unparsable_values=unparsable
    )


def _refuse_score_sets(path: Path, what: str, groups: int, bad_groups: int, samples: int, bad_samples: int) -> None:
    raise PrsFormatError(
        f"{path.name}: the PGS score set differs between chunks: {bad_groups:,} of {groups:,} {what} "
        f"({bad_samples:,} of {samples:,} samples) hold PGS ids the others lack; score every chunk with "
        "the same scoring files (or read one sampleset with prs.sampleset)"
    )


def _check_sampleset_scores(
    path: Path, samplesets: np.ndarray, pgs_code: np.ndarray, k: int, sample_code: np.ndarray
) -> None:
    """Refuse a file whose samplesets (pgsc_calc's chunks) hold different PGS sets."""
    names, set_code = _codes_in_order(samplesets)
    if len(names) < 2:
        return
    held = np.zeros((len(names), k), dtype=bool)
    held[set_code, pgs_code] = True
    sets, which = np.unique(held, axis=0, return_inverse=True)
    if len(sets) < 2:
        return
    which = np.asarray(which).reshape(-1)
    samples = np.array([len(np.unique(sample_code[set_code == s])) for s in range(len(names))])
    modal = np.argmax(np.bincount(which, weights=samples))
    bad = which != modal
    _refuse_score_sets(path, "samplesets", len(names), int(bad.sum()), int(samples.sum()), int(samples[bad].sum()))


def _check_sample_scores(path: Path, has_row: np.ndarray) -> None:
    """Refuse when two samples each hold a PGS the other lacks (different scoring files)."""
    if has_row.shape[0] < 2 or has_row.shape[1] < 2:
        return
    sets, counts = np.unique(has_row, axis=0, return_counts=True)
    if len(sets) < 2:
        return
    held = sets.astype(np.float32)
    extra = (held @ (1.0 - held).T) > 0  # extra[i, j]: set i holds a PGS that set j lacks
    clash = (extra & extra.T).any(axis=1)
    if clash.any():
        clash[np.argmax(counts)] = False  # the largest group is the reference the others disagree with
        _refuse_score_sets(path, "score sets", len(sets), int(clash.sum()), int(counts.sum()), int(counts[clash].sum()))


def _codes_in_order(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(distinct labels in order of first appearance, code of each label)."""
    if len(labels) == 0:
        return np.asarray([], dtype=str), np.zeros(0, dtype=np.int64)
    distinct, first, inverse = np.unique(labels, return_index=True, return_inverse=True)
    rank = np.empty(len(distinct), dtype=np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(len(distinct))
    return distinct[np.argsort(first, kind="stable")], rank[inverse]


def _score_matrix(table: pa.Table, columns: list[str], path: Path) -> tuple[np.ndarray, np.ndarray, int]:
    n = table.num_rows
    values = np.full((n, len(columns)), np.nan, dtype=np.float32)
    present = np.zeros((n, len(columns)), dtype=bool)
    unparsable = 0
    for j, name in enumerate(columns):
        try:
            numbers, present[:, j], bad = _parse_numbers(table[name])
        except TypeError as exc:
            raise PrsFormatError(f"{path.name}: score column {name} is stored as {exc}, not a number") from None
        with np.errstate(over="ignore"):
            values[:, j] = numbers
        unparsable += bad
    return values, present, unparsable


def _read_sscore(path: Path, column: str) -> PRSScores:
    """plink2 --score output: `#FID IID ...` or `#IID ...`, one `<PGS>_AVG`/`<PGS>_SUM` column per score."""
    table = _read_text_table(path)
    id_col = _find_column(table, ["IID"], path, "IID")
    suffix = f"_{column.upper()}"
    score_cols = [c for c in table.column_names if c.upper().endswith(suffix) and c.upper() not in _SSCORE_NON_SCORES]
    if not score_cols:
        raise PrsFormatError(
            f"{path.name}: no score column ending in {suffix} (plink2 writes *_SUM only with cols=+scoresums)"
        )
    values, present, unparsable = _score_matrix(table, score_cols, path)
    pgs_ids = [c[: -len(suffix)] for c in score_cols]
    return PRSScores(
        _ids(table[id_col], path, id_col),
        pgs_ids,
        values,
        present,
        source=path.name,
        fmt="sscore",
        unparsable_values=unparsable,
    )


def _read_wide(path: Path) -> PRSScores:
    """`sample_id` (or IID) plus one numeric column per PGS: parquet, or a delimited text file."""
    table = pq.read_table(path) if path.name.lower().endswith(".parquet") else _read_text_table(path)
    id_col = _find_column(table, _ID_COLUMNS, path, "sample id")
    score_cols = [c for c in table.column_names if c != id_col]
    if not score_cols:
        raise PrsFormatError(f"{path.name}: no score columns besides {id_col}")
    values, present, unparsable = _score_matrix(table, score_cols, path)
    return PRSScores(
        _ids(table[id_col], path, id_col),
        score_cols,
        values,
        present,
        source=path.name,
        fmt="wide",
        unparsable_values=unparsable,
    )


def detect_format(path: str | Path) -> str:
    """pgsc_calc / sscore / wide, from the extension and the header line."""
    path = Path(path)
    name = path.name.lower()
    if name.endswith(".parquet"):
        return "wide"
    if name.endswith(".sscore") or name.endswith(".sscore.gz"):
        return "sscore"
    header = _first_line(path)
    if header.startswith(("#FID", "#IID")):
        return "sscore"
    fields = {f.strip('"').lower() for f in re.split(r"[\t, ]+", header.strip())}
    if {"iid", "pgs"} <= fields:
        return "pgsc_calc"
    if fields & set(_ID_COLUMNS):
        return "wide"
    raise PrsFormatError(f"{path.name}: not a recognised PRS format (pgsc_calc aggregated, plink2 .sscore, wide)")


def read_prs(path: str | Path, fmt: str | None = None, column: str = "SUM", sampleset: str | None = None) -> PRSScores:
    """Read PRS scores; `column` picks SUM or AVG in pgsc_calc/.sscore files (ignored for wide tables).

    `sampleset` keeps one pgsc_calc sampleset (its reference panel rows would otherwise count as
    duplicate ids when they reuse sample names).
    """
    path = Path(path)
    if not path.is_file():
        raise PrsFormatError(f"PRS file {path} not found")
    fmt = fmt or detect_format(path)
    if fmt == "pgsc_calc":
        return _read_pgsc_calc(path, column, sampleset)
    if fmt == "sscore":
        return _read_sscore(path, column)
    if fmt == "wide":
        return _read_wide(path)
    raise PrsFormatError(f"unknown PRS format {fmt!r}; choose from {', '.join(FORMATS)}")


# ---- sample map and PCs -------------------------------------------------------------------------
def check_build(path: str | Path, build: str | None) -> tuple[str, list[str]]:
    """(build check outcome, warnings) for the genome build the run is configured with.

    No PRS format records a build; an `ehrfm score_prs` match_report.json beside the file does
    (its target_build). Outcomes: not_configured, confirmed, unconfirmed (a warning); a recorded
    build that differs is refused.
    """
    if build is None:
        return "not_configured", []
    path = Path(path)
    recorded = None
    sibling = path.parent / MATCH_REPORT
    if sibling.is_file():
        try:
            recorded = json.loads(sibling.read_text(encoding="utf-8")).get("target_build")
        except (ValueError, AttributeError):
            recorded = None
    if recorded == build:
        return "confirmed", []
    if recorded:
        raise PrsFormatError(
            f"{path.name}: scored on {recorded} ({MATCH_REPORT}), but the run is configured for {build}"
        )
    return "unconfirmed", [
        f"{path.name}: the run is configured for {build}, but the file records no genome build and no "
        f"{MATCH_REPORT} with a target_build lies beside it; check that the scores were computed on {build}"
    ]


def read_sample_map(path: str | Path) -> dict[str, int]:
    """`sample_id<TAB>person_id` (header required) -> {sample id: person id}.

    A sample id listed twice with different persons is an error (which person is it?); listed
    twice with the same person it is harmless.
    """
    path = Path(path)
    table = _read_text_table(path)
    sample_col = _find_column(table, _ID_COLUMNS, path, "sample id")
    person_col = _find_column(table, ["person_id", "subject_id"], path, "person id")
    samples = _ids(table[sample_col], path, sample_col)
    numbers, present, _ = _parse_numbers(table[person_col])
    whole = present & np.isfinite(numbers) & (np.floor(numbers) == numbers) & (np.abs(numbers) < 2**53)
    if not whole.all():
        raise PrsFormatError(
            f"{path.name}: column {person_col} has {int((~whole).sum())} value(s) that are not integer ids"
        )
    text = pc.utf8_trim_whitespace(pc.cast(table[person_col], pa.string()))
    persons = pc.cast(pc.replace_substring_regex(text, pattern=r"\.0*$", replacement=""), pa.int64())
    mapping: dict[str, int] = {}
    conflicts = 0
    for sample, person in zip(samples.tolist(), persons.to_pylist()):
        if mapping.setdefault(sample, person) != person:
            conflicts += 1
    if conflicts:
        raise PrsFormatError(f"{path.name}: {conflicts} sample id(s) map to more than one person")
    return mapping


def read_pcs(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Genetic PCs: `sample_id PC1..PCn` or a plink2 `.eigenvec` (`#FID IID PC1..`) -> (ids, float32 [n, n_pcs])."""
    path = Path(path)
    table = _read_text_table(path)
    id_col = _find_column(table, _ID_COLUMNS, path, "sample id")
    pc_cols = sorted(
        (c for c in table.column_names if re.fullmatch(r"PC\d+", c, flags=re.IGNORECASE)), key=lambda c: int(c[2:])
    )
    if not pc_cols:
        raise PrsFormatError(f"{path.name}: no PC1..PCn columns")
    values, present, unparsable = _score_matrix(table, pc_cols, path)
    finite = present & np.isfinite(values)
    if not finite.all():
        raise PrsFormatError(f"{path.name}: {int((~finite).sum())} PC value(s) are missing or not finite")
    return _ids(table[id_col], path, id_col), values


# ---- validation ---------------------------------------------------------------------------------
@dataclass
class _Checks:
    """Per-row outcome of the checks: exclusion reason index (-1 kept) and problem flags."""

    reason: np.ndarray
    person_ids: np.ndarray
    nonfinite: np.ndarray  # bool [n, K]
    incomplete: np.ndarray  # bool [n]


def _first_mask(labels: np.ndarray) -> np.ndarray:
    mask = np.zeros(len(labels), dtype=bool)
    if len(labels):
        mask[np.unique(labels, return_index=True)[1]] = True
    return mask


def _person_id_array(person_ids: object) -> np.ndarray:
    ids = getattr(person_ids, "person_id", person_ids)  # PersonIndex or any array of ids
    return np.unique(np.asarray(ids, dtype=np.int64))


def _map_samples(sample_ids: np.ndarray, sample_map: dict[str, int] | None) -> tuple[np.ndarray, np.ndarray]:
    """(person id per sample, mapped mask); without a map the sample ids must be integer person ids."""
    persons = np.zeros(len(sample_ids), dtype=np.int64)
    mapped = np.zeros(len(sample_ids), dtype=bool)
    for i, sample in enumerate(sample_ids.tolist()):
        if sample_map is not None:
            person = sample_map.get(sample)
        else:
            person = int(sample) if re.fullmatch(r"[+-]?\d{1,18}", sample) else None
        if person is not None:
            persons[i], mapped[i] = person, True
    return persons, mapped


def _run_checks(scores: PRSScores, sample_map: dict[str, int] | None, person_ids: object) -> _Checks:
    n = len(scores)
    reason = np.full(n, -1, dtype=np.int8)

    def flag(name: str, rows: np.ndarray) -> None:
        reason[(reason < 0) & rows] = EXCLUSION_REASONS.index(name)

    known_persons = _person_id_array(person_ids)
    persons, mapped = _map_samples(scores.sample_ids, sample_map)
    flag("duplicate_sample_id", ~_first_mask(scores.sample_ids))
    flag("unmapped_sample", ~mapped)
    pos = np.minimum(np.searchsorted(known_persons, persons), max(len(known_persons) - 1, 0))
    known = mapped & (known_persons[pos] == persons) if len(known_persons) else np.zeros(n, dtype=bool)
    flag("unknown_person_id", ~known)
    still = np.flatnonzero(reason < 0)
    repeat = np.zeros(n, dtype=bool)
    repeat[still] = ~_first_mask(persons[still])
    flag("duplicate_person_id", repeat)
    finite = np.isfinite(scores.values) & scores.present
    flag("no_scores", ~finite.any(axis=1) if scores.values.shape[1] else np.ones(n, dtype=bool))
    nonfinite = scores.present & ~np.isfinite(scores.values)
    incomplete = ~scores.present.all(axis=1)
    return _Checks(reason, persons, nonfinite, incomplete)


def _report(scores: PRSScores, checks: _Checks, n_persons: int) -> dict:
    kept = checks.reason < 0
    excluded = {name: int((checks.reason == i).sum()) for i, name in enumerate(EXCLUSION_REASONS)}
    return {
        "file": scores.source,
        "format": scores.fmt,
        "samples_in": len(scores),
        "samples_kept": int(kept.sum()),
        "samples_excluded": int((~kept).sum()),
        "excluded_by_reason": {k: v for k, v in excluded.items() if v},
        "pgs": len(scores.pgs_ids),
        "pgs_ids": list(scores.pgs_ids),
        "problems": {
            "duplicate_sample_rows": int((~_first_mask(scores.sample_ids)).sum()),
            "nonfinite_values": int(checks.nonfinite.sum()),
            "samples_with_nonfinite": int(checks.nonfinite.any(axis=1).sum()),
            "unparsable_values": int(scores.unparsable_values),
            "samples_with_incomplete_pgs_set": int(checks.incomplete.sum()),
            "missing_cells": int((~scores.present).sum()),
        },
        "persons": n_persons,
        "persons_with_prs": int(kept.sum()),
        "persons_without_prs": n_persons - int(kept.sum()),
    }


def _problem_table(scores: PRSScores, checks: _Checks) -> pa.Table:
    """One row per sample with an exclusion or a problem: sample_id, status, problem."""
    rows: list[tuple[str, str, str]] = []
    for i in np.flatnonzero(checks.reason >= 0):
        rows.append((scores.sample_ids[i], "excluded", EXCLUSION_REASONS[checks.reason[i]]))
    kept = checks.reason < 0
    for i in np.flatnonzero(kept & checks.nonfinite.any(axis=1)):
        rows.append((scores.sample_ids[i], "kept", "nonfinite_values"))
    for i in np.flatnonzero(kept & checks.incomplete):
        rows.append((scores.sample_ids[i], "kept", "incomplete_pgs_set"))
    names = ("sample_id", "status", "problem")
    return pa.table({name: pa.array([r[j] for r in rows], pa.string()) for j, name in enumerate(names)})


def validate_prs(
    scores: PRSScores,
    sample_map: dict[str, int] | None,
    person_ids: object,
    problems_out: str | Path | None = None,
) -> tuple[PRSScores, dict]:
    """(kept scores with `person_ids` set and non-finite values as NaN, report with every count).

    `person_ids`: the validated person ids (array or PersonIndex). `problems_out`: optional
    parquet path for the per-sample problem list (sample ids, never scores).
    """
    checks = _run_checks(scores, sample_map, person_ids)
    kept = checks.reason < 0
    values = np.where(checks.nonfinite, np.nan, scores.values)[kept].astype(np.float32)
    result = PRSScores(
        sample_ids=scores.sample_ids[kept],
        pgs_ids=list(scores.pgs_ids),
        values=values,
        present=scores.present[kept],
        person_ids=checks.person_ids[kept],
        source=scores.source,
        fmt=scores.fmt,
        unparsable_values=scores.unparsable_values,
    )
    report = _report(scores, checks, len(_person_id_array(person_ids)))
    if report["samples_in"] != report["samples_kept"] + report["samples_excluded"]:
        raise AssertionError("PRS sample account does not add up")
    if problems_out is not None:
        Path(problems_out).parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(_problem_table(scores, checks), problems_out)
    return result, report
