"""Real multi-process gloo groups for the parallelism tests (no Ray): `spawn(world, fn, *args)` runs
`fn(rank, world, *args)` on `world` local processes (`openclaw.engine.parallel.local`). `train` and
`hop` are the engine-level runs the tests compare."""
from __future__ import annotations

from typing import Any

import torch
from torch.distributed.tensor import DTensor

from openclaw.engine.parallel.local import run_local


def spawn(world: int, fn, *args) -> list[Any]:
    return run_local(world, fn, *args, backend="gloo")


def background_groups(rank: int, world: int) -> list[str | None]:
    """The backend of each group `runtime.saver.background_group` makes here, for a sharded background
    save, a sharded synchronous one and a whole background one (None: no group of its own)."""
    import torch.distributed as dist

    from openclaw.runtime.saver import background_group
    made = [background_group(*args) for args in ((True, True), (True, False), (False, True))]
    return [None if g is None else dist.get_backend(g) for g in made]


# ---- an engine-level run ---------------------------------------------------------------------------

GPT_KWARGS = {"vocab_size": 64, "block_size": 16, "dim": 32, "depth": 4, "heads": 4}
GLOBAL_BATCH, MICRO = 8, 2
ONE_RANK_STEPS = 10
"""The steps of the one-rank reference run (the `one_rank` fixture)."""


def rel(a, b) -> float:
    """The largest relative difference of two sequences of numbers, against the first."""
    return max(abs(x - y) / abs(x) for x, y in zip(a, b))


def global_batch(step: int) -> dict[str, torch.Tensor]:
    """Step `step`'s global batch: the same whatever the world size."""
    g = torch.Generator().manual_seed(1000 + step)
    start = torch.randint(0, 64, (GLOBAL_BATCH, 1), generator=g)
    noise = (torch.rand(GLOBAL_BATCH, GPT_KWARGS["block_size"] + 1, generator=g) < 0.1).long()
    return {"x": (start + torch.arange(GPT_KWARGS["block_size"] + 1) * 3 + noise) % 64}


def build(rank: int, world: int, parallelism: dict, seed: int = 0, as_a_worker: bool = False,
          model_kwargs: dict | None = None, restoring: bool = False, split_logits_ok: bool = True,
          precision: str = "auto", model_name: str = "gpt"):
    """The engine over the test gpt. `as_a_worker`: the model built as a worker builds it
    (`engine.initial_model`: under a sharded strategy on the meta device, and unless `restoring` from a
    checkpoint, rank 0's weights sent after the wrap); else built whole on every rank.
    `split_logits_ok`: `build_strategy`'s (false: as for a task that needs whole logits). `precision`:
    `train.precision` (auto: fp32 on a CPU). `model_name`: `model.name` (a user's `user_models:<fn>`)."""
    from openclaw.engine.config import TrainConfig
    from openclaw.engine.engine import Engine
    from openclaw.engine.initial_model import InitialModel, initial_model, rank0_weights
    from openclaw.engine.models import build_model
    from openclaw.engine.parallel.build import build_strategy, layout_for
    from openclaw.engine.parallel.config import ParallelismConfig
    from openclaw.engine.tasks import LanguageModeling
    cfg = ParallelismConfig(**parallelism)
    layout = layout_for(cfg, world)
    strategy = build_strategy(cfg, world=world, rank=rank, split_logits_ok=split_logits_ok)
    kwargs = model_kwargs or GPT_KWARGS
    if as_a_worker:
        init = initial_model(model_name, kwargs, seed=seed, world=world, sharded=strategy.sharded)
    else:
        torch.manual_seed(seed)
        init = InitialModel(build_model(model_name, kwargs))
    train = TrainConfig(global_batch_size=GLOBAL_BATCH, micro_batch_size=MICRO, max_steps=100,
                        optimizer={"name": "adamw", "lr": 3e-3, "weight_decay": 0.1}, grad_clip=1.0,
                        precision=precision)
    engine = Engine(init.model, LanguageModeling(), train, device=torch.device("cpu"), world_size=layout.dp,
                    global_batch_size=GLOBAL_BATCH, strategy=strategy)
    weights = {}
    if init.on_meta and not restoring:  # as the attempt does on a fresh start
        weights = rank0_weights(model_name, kwargs, seed=seed, rank=rank)
        engine.start_over(weights, from_rank0=True)
    engine.built_on_meta, engine.whole_state_keys = init.on_meta, len(weights)
    if weights:  # what rank 0 broadcasts: each tensor once, a tied one under one name
        from openclaw.engine.parallel.fsdp import without_aliases
        engine.sent_keys = len(without_aliases(engine.model, weights))
    return engine, layout


def my_micro_batches(step: int, layout, rank: int) -> list[dict[str, torch.Tensor]]:
    per = GLOBAL_BATCH // layout.dp
    mine = global_batch(step)["x"][layout.dp_rank(rank) * per:(layout.dp_rank(rank) + 1) * per]
    return [{"x": mine[i:i + MICRO]} for i in range(0, per, MICRO)]


