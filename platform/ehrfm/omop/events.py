"""Validated OMOP rows -> MEDS events: `subject_id, time, code, numeric_value` (+ visit_id, visit_type).

Codes come from a code book (`ehrfm.meds.codes.CodeBook`, passed in: this layer sits above it):
`<vocabulary_id>/<concept_code>` for concepts of the cohort's concept table (`SNOMED/44054006`,
`Visit/IP`, `Gender/F`), else the id form namespaced by domain (`CONDITION/201826`, `VISIT/9202`);
without a book every code takes the id form. Each event keeps its OMOP concept id (`concept_id`
column). Each person gets a `MEDS_BIRTH` event and, at the same time, the demographic codes (static:
the MEDS dataset writes them with a null time); a death row gives `MEDS_DEATH`. A visit gives its
code at its start and `VISIT_END/<that code>` (`VISIT_END/Visit/IP`; `VISIT_END/<id>` in the id
form) at its end, both carrying the visit id, so visit boundaries survive in the event stream (the
labelers take the latest event of a visit as its end).

An event's time is the row's `*_datetime` when it falls on the row's `*_date`, else that date at
midnight: the date column is what the validator checked against birth and death, so it decides
the day. Every function here works on one batch and is pure, so the Ray workers and the
single-process reference produce the same events.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Protocol

import meds
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ehrfm.omop.cast import days_from_ymd
from ehrfm.omop.units import canonical_values
from ehrfm.omop.validation import _ints as _numpy_int  # (int64 values with nulls as 0, valid mask)
from ehrfm.schemas import EVENT_SCHEMA

DAY_US = 86_400_000_000
BIRTH_CODE = meds.birth_code  # "MEDS_BIRTH"
DEATH_CODE = meds.death_code  # "MEDS_DEATH"
PRIORITY_COLUMN = "_priority"
SHARD_COLUMN = "_shard"
CONCEPT_COLUMN = "concept_id"  # the OMOP concept id behind an event (null for birth/death); kept in MEDS
_FLOAT32_MAX = float(np.finfo(np.float32).max)

# Order of events that share a time (and, in timelines, a day): birth and demographics first, a
# visit's start before its contents, its end after them, death last. Both code forms are listed
# (id form `GENDER/8532`, vocabulary form `Gender/F`).
PRIORITY_PREFIXES: tuple[tuple[str, int], ...] = (
    (BIRTH_CODE, 0),
    ("GENDER/", 1),
    ("Gender/", 1),
    ("RACE/", 2),
    ("Race/", 2),
    ("ETHNICITY/", 3),
    ("Ethnicity/", 3),
    ("VISIT/", 4),
    ("Visit/", 4),
    ("VISIT_END/", 8),
    (DEATH_CODE, 9),
)
CLINICAL_PRIORITY = 5
STATIC_PRIORITIES = (1, 2, 3)  # the person's demographic codes: static (null time) in the MEDS dataset
VISIT_END_PREFIX = "VISIT_END"


class Coder(Protocol):
    """What the events need of a code book (`ehrfm.meds.codes.CodeBook.codes`)."""

    def codes(self, domain: str, concept_ids: pa.Array | pa.ChunkedArray) -> pa.Array: ...


# Events with the bookkeeping columns used between the ingest and the per-shard sort (all nullable:
# blocks from different tasks must concatenate in the shuffle).
STAGED_SCHEMA = pa.schema(
    [pa.field(f.name, f.type) for f in EVENT_SCHEMA]
    + [pa.field(CONCEPT_COLUMN, pa.int64()), pa.field(PRIORITY_COLUMN, pa.int8()), pa.field(SHARD_COLUMN, pa.int32())]
)


@dataclass(frozen=True)
class EventSource:
    """Where one OMOP table's events come from: code prefix, concept column, time columns."""

    prefix: str
    concept: str
    date: str
    datetime: str | None
    value: str | None = None
    visit: str | None = "visit_occurrence_id"
    end_date: str | None = None  # visits only: a VISIT_END event at the end
    end_datetime: str | None = None
    source_value: str | None = None  # unmapped rows (concept 0/null) keep this as `PREFIX/source/<value>`
    unit: bool = False  # values converted to the analyte's canonical unit (ehrfm.omop.units)


