"""Hyperparameter sweeps on Ray Tune: the sweep's driver and search (driver), the parent MLflow run (a
Tune callback on the driver) and each trial (a Tune trial actor running a whole training job)."""
