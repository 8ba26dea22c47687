"""What an export prints and what it records in MLflow (driver, or any process): one table, full against
quantized, with the brief's 4-bit claim beside the measured saving; a child run of the source run with
the export as an artifact, a tag on the source run, and (with `--register`) a model version."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

from openclaw.errors import ConfigError
from openclaw.tracking.redact import public_uri
from openclaw.tracking.run import EXPORT_DIR, EXPORT_KIND

ROWS = (("file on disk", "file_bytes", "MB"), ("weights in memory", "weight_bytes", "MB"),
        ("quantized layers' weights", "layer_bytes", "MB"), ("peak memory of a forward (RSS)", "peak_rss_bytes", "MB"),
        ("  growth from loading and running it", "model_rss_bytes", "MB"),
        ("latency, batch 1", "latency_ms_b1", "ms"), ("latency, batch 32", "latency_ms_b32", "ms"),
        ("val loss", "val_loss", ""), ("val accuracy", "val_accuracy", ""), ("val perplexity", "val_perplexity", ""))


def print_table(report: dict[str, Any], folder: Path) -> None:
    m = report["measured"]
    print(f"openclaw: {report['described']} export of {report['source']} -> {folder}")
    print(f"  {'':42} {'full':>12} {'quantized':>12} {'ratio':>7}")
    for label, key, unit in ROWS:
        if f"{key}_full" not in m:
            continue
        full, quant = m[f"{key}_full"], m[f"{key}_quantized"]
        scale = 1e6 if unit == "MB" else 1.0
        ratio = f"{quant / full:7.3f}" if full else f"{'-':>7}"
        print(f"  {label + (f' ({unit})' if unit else ''):42} {full / scale:12.4g} {quant / scale:12.4g} {ratio}")
    if "val_rows" in m:
        print(f"  val: the first {m['val_rows']:.0f} rows of the source run's data.val, scored by both models")
    print(f"  {len(report['quantized_layers'])} layer(s) quantized; kept in full precision: "
          + ("; ".join(f"{k} ({v})" for k, v in report["kept_layers"].items()) or "none"))
    print(f"  the brief: 4-bit weights need {report['brief_int4_saving_vs_16bit']:.0%} less memory than 16-bit ones; "
          f"measured here ({report['mode']}): the quantized layers take {m['layer_saving_vs_16bit']:.1%} less than "
          f"their 16-bit size ({1 - m['layer_ratio']:.1%} less than fp32), the whole file {1 - m['file_ratio']:.1%} "
          f"less than fp32.")


def record_in_mlflow(uri: str, source_run: str, report: dict[str, Any], folder: Path,
                     register: str | None) -> tuple[str, str | None]:
    """The export as a child run of `source_run` (its params, metrics and files); returns (run id, version)."""
    client = MlflowClient(uri)
    try:
        parent = client.get_run(source_run)
    except Exception:
        if register:
            raise ConfigError(f"`--register {register}` records the export under its source run {source_run}, which "
                              f"is not in the MLflow store at {public_uri(uri)}: pass the store's `--tracking-uri`.") from None
        print(f"openclaw: not recorded in MLflow: the source run {source_run} is not in the store at {public_uri(uri)} "
              f"(pass its `--tracking-uri` to record the export there).")
        return None, None
    mode = report["mode"]
    child = client.create_run(parent.info.experiment_id, run_name=f"{parent.info.run_name}-{mode}", tags={
        "mlflow.parentRunId": source_run, "openclaw.kind": EXPORT_KIND, "openclaw.quantization": mode}).info.run_id
    params = {"mode": mode, "group_size": report["group_size"], "torchao": report["torchao"],
              "quantized_layers": len(report["quantized_layers"]), "kept_layers": ", ".join(report["kept_layers"])}
    now = int(time.time() * 1000)
    client.log_batch(child, params=[Param(k, str(v)[:6000]) for k, v in params.items()],
                     metrics=[Metric(k, float(v), now, 0) for k, v in report["measured"].items()])
    client.log_artifacts(child, str(folder), EXPORT_DIR)
    client.set_terminated(child)
    client.set_tag(source_run, f"openclaw.export.{mode}", child)
    version = None
    if register:
        try:
            client.get_registered_model(register)
        except Exception:
            client.create_registered_model(register)
        version = client.create_model_version(register, f"runs:/{child}/{EXPORT_DIR}", run_id=child, tags={
            "quantization": mode, "source_run": source_run}).version
        print(f"openclaw: registered the {mode} export as models:/{register}/{version}")
    return child, version