def saved_bytes(engine, batch: dict[str, torch.Tensor]) -> int:
    """The bytes this rank's autograd saves for the backward in one micro-batch's forward and loss: each
    storage once (a DTensor's local one), the parameters' excluded. Storages by identity, not address:
    FSDP frees a block's gathered weights after its forward, and the allocator may hand that address to
    the next saved tensor."""
    from torch.distributed.tensor import DTensor
    from torch.multiprocessing.reductions import StorageWeakRef

    from openclaw.engine.parallel.tp import loss_context

    def storage(t):
        return (t.to_local() if isinstance(t, DTensor) else t).untyped_storage()
    seen: dict[StorageWeakRef, int] = {}

    def pack(t):
        key = StorageWeakRef(storage(t))
        seen[key] = max(seen.get(key, 0), storage(t).nbytes())
        return t
    params = {StorageWeakRef(storage(p)) for p in engine.model.parameters()}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with loss_context(engine.strategy.split_logits):
            loss, _ = engine.fns.loss(engine.model, batch)
    del loss
    return sum(n for key, n in seen.items() if key not in params)


def steps(engine, layout, rank: int, first: int, last: int) -> list[tuple[float, float]]:
    """(mean loss over the global batch, global grad norm) of steps first..last-1."""
    from openclaw.engine.metrics import allreduce_sum
    out = []
    for step in range(first, last):
        stats = engine.train_step(step, my_micro_batches(step, layout, rank))
        loss_sum, n = allreduce_sum([stats.loss_sum, float(stats.samples)], engine.device)
        out.append((loss_sum / n, stats.grad_norm))
    return out


def full_weights(engine, pipeline: int = 1) -> dict[str, torch.Tensor]:
    """Collective: the whole model's weights, on every rank (a pipeline's: each stage's, gathered)."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    if not engine.strategy.sharded:
        return {k: v.detach().clone() for k, v in engine.module.state_dict().items()}
    sd = get_model_state_dict(engine.model, options=StateDictOptions(full_state_dict=True))
    mine = {k: v.detach().cpu().clone() for k, v in sd.items()}
    if pipeline == 1:
        return mine
    stages: list[dict[str, torch.Tensor] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(stages, mine)
    return {k: v for stage in stages for k, v in stage.items()}


def train(rank: int, world: int, parallelism: dict, n_steps: int = 10, as_a_worker: bool = False,
          model_name: str = "gpt") -> dict[str, Any]:
    engine, layout = build(rank, world, parallelism, as_a_worker=as_a_worker, model_name=model_name)
    history = steps(engine, layout, rank, 0, n_steps)
    return {"history": history, "weights": full_weights(engine, parallelism.get("pipeline", 1)),
            "state_bytes": engine.state_bytes, "built_on_meta": engine.built_on_meta,
            "whole_state_keys": engine.whole_state_keys, "sent_keys": getattr(engine, "sent_keys", 0),
            "split_logits": getattr(engine.strategy, "split_logits", False),
            "split_params": sorted(n for n, p in engine.model.named_parameters() if isinstance(p, DTensor)
                                   and any(pl.is_shard() for pl in p.placements))}


def with_dropout(rank: int, world: int, parallelism: dict, n_steps: int = 6, by_micro_batch: bool = True
                 ) -> dict[str, Any]:
    """`train` with dropout 0.2, each step seeded as a worker seeds it (`runtime.attempt.train_step`):
    by data-parallel rank, then each micro-batch by where it starts in the global batch (without
    `by_micro_batch`, only by rank, as before)."""
    from openclaw.data.sampler import micro_batch_starts
    from openclaw.engine.state import micro_batch_seed, seed_step
    engine, layout = build(rank, world, parallelism, model_kwargs={**GPT_KWARGS, "dropout": 0.2})
    dp_rank, history = layout.dp_rank(rank), []
    for step in range(n_steps):
        seed_step(0, step, dp_rank)
        seeds = [micro_batch_seed(0, step, s) for s in micro_batch_starts(GLOBAL_BATCH, layout.dp, dp_rank, MICRO)
                 if by_micro_batch]
        history.append(engine.train_step(step, my_micro_batches(step, layout, rank), seeds).grad_norm)
    return {"history": history, "weights": full_weights(engine, parallelism.get("pipeline", 1))}


def host_peak_growth(rank: int, world: int, parallelism: dict, model_kwargs: dict, as_a_worker: bool) -> int:
    """How much this rank's peak resident memory (VmHWM) grew while it built the engine: its host's
    share of the model."""
    import openclaw.engine.engine  # noqa: F401  (imported before the first reading: what `build` imports
    import openclaw.engine.initial_model  # noqa: F401  is not the model)
    import openclaw.engine.parallel.build  # noqa: F401
    from openclaw.engine.metrics import peak_memory_bytes
    before = peak_memory_bytes(torch.device("cpu"))
    build(rank, world, parallelism, as_a_worker=as_a_worker, model_kwargs=model_kwargs)
    return peak_memory_bytes(torch.device("cpu")) - before


# ---- sharded checkpoints ---------------------------------------------------------------------------

def bitwise(a, b, path="") -> int:
    """Assert two (nested) states equal bit for bit; the number of tensors compared."""
    if isinstance(a, dict):
        assert set(a) == set(b), (path, sorted(set(a) ^ set(b))[:5])
        return sum(bitwise(a[k], b[k], f"{path}.{k}") for k in a)
    if torch.is_tensor(a):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), path
        return 1
    assert a == b, path
    return 0


def full_state(engine) -> dict[str, Any]:
    """Collective: every parameter and every optimizer state, whole, keyed by name."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
    msd, osd = get_state_dict(engine.model, engine.optimizer,
                              options=StateDictOptions(full_state_dict=True, flatten_optimizer_state_dict=True))
    return {"model": {k: v.detach().clone() for k, v in msd.items()},
            "optimizer": {k: v.detach().clone() if torch.is_tensor(v) else v for k, v in osd.items()}}


