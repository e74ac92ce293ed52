"""OMOP CDM v5.4 tables from the simulated chunk: column names and types, rows, files.

Ids are int64 (person ids are large, event ids are chunk-offset counters), concept ids int32,
dates date32, datetimes timestamp[us], numbers float64; optional columns are written null.
CSV output uses ISO dates and 'YYYY-MM-DD HH:MM:SS' datetimes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from ehrfm_synthetic import concepts as cc

ID, CID, INT, NUM, STR = pa.int64(), pa.int32(), pa.int32(), pa.float64(), pa.string()
DATE, DT = pa.date32(), pa.timestamp("us")


def _columns(spec: str) -> list[tuple[str, pa.DataType]]:
    kinds = {"ID": ID, "CID": CID, "INT": INT, "NUM": NUM, "STR": STR, "DATE": DATE, "DT": DT}
    return [(name, kinds[kind]) for name, kind in (item.split(":") for item in spec.split())]


CDM_COLUMNS: dict[str, list[tuple[str, pa.DataType]]] = {
    "person": _columns(
        "person_id:ID gender_concept_id:CID year_of_birth:INT month_of_birth:INT day_of_birth:INT "
        "birth_datetime:DT race_concept_id:CID ethnicity_concept_id:CID location_id:ID provider_id:ID "
        "care_site_id:ID person_source_value:STR gender_source_value:STR gender_source_concept_id:CID "
        "race_source_value:STR race_source_concept_id:CID ethnicity_source_value:STR "
        "ethnicity_source_concept_id:CID"
    ),
    "observation_period": _columns(
        "observation_period_id:ID person_id:ID observation_period_start_date:DATE "
        "observation_period_end_date:DATE period_type_concept_id:CID"
    ),
    "visit_occurrence": _columns(
        "visit_occurrence_id:ID person_id:ID visit_concept_id:CID visit_start_date:DATE visit_start_datetime:DT "
        "visit_end_date:DATE visit_end_datetime:DT visit_type_concept_id:CID provider_id:ID care_site_id:ID "
        "visit_source_value:STR visit_source_concept_id:CID admitted_from_concept_id:CID "
        "admitted_from_source_value:STR discharged_to_concept_id:CID discharged_to_source_value:STR "
        "preceding_visit_occurrence_id:ID"
    ),
    "condition_occurrence": _columns(
        "condition_occurrence_id:ID person_id:ID condition_concept_id:CID condition_start_date:DATE "
        "condition_start_datetime:DT condition_end_date:DATE condition_end_datetime:DT "
        "condition_type_concept_id:CID condition_status_concept_id:CID stop_reason:STR provider_id:ID "
        "visit_occurrence_id:ID visit_detail_id:ID condition_source_value:STR condition_source_concept_id:CID "
        "condition_status_source_value:STR"
    ),
    "drug_exposure": _columns(
        "drug_exposure_id:ID person_id:ID drug_concept_id:CID drug_exposure_start_date:DATE "
        "drug_exposure_start_datetime:DT drug_exposure_end_date:DATE drug_exposure_end_datetime:DT "
        "verbatim_end_date:DATE drug_type_concept_id:CID stop_reason:STR refills:INT quantity:NUM "
        "days_supply:INT sig:STR route_concept_id:CID lot_number:STR provider_id:ID visit_occurrence_id:ID "
        "visit_detail_id:ID drug_source_value:STR drug_source_concept_id:CID route_source_value:STR "
        "dose_unit_source_value:STR"
    ),
    "procedure_occurrence": _columns(
        "procedure_occurrence_id:ID person_id:ID procedure_concept_id:CID procedure_date:DATE "
        "procedure_datetime:DT procedure_end_date:DATE procedure_end_datetime:DT procedure_type_concept_id:CID "
        "modifier_concept_id:CID quantity:INT provider_id:ID visit_occurrence_id:ID visit_detail_id:ID "
        "procedure_source_value:STR procedure_source_concept_id:CID modifier_source_value:STR"
    ),
    "measurement": _columns(
        "measurement_id:ID person_id:ID measurement_concept_id:CID measurement_date:DATE measurement_datetime:DT "
        "measurement_time:STR measurement_type_concept_id:CID operator_concept_id:CID value_as_number:NUM "
        "value_as_concept_id:CID unit_concept_id:CID range_low:NUM range_high:NUM provider_id:ID "
        "visit_occurrence_id:ID visit_detail_id:ID measurement_source_value:STR "
        "measurement_source_concept_id:CID unit_source_value:STR unit_source_concept_id:CID "
        "value_source_value:STR measurement_event_id:ID meas_event_field_concept_id:CID"
    ),
    "observation": _columns(
        "observation_id:ID person_id:ID observation_concept_id:CID observation_date:DATE observation_datetime:DT "
        "observation_type_concept_id:CID value_as_number:NUM value_as_string:STR value_as_concept_id:CID "
        "qualifier_concept_id:CID unit_concept_id:CID provider_id:ID visit_occurrence_id:ID visit_detail_id:ID "
        "observation_source_value:STR observation_source_concept_id:CID unit_source_value:STR "
        "qualifier_source_value:STR value_source_value:STR observation_event_id:ID obs_event_field_concept_id:CID"
    ),
    "death": _columns(
        "person_id:ID death_date:DATE death_datetime:DT death_type_concept_id:CID cause_concept_id:CID "
        "cause_source_value:STR cause_source_concept_id:CID"
    ),
    "concept": _columns(
        "concept_id:CID concept_name:STR domain_id:STR vocabulary_id:STR concept_class_id:STR "
        "standard_concept:STR concept_code:STR valid_start_date:DATE valid_end_date:DATE invalid_reason:STR"
    ),
}
CLINICAL_TABLES = tuple(t for t in CDM_COLUMNS if t != "concept")
# table -> its main concept column (the codes the pipeline turns into events)
CONCEPT_COLUMN = {
    "visit_occurrence": "visit_concept_id",
    "condition_occurrence": "condition_concept_id",
    "drug_exposure": "drug_concept_id",
    "procedure_occurrence": "procedure_concept_id",
    "measurement": "measurement_concept_id",
    "observation": "observation_concept_id",
}


def cdm_schema(table: str) -> pa.Schema:
    return pa.schema([pa.field(name, kind) for name, kind in CDM_COLUMNS[table]])


def build_table(table: str, values: dict[str, np.ndarray | pa.Array]) -> pa.Table:
    """A CDM table with every column of the spec; columns not given are null."""
    spec = CDM_COLUMNS[table]
    unknown = set(values) - {name for name, _ in spec}
    if unknown:
        raise KeyError(f"{table}: not CDM v5.4 columns: {sorted(unknown)}")
    length = len(next(iter(values.values()))) if values else 0
    arrays = []
    for name, kind in spec:
        if name not in values:
            arrays.append(pa.nulls(length, kind))
            continue
        arrays.append(_to_arrow(values[name], kind))
    return pa.Table.from_arrays(arrays, schema=cdm_schema(table))


def _to_arrow(value: np.ndarray | pa.Array, kind: pa.DataType) -> pa.Array:
    if isinstance(value, (pa.Array, pa.ChunkedArray)):
        return value.cast(kind)
    value = np.asarray(value)
    if kind == DATE:
        return pa.array(value.astype(np.int32), pa.int32()).cast(DATE)
    if kind == DT:
        return pa.array(value.astype(np.int64), pa.int64()).cast(DT)
    if pa.types.is_floating(kind):
        return pa.array(value.astype(np.float64), from_pandas=True)  # NaN -> null
    return pa.array(value, kind)


def source_values(concept_ids: np.ndarray) -> pa.Array:
    """The concept_code of each concept, as a string array (how ETLs fill *_source_value)."""
    table = cc.concept_table()
    ids = table.column("concept_id").to_numpy()
    order = np.argsort(ids, kind="stable")
    pos = np.clip(np.searchsorted(ids[order], concept_ids), 0, len(ids) - 1)
    found = ids[order[pos]] == concept_ids
    codes = table.column("concept_code").combine_chunks()
    taken = codes.take(pa.array(order[pos]))
    return pc.if_else(pa.array(found), taken, pa.nulls(len(found), pa.string()))


def write_table(table: pa.Table, path: Path, fmt: str) -> None:
    """Write one part (parquet, or csv with ISO dates and second-resolution datetimes)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "parquet":
        pq.write_table(table, path, compression="zstd")
        return
    columns = []
    for column, field in zip(table.columns, table.schema):
        if pa.types.is_timestamp(field.type):
            column = pc.strftime(column.cast(pa.timestamp("s")), format="%Y-%m-%d %H:%M:%S")
        columns.append(column)
    pacsv.write_csv(
        pa.Table.from_arrays(columns, names=table.column_names),
        path,
        write_options=pacsv.WriteOptions(quoting_style="needed"),
    )


def part_path(root: Path, table: str, part: int, fmt: str) -> Path:
    return root / "omop" / table / f"part-{part:05d}.{'parquet' if fmt == 'parquet' else 'csv'}"
