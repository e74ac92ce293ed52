"""A single-process polars implementation of OMOP (+ PRS) -> timelines: the benchmark's baseline
and an independent check of the Ray pipeline (both must produce identical timelines).

It shares only the specifications with the pipeline: the row validator (`omop.validate_batch`,
`omop.validate_table`), the subject hash (`splits`), the PRS transform and the tokenizer's token
names; the event mapping, duplicate removal, sorting, vocabulary, value bins and tokenization are
written again here as polars expressions. Everything is held in memory, so it is for sizes that
fit one machine. Codes follow the rule of `ehrfm.meds.codes` (written again here): a concept of the
root's `concept` table is `<vocabulary_id>/<concept_code>`, any other id `<DOMAIN>/<id>`; a visit
ends with `VISIT_END/<its start code>` (`VISIT_END/<id>` in the id form).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl
import pyarrow as pa

from ehrfm.constants import BOS_ID, EOS_ID, SPLITS, UNK_ID
from ehrfm.omop.events import (
    BIRTH_CODE,
    CLINICAL_PRIORITY,
    DEATH_CODE,
    EVENT_SOURCES,
    PRIORITY_PREFIXES,
    SOURCE_VALUE_MAX_CHARS,
)
from ehrfm.omop.files import iter_raw_batches
from ehrfm.omop.spec import CDM_TABLES
from ehrfm.omop.validation import PersonIndex, find_tables, validate_batch, validate_table
from ehrfm.preprocess.config import PreprocessConfig
from ehrfm.preprocess.tokenizer import gap_token_names, value_token_names
from ehrfm.prs.person import PersonPrs, PrsInputs, build_person_prs, float32_vectors, storable
from ehrfm.schemas import timeline_schema
from ehrfm.splits import split_codes

_FLOAT32_MAX = float(np.finfo(np.float32).max)
DT = pl.Datetime("us")


@dataclass
class ReferenceResult:
    timelines: pa.Table  # sorted by subject_id, schemas.timeline_schema(K)
    tokens: list[str]  # the vocabulary, by id
    value_edges: dict[str, list[float]]
    events: int


# ---- events -------------------------------------------------------------------------------------
def _time(date: str, stamp: str | None) -> pl.Expr:
    midnight = pl.col(date).cast(DT)
    if stamp is None:
        return midnight
    same_day = pl.col(stamp).is_not_null() & (pl.col(stamp).dt.date() == pl.col(date))
    return pl.when(same_day).then(pl.col(stamp)).otherwise(midnight)


Book = dict[int, str]  # concept id -> `<vocabulary_id>/<concept_code>`


def concept_book(tables: dict[str, list[str]]) -> Book:
    """The vocabulary-form code of every concept id > 0 in the root's concept table ({} without one)."""
    if "concept" not in tables:
        return {}
    frames = [
        pl.read_parquet(f) if f.endswith(".parquet") else pl.read_csv(f, infer_schema=False) for f in tables["concept"]
    ]
    concept = pl.concat([f.select(pl.all().cast(pl.String)) for f in frames])
    concept = concept.rename({c: c.lower() for c in concept.columns}).select(
        pl.col("concept_id").str.strip_chars().cast(pl.Int64, strict=False).alias("id"),
        pl.col("vocabulary_id").str.strip_chars().alias("vocab"),
        pl.col("concept_code").str.strip_chars().alias("code"),
    )
    concept = concept.filter(
        (pl.col("id") > 0) & (pl.col("vocab").str.len_chars() > 0) & (pl.col("code").str.len_chars() > 0)
    )
    concept = concept.unique("id", keep="first", maintain_order=True)
    return dict(zip(concept["id"].to_list(), (concept["vocab"] + "/" + concept["code"]).to_list()))


def _code(prefix: str, concept: str, book: Book) -> pl.Expr:
    ids = pl.col(concept).fill_null(0).cast(pl.Int64)
    id_form = pl.format(prefix + "/{}", ids)
    if not book:
        return id_form
    return ids.replace_strict(list(book), list(book.values()), default=id_form, return_dtype=pl.String)


def _visit_end(concept: str, book: Book) -> pl.Expr:
    ids = pl.col(concept).fill_null(0).cast(pl.Int64)
    id_form = pl.format("VISIT_END/{}", ids)
    if not book:
        return id_form
    known = ids.replace_strict(list(book), list(book.values()), default=None, return_dtype=pl.String)
    return pl.when(known.is_not_null()).then(pl.format("VISIT_END/{}", known)).otherwise(id_form)


