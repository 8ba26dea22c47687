"""The LR x batch-size sweep (`sweep.lr_scaling`, jobs/configs/digits-lr-batch.yaml): each trial's LR
scaled to its global batch, the config's checks, the heat-map's grid and picture, and on a real local
Ray and MLflow, the heat-map with the trials' gradient noise scale on the sweep's parent run."""
import io
import json
import statistics

import pytest
from mlflow.tracking import MlflowClient

import openclaw
from conftest import REPO
from openclaw.errors import ConfigError
from openclaw.sweeps.heatmap import _log_position, draw, lr_batch_grid
from openclaw.sweeps.trial import trial_config

SWEEP = REPO / "jobs" / "configs" / "digits-lr-batch.yaml"
PNG = b"\x89PNG\r\n\x1a\n"


def trial_lr(cfg, batch: int, lr: float) -> float:
    params = {"train.global_batch_size": batch, "train.optimizer.lr": lr}
    return trial_config(cfg.resolved(), params, sweep_name="s", trial_id="t", storage="/tmp", tracking_uri="sqlite://",
                        parent_run_id=None).train.optimizer.lr


@pytest.mark.parametrize("rule,elastic,factors", [
    ("elastic", "sqrt", (0.5, 1.0, 2.0)),     # the shipped file: the run's elastic.lr_rule
    ("elastic", "linear", (0.25, 1.0, 4.0)),
    ("sqrt", "linear", (0.5, 1.0, 2.0)),      # a rule named in the sweep wins over elastic's
])
def test_each_trial_trains_at_the_swept_lr_scaled_from_the_reference_batch_to_its_own(rule, elastic, factors):
    cfg = openclaw.load_config(SWEEP, {"sweep.lr_scaling.rule": rule, "elastic.lr_rule": elastic})
    assert cfg.sweep.lr_scaling.reference_batch == 64
    assert [trial_lr(cfg, b, 1e-3) for b in (16, 64, 256)] == pytest.approx([1e-3 * f for f in factors])
    plain = openclaw.load_config(SWEEP, {"sweep.lr_scaling": None})  # without it, the swept LR as it is
    assert trial_lr(plain, 256, 1e-3) == 1e-3


def test_lr_scaling_needs_the_global_batch_in_the_space_and_a_positive_reference():
    with pytest.raises(ConfigError, match=r"`sweep.lr_scaling`.*add `train.global_batch_size` to `sweep.space`"):
        openclaw.load_config(SWEEP, {"sweep.space": {"train.optimizer.lr": {"choice": [1e-3, 3e-3]}}})
    with pytest.raises(ConfigError, match=r"sweep.lr_scaling.reference_batch"):
        openclaw.load_config(SWEEP, {"sweep.lr_scaling.reference_batch": 0})
    with pytest.raises(ConfigError, match=r"sweep.lr_scaling.rule"):
        openclaw.load_config(SWEEP, {"sweep.lr_scaling.rule": "cubic"})


def rows() -> list[dict]:
    out = []
    for i, (b, lr, loss) in enumerate([(16, 1e-3, 0.9), (64, 1e-3, 0.5), (16, 3e-3, 0.4), (64, 3e-3, None)]):
        out.append({"trial": str(i), "run_id": None, "outcome": "finished", "step": 80, "val/loss": loss,
                    "train.global_batch_size": b, "train.optimizer.lr": lr})
    out.append({**out[1], "trial": "4", "val/loss": 0.7})  # a repeat of a cell: the mean
    out.append({**out[0], "trial": "5", "outcome": "failed", "val/loss": 5.0})  # failed: left out
    return out


def test_the_grid_holds_each_cells_final_metric_and_the_median_noise_scale():
    base = openclaw.load_config(SWEEP).resolved()
    grid = lr_batch_grid(rows(), "val/loss", [30.0, 10.0, 20.0, 100.0], base)
    assert grid.batches == [16, 64] and grid.lrs == [1e-3, 3e-3] and grid.rule == "sqrt"
    assert grid.values == [[0.9, pytest.approx(0.6)], [0.4, None]]
    assert grid.noise_scale == 25.0 and grid.reference_batch == 64
    assert lr_batch_grid(rows(), "val/loss", [], base).noise_scale is None


