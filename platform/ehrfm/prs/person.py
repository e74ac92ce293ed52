"""The PRS part of preprocessing: read, validate, map to persons, z-score on train, write prs/.

Output (schemas.prs_schema): one row per person of the OMOP person table, `prs` float32[K] in the
order of `prs/pgs_ids.json`, zeros and has_prs=false for persons without scores. The scores of a
person fit in memory many times over (K floats per person), so this runs in the driver.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ehrfm.constants import SPLITS
from ehrfm.prs.readers import check_build, read_pcs, read_prs, read_sample_map, validate_prs
from ehrfm.prs.transform import PrsTransform, fit_prs_transform
from ehrfm.schemas import prs_schema


@dataclass
class PrsInputs:
    scores: str
    sample_map: str | None = None
    pcs: str | None = None
    column: str = "SUM"
    sampleset: str | None = None
    adjust_ancestry: bool = True
    build: str | None = None  # genome build the scores must be on (checked by readers.check_build)


@dataclass
class PersonPrs:
    """Per-person PRS rows aligned with `subject_id` (sorted)."""

    pgs_ids: list[str]
    subject_id: np.ndarray
    values: np.ndarray  # float32 [n, K]
    has_prs: np.ndarray  # bool [n]
    transform: PrsTransform | None = None
    report: dict = field(default_factory=dict)

    @classmethod
    def empty(cls, subject_id: np.ndarray) -> PersonPrs:
        n = len(subject_id)
        return cls([], subject_id, np.zeros((n, 0), np.float32), np.zeros(n, bool), None, {"given": False})

    def rows(self, subject_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(values [m, K], has_prs [m]) for subjects (each must be a person)."""
        pos = np.searchsorted(self.subject_id, subject_ids)
        if len(subject_ids) and (pos.max() >= len(self.subject_id) or np.any(self.subject_id[pos] != subject_ids)):
            raise KeyError("PRS rows requested for subjects that are not in the person table")
        return self.values[pos], self.has_prs[pos]


def storable(schema: pa.Schema) -> pa.Schema:
    """`schema` with fixed_size_list<float32>[0] (no PRS given) as list<float32>: parquet cannot
    store zero-width fixed-size lists (pyarrow and polars fail to read them back), while empty
    variable lists read back as K = 0 values per row."""
    fields = []
    for f in schema:
        if pa.types.is_fixed_size_list(f.type) and f.type.list_size == 0:
            f = pa.field(f.name, pa.list_(f.type.value_type), nullable=f.nullable)
        fields.append(f)
    return pa.schema(fields, metadata=schema.metadata)


def stored_width(list_type: pa.DataType) -> int:
    """K of a stored PRS column: a fixed-size list's size, 0 for the empty variable lists that
    `storable` writes when no PRS was given."""
    return list_type.list_size if pa.types.is_fixed_size_list(list_type) else 0


def float32_vectors(values: np.ndarray) -> pa.Array:
    """[n, K] float32 -> fixed_size_list<float32>[K]; K = 0 (no PRS given) -> empty list<float32>."""
    n, k = values.shape
    if k == 0:
        return pa.array([[]] * n, type=pa.list_(pa.float32()))
    flat = pa.array(np.ascontiguousarray(values, dtype=np.float32).ravel(), pa.float32())
    return pa.FixedSizeListArray.from_arrays(flat, k)


