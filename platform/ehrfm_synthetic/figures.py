"""Calibration figures of a generated cohort: T2D task prevalence, oracle AUROCs, vocabulary size.

Task: at the end of one randomly chosen visit that is not the person's last (the prediction
time), will T2D begin within `horizon_days`? People whose T2D began at or before the
prediction time are excluded. Figures are computed part by part (bounded memory) from the
written files: the visit and condition tables, and the truth.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from sklearn.metrics import roc_auc_score

from ehrfm_synthetic import concepts as cc
from ehrfm_synthetic.omop import CDM_COLUMNS, CONCEPT_COLUMN
from ehrfm_synthetic.oracle import t2d_onset_probability
from ehrfm_synthetic.time import from_datetime64
from ehrfm_synthetic.truth import load_truth, truth_parts

EVENT_TABLES = tuple(CONCEPT_COLUMN)


def read_part(path: Path, columns: list[str]) -> pa.Table:
    """Selected columns of one written part, parquet or csv (csv typed from the CDM spec)."""
    if path.suffix == ".parquet":
        return pq.read_table(path, columns=columns)
    types = {name: kind for table in CDM_COLUMNS.values() for name, kind in table if name in columns}
    options = pacsv.ConvertOptions(
        include_columns=columns, column_types=types, timestamp_parsers=["%Y-%m-%d %H:%M:%S", "%Y-%m-%d"]
    )
    return pacsv.read_csv(path, convert_options=options)


def table_parts(out_dir: Path, table: str) -> list[Path]:
    folder = Path(out_dir) / "omop" / table
    return sorted([*folder.glob("part-*.parquet"), *folder.glob("part-*.csv")])


def prediction_times(
    person: np.ndarray, visit_end: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Per person with >= 2 visits: the end of a random visit that is not the last. Input sorted by person."""
    persons, first, count = np.unique(person, return_index=True, return_counts=True)
    keep = count >= 2
    draw = rng.random(len(persons))
    chosen = first + np.floor(draw * (count - 1)).astype(np.int64)
    ends = visit_end[chosen]
    return persons[keep], ends[keep]


def _first_t2d_code(out_dir: Path, part: int) -> tuple[np.ndarray, np.ndarray]:
    frame = read_part(
        table_parts(out_dir, "condition_occurrence")[part],
        ["person_id", "condition_concept_id", "condition_start_datetime"],
    )
    is_t2d = frame.column("condition_concept_id").to_numpy() == cc.T2D
    person = frame.column("person_id").to_numpy()[is_t2d]
    when = from_datetime64(frame.column("condition_start_datetime").to_numpy(zero_copy_only=False))[is_t2d]
    order = np.lexsort((when, person))
    persons, first = np.unique(person[order], return_index=True)
    return persons, when[order][first]


def _auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    return float(roc_auc_score(labels, scores)) if 0 < labels.sum() < len(labels) else float("nan")


def cohort_figures(out_dir: str | Path, horizon_days: int = 730, seed: int = 0) -> dict[str, float | int]:
    """Prevalence, oracle AUROCs with and without true genetics, vocabulary size, events per person."""
    out_dir = Path(out_dir)
    true_y, p_gen, p_nogen, coded_y, coded_gen, coded_nogen = [], [], [], [], [], []
    for part in range(len(truth_parts(out_dir))):
        truth = load_truth(out_dir, parts=[part])
        visits = read_part(table_parts(out_dir, "visit_occurrence")[part], ["person_id", "visit_end_datetime"])
        person = visits.column("person_id").to_numpy()
        ends = from_datetime64(visits.column("visit_end_datetime").to_numpy(zero_copy_only=False))
        persons, t0 = prediction_times(person, ends, np.random.default_rng([seed, part, 7]))
        rows = truth.rows_of(persons)
        onset = truth.inputs.onsets["t2d"][rows]
        args = (truth.inputs, truth.death, truth.params)
        gen = t2d_onset_probability(*args, rows, t0, horizon_days, use_genetics=True)
        nogen = t2d_onset_probability(*args, rows, t0, horizon_days, use_genetics=False)
        eligible = onset > t0
        true_y.append(onset[eligible] <= t0[eligible] + horizon_days)
        p_gen.append(gen[eligible])
        p_nogen.append(nogen[eligible])
        coded_person, coded_day = _first_t2d_code(out_dir, part)
        code = np.full(len(persons), np.inf)
        pos = np.clip(np.searchsorted(coded_person, persons), 0, max(len(coded_person) - 1, 0))
        hit = (coded_person[pos] == persons) if len(coded_person) else np.zeros(len(persons), bool)
        code[hit] = coded_day[pos[hit]]
        both = eligible & (code > t0)
        coded_y.append(code[both] <= t0[both] + horizon_days)
        coded_gen.append(gen[both])
        coded_nogen.append(nogen[both])

    y, g, ng = (np.concatenate(x) for x in (true_y, p_gen, p_nogen))
    cy, cg, cng = (np.concatenate(x) for x in (coded_y, coded_gen, coded_nogen))
    auc_gen, auc_nogen = _auroc(y, g), _auroc(y, ng)
    return {
        "horizon_days": horizon_days,
        "eligible": int(len(y)),
        "prevalence": float(y.mean()) if len(y) else float("nan"),
        "oracle_auroc_genetic": auc_gen,
        "oracle_auroc_no_genetic": auc_nogen,
        "oracle_auroc_gap": auc_gen - auc_nogen,
        "coded_label_prevalence": float(cy.mean()) if len(cy) else float("nan"),
        "coded_label_oracle_auroc_genetic": _auroc(cy, cg),
        "coded_label_oracle_auroc_no_genetic": _auroc(cy, cng),
        **vocabulary_and_volume(out_dir),
    }


def vocabulary_and_volume(out_dir: Path) -> dict[str, float | int]:
    """Distinct concept codes used by the event tables, and event rows per person."""
    used: set[int] = set()
    events = 0
    for table, column in CONCEPT_COLUMN.items():
        for path in table_parts(out_dir, table):
            values = read_part(path, [column]).column(column).to_numpy()
            events += len(values)
            used.update(np.unique(values).tolist())
    used.discard(0)
    persons = sum(pq.read_metadata(p).num_rows if p.suffix == ".parquet" else read_part(p, ["person_id"]).num_rows
                  for p in table_parts(out_dir, "person"))  # fmt: skip
    return {"vocabulary_size": len(used), "events_per_person": events / max(persons, 1)}
