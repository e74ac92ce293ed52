"""`ehrfm validate`: check OMOP tables (and optionally PRS files), quarantine bad rows, report counts.

Writes OUT/validation_report.json, OUT/quarantine/<table>.parquet and, with --prs,
OUT/quarantine/prs_samples.parquet; prints a short table of counts. Exit status 0 whenever the
inputs could be read (bad rows are data, not failures); 2 on a schema/format error, printed as
one line `ehrfm validate: <file>: <table>.<column>: <what>`. Every file is checked for readability
and its header before any row is read (omop.readability), so an unreadable file is named before
other tables are validated; a vocabulary table missing columns ehrfm does not use is a warning.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from ehrfm.omop.files import DEFAULT_BATCH_ROWS, OmopSchemaError
from ehrfm.omop.readability import preflight_omop
from ehrfm.omop.spec import REASONS
from ehrfm.omop.validation import PersonIndex, validate_omop_with_persons
from ehrfm.prs.readers import PrsFormatError, read_prs, read_sample_map, validate_prs


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ehrfm validate", description=__doc__.splitlines()[0])
    parser.add_argument("--omop", required=True, help="OMOP root: directory or filesystem URI")
    parser.add_argument("--prs", help="PRS file: pgsc_calc aggregated scores, plink2 .sscore or wide parquet")
    parser.add_argument("--sample-map", help="sample_id<TAB>person_id file (required with --prs)")
    parser.add_argument("--prs-column", default="SUM", choices=["SUM", "AVG"], help="score column to read")
    parser.add_argument("--batch-rows", type=int, default=DEFAULT_BATCH_ROWS)
    parser.add_argument("--out", required=True, help="output directory for the report and the quarantine")
    return parser


def _reason_text(by_reason: dict[str, int]) -> str:
    return ", ".join(f"{reason}={by_reason[reason]}" for reason in REASONS if reason in by_reason) or "-"


def summary_lines(report: dict) -> list[str]:
    """The human summary: one line per table, then the PRS counts (counts only, no values)."""
    lines = [f"{'table':<22}{'rows in':>11}{'kept':>11}{'quarantined':>13}  by reason"]
    for table, account in report["tables"].items():
        lines.append(
            f"{table:<22}{account['rows_in']:>11,}{account['rows_kept']:>11,}"
            f"{account['rows_quarantined']:>13,}  {_reason_text(account['by_reason'])}"
        )
    totals = report["totals"]
    lines.append(f"{'total':<22}{totals['rows_in']:>11,}{totals['rows_kept']:>11,}{totals['rows_quarantined']:>13,}")
    if report.get("missing_tables"):
        lines.append(f"tables not present: {', '.join(report['missing_tables'])}")
    for table, unmapped in report.get("unmapped", {}).items():
        if unmapped["unmapped"]:
            lines.append(
                f"unmapped {table}: {unmapped['unmapped']:,} of {unmapped['rows']:,} ({unmapped['share']:.1%})"
            )
    lines += [f"WARNING: {w}" for w in report.get("warnings", [])]
    prs = report.get("prs")
    if prs:
        excluded = ", ".join(f"{k}={v}" for k, v in prs["excluded_by_reason"].items()) or "-"
        problems = ", ".join(f"{k}={v}" for k, v in prs["problems"].items() if v) or "-"
        lines.append(
            f"PRS {prs['file']} ({prs['format']}): {prs['samples_in']:,} samples, {prs['pgs']} scores; "
            f"kept {prs['samples_kept']:,}, excluded {prs['samples_excluded']:,} ({excluded})"
        )
        lines.append(f"PRS problems: {problems}; persons without PRS: {prs['persons_without_prs']:,}")
    return lines


def _validate_prs(args: argparse.Namespace, out: Path, report: dict, persons: PersonIndex) -> None:
    scores = read_prs(args.prs, column=args.prs_column)
    sample_map = read_sample_map(args.sample_map)
    _, prs_report = validate_prs(scores, sample_map, persons, problems_out=out / "quarantine" / "prs_samples.parquet")
    report["prs"] = prs_report


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return _main(argv)
    finally:
        # No pyarrow reader may outlive the command: one still alive (held by a traceback or a
        # reference cycle) at interpreter teardown can abort the process with "terminate called
        # without an active exception" (exit 134) after a correct report (apache/arrow#34314).
        gc.collect()


def _main(argv: Sequence[str] | None) -> int:
    args = _parser().parse_args(list(argv) if argv is not None else None)
    if bool(args.prs) != bool(args.sample_map):
        print("ehrfm validate: --prs and --sample-map go together", file=sys.stderr)
        return 2
    out = Path(args.out)
    try:
        preflight = preflight_omop(args.omop)
        report, persons = validate_omop_with_persons(args.omop, out, batch_rows=args.batch_rows)
        if args.prs:
            _validate_prs(args, out, report, persons)
        if args.prs or preflight.warnings:
            report["warnings"] = preflight.warnings + report.get("warnings", [])
            (out / "validation_report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    except (OmopSchemaError, PrsFormatError) as exc:
        print(f"ehrfm validate: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    print("\n".join(summary_lines(report)))
    print(f"report: {out / 'validation_report.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
