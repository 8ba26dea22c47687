"""The LR x batch-size picture of a sweep with `sweep.lr_scaling` (driver, when the sweep ends).

The final metric of every trial on the grid of global batch x LR (the LR at the reference batch: each
trial trained at it scaled by the rule), beside the trials' gradient noise scale: the median of their
last `train/grad_noise_scale_smooth` (`engine.noise`), about the batch above which a larger batch
stops buying fewer steps. Logged on the sweep's parent run as `lr_batch.png`, with its numbers in
`lr_batch.json` and the estimate as the metric `lr_batch/grad_noise_scale`.
"""
from __future__ import annotations

import math
import statistics
import sys
from dataclasses import asdict, dataclass
from typing import Any

from matplotlib.colors import LogNorm
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from mlflow.tracking import MlflowClient

BATCH, LR = "train.global_batch_size", "train.optimizer.lr"
NOISE = "train/grad_noise_scale_smooth"


@dataclass
class LrBatchGrid:
    batches: list[int]
    lrs: list[float]
    values: list[list[float | None]]
    """values[i][j]: the metric at lrs[i] and batches[j], the mean over the cell's ended trials (None:
    no trial of the cell ended with a value)."""
    metric: str
    mode: str
    """`min` or `max` (`sweep.mode`): which cell is the best."""
    noise_scale: float | None
    """The median of the trials' smoothed gradient noise scale (None: no trial measured it)."""
    reference_batch: int
    rule: str


def lr_batch_grid(rows: list[dict[str, Any]], metric: str, noise_scales: list[float], base: dict[str, Any]
                  ) -> LrBatchGrid:
    """The grid from the trials table's rows (`SweepTracker.rows`) of the sweep whose resolved config is
    `base` (pure). An LR that is not swept is the config's."""
    base_lr, scaling = base["train"]["optimizer"]["lr"], base["sweep"]["lr_scaling"]
    batches = sorted({int(r[BATCH]) for r in rows})
    lrs = sorted({float(r.get(LR, base_lr)) for r in rows})
    cells: dict[tuple[float, int], list[float]] = {}
    for r in rows:
        if isinstance(r.get(metric), (int, float)) and math.isfinite(r[metric]) and r["outcome"] != "failed":
            cells.setdefault((float(r.get(LR, base_lr)), int(r[BATCH])), []).append(r[metric])
    values = [[statistics.mean(cells[lr, b]) if (lr, b) in cells else None for b in batches] for lr in lrs]
    rule = base["elastic"]["lr_rule"] if scaling["rule"] == "elastic" else scaling["rule"]
    return LrBatchGrid(batches, lrs, values, metric, base["sweep"]["mode"],
                       statistics.median(noise_scales) if noise_scales else None, scaling["reference_batch"], rule)


def draw(grid: LrBatchGrid) -> Figure:
    """The heat-map: a cell per (batch, LR) with its value (on a log color scale when all are positive),
    the best boxed (`sweep.mode`); the noise scale in the title and, when it falls inside the batches tried, as a
    dashed line at its place on the log-batch axis."""
    fig = Figure(figsize=(2.2 + 1.3 * len(grid.batches), 1.8 + 0.8 * len(grid.lrs)), dpi=110)
    ax = fig.add_subplot()
    known = [v for row in grid.values for v in row if v is not None]
    norm = LogNorm(min(known), max(known)) if known and min(known) > 0 and min(known) < max(known) else None
    data = [[math.nan if v is None else v for v in row] for row in grid.values]
    image = ax.imshow(data, cmap="viridis", norm=norm, origin="lower", aspect="auto")
    fig.colorbar(image, ax=ax, label=f"final {grid.metric}")
    cells = [(v, i, j) for i, row in enumerate(grid.values) for j, v in enumerate(row) if v is not None]
    best = (min if grid.mode == "min" else max)(cells, key=lambda c: c[0], default=None)
    for i, row in enumerate(grid.values):
        for j, v in enumerate(row):
            light = v is not None and image.norm(v) > 0.6  # viridis: dark at the low end, yellow at the high
            ax.text(j, i, "-" if v is None else f"{v:.3g}", ha="center", va="center", fontsize=9,
                    color="black" if light else "white")
    if best:
        ax.add_patch(Rectangle((best[2] - 0.5, best[1] - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2.5))
    ax.set_xticks(range(len(grid.batches)), [str(b) for b in grid.batches])
    ax.set_yticks(range(len(grid.lrs)), [f"{lr:.3g}" for lr in grid.lrs])
    ax.set_xlabel("global batch size")
    ax.set_ylabel(f"LR at batch {grid.reference_batch} (scaled by {grid.rule})")
    noise = "not measured" if grid.noise_scale is None else f"{grid.noise_scale:.3g}"
    ax.set_title(f"final {grid.metric}; gradient noise scale (median of trials): {noise}", fontsize=10)
    at = _log_position(grid.noise_scale, grid.batches)
    if at is not None:
        ax.axvline(at, color="orange", linestyle="--", linewidth=2, label=f"noise scale {grid.noise_scale:.3g}")
        ax.legend(loc="upper left", fontsize=8, framealpha=0.9)
    fig.tight_layout()
    return fig


def _log_position(value: float | None, batches: list[int]) -> float | None:
    """Where `value` falls on the categorical batch axis, interpolated in log space; None if outside."""
    if value is None or len(batches) < 2 or not batches[0] <= value <= batches[-1]:
        return None
    logs = [math.log(b) for b in batches]
    j = max(k for k in range(len(batches) - 1) if logs[k] <= math.log(value))
    return j + (math.log(value) - logs[j]) / (logs[j + 1] - logs[j])


def log_lr_batch(client: MlflowClient, parent_run_id: str, rows: list[dict[str, Any]], metric: str,
                 base: dict[str, Any]) -> LrBatchGrid | None:
    """Draw the grid of the trials so far and log it on the parent run (best effort: a failure is printed,
    the sweep goes on)."""
    try:
        noise = [v for r in rows if r.get("run_id")
                 for v in [client.get_run(r["run_id"]).data.metrics.get(NOISE)] if v is not None and v > 0]
        grid = lr_batch_grid(rows, metric, noise, base)
        client.log_figure(parent_run_id, draw(grid), "lr_batch.png")
        client.log_dict(parent_run_id, asdict(grid), "lr_batch.json")
        if grid.noise_scale is not None:
            client.log_metric(parent_run_id, "lr_batch/grad_noise_scale", grid.noise_scale)
        return grid
    except Exception as e:
        print(f"openclaw: could not draw the sweep's LR x batch heat-map on run {parent_run_id}: {e}",
              file=sys.stderr, flush=True)
        return None
