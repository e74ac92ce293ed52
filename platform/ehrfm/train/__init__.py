"""Pretraining on Ray Train + DeepSpeed: config, data windows, worker loop, checkpoints, MLflow.

Imports stay lazy here so `import ehrfm.train` does not pull in Ray or DeepSpeed.
"""