def test_the_heat_map_is_a_png_with_the_noise_scale_in_its_title_and_at_its_place_on_the_batch_axis():
    grid = lr_batch_grid(rows(), "val/loss", [32.0], openclaw.load_config(SWEEP).resolved())
    fig = draw(grid)
    ax = fig.axes[0]
    assert "gradient noise scale (median of trials): 32" in ax.get_title()
    assert [t.get_text() for t in ax.get_xticklabels()] == ["16", "64"]
    assert ax.lines and ax.lines[0].get_xdata()[0] == pytest.approx(0.5)  # 32: halfway from 16 to 64 in log
    cells = sorted(t.get_text() for t in ax.texts)
    assert cells == sorted(["0.9", "0.6", "0.4", "-"])
    box = [p.get_xy() for p in ax.patches if not p.get_fill()]
    assert box == [pytest.approx((-0.5, 0.5))]  # the lowest loss (0.4: batch 16, LR 3e-3) boxed
    out = io.BytesIO()
    fig.savefig(out, format="png")
    assert out.getvalue().startswith(PNG)
    assert _log_position(8.0, [16, 64]) is None and _log_position(64.0, [16, 64, 256]) == pytest.approx(1.0)


# ---- the sweep, for real -------------------------------------------------------------------------------

@pytest.mark.integration
@pytest.mark.slow
def test_the_sweep_logs_its_heat_map_and_noise_scale_on_the_parent_run(ray_local, digits_dir, tmp_path, mlflow_uri):
    cfg = openclaw.load_config(SWEEP, {
        "data.train": str(digits_dir / "train"), "data.val": str(digits_dir / "val"),
        "checkpoint.storage": str(tmp_path / "runs"), "tracking.uri": mlflow_uri, "train.max_steps": 40,
        "train.eval_every": 40, "checkpoint.every_steps": 40,
        "sweep.space": {"train.global_batch_size": {"choice": [16, 64]},
                        "train.optimizer.lr": {"choice": [1e-3, 1e-2]}}})
    result = openclaw.sweep(cfg)
    client = MlflowClient(mlflow_uri)
    exp = client.get_run(result.parent_run_id).info.experiment_id
    kids = client.search_runs([exp], filter_string=f"tags.`mlflow.parentRunId` = '{result.parent_run_id}'")
    assert len(kids) == 4 and all(k.info.status == "FINISHED" for k in kids)

    artifacts = {a.path for a in client.list_artifacts(result.parent_run_id)}
    assert {"lr_batch.png", "lr_batch.json"} <= artifacts
    png = open(client.download_artifacts(result.parent_run_id, "lr_batch.png", str(tmp_path)), "rb").read()
    assert png.startswith(PNG) and len(png) > 5000
    grid = json.load(open(client.download_artifacts(result.parent_run_id, "lr_batch.json", str(tmp_path))))
    assert grid["batches"] == [16, 64] and grid["lrs"] == [1e-3, 1e-2] and grid["rule"] == "sqrt"
    for k in kids:  # each cell: that trial's final val/loss; the trial trained at the scaled LR
        batch, trained_lr = int(k.data.params["train.global_batch_size"]), float(k.data.params["train.optimizer.lr"])
        swept = trained_lr / (batch / 64) ** 0.5
        assert swept == pytest.approx(1e-3) or swept == pytest.approx(1e-2)
        cell = grid["values"][grid["lrs"].index(pytest.approx(swept))][grid["batches"].index(batch)]
        assert cell == pytest.approx(k.data.metrics["val/loss"])
    noise = [k.data.metrics["train/grad_noise_scale_smooth"] for k in kids]
    print(f"\ntrials' smoothed noise scale {sorted(noise)}; grid {grid['values']}")
    assert grid["noise_scale"] == pytest.approx(statistics.median(noise)) and grid["noise_scale"] > 0
    parent = client.get_run(result.parent_run_id).data.metrics
    assert parent["lr_batch/grad_noise_scale"] == pytest.approx(grid["noise_scale"])


def test_the_best_cell_follows_the_sweeps_mode_and_a_nan_is_no_cell():
    """The heat-map boxed the lowest value whatever `sweep.mode` said (0.4 of accuracies 0.91 to 0.97),
    and a NaN loss took a cell of its own."""
    base = openclaw.load_config(SWEEP, {"sweep.metric": "val/accuracy", "sweep.mode": "max"}).resolved()
    accuracy = [{**r, "val/accuracy": a} for r, a in zip(rows()[:4], (0.91, 0.97, 0.4, float("nan")))]
    grid = lr_batch_grid(accuracy, "val/accuracy", [], base)
    assert grid.mode == "max" and grid.values == [[0.91, 0.97], [0.4, None]]
    box = [p.get_xy() for p in draw(grid).axes[0].patches if not p.get_fill()]
    assert box == [pytest.approx((0.5, -0.5))]  # 0.97: batch 64, LR 1e-3
