"""Prediction-task definitions: what counts as the outcome, what excludes a person, the horizon.

A task is a YAML file in `jobs/configs/tasks/` (t2d, cad, stroke, copd, hypertension) loaded into
`TaskDefinition`. Concept ids are OMOP standard concepts; `resolve_task` expands each one
(`concept_sets.expand_concept`): through `concept_ancestor` when given, else through the shipped
expansion (`tasks/resources/concept_sets.csv`), and always adds the source codes (ICD-9-CM /
ICD-10-CM / SNOMED / drug names) that match unmapped rows (`CONDITION/source/E11.9`). The ids
become codes through the cohort's CodeBook (`SNOMED/44054006`; the id form `CONDITION/201826` for
concepts the concept table lacks), the mapping the events were written with. Measurement
thresholds are converted to the analyte's canonical unit (`ehrfm.omop.units`), the unit the
events stage writes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import polars as pl
from pydantic import Field

from ehrfm.config import StrictModel, load_config
from ehrfm.meds.codes import CodeBook
from ehrfm.omop.units import convert_threshold
from ehrfm.tasks.concept_sets import DOMAIN_PREFIX, ConceptExpansion, codebook_of, concept_codes, expand_concept

# Where the shipped task YAMLs live (repository checkout; the package is installed editable).
TASK_CONFIG_DIR = Path(__file__).resolve().parents[3] / "jobs" / "configs" / "tasks"
SHIPPED_TASKS = ("t2d", "cad", "stroke", "copd", "hypertension")

# Domains whose evidence is "the code is present" (measurements need a value threshold instead).
CODE_DOMAINS = ("condition", "procedure", "observation", "drug")


class MeasurementThreshold(StrictModel):
    """A measurement that counts as evidence when its value passes a threshold (HbA1c >= 6.5 %)."""

    concept_id: int
    op: Literal[">=", ">", "<=", "<"] = ">="
    value: float
    # The threshold's unit (`%`, `mmol/mol`, `mg/dL`, `mmol/L`); converted to the unit the events
    # carry for known analytes (ehrfm.omop.units), an error when not convertible. Empty: as recorded.
    unit: str = ""


class ConceptCriteria(StrictModel):
    """Concept ids per domain; a person meets the criteria when any of them is recorded.

    drug_outside_inpatient: drugs that count only when given outside an inpatient visit (insulin:
    a sliding scale in hospital is not evidence of diabetes); listed here instead of under `drug`.
    """

    condition: list[int] = Field(default_factory=list)
    procedure: list[int] = Field(default_factory=list)
    observation: list[int] = Field(default_factory=list)
    drug: list[int] = Field(default_factory=list)
    drug_outside_inpatient: list[int] = Field(default_factory=list)
    measurement: list[MeasurementThreshold] = Field(default_factory=list)

    def is_empty(self) -> bool:
        return (
            not any(getattr(self, d) for d in CODE_DOMAINS) and not self.measurement and not self.drug_outside_inpatient
        )


class PredictionTimes(StrictModel):
    """Where prediction times fall. Candidates are the ends of visits before the person's last visit.

    random_visit: one candidate per person, drawn by a hash of (seed, subject_id).
    landmarks: the first candidate in each `min_gap_days` window counted from the person's first
    candidate (0 = every candidate), at most `max_per_person` of them (a hashed draw when more);
    exclusions are then decided per prediction time. The split stays per person.
    """

    strategy: Literal["random_visit", "landmarks"] = "random_visit"
    min_gap_days: int = Field(365, ge=0)
    max_per_person: int = Field(1, ge=1)


class TaskDefinition(StrictModel):
    """One binary prediction task.

    horizon_inclusive: an outcome exactly `horizon_days` after the prediction time counts
    (window = (prediction_time, prediction_time + horizon]); with False the window is open at the end.
    censoring: people without the outcome whose record ends (last event or death) before the
    window closes are dropped ("exclude", reason died_before_horizon / lost_to_follow_up) or kept
    as negatives ("negative"; the account counts them as censored_as_negative).
    prior: evidence that the person already has the condition; recorded at or before the
    prediction time it excludes them. Defaults to the target concepts.
    """

    name: str
    description: str = ""
    target: ConceptCriteria
    prior: ConceptCriteria | None = None
    horizon_days: int = Field(730, gt=0)
    horizon_inclusive: bool = True
    censoring: Literal["exclude", "negative"] = "exclude"
    seed: int = 0
    expand_descendants: bool = True
    prediction_times: PredictionTimes = Field(default_factory=PredictionTimes)
    # visit_type values (visit concept ids as text) that are inpatient stays, for drug_outside_inpatient:
    # 9201 Inpatient Visit, 262 Emergency Room and Inpatient Visit, 8717 Inpatient Hospital.
    inpatient_visit_types: list[str] = Field(default_factory=lambda: ["9201", "262", "8717"])


_COMPARE = {">=": "__ge__", ">": "__gt__", "<=": "__le__", "<": "__lt__"}
INPATIENT = "_inpatient"  # boolean column the labeler adds: the event belongs to an inpatient visit


@dataclass(frozen=True)
class ResolvedConcept:
    """One seed concept of a criteria, as the event codes and source-code pattern that match it."""

    domain: str  # condition, drug, ..., measurement
    seed: int
    codes: tuple[str, ...]
    source_pattern: str | None = None  # regex on the normalised value of `PREFIX/source/<value>` codes
    outside_inpatient: bool = False
    threshold: tuple[str, float] | None = None  # (op, value in the events' unit) for measurements
    sources: tuple[str, ...] = ()  # how the codes were found (concept_ancestor, shipped, ...)

    @property
    def key(self) -> str:
        suffix = " outside inpatient" if self.outside_inpatient else ""
        return f"{self.domain}/{self.seed}{suffix}"

    def expr(self) -> pl.Expr:
        """True on the events that match this concept."""
        match = pl.col("code").is_in(list(self.codes))
        if self.source_pattern:
            head = f"{DOMAIN_PREFIX[self.domain]}/source/"
            value = pl.col("code").str.slice(len(head)).str.to_uppercase().str.replace_all(r"[.\s]", "")
            match = match | (pl.col("code").str.starts_with(head) & value.str.contains(self.source_pattern))
        if self.threshold is not None:
            op, value = self.threshold
            match = match & getattr(pl.col("numeric_value"), _COMPARE[op])(value).fill_null(False)
        if self.outside_inpatient:
            match = match & ~pl.col(INPATIENT)
        return match


@dataclass(frozen=True)
class ResolvedCriteria:
    """Criteria as matchable concepts, plus how the concept sets were expanded (`path`)."""

    concepts: tuple[ResolvedConcept, ...]
    path: str = "as_given"

    @property
    def codes(self) -> dict[str, tuple[str, ...]]:
        """domain -> the event codes of its concepts (sorted, unique)."""
        out: dict[str, set[str]] = {}
        for c in self.concepts:
            out.setdefault(c.domain, set()).update(c.codes)
        return {d: tuple(sorted(v)) for d, v in out.items()}

    @property
    def thresholds(self) -> tuple[tuple[str, str, float], ...]:
        """(code, op, value) of every measurement threshold (value in the events' unit)."""
        return tuple(
            (code, c.threshold[0], c.threshold[1]) for c in self.concepts if c.threshold is not None for code in c.codes
        )

    def any_expr(self) -> pl.Expr:
        """True on events that meet any criterion."""
        expr = pl.lit(False)
        for domain in self.domains_with_evidence():
            expr = expr | self.domain_expr(domain)
        return expr

    def domains_with_evidence(self) -> list[str]:
        present = {c.domain for c in self.concepts}
        return [d for d in (*CODE_DOMAINS, "measurement") if d in present]

    def domain_expr(self, domain: str) -> pl.Expr:
        """True on events that meet this domain's criteria."""
        expr = pl.lit(False)
        for concept in self.concepts:
            if concept.domain == domain:
                expr = expr | concept.expr()
        return expr


@dataclass(frozen=True)
class ResolvedTask:
    """A task with its concept sets turned into event codes, ready for the labeler."""

    definition: TaskDefinition
    target: ResolvedCriteria
    prior: ResolvedCriteria


def _resolve_one(
    domain: str, seed: int, expansion: ConceptExpansion, codebook: CodeBook | None, **extra
) -> ResolvedConcept:
    found = expand_concept(domain, seed, expansion)
    return ResolvedConcept(
        domain=domain,
        seed=seed,
        codes=tuple(concept_codes(domain, found.concept_ids, codebook)),
        source_pattern=found.source_pattern,
        sources=found.sources,
        **extra,
    )


def resolve_criteria(
    criteria: ConceptCriteria, expansion: ConceptExpansion, codebook: CodeBook | None = None
) -> ResolvedCriteria:
    concepts = []
    for domain in CODE_DOMAINS:
        concepts += [_resolve_one(domain, seed, expansion, codebook) for seed in getattr(criteria, domain)]
    concepts += [
        _resolve_one("drug", seed, expansion, codebook, outside_inpatient=True)
        for seed in criteria.drug_outside_inpatient
    ]
    for item in criteria.measurement:
        threshold = (item.op, convert_threshold(item.concept_id, item.value, item.unit))
        concepts.append(_resolve_one("measurement", item.concept_id, expansion, codebook, threshold=threshold))
    return ResolvedCriteria(concepts=tuple(concepts), path=expansion.path)


def resolve_task(
    task: TaskDefinition,
    concept_ancestor: pl.DataFrame | None = None,
    concept_table: pl.DataFrame | None = None,
    codebook: CodeBook | None = None,
) -> ResolvedTask:
    """Expand the task's concepts: through `concept_ancestor` when given, else the shipped expansion.

    `expand_descendants: false` uses the ids as given (and no source codes). `concept_table`
    (OMOP `concept`, optional) adds, without concept_ancestor, the drug concepts whose name
    contains a seed ingredient's name. Codes come from `codebook` (the events' mapping, e.g. read
    from the dataset's metadata/codes.parquet), else from the concept table's vocabulary_id and
    concept_code, else the id form.
    """
    if codebook is None:
        codebook = codebook_of(concept_table)
    if task.target.is_empty():
        raise ValueError(f"task {task.name!r}: the target criteria name no concepts")
    if not task.expand_descendants:
        expansion = ConceptExpansion(path="as_given")
    elif concept_ancestor is not None:
        expansion = ConceptExpansion(path="concept_ancestor", concept_ancestor=concept_ancestor)
    else:
        expansion = ConceptExpansion(path="shipped", concept_table=concept_table)
    target = resolve_criteria(task.target, expansion, codebook)
    prior = resolve_criteria(task.prior, expansion, codebook) if task.prior is not None else target
    return ResolvedTask(definition=task, target=target, prior=prior)


def load_task(name_or_path: str | Path, overrides: list[str] | None = None) -> TaskDefinition:
    """A shipped task by name (`t2d`) or any task YAML by path."""
    path = Path(name_or_path)
    if not path.suffix:
        path = TASK_CONFIG_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"task config not found: {path} (shipped tasks: {', '.join(SHIPPED_TASKS)})")
    return load_config(TaskDefinition, path, overrides)
