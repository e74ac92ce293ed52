"""Match scoring-file variants to genotyped variants by position and alleles, as pgsc_calc does.

Conventions (pgsc_calc / pygscatalog defaults):
- The target's REF is the .bim's allele 2 and ALT its allele 1 (plink2's reading of a .bim).
- A scoring row is compared with every target variant at its chromosome:position; match types in
  priority order: refalt > altref > refalt_flip > altref_flip (other allele known), then
  ref_no_oa > alt_no_oa (effect allele only). `_flip` = the scoring file is on the other strand.
- Strand-ambiguous target variants (A/T, C/G SNPs) are excluded unless `keep_ambiguous`;
  positions with several target variants (split multi-allelics) are excluded unless
  `keep_multiallelic`.
- The best candidate wins (ties: the first target variant). Rows of one score whose best matches
  land on the same target variant are all excluded (pgsc_calc's default, keep_first_match off).
- A score whose share of matched rows is below `min_match_rate` (pgsc_calc's min_overlap, 0.75)
  is refused.
Each scoring row ends in exactly one status (matched / excluded / unmatched / unsupported), so the
report's counts add up to the rows of the file.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from ehrfm.genetics.pgs_catalog import UNSUPPORTED_REASONS, Score
from ehrfm.genetics.variant_alleles import complement, is_strand_ambiguous

MATCH_PRIORITY = {"refalt": 7, "altref": 6, "refalt_flip": 5, "altref_flip": 4, "ref_no_oa": 3, "alt_no_oa": 2}
EXCLUDED, NO_MATCH = 1, 0
EXCLUDE_REASONS = ("ambiguous", "multiallelic", "duplicate_target")
UNMATCHED_REASONS = ("no_position", "not_in_target", "allele_mismatch")
_EFFECT_IS_ALT = {"altref", "altref_flip", "alt_no_oa"}  # effect allele = .bim allele 1 (the counted one)
_MISSING_ALLELES = {"0", ".", "-", ""}


@dataclass(frozen=True)
class MatchOptions:
    keep_ambiguous: bool = False
    keep_multiallelic: bool = False
    min_match_rate: float = 0.75


@dataclass
class ScoreMatch:
    """The outcome of matching one score: a row per scoring variant and the counts."""

    score_id: str
    log: pd.DataFrame  # one row per scoring-file row (see LOG_COLUMNS)
    summary: dict

    @property
    def passed(self) -> bool:
        return bool(self.summary["passed"])

    def matched(self) -> pd.DataFrame:
        """target (global variant index), effect_is_a1, effect_weight of the matched rows."""
        rows = self.log[self.log["status"] == "matched"]
        return pd.DataFrame(
            {
                "target": rows["target"].astype(np.int64).to_numpy(),
                "effect_is_a1": rows["effect_is_a1"].astype(bool).to_numpy(),
                "effect_weight": rows["effect_weight"].to_numpy(float),
            }
        )


def prepare_target(variants: pd.DataFrame) -> pd.DataFrame:
    """Target variants as REF/ALT with the ambiguity and multi-allelic flags the matcher needs."""
    ref = variants["a2"].astype(object).to_numpy()
    alt = variants["a1"].astype(object).to_numpy()
    alt = np.where(pd.Series(alt).isin(_MISSING_ALLELES), "?", alt)  # '?' never equals a scoring allele
    ref = np.where(pd.Series(ref).isin(_MISSING_ALLELES), "?", ref)
    site = pd.DataFrame({"chr": variants["chr"].to_numpy(), "pos": variants["pos"].to_numpy()})
    return pd.DataFrame(
        {
            "chr": site["chr"].to_numpy(object),
            "pos": site["pos"].to_numpy(np.int64),
            "ref": ref,
            "alt": alt,
            "target": np.arange(len(variants), dtype=np.int64),
            "target_id": variants["id"].to_numpy(object),
            "ambiguous": np.fromiter((is_strand_ambiguous(r, a) for r, a in zip(ref, alt)), bool, len(ref)),
            "multiallelic": site.duplicated(keep=False).to_numpy(),
        }
    )


def _classify(candidates: pd.DataFrame, options: MatchOptions) -> pd.DataFrame:
    """Add match_type and priority to every (scoring row, target variant) candidate pair."""
    ea = candidates["effect_allele"].to_numpy(object)
    oa = candidates["other_allele"].fillna("").to_numpy(object)
    ref, alt = candidates["ref"].to_numpy(object), candidates["alt"].to_numpy(object)
    ea_flip = np.array([complement(a) for a in ea], dtype=object)
    oa_flip = np.array([complement(a) for a in oa], dtype=object)
    has_oa = oa != ""
    conditions = {
        "refalt": has_oa & (ea == ref) & (oa == alt),
        "altref": has_oa & (ea == alt) & (oa == ref),
        "refalt_flip": has_oa & (ea_flip == ref) & (oa_flip == alt),
        "altref_flip": has_oa & (ea_flip == alt) & (oa_flip == ref),
        "ref_no_oa": ~has_oa & (ea == ref),
        "alt_no_oa": ~has_oa & (ea == alt),
    }
    match_type = np.select(list(conditions.values()), list(conditions.keys()), default="")
    priority = np.select(list(conditions.values()), [MATCH_PRIORITY[k] for k in conditions], default=NO_MATCH)
    exclusion = np.full(len(candidates), "", dtype=object)
    if not options.keep_multiallelic:
        exclusion[candidates["multiallelic"].to_numpy()] = "multiallelic"
    if not options.keep_ambiguous:
        exclusion[candidates["ambiguous"].to_numpy()] = "ambiguous"
    excluded = exclusion != ""
    out = candidates.assign(
        match_type=np.where(excluded, "", match_type),
        priority=np.where(excluded, EXCLUDED, priority),
        exclusion=exclusion,
    )
    return out


def match_score(score: Score, target: pd.DataFrame, options: MatchOptions) -> ScoreMatch:
    """Match every row of `score` against `target` (from prepare_target)."""
    rows = score.variants
    log = rows.copy()
    log.insert(0, "score_id", score.score_id)
    status = np.where(rows["unsupported"].notna(), "unsupported", "unmatched").astype(object)
    reason = np.array([None if pd.isna(r) else r for r in rows["unsupported"]], dtype=object)
    reason[rows["pos"].isna().to_numpy() & (status == "unmatched")] = "no_position"
    reason[pd.isna(reason) & (status == "unmatched")] = "not_in_target"

    scorable = rows[(status == "unmatched") & rows["pos"].notna().to_numpy()]
    scorable = scorable.assign(pos=scorable["pos"].astype(np.int64))
    candidates = scorable[["row_nr", "chr", "pos", "effect_allele", "other_allele"]].merge(
        target, on=["chr", "pos"], how="inner"
    )
    best = (
        _classify(candidates, options)
        .sort_values(["row_nr", "priority", "target"], ascending=[True, False, True], kind="stable")
        .drop_duplicates("row_nr", keep="first")
        .set_index("row_nr")
    )
    log = log.join(best[["target", "target_id", "ref", "alt", "match_type", "priority", "exclusion"]], on="row_nr")
    has_candidate = log["priority"].notna().to_numpy()
    priority = log["priority"].fillna(-1).to_numpy()
    status[has_candidate & (priority >= 2)] = "matched"
    status[has_candidate & (priority == EXCLUDED)] = "excluded"
    reason[has_candidate & (priority == EXCLUDED)] = log["exclusion"].to_numpy(object)[
        has_candidate & (priority == EXCLUDED)
    ]
    reason[has_candidate & (priority == NO_MATCH)] = "allele_mismatch"
    matched = status == "matched"
    reason[matched] = None
    # two rows of one score landing on one target variant: all of them excluded
    targets = log["target"].to_numpy()
    dup_targets = pd.Series(targets[matched]).duplicated(keep=False).to_numpy()
    dup_rows = np.flatnonzero(matched)[dup_targets]
    status[dup_rows], reason[dup_rows] = "excluded", "duplicate_target"
    log["status"], log["reason"] = status, reason
    log["effect_is_a1"] = log["match_type"].isin(_EFFECT_IS_ALT) & (status == "matched")
    log["strand_flipped"] = log["match_type"].fillna("").str.endswith("_flip") & (status == "matched")
    log = log.drop(columns=["priority", "exclusion"]).rename(columns={"ref": "target_ref", "alt": "target_alt"})
    log["target"] = log["target"].astype("Int64")
    return ScoreMatch(score.score_id, log, _summary(score, log, options))


def _summary(score: Score, log: pd.DataFrame, options: MatchOptions) -> dict:
    status, reason = log["status"], log["reason"]
    matched = status == "matched"
    counts: dict[str, int] = {"rows": len(log), "matched": int(matched.sum())}
    counts["strand_flipped"] = int(log["strand_flipped"].sum())
    counts["allele_swapped"] = int((matched & ~log["effect_is_a1"]).sum())  # weight applied to 2 - count(A1)
    for name in EXCLUDE_REASONS:
        counts[f"excluded_{name}"] = int(((status == "excluded") & (reason == name)).sum())
    for name in UNMATCHED_REASONS:
        counts[f"missing_{name}"] = int(((status == "unmatched") & (reason == name)).sum())
    counts["missing"] = int((status == "unmatched").sum())
    for name in UNSUPPORTED_REASONS:
        counts[f"unsupported_{name}"] = int(((status == "unsupported") & (reason == name)).sum())
    counts["unsupported"] = int((status == "unsupported").sum())
    counts["excluded"] = int((status == "excluded").sum())
    assert counts["matched"] + counts["excluded"] + counts["missing"] + counts["unsupported"] == counts["rows"]
    weights = np.abs(log["effect_weight"].to_numpy(float))
    finite = np.isfinite(weights)
    total_weight = float(weights[finite].sum())
    match_rate = counts["matched"] / counts["rows"] if counts["rows"] else 0.0
    return {
        "score_id": score.score_id,
        "source": score.source,
        "genome_build": score.genome_build,
        "harmonised": score.harmonised,
        "counts": counts,
        "match_types": {k: int(v) for k, v in log.loc[matched, "match_type"].value_counts().items()},
        "match_rate": match_rate,
        "weight_share_matched": float(weights[finite & matched.to_numpy()].sum() / total_weight)
        if total_weight
        else 0.0,
        "min_match_rate": options.min_match_rate,
        "passed": match_rate >= options.min_match_rate and counts["matched"] > 0,
    }


def refusal_message(summary: dict) -> str:
    """Why a score was refused, in words (counts only)."""
    c = summary["counts"]
    if c["rows"] and c["missing_no_position"] == c["rows"] - c["unsupported"] and c["missing_no_position"]:
        hint = " (the file has no positions: use its harmonised hmPOS version)"
    else:
        hint = ""
    return (
        f"score {summary['score_id']} ({summary['source']}): {c['matched']} of {c['rows']} variants matched "
        f"({summary['match_rate']:.1%} < minimum {summary['min_match_rate']:.0%}); "
        f"missing {c['missing']}, ambiguous {c['excluded_ambiguous']}, "
        f"other exclusions {c['excluded'] - c['excluded_ambiguous']}, unsupported {c['unsupported']}{hint}"
    )
