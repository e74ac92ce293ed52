"""Online scoring of person records with a risk-model directory: the path Serve and the registry's
pyfunc use. It builds the same MEDS rows the preprocessing builds from OMOP (MEDS_BIRTH and the
gender/race/ethnicity codes at the birth time, then the clinical events), sorts and tokenizes
them with the model's own tokenizer artifact, and cuts the window with the training code
(`examples.cut_history_at` at `examples.prediction_ages`, as many windows as the model's
`history_windows`), so a person scored here gets the
score the offline examples give for the same events and prediction time.

Choices that differ from, or go beyond, the offline path (documented for Serve):
- A served record is open: it ends at the prediction time, not at the end of follow-up, so the
  EOS token ("record ended") is never part of a window, online or offline (`examples.open_records`,
  also when an offline prediction day is the last day of the whole record).
- PRS values are z-scores on the scale of the pipeline's prs/ output (after the fitted
  train-split transform). Missing PGS ids are filled with 0 (the train mean), as the pipeline
  does for a genotyped person with a missing score; a record counts as genotyped
  (has_prs=true) only when at least `min_prs_share` of the model's PGS ids are present.
  No PRS at all gives has_prs=false, never a vector of zeros shown as genotyped.
- Event times are day-resolution for the model (as in training); aware datetimes are converted
  to UTC and made naive, matching the naive UTC timestamps of events/.
- Event codes are the codes the model was trained on: `<vocabulary_id>/<concept_code>`
  (`SNOMED/44054006`, `LOINC/4548-4`) when preprocessing had the OMOP concept table, the id form
  (`CONDITION/201826`) for concepts it lacked. The demographic codes built from sex /
  race_concept_id / ethnicity_concept_id take the form the model's tokenizer knows (`Gender/F`,
  else `GENDER/8532`).

Plausibility (a typo or a unit mix-up must not get a confident score): times before 1900-01-01 or
after the validating clock plus a day of skew (`context={"now": ...}` sets the clock, else the
current UTC time), events before birth, and an age over 125 years at the prediction time are
refused. Validation errors name the field (`events[3].time`) and counts only, never a patient's
values (pydantic is told to hide inputs in its messages).
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import torch
from pydantic import BaseModel, ConfigDict, Field, FiniteFloat, ValidationInfo, field_validator

from ehrfm.constants import FIRST_CODE_ID, UNK_ID
from ehrfm.model.risk import TOKENIZER_FILE, HeadSpec, RiskModel, load_risk_model, predict_logits
from ehrfm.omop.events import BIRTH_CODE, PRIORITY_COLUMN, code_priority, finalize_shard
from ehrfm.preprocess.arrow_lists import list_values_offsets
from ehrfm.preprocess.tokenizer import Tokenizer, gap_token_names, value_token_names
from ehrfm.transfer.examples import WINDOW_LENGTHS, cut_history_at, example_tensors, open_records, prediction_ages

# OMOP gender concepts; "unknown" is 0 (no matching concept), what the pipeline writes for a null.
SEX_CONCEPTS = {"male": 8507, "female": 8532, "other": 8521, "unknown": 0}
# OMOP's standard demographic concepts in the vocabulary form (`<vocabulary_id>/<concept_code>`)
# the events stage writes when the concept table lists them; the id form (`RACE/8527`) otherwise.
DEMOGRAPHIC_CODES = {
    8507: "Gender/M",
    8532: "Gender/F",
    8657: "Race/1",
    8515: "Race/2",
    8516: "Race/3",
    8557: "Race/4",
    8527: "Race/5",
    38003563: "Ethnicity/Hispanic",
    38003564: "Ethnicity/Not Hispanic",
}
# Codes the record's own fields produce; an event carrying one would duplicate or contradict them.
RESERVED_CODE_PREFIXES = ("GENDER/", "RACE/", "ETHNICITY/", "Gender/", "Race/", "Ethnicity/")
_FLOAT32_MAX = float(np.finfo(np.float32).max)
DEFAULT_MIN_PRS_SHARE = 0.5
EARLIEST_TIME = dt.datetime(1900, 1, 1)
CLOCK_SKEW = dt.timedelta(days=1)
MAX_AGE_YEARS = 125


def _naive_utc(value: dt.datetime) -> dt.datetime:
    if value.tzinfo is not None:
        value = value.astimezone(dt.UTC).replace(tzinfo=None)
    return value


def _latest_time(info: ValidationInfo) -> dt.datetime:
    """The validating clock (naive UTC) plus the allowed skew; `context["now"]` replaces the clock."""
    now = (info.context or {}).get("now")
    now = dt.datetime.now(dt.UTC) if now is None else now
    return _naive_utc(now) + CLOCK_SKEW


def _age_years(birth: dt.date, when: dt.datetime) -> int:
    return when.year - birth.year - ((when.month, when.day) < (birth.month, birth.day))


def _implausible_time(value: dt.datetime, latest: dt.datetime) -> str | None:
    if value < EARLIEST_TIME:
        return "is before 1900-01-01"
    if value > latest:
        return "is after the request's own clock (more than 1 day ahead)"
    return None


class ClinicalEvent(BaseModel):
    """One MEDS event: a code as in the training data (`SNOMED/44054006`, `LOINC/4548-4`, `CONDITION/201826`)."""

    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)

    code: str = Field(min_length=1)
    time: dt.datetime
    numeric_value: FiniteFloat | None = None

    @field_validator("code")
    @classmethod
    def _not_reserved(cls, code: str) -> str:
        if code == BIRTH_CODE or code.startswith(RESERVED_CODE_PREFIXES):
            raise ValueError(
                f"{BIRTH_CODE} and {'/'.join(p.rstrip('/') for p in RESERVED_CODE_PREFIXES[:3])} "
                "codes (either form) come from birth_date, sex, race_concept_id and ethnicity_concept_id"
            )
        return code

    @field_validator("time")
    @classmethod
    def _utc(cls, value: dt.datetime) -> dt.datetime:
        return _naive_utc(value)

    @field_validator("numeric_value")
    @classmethod
    def _float32(cls, value: float | None) -> float | None:
        if value is not None and abs(value) > _FLOAT32_MAX:
            raise ValueError("numeric_value is beyond the float32 range")
        return value


class PersonRecord(BaseModel):
    """What Serve receives for one person. Fields are validated in declaration order, so the
    checks against birth_date see it. Pass `context={"pgs_ids": [...]}` to model_validate to have
    unknown PGS ids rejected here (RiskPredictor.parse does)."""

    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)

    birth_date: dt.date
    sex: Literal["male", "female", "other", "unknown"]
    race_concept_id: int = Field(default=0, ge=0)
    ethnicity_concept_id: int = Field(default=0, ge=0)
    events: list[ClinicalEvent] = Field(default_factory=list)
    prs: dict[str, FiniteFloat] | None = None
    prediction_time: dt.datetime | None = Field(default=None, validate_default=True)

    @field_validator("birth_date")
    @classmethod
    def _plausible_birth(cls, value: dt.date, info: ValidationInfo) -> dt.date:
        problem = _implausible_time(dt.datetime.combine(value, dt.time()), _latest_time(info))
        if problem:
            raise ValueError(problem)
        return value

    @field_validator("events")
    @classmethod
    def _plausible_times(cls, events: list[ClinicalEvent], info: ValidationInfo) -> list[ClinicalEvent]:
        """Names the first implausible event and counts the others; never a value."""
        latest, birth = _latest_time(info), info.data.get("birth_date")
        problems = [_implausible_time(event.time, latest) for event in events]
        if birth is not None:
            problems = [
                p or ("is before birth_date" if e.time.date() < birth else None) for p, e in zip(problems, events)
            ]
        bad = [i for i, problem in enumerate(problems) if problem]
        if bad:
            more = f" ({len(bad)} of {len(events)} events have implausible times)" if len(bad) > 1 else ""
            raise ValueError(f"events[{bad[0]}].time {problems[bad[0]]}{more}")
        return events

    @field_validator("prs")
    @classmethod
    def _known_pgs(cls, prs: dict[str, float] | None, info: ValidationInfo) -> dict[str, float] | None:
        expected = (info.context or {}).get("pgs_ids")
        if prs and expected is not None:
            check_pgs_ids(prs, expected)
        return prs

    @field_validator("prediction_time")
    @classmethod
    def _prediction_time(cls, value: dt.datetime | None, info: ValidationInfo) -> dt.datetime | None:
        birth, events = info.data.get("birth_date"), info.data.get("events")
        if value is None:
            if events is not None and not events:
                raise ValueError("required when there are no events (the default is the last event's time)")
            when = max(e.time for e in events) if events else None
        else:
            value = when = _naive_utc(value)
            problem = _implausible_time(value, _latest_time(info))
            if problem:
                raise ValueError(problem)
            if birth is not None and value.date() < birth:
                raise ValueError("is before birth_date")
        if birth is not None and when is not None and _age_years(birth, when) > MAX_AGE_YEARS:
            default = "" if value is not None else " (by default the last event's time)"
            raise ValueError(f"gives an age over {MAX_AGE_YEARS} years at the prediction time{default}")
        return value

    def scored_time(self) -> dt.datetime:
        """The prediction time, by default the last event's time."""
        return self.prediction_time if self.prediction_time is not None else max(e.time for e in self.events)


