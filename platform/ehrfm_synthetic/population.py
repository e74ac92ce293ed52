"""Who is in the cohort: ids, demographics, ancestry and PCs, latent liabilities, lifestyle.

Everything here is drawn once per person; time-varying state (BMI, smoking) is a deterministic
function of these draws and age, so the oracle can recompute it from the truth files.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ehrfm_synthetic import concepts as cc
from ehrfm_synthetic.params import ANCESTRIES, N_PCS, TRAITS, GeneticParams
from ehrfm_synthetic.time import DAYS_PER_YEAR, SIM_END, day_number

BIRTH_FIRST = day_number("1930-01-01")
BIRTH_LAST = day_number("2005-12-31")
OBS_FIRST = day_number("2000-01-01")
ADULT_AGE = 18.0
PC_SCALE = 0.08  # PCs are written on the scale of projected eigenvectors

# Continental components (EUR, AFR, EAS, NAT) in the first PCs; later PCs hold finer structure.
_COMPONENT_CENTROIDS = np.array(
    [
        [-0.35, -0.25, 0.10, 0.05],
        [0.95, -0.10, 0.00, -0.05],
        [-0.30, 0.85, 0.25, 0.00],
        [-0.20, 0.35, -0.75, 0.10],
    ]
)
# Dirichlet concentration of each ancestry group over the components (admixture).
_ADMIXTURE = np.array(
    [
        [60.0, 0.5, 0.5, 0.5],
        [2.0, 8.0, 0.1, 0.2],
        [5.0, 1.0, 0.3, 4.0],
        [0.5, 0.1, 40.0, 0.5],
    ]
)
_MASK40 = np.uint64((1 << 40) - 1)
_MASK32 = np.uint64((1 << 32) - 1)


@dataclass
class Population:
    """One chunk of persons; arrays are aligned by position (the chunk-local person index)."""

    global_index: np.ndarray
    person_id: np.ndarray  # int64, large and not dense
    genotyped: np.ndarray  # bool
    sample_id: np.ndarray  # object (str), "" where not genotyped
    birth: np.ndarray  # float days (whole days)
    male: np.ndarray  # bool
    ancestry: np.ndarray  # int8 index into ANCESTRIES
    pcs: np.ndarray  # float64 [n, N_PCS]
    liability: np.ndarray  # float64 [n, len(TRAITS)]
    group_mean: np.ndarray  # float64 [n, len(TRAITS)] (the ancestry-group mean of `liability`)
    bmi18: np.ndarray
    bmi_slope: np.ndarray
    height_cm: np.ndarray
    smoke_start_age: np.ndarray  # inf for never smokers
    smoke_quit_age: np.ndarray  # inf for never quitting
    a1c_offset: np.ndarray
    sbp_offset: np.ndarray
    ldl_offset: np.ndarray
    visit_frailty: np.ndarray
    obs_start: np.ndarray  # whole days
    dropout: np.ndarray  # whole days; the record ends here unless death or cut-off come first
    race_concept_id: np.ndarray
    ethnicity_concept_id: np.ndarray

    def __len__(self) -> int:
        return len(self.person_id)


def person_ids(global_index: np.ndarray, seed: int) -> np.ndarray:
    """Bijective scramble of the global index into [2^40, 2^41): unique, large, not row numbers."""
    mult = np.uint64(0x9E3779B97F4A7C15) | np.uint64(1)
    offset = np.uint64((seed * 0x632BE59BD9B4E019 + 0x1D8E4E27C47D124F) % (1 << 40))
    with np.errstate(over="ignore"):
        mixed = (global_index.astype(np.uint64) * mult + offset) & _MASK40
    return (mixed + np.uint64(1 << 40)).astype(np.int64)


def sample_ids(global_index: np.ndarray, seed: int) -> np.ndarray:
    """Genotyping-lab style ids (strings) that share nothing with person ids."""
    mult = np.uint64(0x2545F491) | np.uint64(1)
    offset = np.uint64((seed * 0x9E3779B9 + 0x7F4A7C15) % (1 << 32))
    with np.errstate(over="ignore"):
        mixed = (global_index.astype(np.uint64) * mult + offset) & _MASK32
    return np.char.add("SMP", np.char.zfill(mixed.astype(str), 10)).astype(object)


def bmi_at(age: np.ndarray, bmi18: np.ndarray, slope: np.ndarray) -> np.ndarray:
    """Adult BMI trajectory: gain until 58, flat, slow loss after 65."""
    gain = slope * np.clip(age - ADULT_AGE, 0.0, 40.0)
    loss = 0.08 * np.clip(age - 65.0, 0.0, None)
    child = 0.35 * np.clip(ADULT_AGE - age, 0.0, None)
    return np.clip(bmi18 + gain - loss - child, 14.0, 70.0)


def smoking_state(age: np.ndarray, start: np.ndarray, quit: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(current, former, years smoked) at the given ages."""
    current = (age >= start) & (age < quit)
    former = age >= quit
    years = np.clip(np.minimum(age, quit) - start, 0.0, None)
    years = np.where(np.isfinite(years), years, 0.0)
    return current, former, years


