"""`make bench`: run every benchmark in bench/, collect their JSON, and put the tables in the README.

Each benchmark is a script `bench/<name>.py` that takes `--out FILE.json` (and `--quick` for a
smoke-sized run) and writes a JSON object with at least a `markdown` table of its figures. Every
benchmark measures its baseline in the same run, so the ratios it reports are like for like.
"""

from __future__ import annotations

import argparse
import json
import platform as stdlib_platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
README = BENCH_DIR.parent / "README.md"
START, END = "<!-- bench:start -->", "<!-- bench:end -->"


def discover(only: list[str] | None) -> list[Path]:
    scripts = sorted(p for p in BENCH_DIR.glob("*.py") if p.name != "run.py" and not p.name.startswith("_"))
    if only:
        scripts = [p for p in scripts if p.stem in only]
    return scripts


def machine_summary() -> str:
    import os

    import psutil

    mem_gb = psutil.virtual_memory().total / 2**30
    return f"{stdlib_platform.processor() or stdlib_platform.machine()}, {os.cpu_count()} cores, {mem_gb:.0f} GiB"


def update_readme(results: dict[str, dict], machine: str) -> None:
    text = README.read_text()
    body = [
        START,
        f"Recorded in `bench/results/` by the scripts `make bench` runs ({machine}; tables "
        f"rebuilt {time.strftime('%Y-%m-%d')}). Each script measures its baseline in the same run.",
        "",
    ]
    for name, result in results.items():
        body += [f"### {name}", "", result.get("markdown", "(no table)").strip(), ""]
        machine_info = result.get("machine")
        note = machine_info.get("note") if isinstance(machine_info, dict) else None
        if note:
            body += [f"Conditions: {note}.", ""]
    body.append(END)
    block = "\n".join(body)
    if START in text and END in text:
        head, rest = text.split(START, 1)
        _, tail = rest.split(END, 1)
        text = head + block + tail
    else:
        text = text.rstrip() + "\n\n## Benchmarks\n\n" + block + "\n"
    README.write_text(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=BENCH_DIR / "results.json")
    parser.add_argument("--only", nargs="*", help="benchmark names (file stems) to run")
    parser.add_argument("--quick", action="store_true", help="smoke-sized runs; README left unchanged")
    parser.add_argument(
        "--render-only",
        action="store_true",
        help="run nothing: rebuild results.json and the README tables from bench/results/*.json",
    )
    args = parser.parse_args(argv)
    # quick runs go to a scratch folder so they never replace the recorded full-size results
    results_dir = Path(tempfile.mkdtemp(prefix="ehrfm-bench-")) if args.quick else BENCH_DIR / "results"
    results_dir.mkdir(exist_ok=True)
    results: dict[str, dict] = json.loads(args.out.read_text()) if args.out.is_file() else {}
    failed = []
    if args.render_only:
        for path in sorted((BENCH_DIR / "results").glob("*.json")):
            results[path.stem] = json.loads(path.read_text())
    for script in [] if args.render_only else discover(args.only):
        out = results_dir / f"{script.stem}.json"
        command = [sys.executable, str(script), "--out", str(out)] + (["--quick"] if args.quick else [])
        print(f"== {script.stem}: {' '.join(command[1:])}", flush=True)
        if subprocess.run(command, check=False).returncode != 0 or not out.is_file():
            failed.append(script.stem)
            continue
        results[script.stem] = json.loads(out.read_text())
    machine = machine_summary()
    if not args.quick:
        args.out.write_text(json.dumps(results, indent=2, sort_keys=True))
        update_readme(results, machine)
    if failed:
        print(f"benchmarks failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
