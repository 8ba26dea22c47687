"""The engine in one process, no Ray: the same code the workers run."""
import copy
import os

import pytest
import torch

from openclaw.config import ScheduleConfig, TrainConfig
from openclaw.engine.device import configure_process
from openclaw.engine.engine import Engine
from openclaw.engine.optim import lr_at
from openclaw.engine.state import TrainState
from openclaw.engine.models import GPT, MLP
from openclaw.engine.tasks import Classification, LanguageModeling


def _data(n=256, d=16, classes=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    w = torch.randn(d, classes, generator=g)
    return x, (x @ w).argmax(1)


def _micro(x, y, start, g, micro):
    return [{"x": x[i:i + micro], "y": y[i:i + micro]} for i in range(start, start + g, micro)]


def _engine(seed=0, **train):
    torch.manual_seed(seed)
    cfg = TrainConfig(**{"global_batch_size": 32, "micro_batch_size": 8, "max_steps": 50, **train})
    return Engine(MLP(16, 32, 1, 4), Classification(), cfg)


def test_loss_falls():
    x, y = _data()
    e = _engine(optimizer={"lr": 1e-2})
    first = e.train_step(0, _micro(x, y, 0, 32, 8))
    for step in range(1, 60):
        last = e.train_step(step, _micro(x, y, (step * 32) % 224, 32, 8))
    assert first.finite and last.loss_sum / last.samples < 0.5 * first.loss_sum / first.samples


def test_accumulation_does_not_change_the_optimization():
    x, y = _data()
    a, b = _engine(micro_batch_size=32), _engine(micro_batch_size=4)
    for step in range(5):
        a.train_step(step, _micro(x, y, step * 32, 32, 32))
        b.train_step(step, _micro(x, y, step * 32, 32, 4))
    for pa, pb in zip(a.model.parameters(), b.model.parameters()):
        assert torch.allclose(pa, pb, rtol=1e-4, atol=1e-6)


def test_state_dict_round_trip_continues_bit_for_bit():
    x, y = _data()
    a = _engine()
    for step in range(3):
        a.train_step(step, _micro(x, y, step * 32, 32, 8))
    saved = copy.deepcopy(a.state_dict())
    b = _engine(seed=123)  # different init: everything must come from the state dict
    b.load_state_dict(saved)
    for step in range(3, 6):
        a.train_step(step, _micro(x, y, step * 32, 32, 8))
        b.train_step(step, _micro(x, y, step * 32, 32, 8))
    assert all(torch.equal(pa, pb) for pa, pb in zip(a.model.parameters(), b.model.parameters()))


def test_a_resume_trains_with_the_optimizer_settings_of_its_config_and_the_saved_moments():
    """torch's `load_state_dict` put the checkpoint's settings back: a resume that changed the weight decay
    or the betas said so (`the config changed since`) and trained on with the old ones."""
    x, y = _data()
    a = _engine(optimizer={"weight_decay": 0.0, "betas": (0.9, 0.95)})
    for step in range(3):
        a.train_step(step, _micro(x, y, step * 32, 32, 8))
    saved = copy.deepcopy(a.state_dict())
    b = _engine(optimizer={"weight_decay": 0.1, "betas": (0.8, 0.99)})
    b.load_state_dict(saved)
    assert [(g["weight_decay"], g["betas"]) for g in b.optimizer.param_groups] == [(0.1, (0.8, 0.99)), (0.0, (0.8, 0.99))]
    params = [p for group in b.optimizer.param_groups for p in group["params"]]  # the saved state's order
    assert all(torch.equal(b.optimizer.state[params[i]]["exp_avg"], s["exp_avg"])
               for i, s in saved["optimizer"]["state"].items())
    old = _engine(optimizer={"weight_decay": 0.0, "betas": (0.9, 0.95)})  # what the resume trained with before
    old.load_state_dict(copy.deepcopy(saved))
    for engine in (b, old):
        engine.train_step(3, _micro(x, y, 96, 32, 8))
    assert not all(torch.equal(pb, po) for pb, po in zip(b.model.parameters(), old.model.parameters()))


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_reduced_precision_steps_on_cpu(precision):
    x, y = _data()
    e, full = _engine(precision=precision), _engine()  # the same initial weights (one seed)
    before = [p.detach().clone() for p in e.model.parameters()]
    stats, ref = e.train_step(0, _micro(x, y, 0, 32, 8)), full.train_step(0, _micro(x, y, 0, 32, 8))
    assert e.dtype != torch.float32 and stats.finite and stats.samples == 32
    # the same loss as fp32 to the reduced precision's rounding, and a step taken
    assert stats.loss_sum == pytest.approx(ref.loss_sum, rel=0.02) and stats.loss_sum != ref.loss_sum
    assert any(not torch.equal(b, p) for b, p in zip(before, e.model.parameters()))


def test_nonfinite_loss_is_reported_and_not_applied():
    x, y = _data()
    e = _engine()
    before = [p.clone() for p in e.model.parameters()]
    bad = _micro(x, y, 0, 32, 8)
    bad[1]["x"] = bad[1]["x"] * float("nan")
    stats = e.train_step(0, bad)
    assert not stats.finite
    assert all(torch.equal(p0, p1) for p0, p1 in zip(before, e.model.parameters()))


def test_lr_schedule_is_a_function_of_the_step():
    s = ScheduleConfig(name="cosine", warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(0, 1.0, s, 110) == pytest.approx(0.1)
    assert lr_at(9, 1.0, s, 110) == pytest.approx(1.0)
    assert lr_at(60, 1.0, s, 110) == pytest.approx(0.55)
    assert lr_at(110, 1.0, s, 110) == pytest.approx(0.1)
    assert lr_at(50, 1.0, ScheduleConfig(name="linear"), 100) == pytest.approx(0.55)
    # the floor is a ratio of the LR (at a base LR of 1.0, a floor of 0.1 itself passed as well)
    assert lr_at(110, 3e-4, s, 110) == pytest.approx(3e-5) and lr_at(0, 3e-4, s, 110) == pytest.approx(3e-5)


def test_the_engine_trains_at_the_lr_its_resize_factor_scales():
    """`elastic.on_resize: scale_lr` hands the engine an LR factor; a mutant that dropped it lived (only
    integration tests ran it)."""
    cfg = TrainConfig(global_batch_size=8, micro_batch_size=8)
    engine = Engine(MLP(8, 8, 1, 2), Classification(), cfg, device=torch.device("cpu"), lr_factor=0.5)
    stats = engine.train_step(3, [{"x": torch.randn(8, 8), "y": torch.randint(0, 2, (8,))}])
    want = lr_at(3, cfg.optimizer.lr * 0.5, cfg.schedule, cfg.max_steps)
    assert stats.lr == pytest.approx(want) and engine.optimizer.param_groups[0]["lr"] == pytest.approx(want)


def test_gpt_language_modeling_step():
    torch.manual_seed(0)
    cfg = TrainConfig(global_batch_size=4, micro_batch_size=2, max_steps=10, optimizer={"lr": 3e-3})
    model = GPT(vocab_size=16, block_size=8, dim=32, depth=1, heads=2)
    e = Engine(model, LanguageModeling(), cfg)
    tokens = torch.arange(36).remainder(16).view(4, 9)  # a learnable cyclic sequence
    losses = [e.train_step(s, [{"x": tokens[:2]}, {"x": tokens[2:]}]).loss_sum / 4 for s in range(30)]
    assert losses[-1] < 0.5 * losses[0] and model.flops_per_token() > 0


def test_cpu_settings_pin_threads_and_flush_subnormals():
    threads = torch.get_num_threads()  # (flushing is off in a fresh process, and put back off below)
    tiny = torch.tensor([1e-39])  # subnormal in float32
    try:
        configure_process(TrainConfig(global_batch_size=8, micro_batch_size=8, max_steps=1), cpus=1)
        assert torch.get_num_threads() == 1
        if torch.set_flush_denormal(True):  # the CPU supports it (x86 with SSE3)
            assert (tiny * 1.0).item() == 0.0
        configure_process(TrainConfig(global_batch_size=8, micro_batch_size=8, max_steps=1, threads_per_worker=2,
                                  flush_denormal=False), cpus=1)
        assert torch.get_num_threads() == 2 and (tiny * 1.0).item() > 0.0
    finally:
        torch.set_num_threads(threads)
        torch.set_flush_denormal(False)


def test_deterministic_kernels_follow_the_config_and_train_the_same_on_a_cpu(monkeypatch):
    """`train.deterministic`: torch's deterministic kernels, cuDNN's without benchmarking and cuBLAS's fixed
    workspace (set as the worker starts), off again with the config; the gpt trains under them on a CPU,
    bit for bit as without (a CPU's kernels are deterministic already)."""
    from openclaw.engine.device import CUBLAS_WORKSPACE, set_deterministic
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    threads = torch.get_num_threads()

    def run(deterministic: bool) -> list[float]:
        cfg = TrainConfig(global_batch_size=4, micro_batch_size=2, max_steps=3, threads_per_worker=1,
                          deterministic=deterministic, flush_denormal=False)
        configure_process(cfg, cpus=1)
        torch.manual_seed(0)
        e = Engine(GPT(vocab_size=16, block_size=8, dim=16, depth=2, heads=2, dropout=0.1), LanguageModeling(), cfg)
        tokens = torch.arange(36).remainder(16).view(4, 9)
        return [e.train_step(s, [{"x": tokens[:2]}, {"x": tokens[2:]}], seeds=[s, s + 1]).grad_norm for s in range(3)]
    try:
        on = run(True)
        assert torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.deterministic
        assert not torch.backends.cudnn.benchmark and os.environ["CUBLAS_WORKSPACE_CONFIG"] == CUBLAS_WORKSPACE
        off = run(False)
        assert not torch.are_deterministic_algorithms_enabled() and not torch.backends.cudnn.deterministic
        assert on == off
    finally:
        set_deterministic(False)
        torch.set_num_threads(threads)


def test_a_step_takes_one_seed_per_micro_batch_or_none():
    """A pipeline's chunks take their seeds from each micro-batch's: too few seeds failed deep in it."""
    engine = Engine(MLP(in_features=4, hidden=8, depth=1, num_classes=2), Classification(),
                    TrainConfig(global_batch_size=4, micro_batch_size=2, max_steps=1))
    batch = {"x": torch.zeros(2, 4), "y": torch.zeros(2, dtype=torch.long)}
    with pytest.raises(ValueError, match="1 seeds for 2 micro-batches: give one each, or none"):
        engine.train_step(0, [batch, batch], seeds=[7])
    assert engine.train_step(0, [batch, batch], seeds=[7, 8]).samples == 4


def test_a_builtin_models_kwargs_are_checked_by_name_type_and_range():
    """Each key named and what it takes, where the constructor failed on its own arithmetic (`'abc' % 4`:
    "not all arguments converted during string formatting"; heads 0: a division by zero) or built a
    model nothing could train. A depth of 0 and a dropout of 0 are fine."""
    from openclaw.engine.models import build_model
    from openclaw.errors import ConfigError
    cases = {("gpt", "dim", "abc"): r"`model.kwargs.dim` must be an integer \(got 'abc'\)",
             ("gpt", "heads", 0): r"`model.kwargs.heads` must be at least 1 \(got 0\)",
             ("gpt", "depth", -1): r"`model.kwargs.depth` must be at least 0 \(got -1\)",
             ("gpt", "block_size", 2.5): r"`model.kwargs.block_size` must be an integer \(got 2.5\)",
             ("mlp", "dropout", 1.0): r"`model.kwargs.dropout` must be in \[0, 1\) \(got 1.0\)",
             ("mlp", "dropout", "x"): r"`model.kwargs.dropout` must be a number \(got 'x'\)",
             ("mlp", "hidden", True): r"`model.kwargs.hidden` must be an integer \(got True\)",
             ("mlp", "widht", 3): r"`model.kwargs.widht` is not an argument of the built-in 'mlp', which takes "
                                  r"in_features, hidden, depth, num_classes, dropout\."}
    for (name, key, value), message in cases.items():
        with pytest.raises(ConfigError, match=message):
            build_model(name, {key: value})
    assert len(build_model("gpt", {"depth": 0, "dropout": 0}).blocks) == 0
    assert build_model("mlp", {"dropout": 0.5, "hidden": 8}).net[0].out_features == 8


def test_a_rollback_keeps_the_attempt_that_runs_and_takes_the_training_back():
    """The checkpoint came from an earlier attempt at another world size: the rollback once set the state
    back to that attempt's world size and count, and the next checkpoint's events named them."""
    earlier = TrainState(step=100, world_size=4, attempt=1, micro_batch_size=16, micro_batch_key="old",
                         overflow_steps=3, loss_window=[1.0, 2.0])
    now = TrainState(step=160, world_size=2, attempt=2, micro_batch_size=8, micro_batch_key="new", overflow_steps=5)
    now.roll_back_to(earlier.state_dict())
    assert (now.step, now.overflow_steps, now.loss_window) == (100, 3, [1.0, 2.0])
    assert (now.world_size, now.attempt, now.micro_batch_size, now.micro_batch_key) == (2, 2, 8, "new")


def test_a_resume_and_a_rollback_keep_the_mlflow_run_this_session_tracks_to():
    """A run deleted in MLflow is replaced by a new one when the job resumes; the restore then set the
    train state back to the deleted run's id, and every later checkpoint (and export) named it."""
    saved = TrainState(step=100, attempt=3, mlflow_run_id="deleted", shard_layout="old").state_dict()
    resumed = TrainState(mlflow_run_id="new", shard_layout="now")  # (a layout that differs was refused before)
    resumed.resume_from(saved)
    assert (resumed.step, resumed.attempt, resumed.mlflow_run_id, resumed.shard_layout) == (100, 3, "new", "now")
    resumed.roll_back_to(saved)
    assert (resumed.step, resumed.mlflow_run_id) == (100, "new")
    untracked = TrainState()  # `tracking.enabled: false`: the checkpoint's run is the only one known
    untracked.resume_from(saved)
    assert untracked.mlflow_run_id == "deleted"


def test_each_step_seeds_torch_python_and_numpy_alike_whatever_was_drawn_before():
    """Only torch was seeded: a user's task or model drawing from `random` or numpy's global generator
    drew differently after every restart."""
    import random

    import numpy as np

    from openclaw.engine.state import seed_step

    def draws():
        return torch.rand(2).tolist(), random.random(), np.random.rand(2).tolist()
    seed_step(7, 42, 1)
    first = draws()
    draws(), random.random(), np.random.rand(5)  # what a restart's earlier steps would have drawn
    seed_step(7, 42, 1)
    assert draws() == first
    seed_step(7, 43, 1)
    assert all(a != b for a, b in zip(draws(), first))
