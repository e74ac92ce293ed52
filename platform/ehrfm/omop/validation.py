"""OMOP CDM readers and row-level validation with a quarantine and an exact row account.

Flow: `find_tables` -> `iter_raw_batches`/`read_raw` (untyped) -> `validate_batch` (per batch,
vectorised: cast to the CDM v5.4 types, sort bad rows out) -> `validate_table` (adds the
cross-batch duplicate-key check) -> `validate_omop` (all tables, person and death first, writes
the quarantine and `validation_report.json`).

Every quarantined row gets exactly one reason, the first that applies in `REASONS` order:
  malformed_row          csv line with the wrong number of fields
  missing_person_id      empty person_id
  unknown_person_id      person_id not in the (validated) person table
  unparsable_date        a date/datetime cell that is not a valid date, an EMPTY cell in a required
                         (CDM NOT NULL) date column, or a person whose birth date cannot be formed
  unparsable_number      a numeric cell that is not a number (NaN and infinity included)
  missing_concept_id     an empty concept id in a clinical table's main concept column (CDM NOT
                         NULL; "no matching concept" is concept id 0, which is kept and coded)
  before_1900            start date before 1900-01-01                     } plausibility rules,
  after_extraction_date  start date after the data's extraction date      } see omop.plausibility
  end_before_start       end date earlier than start date
  before_birth           start date before the person's birth date (birth_datetime when given,
                         else year_of_birth with month/day defaulting to 1)
  after_death            start date more than 30 days after the person's death date
  after_observation_period  start date more than the configured slack (365 days) after the end of
                         the person's last observation period (omop.plausibility)
  duplicate_primary_key  a later row repeating a primary key (death: a second row for a person)
A date column of plain integers is read as YYYYMMDD or days since 1970 when its form is clear,
else the file is refused (OmopSchemaError naming table, column, file and count; omop.cast).
For every table rows_in == rows_kept + rows_quarantined and by_reason sums to rows_quarantined.
Messages and the report name tables, files, columns and counts only, never cell values.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ehrfm.omop.cast import ColumnTypeError, IntegerDateError, IntegerDates, convert_column, days_from_ymd, to_text
from ehrfm.omop.files import (
    DEFAULT_BATCH_ROWS,
    MALFORMED_LINE_COLUMN,
    OmopSchemaError,
    check_required,
    file_name,
    find_tables,
    iter_raw_batches,
    normalise_names,
    problem,
    read_raw,
)
from ehrfm.omop.plausibility import Plausibility, resolve
from ehrfm.omop.spec import AFTER_DEATH_GRACE_DAYS, CDM_TABLES, REASONS, TABLE_ORDER, TableSpec

__all__ = [
    "CDM_TABLES",
    "REASONS",
    "OmopSchemaError",
    "PersonIndex",
    "Plausibility",
    "TableSpec",
    "TableValidation",
    "find_tables",
    "first_occurrence_mask",
    "read_raw",
    "validate_batch",
    "validate_omop",
    "validate_omop_with_persons",
    "validate_table",
]

REASON_COLUMN = "reason"
# Clinical tables and their concept column: the share of kept rows without a standard concept
# (concept id 0 or null) is reported; above UNMAPPED_WARN_SHARE it is a warning.
CONCEPT_COLUMNS = {
    "condition_occurrence": ("condition_concept_id", "condition_source_value"),
    "drug_exposure": ("drug_concept_id", "drug_source_value"),
    "procedure_occurrence": ("procedure_concept_id", "procedure_source_value"),
    "device_exposure": ("device_concept_id", "device_source_value"),
    "measurement": ("measurement_concept_id", "measurement_source_value"),
    "observation": ("observation_concept_id", "observation_source_value"),
    "visit_occurrence": ("visit_concept_id", "visit_source_value"),
}
UNMAPPED_WARN_SHARE = 0.05
SOURCE_COLUMN = "source_file"
NO_DEATH = np.iinfo(np.int64).max // 2  # sentinel day number: far beyond any real date
_REASON_CODE = {reason: code for code, reason in enumerate(REASONS)}
_NOT_OBSERVED = ("death", "observation_period")  # tables the observation-period rule skips


# ---- small array helpers ------------------------------------------------------------------------
def _ints(values: pa.Array | pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """(int64 numpy values with nulls as 0, present mask) for int/date/timestamp arrays."""
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    if pa.types.is_date32(values.type):
        values = values.cast(pa.int32())
    elif pa.types.is_timestamp(values.type):
        values = values.cast(pa.int64())
    present = values.is_valid().to_numpy(zero_copy_only=False)
    return pc.fill_null(values, 0).to_numpy(zero_copy_only=False).astype(np.int64), present


def _birth_days(person: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """(days since epoch, valid) of each person's birth: birth_datetime, else year/month/day."""
    stamp, has_stamp = _ints(person["birth_datetime"])
    year, has_year = _ints(person["year_of_birth"])
    month, has_month = _ints(person["month_of_birth"])
    day, has_day = _ints(person["day_of_birth"])
    valid, days = days_from_ymd(year, np.where(has_month, month, 1), np.where(has_day, day, 1))
    valid &= has_year
    stamp_days = np.floor_divide(stamp, 86_400_000_000)
    return np.where(has_stamp, stamp_days, days), has_stamp | valid


