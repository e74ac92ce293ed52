"""ACES export of the shipped T2D task: well-formed YAML with the expected predicates and windows."""

from __future__ import annotations

import yaml

from ehrfm.tasks.aces import aces_yaml
from ehrfm.tasks.definitions import load_task, resolve_task


def test_t2d_exports_as_an_aces_config() -> None:
    task = resolve_task(load_task("t2d"))
    config = yaml.safe_load(aces_yaml(task))
    assert config["trigger"] == "visit_end" and config["predicates"]["visit_end"] == {"code": {"regex": "^VISIT_END/"}}
    assert config["predicates"]["target_condition"]["code"]["any"] == list(task.target.codes["condition"])
    assert set(config["predicates"]["prior_drug"]["code"]["any"]) == set(task.prior.codes["drug"])
    hba1c = [v for k, v in config["predicates"].items() if k.startswith("prior_measurement_3004410")]
    assert hba1c and all(v["value_min"] == 6.5 and v["value_min_inclusive"] for v in hba1c)
    windows = config["windows"]
    assert windows["input"]["end"] == "trigger" and windows["input"]["has"] == {"prior": "(None, 0)"}
    assert windows["target"] == {
        "start": "input.end",
        "end": "start + 730d",
        "start_inclusive": False,
        "end_inclusive": True,
        "label": "target_condition",
    }
    prior_expr = config["predicates"]["prior"]["expr"]
    assert prior_expr.startswith("or(") and "prior_condition" in prior_expr and "prior_drug" in prior_expr
