"""The source run's validation set, scored by the full and the quantized model (plain torch + pyarrow;
the export's process): loss, and accuracy (classification) or perplexity (language modeling)."""
from __future__ import annotations

import math
import time

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import nn

from openclaw.config import Config
from openclaw.data.sources import column_to_numpy, resolve
from openclaw.data.transforms import apply_to_table
from openclaw.engine.tasks import build_task
from openclaw.errors import ConfigError, UserError

EVAL_ROWS = 1024
"""Validation rows scored at most (the first ones, in file order): enough to see a quantization's cost,
and quick even where a kernel is slow (torch's int4 matmul on a CPU without AVX-512 is)."""
PROGRESS_EVERY_S = 10.0


def val_batches(config: Config, batch_size: int = 256, max_rows: int = EVAL_ROWS) -> list[dict[str, torch.Tensor]]:
    d = config.data
    if not d.val:
        raise ConfigError("`--eval` scores the source run's validation set, and its config has no `data.val`.")
    source = resolve(d.val, "data.val", d.s3)
    tables, rows = [], 0
    for shard in source.shards:
        table = apply_to_table(pq.read_table(shard.path, filesystem=source.filesystem), d.transforms)
        tables.append(table.slice(0, max_rows - rows))
        rows += tables[-1].num_rows
        if rows >= max_rows:
            break
    columns = [d.features] + ([d.label] if d.label else [])
    data = {name: torch.from_numpy(column_to_numpy(_concat(tables).column(col)).copy())
            for name, col in zip(("x", "y"), columns)}
    return [{k: v[i:i + batch_size] for k, v in data.items()} for i in range(0, rows, batch_size)]


def _concat(tables):
    """The shards' tables as one: shards may differ in nullability alone (`data.schemas`)."""
    return pa.concat_tables(tables, promote_options="default")


@torch.no_grad()
def scores(model: nn.Module, task_name: str, batches: list[dict[str, torch.Tensor]], label: str) -> dict[str, float]:
    """The model's validation metrics over `batches`, with a progress line every few seconds."""
    task = build_task(task_name)
    totals: dict[str, float] = {}
    start = shown = time.monotonic()
    for i, batch in enumerate(batches, 1):
        for k, v in task.eval_sums(model, batch).items():
            totals[k] = totals.get(k, 0.0) + v
        now = time.monotonic()
        if now - shown > PROGRESS_EVERY_S and i < len(batches):
            shown, eta = now, (now - start) / i * (len(batches) - i)
            print(f"openclaw: scoring the {label} model: batch {i}/{len(batches)}, ETA {eta:.0f}s", flush=True)
    loss = totals["loss"] / totals["count"]
    out = {"loss": loss}
    if "correct" in totals:
        out["accuracy"] = totals["correct"] / totals["count"]
    elif task_name == "language_modeling":
        out["perplexity"] = math.exp(loss)
    return out


def sample_batch(config: Config, n: int) -> torch.Tensor:
    """`n` model inputs for latency and memory: the first validation (else training) rows; for the built-in
    models without their data, inputs of the right shape."""
    d = config.data
    spec = d.val or d.train
    try:
        source = resolve(spec, "data.val" if d.val else "data.train", d.s3)
        table = apply_to_table(pq.read_table(source.shards[0].path, filesystem=source.filesystem).slice(0, n),
                               d.transforms)
        x = torch.from_numpy(column_to_numpy(table.column(d.features)).copy())
        batch = x[:, :-1] if config.task == "language_modeling" else x
    except (UserError, OSError, KeyError, pa.ArrowException):  # the data is gone or does not fit: shaped inputs
        batch = None
    if batch is None or len(batch) < n:
        kw = config.model.kwargs
        if config.model.name == "gpt":
            return torch.randint(0, kw.get("vocab_size", 256), (n, kw.get("block_size", 128)))
        if config.model.name == "mlp":
            return torch.rand(n, kw.get("in_features", 64))
        raise ConfigError(f"measuring the export needs {n} input rows, and {spec} (the source's data) cannot be read.")
    return batch.long() if config.task == "language_modeling" else batch  # the column's dtype, as training reads it
