"""Re-derive the concept subset shipped in `ehrfm_synthetic/resources/` from the public sample data.

Not used at run time: the simulator reads only the files this module wrote. Run it again
(`python -m ehrfm_synthetic.vocab_build ../shared/data`) to rebuild them; the output is
deterministic. Sources: the `concept` and `measurement` tables of OHDSI Eunomia GiBleed
(CDM 5.3) and Synthea27Nj (CDM 5.4), plus a handful of well-known standard concepts that the
simulator needs but neither table holds (listed in `SUPPLEMENT`, each with its public code).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

RESOURCES = Path(__file__).resolve().parent / "resources"
CONCEPT_COLUMNS = [
    "concept_id", "concept_name", "domain_id", "vocabulary_id", "concept_class_id",
    "standard_concept", "concept_code", "valid_start_date", "valid_end_date", "invalid_reason",
]  # fmt: skip
# Domains whose standard concepts become events or person attributes.
EVENT_DOMAINS = ("Condition", "Drug", "Procedure", "Measurement", "Observation", "Visit")
PERSON_DOMAINS = ("Gender", "Ethnicity")

# Real OMOP standard concepts missing from both sample tables (ids and codes as in Athena).
SUPPLEMENT: list[tuple[int, str, str, str, str, str | None, str]] = [
    (0, "No matching concept", "Metadata", "None", "Undefined", None, "No matching concept"),
    (433736, "Obesity", "Condition", "SNOMED", "Clinical Finding", "S", "414916001"),
    (255573, "Chronic obstructive pulmonary disease", "Condition", "SNOMED", "Clinical Finding", "S", "13645005"),
    (1503297, "metformin", "Drug", "RxNorm", "Ingredient", "S", "6809"),
    (32817, "EHR", "Type Concept", "Type Concept", "Type Concept", "S", "OMOP4976890"),
    (8515, "Asian", "Race", "Race", "Race", "S", "2"),
    (8516, "Black or African American", "Race", "Race", "Race", "S", "3"),
    (8527, "White", "Race", "Race", "Race", "S", "5"),
    (45879404, "Never smoker", "Meas Value", "LOINC", "Answer", "S", "LA18978-9"),
    (45883458, "Former smoker", "Meas Value", "LOINC", "Answer", "S", "LA15920-4"),
    (45881517, "Current every day smoker", "Meas Value", "LOINC", "Answer", "S", "LA18976-3"),
]  # fmt: skip


def _read_sources(shared_data: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    gibleed = shared_data / "gibleed_omop53"
    synthea = shared_data / "synthea27nj_omop54" / "parquet" / "Synthea27NjParquet"
    concepts_53 = pd.read_csv(gibleed / "concept.csv", dtype={"concept_code": str})
    concepts_54 = pd.read_parquet(synthea / "concept.parquet")
    measurement = pd.read_parquet(
        synthea / "measurement.parquet", columns=["measurement_concept_id", "value_as_number", "unit_concept_id"]
    )
    concepts = pd.concat([concepts_54, concepts_53], ignore_index=True)  # 5.4 rows win on duplicates
    for column in ("valid_start_date", "valid_end_date"):
        concepts[column] = pd.to_datetime(concepts[column]).dt.strftime("%Y-%m-%d")
    concepts["concept_id"] = concepts["concept_id"].astype("int64")
    return concepts.drop_duplicates("concept_id", keep="first")[CONCEPT_COLUMNS], measurement


def measurement_value_specs(measurement: pd.DataFrame) -> pd.DataFrame:
    """Per measurement concept with numeric values: unit and value distribution (no rows kept)."""
    frame = measurement.dropna(subset=["value_as_number"]).copy()
    frame["value"] = frame["value_as_number"].astype("float64")
    frame["unit_concept_id"] = frame["unit_concept_id"].fillna(0).astype("int64")
    specs = frame.groupby("measurement_concept_id").agg(
        n=("value", "size"),
        mean=("value", "mean"),
        sd=("value", "std"),
        low=("value", "min"),
        high=("value", "max"),
        unit_concept_id=("unit_concept_id", lambda s: int(s.mode().iloc[0])),
    )
    specs["sd"] = specs["sd"].fillna(0.0)
    specs = specs[specs["n"] >= 5].reset_index().rename(columns={"measurement_concept_id": "concept_id"})
    specs["concept_id"] = specs["concept_id"].astype("int64")
    for column in ("mean", "sd", "low", "high"):
        specs[column] = specs[column].round(4)
    return specs[["concept_id", "unit_concept_id", "n", "mean", "sd", "low", "high"]].sort_values("concept_id")


def build_subset(shared_data: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(concepts, measurement value specs) as shipped in the package."""
    concepts, measurement = _read_sources(shared_data)
    specs = measurement_value_specs(measurement)
    standard = concepts["standard_concept"] == "S"
    wanted = standard & concepts["domain_id"].isin(EVENT_DOMAINS + PERSON_DOMAINS)
    specs = specs[specs["concept_id"].isin(concepts.loc[wanted, "concept_id"])]
    units = set(specs["unit_concept_id"]) | {8554, 8840, 9531, 8876, 8541, 8582, 9529}
    wanted |= concepts["concept_id"].isin(units) & (concepts["domain_id"] == "Unit")
    subset = concepts[wanted & ~concepts["concept_id"].isin([row[0] for row in SUPPLEMENT])]
    extra = pd.DataFrame([(*row, "1970-01-01", "2099-12-31", None) for row in SUPPLEMENT], columns=CONCEPT_COLUMNS)
    out = pd.concat([subset, extra], ignore_index=True).sort_values("concept_id", kind="stable")
    out["concept_name"] = out["concept_name"].str.strip()
    missing_units = sorted(set(specs["unit_concept_id"]) - set(out["concept_id"]))
    specs.loc[specs["unit_concept_id"].isin(missing_units), "unit_concept_id"] = 0
    return out.reset_index(drop=True), specs.reset_index(drop=True)


def write_resources(shared_data: Path, out_dir: Path = RESOURCES) -> dict[str, int]:
    """Write concepts.csv.gz and measurement_values.csv.gz (gzip without timestamps: same bytes each run)."""
    import gzip

    concepts, specs = build_subset(shared_data)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, frame in (("concepts.csv.gz", concepts), ("measurement_values.csv.gz", specs)):
        text = frame.to_csv(index=False, lineterminator="\n").encode("utf-8")
        with open(out_dir / name, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="") as gz:
            gz.write(text)
    by_domain = concepts["domain_id"].value_counts()
    return {"concepts": len(concepts), "measurement_specs": len(specs), **{k: int(v) for k, v in by_domain.items()}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("shared_data", type=Path, help="the ../shared/data folder")
    parser.add_argument("--out", type=Path, default=RESOURCES)
    args = parser.parse_args(argv)
    counts = write_resources(args.shared_data, args.out)
    print(" ".join(f"{k}={v}" for k, v in counts.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
