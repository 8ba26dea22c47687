"""The engine: plain PyTorch, no Ray, MLflow or pyarrow. Models and tasks, the optimizer and schedule,
precision, the step with gradient accumulation, parallelism strategies (`parallel/`), the train state
and checkpoint files, and step-time metrics. It runs in a Ray Train worker, or in any torch process
(tests, benchmarks on a GPU machine without Ray)."""
