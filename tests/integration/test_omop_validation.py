"""The per-batch OMOP validator and the PersonIndex inside Ray Data map_batches on the session's cluster."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest

from ehrfm.omop.validation import (
    PersonIndex,
    find_tables,
    read_raw,
    validate_batch,
    validate_table,
)
from tests.support.omop_tables import (
    CONDITIONS,
    _cohort,
    _expected,
)


@pytest.mark.ray
def test_validate_batch_inside_ray_data_map_batches(tmp_path: Path, ray_cluster) -> None:
    """The per-batch validator and the PersonIndex travel to Ray Data workers unchanged."""
    import ray

    root = _cohort(tmp_path / "omop", "csv")
    person = validate_table(root, "person", None).kept
    death = validate_table(root, "death", PersonIndex.from_tables(person)).kept
    persons = PersonIndex.from_tables(person, death)
    raw = read_raw(find_tables(str(root))["condition_occurrence"], "condition_occurrence")

    def quarantine_reasons(batch: pa.Table) -> pa.Table:
        _, quarantine = validate_batch("condition_occurrence", batch, persons)
        return quarantine.select(["reason"])

    dataset = ray.data.from_arrow(raw).repartition(3)
    reasons = dataset.map_batches(quarantine_reasons, batch_format="pyarrow", batch_size=7).to_arrow_refs()
    counted: dict[str, int] = {}
    for table in ray.get(reasons):
        for reason in table["reason"].to_pylist():
            counted[reason] = counted.get(reason, 0) + 1
    expected = _expected(CONDITIONS)
    expected.pop("duplicate_primary_key")  # a cross-batch check: not done per batch
    assert counted == expected