def draw_population(
    rng: np.random.Generator,
    global_index: np.ndarray,
    seed: int,
    genotyped_fraction: float,
    genetics: GeneticParams,
) -> Population:
    n = len(global_index)
    ancestry = rng.choice(len(ANCESTRIES), size=n, p=genetics.ancestry_proportions).astype(np.int8)
    male = rng.random(n) < 0.46
    birth = np.floor(BIRTH_FIRST + rng.beta(1.5, 2.5, n) * (BIRTH_LAST - BIRTH_FIRST))

    admix = np.empty((n, len(_COMPONENT_CENTROIDS)))
    for a in range(len(ANCESTRIES)):
        rows = np.flatnonzero(ancestry == a)
        admix[rows] = rng.dirichlet(_ADMIXTURE[a], size=len(rows))
    fine = rng.normal(0.0, 0.05, size=(len(_COMPONENT_CENTROIDS), N_PCS - 4))
    centroids = np.hstack([_COMPONENT_CENTROIDS, fine])
    pcs = (admix @ centroids + rng.normal(0.0, 0.04, size=(n, N_PCS))) * PC_SCALE

    group_means = np.asarray(genetics.group_means)[ancestry]
    chol = np.linalg.cholesky(np.asarray(genetics.correlation))
    liability = group_means + rng.standard_normal((n, len(TRAITS))) @ chol.T

    g_bmi = liability[:, TRAITS.index("bmi")]
    bmi18 = np.clip(21.6 + 1.7 * g_bmi + rng.normal(0.0, 2.6, n) + 0.3 * ~male, 16.0, 48.0)
    bmi_slope = np.clip(0.17 + 0.06 * g_bmi + rng.normal(0.0, 0.09, n), -0.1, 0.6)
    east_asian = ancestry == ANCESTRIES.index("EAS")
    height_cm = np.where(male, rng.normal(176.0, 7.0, n), rng.normal(162.5, 6.5, n)) - 5.0 * east_asian

    born_before_1960 = birth < day_number("1960-01-01")
    ever = rng.random(n) < 0.28 + 0.10 * male + 0.10 * born_before_1960
    start = 14.0 + rng.gamma(2.0, 2.5, n)
    quits = rng.random(n) < 0.65
    quit_age = start + 5.0 + rng.exponential(15.0, n)
    smoke_start_age = np.where(ever, start, np.inf)
    smoke_quit_age = np.where(ever & quits, quit_age, np.inf)

    adult = birth + ADULT_AGE * DAYS_PER_YEAR
    candidate = OBS_FIRST + rng.beta(1.0, 1.8, n) * 20.0 * DAYS_PER_YEAR
    obs_start = np.floor(np.minimum(np.maximum(candidate, adult), SIM_END - 200.0))
    dropout = np.floor(obs_start + rng.exponential(30.0 * DAYS_PER_YEAR, n))  # leaving the health system

    race, ethnicity = _race_ethnicity(rng, ancestry)
    genotyped = rng.random(n) < genotyped_fraction
    samples = np.where(genotyped, sample_ids(global_index, seed), "").astype(object)
    return Population(
        global_index=global_index,
        person_id=person_ids(global_index, seed),
        genotyped=genotyped,
        sample_id=samples,
        birth=birth,
        male=male,
        ancestry=ancestry,
        pcs=pcs,
        liability=liability,
        group_mean=group_means,
        bmi18=bmi18,
        bmi_slope=bmi_slope,
        height_cm=height_cm,
        smoke_start_age=smoke_start_age,
        smoke_quit_age=smoke_quit_age,
        a1c_offset=rng.normal(0.0, 0.18, n),
        sbp_offset=rng.normal(0.0, 8.0, n),
        ldl_offset=rng.normal(0.0, 25.0, n),
        visit_frailty=rng.gamma(1.6, 1.0 / 1.6, n),  # person-level visit propensity, mean 1
        obs_start=obs_start,
        dropout=dropout,
        race_concept_id=race,
        ethnicity_concept_id=ethnicity,
    )


def _race_ethnicity(rng: np.random.Generator, ancestry: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Self-reported race/ethnicity: mostly, not always, in line with genetic ancestry."""
    n = len(ancestry)
    usual = np.array([cc.RACE_WHITE, cc.RACE_BLACK, cc.RACE_WHITE, cc.RACE_ASIAN], dtype=np.int32)[ancestry]
    p_usual = np.array([0.96, 0.93, 0.65, 0.95])[ancestry]
    u = rng.random(n)
    other = rng.choice(np.array([cc.RACE_WHITE, cc.RACE_BLACK, cc.RACE_ASIAN, 0], dtype=np.int32), size=n)
    race = np.where(u < p_usual, usual, other).astype(np.int32)
    p_hispanic = np.where(ancestry == ANCESTRIES.index("AMR"), 0.9, 0.03)
    ethnicity = np.where(rng.random(n) < p_hispanic, cc.HISPANIC, cc.NOT_HISPANIC).astype(np.int32)
    return race, ethnicity
