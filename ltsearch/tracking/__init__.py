"""Experiment tracking in MLflow: the only package that imports mlflow.

`settings` (the `tracking:` section and the store's tag contract) imports nothing heavy, so commands
that only validate a file never load MLflow.
"""
