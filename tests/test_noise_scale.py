"""The gradient noise scale (engine.noise): the estimator against the analytic noise scale of a least-
squares problem, through the real engine; the small-batch gradient each strategy measures, checked
against a plain single-process gradient, on one process and on real 2-process gloo groups; the
smoothed state across a restart; and what the measurement costs."""
import copy
import time

import pytest
import torch
from torch import nn

from openclaw.engine.config import TrainConfig
from openclaw.engine.engine import Engine
from openclaw.engine.noise import GradPair, NoiseWindow, measure_local, noise_metrics, noise_terms
from openclaw.engine.state import TrainState
from parallel_harness import spawn

CPU = torch.device("cpu")


# ---- a least-squares problem whose noise scale is known ---------------------------------------------

class LeastSquares:
    """y = w*.x + sigma * eps with x ~ N(0, I_d): per-sample loss 0.5 (w.x - y)^2, gradient
    g = (delta.x - sigma eps) x with delta = w - w*. Then G = E[g] = delta and (Isserlis)
    E|g|^2 = (d + 2)|delta|^2 + sigma^2 d, so tr(Sigma) = (d + 1)|delta|^2 + sigma^2 d and
    B_noise = tr(Sigma) / |G|^2 = d + 1 + sigma^2 d / |delta|^2."""

    def __init__(self, d: int = 16, sigma: float = 1.0, delta_norm: float = 1.0):
        self.d, self.sigma = d, sigma
        self.w_star = torch.zeros(d)
        self.delta = torch.full((d,), delta_norm / d ** 0.5)
        self.noise_scale = d + 1 + sigma ** 2 * d / delta_norm ** 2

    def model(self) -> nn.Module:
        m = nn.Linear(self.d, 1, bias=False)
        with torch.no_grad():
            m.weight.copy_(self.w_star + self.delta)
        return m

    def batch(self, n: int, g: torch.Generator) -> dict[str, torch.Tensor]:
        x = torch.randn(n, self.d, generator=g)
        return {"x": x, "y": x @ self.w_star + self.sigma * torch.randn(n, generator=g)}

    def loss(self, model, batch):
        return 0.5 * ((model(batch["x"]).squeeze(-1) - batch["y"]) ** 2).sum(), len(batch["y"])

    def eval_sums(self, model, batch):
        loss, n = self.loss(model, batch)
        return {"loss": loss.item(), "count": n}


def frozen_engine(problem: LeastSquares, global_batch: int, micro: int, precision: str = "fp32") -> Engine:
    """An engine whose steps leave the weights (and so the true noise scale) where they are: SGD at a
    negligible LR, no clipping."""
    cfg = TrainConfig(global_batch_size=global_batch, micro_batch_size=micro, max_steps=10_000, grad_clip=None,
                      precision=precision, optimizer={"name": "sgd", "lr": 1e-12, "momentum": 0.0})
    return Engine(problem.model(), problem, cfg, device=CPU)


def test_the_estimator_matches_the_analytic_noise_scale_of_least_squares_within_20_percent():
    problem = LeastSquares(d=16, sigma=1.0, delta_norm=1.0)  # B_noise = 33: between B_small 8 and B_big 64
    engine, g = frozen_engine(problem, global_batch=64, micro=8), torch.Generator().manual_seed(0)
    window, ema, smooth = NoiseWindow(), [0.0, 0.0], []
    whole = NoiseWindow()  # every step in one window: the window estimate over the whole run
    for step in range(1, 1001):
        stats = engine.train_step(step, [problem.batch(8, g) for _ in range(8)])
        assert stats.grad_pair is not None and (stats.grad_pair.small_batch, stats.grad_pair.big_batch) == (8, 64)
        window.add(stats.grad_pair)
        whole.add(stats.grad_pair)
        if step % 25 == 0:  # the log steps
            metrics, ema = window.close(ema, CPU)
            smooth.append(metrics["train/grad_noise_scale_smooth"])
    overall = whole.close([0.0, 0.0], CPU)[0]["train/grad_noise_scale"]
    print(f"\nanalytic B_noise {problem.noise_scale:.1f}; estimated over 1000 steps {overall:.2f}, smoothed at "
          f"the last log step {smooth[-1]:.2f}")
    assert engine.module.weight.sub(problem.w_star + problem.delta).abs().max() < 1e-6  # frozen: B_noise held still
    assert overall == pytest.approx(problem.noise_scale, rel=0.2)
    assert smooth[-1] == pytest.approx(problem.noise_scale, rel=0.2)


