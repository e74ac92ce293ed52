"""The real public OMOP samples preprocess end to end: Synthea27Nj (CDM 5.4, parquet, real lab values)
and GiBleed (CDM 5.3 csv). The distributed ingest must give exactly the row accounts of the
single-process validator (`omop.validate_omop`) on the same files."""

from __future__ import annotations

from pathlib import Path

import meds
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ehrfm.meds.writer import MEDS_DATA_SCHEMA
from ehrfm.omop.events import EVENT_SOURCES
from ehrfm.omop.validation import validate_omop
from ehrfm.preprocess.config import PreprocessConfig
from ehrfm.preprocess.job import PreprocessInputs, run_preprocess
from ehrfm.preprocess.tokenizer import Tokenizer
from ehrfm.prs.person import storable
from ehrfm.schemas import timeline_schema

pytestmark = pytest.mark.ray
CONFIG = PreprocessConfig.model_validate(
    {"progress_bars": False, "shuffle_strategy": "sort_shuffle_pull_based", "subjects_per_shard": 1000}
)
ACCOUNT_KEYS = ("rows_in", "rows_kept", "rows_quarantined", "by_reason")
EVENTS_PER_ROW = {
    "person": 4,
    "death": 1,
    "visit_occurrence": 2,
    **{t: 1 for t in EVENT_SOURCES if t != "visit_occurrence"},
}


def _check(root: Path, out: Path, report: dict, tmp: Path) -> pa.Table:
    expected = validate_omop(root, tmp / "validation")
    got = {t: {k: a[k] for k in ACCOUNT_KEYS} for t, a in report["tables"].items()}
    assert got == {t: {k: a[k] for k in ACCOUNT_KEYS} for t, a in expected["tables"].items()}
    events_expected = sum(EVENTS_PER_ROW.get(t, 0) * a["rows_kept"] for t, a in expected["tables"].items())
    assert report["events"]["events"] == events_expected
    events = pa.concat_tables([pq.read_table(p) for p in sorted((out / "data").rglob("*.parquet"))])
    assert events.schema == MEDS_DATA_SCHEMA and events.num_rows == events_expected
    meds.DataSchema.validate(events)
    assert events["time"].null_count == 3 * expected["persons"]  # gender, race, ethnicity: static
    codes = pq.read_table(out / meds.code_metadata_filepath)
    meds.CodeMetadataSchema.validate(codes)
    assert codes.num_rows == len(set(events["code"].to_pylist()))
    timelines = pa.concat_tables([pq.read_table(p) for p in sorted((out / "timelines").glob("part-*.parquet"))])
    assert timelines.schema == storable(timeline_schema(0))  # no PRS: prs is an empty list<float32>
    assert timelines["prs"].combine_chunks().flatten().to_pylist() == []
    assert timelines.num_rows == expected["persons"] == report["events"]["subjects"]
    return timelines


def test_synthea27nj_parquet(ray_cluster, shared_data: Path, tmp_path: Path) -> None:
    root = shared_data / "synthea27nj_omop54" / "parquet" / "Synthea27NjParquet"
    report = run_preprocess(CONFIG, PreprocessInputs(omop=str(root)), tmp_path / "out")
    assert {t: report["tables"][t]["rows_in"] for t in ("person", "visit_occurrence", "measurement", "death")} == {
        "person": 28,
        "visit_occurrence": 1791,
        "measurement": 10040,
        "death": 3,
    }
    timelines = _check(root, tmp_path / "out", report, tmp_path)
    tok = Tokenizer.load(tmp_path / "out" / "tokenizer.json")
    assert "LOINC/4548-4" in tok.value_edges  # HbA1c (3004410) has real values in this sample
    assert report["tokens"]["value_tokens"] > 0 and report["splits"]["train"] > 0
    events = pa.concat_tables(
        [pq.read_table(p, columns=["code"]) for p in (tmp_path / "out" / "data").rglob("*.parquet")]
    )
    assert events["code"].to_pylist().count("MEDS_DEATH") == 3
    assert timelines.num_rows == 28 and "MEDS_DEATH" not in tok.tokens  # 3 deaths: below min_count in train


def test_gibleed_cdm53_csv(ray_cluster, shared_data: Path, tmp_path: Path) -> None:
    root = shared_data / "gibleed_omop53"
    report = run_preprocess(CONFIG, PreprocessInputs(omop=str(root)), tmp_path / "out")
    assert (
        report["tables"]["person"]["rows_in"] == 2694 and report["tables"]["condition_occurrence"]["rows_in"] == 65332
    )
    assert report["tables"]["visit_occurrence"]["renamed_cdm53_columns"] == [
        "admitting_source_concept_id",
        "admitting_source_value",
        "discharge_to_concept_id",
        "discharge_to_source_value",
    ]
    timelines = _check(root, tmp_path / "out", report, tmp_path)
    assert report["tokens"]["value_tokens"] == 0  # GiBleed has no numeric measurement values
    assert min(len(t) for t in timelines["tokens"].to_pylist()) >= 2
