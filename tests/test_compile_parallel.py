"""`train.compile` composed with every kind of parallelism: FSDP2, tensor and pipeline parallelism
compile after their wrap (per block, in place) and train the same steps as eager, in real 2-process
gloo groups on CPU (tests/parallel_harness.py). Compile on 2 cores is slow: a few steps each."""
import pytest
import torch

from parallel_harness import GLOBAL_BATCH, GPT_KWARGS, MICRO, my_micro_batches, spawn

N_STEPS = 3


def _train(rank, world, parallelism, compile_on):
    from openclaw.engine.config import TrainConfig
    from openclaw.engine.engine import Engine
    from openclaw.engine.metrics import allreduce_sum
    from openclaw.engine.models import GPT
    from openclaw.engine.parallel.build import build_strategy, layout_for
    from openclaw.engine.parallel.config import ParallelismConfig
    from openclaw.engine.tasks import LanguageModeling
    cfg = ParallelismConfig(**parallelism)
    layout = layout_for(cfg, world)
    torch.manual_seed(0)
    train = TrainConfig(global_batch_size=GLOBAL_BATCH, micro_batch_size=MICRO, max_steps=100, compile=compile_on,
                        optimizer={"name": "adamw", "lr": 3e-3})
    engine = Engine(GPT(**GPT_KWARGS), LanguageModeling(), train, world_size=layout.dp,
                    global_batch_size=GLOBAL_BATCH, strategy=build_strategy(cfg, world=world, rank=rank,
                                                                                split_logits_ok=True))
    losses = []
    for step in range(N_STEPS):
        stats = engine.train_step(step, my_micro_batches(step, layout, rank))
        loss_sum, n = allreduce_sum([stats.loss_sum, float(stats.samples)], engine.device)
        losses.append(loss_sum / n)
    counters = engine.compile_counters
    return {"losses": losses, "compiled_steps": counters.compiled_steps if counters else 0}


@pytest.mark.slow
@pytest.mark.parametrize("parallelism", [{"strategy": "fsdp"}, {"strategy": "ddp", "tensor": 2},
                                         {"strategy": "ddp", "pipeline": 2},
                                         {"strategy": "ddp", "pipeline": 2, "tensor": 2}],
                         ids=["fsdp", "tp", "pp", "pp-x-tp"])
def test_compiled_training_matches_eager_under_each_parallelism(parallelism):
    world = 4 if parallelism.get("pipeline", 1) * parallelism.get("tensor", 1) == 4 else 2
    eager = spawn(world, _train, parallelism, False)[0]
    compiled = spawn(world, _train, parallelism, True)[0]
    assert compiled["compiled_steps"] >= 1 and eager["compiled_steps"] == 0
    # inductor fuses and reorders float ops: the same maths to a relative 1e-4, not bit for bit
    assert compiled["losses"] == pytest.approx(eager["losses"], rel=1e-4), (compiled, eager)
    assert all(l == l for l in compiled["losses"])  # finite: NaN != NaN
