"""PRS computed from genotypes: PGS Catalog scoring files, PLINK 1 genotypes, variant matching,
the scoring kernel and its Ray Data job (`ehrfm score_prs`)."""
