"""Datasets: resolving and checking Parquet sources and the config's transforms (driver), preparing them
as Ray Data tasks into a cache (driver), streaming shards into tensors in the platform's sample order
(workers), and the caches. Never imports MLflow; Ray only where preparation runs as Ray Data tasks."""
