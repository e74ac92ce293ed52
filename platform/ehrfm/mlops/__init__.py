"""MLflow model registry: the risk model as a models-from-code pyfunc, its model card, the
champion rule, and the `ehrfm register` command."""
