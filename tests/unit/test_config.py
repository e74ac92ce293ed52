"""The one configuration path (ehrfm.config): override syntax, flags as config paths, precedence."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any, Literal

import pytest
from pydantic import Field

from ehrfm.config import (
    ConfigError,
    StrictModel,
    add_config_arguments,
    flag_overrides,
    load_config,
    out_dir,
    parse_config,
    split_overrides,
)


class Data(StrictModel):
    dir: str | None = None
    labels: str | None = None
    batch: int = 8


class Optim(StrictModel):
    lr: float = 1e-3
    betas: list[float] = [0.9, 0.999]
    schedule: Literal["cosine", "linear"] = "cosine"


@dataclasses.dataclass
class Arch:  # a stdlib dataclass section, as ehrfm.model.config.ModelConfig
    __pydantic_config__ = {"extra": "forbid"}
    hidden: int = 64
    layers: int = 2


class Run(StrictModel):
    name: str = "run"
    storage_path: str = "runs"


class Toy(StrictModel):
    seed: int = 0
    debug: bool = False
    data: Data = Data()
    optim: Optim = Optim()
    arch: Arch = Arch()
    run: Run = Run()
    tags: dict[str, Any] = {}
    heads: dict[str, Optim] = {}
    epochs: int = Field(1, ge=1)


def test_overrides_are_nested_paths_with_yaml_typed_values():
    cfg = load_config(
        Toy,
        None,
        [
            "seed=3",
            "debug=true",
            "data.batch=16",
            "optim.lr=5e-4",
            "optim.betas=[0.8, 0.9]",
            "data.labels=null",
            "arch.hidden=128",
            "tags.site={a: 1}",
            "heads.t2d.lr=0.1",
        ],
    )
    assert (cfg.seed, cfg.debug, cfg.data.batch, cfg.optim.lr) == (3, True, 16, 5e-4)
    assert cfg.optim.betas == [0.8, 0.9] and cfg.data.labels is None and cfg.arch.hidden == 128
    assert cfg.tags == {"site": {"a": 1}} and cfg.heads["t2d"].lr == 0.1


def test_a_str_field_keeps_the_text_as_written():
    cfg = load_config(Toy, None, ["run.name=001", "data.dir=2024", "run.storage_path='quoted'", "data.labels=null"])
    assert cfg.run.name == "001" and cfg.data.dir == "2024" and cfg.run.storage_path == "quoted"
    assert cfg.data.labels is None


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optim.lrr=1", "unknown key 'optim.lrr'"),
        ("sede=1", "unknown key 'sede'"),
        ("arch.hiden=3", "unknown key 'arch.hiden'"),  # a dataclass section is checked too
        ("heads.t2d.lrr=1", "unknown key 'heads.t2d.lrr'"),  # below a mapping of models
        ("seed.value=1", "'seed' is not a section"),
        ("data.dir.x=1", "'data.dir' is not a section"),
        ("seed", "not of the form key.path=value"),
        ("=3", "not of the form key.path=value"),
        ("optim.betas=[1", "optim.betas: value '[1' is not valid YAML"),
        ("epochs=0", "epochs: Input should be greater than or equal to 1"),
        ("optim.schedule=step", "optim.schedule: Input should be 'cosine' or 'linear'"),
    ],
)
def test_bad_overrides_are_errors_that_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        load_config(Toy, None, [override])


def test_errors_in_the_yaml_file_name_the_key_and_the_file(tmp_path):
    path = tmp_path / "toy.yaml"
    path.write_text("data:\n  dri: x\n")
    with pytest.raises(ConfigError, match=r"invalid Toy \(.*toy.yaml\): data.dri: Extra inputs"):
        load_config(Toy, path)
    path.write_text("seed: 1\ndata: 3\n")
    with pytest.raises(ConfigError, match="'data' is not a section"):
        load_config(Toy, path, ["data.dir=x"])
    path.write_text("- 1\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(Toy, path)


def test_a_mapping_value_replaces_a_section_unless_merging():
    base = {"data": {"dir": "d", "batch": 4}}
    assert load_config(Toy, None, ["data={labels: l}"], base=base).data == Data(labels="l")
    merged = load_config(Toy, None, [("data", {"labels": "l"})], base=base, merge=True).data
    assert merged == Data(dir="d", labels="l", batch=4)


def test_base_then_yaml_then_overrides_then_flags(tmp_path):
    path = tmp_path / "toy.yaml"
    path.write_text("seed: 1\ndata:\n  dir: from-yaml\n  batch: 2\n")
    base = {"seed": 9, "debug": True, "data": {"labels": "from-base", "batch": 1}}
    cfg = load_config(Toy, path, ["data.batch=3", ("data.batch", 4)], base=base)
    assert (cfg.seed, cfg.debug) == (1, True)  # the YAML over the base, merged key by key
    assert (cfg.data.dir, cfg.data.labels, cfg.data.batch) == ("from-yaml", "from-base", 4)  # later wins

    parser = argparse.ArgumentParser(prog="toy")
    add_config_arguments(parser, "Toy")
    parser.add_argument("--data")
    parser.add_argument("--batch", type=int)
    args = parser.parse_args(["--config", str(path), "--data", "from-flag", "data.dir=from-override", "data.batch=5"])
    cfg = parse_config(parser, Toy, args, {"data": "data.dir", "batch": "data.batch"})
    assert cfg.data.dir == "from-flag" and cfg.data.batch == 5  # a flag wins over an override; absent: no effect


def test_a_flag_is_exactly_its_config_path():
    parser = argparse.ArgumentParser(prog="toy")
    add_config_arguments(parser, "Toy")
    parser.add_argument("--data")
    parser.add_argument("--labels")
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--out")
    flags = {
        "data": "data.dir",
        "labels": "data.labels",
        "epochs": "epochs",
        "out": out_dir("run.storage_path", "run.name"),
    }
    args = parser.parse_args(["--data", "007", "--epochs", "2", "--out", "/tmp/runs/r1", "optim.lr=0.5"])
    assert flag_overrides(args, flags) == [
        ("data.dir", "007"),
        ("epochs", 2),
        ("run.storage_path", "/tmp/runs"),
        ("run.name", "r1"),
    ]
    via_flags = parse_config(parser, Toy, args, flags)
    via_overrides = load_config(
        Toy, None, ["optim.lr=0.5", "data.dir=007", "epochs=2", "run.storage_path=/tmp/runs", "run.name=r1"]
    )
    assert via_flags == via_overrides


def test_out_dir_is_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert out_dir("s", "n")("runs/ft") == {"s": str(tmp_path / "runs"), "n": "ft"}


def test_a_bad_command_line_config_is_a_usage_error_naming_the_key(capsys):
    parser = argparse.ArgumentParser(prog="toy")
    add_config_arguments(parser, "Toy")
    parser.add_argument("--epochs", type=int)
    for argv, message in (
        (["optim.lrr=1"], "unknown key 'optim.lrr'"),
        (["--epochs", "0"], "epochs: Input should be greater than or equal to 1"),
        (["--config", "/nonexistent/toy.yaml"], "toy.yaml"),
    ):
        with pytest.raises(SystemExit) as exit_:
            parse_config(parser, Toy, parser.parse_args(argv), {"epochs": "epochs"})
        assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_split_overrides_takes_a_section_prefix_off_strings_and_pairs():
    own, inner = split_overrides(
        ["num_samples=4", "finetune.train.epochs=2", ("finetune.task", "cad"), ("name", "x"), "finetuned=1"],
        "finetune",
    )
    assert own == ["num_samples=4", ("name", "x"), "finetuned=1"]
    assert inner == ["train.epochs=2", ("task", "cad")]


def test_every_command_with_a_typed_config_shares_the_front_end():
    """No command keeps its own `overrides` positional or `key=value` parser (apart from the
    task overrides of `ehrfm label`, which go to load_config too)."""
    root = Path(__file__).resolve().parents[2] / "platform"
    own = [
        str(path.relative_to(root))
        for path in root.rglob("*.py")
        if '"overrides", nargs' in path.read_text(encoding="utf-8") and path.name != "config.py"
    ]
    assert own == ["ehrfm/tasks/labeler.py"]