def _clinical_code(prefix: str, concept: str, source: str | None, book: Book) -> pl.Expr:
    """The concept's code, or `PREFIX/source/<value>` for concept 0/null with a source value."""
    if source is None:
        return _code(prefix, concept, book)
    text = pl.col(source).cast(pl.String).str.strip_chars().str.slice(0, SOURCE_VALUE_MAX_CHARS)
    unmapped = pl.col(concept).fill_null(0) == 0
    use = unmapped & (text.str.len_chars().fill_null(0) > 0)
    return pl.when(use).then(pl.format(prefix + "/source/{}", text)).otherwise(_code(prefix, concept, book))


_UNIT_OF_CONCEPT = {8554: "%", 9225: "%", 8737: "%", 8840: "mg/dL", 8753: "mmol/L", 9579: "mmol/mol"}
_SPELLINGS = {"%": "%", "percent": "%", "mg/dl": "mg/dL", "mmol/l": "mmol/L", "mmol/mol": "mmol/mol"}
# (concepts, canonical unit, {unit: (scale, offset)}, plausible range in the canonical unit)
_ANALYTES = (
    ([3004410], "%", {"mmol/mol": (0.09148, 2.152)}, (2.0, 25.0)),
    ([3004501, 3000483], "mg/dL", {"mmol/L": (18.016, 0.0)}, (10.0, 2000.0)),
)


def _canonical(concept: str, value: pl.Expr) -> pl.Expr:
    """HbA1c in %, glucose in mg/dL (written again from the unit facts, common spellings only)."""
    by_concept = pl.col("unit_concept_id").replace_strict(_UNIT_OF_CONCEPT, default=None, return_dtype=pl.String)
    by_text = (
        pl.col("unit_source_value")
        .cast(pl.String)
        .str.to_lowercase()
        .str.replace_all(r"\s", "")
        .replace_strict(_SPELLINGS, default="other", return_dtype=pl.String)
    )
    unknown_concept = pl.col("unit_concept_id").fill_null(0) != 0
    unit = pl.coalesce(
        by_concept,
        pl.when(unknown_concept & pl.col("unit_source_value").is_null()).then(pl.lit("other")),
        by_text,
        pl.lit("missing"),
    )
    out = value
    for concepts, canonical, conversions, (low, high) in _ANALYTES:
        rows = pl.col(concept).is_in(concepts)
        converted = pl.when(unit.is_in([canonical, "missing"])).then(value)
        for name, (scale, offset) in conversions.items():
            converted = converted.when(unit == name).then(value * scale + offset)
        converted = converted.otherwise(None)
        plausible = pl.when((converted >= low) & (converted <= high)).then(converted)
        out = pl.when(rows).then(plausible).otherwise(out)
    return out


def _value(column: str | None, concept: str | None = None) -> pl.Expr:
    if column is None:
        return pl.lit(None, dtype=pl.Float32)
    value = pl.col(column).cast(pl.Float64)
    if concept is not None:
        value = _canonical(concept, value)
    return pl.when(value.abs() > _FLOAT32_MAX).then(None).otherwise(value).cast(pl.Float32)


def _event_frame(
    frame: pl.DataFrame, time: pl.Expr, code: pl.Expr, value: pl.Expr, visit: pl.Expr, visit_type: pl.Expr
) -> pl.DataFrame:
    return frame.select(
        pl.col("person_id").alias("subject_id"),
        time.alias("time"),
        code.alias("code"),
        value.alias("numeric_value"),
        visit.cast(pl.Int64).alias("visit_id"),
        visit_type.cast(pl.String).alias("visit_type"),
    )


