"""Precision and FLOPs decisions as pure functions: every row of the precision table, the GPU peak table
matched on whole names, and the FLOP counter against the analytic 6N for the gpt (CPU only)."""
import pytest
import torch

from openclaw.engine.engine import Engine
from openclaw.engine.config import TrainConfig
from openclaw.engine.flops import gpu_model, mfu, peak_flops, training_flops
from openclaw.engine.metrics import StepClock
from openclaw.engine.models import GPT, MLP
from openclaw.engine.precision import DeviceFacts, choose_precision
from openclaw.engine.tasks import Classification, LanguageModeling
from openclaw.runtime.policies import SwitchPrecision

H100, V100, T4, P100 = DeviceFacts("cuda", (9, 0), True), DeviceFacts("cuda", (7, 0)), DeviceFacts("cuda", (7, 5)), \
    DeviceFacts("cuda", (6, 0))
CPU = DeviceFacts("cpu")


@pytest.mark.parametrize("asked,facts,name,scaler,tf32", [
    ("auto", H100, "bf16", False, True),
    ("auto", DeviceFacts("cuda", (8, 0), True), "bf16", False, True),   # A100
    ("auto", V100, "fp16", True, False),
    ("auto", T4, "fp16", True, False),
    ("auto", P100, "fp32", False, False),
    ("auto", CPU, "fp32", False, False),
    ("bf16", V100, "fp16", True, False),    # the nearest the device has
    ("bf16", H100, "bf16", False, True),
    ("bf16", CPU, "bf16", False, False),
    ("fp16", H100, "fp16", True, False),
    ("fp16", CPU, "fp16", True, False),
    ("fp32", H100, "fp32", False, True),     # TF32 matmuls on Ampere and later
    ("fp32", V100, "fp32", False, False),
    ("fp32", CPU, "fp32", False, False),
])
def test_every_row_of_the_precision_table(asked, facts, name, scaler, tf32):
    p = choose_precision(asked, facts)
    assert (p.name, p.scaler, p.tf32) == (name, scaler, tf32)
    assert p.reason and (asked in p.reason)


def test_tf32_false_keeps_fp32_matmuls_exact_and_the_reason_says_where():
    assert not choose_precision("fp32", H100, tf32=False).tf32
    assert not choose_precision("auto", H100, tf32=False).tf32
    assert "compute capability 7.0" in choose_precision("auto", V100).reason
    assert "CPU" in choose_precision("auto", CPU).reason


@pytest.mark.parametrize("name,model", [
    ("NVIDIA H100 80GB HBM3", "H100 SXM"), ("NVIDIA H100 PCIe", "H100 PCIe"), ("NVIDIA H100 NVL", "H100 NVL"),
    ("NVIDIA H200", "H200"), ("NVIDIA H200 NVL", "H200 NVL"), ("NVIDIA GH200 480GB", "H100 SXM"),
    ("NVIDIA A100-SXM4-80GB", "A100"), ("NVIDIA A100-PCIE-40GB", "A100"), ("NVIDIA L40S", "L40S"),
    ("NVIDIA L4", "L4"), ("NVIDIA A10G", "A10G"), ("Tesla V100-SXM2-32GB", "V100 SXM2"),
    ("Tesla V100-PCIE-16GB", "V100 PCIe"), ("Tesla T4", "T4"),
    ("NVIDIA L40", None), ("NVIDIA A10", None), ("NVIDIA GeForce RTX 4090", None), ("NVIDIA A40", None),
])
def test_gpu_names_match_whole_models_only(name, model):
    assert gpu_model(name) == model


def test_the_peak_is_the_one_of_the_precision_in_use():
    h100 = "NVIDIA H100 80GB HBM3"
    assert peak_flops(h100, "bf16") == peak_flops(h100, "fp16") == 989e12
    assert peak_flops(h100, "fp8") == 1979e12
    assert peak_flops(h100, "fp32", tf32=True) == 494.5e12
    assert peak_flops(h100, "fp32") == 66.9e12
    assert peak_flops("Tesla V100-SXM2-32GB", "fp32", tf32=True) == 15.7e12  # no TF32 on Volta
    assert peak_flops("Tesla T4", "fp8") is None and peak_flops("NVIDIA L40", "bf16") is None
    assert mfu(494.5e12, 989e12, 1) == 0.5 and mfu(1e12, None, 1) is None


