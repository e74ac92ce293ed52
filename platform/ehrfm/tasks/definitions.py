"""Prediction-task definitions: what counts as the outcome, what excludes a person, the horizon.

A task is a YAML file in `jobs/configs/tasks/` (t2d, cad, stroke, copd, hypertension) loaded into
`TaskDefinition`. Concept ids are OMOP standard concepts; `resolve_task` expands them through
`concept_ancestor` (when given) and turns them into the event codes the labeler matches.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import polars as pl
from pydantic import Field

from ehrfm.config import StrictModel, load_config
from ehrfm.tasks.concept_sets import concept_codes, expand_descendants

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
    unit: str = ""  # documentation only: the unit the threshold assumes


class ConceptCriteria(StrictModel):
    """Concept ids per domain; a person meets the criteria when any of them is recorded."""

    condition: list[int] = Field(default_factory=list)
    procedure: list[int] = Field(default_factory=list)
    observation: list[int] = Field(default_factory=list)
    drug: list[int] = Field(default_factory=list)
    measurement: list[MeasurementThreshold] = Field(default_factory=list)

    def is_empty(self) -> bool:
        return not any(getattr(self, d) for d in CODE_DOMAINS) and not self.measurement


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


@dataclass(frozen=True)
class ResolvedCriteria:
    """Criteria as event codes: domain -> codes, plus (code, op, value) thresholds."""

    codes: dict[str, tuple[str, ...]]
    thresholds: tuple[tuple[str, str, float], ...]

    def any_expr(self) -> pl.Expr:
        """True on events that meet any criterion."""
        expr = pl.lit(False)
        for domain in self.domains_with_evidence():
            expr = expr | self.domain_expr(domain)
        return expr

    def domains_with_evidence(self) -> list[str]:
        present = [d for d in CODE_DOMAINS if self.codes.get(d)]
        return present + (["measurement"] if self.thresholds else [])

    def domain_expr(self, domain: str) -> pl.Expr:
        """True on events that meet this domain's criteria."""
        if domain != "measurement":
            return pl.col("code").is_in(list(self.codes.get(domain, ())))
        expr = pl.lit(False)
        value = pl.col("numeric_value")
        compare = {">=": value.__ge__, ">": value.__gt__, "<=": value.__le__, "<": value.__lt__}
        for code, op, threshold in self.thresholds:
            expr = expr | ((pl.col("code") == code) & compare[op](threshold).fill_null(False))
        return expr


@dataclass(frozen=True)
class ResolvedTask:
    """A task with its concept sets turned into event codes, ready for the labeler."""

    definition: TaskDefinition
    target: ResolvedCriteria
    prior: ResolvedCriteria


def resolve_criteria(criteria: ConceptCriteria, concept_ancestor: pl.DataFrame | None) -> ResolvedCriteria:
    codes = {
        d: tuple(concept_codes(d, expand_descendants(getattr(criteria, d), concept_ancestor))) for d in CODE_DOMAINS
    }
    thresholds = []
    for item in criteria.measurement:
        for concept_id in expand_descendants([item.concept_id], concept_ancestor):
            thresholds.append((concept_codes("measurement", [concept_id])[0], item.op, item.value))
    return ResolvedCriteria(codes=codes, thresholds=tuple(thresholds))


def resolve_task(task: TaskDefinition, concept_ancestor: pl.DataFrame | None = None) -> ResolvedTask:
    """Expand the task's concepts (descendants when `concept_ancestor` is given and enabled)."""
    if task.target.is_empty():
        raise ValueError(f"task {task.name!r}: the target criteria name no concepts")
    ancestry = concept_ancestor if task.expand_descendants else None
    target = resolve_criteria(task.target, ancestry)
    prior = resolve_criteria(task.prior, ancestry) if task.prior is not None else target
    return ResolvedTask(definition=task, target=target, prior=prior)


def load_task(name_or_path: str | Path, overrides: list[str] | None = None) -> TaskDefinition:
    """A shipped task by name (`t2d`) or any task YAML by path."""
    path = Path(name_or_path)
    if not path.suffix:
        path = TASK_CONFIG_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"task config not found: {path} (shipped tasks: {', '.join(SHIPPED_TASKS)})")
    return load_config(TaskDefinition, path, overrides)