def test_the_terms_are_exact_on_expected_norms_and_a_window_without_a_positive_estimate_logs_none():
    g2, tr_sigma = 2.0, 50.0  # E|G_B|^2 = |G|^2 + tr(Sigma)/B
    pair = GradPair(g2 + tr_sigma / 4, 4, g2 + tr_sigma / 32, 32)
    assert noise_terms(pair) == pytest.approx((g2, tr_sigma))
    metrics, ema = noise_metrics([0.0, 0.0], g2_sum=2 * g2, s_sum=2 * tr_sigma, count=2, ranks=2)
    assert metrics == pytest.approx({"train/grad_noise_scale": 25.0, "train/grad_noise_scale_smooth": 25.0})
    assert ema == pytest.approx([0.01 * g2, 0.01 * tr_sigma])  # one step (2 ranks' pairs) at decay 0.99
    # A noisy window whose |G|^2 estimate is negative: its own ratio is left out, the smoothed one stays.
    metrics, ema2 = noise_metrics(ema, g2_sum=-1.0, s_sum=10.0, count=1, ranks=1)
    assert "train/grad_noise_scale" not in metrics and metrics["train/grad_noise_scale_smooth"] > 0
    assert noise_metrics(ema, 0.0, 0.0, 0, 0) == ({}, ema)  # nothing measured: nothing logged, state as it was


# ---- what the engine measures: the mean gradients' squared norms, whatever the scaling ---------------

def mean_grad_sq(model: nn.Module, task, batches: list[dict]) -> float:
    """|mean gradient over the batches' samples|^2 on a plain copy of the model."""
    m = copy.deepcopy(model)
    m.zero_grad()
    total, n = 0.0, 0
    for b in batches:
        loss, count = task.loss(m, b)
        total, n = total + loss, n + count
    (total / n).backward()
    return float(sum(p.grad.pow(2).sum() for p in m.parameters()))


@pytest.mark.parametrize("precision,rel", [("fp32", 1e-5), ("fp16", 2e-2)])
def test_one_process_compares_its_first_micro_batch_with_the_whole_step(precision, rel):
    problem, g = LeastSquares(d=8), torch.Generator().manual_seed(1)
    engine = frozen_engine(problem, global_batch=12, micro=4, precision=precision)
    batches = [problem.batch(4, g) for _ in range(3)]
    expect_small, expect_big = (mean_grad_sq(problem.model(), problem, batches[:1]),
                                mean_grad_sq(problem.model(), problem, batches))
    pair = engine.train_step(0, batches).grad_pair
    assert (pair.small_batch, pair.big_batch) == (4, 12)
    assert pair.small_sq == pytest.approx(expect_small, rel=rel) and pair.big_sq == pytest.approx(expect_big, rel=rel)


def test_one_process_with_one_micro_batch_has_nothing_to_compare():
    problem = LeastSquares(d=8)
    engine = frozen_engine(problem, global_batch=8, micro=8)
    assert engine.train_step(0, [problem.batch(8, torch.Generator().manual_seed(0))]).grad_pair is None


# ---- two ranks on a real gloo group ------------------------------------------------------------------

def least_squares_ranks(rank: int, world: int, parallelism: dict, micro: int, steps: int) -> dict:
    """One rank of a frozen least-squares run (B_noise = 9, global batch 32): its pairs, the expected
    step-0 small-batch norm from a plain model, and the log windows' metrics (collective, every 25 steps)."""
    from openclaw.engine.parallel.build import build_strategy, layout_for
    from openclaw.engine.parallel.config import ParallelismConfig
    problem, per = LeastSquares(d=4), 32 // world
    pc = ParallelismConfig(**parallelism)
    cfg = TrainConfig(global_batch_size=32, micro_batch_size=micro, max_steps=10_000, grad_clip=None,
                      precision="fp32", optimizer={"name": "sgd", "lr": 1e-12, "momentum": 0.0})
    engine = Engine(problem.model(), problem, cfg, device=CPU, world_size=layout_for(pc, world).dp,
                    strategy=build_strategy(pc, world=world, rank=rank))
    window, whole, ema, pairs, expect_small = NoiseWindow(), NoiseWindow(), [0.0, 0.0], [], None
    for step in range(1, steps + 1):
        glob = problem.batch(32, torch.Generator().manual_seed(step))  # the same global batch on every rank
        mine = [{k: v[rank * per:(rank + 1) * per][i:i + micro] for k, v in glob.items()} for i in range(0, per, micro)]
        if expect_small is None:
            expect_small = mean_grad_sq(problem.model(), problem, mine[:1] if micro < per else mine)
        pairs.append(engine.train_step(step, mine).grad_pair)
        window.add(pairs[-1])
        whole.add(pairs[-1])
        if step % 25 == 0:
            metrics, ema = window.close(ema, CPU)
    return {"pairs": pairs, "expect_small": expect_small, "last": metrics, "ema": ema,
            "whole": whole.close([0.0, 0.0], CPU)[0], "noise_scale": problem.noise_scale}