def vectors_to_numpy(column: pa.Array | pa.ChunkedArray, k: int) -> np.ndarray:
    """fixed_size_list<float32>[K] -> [n, K] float32."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if k == 0:
        return np.zeros((len(column), 0), dtype=np.float32)
    return column.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(len(column), k)


def prs_arrow(subject_id: np.ndarray, values: np.ndarray, has_prs: np.ndarray) -> pa.Table:
    k = values.shape[1]
    vectors = float32_vectors(values)
    return pa.table(
        {"subject_id": pa.array(subject_id, pa.int64()), "prs": vectors, "has_prs": pa.array(has_prs, pa.bool_())},
        schema=storable(prs_schema(k)),
    )


def _pcs_for(samples: np.ndarray, inputs: PrsInputs) -> tuple[np.ndarray | None, dict]:
    """PC rows aligned with PRS sample ids (NaN rows where a sample has no PCs)."""
    if not inputs.pcs:
        return None, {}
    pc_samples, pcs = read_pcs(inputs.pcs)
    first: dict[str, int] = {}
    for i, sample in enumerate(pc_samples.tolist()):
        first.setdefault(sample, i)
    rows = np.array([first.get(s, -1) for s in samples.tolist()], dtype=np.int64)
    aligned = np.full((len(samples), pcs.shape[1]), np.nan)
    aligned[rows >= 0] = pcs[rows[rows >= 0]]
    return aligned, {
        "pcs_file": Path(inputs.pcs).name,
        "n_pcs": int(pcs.shape[1]),
        "pc_samples": int(len(pc_samples)),
        "duplicate_pc_samples": int(len(pc_samples) - len(first)),
        "persons_with_prs_without_pcs": int((rows < 0).sum()),
    }


def build_person_prs(
    inputs: PrsInputs, persons: object, person_split: np.ndarray, problems_out: Path | None
) -> PersonPrs:
    """Read, validate and z-score the PRS of `persons` (PersonIndex or sorted ids; `person_split` aligned)."""
    person_ids = np.asarray(getattr(persons, "person_id", persons), dtype=np.int64)
    build_check, warnings = check_build(inputs.scores, inputs.build)
    scores = read_prs(inputs.scores, column=inputs.column, sampleset=inputs.sampleset)
    sample_map = read_sample_map(inputs.sample_map) if inputs.sample_map else None
    kept, report = validate_prs(scores, sample_map, person_ids, problems_out=problems_out)
    pos = np.searchsorted(person_ids, kept.person_ids)
    train = person_split[pos] == 0
    pcs, pcs_report = _pcs_for(kept.sample_ids, inputs) if inputs.adjust_ancestry else (None, {})
    transform = fit_prs_transform(kept.values, train, kept.pgs_ids, pcs)
    z = transform.apply(kept.values, pcs)
    missing = ~np.isfinite(z)
    z[missing] = 0.0
    values = np.zeros((len(person_ids), len(kept.pgs_ids)), dtype=np.float32)
    has_prs = np.zeros(len(person_ids), dtype=bool)
    values[pos], has_prs[pos] = z, True
    splits = {name: int(has_prs[person_split == code].sum()) for code, name in enumerate(SPLITS)}
    report = {
        **report,
        **pcs_report,
        "given": True,
        "column": inputs.column,
        "build": inputs.build,
        "build_check": build_check,
        "warnings": warnings,
        "missing_scores_set_to_train_mean": int(missing.sum()),
        "persons_with_prs_by_split": splits,
        "coverage": float(has_prs.mean()) if len(has_prs) else 0.0,
        "transform": transform.summary,
    }
    return PersonPrs(list(kept.pgs_ids), person_ids, values, has_prs, transform, report)


def write_prs(out_dir: Path, person_prs: PersonPrs, shard: np.ndarray, n_shards: int) -> list[str]:
    """prs/part-XXXXX.parquet per shard (same subject hash as events and timelines) + pgs_ids.json."""
    out_dir.mkdir(parents=True, exist_ok=True)
    files = []
    for s in range(n_shards):
        rows = np.flatnonzero(shard == s)
        if len(rows) == 0:
            continue
        name = f"part-{s:05d}.parquet"
        pq.write_table(
            prs_arrow(person_prs.subject_id[rows], person_prs.values[rows], person_prs.has_prs[rows]), out_dir / name
        )
        files.append(name)
    (out_dir / "pgs_ids.json").write_text(json.dumps(person_prs.pgs_ids) + "\n", encoding="utf-8")
    if person_prs.transform is not None:
        person_prs.transform.save(out_dir / "transform.json")
    return files
