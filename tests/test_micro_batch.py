"""`train.micro_batch_size: auto`: the memory estimate and the chooser at topologies we cannot run (64
ranks, FSDP 4 x 4 x 4), the out-of-memory back-off with a real function, the saved-tensor activation
measure on real models, the ranks' agreement in a real gloo group, and one 2-worker digits run on a
real local Ray instance that resumes with the size it chose."""
import json
import math

import pytest
import torch

from conftest import digits_config
from openclaw.engine.memory import (MicroBatchChoice, choose_micro_batch, confirm_micro_batch, fake_tensors,
                                    gathered_bytes, micro_batch_sizes, per_sample_bytes, probes_whole,
                                    saved_activation_bytes, state_bytes_estimate)
from openclaw.engine.parallel.mesh import mesh_layout
from openclaw.errors import ConfigError, MemoryBudgetError
from openclaw.runtime.policies import batch_plan, micro_batch_dp_sizes
from parallel_harness import spawn

MB = 1_000_000


# ---- the sizes every allowed world size divides ---------------------------------------------------

def test_sizes_divide_every_allowed_world_up_to_64_ranks_and_the_batch_plan_agrees():
    dp_sizes = micro_batch_dp_sizes("keep_global_batch", [62, 63, 64], 1)
    assert dp_sizes == [62, 63, 64]
    global_batch = 2 * math.lcm(62, 63, 64)  # 249,984: shares of 4032, 3968 and 3906 samples
    sizes = micro_batch_sizes(global_batch, dp_sizes)
    assert sizes == [1, 2]  # gcd(4032, 3968, 3906) = 2
    for world in range(62, 65):
        for m in sizes:
            plan = batch_plan("keep_global_batch", "linear", global_batch, m, 64, world)
            assert plan.accumulation * m * world == global_batch
    # scale_lr: each worker keeps its batch at max_workers, so only 64 ranks must divide
    assert micro_batch_dp_sizes("scale_lr", list(range(32, 65)), 1) == [64]
    assert micro_batch_sizes(4096, [64]) == [1, 2, 4, 8, 16, 32, 64]
    # 64 ranks as replicate 4 x shard 4 x tensor 4: 16 data-parallel ranks share the batch
    assert micro_batch_dp_sizes("keep_global_batch", [64], 4) == [16]
    assert micro_batch_sizes(1024, [16])[-1] == 64
    with pytest.raises(ValueError, match="does not divide over 63"):
        micro_batch_sizes(4096, [64, 63])


def test_the_config_accepts_auto_and_checks_only_that_the_batch_divides_over_the_ranks(digits_dir, tmp_path):
    cfg = digits_config(digits_dir, tmp_path, "sqlite:///x.db", **{"train.micro_batch_size": "auto",
                                                                   "train.memory_budget_gb": 0.5})
    assert cfg.train.micro_batch_size == "auto" and cfg.train.memory_budget_gb == 0.5
    with pytest.raises(ConfigError, match=r"`train.micro_batch_size` must be a positive integer or `auto` \(got 0\)"):
        digits_config(digits_dir, tmp_path, "sqlite:///x.db", **{"train.micro_batch_size": 0})
    with pytest.raises(ConfigError, match=r"`train.memory_budget_gb`"):
        digits_config(digits_dir, tmp_path, "sqlite:///x.db", **{"train.memory_budget_gb": -1})
    with pytest.raises(ConfigError, match="world size 3"):  # 64 samples do not share out over 3 workers
        digits_config(digits_dir, tmp_path, "sqlite:///x.db", **{"train.micro_batch_size": "auto",
                                                                 "scaling.min_workers": 2, "scaling.max_workers": 4})


# ---- the training state each rank holds -------------------------------------------------------------