@pytest.mark.parametrize("parallelism,micro", [
    ({"strategy": "ddp"}, 4),    # four micro-batches a rank: the first one's gradient, under no_sync
    ({"strategy": "ddp"}, 16),   # one micro-batch a rank: measured in the comm hook, before the all-reduce
    ({"strategy": "fsdp"}, 4),   # the first micro-batch's unsharded gradient, before the reduce-scatter
])
def test_two_ranks_measure_their_local_gradient_and_agree_on_the_noise_scale(parallelism, micro):
    out = spawn(2, least_squares_ranks, parallelism, micro, 300)
    for r in out:
        assert all(p is not None and (p.small_batch, p.big_batch) == (micro, 32) for p in r["pairs"])
        assert r["pairs"][0].small_sq == pytest.approx(r["expect_small"], rel=1e-4)  # this rank's own gradient
    first = [r["pairs"][0] for r in out]
    assert first[0].big_sq == pytest.approx(first[1].big_sq) and first[0].small_sq != pytest.approx(first[1].small_sq)
    assert out[0]["last"] == out[1]["last"] and out[0]["ema"] == out[1]["ema"]  # every rank logs and keeps the same
    estimate, smooth = out[0]["whole"]["train/grad_noise_scale"], out[0]["last"]["train/grad_noise_scale_smooth"]
    print(f"\n{parallelism['strategy']}, micro-batch {micro}: B_noise {out[0]['noise_scale']:.0f}, estimated "
          f"{estimate:.2f} over 2 x 300 steps, smoothed {smooth:.2f}")
    assert estimate == pytest.approx(out[0]["noise_scale"], rel=0.2)
    assert 0 < smooth < float("inf") and 0 < out[0]["last"]["train/grad_noise_scale"] < float("inf")


def test_pipeline_stages_measure_nothing():
    from openclaw.engine.parallel.pp import PipelineStrategy
    assert PipelineStrategy.local_grad(object.__new__(PipelineStrategy)) is None


# ---- restarts and cost --------------------------------------------------------------------------------

def test_the_smoothed_state_travels_in_the_train_state_and_older_checkpoints_still_load():
    state = TrainState(step=50, grad_noise_ema=[0.25, 8.0])
    resumed = TrainState()
    resumed.load_state_dict(state.state_dict())
    assert resumed.grad_noise_ema == [0.25, 8.0]
    old = {k: v for k, v in state.state_dict().items() if k != "grad_noise_ema"}  # written before the field
    older = TrainState()
    older.load_state_dict(old)
    assert older.step == 50 and older.grad_noise_ema == [0.0, 0.0]
    # The next window carries on from the restored state: as if the run had not stopped.
    pair = GradPair(3.0, 4, 1.0, 32)
    carried, fresh = NoiseWindow(), NoiseWindow()
    carried.add(pair)
    fresh.add(pair)
    on, _ = carried.close(resumed.grad_noise_ema, CPU)
    anew, _ = fresh.close([0.0, 0.0], CPU)
    g2, s = noise_terms(pair)
    keep = 0.99
    expect = (keep * 8.0 + (1 - keep) * s) / (keep * 0.25 + (1 - keep) * g2)
    assert on["train/grad_noise_scale_smooth"] == pytest.approx(expect)
    assert anew["train/grad_noise_scale_smooth"] == pytest.approx(s / g2) != pytest.approx(expect)


def _windows_over(rank: int, world: int, resume_at: int | None) -> dict[str, float]:
    """Steps 1-30 logged every 10 on `world` ranks, each rank's pairs its own; with `resume_at`, a
    checkpoint there (`LogWindow.carry`: the cut window into the state) and a restart from it."""
    from openclaw.runtime.log_window import LogWindow
    from test_evaluation import DIGITS
    from openclaw import load_config
    cfg, state = load_config(DIGITS, {"train.log_every": 10}), TrainState()

    def window() -> LogWindow:
        return LogWindow(cfg, state, device=CPU, rank=rank, world=world, speaks_for_node=False, flops_per_sample=None,
                         job_start_time=time.time())
    w, ema, out = window(), [0.0, 0.0], {}
    for step in range(1, 31):
        if step == resume_at:
            w.carry(state)
            state.grad_noise_ema, w = ema, window()  # the restarted attempt's window, from the checkpoint's state
        w.noise.add(GradPair(2.0 + 0.1 * step + rank, 4, 1.0 + 0.01 * step, 32))
        if step % 10 == 0:
            out, ema = w.noise.close(ema, CPU)
    return out


