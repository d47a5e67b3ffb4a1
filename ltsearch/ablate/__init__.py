"""`ltsearch ablate`: ablation matrices (rows × columns × seeds) on the Ray layer that runs sweeps.

settings.py parses and validates the file, cells.py is one run as a Tune trial with its own directory,
runner.py launches what is missing, matrix.py / render.py turn runs into the published matrix,
outputs.py writes it, tracking.py records it in MLflow.
"""