def check_pgs_ids(prs: dict[str, float], expected: list[str]) -> None:
    """Refuses PGS ids the model does not use; counts them and never echoes them (a key can carry
    anything a client put there)."""
    unknown = set(prs) - set(expected)
    if unknown:
        raise ValueError(
            f"{len(unknown)} of the {len(prs)} PGS ids given are not among the model's {len(expected)} ids "
            "(the model info lists them)"
        )


# ---- records -> MEDS events ----------------------------------------------------------------------
def _birth_us(record: PersonRecord) -> int:
    return (record.birth_date - dt.date(1970, 1, 1)).days * 86_400_000_000


def _time_us(value: dt.datetime) -> int:
    return (value - dt.datetime(1970, 1, 1)) // dt.timedelta(microseconds=1)


def demographic_code(domain: str, concept_id: int, known: Collection[str] = ()) -> str:
    """`Gender/F` when `known` (the tokenizer's codes) has that form, else the id form `GENDER/8532`.

    The model knows one form per concept: the one preprocessing wrote (vocabulary form when the
    OMOP concept table listed the concept). Neither known: the id form, an unknown code either way.
    """
    vocabulary = DEMOGRAPHIC_CODES.get(int(concept_id))
    if vocabulary is not None and vocabulary in known:
        return vocabulary
    return f"{domain}/{int(concept_id)}"


