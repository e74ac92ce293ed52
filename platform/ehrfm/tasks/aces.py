"""A task YAML as an ACES task configuration (predicates, trigger, windows), so MEDS tools can
extract the same cohort and results compare with other MEDS models.

Predicates: one per criteria domain, `code: {any: [...]}` over the resolved event codes (the
CodeBook's `<vocabulary>/<concept_code>` form when the task is resolved with a concept table);
measurement thresholds become value bounds. The trigger is the end of a visit (`VISIT_END/...`);
the input window ends at the trigger and must hold no prior evidence; the target window is the
horizon after it, labelled by the target predicate. Not expressible in ACES and left out: insulin
counted only outside inpatient visits (kept as a plain drug predicate), the landmark sampling of
prediction times, and censoring of negatives (ehrfm's labeler decides those).
"""

from __future__ import annotations

import yaml

from ehrfm.tasks.definitions import ResolvedCriteria, ResolvedTask

TRIGGER = "visit_end"


def _predicates(prefix: str, criteria: ResolvedCriteria) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for concept in criteria.concepts:
        if concept.threshold is not None:
            op, value = concept.threshold
            bound = "value_min" if op.startswith(">") else "value_max"
            for i, code in enumerate(concept.codes):
                out[f"{prefix}_{concept.domain}_{concept.seed}_{i}"] = {
                    "code": code,
                    bound: value,
                    f"{bound}_inclusive": op.endswith("="),
                }
    for domain, codes in criteria.codes.items():
        if domain != "measurement" and codes:  # measurements: by value, above
            out[f"{prefix}_{domain}"] = {"code": {"any": list(codes)}}
    return out


def aces_config(task: ResolvedTask) -> dict:
    """The ACES configuration of a resolved task (a plain dict, YAML-ready)."""
    target = _predicates("target", task.target)
    prior = _predicates("prior", task.prior)
    predicates = {TRIGGER: {"code": {"regex": "^VISIT_END/"}}, **target, **prior}
    predicates["target"] = {"expr": f"or({', '.join(target)})"} if len(target) > 1 else None
    predicates["prior"] = {"expr": f"or({', '.join(prior)})"} if len(prior) > 1 else None
    target_name = "target" if len(target) > 1 else next(iter(target))
    prior_name = "prior" if len(prior) > 1 else next(iter(prior))
    predicates = {k: v for k, v in predicates.items() if v is not None}
    definition = task.definition
    return {
        "description": definition.description or definition.name,
        "predicates": predicates,
        "trigger": TRIGGER,
        "windows": {
            "input": {
                "start": None,
                "end": "trigger",
                "start_inclusive": True,
                "end_inclusive": True,
                "index_timestamp": "end",
                "has": {prior_name: "(None, 0)"},
            },
            "target": {
                "start": "input.end",
                "end": f"start + {definition.horizon_days}d",
                "start_inclusive": False,
                "end_inclusive": definition.horizon_inclusive,
                "label": target_name,
            },
        },
    }


def aces_yaml(task: ResolvedTask) -> str:
    return yaml.safe_dump(aces_config(task), sort_keys=False)