def test_the_flop_counter_is_within_10_percent_of_6n_for_the_gpt():
    model = GPT(vocab_size=256, block_size=64, dim=128, depth=4, heads=4)
    x = torch.randint(0, 256, (8, 65))
    flops = training_flops(model, LanguageModeling().loss, {"x": x})
    tokens = 8 * 64
    # N: the parameters a token's matmuls use; the position table is a lookup, and the tied token table
    # is counted once (parameters() lists it once), as the head's matmul.
    n = sum(p.numel() for p in model.parameters()) - model.pos.weight.numel()
    assert abs(flops / tokens - 6 * n) / (6 * n) < 0.10
    assert all(p.grad is None for p in model.parameters())  # counting leaves no gradient behind


def test_the_flop_counter_counts_on_the_meta_device_and_for_any_model():
    with torch.device("meta"):
        model = MLP(in_features=64, hidden=32, depth=2, num_classes=10)
    batch = {"x": torch.zeros(4, 64, device="meta"), "y": torch.zeros(4, dtype=torch.long, device="meta")}
    # forward 2*B*(64*32 + 32*32 + 32*10), backward twice that (the first layer's input needs no gradient)
    fwd = 2 * 4 * (64 * 32 + 32 * 32 + 32 * 10)
    assert training_flops(model, Classification().loss, batch) == fwd + 2 * fwd - 2 * 4 * 64 * 32


def test_flops_per_s_on_every_device_and_mfu_only_with_a_peak():
    clock = StepClock()
    clock.add_step(data_s=0.0, compute_s=2.0)
    cpu = clock.window(samples=100, tokens_per_sample=None, flops_per_sample=1e9, peak=None, world=2)
    assert cpu["perf/flops_per_s"] == pytest.approx(50 * 1e9) and "perf/mfu" not in cpu
    gpu = clock.window(samples=100, tokens_per_sample=None, flops_per_sample=1e9, peak=1e11, world=2)
    assert gpu["perf/mfu"] == pytest.approx(50e9 / 2e11)


def test_the_engine_trains_in_the_decided_precision_with_a_scaler_only_for_fp16():
    torch.manual_seed(0)
    cfg = TrainConfig(global_batch_size=8, micro_batch_size=8, precision="fp16")
    engine = Engine(MLP(in_features=8, hidden=8, depth=1, num_classes=2), Classification(), cfg,
                    device=torch.device("cpu"))
    assert engine.precision.name == "fp16" and engine.scaler.is_enabled() and engine.dtype == torch.float16
    auto = Engine(MLP(in_features=8, hidden=8, depth=1, num_classes=2), Classification(),
                  TrainConfig(global_batch_size=8, micro_batch_size=8), device=torch.device("cpu"))
    assert auto.precision.name == "fp32" and not auto.scaler.is_enabled()


def test_fp8_on_cpu_workers_is_a_config_error_that_names_the_key():
    from openclaw.config import load_config
    from openclaw.errors import ConfigError
    with pytest.raises(ConfigError, match=r"`train.precision: fp8` needs GPU workers.*`scaling.use_gpu`"):
        load_config(None, ["data.train=/x", "train.precision=fp8", "scaling.use_gpu=false"])
    assert load_config(None, ["data.train=/x", "train.precision=fp8"]).train.precision == "fp8"  # GPUs may come


def test_the_precision_policy_switches_an_unstable_fp16_run_to_the_next_safer_precision():
    from openclaw.runtime.policies import precision_decision
    limits = dict(window_steps=10, max_overflow_frac=0.3, min_scale=1.0)
    calm = [False] * 7 + [True] * 3                       # 3 of 10: not more than 30%
    assert precision_decision("fp16", calm, None, bf16_ok=True, **limits) is None
    assert precision_decision("fp16", [True] * 9, None, bf16_ok=True, **limits) is None  # the window is not full
    stormy = precision_decision("fp16", calm + [True], None, bf16_ok=True, **limits)  # 4 of the last 10
    assert stormy.to == "bf16" and "4 of the last 10" in stormy.cause and "max_overflow_frac" in stormy.cause
    assert precision_decision("fp16", calm + [True], None, bf16_ok=False, **limits).to == "fp32"
    collapsed = precision_decision("fp16", [True], 0.5, bf16_ok=True, **limits)
    assert collapsed.to == "bf16" and "min_scale" in collapsed.cause
    assert precision_decision("bf16", [True] * 10, 0.5, bf16_ok=True, **limits) is None


