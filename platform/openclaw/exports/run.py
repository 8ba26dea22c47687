"""`openclaw export SOURCE --quantize MODE` (driver, or any process; no Ray): load a trained model, quantize
it, save it, measure it against the full model, and record it in MLflow as a child run of the source
run (registered as a model version with `--register NAME`)."""
from __future__ import annotations

import copy
import functools
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from openclaw.config import Config
from openclaw.constants import default_tracking_uri, job_home
from openclaw.data.filesystems import local_copy
from openclaw.engine import checkpoint as ckpt_io
from openclaw.engine.model_io import load_model_dir
from openclaw.errors import ConfigError, UntrustedCodeError
from openclaw.exports.evaluate import sample_batch
from openclaw.exports.files import discard_export, is_export, model_file, save_export, write_report
from openclaw.exports.measure import (forward_memory, importable, latency_ms, layer_bytes, layer_numel,
                                      state_bytes)
from openclaw.exports.quantize import Plan, plan, torchao
from openclaw.exports.quantize import quantize as quantize_layers
from openclaw.exports.report import findings, print_table, record_in_mlflow
from openclaw.tracking.redact import redacted
from openclaw.tracking.model import load_logged_model
from openclaw.tracking.run import RUN_ID_PATTERN, load_logged_config, logged_export

BRIEF_INT4_SAVING = 0.75
"""The product brief: "quantized to 4-bit precision, 75% less memory" (relative to 16-bit weights)."""


@dataclass
class Loaded:
    model: nn.Module
    config: dict[str, Any]
    run_id: str | None
    label: str

    @functools.cached_property
    def cfg(self) -> Config:
        """`config`, validated (once)."""
        return Config.model_validate(self.config)


@dataclass
class ExportResult:
    out: str
    mode: str
    group_size: int | str | None
    """int4: the group size of every layer, or "per layer" (see `quantization.json`)."""
    quantized_layers: list[str]
    kept_layers: dict[str, str]
    measured: dict[str, float] = field(default_factory=dict)
    run_id: str | None = None
    """The export's MLflow run (a child of the source run), when the source run is known."""
    model_version: str | None = None
    findings: list[str] = field(default_factory=list)
    """What the measurements mean for shipping it (`report.findings`): slower, worse, or barely smaller."""


def export(source: str | os.PathLike, *, quantize: str, group_size: int | None = None, evaluate: bool = False,
           out: str | os.PathLike | None = None, register: str | None = None, tracking_uri: str | None = None,
           device: str = "cpu", trust_code: bool = False,
           model_fn: Callable[..., nn.Module] | None = None) -> ExportResult:
    """Quantize a trained model (a checkpoint folder or URI, an MLflow run id, or models:/NAME/VERSION)."""
    torchao()
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("`--device cuda` but no CUDA device is visible; export on the CPU (`--device cpu`), "
                          "where int8, int8-dynamic and int4 all run.")
    uri = tracking_uri or default_tracking_uri()
    fn_ref = importable(model_fn)  # the memory's fresh processes build the model with it too
    src = load_source(str(source), uri, trust_code=trust_code, model_fn=model_fn)
    check_code(src, evaluate, trust_code)
    if register and not src.run_id:
        raise ConfigError(f"`--register {register}` records the export under its source run, and {src.label} names "
                          f"none (tracking was off). Export from the run id instead, or leave out `--register`.")
    p = plan(src.model, quantize, group_size)
    quantized = quantize_layers(copy.deepcopy(src.model), p, dev)
    batch = sample_batch(src.cfg, 32)
    check_forward(quantized, batch, p)
    folder = Path(out or Path(job_home()) / "exports" / f"{src.config.get('name', 'model')}-{quantize}")
    report = {"mode": p.mode, "group_size": p.group_size, "group_sizes": p.groups, "described": p.describe(),
              "torchao": torchao().__version__, "source": src.label, "source_run": src.run_id, "quantized_layers": p.quantized, "kept_layers": p.kept, "measured": {},
              "brief_int4_saving_vs_16bit": BRIEF_INT4_SAVING}
    save_export(folder, quantized, redacted(src.config), report)  # loadable before it is measured
    try:
        report["measured"] = measured = measure(src, quantized, p, folder, evaluate, batch, trust_code, fn_ref)
    except BaseException:
        discard_export(folder)  # an export no measurement finished is not one
        raise
    report["findings"] = findings(report)
    write_report(folder, report)
    print_table(report, folder)
    run_id, version = record_in_mlflow(uri, src.run_id, report, folder, register) if src.run_id else (None, None)
    return ExportResult(str(folder), p.mode, p.group_size, p.quantized, p.kept, measured, run_id, version,
                        report["findings"])


