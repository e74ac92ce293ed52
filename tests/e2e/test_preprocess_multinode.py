"""The pipeline on a 2-node local Ray cluster (ray.cluster_utils.Cluster, 1 CPU per node, default
hash shuffle) writes the same bytes as on the session's single-node cluster. The cluster runs in a
subprocess, because this process already holds the session's Ray connection."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ehrfm.preprocess.config import PreprocessConfig
from ehrfm.preprocess.job import PreprocessInputs, run_preprocess
from ehrfm_synthetic.cohort import main as synthesize

pytestmark = [pytest.mark.ray, pytest.mark.e2e]
SETTINGS = {"subjects_per_shard": 40, "progress_bars": False, "tokenizer": {"min_count": 3}}

SCRIPT = """
import json, sys
import ray
from ray.cluster_utils import Cluster
from ehrfm.preprocess.job import PreprocessInputs, run_preprocess
from ehrfm.preprocess.config import PreprocessConfig

cohort, out, settings = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
cluster.add_node(num_cpus=1)
cluster.wait_for_nodes()
ray.init(address=cluster.address, log_to_driver=False)
nodes = [n for n in ray.nodes() if n["Alive"]]
report = run_preprocess(PreprocessConfig.model_validate(settings), PreprocessInputs.from_cohort(cohort), out)
print(json.dumps({"nodes": len(nodes), "cpus_per_node": sorted(n["Resources"].get("CPU", 0) for n in nodes),
                  "events": report["events"]["events"]}))
ray.shutdown()
cluster.shutdown()
"""


def test_two_node_cluster_gives_the_single_node_bytes(ray_cluster, tmp_path: Path) -> None:
    cohort = tmp_path / "cohort"
    assert synthesize(["--persons", "120", "--seed", "11", "--num-pgs", "3", "--out", str(cohort)]) == 0
    single = tmp_path / "single"
    report = run_preprocess(PreprocessConfig.model_validate(SETTINGS), PreprocessInputs.from_cohort(cohort), single)
    multi = tmp_path / "multi"
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(cohort), str(multi), json.dumps(SETTINGS)],
        capture_output=True,
        text=True,
        timeout=540,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    info = json.loads(result.stdout.strip().splitlines()[-1])
    assert info == {"nodes": 2, "cpus_per_node": [1.0, 1.0], "events": report["events"]["events"]}
    for sub in ("data", "prs", "timelines"):
        names = sorted(str(p.relative_to(single / sub)) for p in (single / sub).rglob("*.parquet"))
        assert len({n.rsplit("/", 1)[-1] for n in names}) == 3 and names == sorted(
            str(p.relative_to(multi / sub)) for p in (multi / sub).rglob("*.parquet")
        )
        for name in names:
            assert (single / sub / name).read_bytes() == (multi / sub / name).read_bytes(), f"{sub}/{name}"
    assert (single / "tokenizer.json").read_bytes() == (multi / "tokenizer.json").read_bytes()
    manifest = json.loads((multi / "timelines" / "manifest.json").read_text())
    assert manifest["num_pgs"] == 3 and manifest["counts"]["persons"] == 120