def _table_events(table: str, kept: pl.DataFrame, book: Book) -> pl.DataFrame:
    source = EVENT_SOURCES[table]
    visit = pl.col(source.visit) if source.visit else pl.lit(None, dtype=pl.Int64)
    none = pl.lit(None, dtype=pl.String)
    if source.end_date is None:
        return _event_frame(
            kept,
            _time(source.date, source.datetime),
            _clinical_code(source.prefix, source.concept, source.source_value, book),
            _value(source.value, source.concept if source.unit else None),
            visit,
            none,
        )
    start = _time(source.date, source.datetime)
    end = pl.max_horizontal(_time(source.end_date, source.end_datetime), start)
    kind = pl.col(source.concept).fill_null(0).cast(pl.String)
    nothing = pl.lit(None, dtype=pl.Float32)
    return pl.concat(
        [
            _event_frame(kept, start, _code("VISIT", source.concept, book), nothing, visit, kind),
            _event_frame(kept, end, _visit_end(source.concept, book), nothing, visit, kind),
        ]
    )


def _person_events(person: pl.DataFrame, book: Book) -> pl.DataFrame:
    birth = pl.coalesce(
        pl.col("birth_datetime"),
        pl.date(
            pl.col("year_of_birth"), pl.col("month_of_birth").fill_null(1), pl.col("day_of_birth").fill_null(1)
        ).cast(DT),
    )
    nothing, none_i, none_s = (
        pl.lit(None, dtype=pl.Float32),
        pl.lit(None, dtype=pl.Int64),
        pl.lit(None, dtype=pl.String),
    )
    parts = [_event_frame(person, birth, pl.lit(BIRTH_CODE), nothing, none_i, none_s)]
    for prefix, column in (
        ("GENDER", "gender_concept_id"),
        ("RACE", "race_concept_id"),
        ("ETHNICITY", "ethnicity_concept_id"),
    ):
        parts.append(_event_frame(person, birth, _code(prefix, column, book), nothing, none_i, none_s))
    return pl.concat(parts)


def _death_events(death: pl.DataFrame) -> pl.DataFrame:
    return _event_frame(
        death,
        _time("death_date", "death_datetime"),
        pl.lit(DEATH_CODE),
        pl.lit(None, dtype=pl.Float32),
        pl.lit(None, dtype=pl.Int64),
        pl.lit(None, dtype=pl.String),
    )


def _kept_rows(files: list[str], table: str, persons: PersonIndex, batch_rows: int) -> pl.DataFrame:
    """Validated rows of a table in file order, duplicates of the primary key removed (first kept)."""
    spec = CDM_TABLES[table]
    source = EVENT_SOURCES[table]
    columns = [
        c
        for c in (
            "person_id",
            source.concept,
            source.date,
            source.datetime,
            source.value,
            source.visit,
            source.end_date,
            source.end_datetime,
            source.source_value,
            *(("unit_concept_id", "unit_source_value") if source.unit else ()),
        )
        if c
    ] + list(spec.primary_key)
    columns = list(dict.fromkeys(columns))
    parts = []
    for batch in iter_raw_batches(files, table, batch_rows):
        kept, _ = validate_batch(table, batch.table, persons, batch.source_file)
        parts.append(pl.from_arrow(kept.select(columns)))
    frame = pl.concat(parts) if parts else pl.from_arrow(spec.arrow_schema.empty_table().select(columns))
    key = list(spec.primary_key)
    complete = pl.all_horizontal([pl.col(k).is_not_null() for k in key])
    frame = frame.with_row_index("_order")
    first = frame.filter(complete).unique(subset=key, keep="first", maintain_order=True)
    return pl.concat([first, frame.filter(~complete)]).sort("_order").drop("_order")


def _priority() -> pl.Expr:
    code = pl.col("code")
    expr = pl.lit(CLINICAL_PRIORITY, dtype=pl.Int8)
    for prefix, value in reversed(PRIORITY_PREFIXES):
        match = (code == prefix) if prefix in (BIRTH_CODE, DEATH_CODE) else code.str.starts_with(prefix)
        expr = pl.when(match).then(pl.lit(value, dtype=pl.Int8)).otherwise(expr)
    return expr