def load_source(source: str, uri: str, *, trust_code: bool, model_fn) -> Loaded:
    trust = {"trust_code": trust_code, "model_fn": model_fn}
    if source.startswith(("models:/", "runs:/")) or (RUN_ID_PATTERN.fullmatch(source) and not Path(source).exists()):
        ref = source if ":/" in source else f"runs:/{source}/model"
        with logged_export(ref, uri) as folder:
            if folder is not None:
                raise already_quantized(source)
        config, run_id = load_logged_config(ref, uri)
        return Loaded(load_logged_model(ref, uri, **trust), config, run_id, ref)
    if "://" not in source and not Path(source).is_dir():
        raise ConfigError(f"`SOURCE` {source} is not a checkpoint folder, an MLflow run id, or models:/NAME/VERSION. "
                          f"Pass a run's checkpoint (it prints its final one) or its run id.")
    if is_export(source):
        raise already_quantized(source)
    with local_copy(source) as d:
        parts = ckpt_io.read(d)
        model = load_model_dir(d, **trust)
    return Loaded(model, parts["config"], parts["state"].get("mlflow_run_id") or None, source)


def check_code(src: Loaded, evaluate: bool, trust_code: bool) -> None:
    """The source's config may name code the export would run: `map_batches` transforms, which prepare
    the rows it is measured on, and (with `evaluate`) a task of its own, which scores them. Without
    `trust_code`, an UntrustedCodeError names them, as loading a model of its own does."""
    if trust_code:
        return
    config = src.cfg
    code = [f"`data.transforms` {t.fn}" for t in config.data.transforms if t.op == "map_batches"]
    if evaluate and ":" in config.task:
        code.append(f"`task` {config.task}")
    if code:
        raise UntrustedCodeError(
            f"{src.label}'s config names code the export would import and run: {', '.join(code)}. If you trust "
            f"where it came from, pass trust_code=True (`--trust-code` on the command line).")


def already_quantized(source: str) -> ConfigError:
    return ConfigError(f"`SOURCE` {source} is already a quantized export; export from the run or checkpoint it "
                       f"came from (its quantization.json names it).")


def check_forward(quantized: nn.Module, batch: torch.Tensor, p: Plan) -> None:
    """One forward of the quantized model before anything is written: code that reads a quantized Linear's
    weight itself (`x @ self.proj.weight`) fails on torchao's tensors, and is a ConfigError here."""
    try:
        with torch.no_grad():
            quantized(batch[:2].to(next(quantized.parameters()).device))
    except Exception as e:
        said = " ".join(str(e).split())[:300]
        raise ConfigError(f"`--quantize {p.mode}` made a model whose forward fails ({type(e).__name__}: {said}). The "
                          f"model's code likely reads a quantized Linear's weight outside that Linear's own forward, "
                          f"which torchao's quantized weights do not support (layers quantized: "
                          f"{', '.join(p.quantized[:8])}{' ...' if len(p.quantized) > 8 else ''}). Call those "
                          f"Linears instead of reading their weights, or export without quantizing.") from None


def measure(src: Loaded, quantized: nn.Module, p: Plan, folder: Path, evaluate: bool, batch: torch.Tensor,
            trust_code: bool, model_fn: str = "") -> dict:
    """Sizes, memory, latency and (with `evaluate`) quality, full precision against quantized, on `batch`'s
    inputs. The memory is measured in fresh processes while this one scores the models; latency is timed
    after both."""
    from openclaw.exports.evaluate import scores, val_batches
    config = src.cfg
    m = {"weight_bytes_full": state_bytes(src.model), "weight_bytes_quantized": state_bytes(quantized),
         "layer_bytes_full": layer_bytes(src.model, p.quantized), "layer_bytes_quantized": layer_bytes(quantized, p.quantized)}
    with tempfile.TemporaryDirectory(prefix="openclaw-export-") as tmp:
        full = save_export(Path(tmp), src.model, redacted(src.config), {"mode": "none"})  # written as the export is
        m["file_bytes_full"], m["file_bytes_quantized"] = model_file(full).stat().st_size, model_file(folder).stat().st_size
        memory = forward_memory({"full": str(full), "quantized": str(folder)}, list(batch.shape), batch.dtype,
                                trust_code, model_fn)
        if evaluate:
            batches = val_batches(config)
            m["val_rows"] = sum(len(b["x"]) for b in batches)
            full_scores, quant = scores(src.model, config.task, batches, "full"), scores(quantized, config.task, batches, p.mode)
            for k in full_scores:
                m[f"val_{k}_full"], m[f"val_{k}_quantized"] = full_scores[k], quant[k]
                m[f"val_{k}_delta"] = quant[k] - full_scores[k]
        for side, r in memory().items():
            m[f"peak_rss_bytes_{side}"], m[f"model_rss_bytes_{side}"] = r["peak"], r["model"]
    for n in (1, 32):
        m[f"latency_ms_b{n}_full"] = latency_ms(src.model.eval(), batch[:n])
        m[f"latency_ms_b{n}_quantized"] = latency_ms(quantized, batch[:n].to(next(quantized.parameters()).device))
    m["file_ratio"] = m["file_bytes_quantized"] / m["file_bytes_full"]
    m["layer_ratio"] = m["layer_bytes_quantized"] / m["layer_bytes_full"]
    numel = layer_numel(src.model, p.quantized)  # 16- and 32-bit sizes whatever the source's own dtype
    m["layer_saving_vs_16bit"] = 1 - m["layer_bytes_quantized"] / (2 * numel)
    m["layer_saving_vs_fp32"] = 1 - m["layer_bytes_quantized"] / (4 * numel)
    return m
