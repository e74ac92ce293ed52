"""The task labeler's shards labeled as Ray tasks on the session's cluster match the local run."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ehrfm.tasks.definitions import resolve_task
from ehrfm.tasks.labeler import label_shards
from tests.support.labeler_events import many_visit_events, t2d_task


@pytest.mark.ray
def test_shards_labeled_as_ray_tasks_match_the_local_run(tmp_path, ray_cluster):
    table = many_visit_events(30, np.random.default_rng(4))
    subject = table["subject_id"].to_numpy()
    paths = []
    for i in range(3):
        paths.append(str(tmp_path / f"part-{i}.parquet"))
        pq.write_table(table.filter(pa.array(subject % 3 == i)), paths[-1])
    task = resolve_task(t2d_task(seed=3))
    local, local_account = label_shards(paths, task)
    remote, remote_account = label_shards(paths, task, use_ray=True)
    assert remote.equals(local) and remote_account.as_dict() == local_account.as_dict()
    assert remote_account.persons_in == 30