# ---- person index -------------------------------------------------------------------------------
@dataclass
class PersonIndex:
    """Sorted person ids with birth and death day numbers; small, picklable, looked up by searchsorted.

    It also carries what the other tables are checked against: the end of each person's last
    observation period (when the observation_period table exists) and the plausibility rules.
    """

    person_id: np.ndarray  # int64, sorted, unique
    birth_day: np.ndarray  # int64 days since 1970-01-01
    death_day: np.ndarray  # int64 days since 1970-01-01, NO_DEATH when none
    observed_until: np.ndarray | None = None  # int64 last observation end day, NO_DEATH when none
    rules: Plausibility = field(default_factory=Plausibility.at_run_date)

    @classmethod
    def from_tables(
        cls, person: pa.Table, death: pa.Table | None = None, rules: Plausibility | None = None
    ) -> PersonIndex:
        """Build from validated person (and death) rows; the first row per person wins."""
        ids, present = _ints(person["person_id"])
        birth, birth_ok = _birth_days(person)
        keep = present & birth_ok
        ids, birth = ids[keep], birth[keep]
        unique_ids, first = np.unique(ids, return_index=True)
        death_day = np.full(len(unique_ids), NO_DEATH, dtype=np.int64)
        if death is not None and death.num_rows:
            dead_ids, dead_present = _ints(death["person_id"])
            dates, date_present = _ints(death["death_date"])
            ok = dead_present & date_present
            dead_ids, dates = dead_ids[ok], dates[ok]
            dead_unique, dead_first = np.unique(dead_ids, return_index=True)
            found, pos = cls._search(unique_ids, dead_unique)
            death_day[pos[found]] = dates[dead_first[found]]
        index = cls(unique_ids.astype(np.int64), birth[first].astype(np.int64), death_day)
        return index if rules is None else replace(index, rules=rules)

    def with_observation(self, periods: pa.Table) -> PersonIndex:
        """A copy that knows each person's last observation end (validated observation_period rows)."""
        until = np.full(len(self.person_id), NO_DEATH, dtype=np.int64)
        ids, has_id = _ints(periods["person_id"])
        ends, has_end = _ints(periods["observation_period_end_date"])
        ok = has_id & has_end
        found, pos = self.locate(ids[ok])
        ends = ends[ok][found]
        pos = pos[found]
        has_period = np.zeros(len(until), dtype=bool)
        has_period[pos] = True
        latest = np.full(len(until), np.iinfo(np.int64).min, dtype=np.int64)
        np.maximum.at(latest, pos, ends)
        until[has_period] = latest[has_period]
        return replace(self, observed_until=until)

    @staticmethod
    def _search(sorted_ids: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if len(sorted_ids) == 0:
            return np.zeros(len(ids), dtype=bool), np.zeros(len(ids), dtype=np.int64)
        pos = np.minimum(np.searchsorted(sorted_ids, ids), len(sorted_ids) - 1)
        return sorted_ids[pos] == ids, pos

    def locate(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(found mask, position in this index) for an int64 array of person ids."""
        return self._search(self.person_id, np.asarray(ids, dtype=np.int64))

    def __len__(self) -> int:
        return len(self.person_id)


# ---- one batch ----------------------------------------------------------------------------------
def _cast_batch(
    spec: TableSpec, raw: pa.Table, source: str, integer_dates: IntegerDates | None = None
) -> tuple[pa.Table, dict[str, np.ndarray]]:
    """Typed table in the spec schema plus, per column, the mask of unconvertible cells."""
    columns, bad = {}, {}
    present = set(raw.column_names)
    for col in spec.columns:
        if col.name not in present:  # optional column absent: nulls of the spec type
            columns[col.name] = pa.nulls(raw.num_rows, col.arrow_type)
            continue
        try:
            columns[col.name], bad[col.name] = convert_column(raw[col.name], col, integer_dates)
        except IntegerDateError as exc:
            what = (
                f"plain integers that are neither all YYYYMMDD dates nor all days since 1970 between 1900-01-01 "
                f"and the extraction date ({exc.cells:,} of {raw.num_rows:,} rows); export ISO dates "
                "(YYYY-MM-DD) or set plausibility.integer_dates"
            )
            raise problem(source, spec.name, what, column=col.name) from None
        except ColumnTypeError as exc:
            raise OmopSchemaError(
                f"{spec.name}: column {col.name} in {source} is stored as {exc}, which cannot hold CDM {col.kind}"
            ) from None
    return pa.table(columns, schema=spec.arrow_schema), bad


def _unparsable(spec: TableSpec, typed: pa.Table, bad: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(rows with a bad date, rows with a bad number); an empty required date counts as bad."""
    bad_date = np.zeros(typed.num_rows, dtype=bool)
    bad_number = np.zeros(typed.num_rows, dtype=bool)
    for col in spec.columns:
        if col.kind in ("date", "datetime"):
            if col.name in bad:
                bad_date |= bad[col.name]
            if col.required:  # the row cannot be placed in time
                bad_date |= ~typed[col.name].is_valid().to_numpy(zero_copy_only=False)
        elif col.kind in ("int", "float") and col.name in bad:
            bad_number |= bad[col.name]
    if spec.name == "person":  # a birth date that cannot be formed from the birth columns
        bad_date |= ~_birth_days(typed)[1] & ~bad_number
    return bad_date, bad_number


def _reasons(spec: TableSpec, typed: pa.Table, bad: dict[str, np.ndarray], persons: PersonIndex | None) -> np.ndarray:
    """Reason code per row (-1 = keep), the first applicable in REASONS order.

    The date plausibility rules (before 1900, after extraction, after the observation period)
    apply to person-linked tables checked against a PersonIndex, whose `rules` they use.
    """
    n = typed.num_rows
    reason = np.full(n, -1, dtype=np.int8)
    no_bad = np.zeros(n, dtype=bool)

    def flag(name: str, rows: np.ndarray) -> None:
        reason[(reason < 0) & rows] = _REASON_CODE[name]

    bad_date, bad_number = _unparsable(spec, typed, bad)
    start, has_start = _ints(typed[spec.start_date]) if spec.start_date else (np.zeros(n, np.int64), no_bad)
    linked = persons is not None and spec.person_column is not None and spec.name != "person"
    if spec.person_column:
        pid, has_pid = _ints(typed[spec.person_column])
        flag("missing_person_id", ~has_pid & ~bad.get(spec.person_column, no_bad))
    if linked:
        found, pos = persons.locate(pid)
        flag("unknown_person_id", has_pid & ~found)
    flag("unparsable_date", bad_date)
    flag("unparsable_number", bad_number)
    if spec.name in CONCEPT_COLUMNS:
        concept = CONCEPT_COLUMNS[spec.name][0]
        flag("missing_concept_id", ~_ints(typed[concept])[1] & ~bad.get(concept, no_bad))
    if linked and spec.start_date:
        rules = persons.rules
        flag("before_1900", has_start & (start < rules.earliest_day))
        flag("after_extraction_date", has_start & (start > rules.extraction_day))
    if spec.end_date:
        end, has_end = _ints(typed[spec.end_date])
        flag("end_before_start", has_start & has_end & (end < start))
    if linked:
        ok = has_pid & found & has_start
        flag("before_birth", ok & (start < persons.birth_day[pos]))
        if spec.name != "death":
            flag("after_death", ok & (start > persons.death_day[pos] + AFTER_DEATH_GRACE_DAYS))
        slack = persons.rules.observation_slack_days
        if persons.observed_until is not None and slack is not None and spec.name not in _NOT_OBSERVED:
            until = persons.observed_until[pos]
            flag("after_observation_period", ok & (until != NO_DEATH) & (start > until + slack))
    return reason


def quarantine_rows(
    raw: pa.Table, reasons: Sequence[str] | pa.Array, sources: Sequence[str] | pa.Array | str | None
) -> pa.Table:
    """Raw rows as strings plus `reason` and `source_file` columns (the quarantine file layout)."""
    columns = {name: to_text(raw[name]) for name in raw.column_names}
    columns[REASON_COLUMN] = pa.array(reasons, type=pa.string())
    if isinstance(sources, str) or sources is None:
        columns[SOURCE_COLUMN] = pa.array([sources] * raw.num_rows, type=pa.string())
    else:
        columns[SOURCE_COLUMN] = pa.array(sources, type=pa.string())
    return pa.table(columns)


def validate_batch(
    table: str,
    raw: pa.Table,
    persons: PersonIndex | None,
    source_file: str | None = None,
    integer_dates: IntegerDates | None = None,
) -> tuple[pa.Table, pa.Table]:
    """(kept rows in the CDM v5.4 types, quarantined raw rows with a reason) for one batch.

    No cross-batch check happens here (duplicates: see `first_occurrence_mask`). `persons=None`
    skips the person-table checks (used for the person table itself). Columns not in the spec are
    left out of the kept rows but stay in the quarantine rows. Integer date columns are read by
    `integer_dates`, else by the PersonIndex's rules (omop.cast).
    """
    if table not in CDM_TABLES:
        raise OmopSchemaError(f"unsupported OMOP table {table!r}")
    spec = CDM_TABLES[table]
    source = source_file or "<batch>"
    raw, _ = normalise_names(raw, table)
    check_required(raw.column_names, table, source)
    if integer_dates is None and persons is not None:
        integer_dates = persons.rules.integer_date_rules
    typed, bad = _cast_batch(spec, raw, source, integer_dates)
    reason = _reasons(spec, typed, bad, persons)
    keep = reason < 0
    if keep.all():
        return typed, quarantine_rows(raw.slice(0, 0), [], source_file)
    rejected = np.flatnonzero(~keep)
    names = np.asarray(REASONS, dtype=object)[reason[rejected]]
    kept = typed.filter(pa.array(keep))
    return kept, quarantine_rows(raw.take(pa.array(rejected)), names.tolist(), source_file)


# ---- duplicates ---------------------------------------------------------------------------------
def first_occurrence_mask(kept: pa.Table, table: str) -> np.ndarray:
    """True for the first row of each primary key (and for rows with a null key part).

    Global over `kept`: call it on a whole table (or on rows grouped by key) to find duplicates
    across batches. Tables without a primary key get all True.
    """
    keys = CDM_TABLES[table].primary_key
    n = kept.num_rows
    if not keys or n == 0:
        return np.ones(n, dtype=bool)
    parts = [_ints(kept[k]) for k in keys]
    complete = np.logical_and.reduce([present for _, present in parts])
    rows = np.flatnonzero(complete)
    if len(keys) == 1:
        _, first = np.unique(parts[0][0][rows], return_index=True)
    else:
        stacked = np.column_stack([values[rows] for values, _ in parts])
        _, first = np.unique(stacked, axis=0, return_index=True)
    mask = ~complete
    mask[rows[first]] = True
    return mask


# ---- one table ----------------------------------------------------------------------------------
@dataclass
class TableValidation:
    kept: pa.Table
    quarantine: pa.Table
    account: dict = field(default_factory=dict)


def _files_for(root_or_files: str | Path | Sequence[str], table: str) -> list[str]:
    if isinstance(root_or_files, (str, Path)):
        return find_tables(str(root_or_files)).get(table, [])
    return [str(f) for f in root_or_files]


def _malformed_quarantine(lines: list[str], source: str) -> pa.Table:
    raw = pa.table({MALFORMED_LINE_COLUMN: pa.array([line.rstrip("\r\n") for line in lines], pa.string())})
    return quarantine_rows(raw, ["malformed_row"] * len(lines), source)


def validate_table(
    root_or_files: str | Path | Sequence[str],
    table: str,
    persons: PersonIndex | None,
    batch_rows: int = DEFAULT_BATCH_ROWS,
    integer_dates: IntegerDates | None = None,
) -> TableValidation:
    """Validate every file of one table batch by batch, then drop duplicate primary keys.

    Duplicates are quarantined from their typed values (written back as text); the first
    occurrence in file order is kept.
    """
    spec = CDM_TABLES[table]
    files = _files_for(root_or_files, table)
    kept_parts: list[pa.Table] = []
    kept_sources: list[tuple[str, int]] = []  # (file, kept rows) per batch, to name duplicates' files
    quarantine_parts: list[pa.Table] = []
    rows_in = 0
    extra: set[str] = set()
    renamed: set[str] = set()
    for batch in iter_raw_batches(files, table, batch_rows):
        rows_in += batch.table.num_rows + len(batch.malformed_lines)
        extra.update(c for c in batch.table.column_names if c not in spec.column_names)
        renamed.update(batch.renamed)
        if batch.malformed_lines:
            quarantine_parts.append(_malformed_quarantine(batch.malformed_lines, batch.source_file))
        kept, quarantine = validate_batch(table, batch.table, persons, batch.source_file, integer_dates)
        kept_parts.append(kept)
        kept_sources.append((batch.source_file, kept.num_rows))
        if quarantine.num_rows:
            quarantine_parts.append(quarantine)
    kept = pa.concat_tables(kept_parts) if kept_parts else spec.arrow_schema.empty_table()
    first = first_occurrence_mask(kept, table)
    if not first.all():
        dupes = kept.filter(pa.array(~first))
        names, counts = zip(*kept_sources)
        sources = np.repeat(np.asarray(names, dtype=object), counts)[~first].tolist()
        quarantine_parts.append(quarantine_rows(dupes, ["duplicate_primary_key"] * dupes.num_rows, sources))
        kept = kept.filter(pa.array(first))
    quarantine = (
        pa.concat_tables(quarantine_parts, promote_options="default")
        if quarantine_parts
        else pa.table({REASON_COLUMN: pa.array([], pa.string()), SOURCE_COLUMN: pa.array([], pa.string())})
    )
    by_reason = {}
    if quarantine.num_rows:
        counts = pc.value_counts(quarantine[REASON_COLUMN].combine_chunks()).to_pylist()
        found = {item["values"]: item["counts"] for item in counts}
        by_reason = {reason: int(found[reason]) for reason in REASONS if reason in found}
    account = {
        "table": table,
        "files": [file_name(f) for f in files],
        "rows_in": rows_in,
        "rows_kept": kept.num_rows,
        "rows_quarantined": quarantine.num_rows,
        "by_reason": by_reason,
        "extra_columns": sorted(extra),
        "renamed_cdm53_columns": sorted(renamed),
    }
    if account["rows_in"] != account["rows_kept"] + account["rows_quarantined"]:  # guards the invariant
        raise AssertionError(f"{table}: row account does not add up")
    return TableValidation(kept=kept, quarantine=quarantine, account=account)


# ---- all tables ---------------------------------------------------------------------------------
def _write_quarantine(out_dir: Path | None, table: str, result: TableValidation) -> str | None:
    if out_dir is None:
        return None
    path = out_dir / "quarantine" / f"{table}.parquet"
    if result.quarantine.num_rows == 0:
        path.unlink(missing_ok=True)  # no stale file from an earlier run
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(result.quarantine, path)
    return str(path.relative_to(out_dir))


def unmapped_account(table: str, kept: pa.Table) -> dict | None:
    """Rows without a standard concept in one table's kept rows: counts and share (None if not clinical)."""
    if table not in CONCEPT_COLUMNS:
        return None
    concept, source = CONCEPT_COLUMNS[table]
    rows = kept.num_rows
    if concept not in kept.column_names:
        return {"rows": rows, "unmapped": 0, "with_source_value": 0, "share": 0.0}
    unmapped = pc.fill_null(pc.equal(pc.fill_null(kept[concept], 0), 0), True)
    n = int(pc.sum(unmapped).as_py() or 0)
    with_source = 0
    if n and source in kept.column_names:
        text = pc.utf8_trim_whitespace(pc.cast(kept[source], pa.string()))
        has_text = pc.fill_null(pc.greater(pc.utf8_length(text), 0), False)
        with_source = int(pc.sum(pc.and_(unmapped, has_text)).as_py() or 0)
    return {"rows": rows, "unmapped": n, "with_source_value": with_source, "share": round(n / rows, 4) if rows else 0.0}


def unmapped_warnings(unmapped: dict[str, dict], threshold: float = UNMAPPED_WARN_SHARE) -> list[str]:
    """One line per table whose unmapped share is above `threshold` (counts only)."""
    return [
        f"{table}: {a['unmapped']:,} of {a['rows']:,} rows ({a['share']:.1%}) have no standard concept "
        f"(concept id 0/null; {a['with_source_value']:,} keep their source value as the code)"
        for table, a in unmapped.items()
        if a["rows"] and a["share"] > threshold
    ]


def validate_omop(
    root: str | Path,
    out_dir: str | Path | None = None,
    batch_rows: int = DEFAULT_BATCH_ROWS,
    rules: Plausibility | None = None,
) -> dict:
    """Validate every supported table under `root`; person and death first (they build the PersonIndex).

    Writes `out_dir/quarantine/<table>.parquet` (tables with quarantined rows) and
    `out_dir/validation_report.json` when `out_dir` is given. Raises OmopSchemaError on schema
    problems (no person table, a missing required column, an impossible stored type). `rules`:
    the plausibility rules (default: `omop.plausibility.resolve(root)`, cdm_source or the run date).
    """
    return validate_omop_with_persons(root, out_dir, batch_rows, rules)[0]


def validate_omop_with_persons(
    root: str | Path,
    out_dir: str | Path | None = None,
    batch_rows: int = DEFAULT_BATCH_ROWS,
    rules: Plausibility | None = None,
) -> tuple[dict, PersonIndex]:
    """validate_omop, also returning the PersonIndex of the kept person and death rows."""
    root = str(root)
    rules = rules or resolve(root)
    out = Path(out_dir) if out_dir is not None else None
    started = time.perf_counter()
    tables = find_tables(root)
    if "person" not in tables:
        raise OmopSchemaError(f"OMOP root {root} has no person table")
    report: dict = {"root": root, "reasons": list(REASONS), "plausibility": rules.report(), "tables": {}}
    persons: PersonIndex | None = None  # person is first in TABLE_ORDER, so set before it is needed
    for table in TABLE_ORDER:
        if table not in tables:
            continue
        table_started = time.perf_counter()
        result = validate_table(tables[table], table, persons, batch_rows, rules.integer_date_rules)
        if table == "person":
            person_kept = result.kept
            persons = PersonIndex.from_tables(person_kept, rules=rules)
        elif table == "death":
            persons = PersonIndex.from_tables(person_kept, result.kept, rules=rules)
        elif table == "observation_period" and persons is not None:
            persons = persons.with_observation(result.kept)
        account = dict(result.account)
        mapped = unmapped_account(table, result.kept)
        if mapped is not None:
            report.setdefault("unmapped", {})[table] = mapped
        account["quarantine_file"] = _write_quarantine(out, table, result)
        account["seconds"] = round(time.perf_counter() - table_started, 3)
        report["tables"][table] = account
    accounts = report["tables"].values()
    assert persons is not None
    report["missing_tables"] = [t for t in TABLE_ORDER if t not in tables]
    report["persons"] = len(persons)
    report["totals"] = {
        "rows_in": sum(a["rows_in"] for a in accounts),
        "rows_kept": sum(a["rows_kept"] for a in accounts),
        "rows_quarantined": sum(a["rows_quarantined"] for a in accounts),
    }
    report["warnings"] = unmapped_warnings(report.get("unmapped", {}))
    report["seconds"] = round(time.perf_counter() - started, 3)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "validation_report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return report, persons