def test_an_fp16_overflow_skips_the_update_lowers_the_scale_and_is_not_a_nonfinite_step():
    torch.manual_seed(0)
    cfg = TrainConfig(global_batch_size=8, micro_batch_size=8, precision="fp16", amp={"init_scale": 2.0 ** 40})
    engine = Engine(MLP(in_features=8, hidden=8, depth=1, num_classes=2), Classification(), cfg,
                    device=torch.device("cpu"))
    before = {k: v.clone() for k, v in engine.module.state_dict().items()}
    stats = engine.train_step(0, [{"x": torch.randn(8, 8), "y": torch.randint(0, 2, (8,))}])
    assert stats.overflow and stats.finite and engine.loss_scale() == 2.0 ** 39
    assert all(torch.equal(before[k], v) for k, v in engine.module.state_dict().items())  # no update applied
    engine.set_precision(choose_precision("bf16", CPU))
    assert engine.dtype == torch.bfloat16 and not engine.scaler.is_enabled() and engine.fns.scaler is engine.scaler
    assert not engine.train_step(1, [{"x": torch.randn(8, 8), "y": torch.randint(0, 2, (8,))}]).overflow


def test_bf16_switches_to_fp32_once_a_nonfinite_loss_recurs_after_a_rollback():
    from openclaw.runtime.policies import rollback_precision_decision
    assert rollback_precision_decision("bf16", 1, 2) is None  # one rollback: the replay skips the batch
    switch = rollback_precision_decision("bf16", 2, 2)
    assert switch.to == "fp32" and "bf16_max_rollbacks" in switch.cause
    assert rollback_precision_decision("bf16", 5, 0) is None  # 0: never
    assert rollback_precision_decision("fp32", 5, 2) is None and rollback_precision_decision("fp16", 5, 2) is None


class _Quiet:
    """A tracker that keeps what a precision watch says."""

    def __init__(self):
        self.said = []

    def progress(self, item):
        self.said.append(item.get("message", ""))

    def event(self, *args, **kwargs): ...

    def params(self, *args, **kwargs): ...


def _fp16_watch(state):
    from openclaw.runtime.precision_watch import PrecisionWatch
    cfg = TrainConfig(global_batch_size=8, micro_batch_size=8, precision="fp16",
                      amp={"window_steps": 50, "max_overflow_frac": 0.25})
    engine = Engine(MLP(in_features=8, hidden=8, depth=1, num_classes=2), Classification(), cfg,
                    device=torch.device("cpu"))
    return PrecisionWatch(engine, state, _Quiet(), cfg, torch.device("cpu")), engine


def _decides_at(watch, first: int) -> int | None:
    """The step whose overflow makes `watch` decide to switch: one step in three overflows from step 90."""
    for step in range(first, 400):
        watch.after_step(step, step % 3 == 0 and step >= 90)
        if watch.pending:
            return step
    return None


def test_a_resumed_fp16_run_decides_its_switch_at_the_step_the_uninterrupted_run_does():
    """The switch policy's window of the last 50 steps is in the train state: a run resumed from the
    checkpoint at step 125 once started it empty and decided at step 174, not at 126."""
    from openclaw.engine.state import TrainState
    state = TrainState()
    uninterrupted = _decides_at(_fp16_watch(state)[0], 0)
    saved = TrainState()
    watch, _ = _fp16_watch(saved)
    for step in range(125):
        watch.after_step(step, step % 3 == 0 and step >= 90)
    resumed = TrainState()
    resumed.load_state_dict(saved.state_dict())
    assert uninterrupted == 126 and _decides_at(_fp16_watch(resumed)[0], 125) == uninterrupted


