"""Quantized export (driver, or any process; no Ray): a trained model's Linear layers quantized with torchao
(int8 weight-only, int8 dynamic, int4 weight-only), saved to load with `weights_only`, measured (size,
memory, latency, quality), and recorded in MLflow as a child run of the source run. torchao is an
optional dependency (`pip install 'openclaw[quantize]'`), imported only here, when an export runs."""