def hop(rank: int, world: int, parallelism: dict, load_from: str | None, save_to: str, n_steps: int,
        as_a_worker: bool = False, model_name: str = "gpt") -> dict:
    """Train `n_steps` (or load `load_from`), then save the shards to `save_to`; the whole state after.
    `as_a_worker`: built as a worker builds it (see `build`), no initial weights where it loads."""
    from openclaw.engine.sharded import load_shards, save_shards
    engine, layout = build(rank, world, parallelism, as_a_worker=as_a_worker, restoring=bool(load_from),
                           model_name=model_name)
    if load_from:
        template = engine.state_dict()
        load_shards(template, load_from)
        engine.load_state_dict(template)
    history = [] if load_from else steps(engine, layout, rank, 0, n_steps)
    state = full_state(engine)
    save_shards(engine.state_dict(), save_to)
    return {"state": state, "history": history, "next": steps(engine, layout, rank, n_steps, n_steps + 2)}


def wrap_on_meta(rank: int, world: int, parallelism: dict) -> dict[str, Any]:
    """The strategy's wrap of a gpt built on the meta device: how much of it this rank holds, and where."""
    from torch.distributed.tensor import DTensor

    from openclaw.engine.models import GPT
    from openclaw.engine.parallel.build import build_strategy
    from openclaw.engine.parallel.config import ParallelismConfig
    with torch.device("meta"):
        model = GPT(**GPT_KWARGS)
    whole = sum(p.numel() for p in model.parameters())
    wrapped = build_strategy(ParallelismConfig(**parallelism), world=world, rank=rank).wrap(model, torch.device("cpu"))
    local = [p.to_local() if isinstance(p, DTensor) else p for p in wrapped.parameters()]
    # a meta model's parts get memory on the device, uninitialized (their weights are loaded after the wrap)
    return {"whole": whole, "held": sum(t.numel() for t in local), "devices": sorted({t.device.type for t in local})}


def batch_norm_run(rank: int, world: int, parallelism: dict, n_steps: int = 3, staged: bool = False,
                   resume_at: int | None = None, shards: str | None = None) -> dict[str, Any]:
    """A classifier with BatchNorm (running statistics: buffers a checkpoint keeps), `n_steps` steps of
    each data-parallel rank's own samples: this rank's buffers after them (and its parameters). `staged`:
    shaped as a pipeline splits it, BatchNorm in each block. `resume_at`: after that many steps, saved
    to `shards` and loaded into an engine built again, which trains the rest (a resume)."""
    from torch import nn

    from openclaw.engine.config import TrainConfig
    from openclaw.engine.engine import Engine
    from openclaw.engine.parallel.build import build_strategy, layout_for
    from openclaw.engine.parallel.config import ParallelismConfig
    from openclaw.engine.sharded import load_shards, save_shards
    from openclaw.engine.tasks import Classification
    from user_models import normed_stages
    cfg = ParallelismConfig(**parallelism)
    layout = layout_for(cfg, world)

    def new_engine() -> Engine:
        torch.manual_seed(0)
        model = normed_stages() if staged else nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(),
                                                             nn.Linear(8, 2))
        return Engine(model, Classification(), TrainConfig(global_batch_size=16, micro_batch_size=4, max_steps=10),
                      device=torch.device("cpu"), world_size=layout.dp, global_batch_size=16,
                      strategy=build_strategy(cfg, world=world, rank=rank, split_logits_ok=False))
    engine, dp_rank = new_engine(), layout.dp_rank(rank)
    g = torch.Generator().manual_seed(100 + dp_rank)  # each replica's samples differ: so do their statistics
    for step in range(n_steps):
        if step == resume_at:
            save_shards(engine.state_dict(), shards)
            engine = new_engine()
            template = engine.state_dict()
            load_shards(template, shards)
            engine.load_state_dict(template)
        engine.train_step(step, [{"x": torch.randn(4, 4, generator=g) * (1 + dp_rank),
                                  "y": torch.randint(0, 2, (4,), generator=g)} for _ in range(16 // layout.dp // 4)])
    buffers = {n: b.detach().clone() for n, b in engine.module.named_buffers()}
    params = {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
              for n, p in engine.module.named_parameters()}
    return {"buffers": buffers, "params": params, "stage": layout.coords(rank)["pp"], "dp_rank": dp_rank}
