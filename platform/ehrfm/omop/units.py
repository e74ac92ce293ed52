"""Measurement units: recognise the unit of a lab value, convert it to one canonical unit, drop the implausible.

Only analytes the shipped tasks threshold are handled (HbA1c, glucose); every other measurement keeps
its value as recorded. For a handled analyte the events stage writes the value in the canonical unit
(HbA1c in % (NGSP/DCCT), glucose in mg/dL), so one code has one value scale, and a task threshold
given in another unit (`unit: mmol/mol`) is converted to the canonical unit once, here.

Unit of a row: `unit_concept_id` when it is a known UCUM concept, else `unit_source_value` (case,
spaces and UCUM annotations ignored), else "missing" (taken as the canonical unit: the value must
then be plausible in it). A value outside the analyte's physiological range for its unit is
implausible: the value is dropped (the event stays, without a value) and counted.

Conversions (public clinical chemistry facts):
- HbA1c: NGSP % = 0.09148 * IFCC mmol/mol + 2.152 (IFCC-NGSP master equation; 48 mmol/mol = 6.5 %).
- glucose: mg/dL = mmol/L * 18.016 (molar mass of glucose 180.16 g/mol).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

# UCUM unit concepts (OMOP vocabulary "UCUM") -> the unit label used here.
UNIT_CONCEPTS: dict[int, str] = {
    8554: "%",  # percent
    9225: "%",  # percent hemoglobin A1c
    8737: "%",  # percent hemoglobin
    8840: "mg/dL",  # milligram per deciliter
    8753: "mmol/L",  # millimole per liter
    9579: "mmol/mol",  # millimole per mole
}
# unit_source_value spellings (lower-case, spaces and {annotations} removed) -> unit label.
UNIT_SPELLINGS: dict[str, str] = {
    "%": "%",
    "percent": "%",
    "%hba1c": "%",
    "%ofhgb": "%",
    "%totalhb": "%",
    "mg/dl": "mg/dL",
    "mgdl": "mg/dL",
    "mmol/l": "mmol/L",
    "mmoll": "mmol/L",
    "mmol/mol": "mmol/mol",
    "mmolmol": "mmol/mol",
    "mmol/molhb": "mmol/mol",
}
MISSING = "missing"
OTHER = "other"


@dataclass(frozen=True)
class Analyte:
    """One lab analyte: its measurement concepts, canonical unit, conversions into it, plausible range."""

    name: str
    concepts: frozenset[int]
    canonical: str
    to_canonical: dict[str, tuple[float, float]]  # unit -> (scale, offset): canonical = value * scale + offset
    plausible: tuple[float, float]  # in the canonical unit, inclusive
    units: tuple[str, ...] = field(default=())

    def factor(self, unit: str) -> tuple[float, float] | None:
        if unit in (self.canonical, MISSING):
            return 1.0, 0.0
        return self.to_canonical.get(unit)


ANALYTES: tuple[Analyte, ...] = (
    Analyte(
        "hba1c",
        frozenset({3004410}),  # Hemoglobin A1c/Hemoglobin.total in Blood (LOINC 4548-4)
        "%",
        {"mmol/mol": (0.09148, 2.152)},
        (2.0, 25.0),
    ),
    Analyte(
        "glucose",
        frozenset({3004501, 3000483}),  # Glucose [Mass/volume] in Serum or Plasma (2345-7), in Blood (2339-0)
        "mg/dL",
        {"mmol/L": (18.016, 0.0)},
        (10.0, 2000.0),
    ),
)
ANALYTE_OF_CONCEPT: dict[int, Analyte] = {c: a for a in ANALYTES for c in a.concepts}


def normalise_unit(text: str | None) -> str:
    """A unit label from free text (`mmol/mol`, `%`, `mg/dL`, ...); MISSING for empty, OTHER if unknown."""
    if text is None or not str(text).strip():
        return MISSING
    key = "".join(str(text).lower().split())
    key = key.replace("{", "").replace("}", "").replace("[", "").replace("]", "")
    return UNIT_SPELLINGS.get(key, OTHER)


def convert_threshold(concept_id: int, value: float, unit: str) -> float:
    """A task threshold in `unit` as a value in the canonical unit of the analyte of `concept_id`.

    Unknown analytes and empty units return the value unchanged; a unit the analyte cannot convert
    is an error (naming the concept and the units it accepts).
    """
    analyte = ANALYTE_OF_CONCEPT.get(int(concept_id))
    label = normalise_unit(unit) if unit else MISSING
    if analyte is None or label == MISSING:
        return float(value)
    factor = analyte.factor(label)
    if factor is None:
        accepted = ", ".join([analyte.canonical, *analyte.to_canonical])
        raise ValueError(f"measurement {concept_id} ({analyte.name}): unit {unit!r} not convertible (use {accepted})")
    scale, offset = factor
    return float(value) * scale + offset


def _row_units(unit_concept: pa.Array | None, unit_source: pa.Array | None, n: int) -> np.ndarray:
    labels = np.full(n, MISSING, dtype=object)
    if unit_source is not None:
        texts = unit_source.to_pylist()
        labels = np.array([normalise_unit(t) for t in texts], dtype=object) if n else labels
    if unit_concept is not None:
        ids = pc.fill_null(pc.cast(unit_concept, pa.int64()), 0).to_numpy(zero_copy_only=False)
        from_concept = np.array([UNIT_CONCEPTS.get(int(i)) for i in ids], dtype=object)
        known = from_concept != None  # noqa: E711 (element-wise on an object array)
        labels = np.where(known, from_concept, labels)
        unknown_concept = (ids != 0) & ~known & (labels == MISSING)
        labels = np.where(unknown_concept, OTHER, labels)
    return labels


def canonical_values(
    concept: pa.Array, values: pa.Array, unit_concept: pa.Array | None, unit_source: pa.Array | None
) -> tuple[pa.Array, dict[str, int]]:
    """(values in canonical units, counts) for one batch of measurement rows.

    Counts (flat, summable): `unit:<analyte>:<unit>` rows per analyte and recognised unit,
    `values_converted`, `values_implausible` (dropped), `values_unconvertible` (unit known but not
    convertible for the analyte: dropped).
    """
    n = len(values)
    counts: dict[str, int] = {}
    ids = pc.fill_null(pc.cast(concept, pa.int64()), 0).to_numpy(zero_copy_only=False)
    handled = np.isin(ids, list(ANALYTE_OF_CONCEPT))
    if n == 0 or not handled.any():
        return values, counts
    out = pc.cast(values, pa.float64()).to_numpy(zero_copy_only=False).astype(np.float64, copy=True)
    present = pc.is_valid(values).to_numpy(zero_copy_only=False)
    labels = _row_units(unit_concept, unit_source, n)
    dropped = np.zeros(n, dtype=bool)
    for analyte in ANALYTES:
        rows = np.isin(ids, list(analyte.concepts))
        if not rows.any():
            continue
        for label in np.unique(labels[rows]):
            these = rows & (labels == label)
            counts[f"unit:{analyte.name}:{label}"] = int(these.sum())
            factor = analyte.factor(str(label))
            if factor is None:
                bad = these & present
                counts["values_unconvertible"] = counts.get("values_unconvertible", 0) + int(bad.sum())
                dropped |= bad
                continue
            scale, offset = factor
            if (scale, offset) != (1.0, 0.0):
                counts["values_converted"] = counts.get("values_converted", 0) + int((these & present).sum())
                out[these] = out[these] * scale + offset
        low, high = analyte.plausible
        with np.errstate(invalid="ignore"):
            implausible = rows & present & ~dropped & ~((out >= low) & (out <= high))
        counts["values_implausible"] = counts.get("values_implausible", 0) + int(implausible.sum())
        dropped |= implausible
    valid = present & ~dropped
    result = pa.array(np.where(valid, out, 0.0), pa.float64(), mask=~valid)
    return result, counts
