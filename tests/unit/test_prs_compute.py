"""The genotype readers' edge cases on bed-reader's fixtures (no Ray; `ehrfm score_prs` on the Ray Data path:
tests/integration/test_prs_compute.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from bed_reader import open_bed, to_bed

from ehrfm.genetics.genotypes import GenotypeError, open_genotypes

EDGE = "plink_edgecase_fixtures_bedreader"


def test_reader_edge_cases(shared_data: Path, tmp_path: Path) -> None:
    sim = open_genotypes(shared_data / EDGE / "plink_sim_10s_100v_10pmiss")
    assert sim.n_samples == 10 and len(sim.variants) == 100 and sim.sample_ids.tolist()[:3] == ["0", "1", "2"]
    assert sim.variants.iloc[0][["id", "a1", "a2"]].tolist() == ["1:1:A:C", "C", "A"]
    assert (
        int((open_bed(shared_data / EDGE / "plink_sim_10s_100v_10pmiss.bed").read(dtype="int8") == -127).sum()) == 111
    )
    small = open_genotypes(shared_data / EDGE / "small")  # non-integer cM and a text phenotype are ignored
    assert small.variants["chr"].tolist() == ["1", "1", "5", "Y"] and small.variants["pos"].tolist() == [
        1,
        100,
        1000,
        1004,
    ]
    (tmp_path / "lonely.bed").write_bytes((shared_data / EDGE / "small.bed").read_bytes())
    with pytest.raises(GenotypeError, match="lonely.bed: companion file lonely.bim is missing"):
        open_genotypes(tmp_path / "lonely")
    for name, iids in (("a", ["x", "y"]), ("b", ["x", "z"])):
        to_bed(tmp_path / f"fs_{name}.bed", np.zeros((2, 1), dtype=np.int8), properties={"iid": iids})
    with pytest.raises(GenotypeError, match="fs_b.fam: samples differ from fs_a.fam"):
        open_genotypes(tmp_path / "fs_*")
