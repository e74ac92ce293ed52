"""OMOP CDM input: the v5.4 column spec (5.3 renames), file readers, row validation with a
quarantine and an exact row account, OMOP rows -> MEDS events, and the `ehrfm validate` command."""
