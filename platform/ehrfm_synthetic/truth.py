"""The generative truth, written under DIR/truth/ and read back only by the oracle and tests.

truth/persons/part-*.parquet  one row per person: ancestry, liabilities and their group means,
                              the lifestyle draws the hazards use, true onsets, true death,
                              the first visit each disease was coded at
truth/pgs.parquet             what each PGS id measures (trait, accuracy)
truth/params.json             the generative parameters used
The pipeline never reads these files.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ehrfm_synthetic.clinical import NO_VISIT, Diagnoses
from ehrfm_synthetic.disease import DiseaseHistory, HazardInputs
from ehrfm_synthetic.params import ANCESTRIES, TRAITS, GenerativeParams
from ehrfm_synthetic.population import Population
from ehrfm_synthetic.time import from_datetime64, to_datetime64
from ehrfm_synthetic.visits import ObservationWindow, Visits

ONSETS = ("prediabetes", "t2d", "hypertension", "cad", "stroke", "copd", "obesity")


def _days_to_timestamps(days: np.ndarray) -> pa.Array:
    values = to_datetime64(days, "ms")
    return pa.array(values, pa.timestamp("ms"), mask=np.isnat(values))


def truth_rows(
    pop: Population, hist: DiseaseHistory, window: ObservationWindow, visits: Visits, dx: Diagnoses
) -> pa.Table:
    cols: dict[str, pa.Array | np.ndarray] = {
        "person_id": pop.person_id,
        "sample_id": pa.array(np.where(pop.genotyped, pop.sample_id, None), pa.string()),
        "genotyped": pop.genotyped,
        "ancestry": pa.array(np.asarray(ANCESTRIES, dtype=object)[pop.ancestry], pa.string()),
        "male": pop.male,
        "birth_date": pa.array(pop.birth.astype(np.int32), pa.int32()).cast(pa.date32()),
        "observation_start": pa.array(window.start.astype(np.int32), pa.int32()).cast(pa.date32()),
        "observation_end": pa.array(window.end.astype(np.int32), pa.int32()).cast(pa.date32()),
        "death": _days_to_timestamps(hist.death),
        "death_recorded": window.death_recorded,
    }
    for i, trait in enumerate(TRAITS):
        cols[f"liability_{trait}"] = pop.liability[:, i]
    for i, trait in enumerate(TRAITS):
        cols[f"group_mean_{trait}"] = pop.group_mean[:, i]
    cols.update(
        bmi18=pop.bmi18, bmi_slope=pop.bmi_slope, smoke_start_age=pop.smoke_start_age,
        smoke_quit_age=pop.smoke_quit_age, cad_acute=hist.cad_acute,
    )  # fmt: skip
    for disease in ONSETS:
        cols[f"onset_{disease}"] = _days_to_timestamps(hist.onsets[disease])
    for disease, first in dx.first_visit.items():
        coded = first != NO_VISIT
        day = np.where(coded, visits.start_day[np.where(coded, first, 0)] if len(visits) else 0, 0)
        cols[f"first_coded_{disease}"] = pa.array(day.astype(np.int32), pa.int32(), mask=~coded).cast(pa.date32())
    return pa.table(cols)


@dataclass
class SyntheticTruth:
    """The truth of a generated cohort, ready for `oracle_t2d_risk`."""

    table: pa.Table
    person_id: np.ndarray
    inputs: HazardInputs
    death: np.ndarray  # float days, inf = alive at the cut-off
    params: GenerativeParams
    _order: np.ndarray

    def rows_of(self, person_ids: np.ndarray) -> np.ndarray:
        """Row of each person id; KeyError naming how many ids are unknown."""
        sorted_ids = self.person_id[self._order]
        pos = np.clip(np.searchsorted(sorted_ids, person_ids), 0, max(len(sorted_ids) - 1, 0))
        found = sorted_ids[pos] == person_ids if len(sorted_ids) else np.zeros(len(person_ids), bool)
        if not np.all(found):
            raise KeyError(f"{int((~found).sum())} of {len(person_ids)} person ids are not in the truth files")
        return self._order[pos]


def _days(table: pa.Table, column: str) -> np.ndarray:
    days = from_datetime64(table.column(column).to_numpy(zero_copy_only=False))
    return np.where(np.isnan(days), np.inf, days)


def truth_parts(out_dir: Path) -> list[Path]:
    return sorted((Path(out_dir) / "truth" / "persons").glob("part-*.parquet"))


def load_truth(out_dir: str | Path, parts: list[int] | None = None) -> SyntheticTruth:
    """Read the truth (all parts, or the listed part numbers) of the cohort in `out_dir`."""
    out_dir = Path(out_dir)
    files = truth_parts(out_dir)
    if not files:
        raise FileNotFoundError(f"{out_dir}/truth/persons: no truth parts (was this written by `ehrfm synthesize`?)")
    if parts is not None:
        files = [files[i] for i in parts]
    table = pa.concat_tables([pq.read_table(f) for f in files])
    params = GenerativeParams.model_validate(json.loads((out_dir / "truth" / "params.json").read_text()))
    birth = table.column("birth_date").cast(pa.int32()).to_numpy().astype(np.float64)
    inputs = HazardInputs(
        birth=birth,
        male=table.column("male").to_numpy(zero_copy_only=False),
        liability=np.column_stack([table.column(f"liability_{t}").to_numpy() for t in TRAITS]),
        group_mean=np.column_stack([table.column(f"group_mean_{t}").to_numpy() for t in TRAITS]),
        bmi18=table.column("bmi18").to_numpy(),
        bmi_slope=table.column("bmi_slope").to_numpy(),
        smoke_start_age=table.column("smoke_start_age").to_numpy(),
        smoke_quit_age=table.column("smoke_quit_age").to_numpy(),
        onsets={d: _days(table, f"onset_{d}") for d in ONSETS},
    )
    person_id = table.column("person_id").to_numpy()
    return SyntheticTruth(
        table=table,
        person_id=person_id,
        inputs=inputs,
        death=_days(table, "death"),
        params=params,
        _order=np.argsort(person_id, kind="stable"),
    )