def test_a_rollback_past_a_switch_trains_in_the_recorded_precision_with_the_checkpoints_scale():
    """A switch to bf16 made after the checkpoint the rollback restores is undone (the replay makes it
    again where it decides), and the engine takes the checkpoint's loss scale: an engine in bf16 could
    not hold it."""
    from openclaw.engine.state import TrainState
    state = TrainState(precision="fp16")
    watch, engine = _fp16_watch(state)
    engine.scaler.scale(torch.ones(()))  # the scale is made at its first use
    checkpoint = {"state": state.state_dict(), "scaler": {**engine.scaler.state_dict(), "scale": 1024.0}}
    watch.pending = SwitchPrecision("bf16", "test")
    watch.at_checkpoint()
    assert engine.precision.name == "bf16" and state.precision == "bf16"
    state.load_state_dict(checkpoint["state"])  # the rollback restores the older state
    watch.pending = SwitchPrecision("bf16", "a decision of the steps rolled back")
    watch.restored(checkpoint["scaler"])
    assert engine.precision.name == "fp16" and engine.loss_scale() == 1024.0 and watch.pending is None


A100 = DeviceFacts("cuda", (8, 0), True)


def test_ranks_on_mixed_devices_train_in_the_least_capable_ranks_precision():
    """64 ranks: H100s (fp8 under `fp8: auto`), A100s (bf16) and one V100 (fp16 with a scaler): every rank
    trains in fp16, each with its own scaler, and says why; with no V100, bf16 everywhere, fp8 nowhere."""
    from openclaw.engine.precision import common_precision
    facts = [H100] * 32 + [A100] * 31 + [V100]
    mine = [choose_precision("auto", f, fp8="auto") for f in facts]
    assert {m.name for m in mine} == {"fp8", "bf16", "fp16"}
    agreed = [common_precision(m, [x.name for x in mine], f) for m, f in zip(mine, facts)]
    assert {(a.name, a.scaler) for a in agreed} == {("fp16", True)}
    assert "least capable worker's precision" in agreed[0].reason and "alone would train in fp8" in agreed[0].reason
    assert agreed[-1] is mine[-1]  # the V100's own choice, as it was
    without = [common_precision(m, [x.name for x in mine[:63]], f) for m, f in zip(mine[:63], facts[:63])]
    assert {a.name for a in without} == {"bf16"}


def _agreed_on(rank: int, world: int) -> tuple[str, bool]:
    from openclaw.runtime.precision_watch import agree_on_precision
    facts = A100 if rank == 0 else V100
    p = agree_on_precision(choose_precision("auto", facts), facts, True, torch.device("cpu"), world)
    return p.name, p.scaler


def test_the_ranks_agree_on_one_precision_in_one_all_gather():
    from parallel_harness import spawn
    assert spawn(2, _agreed_on) == [("fp16", True)] * 2


def test_a_start_over_brings_back_the_loss_scale_the_run_began_with():
    """A rollback before the first checkpoint restored the initial weights and a fresh optimizer but kept
    the scaler's lowered scale and the overflow count: the replay was not the run from its start."""
    from openclaw.engine.state import TrainState
    torch.manual_seed(0)
    cfg = TrainConfig(global_batch_size=8, micro_batch_size=8, precision="fp16", amp={"init_scale": 2.0 ** 40})
    engine = Engine(MLP(in_features=8, hidden=8, depth=1, num_classes=2), Classification(), cfg,
                    device=torch.device("cpu"))
    initial = {k: v.clone() for k, v in engine.module.state_dict().items()}
    assert engine.train_step(0, [{"x": torch.randn(8, 8), "y": torch.randint(0, 2, (8,))}]).overflow
    assert engine.loss_scale() == 2.0 ** 39
    state = TrainState(step=1)
    state.overflow_steps, state.overflow_window = 1, [1]
    engine.start_over(initial)
    state.start_over()
    assert engine.loss_scale() == 2.0 ** 40 and engine.fns.scaler is engine.scaler
    assert (state.step, state.overflow_steps, state.overflow_window) == (0, 0, [])


def test_an_fp16_scale_at_its_floor_is_no_reason_to_switch():
    """The switch is for a scale below `train.amp.min_scale`: scales are powers of two, and one exactly at
    the floor (1.0 by default) switched the run a step early."""
    from openclaw.runtime.policies import precision_decision
    assert precision_decision("fp16", [], 1.0, bf16_ok=True, window_steps=10, max_overflow_frac=0.3,
                              min_scale=1.0) is None
    assert isinstance(precision_decision("fp16", [], 0.5, bf16_ok=True, window_steps=10, max_overflow_frac=0.3,
                                         min_scale=1.0), SwitchPrecision)
