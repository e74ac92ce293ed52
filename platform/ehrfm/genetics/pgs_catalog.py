"""PGS Catalog scoring files (original and harmonised, format v2.0) and plink2 `--score` files.

A scoring file becomes one or more `Score`s: the header metadata plus one row per variant with a
normalised position, alleles and weight. Rows this project cannot score additively (haplotypes,
diplotypes, interactions, dominant/recessive effects, genotype-specific weights, alleles that are
not DNA, unparsable weights) stay in the table with an `unsupported` reason, so every row of the
file is accounted for in the match report instead of being dropped or silently scored.
"""

from __future__ import annotations

import glob
import gzip
import io
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from ehrfm.genetics.variant_alleles import is_dna, normalise_chromosome

VARIANT_COLUMNS = ("row_nr", "rsid", "chr", "pos", "effect_allele", "other_allele", "effect_weight", "unsupported")
UNSUPPORTED_REASONS = (
    "haplotype",
    "diplotype",
    "interaction",
    "dominant",
    "recessive",
    "genotype_weights",
    "complex_allele",
    "invalid_weight",
)
_TRUE_TEXT = {"true", "t", "1", "yes"}
_DOSAGE_WEIGHTS = ("dosage_0_weight", "dosage_1_weight", "dosage_2_weight")
_BUILDS = {"grch37": "GRCh37", "hg19": "GRCh37", "grch38": "GRCh38", "hg38": "GRCh38"}
_PLINK_ID = re.compile(r"^(?:chr)?([0-9XYMTxymt]+):(\d+):([A-Za-z]+):([A-Za-z]+)$")


class ScoringFileError(ValueError):
    """A scoring file that cannot be read at all (names the file and the column)."""


@dataclass
class Score:
    """One polygenic score: where it came from, its metadata, and its variant rows."""

    score_id: str
    source: str  # file name
    header: dict[str, str]
    genome_build: str | None  # build of the positions used for matching (None = not reported)
    harmonised: bool
    variants: pd.DataFrame = field(repr=False)  # VARIANT_COLUMNS

    @property
    def n_rows(self) -> int:
        return len(self.variants)

    def unsupported_counts(self) -> dict[str, int]:
        counts = self.variants["unsupported"].value_counts()
        return {str(reason): int(n) for reason, n in counts.items()}


def normalise_build(text: str | None) -> str | None:
    """'GRCh37'/'hg19' -> 'GRCh37', 'GRCh38'/'hg38' -> 'GRCh38', 'NR'/empty -> None."""
    if text is None:
        return None
    return _BUILDS.get(text.strip().lower())


def _open_text(path: Path) -> io.TextIOBase:
    raw = path.open("rb")
    if path.name.lower().endswith(".gz"):
        return io.TextIOWrapper(gzip.GzipFile(fileobj=raw), encoding="utf-8-sig", newline="")
    return io.TextIOWrapper(raw, encoding="utf-8-sig", newline="")


def read_header(path: Path) -> tuple[dict[str, str], int]:
    """(`#key=value` metadata, number of leading `#` lines) of a scoring file."""
    header: dict[str, str] = {}
    n_lines = 0
    with _open_text(path) as handle:
        for line in handle:
            if not line.startswith("#"):
                break
            n_lines += 1
            text = line.lstrip("#").strip()
            if "=" in text:
                key, value = text.split("=", 1)
                header[key.strip()] = value.strip()
    return header, n_lines


def _read_table(path: Path, skip: int) -> pd.DataFrame:
    with _open_text(path) as handle:
        for _ in range(skip):
            handle.readline()
        body = handle.read()
    if not body.strip():
        raise ScoringFileError(f"{path.name}: no column header after the {skip} metadata line(s)")
    first = body.split("\n", 1)[0]
    sep = "\t" if "\t" in first else r"\s+"
    try:
        table = pd.read_csv(
            io.StringIO(body),
            sep=sep,
            dtype=str,
            keep_default_na=False,
            na_filter=False,
            engine="c" if sep == "\t" else "python",
            quoting=3,
        )
    except pd.errors.ParserError as error:  # ragged rows: the message holds line numbers, not values
        raise ScoringFileError(f"{path.name}: not a tab-separated scoring table ({error})") from None
    table.columns = [str(c).strip() for c in table.columns]
    return table


