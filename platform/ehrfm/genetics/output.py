"""Writers for `ehrfm score_prs`: pgsc_calc-style aggregated scores, the match report and match log.

aggregated_scores.txt.gz is pgsc_calc's long format (tab-separated `sampleset IID PGS SUM DENOM
AVG`, one row per sample and score), which ehrfm.prs.readers.read_prs reads directly. Sample blocks
finish in any order; each is written as its own gzip member and the members are joined in sample
order at the end (a multi-member gzip file is one valid gzip stream), so no more than one block
of rows is ever held in memory.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from ehrfm.genetics.ray_scoring import SampleBlockScores

AGGREGATED_NAME = "aggregated_scores.txt.gz"
REPORT_NAME = "match_report.json"
MATCH_LOG_NAME = "match_log.parquet"
COLUMNS = ("sampleset", "IID", "PGS", "SUM", "DENOM", "AVG")


class AggregatedScoresWriter:
    """Collects finished sample blocks into OUT/aggregated_scores.txt.gz."""

    def __init__(
        self, out_dir: Path, sampleset: str, score_ids: list[str], sample_ids: np.ndarray, denominators: np.ndarray
    ) -> None:
        self.out_dir = Path(out_dir)
        self.parts_dir = self.out_dir / "_aggregated_parts"
        shutil.rmtree(self.parts_dir, ignore_errors=True)
        self.parts_dir.mkdir(parents=True)
        self.sampleset = sampleset
        self.score_ids = np.asarray(score_ids, dtype=object)
        self.sample_ids = np.asarray(sample_ids, dtype=object)
        self.denominators = np.asarray(denominators, dtype=np.int64)  # [K], the same for every sample
        self.rows_written = 0
        self.samples_with_missing = 0
        self.missing_genotypes = 0

    def write(self, block: SampleBlockScores) -> None:
        n, k = block.sums.shape
        sums = block.sums.ravel()
        denom = np.tile(self.denominators, n)
        avg = np.full(len(sums), np.nan)
        np.divide(sums, denom, out=avg, where=denom > 0)
        table = pa.table(
            {
                "sampleset": pa.array(np.full(n * k, self.sampleset, dtype=object), pa.string()),
                "IID": pa.array(np.repeat(self.sample_ids[block.start : block.stop], k), pa.string()),
                "PGS": pa.array(np.tile(self.score_ids, n), pa.string()),
                "SUM": pa.array(sums, pa.float64()),
                "DENOM": pa.array(denom, pa.int64()),
                "AVG": pa.array(avg, pa.float64(), mask=~(denom > 0)),
            }
        )
        options = pacsv.WriteOptions(include_header=False, delimiter="\t", quoting_style="none")
        with pa.CompressedOutputStream(str(self.parts_dir / f"{block.start:012d}.txt.gz"), "gzip") as sink:
            if block.start == 0:  # pyarrow would quote header names; pgsc_calc's header is bare
                sink.write(("\t".join(COLUMNS) + "\n").encode())
            pacsv.write_csv(table, sink, write_options=options)
        self.rows_written += n * k
        self.samples_with_missing += int((block.missing > 0).sum())
        self.missing_genotypes += int(block.missing.sum())

    def finish(self) -> Path:
        """Join the parts in sample order; the parts directory is removed."""
        target = self.out_dir / AGGREGATED_NAME
        parts = sorted(self.parts_dir.glob("*.txt.gz"))
        with target.open("wb") as out:
            for part in parts:
                with part.open("rb") as handle:
                    shutil.copyfileobj(handle, out)
        shutil.rmtree(self.parts_dir)
        return target


def write_report(out_dir: Path, report: dict) -> Path:
    path = Path(out_dir) / REPORT_NAME
    path.write_text(json.dumps(report, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    return path


def write_match_log(out_dir: Path, logs: list[pd.DataFrame]) -> Path:
    """One row per scoring-file row and score: its status, reason and the target variant it matched."""
    path = Path(out_dir) / MATCH_LOG_NAME
    frame = pd.concat(logs, ignore_index=True) if logs else pd.DataFrame()
    for column in (
        "rsid",
        "chr",
        "effect_allele",
        "other_allele",
        "unsupported",
        "target_id",
        "target_ref",
        "target_alt",
        "match_type",
        "status",
        "reason",
        "score_id",
    ):
        if column in frame.columns:
            frame[column] = frame[column].astype(object).where(frame[column].notna(), None)
    pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), path)
    return path