EVENT_SOURCES: dict[str, EventSource] = {
    "visit_occurrence": EventSource(
        "VISIT",
        "visit_concept_id",
        "visit_start_date",
        "visit_start_datetime",
        end_date="visit_end_date",
        end_datetime="visit_end_datetime",
    ),
    "condition_occurrence": EventSource(
        "CONDITION",
        "condition_concept_id",
        "condition_start_date",
        "condition_start_datetime",
        source_value="condition_source_value",
    ),
    "drug_exposure": EventSource(
        "DRUG",
        "drug_concept_id",
        "drug_exposure_start_date",
        "drug_exposure_start_datetime",
        source_value="drug_source_value",
    ),
    "procedure_occurrence": EventSource(
        "PROCEDURE",
        "procedure_concept_id",
        "procedure_date",
        "procedure_datetime",
        source_value="procedure_source_value",
    ),
    "device_exposure": EventSource(
        "DEVICE",
        "device_concept_id",
        "device_exposure_start_date",
        "device_exposure_start_datetime",
        source_value="device_source_value",
    ),
    "measurement": EventSource(
        "MEASUREMENT",
        "measurement_concept_id",
        "measurement_date",
        "measurement_datetime",
        value="value_as_number",
        source_value="measurement_source_value",
        unit=True,
    ),
    "observation": EventSource(
        "OBSERVATION",
        "observation_concept_id",
        "observation_date",
        "observation_datetime",
        value="value_as_number",
        source_value="observation_source_value",
    ),
}
SOURCE_SEGMENT = "source"  # `CONDITION/source/E11.9`: an unmapped row coded by its source value
SOURCE_VALUE_MAX_CHARS = 64


# ---- small helpers ------------------------------------------------------------------------------
def event_time_us(
    date: pa.Array | pa.ChunkedArray, stamp: pa.Array | pa.ChunkedArray | None
) -> tuple[np.ndarray, np.ndarray]:
    """(microseconds since epoch, valid) from a date column and an optional datetime column."""
    days, has_day = _numpy_int(date)
    midnight = days * DAY_US
    if stamp is None:
        return midnight, has_day
    us, has_stamp = _numpy_int(stamp)
    same_day = has_stamp & (np.floor_divide(us, DAY_US) == days)
    return np.where(same_day, us, midnight), has_day


def concept_codes(prefix: str, concept: pa.Array | pa.ChunkedArray, book: Coder | None = None) -> tuple[pa.Array, int]:
    """(codes, number of null concept ids written as 0, OMOP's 'no matching concept').

    The book's codes (`<vocabulary>/<concept_code>` for the concepts it knows, `PREFIX/<id>` for
    the rest); without a book the id form `PREFIX/<id>`.

    In the pipeline no clinical row reaches here with a null main concept id: the validator
    quarantines it (`missing_concept_id`), so NULL and 0 never share a code; the count stays for
    the person's demographic concepts and for direct callers.
    """
    nulls = concept.null_count
    if book is not None:
        return book.codes(prefix, concept), nulls
    text = pc.cast(pc.fill_null(concept, 0), pa.string())
    return pc.binary_join_element_wise(prefix, text, "/"), nulls


