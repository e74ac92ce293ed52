"""The concepts the simulator codes events with: the shipped subset, key ids, long-tail pools.

Every concept the generator writes comes from `ehrfm_synthetic/resources/concepts.csv.gz` (derived by
`vocab_build`), so the `concept` table it writes covers every concept it uses.
Disease-model concepts (T2D, its drugs and labs ...) are kept out of the long-tail pools, so
they appear only where the generative model puts them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

# ---- key standard concepts ---------------------------------------------------------------------
MALE, FEMALE = 8507, 8532
RACE_WHITE, RACE_BLACK, RACE_ASIAN = 8527, 8516, 8515
HISPANIC, NOT_HISPANIC = 38003563, 38003564
EHR_TYPE = 32817
INPATIENT, OUTPATIENT, EMERGENCY = 9201, 9202, 9203

T2D, HYPERTENSION, OBESITY, CAD, COPD = 201826, 320128, 433736, 317576, 255573
STROKE, MYOCARDIAL_INFARCTION = 381316, 4329847
T2D_COMPLICATIONS = (4226121, 37016354, 192279, 45757499, 43530656)
EMPHYSEMA = 261325

METFORMIN, INSULIN_LISPRO, INSULIN_HUMULIN = 1503297, 40166274, 19009384
BP_DRUGS = (1308216, 1332418, 19078106, 40185304)  # lisinopril, amlodipine, HCTZ 25 mg, losartan 50 mg
STATINS = (1545958, 1539403)  # atorvastatin, simvastatin
ASPIRIN, CLOPIDOGREL, WARFARIN = 1112807, 1322184, 1310149
COPD_DRUGS = (1154343, 1149380)  # albuterol, fluticasone

ECG, ECHO, PCI, CABG = 4163951, 4230911, 4216130, 4336464
CT_HEAD, NEBULIZER, DIABETES_CARE_PLAN = 4125350, 4206920, 45765969
SPIROMETRY = 4133840  # a Measurement-domain SNOMED procedure

HBA1C, GLUCOSE, BMI = 3004410, 3004501, 3038553
WEIGHT, HEIGHT, SYSTOLIC, DIASTOLIC = 3025315, 3036277, 3004249, 3012888
HEART_RATE, RESP_RATE = 3027018, 3024171
CHOLESTEROL, HDL, LDL, TRIGLYCERIDES = 3027114, 3007070, 3009966, 3022192
CREATININE = 3051825
SMOKING_STATUS = 43054909
NEVER_SMOKER, FORMER_SMOKER, CURRENT_SMOKER = 45879404, 45883458, 45881517

UNIT_PERCENT, UNIT_MG_DL, UNIT_KG_M2 = 8554, 8840, 9531
UNIT_KG, UNIT_CM, UNIT_MMHG, UNIT_PER_MIN = 9529, 8582, 8876, 8541

# Names that belong to the disease model (or to the death table) and so stay out of the tail.
_MODELLED = re.compile(
    r"diabet|insulin|metformin|glucose|a1c|hypertens|blood pressure|coronary|myocard|infarct|"
    r"cerebrovasc|stroke|obstructive|emphysem|bronchitis|obes|body mass|smok|tobacco|death|"
    r"suicide|cardiac arrest|statin|lisinopril|amlodipine|hydrochlorothiazide|losartan|aspirin|"
    r"clopidogrel|warfarin|albuterol|fluticasone|cholesterol|triglycer|creatinine \[|body weight|"
    r"body height|heart rate|respiratory rate|electrocardio|echocardio|percutaneous coronary|bypass",
    re.IGNORECASE,
)
_FEMALE_ONLY = re.compile(
    r"pregnan|antenatal|prenatal|postnatal|obstetric|labor|delivery|fetal|fetus|cervi|uter|ovar|"
    r"mammogra|breast|menopaus|contracept|eclampsia|miscarriage|gestation|vagin|endometri",
    re.IGNORECASE,
)
_MALE_ONLY = re.compile(r"prostat|testic|scrot|erectile", re.IGNORECASE)

_CONCEPT_TYPES = {
    "concept_id": pa.int32(),
    "concept_name": pa.string(),
    "domain_id": pa.string(),
    "vocabulary_id": pa.string(),
    "concept_class_id": pa.string(),
    "standard_concept": pa.string(),
    "concept_code": pa.string(),
    "valid_start_date": pa.date32(),
    "valid_end_date": pa.date32(),
    "invalid_reason": pa.string(),
}


def _read_resource(name: str, column_types: dict[str, pa.DataType] | None = None) -> pa.Table:
    path = resources.files("ehrfm_synthetic").joinpath("resources", name)
    with resources.as_file(path) as local:
        convert = pacsv.ConvertOptions(column_types=column_types or {}, null_values=[""], strings_can_be_null=True)
        return pacsv.read_csv(local, convert_options=convert)


@lru_cache(maxsize=1)
def concept_table() -> pa.Table:
    """The shipped concept rows, typed as the CDM `concept` table."""
    return _read_resource("concepts.csv.gz", _CONCEPT_TYPES).select(list(_CONCEPT_TYPES))


@dataclass(frozen=True)
class MeasurementSpecs:
    """Value distributions (from Synthea27Nj) for measurement concepts that carry numbers."""

    concept_id: np.ndarray
    unit_concept_id: np.ndarray
    mean: np.ndarray
    sd: np.ndarray
    low: np.ndarray
    high: np.ndarray


@lru_cache(maxsize=1)
def measurement_specs() -> MeasurementSpecs:
    table = _read_resource("measurement_values.csv.gz")
    col = {name: table.column(name).to_numpy() for name in table.column_names}
    return MeasurementSpecs(
        concept_id=col["concept_id"].astype(np.int64),
        unit_concept_id=col["unit_concept_id"].astype(np.int32),
        mean=col["mean"].astype(np.float64),
        sd=col["sd"].astype(np.float64),
        low=col["low"].astype(np.float64),
        high=col["high"].astype(np.float64),
    )


@dataclass(frozen=True)
class TailPool:
    """Long-tail concepts of one domain with Zipf-like popularity and per-sex eligibility."""

    concept_id: np.ndarray  # int32
    probability: np.ndarray  # float64, sums to 1
    female_only: np.ndarray  # bool
    male_only: np.ndarray  # bool

    def draw(self, rng: np.random.Generator, is_male: np.ndarray) -> np.ndarray:
        """One concept per entry of `is_male`, never a concept of the other sex."""
        picks = rng.choice(len(self.concept_id), size=len(is_male), p=self.probability)
        neutral = np.flatnonzero(~(self.female_only | self.male_only))
        wrong = np.where(is_male, self.female_only[picks], self.male_only[picks])
        if wrong.any():
            p = self.probability[neutral] / self.probability[neutral].sum()
            picks[wrong] = neutral[rng.choice(len(neutral), size=int(wrong.sum()), p=p)]
        return self.concept_id[picks]


def tail_pools(vocab_seed: int) -> dict[str, TailPool]:
    """Per event domain, the pool of long-tail concepts; popularity order is fixed by `vocab_seed`.

    The same seed gives the same pools in every chunk, so code frequencies do not depend on
    how the cohort is split.
    """
    table = concept_table()
    ids = table.column("concept_id").to_numpy()
    names = table.column("concept_name").to_pylist()
    domains = np.asarray(table.column("domain_id").to_pylist(), dtype=object)
    standard = np.asarray([s == "S" for s in table.column("standard_concept").to_pylist()])
    modelled = np.asarray([bool(_MODELLED.search(n)) for n in names])
    female = np.asarray([bool(_FEMALE_ONLY.search(n)) for n in names])
    male = np.asarray([bool(_MALE_ONLY.search(n)) for n in names])
    rng = np.random.default_rng(np.random.SeedSequence([vocab_seed, 7919]))
    pools: dict[str, TailPool] = {}
    for domain in ("Condition", "Drug", "Procedure", "Measurement", "Observation"):
        keep = np.flatnonzero((domains == domain) & standard & ~modelled)
        order = rng.permutation(len(keep))
        weight = 1.0 / (np.arange(len(keep)) + 8.0) ** 1.05
        probability = np.empty(len(keep))
        probability[order] = weight / weight.sum()
        pools[domain] = TailPool(
            concept_id=ids[keep].astype(np.int32),
            probability=probability,
            female_only=female[keep],
            male_only=male[keep],
        )
    return pools
