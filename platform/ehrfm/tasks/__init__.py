"""Prediction tasks: definitions (YAML in jobs/configs/tasks/), concept sets and the MEDS labeler."""