def source_codes(
    prefix: str,
    concept: pa.Array | pa.ChunkedArray,
    source: pa.Array | pa.ChunkedArray | None,
    book: Coder | None = None,
) -> tuple[pa.Array, int, int]:
    """(codes, unmapped rows, unmapped rows coded by their source value) for one concept column.

    A row with concept id 0 or null ("no matching concept") and a non-empty source value gets
    `PREFIX/source/<value>` (trimmed, at most SOURCE_VALUE_MAX_CHARS characters; `/` kept): it is
    then a code like any other (own vocabulary entry, own value bins). Without a source value it
    stays `PREFIX/0`.
    """
    codes, _ = concept_codes(prefix, concept, book)
    unmapped = pc.fill_null(pc.equal(pc.fill_null(concept, 0), 0), True)
    n_unmapped = int(pc.sum(unmapped).as_py() or 0)
    if source is None or n_unmapped == 0:
        return codes, n_unmapped, 0
    text = pc.utf8_slice_codeunits(pc.utf8_trim_whitespace(pc.cast(source, pa.string())), 0, SOURCE_VALUE_MAX_CHARS)
    has_text = pc.fill_null(pc.greater(pc.utf8_length(text), 0), False)
    use = pc.and_(unmapped, has_text)
    from_source = pc.binary_join_element_wise(f"{prefix}/{SOURCE_SEGMENT}", pc.fill_null(text, ""), "/")
    return pc.if_else(use, from_source, codes), n_unmapped, int(pc.sum(use).as_py() or 0)


def _float32_values(values: pa.Array | pa.ChunkedArray) -> tuple[pa.Array, int]:
    """float32 values; magnitudes beyond float32 become null and are counted (never silently inf)."""
    values = pc.cast(values, pa.float64())
    too_big = pc.fill_null(pc.greater(pc.abs(values), _FLOAT32_MAX), False)
    overflow = int(pc.sum(too_big).as_py() or 0)
    if overflow:
        values = pc.if_else(too_big, pa.scalar(None, pa.float64()), values)
    return pc.cast(values, pa.float32()), overflow


def visit_end_codes(start_codes: pa.Array) -> pa.Array:
    """`VISIT_END/<start code>` (`VISIT_END/Visit/IP`); an id-form start `VISIT/9201` -> `VISIT_END/9201`."""
    id_form = pc.fill_null(pc.starts_with(start_codes, "VISIT/"), False)
    stripped = pc.replace_substring_regex(start_codes, "^VISIT/", f"{VISIT_END_PREFIX}/")
    prefixed = pc.binary_join_element_wise(VISIT_END_PREFIX, start_codes, "/")
    return pc.if_else(id_form, stripped, prefixed)


def _int64_ids(concept: pa.Array | pa.ChunkedArray) -> pa.Array:
    concept = concept.combine_chunks() if isinstance(concept, pa.ChunkedArray) else concept
    return pc.cast(concept, pa.int64())


def _events(
    subject: np.ndarray | pa.Array,
    time_us: np.ndarray,
    code: pa.Array,
    priority: int | np.ndarray,
    value: pa.Array | None = None,
    visit: pa.Array | None = None,
    visit_type: pa.Array | None = None,
    concept: pa.Array | None = None,
) -> pa.Table:
    n = len(time_us)
    priorities = np.broadcast_to(np.asarray(priority, dtype=np.int8), (n,))
    return pa.table(
        {
            "subject_id": pa.array(subject, pa.int64()),
            "time": pa.array(np.asarray(time_us, dtype=np.int64), pa.int64()).cast(pa.timestamp("us")),
            "code": code,
            "numeric_value": value if value is not None else pa.nulls(n, pa.float32()),
            "visit_id": visit if visit is not None else pa.nulls(n, pa.int64()),
            "visit_type": visit_type if visit_type is not None else pa.nulls(n, pa.string()),
            CONCEPT_COLUMN: concept if concept is not None else pa.nulls(n, pa.int64()),
            PRIORITY_COLUMN: pa.array(priorities, pa.int8()),
        }
    )


# ---- OMOP tables -> events ----------------------------------------------------------------------
@dataclass
class EventCounts:
    """What the mapping had to decide, per batch: reported, never silent."""

    events: int = 0
    null_concept_ids: int = 0
    values_beyond_float32: int = 0
    unmapped_rows: int = 0  # concept id 0 or null
    unmapped_coded_by_source: int = 0  # of those, coded `PREFIX/source/<value>`
    values: dict[str, int] = field(default_factory=dict)  # unit counts, conversions (ehrfm.omop.units)

    def add(self, other: EventCounts) -> None:
        self.events += other.events
        self.null_concept_ids += other.null_concept_ids
        self.values_beyond_float32 += other.values_beyond_float32
        self.unmapped_rows += other.unmapped_rows
        self.unmapped_coded_by_source += other.unmapped_coded_by_source
        for key, n in other.values.items():
            self.values[key] = self.values.get(key, 0) + n

    def as_dict(self) -> dict[str, int]:
        out = {
            "events": self.events,
            "null_concept_ids": self.null_concept_ids,
            "values_beyond_float32": self.values_beyond_float32,
        }
        if self.unmapped_rows:
            out["unmapped_rows"] = self.unmapped_rows
            out["unmapped_coded_by_source"] = self.unmapped_coded_by_source
        return {**out, **dict(sorted(self.values.items()))}


