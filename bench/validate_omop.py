"""Benchmark: `validate_omop` on a 20k-person cohort (csv and parquet), against a plain pyarrow read.

The baseline reads the same files with pyarrow (parquet.read_table / csv.read_csv, types inferred)
and nothing else, so `validate / read` is the cost of typing, checking and quarantining on top of
I/O. The cohort is a simple vectorised one written here (every row valid, 1% duplicate ids
injected into measurement so the quarantine path runs), unless `--omop DIR` points at existing
tables (e.g. the synthetic cohort's DIR/omop).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from ehrfm.omop.validation import find_tables, validate_omop

# events per person, per table (start date column, end date column or None)
_EVENT_TABLES = {
    "visit_occurrence": (20, "visit_start_date", "visit_end_date"),
    "condition_occurrence": (30, "condition_start_date", "condition_end_date"),
    "drug_exposure": (40, "drug_exposure_start_date", "drug_exposure_end_date"),
    "procedure_occurrence": (20, "procedure_date", None),
    "measurement": (100, "measurement_date", None),
    "observation": (40, "observation_date", None),
}


def _days(values: np.ndarray) -> pa.Array:
    return pa.array(values.astype(np.int32), type=pa.date32())


def make_cohort(persons: int, seed: int = 0) -> dict[str, pa.Table]:
    """A valid CDM v5.4 cohort: births 1930-2000, events between birth and 2023, 5% deaths."""
    rng = np.random.default_rng(seed)
    person_id = np.arange(1, persons + 1, dtype=np.int64)
    birth = rng.integers(-14_600, 10_950, persons)  # 1930 .. 2000 as days since 1970
    end = np.full(persons, 19_358)  # 2023-01-01
    dead = rng.random(persons) < 0.05
    death_day = birth + ((end - birth) * rng.uniform(0.5, 1.0, persons)).astype(np.int64)
    last = np.where(dead, death_day, end)
    birth_dates = birth.astype("datetime64[D]")
    tables = {
        "person": pa.table(
            {
                "person_id": person_id,
                "gender_concept_id": rng.choice([8507, 8532], persons),
                "year_of_birth": birth_dates.astype("datetime64[Y]").astype(np.int64) + 1970,
                "month_of_birth": birth_dates.astype("datetime64[M]").astype(np.int64) % 12 + 1,
                "day_of_birth": (birth_dates - birth_dates.astype("datetime64[M]")).astype(np.int64) + 1,
                "race_concept_id": np.zeros(persons, np.int64),
                "ethnicity_concept_id": np.zeros(persons, np.int64),
            }
        ),
        "death": pa.table({"person_id": person_id[dead], "death_date": _days(death_day[dead])}),
        "observation_period": pa.table(
            {
                "observation_period_id": person_id,
                "person_id": person_id,
                "observation_period_start_date": _days(birth),
                "observation_period_end_date": _days(last),
                "period_type_concept_id": np.full(persons, 32817),
            }
        ),
    }
    for table, (per_person, start_col, end_col) in _EVENT_TABLES.items():
        owner = np.repeat(np.arange(persons), per_person)
        start = birth[owner] + ((last[owner] - birth[owner]) * rng.random(len(owner))).astype(np.int64)
        ids = np.arange(1, len(owner) + 1, dtype=np.int64)
        prefix = table.split("_")[0]
        columns = {
            f"{table}_id": ids,
            "person_id": person_id[owner],
            f"{prefix}_concept_id": rng.integers(1, 50_000, len(owner)),
            start_col: _days(start),
            f"{prefix}_type_concept_id": np.full(len(owner), 32817),
        }
        if end_col:
            columns[end_col] = _days(np.minimum(start + rng.integers(0, 10, len(owner)), last[owner]))
        if table == "measurement":
            columns["value_as_number"] = np.round(rng.normal(6.0, 1.0, len(owner)), 2)
            dup = rng.choice(len(owner), len(owner) // 100, replace=False)
            ids[dup] = ids[(dup + 1) % len(owner)]  # 1% repeated primary keys
        tables[table] = pa.table(columns)
    return tables


def write_cohort(tables: dict[str, pa.Table], root: Path, fmt: str) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for name, table in tables.items():
        if fmt == "parquet":
            pq.write_table(table, root / f"{name}.parquet")
        else:
            pacsv.write_csv(table, root / f"{name}.csv")


def plain_read_seconds(root: Path) -> float:
    started = time.perf_counter()
    for files in find_tables(str(root)).values():
        for path in files:
            (pq.read_table if path.endswith(".parquet") else pacsv.read_csv)(path)
    return time.perf_counter() - started


def measure(root: Path, repeats: int) -> dict:
    read_s = min(plain_read_seconds(root) for _ in range(repeats))
    best, report = float("inf"), {}
    for _ in range(repeats):
        started = time.perf_counter()
        report = validate_omop(root)
        best = min(best, time.perf_counter() - started)
    rows = report["totals"]["rows_in"]
    return {
        "persons": report["persons"],
        "rows": rows,
        "rows_quarantined": report["totals"]["rows_quarantined"],
        "validate_s": round(best, 3),
        "plain_read_s": round(read_s, 3),
        "rows_per_s": round(rows / best),
        "validate_over_read": round(best / read_s, 2),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--quick", action="store_true", help="2k persons, one repeat")
    parser.add_argument("--persons", type=int, default=20_000)
    parser.add_argument("--omop", type=Path, help="validate these tables instead of the built-in cohort")
    args = parser.parse_args(argv)
    persons = 2_000 if args.quick else args.persons
    repeats = 1 if args.quick else 3
    results: dict[str, dict] = {}
    if args.omop:
        results["given"] = measure(args.omop, repeats)
    else:
        tables = make_cohort(persons)
        with tempfile.TemporaryDirectory() as tmp:
            for fmt in ("parquet", "csv"):
                write_cohort(tables, Path(tmp) / fmt, fmt)
                results[fmt] = measure(Path(tmp) / fmt, repeats)
    lines = [
        "| input | persons | rows | quarantined | validate s | plain read s | rows/s | validate / read |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in results.items():
        lines.append(
            f"| {name} | {r['persons']:,} | {r['rows']:,} | {r['rows_quarantined']:,} | {r['validate_s']} | "
            f"{r['plain_read_s']} | {r['rows_per_s']:,} | {r['validate_over_read']} |"
        )
    payload = {"results": results, "markdown": "\n".join(lines)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=2))
    print(payload["markdown"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
