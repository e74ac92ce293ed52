"""OMOP CDM v5.4 column spec of the tables ehrfm reads, and the CDM 5.3 -> 5.4 column renames.

One place holds the names, types and required flags (from the CDM v5.4 DDL) so that the readers,
the validator and the synthetic cohort agree on them. Every CDM `integer` is int64 here (ids may be
negative or exceed 2^31 in real extracts), `NUMERIC` is float64, `date` is date32 and
`datetime` is timestamp[us] (wall-clock, no time zone).
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa

# Short type codes used in the column lists below.
_TYPES: dict[str, pa.DataType] = {
    "int": pa.int64(),
    "float": pa.float64(),
    "date": pa.date32(),
    "datetime": pa.timestamp("us"),
    "string": pa.string(),
}


@dataclass(frozen=True)
class ColumnSpec:
    """One CDM column: `kind` is one of int / float / date / datetime / string.

    `required`: a file without it is refused (and an empty required date quarantines the row).
    `expected`: NOT NULL in the DDL but not used by ehrfm (vocabulary tables): a file without it
    gets a warning, not a refusal, since trimmed vocabulary exports often drop such columns.
    """

    name: str
    kind: str
    required: bool
    expected: bool = False

    @property
    def arrow_type(self) -> pa.DataType:
        return _TYPES[self.kind]


@dataclass(frozen=True)
class TableSpec:
    """A CDM table: its columns in CDM order plus the keys the validator checks.

    `primary_key` is empty when rows have no identity to de-duplicate on; `person_column` is the
    column checked against the person table; `start_date`/`end_date` drive the end-before-start,
    before-birth and after-death checks.
    """

    name: str
    columns: tuple[ColumnSpec, ...]
    primary_key: tuple[str, ...] = ()
    person_column: str | None = None
    start_date: str | None = None
    end_date: str | None = None

    @property
    def column_names(self) -> list[str]:
        return [c.name for c in self.columns]

    @property
    def required_columns(self) -> list[str]:
        return [c.name for c in self.columns if c.required]

    @property
    def expected_columns(self) -> list[str]:
        """DDL NOT NULL columns ehrfm does not need: absent ones are warnings (see ColumnSpec)."""
        return [c.name for c in self.columns if c.expected]

    def column(self, name: str) -> ColumnSpec:
        for col in self.columns:
            if col.name == name:
                return col
        raise KeyError(f"{self.name} has no column {name!r}")

    @property
    def arrow_schema(self) -> pa.Schema:
        """Schema of the validated (kept) rows."""
        return pa.schema([pa.field(c.name, c.arrow_type) for c in self.columns])


_KIND_CODES = {"i": "int", "f": "float", "d": "date", "t": "datetime", "s": "string"}


def _columns(text: str) -> tuple[ColumnSpec, ...]:
    """Parse 'name:code[!|~]' items (code i/f/d/t/s; '!' = NOT NULL in the CDM DDL and needed;
    '~' = NOT NULL in the DDL but not needed by ehrfm, a warning when absent)."""
    out = []
    for item in text.split():
        name, code = item.split(":")
        out.append(ColumnSpec(name, _KIND_CODES[code.rstrip("!~")], code.endswith("!"), code.endswith("~")))
    return tuple(out)


def _table(name: str, columns: str, **keys: object) -> TableSpec:
    return TableSpec(name=name, columns=_columns(columns), **keys)  # type: ignore[arg-type]


_VISIT_TAIL = (
    "provider_id:i care_site_id:i {p}_source_value:s {p}_source_concept_id:i "
    "admitted_from_concept_id:i admitted_from_source_value:s "
)

_SPECS = [
    _table(
        "person",
        "person_id:i! gender_concept_id:i! year_of_birth:i! month_of_birth:i day_of_birth:i "
        "birth_datetime:t race_concept_id:i! ethnicity_concept_id:i! location_id:i provider_id:i "
        "care_site_id:i person_source_value:s gender_source_value:s gender_source_concept_id:i "
        "race_source_value:s race_source_concept_id:i ethnicity_source_value:s "
        "ethnicity_source_concept_id:i",
        primary_key=("person_id",),
        person_column="person_id",
    ),
    _table(
        "death",
        "person_id:i! death_date:d! death_datetime:t death_type_concept_id:i cause_concept_id:i "
        "cause_source_value:s cause_source_concept_id:i",
        primary_key=("person_id",),  # one death per person; the DDL has no key, the CDM rule does
        person_column="person_id",
        start_date="death_date",
    ),
    _table(
        "observation_period",
        "observation_period_id:i! person_id:i! observation_period_start_date:d! "
        "observation_period_end_date:d! period_type_concept_id:i!",
        primary_key=("observation_period_id",),
        person_column="person_id",
        start_date="observation_period_start_date",
        end_date="observation_period_end_date",
    ),
    _table(
        "visit_occurrence",
        "visit_occurrence_id:i! person_id:i! visit_concept_id:i! visit_start_date:d! "
        "visit_start_datetime:t visit_end_date:d! visit_end_datetime:t visit_type_concept_id:i! "
        + _VISIT_TAIL.format(p="visit")
        + "discharged_to_concept_id:i discharged_to_source_value:s preceding_visit_occurrence_id:i",
        primary_key=("visit_occurrence_id",),
        person_column="person_id",
        start_date="visit_start_date",
        end_date="visit_end_date",
    ),
    _table(
        "visit_detail",
        "visit_detail_id:i! person_id:i! visit_detail_concept_id:i! visit_detail_start_date:d! "
        "visit_detail_start_datetime:t visit_detail_end_date:d! visit_detail_end_datetime:t "
        "visit_detail_type_concept_id:i! "
        + _VISIT_TAIL.format(p="visit_detail")
        + "discharged_to_source_value:s discharged_to_concept_id:i preceding_visit_detail_id:i "
        "parent_visit_detail_id:i visit_occurrence_id:i!",
        primary_key=("visit_detail_id",),
        person_column="person_id",
        start_date="visit_detail_start_date",
        end_date="visit_detail_end_date",
    ),
    _table(
        "condition_occurrence",
        "condition_occurrence_id:i! person_id:i! condition_concept_id:i! condition_start_date:d! "
        "condition_start_datetime:t condition_end_date:d condition_end_datetime:t "
        "condition_type_concept_id:i! condition_status_concept_id:i stop_reason:s provider_id:i "
        "visit_occurrence_id:i visit_detail_id:i condition_source_value:s "
        "condition_source_concept_id:i condition_status_source_value:s",
        primary_key=("condition_occurrence_id",),
        person_column="person_id",
        start_date="condition_start_date",
        end_date="condition_end_date",
    ),
    _table(
        "drug_exposure",
        "drug_exposure_id:i! person_id:i! drug_concept_id:i! drug_exposure_start_date:d! "
        "drug_exposure_start_datetime:t drug_exposure_end_date:d! drug_exposure_end_datetime:t "
        "verbatim_end_date:d drug_type_concept_id:i! stop_reason:s refills:i quantity:f "
        "days_supply:i sig:s route_concept_id:i lot_number:s provider_id:i visit_occurrence_id:i "
        "visit_detail_id:i drug_source_value:s drug_source_concept_id:i route_source_value:s "
        "dose_unit_source_value:s",
        primary_key=("drug_exposure_id",),
        person_column="person_id",
        start_date="drug_exposure_start_date",
        end_date="drug_exposure_end_date",
    ),
    _table(
        "procedure_occurrence",
        "procedure_occurrence_id:i! person_id:i! procedure_concept_id:i! procedure_date:d! "
        "procedure_datetime:t procedure_end_date:d procedure_end_datetime:t "
        "procedure_type_concept_id:i! modifier_concept_id:i quantity:i provider_id:i "
        "visit_occurrence_id:i visit_detail_id:i procedure_source_value:s "
        "procedure_source_concept_id:i modifier_source_value:s",
        primary_key=("procedure_occurrence_id",),
        person_column="person_id",
        start_date="procedure_date",
        end_date="procedure_end_date",
    ),
    _table(
        "device_exposure",
        "device_exposure_id:i! person_id:i! device_concept_id:i! device_exposure_start_date:d! "
        "device_exposure_start_datetime:t device_exposure_end_date:d device_exposure_end_datetime:t "
        "device_type_concept_id:i! unique_device_id:s production_id:s quantity:i provider_id:i "
        "visit_occurrence_id:i visit_detail_id:i device_source_value:s device_source_concept_id:i "
        "unit_concept_id:i unit_source_value:s unit_source_concept_id:i",
        primary_key=("device_exposure_id",),
        person_column="person_id",
        start_date="device_exposure_start_date",
        end_date="device_exposure_end_date",
    ),
    _table(
        "measurement",
        "measurement_id:i! person_id:i! measurement_concept_id:i! measurement_date:d! "
        "measurement_datetime:t measurement_time:s measurement_type_concept_id:i! "
        "operator_concept_id:i value_as_number:f value_as_concept_id:i unit_concept_id:i "
        "range_low:f range_high:f provider_id:i visit_occurrence_id:i visit_detail_id:i "
        "measurement_source_value:s measurement_source_concept_id:i unit_source_value:s "
        "unit_source_concept_id:i value_source_value:s measurement_event_id:i "
        "meas_event_field_concept_id:i",
        primary_key=("measurement_id",),
        person_column="person_id",
        start_date="measurement_date",
    ),
    _table(
        "observation",
        "observation_id:i! person_id:i! observation_concept_id:i! observation_date:d! "
        "observation_datetime:t observation_type_concept_id:i! value_as_number:f value_as_string:s "
        "value_as_concept_id:i qualifier_concept_id:i unit_concept_id:i provider_id:i "
        "visit_occurrence_id:i visit_detail_id:i observation_source_value:s "
        "observation_source_concept_id:i unit_source_value:s qualifier_source_value:s "
        "value_source_value:s observation_event_id:i obs_event_field_concept_id:i",
        primary_key=("observation_id",),
        person_column="person_id",
        start_date="observation_date",
    ),
    _table(
        "concept",
        # a vocabulary table, read leniently: a concept is its id, vocabulary and code; the other
        # NOT NULL columns (name and domain: the labeler's name matching) are warnings when absent
        "concept_id:i! concept_name:s~ domain_id:s~ vocabulary_id:s! concept_class_id:s~ "
        "standard_concept:s concept_code:s! valid_start_date:d~ valid_end_date:d~ invalid_reason:s",
        primary_key=("concept_id",),
        start_date="valid_start_date",
        end_date="valid_end_date",
    ),
    _table(
        "concept_ancestor",
        "ancestor_concept_id:i! descendant_concept_id:i! min_levels_of_separation:i~ max_levels_of_separation:i~",
        primary_key=("ancestor_concept_id", "descendant_concept_id"),  # natural key (DDL has none)
    ),
]

CDM_TABLES: dict[str, TableSpec] = {spec.name: spec for spec in _SPECS}

# Order in which validate_omop processes tables: person and death first (they build the
# PersonIndex every other person-linked table is checked against).
TABLE_ORDER: tuple[str, ...] = tuple(spec.name for spec in _SPECS)

# CDM 5.3 column names that 5.4 renamed, per table.
_VISIT_RENAMES = {
    "admitting_source_concept_id": "admitted_from_concept_id",
    "admitting_source_value": "admitted_from_source_value",
    "discharge_to_concept_id": "discharged_to_concept_id",
    "discharge_to_source_value": "discharged_to_source_value",
}
CDM53_RENAMES: dict[str, dict[str, str]] = {
    "visit_occurrence": dict(_VISIT_RENAMES),
    "visit_detail": {**_VISIT_RENAMES, "visit_detail_parent_id": "parent_visit_detail_id"},
}

# Quarantine reason codes in priority order: a row failing several checks gets the first.
REASONS: tuple[str, ...] = (
    "malformed_row",  # csv line with the wrong number of fields (cannot be split into columns)
    "missing_person_id",
    "unknown_person_id",
    "unparsable_date",  # includes an empty cell in a required (NOT NULL) date column
    "unparsable_number",  # includes NaN / infinity in a numeric column
    "missing_concept_id",  # empty main concept id of a clinical table (0 = "no matching concept" is kept)
    "before_1900",  # plausibility rules (omop.plausibility): start date before 1900-01-01,
    "after_extraction_date",  # after the data's extraction date (cdm_source, config or run date)
    "end_before_start",
    "before_birth",
    "after_death",  # start date more than AFTER_DEATH_GRACE_DAYS after the death date
    "after_observation_period",  # more than the slack after the person's last observation end
    "duplicate_primary_key",
)
AFTER_DEATH_GRACE_DAYS = 30