def omop_events(root: str, batch_rows: int = 100_000) -> pl.DataFrame:
    """All events of an OMOP root, visit types filled, in MEDS order."""
    tables = find_tables(root)
    person = validate_table(tables["person"], "person", None, batch_rows).kept
    persons = PersonIndex.from_tables(person)
    death = validate_table(tables["death"], "death", persons, batch_rows).kept if "death" in tables else None
    persons = PersonIndex.from_tables(person, death)
    book = concept_book(tables)
    parts = [_person_events(pl.from_arrow(person), book)]
    if death is not None:
        parts.append(_death_events(pl.from_arrow(death)))
    for table in EVENT_SOURCES:
        if table in tables:
            parts.append(_table_events(table, _kept_rows(tables[table], table, persons, batch_rows), book))
    events = pl.concat(parts)
    visits = (
        events.filter(pl.col("visit_type").is_not_null())  # a visit's start and end events carry its type
        .group_by(["subject_id", "visit_id"])
        .agg(pl.col("visit_type").min().alias("_visit_type"))
    )
    events = events.join(visits, on=["subject_id", "visit_id"], how="left")
    events = events.with_columns(pl.coalesce("visit_type", "_visit_type").alias("visit_type")).drop("_visit_type")
    events = events.with_columns(_priority().alias("_priority"))
    order = ["subject_id", "time", "_priority", "code", "numeric_value", "visit_id", "visit_type"]
    return events.sort(order, nulls_last=True)


# ---- tokenizer ----------------------------------------------------------------------------------
def _with_splits(events: pl.DataFrame, cfg: PreprocessConfig) -> pl.DataFrame:
    subjects = events["subject_id"].unique().sort()
    codes = split_codes(subjects.to_numpy(), cfg.splits.ratios, cfg.splits.salt)
    table = pl.DataFrame({"subject_id": subjects, "_split": pl.Series(codes, dtype=pl.Int8)})
    return events.join(table, on="subject_id", how="left")