def records_to_events(records: list[PersonRecord], known: Collection[str] = ()) -> pa.Table:
    """Sorted MEDS events (EVENT_SCHEMA) of the records; subject_id is the record's position.

    `known`: the model's codes, which decide the form of the demographic codes (demographic_code).
    """
    subject, time_us, codes, values = [], [], [], []
    for i, record in enumerate(records):
        birth = _birth_us(record)
        demographics = [
            BIRTH_CODE,
            demographic_code("GENDER", SEX_CONCEPTS[record.sex], known),
            demographic_code("RACE", record.race_concept_id, known),
            demographic_code("ETHNICITY", record.ethnicity_concept_id, known),
        ]
        subject += [i] * (len(demographics) + len(record.events))
        time_us += [birth] * len(demographics) + [_time_us(e.time) for e in record.events]
        codes += demographics + [e.code for e in record.events]
        values += [None] * len(demographics) + [e.numeric_value for e in record.events]
    n = len(subject)
    code_array = pa.array(codes, pa.string())
    staged = pa.table(
        {
            "subject_id": pa.array(subject, pa.int64()),
            "time": pa.array(time_us, pa.int64()).cast(pa.timestamp("us")),
            "code": code_array,
            "numeric_value": pa.array(values, pa.float64()).cast(pa.float32()),
            "visit_id": pa.nulls(n, pa.int64()),
            "visit_type": pa.nulls(n, pa.string()),
            PRIORITY_COLUMN: pa.array(code_priority(code_array), pa.int8()),
        }
    )
    return finalize_shard(staged)