def _flag(table: pd.DataFrame, column: str) -> np.ndarray:
    if column not in table.columns:
        return np.zeros(len(table), dtype=bool)
    return table[column].str.strip().str.lower().isin(_TRUE_TEXT).to_numpy()


def _text(table: pd.DataFrame, column: str) -> pd.Series:
    if column not in table.columns:
        return pd.Series([""] * len(table), index=table.index, dtype=object)
    return table[column].astype(object).map(lambda v: v.strip() if isinstance(v, str) else "")


def _positions(values: pd.Series) -> pd.Series:
    return pd.to_numeric(values.where(values != ""), errors="coerce").astype("Int64")


def _alleles(values: pd.Series) -> pd.Series:
    """Upper-case alleles; None (never NaN) where the cell is empty."""
    return pd.Series(
        [v.upper() if isinstance(v, str) and v else None for v in values], index=values.index, dtype=object
    )


def _unsupported_reasons(
    table: pd.DataFrame, effect: pd.Series, other: pd.Series, weight: np.ndarray, has_weight: bool
) -> np.ndarray:
    """The first reason (in UNSUPPORTED_REASONS order) each row cannot be scored, else None."""
    n = len(table)
    reasons = np.full(n, None, dtype=object)

    def mark(mask: np.ndarray, reason: str) -> None:
        reasons[(reasons == None) & mask] = reason  # noqa: E711 (element-wise)

    mark(_flag(table, "is_haplotype"), "haplotype")
    mark(_flag(table, "is_diplotype"), "diplotype")
    mark(_flag(table, "is_interaction"), "interaction")
    mark(_flag(table, "is_dominant"), "dominant")
    mark(_flag(table, "is_recessive"), "recessive")
    if not has_weight:
        mark(np.ones(n, dtype=bool), "genotype_weights")
    bad_effect = np.array([not (isinstance(a, str) and is_dna(a)) for a in effect], dtype=bool)
    bad_other = np.array([isinstance(a, str) and not is_dna(a) for a in other], dtype=bool)
    mark(bad_effect | bad_other, "complex_allele")
    mark(~np.isfinite(weight), "invalid_weight")
    return reasons


def _score_id(header: dict[str, str], path: Path) -> str:
    for key in ("pgs_id", "pgs_name"):
        if header.get(key):
            return header[key]
    name = path.name
    for suffix in (".gz", ".txt", ".tsv"):
        name = name.removesuffix(suffix)
    return name


def _catalog_score(path: Path, header: dict[str, str], table: pd.DataFrame) -> Score:
    """A PGS Catalog (or custom pgsc_calc-style) file: one score."""
    columns = set(table.columns)
    if "effect_allele" not in columns:
        raise ScoringFileError(f"{path.name}: required column effect_allele missing ({len(table)} rows)")
    has_weight = "effect_weight" in columns
    if not has_weight and not set(_DOSAGE_WEIGHTS) <= columns:
        raise ScoringFileError(
            f"{path.name}: required column effect_weight missing (nor dosage_0/1/2_weight; {len(table)} rows)"
        )
    harmonised = "hm_pos" in columns or "HmPOS_build" in header
    if not harmonised and "rsID" not in columns and "chr_position" not in columns:
        raise ScoringFileError(f"{path.name}: needs rsID or chr_name+chr_position ({len(table)} rows)")
    if harmonised:
        chrom, pos, build = _text(table, "hm_chr"), _text(table, "hm_pos"), header.get("HmPOS_build")
    else:
        chrom, pos, build = _text(table, "chr_name"), _text(table, "chr_position"), header.get("genome_build")
    effect = _alleles(_text(table, "effect_allele"))
    other = _alleles(_text(table, "other_allele"))
    if harmonised and "hm_inferOtherAllele" in columns:
        inferred = _text(table, "hm_inferOtherAllele")  # '/'-separated candidates; use only a single one
        other = _alleles(
            pd.Series(
                [o if o is not None else (i if "/" not in i else "") for o, i in zip(other, inferred)],
                index=table.index,
                dtype=object,
            )
        )
    if has_weight:
        weight = pd.to_numeric(_text(table, "effect_weight").replace("", np.nan), errors="coerce").to_numpy(float)
    else:  # genotype-specific weights: no single additive weight exists
        weight = np.full(len(table), np.nan)
    variants = pd.DataFrame(
        {
            "row_nr": np.arange(len(table), dtype=np.int64),
            "rsid": _text(table, "rsID").replace("", None).astype(object),
            "chr": chrom.map(lambda c: normalise_chromosome(c) if c else None).astype(object),
            "pos": _positions(pos),
            "effect_allele": effect,
            "other_allele": other,
            "effect_weight": weight,
            "unsupported": pd.Series(_unsupported_reasons(table, effect, other, weight, has_weight), dtype=object),
        }
    )
    return Score(_score_id(header, path), path.name, header, normalise_build(build), harmonised, variants)