def test_one_memory_budget_for_the_auto_micro_batch_and_the_logged_capacity(digits_dir, tmp_path):
    """`train.memory_budget_gb` caps what a worker may fill, the same for the auto micro-batch's budget and
    for `perf/memory_capacity_bytes` (which the memory advice compares the peak with)."""
    import psutil

    from openclaw.engine.metrics import memory_capacity_bytes
    from openclaw.runtime.micro_batch_probe import budget_bytes
    cpu, share = torch.device("cpu"), psutil.virtual_memory().total // 2
    for gb, expected in ((0.5, 500_000_000), (10 * share / 1e9, share), (None, share)):
        cfg = digits_config(digits_dir, tmp_path, "sqlite:///x.db", **{"train.memory_budget_gb": gb})
        assert memory_capacity_bytes(cpu, 2, gb) == budget_bytes(cfg, cpu, 2)[0] == expected


def test_state_estimate_shards_under_fsdp_tp_and_pp_and_grows_in_16_bit():
    n = 1_000_000
    one = state_bytes_estimate(n, mesh_layout(1), replicated=True)
    assert (one.params, one.grads, one.optimizer, one.extra) == (4 * n, 4 * n, 8 * n, 0)  # AdamW: 2 fp32 states
    ddp = state_bytes_estimate(n, mesh_layout(64, replicate=64), replicated=True)
    assert ddp.total == 20 * n  # the whole model on every rank, and DDP's buckets (a second copy of the grads)
    fsdp = state_bytes_estimate(n, mesh_layout(64, replicate=4, tensor=4), replicated=False)  # 4 x 4 x 4
    assert fsdp.params == 4 * math.ceil(n / 16) and fsdp.total == 16 * math.ceil(n / 16)
    tp = state_bytes_estimate(n, mesh_layout(4, replicate=1, tensor=4), replicated=False)
    assert tp.total == 16 * n // 4
    pp = state_bytes_estimate(n, mesh_layout(64, replicate=1, pipeline=4), replicated=False)  # 16 shards x 4 stages
    assert pp.total == 16 * math.ceil(n / 64)
    # the parameters the busiest pipeline rank holds (`pipeline_rank_params`), split by TP, sharded by FSDP
    uneven = state_bytes_estimate(n, mesh_layout(64, replicate=1, tensor=2, pipeline=4), replicated=False,
                                  stage_params=n // 2)
    assert uneven.total == 16 * math.ceil(n / 2 / 2 / 8)
    bf16 = state_bytes_estimate(n, mesh_layout(1), replicated=True, precision="bf16")
    assert bf16.total - one.total == 2 * n  # a bf16 copy of the weights
    sgd = state_bytes_estimate(n, mesh_layout(1), replicated=True, optimizer="sgd", momentum=0.0)
    assert sgd.optimizer == 0


def test_a_pipeline_ranks_parameters_are_its_blocks_and_the_ends_it_holds():
    """The gpt on the meta device: a block's parameters, the embeddings (token and position) on the first
    stage, the final norm and the head on the last; the head is the token embedding's matrix, held by
    both. Rank r of `pipeline` runs stages r, r + pipeline, ... (interleaved 1F1B: two)."""
    from openclaw.engine.models import build_model
    from openclaw.engine.parallel.layout_checks import pipeline_rank_params
    with torch.device("meta"):
        gpt = build_model("gpt", {"vocab_size": 1000, "block_size": 64, "dim": 32, "depth": 6, "heads": 4})
    block = sum(p.numel() for p in gpt.blocks["0"].parameters())
    tok, pos, ln = gpt.tok.weight.numel(), gpt.pos.weight.numel(), sum(p.numel() for p in gpt.ln.parameters())
    assert gpt.head.weight is gpt.tok.weight and tok == 32_000
    assert sum(pipeline_rank_params(gpt, 1)) == sum(p.numel() for p in gpt.parameters())
    assert pipeline_rank_params(gpt, 2) == [3 * block + tok + pos, 3 * block + ln + tok]
    assert pipeline_rank_params(gpt, 2, [5, 1]) == [5 * block + tok + pos, block + ln + tok]
    # interleaved: stages 0 and 2 on rank 0, 1 and 3 (the last) on rank 1
    assert pipeline_rank_params(gpt, 2, [1, 1, 1, 3], 2) == [2 * block + tok + pos, 4 * block + ln + tok]
    # and split evenly, [2, 2, 1, 1]: 3 blocks each (rank 0 does not run stages 0 and 1, 4 blocks)
    assert pipeline_rank_params(gpt, 2, stages_per_rank=2) == [3 * block + tok + pos, 3 * block + ln + tok]
    # the even spread the estimate used before (a third of all) is far below what the busiest rank holds
    assert max(pipeline_rank_params(gpt, 3)) > sum(p.numel() for p in gpt.parameters()) / 3 * 1.5


def test_fsdp_holds_its_largest_unit_gathered_beside_the_shards():
    n = 1_000_000  # one unit's parameters: gathered for its forward and the next one's prefetched, then its grads
    assert gathered_bytes(n, mesh_layout(8, replicate=1)) == n * (2 * 4 + 4)
    assert gathered_bytes(n, mesh_layout(8, replicate=1), "bf16") == n * (2 * 2 + 4)  # gathered in bf16
    assert gathered_bytes(n, mesh_layout(8, replicate=1), "fp16") == n * (2 * 4 + 4)  # fp16 keeps fp32 parameters
    assert gathered_bytes(n, mesh_layout(64, replicate=4, tensor=4)) == n // 4 * 12  # TP splits the block
    assert gathered_bytes(n, mesh_layout(8, replicate=8)) == 0  # one shard: nothing is gathered (DDP, or HSDP of 1)


def test_the_probe_adds_the_largest_unit_fsdp_gathers_to_the_fixed_state():
    from openclaw import load_config
    from openclaw.engine.models import GPT
    from openclaw.engine.precision import Precision
    from openclaw.engine.tasks import LanguageModeling
    from openclaw.runtime.micro_batch_probe import _ProbeStep, fixed_bytes
    kwargs = {"vocab_size": 4096, "block_size": 32, "dim": 64, "depth": 2, "heads": 4}
    fp32 = Precision("fp32", False, False, "")

    def cfg(strategy: str, **more):
        return load_config(None, {"data.train": "x", "data.features": "x", "data.label": None, "task": "language_modeling",
                                  "model.name": "gpt", "model.kwargs": kwargs, "parallelism.strategy": strategy,
                                  "scaling.min_workers": 2, "scaling.max_workers": 2, **more})
    step = _ProbeStep(cfg("fsdp"), LanguageModeling(), None, torch.device("cpu"), fp32, fake=True)
    gpt = GPT(**kwargs)
    block = sum(p.numel() for p in gpt.blocks["0"].parameters())
    # the root's embeddings and head (4096 x 64, tied) outweigh a block of dim 64: the root is the largest unit
    assert step.num_params == sum(p.numel() for p in gpt.parameters()) and step.largest_unit == step.num_params - 2 * block
    sharded = state_bytes_estimate(step.num_params, mesh_layout(2, replicate=1), replicated=False).total
    assert fixed_bytes(cfg("fsdp"), step, fp32) == sharded + 12 * step.largest_unit
    whole = state_bytes_estimate(step.num_params, mesh_layout(2, replicate=2), replicated=True).total
    assert fixed_bytes(cfg("ddp"), step, fp32) == whole  # DDP gathers nothing
    # 2 pipeline stages: a rank holds its block and its ends, the tied embedding and head on both
    piped = cfg("ddp", **{"parallelism.pipeline": 2})
    step = _ProbeStep(piped, LanguageModeling(), None, torch.device("cpu"), fp32, fake=True)
    busiest = block + gpt.tok.weight.numel() + max(gpt.pos.weight.numel(), sum(p.numel() for p in gpt.ln.parameters()))
    assert step.stage_params == busiest > step.num_params / 2
    assert fixed_bytes(piped, step, fp32) == 16 * busiest  # AdamW: 4 fp32 copies, nothing sharded or gathered


def test_state_estimate_matches_what_a_real_engine_holds():
    from openclaw.engine.config import TrainConfig
    from openclaw.engine.engine import Engine
    from openclaw.engine.models import MLP
    from openclaw.engine.tasks import Classification
    torch.manual_seed(0)
    model = MLP(64, 128, 2, 10)
    n = sum(p.numel() for p in model.parameters())
    engine = Engine(model, Classification(), TrainConfig(global_batch_size=8, micro_batch_size=8))
    engine.train_step(0, [{"x": torch.rand(8, 64), "y": torch.randint(0, 10, (8,))}])
    est = state_bytes_estimate(n, mesh_layout(1), replicated=True)
    measured = engine.state_bytes
    # Adam's step counters (one scalar per parameter tensor) are the only bytes the estimate leaves out
    assert (measured["params"], measured["grads"]) == (est.params, est.grads)
    assert 0 <= measured["optimizer"] - est.optimizer <= 8 * len(list(model.parameters()))


def test_fsdp_state_estimate_matches_two_real_sharded_ranks():
    from parallel_harness import GPT_KWARGS, train
    from openclaw.engine.models import GPT
    n = sum(p.numel() for p in GPT(**GPT_KWARGS).parameters())
    got = spawn(2, train, {"strategy": "fsdp"}, 1)
    est = state_bytes_estimate(n, mesh_layout(2, replicate=1), replicated=False)
    for rank in got:  # FSDP pads each tensor's shards to equal sizes: a few bytes more than n / 2
        held = rank["state_bytes"]
        assert est.params <= held["params"] <= est.params * 1.01
        assert est.optimizer <= held["optimizer"] <= est.optimizer * 1.02


# ---- the choice ---------------------------------------------------------------------------------------

def test_the_largest_size_that_fits_and_divides_is_chosen():
    fixed, per = 100 * MB, 3 * MB
    roomy = choose_micro_batch(10_000 * MB, fixed, per, 1024, [16])
    assert (roomy.size, roomy.largest) == (64, 64)
    tight = choose_micro_batch(fixed + 40 * per, fixed, per, 1024, [16])  # 40 samples fit: 32 is the largest size
    assert tight == MicroBatchChoice(32, fixed + 32 * per, 64, fixed + 40 * per, fixed, per)
    exact = choose_micro_batch(fixed + 16 * per, fixed, per, 1024, [16])  # the boundary fits
    assert exact.size == 16
    odd = choose_micro_batch(fixed + 11 * per, fixed, per, 3 * 64 * 5, [64])  # shares of 15: sizes 1, 3, 5, 15
    assert odd.size == 5
    with pytest.raises(MemoryBudgetError, match=r"even a micro-batch of 1 needs .*\(`train.memory_budget_gb`\)"):
        choose_micro_batch(fixed, fixed, per, 1024, [16])


@pytest.mark.parametrize("schedule", ["gpipe", "interleaved_1f1b"])
def test_a_pipelines_estimate_at_the_agreed_size_counts_what_its_schedule_holds(schedule):
    """Under a pipeline a rank holds activations of the micro-batches its schedule keeps in flight, not of
    `size` samples: the estimate reported at the size the ranks agree on is counted the same way as the
    choice's (it once read `fixed + size x per sample`: 10 GB for a choice estimated at 6 GB or 4 GB)."""
    from openclaw.engine.parallel.config import ParallelismConfig
    fixed, per = 2000 * MB, 250 * MB
    config = ParallelismConfig(strategy="ddp", pipeline=2 if schedule == "gpipe" else 4, pipeline_schedule=schedule)
    held = config.activation_samples(32)
    choice = choose_micro_batch(8000 * MB, fixed, per, 32, [1], count_suits=config.count_suits, activation_samples=held)
    assert choice.size == 32 and choice.estimate_at(32) == choice.estimate_bytes < fixed + 32 * per
    for size in (16, 8):  # the ranks may agree on a smaller size than this one chose
        assert choice.estimate_at(size) == fixed + math.ceil(held(size) * per)


def _fits_up_to(limit: int, calls: list[int]):
    """A real step function: allocates `m` rows, and raises CUDA's out-of-memory error above `limit`."""
    def step(m: int) -> float:
        calls.append(m)
        x = torch.ones(m, 8)
        if m > limit:
            raise torch.cuda.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {m} rows")
        return float(x.sum())
    return step


def test_out_of_memory_backs_off_by_halves_to_allowed_sizes():
    calls: list[int] = []
    assert confirm_micro_batch(32, [1, 2, 4, 8, 16, 32], _fits_up_to(5, calls)) == (4, [32, 16, 8])
    assert calls == [32, 16, 8, 4]
    calls.clear()  # divisors of 24: the largest allowed size at most half of the one that failed
    assert confirm_micro_batch(24, [1, 2, 3, 4, 6, 8, 12, 24], _fits_up_to(5, calls)) == (3, [24, 12, 6])
    calls.clear()
    assert confirm_micro_batch(8, [1, 2, 4, 8], _fits_up_to(100, calls)) == (8, []) and calls == [8]
    with pytest.raises(MemoryBudgetError, match=r"every micro-batch tried \(8, 4, 2, 1\)"):
        confirm_micro_batch(8, [1, 2, 4, 8], _fits_up_to(0, []))

    def broken(m: int) -> None:  # anything but running out of memory is not the probe's business
        raise ValueError("shape mismatch")
    with pytest.raises(ValueError, match="shape mismatch"):
        confirm_micro_batch(8, [1, 2, 4, 8], broken)


# ---- measuring activations ------------------------------------------------------------------------------

def test_saved_activations_grow_linearly_with_the_micro_batch_on_a_real_gpt():
    from openclaw.engine.models import GPT
    from openclaw.engine.tasks import LanguageModeling
    torch.manual_seed(0)
    model, task = GPT(vocab_size=64, block_size=32, dim=32, depth=2, heads=4).train(), LanguageModeling()

    def measure(m: int) -> int:
        batch = {"x": torch.randint(0, 64, (m, 33))}
        return saved_activation_bytes(lambda: task.loss(model, batch)[0], model.parameters())
    got = {m: measure(m) for m in (1, 2, 4, 8)}
    per = got[2] - got[1]
    print(f"gpt (dim 32, depth 2, 32 tokens): saved bytes {got}, {per} per sample")
    assert per > 0 and all(got[2 * m] - got[m] == pytest.approx(m * per, rel=0.01) for m in (2, 4))
    assert per_sample_bytes(measure, 2) == pytest.approx(per, rel=0.01)
    # the parameters (saved by every matmul) are not activations: they are counted once, in the state
    wide = torch.nn.Linear(1000, 1000)
    x = torch.rand(1, 1000)
    assert saved_activation_bytes(lambda: wide(x).sum(), wide.parameters()) == 4 * 1000  # its input alone


def test_saved_activations_of_an_mlp_are_its_layer_outputs():
    from openclaw.engine.models import MLP
    from openclaw.engine.tasks import Classification
    model = MLP(64, 128, 2, 10)

    def measure(m: int) -> int:
        batch = {"x": torch.rand(m, 64), "y": torch.randint(0, 10, (m,))}
        return saved_activation_bytes(lambda: Classification().loss(model, batch)[0], model.parameters())
    per = per_sample_bytes(measure, 4)
    # at least the input and each hidden layer's output (fp32) are kept for the backward ...
    assert per >= 4 * (64 + 2 * 128)
    # ... and no more than every intermediate the forward makes (input, 2 x (linear, gelu), logits, log-softmax)
    assert per <= 4 * (64 + 4 * 128 + 2 * 10) + 8


def _saved_bytes(build, batch: dict, task, dtype: torch.dtype | None, fake: bool) -> int:
    """`saved_activation_bytes` of one forward, on real tensors or on fake ones (no memory)."""
    import contextlib
    mode = fake_tensors() if fake else contextlib.nullcontext()
    with mode:
        model = build()
        batch = {k: mode.from_tensor(v) for k, v in batch.items()} if fake else batch

        def loss():
            with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
                return task.loss(model, batch)[0]
        return saved_activation_bytes(loss, model.parameters())


@pytest.mark.parametrize("dtype", [None, torch.bfloat16], ids=["fp32", "bf16"])
def test_fake_tensors_count_exactly_the_activations_a_real_run_saves(dtype):
    """The probe counts activations on fake tensors, so a model of any size, of which the device holds a
    shard, costs it nothing: the count must be the real one, autocast's 16-bit tensors included."""
    from openclaw.engine.models import GPT, MLP
    from openclaw.engine.tasks import Classification, LanguageModeling
    gpt = ({"x": torch.randint(0, 64, (4, 33))}, LanguageModeling(),
           lambda: GPT(vocab_size=64, block_size=32, dim=32, depth=2, heads=4).train())
    mlp = ({"x": torch.rand(4, 64), "y": torch.randint(0, 10, (4,))}, Classification(), lambda: MLP(64, 128, 2, 10))
    for batch, task, build in (gpt, mlp):
        real = _saved_bytes(build, batch, task, dtype, fake=False)
        assert real > 0 and _saved_bytes(build, batch, task, dtype, fake=True) == real
    # bf16 saves less than fp32 on the same model: autocast applied to the fake tensors too
    if dtype is not None:
        assert _saved_bytes(gpt[2], *gpt[:2], dtype, fake=True) < _saved_bytes(gpt[2], *gpt[:2], None, fake=True)


def test_a_whole_copy_is_probed_only_where_its_state_takes_at_most_half_the_budget():
    gb = 10 ** 9
    assert probes_whole(1 * gb, 72 * gb)  # a 1B model on an 80 GB GPU (90% of it): 8 GB of fp32 state and grads
    assert probes_whole(4 * gb, 72 * gb) and not probes_whole(5 * gb, 72 * gb)  # 40 GB > 36 GB
    assert not probes_whole(70 * gb, 72 * gb)  # a 70B model that only FSDP fits: counted on fake tensors


def test_a_model_that_cannot_run_on_fake_tensors_is_probed_on_a_real_copy(digits_dir):
    """A forward that reads a value (fake tensors have none) falls back to a real copy of the model."""
    from openclaw import load_config
    from openclaw.data.sources import resolve
    from openclaw.data.stream import ShardedData, shard_specs
    from openclaw.runtime.micro_batch import resolve_micro_batch
    src = resolve(str(digits_dir / "train"), "data.train")
    data = ShardedData(src.spec, shard_specs(src.shards), "x", "y")
    got = {}
    for name in ("mlp", "user_models:reads_a_value"):
        cfg = load_config(None, {"data.train": str(digits_dir / "train"), "data.features": "x", "data.label": "y",
                                 "model.name": name, "train.micro_batch_size": "auto", "train.memory_budget_gb": 1.0,
                                 "model.kwargs": {"in_features": 64, "hidden": 128, "depth": 1, "num_classes": 10}})
        resolved, auto = resolve_micro_batch(cfg, device=torch.device("cpu"), world=1, local_world=1,
                                             run_dir=str(digits_dir / "no-run"), data=data)
        got[name] = auto
        assert resolved.train.micro_batch_size == auto.size > 0
    assert got["mlp"].activations == "saved tensors, fake"
    assert got["user_models:reads_a_value"].activations == "saved tensors"
    # the same layers, whichever way they were counted (the user's model saves its guard's input once more)
    assert got["user_models:reads_a_value"].choice.activation_bytes_per_sample >= \
        got["mlp"].choice.activation_bytes_per_sample > 0


# ---- the ranks agree, and a kept size is not probed again ---------------------------------------------------

def _resolve_on_rank(rank: int, world: int, digits_train: str, budgets: list[float], run_dir: str) -> dict:
    """`resolve_micro_batch` on this rank of a 2-worker digits config, with this rank's memory budget."""
    from openclaw import load_config
    from openclaw.data.sources import resolve
    from openclaw.data.stream import ShardedData, shard_specs
    from openclaw.runtime.micro_batch import resolve_micro_batch
    src = resolve(digits_train, "data.train")
    data = ShardedData(src.spec, shard_specs(src.shards), "x", "y")
    cfg = load_config(None, {"data.train": digits_train, "data.features": "x", "data.label": "y",
                             "model.kwargs": {"in_features": 64, "hidden": 128, "depth": 2, "num_classes": 10},
                             "train.micro_batch_size": "auto", "train.memory_budget_gb": budgets[rank],
                             "scaling.min_workers": 2, "scaling.max_workers": 2})
    resolved, auto = resolve_micro_batch(cfg, device=torch.device("cpu"), world=world, local_world=world,
                                         run_dir=run_dir, data=data)
    return {"size": resolved.train.micro_batch_size, "source": auto.source, "proposed": auto.proposed,
            "probed": auto.probed, "key": auto.key, "estimate_gb": auto.estimate_gb, "activations": auto.activations,
            "choice": auto.choice and (auto.choice.fixed_bytes, auto.choice.activation_bytes_per_sample)}


def _scenarios_on_rank(rank: int, world: int, digits_train: str, scenarios: list[tuple[list[float], str]]) -> list:
    return [_resolve_on_rank(rank, world, digits_train, budgets, run_dir) for budgets, run_dir in scenarios]


def test_ranks_agree_on_the_smallest_size_and_a_kept_size_is_not_probed_again(digits_dir, tmp_path):
    from openclaw.engine import checkpoint as ckpt
    train = str(digits_dir / "train")
    # the MLP's state (AdamW, DDP's buckets at 2 ranks) and its activations, probed in this process
    alone = _resolve_on_rank(0, 1, train, [1.0], str(tmp_path / "fresh"))
    fixed, per = alone["choice"]
    assert alone["size"] == 32 and alone["source"] == "probe"  # 64 over 2 workers: 32 each, with room to spare
    assert alone["activations"] == "saved tensors, fake"  # no copy of the model in memory
    roomy, tight = 1.0, (fixed + 5 * per) / 1e9  # a budget with room for 5 samples: 4 is the size
    # a run whose train state kept 8 for rank 0's key (its model, precision, strategy, device and budget)
    state = {"step": 10, "micro_batch_size": 8, "micro_batch_key": alone["key"], "micro_batch_estimate_gb": 0.25}
    ckpt.save(tmp_path / "kept" / "checkpoint_2026-01-01_00-00-00.000000", model={}, trainer={}, state=state,
              config={})
    fresh, kept = str(tmp_path / "fresh"), str(tmp_path / "kept")
    got = spawn(2, _scenarios_on_rank, train, [([roomy, tight], fresh), ([roomy, roomy], kept), ([roomy, tight], kept)])
    probed, same, mixed = ([rank[i] for rank in got] for i in range(3))
    # a fresh run: both ranks probe, rank 1 has room for less, and both take its size
    assert [(g["size"], g["source"], g["proposed"], g["probed"]) for g in probed] == [(4, "probe", [32, 4], 2)] * 2
    assert probed[0]["estimate_gb"] == pytest.approx((fixed + 4 * per) / 1e9, rel=1e-4)
    # the kept size, on every rank, with no probe
    assert [(k["size"], k["source"], k["probed"], k["choice"]) for k in same] == [(8, "train_state", 0, None)] * 2
    assert same[0]["estimate_gb"] == 0.25
    # rank 1's memory is another (its budget is in the key): it chooses again, and the ranks take its smaller size,
    # chosen now (said as a probe's, which prints it), with the estimate at that size (rank 0 said kept, at 8's)
    assert [(m["size"], m["source"], m["proposed"], m["probed"]) for m in mixed] == [(4, "probe", [8, 4], 1)] * 2
    assert mixed[0]["estimate_gb"] == mixed[1]["estimate_gb"] == pytest.approx((fixed + 4 * per) / 1e9, rel=1e-4)


# ---- end to end -------------------------------------------------------------------------------------------

@pytest.mark.integration
@pytest.mark.slow
def test_auto_micro_batch_on_two_workers_is_logged_agreed_and_kept_on_resume(ray_local, digits_dir, tmp_path,
                                                                          mlflow_uri, capsys):
    import openclaw
    from mlflow.tracking import MlflowClient
    # The budget that leaves room for 10 samples of the digits MLP beside its state: the size is 8, not 32.
    probed = _resolve_on_rank(0, 1, str(digits_dir / "train"), [1.0], str(tmp_path / "none"))
    fixed, per = probed["choice"]
    budget = (fixed + 10 * per) / 1e9
    common = {"name": "auto-mb", "train.micro_batch_size": "auto", "train.memory_budget_gb": budget,
              "train.eval_every": 0, "train.log_every": 10, "checkpoint.every_steps": 10}
    first = openclaw.train(digits_config(digits_dir, tmp_path, mlflow_uri, **common, **{"train.max_steps": 20}))
    assert "micro-batch: 8 (`auto`" in capsys.readouterr().out
    again = openclaw.train(digits_config(digits_dir, tmp_path, mlflow_uri, **common, **{"train.max_steps": 30}))
    assert again.run_id == first.run_id and again.metrics["step"] == 30
    assert "micro-batch:" not in capsys.readouterr().out  # printed once, when chosen

    client = MlflowClient(mlflow_uri)
    params = client.get_run(first.run_id).data.params
    assert params["resolved/micro_batch_size"] == "8" and params["train.micro_batch_size"] == "auto"
    assert float(params["resolved/micro_batch_estimate_gb"]) == pytest.approx((fixed + 8 * per) / 1e9, rel=1e-4)
    events = json.load(open(client.download_artifacts(first.run_id, "events.json", str(tmp_path))))
    chosen = [e for e in events if e["event"] == "micro_batch"]
    print("micro_batch events:", chosen)
    assert [(e["size"], e["source"], e["proposed"], e["probed"]) for e in chosen] == \
        [(8, "probe", [8, 8], 2), (8, "train_state", [8, 8], 0)]  # both ranks; the resume probed on none
    assert chosen[0]["largest"] == 32 and chosen[0]["budget_gb"] == pytest.approx(budget, rel=1e-6)
    starts = [e for e in events if e["event"] in ("start", "resume")]
    assert [(e["event"], e["accumulation"]) for e in starts] == [("start", 4), ("resume", 4)]  # 32 per worker / 8
    states = sorted((tmp_path / "runs" / "auto-mb").glob("checkpoint_*/state.pt"))
    assert torch.load(states[-1], weights_only=True)["micro_batch_size"] == 8


def test_a_noisy_probe_that_measures_less_at_twice_the_batch_takes_the_larger_measure_per_sample():
    """Measured at 8 and 16 samples, a probe whose noise puts the larger batch below the smaller gave a
    negative per-sample cost: `auto` would then pick the largest micro-batch and risk running out of memory."""
    assert per_sample_bytes(lambda m: {8: 4_000_000, 16: 3_900_000}[m], 8) == 3_900_000 / 16
    assert per_sample_bytes(lambda m: {8: 4_000_000, 16: 6_000_000}[m], 8) == 2_000_000 / 8
