"""Everything MLflow: the rank-0 tracker (workers), the tracking service that applies its ops (an actor
on the driver's node), the writer and spool, the job's MLflow run and lineage (driver), progress lines
and redaction. Never imports `ray.train`."""