def table_events(table: str, kept: pa.Table, book: Coder | None = None) -> tuple[pa.Table, EventCounts]:
    """Events of validated rows of one clinical table (EVENT_SCHEMA columns + `concept_id`, `_priority`)."""
    source = EVENT_SOURCES[table]
    counts = EventCounts()
    subject = kept["person_id"].combine_chunks()
    start, _ = event_time_us(kept[source.date], kept[source.datetime] if source.datetime else None)
    concept = kept[source.concept].combine_chunks()
    concept_ids = _int64_ids(concept)
    codes, counts.null_concept_ids = concept_codes(source.prefix, concept, book)
    if source.end_date is None:
        text = kept[source.source_value].combine_chunks() if source.source_value in kept.column_names else None
        codes, counts.unmapped_rows, counts.unmapped_coded_by_source = source_codes(source.prefix, concept, text, book)
    visit = kept[source.visit].combine_chunks() if source.visit else None
    value = None
    if source.value:
        raw = kept[source.value].combine_chunks()
        if source.unit:
            unit_concept = kept["unit_concept_id"].combine_chunks() if "unit_concept_id" in kept.column_names else None
            unit_text = kept["unit_source_value"].combine_chunks() if "unit_source_value" in kept.column_names else None
            raw, counts.values = canonical_values(concept, raw, unit_concept, unit_text)
        value, counts.values_beyond_float32 = _float32_values(raw)
    if source.end_date is None:
        events = _events(subject, start, codes, CLINICAL_PRIORITY, value, visit, concept=concept_ids)
    else:  # a visit: start and end events, typed by the visit concept
        visit_type = pc.cast(pc.fill_null(kept[source.concept].combine_chunks(), 0), pa.string())
        end, _ = event_time_us(kept[source.end_date], kept[source.end_datetime])
        end = np.maximum(end, start)  # a date-only end on the start day must not precede the start
        end_codes = visit_end_codes(codes)
        events = pa.concat_tables(
            [
                _events(subject, start, codes, 4, None, visit, visit_type, concept_ids),
                _events(subject, end, end_codes, 8, None, visit, visit_type, concept_ids),
            ]
        )
    counts.events = events.num_rows
    return events, counts


