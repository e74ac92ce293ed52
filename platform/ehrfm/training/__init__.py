"""The one training engine (DeepSpeed ZeRO on Ray Train) shared by pretraining and fine-tuning:
optimizer groups, LR schedule, checkpoints, MLflow run logging; plus pretraining itself
(config, windows, the worker loop, the job).

Imports stay lazy here so `import ehrfm.training` does not pull in Ray or DeepSpeed.
"""
