"""Evaluation: metrics with bootstrap CIs, calibration, PRS-decile and subgroup tables, baselines, report."""
