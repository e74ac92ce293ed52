"""The sweep's search space: YAML dimensions keyed by dotted fine-tuning config paths, turned into
Ray Tune domains, and each sampled point turned back into the `FinetuneConfig` of one trial.

    space:
      optim.head_lr: {loguniform: [1.0e-4, 3.0e-2]}
      model.mode: {choice: [linear_probe, partial, full]}
      model.unfrozen_layers: {randint: [1, 2]}   # both ends included; used only by mode partial

A point fixes every searched key; the keys not searched keep the base config's values. Because the
fine-tuning config allows `unfrozen_layers` only with mode `partial`, a point's layer count is
dropped (0) for the other modes and raised to 1 for `partial`, so the two can be searched side by
side without a conditional space.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import model_validator

from ehrfm.config import StrictModel
from ehrfm.transfer.finetune_config import FinetuneConfig

KINDS = ("loguniform", "uniform", "randint", "choice")


class Dimension(StrictModel):
    """One searched value: exactly one of the four kinds."""

    loguniform: tuple[float, float] | None = None
    uniform: tuple[float, float] | None = None
    randint: tuple[int, int] | None = None  # both ends included
    choice: list[Any] | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> Dimension:
        given = [kind for kind in KINDS if getattr(self, kind) is not None]
        if len(given) != 1:
            raise ValueError(f"a dimension takes exactly one of {', '.join(KINDS)}; got {given or 'none'}")
        if self.loguniform is not None and not 0 < self.loguniform[0] < self.loguniform[1]:
            raise ValueError(f"loguniform needs 0 < low < high, got {list(self.loguniform)}")
        if self.uniform is not None and not self.uniform[0] < self.uniform[1]:
            raise ValueError(f"uniform needs low < high, got {list(self.uniform)}")
        if self.randint is not None and not self.randint[0] <= self.randint[1]:
            raise ValueError(f"randint needs low <= high, got {list(self.randint)}")
        if self.choice is not None and not self.choice:
            raise ValueError("choice needs at least one value")
        return self

    @property
    def kind(self) -> str:
        return next(kind for kind in KINDS if getattr(self, kind) is not None)

    def domain(self):
        """The Ray Tune domain (randint's upper end made inclusive)."""
        from ray import tune

        if self.loguniform is not None:
            return tune.loguniform(*self.loguniform)
        if self.uniform is not None:
            return tune.uniform(*self.uniform)
        if self.randint is not None:
            return tune.randint(self.randint[0], self.randint[1] + 1)
        return tune.choice(list(self.choice))


def tune_space(space: Mapping[str, Dimension]) -> dict[str, Any]:
    """Tuner param_space: a flat dict keyed by the dotted config paths."""
    return {key: dimension.domain() for key, dimension in space.items()}


def _plain(value: Any) -> Any:
    """numpy scalars (from samplers) as Python values, so pydantic and JSON take them."""
    return value.item() if hasattr(value, "item") and not isinstance(value, (list, dict, str)) else value


def _path_get(data: dict, key: str) -> Any:
    node: Any = data
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            raise ValueError(f"search-space key {key!r} is not a fine-tuning config field")
        node = node[part]
    return node


def _path_set(data: dict, key: str, value: Any) -> None:
    *sections, leaf = key.split(".")
    node = data
    for part in sections:
        node = node.get(part) if isinstance(node, dict) else None
        if not isinstance(node, dict):
            raise ValueError(f"search-space key {key!r} is not a fine-tuning config field")
    if leaf not in node or isinstance(node[leaf], dict):
        raise ValueError(f"search-space key {key!r} is not a fine-tuning config field")
    node[leaf] = value


def trial_config(base: FinetuneConfig, point: Mapping[str, Any]) -> FinetuneConfig:
    """`base` with the point's values set (mode / unfrozen_layers made consistent, see above)."""
    data = base.model_dump(mode="json")
    for key, value in point.items():
        _path_set(data, key, _plain(value))
    model = data["model"]
    if model["mode"] != "partial":
        model["unfrozen_layers"] = 0
    elif model["unfrozen_layers"] < 1:
        model["unfrozen_layers"] = 1
    return FinetuneConfig.model_validate(data)


def default_point(space: Mapping[str, Dimension], base: FinetuneConfig) -> dict[str, Any]:
    """The base config's own value of every searched key: the default fine-tune as a trial."""
    data = base.model_dump(mode="json")
    point = {key: _path_get(data, key) for key in space}
    layers = space.get("model.unfrozen_layers")
    if point.get("model.mode", data["model"]["mode"]) != "partial" and layers is not None and layers.randint:
        # the count is unused outside mode partial (trial_config sets 0); a value inside the range
        # keeps the search algorithm from warning about a point outside its distribution
        point["model.unfrozen_layers"] = layers.randint[0]
    return point


def complete_point(space: Mapping[str, Dimension], base: FinetuneConfig, point: Mapping[str, Any]) -> dict[str, Any]:
    """A point to evaluate first, with the base values filled in for the keys it leaves out.

    Unknown keys and categorical values outside their choices are errors (the search algorithms
    cannot place them); numeric values outside a range are allowed (a default may lie outside).
    """
    unknown = sorted(set(point) - set(space))
    if unknown:
        raise ValueError(f"points_to_evaluate sets {unknown}, which the search space does not search")
    full = default_point(space, base) | {key: _plain(value) for key, value in point.items()}
    for key, value in full.items():
        choices = space[key].choice
        if choices is not None and value not in choices:
            raise ValueError(f"points_to_evaluate: {key}={value!r} is not one of the choices {choices}")
    trial_config(base, full)  # the point must make a valid fine-tuning config
    return full