@dataclass
class Windows:
    """Model inputs for a batch of records plus the per-record counts Serve reports."""

    tokens: np.ndarray  # [n, windows * context] int32, oldest window first (as the offline examples' column)
    ages: np.ndarray
    length: np.ndarray  # [n] real tokens in the newest window
    window_lengths: np.ndarray  # [n, windows] real tokens per window
    unknown_codes: np.ndarray  # events at or before the prediction time whose code is not in the vocabulary
    truncated_events: np.ndarray  # events at or before the prediction time left out of the window


# ---- the predictor ---------------------------------------------------------------------------------
@dataclass
class RiskPredictor:
    """A loaded risk model + tokenizer that scores PersonRecords (CPU, fp32, eval mode)."""

    model: RiskModel
    spec: HeadSpec
    tokenizer: Tokenizer
    min_prs_share: float = DEFAULT_MIN_PRS_SHARE
    batch_size: int = 64

    @classmethod
    def load(
        cls, model_dir: str | Path, min_prs_share: float = DEFAULT_MIN_PRS_SHARE, batch_size: int = 64
    ) -> RiskPredictor:
        model, spec = load_risk_model(model_dir)
        tokenizer = Tokenizer.load(Path(model_dir) / TOKENIZER_FILE)
        if spec.tokenizer_version and spec.tokenizer_version != tokenizer.version:
            raise ValueError(
                f"{model_dir}: head.json expects tokenizer {spec.tokenizer_version}, "
                f"{TOKENIZER_FILE} is {tokenizer.version}"
            )
        num_pgs = model.decoder.cfg.num_pgs
        if num_pgs and len(spec.pgs_ids) != num_pgs:
            raise ValueError(
                f"{model_dir}: the decoder reads {num_pgs} PGS but head.json lists {len(spec.pgs_ids)} ids"
            )
        if not 0.0 < min_prs_share <= 1.0:
            raise ValueError("min_prs_share must be in (0, 1]")
        return cls(model, spec, tokenizer, min_prs_share, batch_size)

    @property
    def first_code_token(self) -> int:
        """Lowest id of a vocabulary code (ids below are special, value-bin and gap tokens)."""
        tok = self.tokenizer
        return FIRST_CODE_ID + len(value_token_names(tok.n_bins)) + len(gap_token_names(tok.gap_edges_days))

    def parse(self, data: dict[str, Any] | str | bytes) -> PersonRecord:
        """A validated record (a dict or JSON text), unknown PGS ids rejected."""
        context = {"pgs_ids": self.spec.pgs_ids}
        if isinstance(data, (str, bytes)):
            return PersonRecord.model_validate_json(data, context=context)
        return PersonRecord.model_validate(data, context=context)

    def windows(self, records: list[PersonRecord]) -> Windows:
        timelines = self.tokenizer.tokenize(records_to_events(records, self.tokenizer.token_id))
        flat_tokens, offsets = list_values_offsets(timelines.tokens)
        flat_ages, _ = list_values_offsets(timelines.ages)
        tokens, ages, offsets = open_records(flat_tokens, flat_ages, offsets)
        times = pa.array([r.scored_time() for r in records], pa.timestamp("us"))
        births = pa.array(timelines.birth_day.astype(np.int32), pa.int32()).cast(pa.date32())
        cut = prediction_ages(times, births)
        rows = np.arange(len(records))
        windows = self.spec.history_windows
        win_tokens, win_ages, lengths, dropped = cut_history_at(
            tokens, ages, offsets, rows, cut, self.spec.context, windows
        )
        is_code = (tokens == UNK_ID) | (tokens >= self.first_code_token)
        unknown = np.zeros(len(records), dtype=np.int64)
        truncated = np.zeros(len(records), dtype=np.int64)
        for i in rows:
            lo = offsets[i]
            end, start = lo + dropped[i] + lengths[i].sum(), lo + dropped[i]
            unknown[i] = int((tokens[lo:end] == UNK_ID).sum())
            truncated[i] = int(is_code[lo:start].sum())
        n = len(records)
        return Windows(win_tokens.reshape(n, -1), win_ages.reshape(n, -1), lengths[:, -1], lengths, unknown, truncated)

    def prs_inputs(self, records: list[PersonRecord]) -> tuple[np.ndarray, np.ndarray]:
        """(z-scores [n, K] in the model's PGS order, has_prs [n]) under the min_prs_share rule."""
        ids = self.spec.pgs_ids
        column = {pgs: k for k, pgs in enumerate(ids)}
        values = np.zeros((len(records), len(ids)), dtype=np.float32)
        has_prs = np.zeros(len(records), dtype=bool)
        for i, record in enumerate(records):
            if not record.prs:
                continue
            check_pgs_ids(record.prs, ids)
            if len(record.prs) >= math.ceil(self.min_prs_share * len(ids) - 1e-9):
                has_prs[i] = True
                for pgs, value in record.prs.items():
                    values[i, column[pgs]] = value
        return values, has_prs

    def predict(self, records: list[PersonRecord]) -> list[dict[str, Any]]:
        """Per record: calibrated risk with the PRS as given and masked, validation percentile,
        has_prs, and counts of unknown codes and truncated events.

        One forward pass per chunk: the PRS-masked rows are appended to the same batch only for the
        persons whose PRS counts (for everyone else masking changes nothing, so their masked risk
        is their risk); a batch without any PRS costs one pass, not two."""
        if not records:
            return []
        windows = self.windows(records)
        prs, has_prs = self.prs_inputs(records)
        logits = np.empty(len(records), dtype=np.float32)
        masked = np.empty(len(records), dtype=np.float32)
        for lo in range(0, len(records), self.batch_size):
            part = np.arange(lo, min(lo + self.batch_size, len(records)))
            genotyped = part[has_prs[part]]
            rows = np.concatenate([part, genotyped])
            shown = np.concatenate([has_prs[part], np.zeros(len(genotyped), dtype=bool)])
            inputs = {  # the offline path's conversion; labels are not used for scoring
                "tokens": windows.tokens[rows],
                "ages": windows.ages[rows],
                "length": windows.length[rows],
                "prs": prs[rows],
                "has_prs": shown,
                "label": np.zeros(len(rows), dtype=bool),
            }
            if self.spec.history_windows > 1:
                inputs[WINDOW_LENGTHS] = windows.window_lengths[rows]
            batch = example_tensors(inputs)
            # causal attention: the padding after the longest window changes nothing
            width = int(batch["length"].max())
            batch["tokens"], batch["ages"] = batch["tokens"][..., :width], batch["ages"][..., :width]
            with torch.inference_mode():  # no autograd bookkeeping at all: a few % of a tiny forward
                out = predict_logits(self.model, batch).numpy()
            logits[part] = out[: len(part)]
            masked[part] = out[: len(part)]
            masked[genotyped] = out[len(part) :]
        risk = self.spec.calibrate(logits)
        risk_masked = self.spec.calibrate(masked)
        percentile = self.spec.percentile(risk)
        return [
            {
                "risk": float(risk[i]),
                "risk_prs_masked": float(risk_masked[i]),
                "percentile": float(percentile[i]),
                "has_prs": bool(has_prs[i]),
                "unknown_codes": int(windows.unknown_codes[i]),
                "truncated_events": int(windows.truncated_events[i]),
            }
            for i in range(len(records))
        ]
