"""Precomputed PRS files: readers (pgsc_calc, plink2 .sscore, wide tables) with validation,
ancestry adjustment and z-scoring, and the per-person PRS table preprocessing writes."""
