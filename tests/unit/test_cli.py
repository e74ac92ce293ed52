"""`ehrfm --version` prints the package version, and every subcommand's --help names itself `ehrfm <command>`."""

from __future__ import annotations

import ast
import importlib.util
import tomllib
from pathlib import Path

import pytest

from ehrfm import cli

ROOT = Path(__file__).resolve().parents[2]


def test_version_flag_prints_the_pyproject_version(capsys) -> None:
    expected = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert expected == cli._FALLBACK_VERSION
    for flag in ("--version", "-V"):
        assert cli.main([flag]) == 0
        assert capsys.readouterr().out.strip() == f"ehrfm {expected}"


def _parser_progs(module_name: str) -> list[str]:
    """Every literal `prog=` given to argparse.ArgumentParser in the module (read, not imported: no torch/Ray)."""
    source = Path(importlib.util.find_spec(module_name).origin).read_text()
    progs = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) == "ArgumentParser":
            progs += [kw.value.value for kw in node.keywords if kw.arg == "prog"]
    return progs


@pytest.mark.parametrize("name", sorted(cli.COMMANDS))
def test_every_subcommand_parser_is_named_ehrfm_command(name: str) -> None:
    module_name = cli.COMMANDS[name][0].split(":")[0]
    assert _parser_progs(module_name) == [f"ehrfm {name}"]


def test_cluster_help_says_ehrfm_cluster(capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main(["cluster", "--help"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.startswith("usage: ehrfm cluster ")
