"""The preprocess report: counts only (rows per table, quarantine reasons, persons per split, token
statistics, PRS coverage), as report.json, a short human summary, the timelines manifest and,
when MLFLOW_TRACKING_URI is set, MLflow metrics. Never a patient-level value."""

from __future__ import annotations

import os

import numpy as np

from ehrfm.constants import SPLITS

PERCENTILES = (0, 5, 25, 50, 75, 95, 99, 100)


def percentiles(values: np.ndarray) -> dict[str, float]:
    if len(values) == 0:
        return {f"p{p}": 0.0 for p in PERCENTILES}
    points = np.percentile(np.asarray(values, dtype=np.float64), PERCENTILES, method="lower")
    return {f"p{p}": float(v) for p, v in zip(PERCENTILES, points)}


def _reasons(by_reason: dict[str, int]) -> str:
    return ", ".join(f"{k}={v:,}" for k, v in by_reason.items()) or "-"


def summary_lines(report: dict) -> list[str]:
    """A few lines a person reads after a run."""
    lines = [f"{'table':<22}{'rows in':>12}{'kept':>12}{'quarantined':>13}{'events':>12}  by reason"]
    for table, acc in report["tables"].items():
        lines.append(
            f"{table:<22}{acc['rows_in']:>12,}{acc['rows_kept']:>12,}{acc['rows_quarantined']:>13,}"
            f"{acc.get('events', 0):>12,}  {_reasons(acc['by_reason'])}"
        )
    rules = report.get("plausibility")
    if rules:
        lines.append(
            f"dates kept: {rules['earliest_date']} .. {rules['extraction_date']} (extraction date from "
            f"{rules['extraction_date_source']}), at most {rules['observation_slack_days']} days after observation"
        )
    events = report["events"]
    lines.append(f"events: {events['events']:,} for {events['subjects']:,} persons in {events['shards']} shards")
    if "meds" in events:  # metadata/codes.parquet: how many codes take the vocabulary form
        meds_codes = events["meds"]
        lines.append(
            f"MEDS dataset: data/{{train,tuning,held_out}}/, {meds_codes['codes']:,} codes "
            f"({meds_codes['codes_with_concept']:,} <vocabulary>/<concept_code>)"
        )
    splits = report["splits"]
    lines.append("persons per split: " + ", ".join(f"{s}={splits.get(s, 0):,}" for s in SPLITS))
    tokens = report["tokens"]
    pct = tokens["per_person"]
    lines.append(
        f"tokens: {tokens['total']:,}; per person p5={pct['p5']:.0f} p50={pct['p50']:.0f} "
        f"p95={pct['p95']:.0f} max={pct['p100']:.0f}; UNK (codes outside the train vocabulary) "
        + ", ".join(f"{s}={n:,}" for s, n in tokens["unk_tokens_by_split"].items())
    )
    tok = report["tokenizer"]
    lines.append(
        f"tokenizer {tok['version']}: vocab {tok['vocab_size']:,} ({tok['codes_in_vocabulary']:,} codes "
        f"of {tok['codes_seen']:,} seen in train, {tok['codes_with_value_bins']:,} with value bins)"
    )
    prs = report["prs"]
    if prs.get("given"):
        lines.append(
            f"PRS: {prs['pgs']} scores; {prs['persons_with_prs']:,} of {prs['persons']:,} persons "
            f"({100 * prs['coverage']:.1f}%); excluded samples: {_reasons(prs['excluded_by_reason'])}; "
            f"ancestry-adjusted: {prs['transform'].get('ancestry_adjusted', False)}"
        )
        lines.extend(f"PRS warning: {w}" for w in prs.get("warnings", []))
    else:
        lines.append("PRS: none given")
    lines.append(f"finished in {report['seconds']['total']:.1f}s")
    return lines


def metrics(report: dict) -> dict[str, float]:
    """Flat numeric counts for MLflow."""
    out: dict[str, float] = {}
    for table, acc in report["tables"].items():
        out[f"rows_in.{table}"] = acc["rows_in"]
        out[f"rows_quarantined.{table}"] = acc["rows_quarantined"]
    out["events"] = report["events"]["events"]
    out["persons"] = report["events"]["subjects"]
    for split in SPLITS:
        out[f"persons.{split}"] = report["splits"].get(split, 0)
    out["tokens"] = report["tokens"]["total"]
    out["unk_tokens"] = report["tokens"]["unk_tokens"]
    for name, value in report["tokens"]["per_person"].items():
        out[f"tokens_per_person.{name}"] = value
    out["vocab_size"] = report["tokenizer"]["vocab_size"]
    if report["prs"].get("given"):
        out["prs_coverage"] = report["prs"]["coverage"]
    for stage, seconds in report["seconds"].items():
        out[f"seconds.{stage}"] = seconds
    return out


def log_to_mlflow(report: dict, params: dict[str, object]) -> bool:
    """Log counts, the config and report.json when MLFLOW_TRACKING_URI is set; False otherwise."""
    if not os.environ.get("MLFLOW_TRACKING_URI"):
        return False
    import mlflow

    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    from ehrfm.tracking import use_experiment

    use_experiment(os.environ.get("EHRFM_PREPROCESS_EXPERIMENT", "ehrfm-preprocess"))
    with mlflow.start_run(run_name="preprocess"):
        mlflow.log_params({k: str(v)[:500] for k, v in params.items()})
        mlflow.log_metrics({k.replace("%", "pct"): float(v) for k, v in metrics(report).items()})
        mlflow.log_dict(report, "report.json")
        mlflow.set_tag("tokenizer_version", report["tokenizer"]["version"])
    return True
