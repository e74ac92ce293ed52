"""MEDS-Tab on ehrfm's MEDS output: synthesize a demo cohort, `ehrfm preprocess` it, then run
MEDS-Tab's describe and tabularize steps on the dataset, as a user of another MEDS tool would.

MEDS-Tab (`meds-tab==0.2.0`) pins packages the project venv must not take (its own polars, numpy
and MEDS-transforms), so it lives in its own venv, made once:
    python3 -m venv /tmp/medstab && /tmp/medstab/bin/pip install meds-tab==0.2.0
    python bench/meds_tab.py --meds-tab-bin /tmp/medstab/bin --out bench/results/meds_tab.json
Static aggregation is `static/present` only: ehrfm's static codes (gender, race, ethnicity) carry
no value, so MEDS-Tab's `static/first` has nothing to aggregate and refuses ("No static features").
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

WINDOWS = "[30d,365d,full]"
AGGS = "[static/present,code/count,value/sum]"


def _run(name: str, command: list[str], log_dir: Path, steps: dict) -> None:
    started = time.perf_counter()
    with open(log_dir / f"{name}.log", "w", encoding="utf-8") as log:
        rc = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, check=False).returncode
    steps[name] = {"rc": rc, "seconds": round(time.perf_counter() - started, 2)}
    if rc:
        tail = (log_dir / f"{name}.log").read_text(encoding="utf-8").strip().splitlines()[-3:]
        raise SystemExit(f"{name} failed (rc {rc}): {' | '.join(tail)}")


def _matrix_shapes(tab_dir: Path) -> dict[str, list[int]]:
    """{split/window/agg: [rows, columns]} of the train-shard-0 matrices MEDS-Tab wrote."""
    shapes = {}
    for path in sorted(tab_dir.glob("*/part-00000/*/*/*.npz")):
        key = "/".join(path.relative_to(tab_dir).with_suffix("").parts[:1] + path.relative_to(tab_dir).parts[2:])
        shapes[key.removesuffix(".npz")] = [int(n) for n in np.load(path)["shape"]]
    return shapes


def _markdown(result: dict) -> str:
    shapes = result["matrices"]
    rows = [
        f"MEDS-Tab 0.2.0 on `ehrfm preprocess` output ({result['persons']} synthetic persons, "
        f"{result['events']:,} events, {result['codes']:,} codes; windows {result['windows']}):",
        "",
        "| step | seconds |",
        "|---|---:|",
        *(f"| {name} | {step['seconds']} |" for name, step in result["steps"].items()),
        "",
        f"train matrices: static/present {shapes.get('train/none/static/present')}, "
        f"full/code/count {shapes.get('train/full/code/count')} (rows x features).",
    ]
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench/meds_tab.py", description=__doc__.splitlines()[0])
    parser.add_argument("--persons", type=int, default=200)
    parser.add_argument("--work", type=Path, default=Path("/tmp/ehrfm-meds-tab"))
    parser.add_argument("--meds-tab-bin", type=Path, default=Path(os.environ.get("MEDS_TAB_BIN", "/tmp/medstab/bin")))
    parser.add_argument("--min-code-count", type=int, default=10)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--quick", action="store_true", help="60 persons (a smoke run)")
    args = parser.parse_args(argv)
    if args.quick:
        args.persons, args.work = 60, args.work.with_name(args.work.name + "-quick")
    describe = args.meds_tab_bin / "meds-tab-describe"
    if not describe.is_file():  # recorded, not failed: MEDS-Tab is an optional, separate install
        why = f"MEDS-Tab not found at {args.meds_tab_bin} (make its venv: see bench/meds_tab.py)"
        print(why, file=sys.stderr)
        if args.out:
            args.out.write_text(json.dumps({"skipped": why, "markdown": f"Skipped: {why}."}, indent=1) + "\n")
        return 0
    work, steps = args.work, {}
    work.mkdir(parents=True, exist_ok=True)
    cohort, dataset, tab = work / "cohort", work / "meds", work / "tab"
    ehrfm = [sys.executable, "-m", "ehrfm"]
    if not (cohort / "manifest.json").is_file():
        _run(
            "synthesize",
            [*ehrfm, "synthesize", "--persons", str(args.persons), "--seed", "0", "--out", str(cohort)],
            work,
            steps,
        )
    _run(
        "preprocess",
        [*ehrfm, "preprocess", "--cohort", str(cohort), "--out", str(dataset), "progress_bars=false"],
        work,
        steps,
    )
    common = [
        f"input_dir={dataset / 'data'}",
        f"output_dir={tab}",
        f"tabularization.min_code_inclusion_count={args.min_code_count}",
        f"tabularization.window_sizes={WINDOWS}",
        f"tabularization.aggs={AGGS}",
    ]
    shutil.rmtree(tab, ignore_errors=True)  # fresh: MEDS-Tab's do_overwrite would also drop describe's output
    _run("meds_tab_describe", [str(describe), *common[:2]], work, steps)
    _run("meds_tab_tabularize_static", [str(args.meds_tab_bin / "meds-tab-tabularize-static"), *common], work, steps)
    _run(
        "meds_tab_tabularize_time_series",
        [str(args.meds_tab_bin / "meds-tab-tabularize-time-series"), *common],
        work,
        steps,
    )
    report = json.loads((dataset / "report.json").read_text(encoding="utf-8"))
    result = {
        "persons": args.persons,
        "events": report["events"]["events"],
        "codes": report["events"]["meds"]["codes"],
        "windows": WINDOWS,
        "aggs": AGGS,
        "steps": steps,
        "matrices": _matrix_shapes(tab / "tabularize"),
    }
    result["markdown"] = _markdown(result)
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
