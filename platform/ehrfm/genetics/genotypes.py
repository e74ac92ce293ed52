"""PLINK 1 genotypes (.bed/.bim/.fam) read through bed-reader, one fileset or one per chromosome.

`GenotypeSet` holds only metadata (samples, variants); genotype blocks are read on demand as
dense int8 (samples x variants, count of allele 1, -127 = missing), so a worker reads just the
variants and samples of its block.
"""

from __future__ import annotations

import glob
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd
from bed_reader import open_bed

from ehrfm.genetics.variant_alleles import normalise_chromosome

MISSING = -127  # bed-reader's int8 missing-genotype code


class GenotypeError(ValueError):
    """Unusable genotype input: names the file and what is wrong, never sample ids."""


@dataclass(frozen=True)
class Fileset:
    """One .bed with its .bim/.fam and the sizes bed-reader needs to skip re-counting lines."""

    bed: str
    n_samples: int
    n_variants: int


@dataclass
class GenotypeSet:
    """Samples shared by every fileset, and the variants of all filesets in order.

    `variants` columns: chr, pos, id, a1 (counted allele), a2, fileset (index into `filesets`),
    local (index inside that .bed).
    """

    filesets: list[Fileset]
    sample_ids: np.ndarray  # IID, str [n]
    variants: pd.DataFrame

    @property
    def n_samples(self) -> int:
        return len(self.sample_ids)


def find_filesets(spec: str | Path) -> list[Path]:
    """The .bed files named by a prefix, a .bed path, a directory or a glob (of prefixes or .bed files)."""
    text = str(spec)
    if any(ch in text for ch in "*?["):
        pattern = text if text.endswith(".bed") else text + ".bed"
        beds = sorted(Path(p) for p in glob.glob(pattern))
    elif Path(text).is_dir():
        beds = sorted(Path(text).glob("*.bed"))
    else:
        bed = Path(text if text.endswith(".bed") else text + ".bed")
        beds = [bed] if bed.is_file() else []
    if not beds:
        raise GenotypeError(f"no PLINK .bed file found for {text!r}")
    for bed in beds:
        for suffix in (".bim", ".fam"):
            if not bed.with_suffix(suffix).is_file():
                raise GenotypeError(f"{bed.name}: companion file {bed.with_suffix(suffix).name} is missing")
    return beds


def _read_fileset(bed: Path) -> tuple[np.ndarray, pd.DataFrame]:
    try:
        with open_bed(bed, num_threads=1) as reader:
            iid = np.asarray(reader.iid, dtype=str)
            variants = pd.DataFrame(
                {
                    "chr": [normalise_chromosome(c) for c in reader.chromosome],
                    "pos": np.asarray(reader.bp_position, dtype=np.int64),
                    "id": np.asarray(reader.sid, dtype=str),
                    "a1": np.char.upper(np.asarray(reader.allele_1, dtype=str)),
                    "a2": np.char.upper(np.asarray(reader.allele_2, dtype=str)),
                }
            )
    except (ValueError, OSError) as error:
        raise GenotypeError(f"{bed.name}: cannot read the fileset ({error})") from None
    return iid, variants


def open_genotypes(spec: str | Path) -> GenotypeSet:
    """Metadata of every fileset named by `spec`; all must hold the same samples in the same order."""
    beds = find_filesets(spec)
    filesets: list[Fileset] = []
    frames: list[pd.DataFrame] = []
    samples: np.ndarray | None = None
    for index, bed in enumerate(beds):
        iid, variants = _read_fileset(bed)
        if samples is None:
            samples = iid
            duplicated = len(iid) - len(np.unique(iid))
            if duplicated:
                raise GenotypeError(
                    f"{bed.with_suffix('.fam').name}: {duplicated} duplicated IID(s) among {len(iid)} samples"
                )
        elif len(iid) != len(samples) or not np.array_equal(iid, samples):
            raise GenotypeError(
                f"{bed.with_suffix('.fam').name}: samples differ from "
                f"{beds[0].with_suffix('.fam').name} ({len(iid)} vs {len(samples)} samples "
                "or a different order)"
            )
        expected_bytes = 3 + len(variants) * ((len(iid) + 3) // 4)
        if bed.stat().st_size != expected_bytes:
            raise GenotypeError(
                f"{bed.name}: {bed.stat().st_size} bytes, expected {expected_bytes} for "
                f"{len(iid)} samples x {len(variants)} variants"
            )
        variants["fileset"] = index
        variants["local"] = np.arange(len(variants), dtype=np.int64)
        filesets.append(Fileset(str(bed), len(iid), len(variants)))
        frames.append(variants)
    assert samples is not None
    all_variants = pd.concat(frames, ignore_index=True)
    return GenotypeSet(filesets, samples, all_variants)


@lru_cache(maxsize=8)
def _reader(fileset: Fileset) -> open_bed:
    """One open reader per fileset per process (workers read many blocks of the same file)."""
    return open_bed(fileset.bed, iid_count=fileset.n_samples, sid_count=fileset.n_variants, num_threads=1)


def read_block(fileset: Fileset, variant_index: np.ndarray, samples: slice) -> np.ndarray:
    """Allele-1 counts, int8 [samples, variants], C order; MISSING where the genotype is missing."""
    reader = _reader(fileset)
    return reader.read(
        index=np.s_[samples, np.asarray(variant_index, dtype=np.intp)], dtype="int8", order="C", num_threads=1
    )
