"""The main job's genotype path on the session's Ray cluster: PRS computed from genotypes track the finished
scores (the stage bookkeeping: tests/unit; the whole job: tests/e2e)."""

import json

import pyarrow.parquet as pq
import pytest

from ehrfm.workflow import PipelineConfig, run_pipeline

pytestmark = pytest.mark.ray


def test_genotype_path_computes_prs_that_track_the_finished_scores(tmp_path, ray_cluster):
    """prs_source=genotypes: synthesize genotypes, score them on Ray Data, validate the result.

    The same seed in `scores` mode gives the finished scores the genotypes were drawn to track,
    so the computed PRS must correlate with them score by score.
    """
    import numpy as np

    from ehrfm.prs.readers import read_prs

    cfg = dict(persons=400, num_pgs=6)
    scores_run = run_pipeline(PipelineConfig(**cfg), tmp_path / "scores", until="score_prs")
    assert scores_run["score_prs"]["fingerprint"] == "disabled"
    wide = pq.read_table(tmp_path / "scores" / "cohort" / "prs" / "scores_wide.parquet").to_pandas()

    records = run_pipeline(PipelineConfig(prs_source="genotypes", **cfg), tmp_path / "geno", until="validate")
    assert set(records) == {"synthesize", "score_prs", "validate"}
    workdir = tmp_path / "geno"
    assert not (workdir / "cohort" / "prs" / "aggregated_scores.txt.gz").exists()
    computed = read_prs(workdir / "prs_computed" / "aggregated_scores.txt.gz")
    assert sorted(computed.sample_ids) == sorted(wide["sample_id"])
    order = wide.set_index("sample_id").loc[list(computed.sample_ids)]
    for k, pgs_id in enumerate(computed.pgs_ids):
        r = np.corrcoef(computed.values[:, k], order[pgs_id].to_numpy())[0, 1]
        assert r > 0.8, (pgs_id, r)
    report = json.loads((workdir / "validation" / "validation_report.json").read_text())
    assert report["prs"]["samples_kept"] == len(wide)