def birth_time_us(person: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """(birth time in microseconds, valid): birth_datetime, else year/month/day at midnight."""
    stamp, has_stamp = _numpy_int(person["birth_datetime"])
    year, has_year = _numpy_int(person["year_of_birth"])
    month, has_month = _numpy_int(person["month_of_birth"])
    day, has_day = _numpy_int(person["day_of_birth"])
    valid, days = days_from_ymd(year, np.where(has_month, month, 1), np.where(has_day, day, 1))
    return np.where(has_stamp, stamp, days * DAY_US), has_stamp | (valid & has_year)


def person_events(person: pa.Table, book: Coder | None = None) -> tuple[pa.Table, EventCounts]:
    """MEDS_BIRTH plus the gender/race/ethnicity codes at the birth time, for validated person rows
    (at birth here, so timelines put them first; the MEDS dataset writes them with a null time)."""
    counts = EventCounts()
    birth, valid = birth_time_us(person)
    if not valid.all():  # the validator quarantines these; reaching here is a bug upstream
        raise ValueError(f"person: {int((~valid).sum())} validated rows have no usable birth date")
    subject = person["person_id"].combine_chunks()
    n = person.num_rows
    parts = [_events(subject, birth, pa.array([BIRTH_CODE] * n, pa.string()), 0)]
    for priority, (prefix, column) in enumerate(
        (("GENDER", "gender_concept_id"), ("RACE", "race_concept_id"), ("ETHNICITY", "ethnicity_concept_id")), start=1
    ):
        concept = person[column].combine_chunks()
        codes, nulls = concept_codes(prefix, concept, book)
        counts.null_concept_ids += nulls
        parts.append(_events(subject, birth, codes, priority, concept=_int64_ids(concept)))
    events = pa.concat_tables(parts)
    counts.events = events.num_rows
    return events, counts


def death_events(death: pa.Table) -> tuple[pa.Table, EventCounts]:
    """One MEDS_DEATH per validated death row (the validator already removed repeated persons)."""
    time_us, _ = event_time_us(death["death_date"], death["death_datetime"])
    events = _events(
        death["person_id"].combine_chunks(), time_us, pa.array([DEATH_CODE] * death.num_rows, pa.string()), 9
    )
    return events, EventCounts(events=events.num_rows)


# ---- MEDS input ---------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1 << 16)  # a served person repeats the same few hundred codes, request after request
def _priority_of(code: str) -> int:
    priority = CLINICAL_PRIORITY
    for prefix, value in PRIORITY_PREFIXES:  # the last matching prefix wins
        if code.startswith(prefix) and (code == prefix or prefix not in (BIRTH_CODE, DEATH_CODE)):
            priority = value
    return priority


def code_priority(codes: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """int8 priority per code from its prefix (PRIORITY_PREFIXES; clinical codes and nulls otherwise).

    Decided once per distinct code, then gathered per row: a shard holds millions of rows but
    thousands of codes, and a served person a few dozen rows, where the per-prefix compute calls
    this replaces were a third of the featurization time.
    """
    if isinstance(codes, pa.ChunkedArray):
        codes = codes.combine_chunks()
    encoded = codes if pa.types.is_dictionary(codes.type) else codes.dictionary_encode()
    per_code = [_priority_of(code) for code in encoded.dictionary.to_pylist()]
    table = np.array([*per_code, CLINICAL_PRIORITY], dtype=np.int8)  # the last entry: null codes
    rows = pc.fill_null(encoded.indices, len(per_code)).to_numpy(zero_copy_only=False)
    return table[rows]


MEDS_REASONS = ("missing_subject_id", "missing_code", "no_birth_event", "before_birth")


def stage_meds(raw: pa.Table) -> pa.Table:
    """A MEDS data batch in the staged layout (EVENT_SCHEMA columns + `_priority`), nothing dropped yet.

    Rows that cannot be placed (no subject, no code, no birth) are sorted out per shard by
    `place_meds_events`, where the whole subject is in view, so every row is accounted for there.
    """
    try:
        meds.DataSchema.validate(raw.schema)
    except Exception as exc:  # the schema library names columns and types, never values
        raise ValueError(f"MEDS input does not match meds.DataSchema: {exc}") from None
    columns = {}
    for field_ in EVENT_SCHEMA:
        if field_.name in raw.column_names:
            columns[field_.name] = pc.cast(raw[field_.name], field_.type)
        else:
            columns[field_.name] = pa.nulls(raw.num_rows, field_.type)
    codes = raw["code"].combine_chunks() if raw.num_rows else pa.array([], pa.string())
    concept = raw[CONCEPT_COLUMN] if CONCEPT_COLUMN in raw.column_names else pa.nulls(raw.num_rows, pa.int64())
    columns[CONCEPT_COLUMN] = pc.cast(concept, pa.int64(), safe=False)
    columns[PRIORITY_COLUMN] = pa.array(code_priority(codes), pa.int8())
    return pa.table(columns)


def place_meds_events(events: pa.Table) -> tuple[pa.Table, pa.Table]:
    """(placeable events, dropped rows with a `reason`) for one subject-complete shard of MEDS input.

    Static events (null time) go to the subject's MEDS_BIRTH time (the earliest, if several).
    Dropped, in this order: no subject_id, no code, no birth event for the subject, before birth.
    """
    subject, has_subject = _numpy_int(events["subject_id"])
    time_us, has_time = _numpy_int(events["time"])
    has_code = events["code"].is_valid().to_numpy(zero_copy_only=False)
    is_birth = pc.fill_null(pc.equal(events["code"], BIRTH_CODE), False).to_numpy(zero_copy_only=False)
    is_birth &= has_time & has_subject
    births = np.lexsort((time_us[is_birth], subject[is_birth]))
    birth_subjects, birth_times = subject[is_birth][births], time_us[is_birth][births]
    first = np.r_[True, birth_subjects[1:] != birth_subjects[:-1]] if len(birth_subjects) else np.zeros(0, bool)
    birth_subjects, birth_times = birth_subjects[first], birth_times[first]
    has_birth = np.zeros(len(subject), dtype=bool)
    birth_of_row = np.zeros(len(subject), dtype=np.int64)
    if len(birth_subjects):
        pos = np.minimum(np.searchsorted(birth_subjects, subject), len(birth_subjects) - 1)
        has_birth = has_subject & (birth_subjects[pos] == subject)
        birth_of_row = birth_times[pos]
    time_us = np.where(has_time, time_us, birth_of_row)
    before = has_birth & (np.floor_divide(time_us, DAY_US) < np.floor_divide(birth_of_row, DAY_US))
    reason = np.full(len(subject), -1, dtype=np.int8)
    for code, rows in enumerate((~has_subject, ~has_code, ~has_birth, before)):
        reason[(reason < 0) & rows] = code
    events = events.set_column(
        events.schema.get_field_index("time"), "time", pa.array(time_us, pa.int64()).cast(pa.timestamp("us"))
    )
    dropped_rows = np.flatnonzero(reason >= 0)
    dropped = events.take(pa.array(dropped_rows)).drop_columns([c for c in events.column_names if c.startswith("_")])
    dropped = dropped.append_column(
        "reason", pa.array(np.asarray(MEDS_REASONS, dtype=object)[reason[dropped_rows]].tolist(), pa.string())
    )
    return events.filter(pa.array(reason < 0)), dropped


# ---- one shard ------------------------------------------------------------------------------------
SORT_COLUMNS = ("subject_id", "time", PRIORITY_COLUMN, "code", "numeric_value", "visit_id", "visit_type")
SORT_KEYS = [(name, "ascending", "at_end") for name in SORT_COLUMNS]  # nulls last everywhere


def fill_visit_types(events: pa.Table) -> pa.Table:
    """visit_type on every event that carries a visit id and no type yet, from the visit's own
    start/end events (same subject and id) (row order is not kept: the shard is sorted next).

    Needs every event of each subject in `events` (one shard): a visit and its contents are then
    together. An event whose visit id names no visit of its subject keeps visit_type null.
    """
    visits = events.filter(pc.is_valid(events["visit_type"]))  # visit start/end events carry the type
    if visits.num_rows == 0:
        return events
    lookup = visits.group_by(["subject_id", "visit_id"]).aggregate([("visit_type", "min")])
    joined = events.join(lookup, keys=["subject_id", "visit_id"], join_type="left outer")
    filled = pc.coalesce(joined["visit_type"], joined["visit_type_min"])
    joined = joined.set_column(joined.schema.get_field_index("visit_type"), "visit_type", filled)
    return joined.drop_columns(["visit_type_min"])


def finalize_shard(staged: pa.Table, keep: tuple[str, ...] = ()) -> pa.Table:
    """One shard's staged events -> sorted MEDS events in EVENT_SCHEMA, visit types filled; the
    staged columns named in `keep` (e.g. `concept_id`, `_priority`) follow the EVENT_SCHEMA ones."""
    events = fill_visit_types(staged)
    events = events.sort_by(SORT_KEYS)
    out = events.select(EVENT_SCHEMA.names).cast(EVENT_SCHEMA)
    for name in keep:
        out = out.append_column(name, events[name])
    return out
