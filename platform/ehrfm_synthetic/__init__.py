"""The synthetic biobank simulator: OMOP CDM v5.4 + PRS with a known generative truth.

A separate package: ehrfm never imports it, except the `ehrfm synthesize` command (which runs
`ehrfm_synthetic.cohort`) and the documented truth interface `ehrfm_synthetic.truth_api` that
evaluation reads a cohort's truth through.
"""