def fit_vocabulary(events: pl.DataFrame, cfg: PreprocessConfig) -> tuple[list[str], dict[str, list[float]]]:
    settings = cfg.tokenizer
    train = events.filter((pl.col("_split") == 0) & (pl.col("code") != BIRTH_CODE))
    counts = train.group_by("code").agg(pl.len().alias("n")).filter(pl.col("n") >= settings.min_count)
    counts = counts.sort(["n", "code"], descending=[True, False])
    structural = value_token_names(settings.value_bins) + gap_token_names(settings.gap_edges_days)
    tokens = ["[PAD]", "[UNK]", "[BOS]", "[EOS]"] + structural + counts["code"].to_list()
    n_bins = settings.value_bins
    values = (
        train.filter(pl.col("code").is_in(counts["code"].implode()) & pl.col("numeric_value").is_not_null())
        .group_by("code")
        .agg(pl.col("numeric_value").sort().alias("v"))
    )
    values = values.filter(pl.col("v").list.len() >= settings.min_values_for_bins)
    edges: dict[str, list[float]] = {}
    for code, sorted_values in zip(values["code"].to_list(), values["v"].to_list()):
        n = len(sorted_values)
        ranks = [(j * n + n_bins - 1) // n_bins - 1 for j in range(1, n_bins)]
        edges[code] = [float(np.float32(sorted_values[r])) for r in ranks]
    return tokens, dict(sorted(edges.items()))


def tokenize(
    events: pl.DataFrame, tokens: list[str], edges: dict[str, list[float]], cfg: PreprocessConfig
) -> pl.DataFrame:
    """subject_id, birth_day, tokens, ages per subject."""
    settings = cfg.tokenizer
    ids = pl.DataFrame({"code": tokens, "_id": pl.Series(range(len(tokens)), dtype=pl.Int32)})
    births = (
        events.filter(pl.col("code") == BIRTH_CODE)
        .group_by("subject_id")
        .agg(pl.col("time").min().dt.date().alias("birth_date"))
    )
    body = events.filter(pl.col("code") != BIRTH_CODE).join(births, on="subject_id", how="left")
    body = body.with_columns((pl.col("time").dt.date() - pl.col("birth_date")).dt.total_days().alias("day"))
    body = body.sort(
        ["subject_id", "day", "_priority", "time", "code", "numeric_value", "visit_id", "visit_type"], nulls_last=True
    )
    body = body.join(ids, on="code", how="left", maintain_order="left").with_columns(pl.col("_id").fill_null(UNK_ID))
    n_edges = settings.value_bins - 1
    edge_frame = pl.DataFrame(
        {"code": list(edges), **{f"_e{j}": [np.float32(e[j]) for e in edges.values()] for j in range(n_edges)}},
        schema={"code": pl.String, **{f"_e{j}": pl.Float32 for j in range(n_edges)}},
    )
    body = body.join(edge_frame, on="code", how="left", maintain_order="left")
    has_q = pl.col("_e0").is_not_null() & pl.col("numeric_value").is_not_null()
    q = pl.sum_horizontal([(pl.col(f"_e{j}") < pl.col("numeric_value")).cast(pl.Int32) for j in range(n_edges)])
    value_ids = [tokens.index(name) for name in value_token_names(settings.value_bins)]
    gap_names = gap_token_names(settings.gap_edges_days)
    previous = pl.col("day").shift(1).over("subject_id").fill_null(0)
    gap = pl.col("day") - previous
    bucket = pl.sum_horizontal([(gap >= e).cast(pl.Int32) for e in settings.gap_edges_days]) - 1
    gap_ids = [tokens.index(name) for name in gap_names]
    body = body.with_columns(
        pl.when(gap >= settings.gap_edges_days[0])
        .then(bucket.replace_strict(list(range(len(gap_ids))), gap_ids, default=None))
        .otherwise(None)
        .cast(pl.Int32)
        .alias("_gap"),
        pl.when(has_q)
        .then(q.replace_strict(list(range(settings.value_bins)), value_ids, default=None))
        .otherwise(None)
        .cast(pl.Int32)
        .alias("_q"),
    )
    body = body.with_row_index("_event")  # the event order, subjects ascending
    slot = pl.lit(0, dtype=pl.Int8)
    stream = pl.concat(
        [
            body.filter(pl.col("_gap").is_not_null()).select(
                "subject_id", "_event", slot.alias("_slot"), pl.col("_gap").alias("t"), pl.col("day").alias("a")
            ),
            body.select(
                "subject_id", "_event", (slot + 1).alias("_slot"), pl.col("_id").alias("t"), pl.col("day").alias("a")
            ),
            body.filter(pl.col("_q").is_not_null()).select(
                "subject_id", "_event", (slot + 2).alias("_slot"), pl.col("_q").alias("t"), pl.col("day").alias("a")
            ),
        ]
    ).sort(["_event", "_slot"])
    grouped = (
        stream.group_by("subject_id", maintain_order=True)
        .agg("t", "a")
        .join(body.group_by("subject_id").agg(pl.col("day").max().alias("last")), on="subject_id")
    )
    out = births.join(grouped, on="subject_id", how="left").sort("subject_id")
    bos, eos = pl.lit([BOS_ID], dtype=pl.List(pl.Int32)), pl.lit([EOS_ID], dtype=pl.List(pl.Int32))
    return out.select(
        "subject_id",
        "birth_date",
        pl.concat_list([bos, pl.col("t").fill_null(pl.lit([], dtype=pl.List(pl.Int32))), eos]).alias("tokens"),
        pl.concat_list(
            [
                pl.lit([0], dtype=pl.List(pl.Int32)),
                pl.col("a").cast(pl.List(pl.Int32)).fill_null(pl.lit([], dtype=pl.List(pl.Int32))),
                pl.col("last").fill_null(0).cast(pl.Int32),
            ]
        ).alias("ages"),
    )


def reference_timelines(omop: str, cfg: PreprocessConfig, prs: PrsInputs | None = None) -> ReferenceResult:
    """The whole OMOP (+ PRS) -> timelines transformation in one process."""
    events = omop_events(omop, cfg.batch_rows)
    events = _with_splits(events, cfg)
    tokens, edges = fit_vocabulary(events, cfg)
    timelines = tokenize(events, tokens, edges, cfg)
    subjects = timelines["subject_id"].to_numpy()
    split = split_codes(subjects, cfg.splits.ratios, cfg.splits.salt)
    person_prs = build_person_prs(prs, subjects, split, None) if prs else PersonPrs.empty(subjects)
    values, has = person_prs.rows(subjects)
    table = pa.table(
        {
            "subject_id": pa.array(subjects, pa.int64()),
            "split": pa.array(np.asarray(SPLITS, dtype=object)[split].tolist(), pa.string()),
            "birth_date": timelines["birth_date"].to_arrow(),
            "tokens": timelines["tokens"].to_arrow().cast(pa.list_(pa.int32())),
            "ages": timelines["ages"].to_arrow().cast(pa.list_(pa.int32())),
            "prs": float32_vectors(values),
            "has_prs": pa.array(has, pa.bool_()),
        },
        schema=storable(timeline_schema(values.shape[1])),
    )
    return ReferenceResult(table, tokens, edges, events.height)
