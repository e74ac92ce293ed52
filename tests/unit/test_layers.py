"""The package's layering, declared once and held by a test (docs/ARCHITECTURE.md draws it).

Each layer may import the layers above it in LAYERS and its own, never one below; the simulator
(`ehrfm_synthetic`) sits above all of ehrfm and is imported by ehrfm nowhere (the `synthesize`
command and `evaluate.truth` name it as a string and import it lazily).
"""

from __future__ import annotations

import ast
import importlib
import sys
from pathlib import Path

import ehrfm

PACKAGE = Path(ehrfm.__file__).resolve().parent

# top to bottom: a module may import its own layer and those listed before it
LAYERS: list[tuple[str, ...]] = [
    # contracts and shared helpers (top-level modules)
    ("config", "constants", "schemas", "splits", "metrics", "calibration", "paths", "tracking", "small_counts"),
    ("genetics",),
    ("prs",),
    ("omop",),
    ("meds",),
    ("preprocess",),
    ("tasks",),
    ("model",),
    ("training",),
    ("transfer",),
    ("evaluate",),
    ("mlops",),
    ("tune",),
    ("serve",),
    ("cluster",),
    ("workflow", "cli", "__main__", "__init__"),
]
RANK = {name: rank for rank, names in enumerate(LAYERS) for name in names}


def unit_of(module: str) -> str:
    """`ehrfm.training.engine` -> "training"; `ehrfm.config` -> "config"; `ehrfm` -> "__init__"."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    return ".".join(rel.parts)


def imports_of(path: Path) -> list[tuple[int, str]]:
    """(line, imported module) for every import in the file, lazy ones inside functions too."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
            if node.module == "ehrfm":  # `from ehrfm import x`: x is the unit
                found += [(node.lineno, f"ehrfm.{alias.name}") for alias in node.names]
    return found


def test_every_unit_of_the_package_has_a_declared_layer():
    units = {
        p.stem if p.is_file() else p.name
        for p in PACKAGE.iterdir()
        if p.suffix == ".py" or (p / "__init__.py").exists()
    }
    assert units - set(RANK) == set()


def test_no_module_imports_a_layer_below_it():
    violations = []
    for path in sorted(PACKAGE.rglob("*.py")):
        source = module_name(path)
        for line, target in imports_of(path):
            if target.split(".")[0] == "ehrfm_synthetic":
                violations.append(f"{source}:{line} imports the simulator {target}")
            elif target.startswith("ehrfm.") and RANK[unit_of(target)] > RANK[unit_of(source)]:
                violations.append(f"{source}:{line} imports {target}, a layer below it")
    assert violations == []


def test_the_layer_check_sees_a_violation(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from ehrfm.serve import app\n")
    assert imports_of(bad) == [(2, "ehrfm.serve")]
    assert RANK[unit_of("ehrfm.serve")] > RANK[unit_of("ehrfm.model.transformer")]


HEAVY = ("pyarrow", "ray", "deepspeed", "mlflow")


class _BlockHeavy:
    """A meta-path finder that refuses (and records) any import of the heavy packages."""

    def __init__(self):
        self.refused: list[str] = []

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in HEAVY:
            self.refused.append(name)
            raise ImportError(f"{name} is not for the model layer")
        return None


def test_importing_the_model_needs_torch_and_the_contracts_only(monkeypatch):
    # this process may have imported everything already: evict the heavy packages and the model
    # from sys.modules for the duration of the test (monkeypatch puts them back) and re-import
    for name in list(sys.modules):
        if name.split(".")[0] in HEAVY or name == "ehrfm.model" or name.startswith("ehrfm.model."):
            monkeypatch.delitem(sys.modules, name)
    if hasattr(ehrfm, "model"):
        monkeypatch.setattr(ehrfm, "model", ehrfm.model)  # the package attribute follows the re-import
    blocker = _BlockHeavy()
    monkeypatch.setattr(sys, "meta_path", [blocker, *sys.meta_path])
    for module in ("ehrfm.model", "ehrfm.model.risk", "ehrfm.model.sampling", "ehrfm.model.io"):
        importlib.import_module(module)
    assert blocker.refused == []
    assert [m for m in sys.modules if m.split(".")[0] in HEAVY] == []
