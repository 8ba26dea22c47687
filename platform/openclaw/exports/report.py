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
from openclaw.exports.quantize import GROUP_SIZES
from openclaw.tracking.redact import public_uri
from openclaw.tracking.run import EXPORT_DIR, EXPORT_KIND

ROWS = (("file on disk", "file_bytes", "MB"), ("weights in memory", "weight_bytes", "MB"),
        ("quantized layers' weights", "layer_bytes", "MB"), ("peak memory of a forward (RSS)", "peak_rss_bytes", "MB"),
        ("  growth from loading and running it", "model_rss_bytes", "MB"),
        ("latency, batch 1", "latency_ms_b1", "ms"), ("latency, batch 32", "latency_ms_b32", "ms"),
        ("val loss", "val_loss", ""), ("val accuracy", "val_accuracy", ""), ("val perplexity", "val_perplexity", ""))


SLOWER = 1.10
"""A quantized forward that takes more than this times the full model's is reported as slower."""
WORSE = 0.02
"""A val loss that rises by more than this fraction, or an accuracy that falls by more than this, is reported."""
SMALL_SAVING = 0.9
"""A quantized file above this fraction of the full one's size is reported as barely smaller."""

_WHY_SLOWER = {
    "int8-dynamic": "int8-dynamic quantizes each layer's activations on every call, which costs more than the int8 "
                    "matmul saves on layers this small; `--quantize int8` (weight-only) stores the same int8 weights "
                    "without that step",
    "int8": "weight-only int8 layers dequantize their weights on every call: what this export saves is memory, not time",
    "int4": "int4 layers dequantize their weights to bf16 on every call: what this export saves is memory, not time",
}
_QUALITY_FIX = {
    "int4": "a smaller `--group-size` (32) fits each scale to fewer weights; `--quantize int8` loses less",
    "int8": "score it on your own data before you ship it, or keep the full model",
    "int8-dynamic": "`--quantize int8` (weight-only) keeps activations in full precision and loses less",
}


def findings(report: dict[str, Any]) -> list[str]:
    """What an export's measurements mean for shipping it, each with what to change: a quantized model that
    is slower, scores worse, or is barely smaller than the full one (pure: the report's numbers in,
    sentences out; `print_table` prints them and `quantization.json` keeps them)."""
    m, mode, out = report["measured"], report["mode"], []
    slower = [(n, m[f"latency_ms_b{n}_quantized"] / m[f"latency_ms_b{n}_full"]) for n in (1, 32)
              if m.get(f"latency_ms_b{n}_full") and m[f"latency_ms_b{n}_quantized"] / m[f"latency_ms_b{n}_full"] > SLOWER]
    if slower:
        out.append(f"slower: a forward at {' and '.join(f'batch {n} takes {r:.2f}x' for n, r in slower)} the full "
                   f"model's time; {_WHY_SLOWER[mode]}.")
    lost = []
    if "val_loss_full" in m and m["val_loss_quantized"] - m["val_loss_full"] > WORSE * abs(m["val_loss_full"]):
        lost.append(f"val loss {m['val_loss_full']:.4f} -> {m['val_loss_quantized']:.4f} "
                    f"({m['val_loss_quantized'] / m['val_loss_full'] - 1:+.1%})")
    if "val_accuracy_full" in m and m["val_accuracy_full"] - m["val_accuracy_quantized"] > WORSE:
        lost.append(f"val accuracy {m['val_accuracy_full']:.4f} -> {m['val_accuracy_quantized']:.4f}")
    if lost:
        fix = _QUALITY_FIX[mode]
        groups = report.get("group_sizes") or {}
        if mode == "int4" and groups and all(g <= min(GROUP_SIZES) for g in groups.values()):
            fix = "every layer already has the smallest `--group-size` (32); `--quantize int8` loses less"
        out.append(f"quality: {'; '.join(lost)} on the first {m['val_rows']:.0f} val rows; {fix}.")
    if m["file_ratio"] > SMALL_SAVING:
        out.append(f"barely smaller: the file is {m['file_ratio']:.1%} of the full one, since most of the model's bytes "
                   f"are outside the {len(report['quantized_layers'])} quantized layer(s) (embeddings, norms, or the "
                   f"layers kept in full precision).")
    return out


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
    bits = 4 if report["mode"] == "int4" else 8
    print(f"  expected: {bits}-bit weights take {1 - bits / 16:.0%} less memory than 16-bit ones; "
          f"measured here ({report['mode']}): the quantized layers take {m['layer_saving_vs_16bit']:.1%} less than "
          f"their 16-bit size ({m['layer_saving_vs_fp32']:.1%} less than fp32), the whole file "
          f"{1 - m['file_ratio']:.1%} less than the full model's.")
    for line in report.get("findings", []):
        print(f"  - {line}")


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
