"""What a stage's output was made from, as one hash: config contents, upstream outputs, package version.

A stage's arguments name its config files by *path*; hashing the arguments alone would keep an
output whose YAML was edited in place. So the fingerprint reads every config file the arguments
name (a path argument, the value of a `key=path` override, a shipped task name) and the config
files those name in turn, and hashes their bytes. Upstream stages enter through their output
manifest (file names, sizes and modification times recorded when they finished), and the package
version enters so an upgraded ehrfm does not reuse outputs of an older one.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from pathlib import Path

import yaml

CONFIG_SUFFIXES = (".yaml", ".yml")
# `--task t2d` names the shipped jobs/configs/tasks/t2d.yaml (ehrfm.tasks.definitions.load_task)
TASK_CONFIG_DIR = Path(__file__).resolve().parents[3] / "jobs" / "configs" / "tasks"


def package_version() -> str:
    import ehrfm

    return ehrfm.__version__


def _candidates(args: list[str]) -> Iterator[Path]:
    """Config paths an argument list names: `--config X.yaml`, `key=X.yaml`, `--task NAME`."""
    previous = ""
    for token in args:
        value = token.split("=", 1)[1] if "=" in token and not token.startswith("-") else token
        if value.endswith(CONFIG_SUFFIXES):
            yield Path(value)
        elif previous == "--task" and not Path(value).suffix:
            yield TASK_CONFIG_DIR / f"{value}.yaml"
        previous = token


def _referenced(path: Path) -> Iterator[Path]:
    """Config files a YAML file names in its string values (e.g. tune's `finetune_config`)."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return  # the stage itself reports an unreadable config; its bytes are hashed regardless
    stack = [data]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, str) and item.endswith(CONFIG_SUFFIXES):
            for base in (Path.cwd(), path.parent):
                if (base / item).is_file():
                    yield base / item
                    break


def config_files(args: list[str]) -> list[Path]:
    """Every existing config file the arguments name, directly or through another config, resolved."""
    found: dict[Path, None] = {}
    pending = [p for p in _candidates(args) if p.is_file()]
    while pending:
        path = pending.pop(0).resolve()
        if path in found:
            continue
        found[path] = None
        pending.extend(_referenced(path))
    return sorted(found)


def file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def output_manifest(output: Path, exclude: Iterable[str] = ()) -> str:
    """Hash of (relative path, size, mtime) of every file under a finished stage's output.

    Sizes and times rather than contents: checkpoints can be large, and the manifest is taken once,
    when the stage finishes, so a skipped stage hands its recorded manifest on unchanged.
    """
    skip = set(exclude)
    entries = []
    if output.is_dir():
        for path in sorted(output.rglob("*")):
            if path.is_file() and path.name not in skip:
                stat = path.stat()
                entries.append((path.relative_to(output).as_posix(), stat.st_size, stat.st_mtime_ns))
    return hashlib.sha256(json.dumps(entries).encode()).hexdigest()[:16]


def stage_fingerprint(name: str, args: list[str], upstream: dict[str, str]) -> tuple[str, dict[str, str]]:
    """(fingerprint, {config path: sha256}) of a stage from its arguments, config contents and
    upstream manifests ({upstream stage: its recorded manifest or fingerprint})."""
    configs = {str(path): file_digest(path) for path in config_files(args)}
    payload = {
        "stage": name,
        "args": args,
        "configs": configs,
        "upstream": upstream,
        "version": package_version(),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16], configs
