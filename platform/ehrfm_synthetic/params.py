"""Configuration of the synthetic cohort: run options and the generative model's parameters.

The generative parameters are written next to the truth files (`truth/params.json`), so the
oracle recomputes hazards with exactly the numbers that generated the cohort.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from ehrfm.config import StrictModel

TRAITS = ("t2d", "cad", "stroke", "copd", "hypertension", "bmi")
ANCESTRIES = ("EUR", "AFR", "AMR", "EAS")  # EUR is the PRS reference (discovery) ancestry
N_PCS = 10


class HazardCoefs(StrictModel):
    """log hazard (per year) = base + age*(age-ref_age) + male + genetic*G + bmi*(BMI-27) + ...

    Comorbidity terms use the true status at the time (onset <= t).
    """

    base: float
    ref_age: float = 50.0
    age: float = 0.0
    male: float = 0.0
    genetic: float = 0.0
    bmi: float = 0.0
    current_smoker: float = 0.0
    former_smoker: float = 0.0
    years_smoked: float = 0.0
    hypertension: float = 0.0
    t2d: float = 0.0
    cad: float = 0.0
    stroke: float = 0.0
    copd: float = 0.0


def _default_hazards() -> dict[str, HazardCoefs]:
    return {
        "hypertension": HazardCoefs(base=-3.95, ref_age=50, age=0.04, male=0.15, genetic=0.55, bmi=0.07),
        "prediabetes": HazardCoefs(
            base=-3.3, ref_age=50, age=0.06, male=0.15, genetic=0.3, bmi=0.10, hypertension=0.2
        ),
        "t2d": HazardCoefs(
            base=-2.6, ref_age=50, age=0.02, male=0.15, genetic=1.6, bmi=0.06,
            current_smoker=0.3, hypertension=0.25,
        ),
        "cad": HazardCoefs(
            base=-5.9, ref_age=60, age=0.07, male=0.6, genetic=0.55, bmi=0.03, current_smoker=0.6,
            former_smoker=0.25, hypertension=0.45, t2d=0.55,
        ),
        "stroke": HazardCoefs(
            base=-6.1, ref_age=65, age=0.08, male=0.1, genetic=0.5, current_smoker=0.5,
            hypertension=0.6, t2d=0.4, cad=0.4,
        ),
        "copd": HazardCoefs(
            base=-7.2, ref_age=60, age=0.05, genetic=0.5, current_smoker=1.6, former_smoker=0.9,
            years_smoked=0.03,
        ),
        "death": HazardCoefs(
            base=-5.0, ref_age=70, age=0.085, male=0.3, bmi=0.0, current_smoker=0.5, t2d=0.35,
            cad=0.5, stroke=0.8, copd=0.9,
        ),
    }  # fmt: skip


class GeneticParams(StrictModel):
    """Latent liabilities: multivariate normal per ancestry (traits in `TRAITS` order)."""

    ancestry_proportions: list[float] = [0.60, 0.18, 0.12, 0.10]
    # genetic correlation between traits (symmetric, unit diagonal)
    correlation: list[list[float]] = [
        [1.00, 0.35, 0.25, 0.10, 0.30, 0.45],
        [0.35, 1.00, 0.45, 0.15, 0.35, 0.20],
        [0.25, 0.45, 1.00, 0.10, 0.35, 0.15],
        [0.10, 0.15, 0.10, 1.00, 0.05, 0.05],
        [0.30, 0.35, 0.35, 0.05, 1.00, 0.30],
        [0.45, 0.20, 0.15, 0.05, 0.30, 1.00],
    ]
    # true mean liability per ancestry (rows) and trait (columns), in SD units
    group_means: list[list[float]] = [
        [0.00, 0.00, 0.00, 0.00, 0.00, 0.00],
        [0.15, -0.05, 0.20, -0.05, 0.35, 0.15],
        [0.25, -0.05, 0.05, -0.10, 0.05, 0.15],
        [0.10, -0.15, 0.15, -0.05, 0.00, -0.35],
    ]

    @model_validator(mode="after")
    def _shapes(self) -> GeneticParams:
        k, a = len(TRAITS), len(ANCESTRIES)
        if len(self.ancestry_proportions) != a or abs(sum(self.ancestry_proportions) - 1) > 1e-6:
            raise ValueError(f"ancestry_proportions must be {a} numbers summing to 1")
        if len(self.correlation) != k or any(len(r) != k for r in self.correlation):
            raise ValueError(f"correlation must be {k}x{k}")
        if len(self.group_means) != a or any(len(r) != k for r in self.group_means):
            raise ValueError(f"group_means must be {a}x{k}")
        return self


class PRSParams(StrictModel):
    """How the K polygenic scores relate to the liabilities."""

    # accuracy (correlation with the liability, reference ancestry) of the scores of each trait,
    # best first; scores beyond these are unrelated to any trait
    accuracy_by_trait: dict[str, list[float]] = {
        "t2d": [0.75, 0.55, 0.40],
        "cad": [0.65, 0.45],
        "stroke": [0.50, 0.35],
        "copd": [0.45, 0.30],
        "hypertension": [0.60, 0.40],
        "bmi": [0.70, 0.50],
    }
    # accuracy multiplier per ancestry (portability), in `ANCESTRIES` order
    portability: list[float] = [1.0, 0.42, 0.72, 0.62]
    # share of a score's noise that is common to all scores of the same trait
    shared_noise: float = Field(0.4, ge=0.0, le=1.0)
    # SD (in score SD units) of the ancestry-dependent mean shift, carried by the genetic PCs
    ancestry_shift_sd: float = 0.6


class CodingParams(StrictModel):
    """How true disease states become (noisy, delayed) EHR codes and treatments."""

    # mean years from onset to a clinically prompted diagnosis; T2D is also found by HbA1c
    diagnosis_delay_years: dict[str, float] = {
        "t2d": 1.0, "hypertension": 1.5, "cad": 0.6, "copd": 2.5, "stroke": 0.0,
    }  # fmt: skip
    never_coded: dict[str, float] = {"t2d": 0.05, "hypertension": 0.12, "cad": 0.05, "copd": 0.15, "stroke": 0.02}
    # probability that a later visit repeats a diagnosed chronic code, by visit type (OP, ER, IP)
    recode: list[float] = [0.45, 0.3, 0.8]
    # per-visit probability of a spurious code (rule-out / miscoding)
    false_positive: dict[str, float] = {
        "t2d": 0.0003, "hypertension": 0.004, "cad": 0.001, "copd": 0.001, "stroke": 0.0005, "obesity": 0.002,
    }  # fmt: skip
    hba1c_diagnosis_threshold: float = 6.5
    hba1c_diagnosis_prob: float = 0.85
    prediabetes_followup: float = 0.45  # extra per-visit HbA1c test probability once HbA1c >= 5.7 was seen
    cad_acute_fraction: float = 0.35  # CAD onsets that present as myocardial infarction (inpatient)


class VisitParams(StrictModel):
    """Visits: an inhomogeneous Poisson process whose rate follows age and health state."""

    base_rate_per_year: float = 1.4
    age_slope: float = 0.02  # log rate per year of age above 50
    per_disease: float = 0.35  # relative increase per active disease
    prediabetes: float = 0.8  # relative increase while prediabetic (metabolic follow-up)
    p_inpatient: float = 0.025
    p_emergency: float = 0.06
    per_disease_acute: float = 0.02


class GenerativeParams(StrictModel):
    genetics: GeneticParams = GeneticParams()
    hazards: dict[str, HazardCoefs] = Field(default_factory=_default_hazards)
    prs: PRSParams = PRSParams()
    coding: CodingParams = CodingParams()
    visits: VisitParams = VisitParams()


class SynthConfig(StrictModel):
    """Options of `ehrfm synthesize` (CLI flags override a YAML file, which overrides defaults)."""

    persons: int = Field(20_000, ge=1)
    seed: int = Field(0, ge=0)
    out: str = "data/synthetic"
    num_pgs: int = Field(128, ge=1)
    format: Literal["parquet", "csv"] = "parquet"
    genotyped_fraction: float = Field(0.6, ge=0.0, le=1.0)
    chunk_size: int = Field(10_000, ge=1)
    ray: bool = False
    horizon_days: int = Field(730, ge=1)
    # "scores": finished PRS files in prs/; "genotypes": a PLINK fileset + PGS Catalog scoring files
    # in genotypes/ instead, for `ehrfm score_prs` to compute prs/aggregated_scores.txt.gz from
    prs_source: Literal["scores", "genotypes"] = "scores"
    genotype_variants: int = Field(10_000, ge=100)
    model: GenerativeParams = GenerativeParams()
