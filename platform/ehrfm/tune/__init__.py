"""Ray Tune sweeps of the fine-tuning stage: each trial drives a Ray Train `TorchTrainer` run.

`config` (the sweep YAML, its base fine-tune, the resume check), `search_space` (YAML dimensions ->
Tune domains -> trial configs), `resources` (how many trials fit the cluster at once), `trial`
(what each Tune trial runs, and its graceful stop), `runs` (the MLflow parent run and a child run
per trial), `tuner` (search algorithm, ASHA, new or restored Tuner), `winner` (the best trial's
model, test scoring, registry), `sweep` (`run_sweep` and `ehrfm tune`).
"""