@pytest.mark.parametrize("world", [1, 2])
def test_a_restart_between_two_log_steps_carries_the_cut_windows_pairs(world):
    """A checkpoint at step 25 cut the window of steps 21-30: its pairs of steps 21-24 were lost, and
    the resumed run's noise scale at step 30 read 12.95 where the uninterrupted run's read 13.84."""
    whole = spawn(world, _windows_over, None)
    resumed = spawn(world, _windows_over, 25)
    assert whole[0]["train/grad_noise_scale_smooth"] == pytest.approx(resumed[0]["train/grad_noise_scale_smooth"],
                                                                      rel=1e-12)
    assert whole[0]["train/grad_noise_scale"] == pytest.approx(resumed[0]["train/grad_noise_scale"], rel=1e-12)


def test_the_measurement_costs_one_norm_a_small_share_of_a_step():
    from parallel_harness import GPT_KWARGS, global_batch
    from openclaw.engine.models import GPT
    from openclaw.engine.tasks import LanguageModeling
    torch.manual_seed(0)
    cfg = TrainConfig(global_batch_size=8, micro_batch_size=4, optimizer={"name": "adamw", "lr": 1e-3})
    engine = Engine(GPT(**GPT_KWARGS), LanguageModeling(), cfg, device=CPU)
    batches = [{"x": b} for b in global_batch(0)["x"].split(4)]
    engine.train_step(0, batches)  # warm

    def fastest(run, repeats: int) -> float:
        """The fastest of `repeats` runs: a preemption by the machine's other work only ever adds time."""
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            run()
            times.append(time.perf_counter() - t0)
        return min(times)
    step_s = fastest(lambda: engine.train_step(1, batches), 10)
    engine.strategy.forward_backward(engine.model, batches[:1], engine.fns)  # gradients to measure
    norm_s = fastest(lambda: measure_local(engine.model.parameters(), 4).sq_norm.item(), 50)
    print(f"\none step {step_s * 1e3:.2f} ms; the noise scale's extra norm {norm_s * 1e3:.3f} ms "
          f"({norm_s / step_s:.1%} of the step)")
    assert norm_s < 0.1 * step_s


# ---- a real 2-worker run on Ray, interrupted and resumed ------------------------------------------------

def _history(client, run_id: str, key: str) -> dict[int, float]:
    return {m.step: m.value for m in client.get_metric_history(run_id, key)}


@pytest.mark.integration
@pytest.mark.slow
def test_a_two_worker_run_logs_the_noise_scale_and_a_resumed_run_carries_its_smoothed_state(
        ray_local, digits_dir, tmp_path, mlflow_uri):
    import openclaw
    from conftest import digits_config
    from mlflow.tracking import MlflowClient
    # 2 workers x 2 micro-batches of 16: each compares its first micro-batch with the global batch of 64.
    # A constant LR, so that the run cut at step 40 trains on exactly as the one that was not.
    common = {"train.log_every": 10, "train.eval_every": 0, "checkpoint.every_steps": 20,
              "train.schedule.name": "constant"}
    clean = openclaw.train(digits_config(digits_dir, tmp_path, mlflow_uri, name="clean", **common,
                                         **{"train.max_steps": 60}))
    openclaw.train(digits_config(digits_dir, tmp_path, mlflow_uri, name="cut", **common, **{"train.max_steps": 40}))
    cut = openclaw.train(digits_config(digits_dir, tmp_path, mlflow_uri, name="cut", **common,
                                       **{"train.max_steps": 60}))
    client = MlflowClient(mlflow_uri)
    window = _history(client, clean.run_id, "train/grad_noise_scale")
    smooth = {name: _history(client, r.run_id, "train/grad_noise_scale_smooth") for name, r in
              (("clean", clean), ("cut", cut))}
    print(f"\ntrain/grad_noise_scale {window}\nsmoothed {smooth['clean']}")
    assert set(smooth["clean"]) == set(range(10, 61, 10)) and window  # logged at every log step
    assert all(0 < v < float("inf") for v in [*window.values(), *smooth["clean"].values()])
    # The resumed attempt (from step 40) goes on from the checkpointed smoothed state, as if never cut;
    # started afresh, its first smoothed value would be that window's own estimate.
    for step in (50, 60):
        assert smooth["cut"][step] == pytest.approx(smooth["clean"][step], rel=1e-6)
    cut_window = _history(client, cut.run_id, "train/grad_noise_scale")
    assert smooth["cut"][50] != pytest.approx(cut_window.get(50, 0.0), rel=1e-3)