def _plink_scores(path: Path, header: dict[str, str], table: pd.DataFrame) -> list[Score]:
    """plink2 `--score` input (ID=chr:pos:ref:alt, effect_allele, one column per score)."""
    effect_col = "effect_allele" if "effect_allele" in table.columns else "A1"
    weight_cols = [c for c in table.columns if c not in {"ID", effect_col}]
    if not weight_cols:
        raise ScoringFileError(f"{path.name}: plink2 score file without weight columns ({len(table)} rows)")
    parts = table["ID"].str.strip().str.extract(_PLINK_ID)
    bad_ids = int(parts[0].isna().sum())
    if bad_ids:
        raise ScoringFileError(
            f"{path.name}: column ID has {bad_ids} of {len(table)} value(s) not of the form chr:pos:ref:alt"
        )
    effect = _alleles(_text(table, effect_col))
    first, second = parts[2].str.upper(), parts[3].str.upper()
    other = pd.Series(
        np.where(effect == first, second, np.where(effect == second, first, None)), index=table.index, dtype=object
    )
    scores = []
    for column in weight_cols:
        weight = pd.to_numeric(table[column].replace("", np.nan), errors="coerce").to_numpy(float)
        keep = weight != 0  # a zero weight means "not in this score" in the wide plink2 layout
        variants = pd.DataFrame(
            {
                "row_nr": np.arange(len(table), dtype=np.int64),
                "rsid": None,
                "chr": parts[0].map(normalise_chromosome).astype(object),
                "pos": _positions(parts[1]),
                "effect_allele": effect,
                "other_allele": other,
                "effect_weight": weight,
            }
        )
        variants["unsupported"] = pd.Series(_unsupported_reasons(table, effect, other, weight, True), dtype=object)
        variants = variants[keep].reset_index(drop=True)
        scores.append(
            Score(column, path.name, dict(header), normalise_build(header.get("genome_build")), False, variants)
        )
    return scores


def read_scoring_file(path: str | Path) -> list[Score]:
    """Every score in one scoring file (PGS Catalog files hold one; plink2 wide files may hold several)."""
    path = Path(path)
    if not path.is_file():
        raise ScoringFileError(f"{path}: scoring file not found")
    header, n_header = read_header(path)
    table = _read_table(path, n_header)
    if "ID" in table.columns and "effect_weight" not in table.columns and "chr_position" not in table.columns:
        return _plink_scores(path, header, table)
    return [_catalog_score(path, header, table)]


def find_scoring_files(spec: str | Path | list[str | Path]) -> list[Path]:
    """Files named by a path, a directory (every *.txt / *.txt.gz / *.tsv inside) or a glob."""
    specs = spec if isinstance(spec, list) else [spec]
    found: list[Path] = []
    for item in specs:
        item = Path(item)
        if item.is_dir():
            found += sorted(
                p
                for p in item.iterdir()
                if p.is_file() and p.name.lower().endswith((".txt", ".txt.gz", ".tsv", ".tsv.gz"))
            )
        elif any(ch in str(item) for ch in "*?["):
            found += sorted(Path(p) for p in glob.glob(str(item)) if Path(p).is_file())
        else:
            found.append(item)
    if not found:
        raise ScoringFileError(f"no scoring files found in {', '.join(str(s) for s in specs)}")
    return found
