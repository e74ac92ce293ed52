"""Data: OMOP and PRS readers with validation, the synthetic cohort, events and tokenization."""
