"""The driver of a training job: preflight checks and data preparation, connecting to Ray and building
the trainer, watching the cluster's nodes, the console, and the run session that closes its MLflow run
on every path."""
