"""Allele and chromosome spelling shared by the scoring-file parser, the genotype reader and the matcher."""

from __future__ import annotations

import re

_DNA = re.compile(r"^[ACGT]+$")
_COMPLEMENT = str.maketrans("ACGT", "TGCA")
# PLINK 1 numeric codes for the non-autosomes
_PLINK_CODES = {"23": "X", "24": "Y", "25": "XY", "26": "MT", "M": "MT"}


def is_dna(allele: str) -> bool:
    """True for a plain nucleotide sequence (what an additive SNP/indel weight can be applied to)."""
    return bool(_DNA.match(allele))


def complement(allele: str) -> str:
    """Base-by-base complement (the other strand); pgsc_calc complements without reversing."""
    return allele.translate(_COMPLEMENT)


def is_strand_ambiguous(ref: str, alt: str) -> bool:
    """A/T and C/G SNPs: the two strands cannot be told apart from the alleles alone."""
    return len(ref) == 1 and len(alt) == 1 and complement(ref) == alt


def normalise_chromosome(name: str) -> str:
    """'chr1' / '1' -> '1'; 'chrX' / '23' -> 'X'; so scoring files and .bim files agree."""
    text = str(name).strip().upper()
    if text.startswith("CHR"):
        text = text[3:]
    return _PLINK_CODES.get(text, text)
