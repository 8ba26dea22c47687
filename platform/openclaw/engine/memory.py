"""How much memory a micro-batch needs, and the largest one that fits (plain torch; worker process,
behind `train.micro_batch_size: auto`).

The estimate of one rank's memory is a fixed part plus a part per sample:

    fixed        parameters, gradients and optimizer state (fp32, AdamW: 2 states) of the parameters
                 this rank holds: the whole model under DDP (plus DDP's gradient buckets), 1/shard under
                 FSDP, 1/tensor under TP, 1/stages under PP; 16-bit precision adds a 16-bit copy of them;
                 FSDP adds the largest unit gathered whole, the next one prefetched, and its gradients
                 (`gathered_bytes`)
    per sample   activations, measured on a probe micro-batch: the bytes of the tensors saved for the
                 backward (`saved_activation_bytes`), counted on fake tensors (`fake_tensors`: no memory),
                 a tensor-parallel rank's share of them (`TensorSplit`); where a rank runs the whole model
                 on a GPU with room for a whole copy of it, the allocator's peak (`cuda_peak_bytes`)

`choose_micro_batch` takes the largest size that fits the budget and divides the per-rank batch at
every allowed data-parallel degree; on a GPU `confirm_micro_batch` then runs it and backs off by halves
on an out-of-memory error. The arithmetic is pure, so topologies we cannot run are unit-tested.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
# private: torch has no public path to FakeTensorMode (torch.compile traces with it)
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.multiprocessing.reductions import StorageWeakRef

from openclaw.engine.parallel.config import common_sizes
from openclaw.engine.parallel.mesh import MeshLayout
from openclaw.engine.precision import sharded_param_dtype
from openclaw.errors import MemoryBudgetError

GB = 1e9
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "fp8": 2}
"""Bytes of the low-precision copy of a weight (fp8 trains its float8 Linears beside bf16: counted as bf16)."""
OPTIMIZER_STATES = {"adamw": 2, "adam": 2, "sgd": 1}
"""fp32 tensors per parameter the optimizer keeps (Adam's two moments; SGD's momentum, none at 0)."""
CUDA_HEADROOM = 0.9
"""The share of a GPU's free memory the estimate may fill: the allocator's rounding, cuBLAS workspaces
and fragmentation take the rest (the confirmation probe checks what the estimate cannot see)."""


@dataclass(frozen=True)
class StateEstimate:
    """Bytes one rank holds for the training state, whatever the micro-batch."""
    params: int
    grads: int
    optimizer: int
    extra: int
    """DDP's gradient buckets (a second copy of the gradients) and 16-bit copies of the weights."""

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer + self.extra


def state_bytes_estimate(num_params: int, layout: MeshLayout, *, replicated: bool, precision: str = "fp32",
                         optimizer: str = "adamw", momentum: float = 0.9,
                         stage_params: int | None = None) -> StateEstimate:
    """One rank's parameters, gradients and optimizer state (all fp32: autocast keeps fp32 master weights
    and FSDP reduces gradients in fp32). `replicated`: plain DDP, whose buckets hold another copy of the
    gradients when there is more than one rank. Tensor and pipeline parallelism split the model over
    `layout.tensor x layout.pipeline` ranks, or, with `stage_params` (the most parameters a pipeline rank
    holds: `layout_checks.pipeline_rank_params`), tensor parallelism splits that part; FSDP shards it
    over `layout.shard` ranks."""
    part = stage_params if stage_params else math.ceil(num_params / layout.pipeline)
    held = math.ceil(math.ceil(part / layout.tensor) / layout.shard)
    states = OPTIMIZER_STATES[optimizer] if optimizer != "sgd" or momentum else 0
    buckets = 4 * held if replicated and layout.dp > 1 else 0
    casts = DTYPE_BYTES[precision] * held if precision != "fp32" else 0
    return StateEstimate(params=4 * held, grads=4 * held, optimizer=4 * states * held, extra=buckets + casts)


def gathered_bytes(largest_unit_params: int, layout: MeshLayout, precision: str = "fp32") -> int:
    """What FSDP holds beside a rank's shards while a step runs: a unit's parameters gathered whole for
    its forward and backward, and the next unit's, prefetched (in `sharded_param_dtype`), then the unit's
    whole gradients before they are reduce-scattered (fp32). `largest_unit_params`: the largest
    `fully_shard` unit's parameters (a transformer block, or what the root holds besides the blocks),
    which tensor parallelism still splits. 0 where nothing is sharded (DDP, one shard)."""
    if layout.shard == 1:
        return 0
    unit = math.ceil(largest_unit_params / layout.tensor)
    gathered = sharded_param_dtype(precision) or torch.float32
    return unit * (2 * gathered.itemsize + 4)


# ---- the sizes allowed, and the largest that fits ------------------------------------------------

def micro_batch_sizes(global_batch: int, dp_sizes: Iterable[int],
                      count_suits: Callable[[int], bool] = lambda n: True) -> list[int]:
    """Every micro-batch size (ascending) that divides each data-parallel rank's share of the global batch
    at every degree in `dp_sizes` (the divisors of their greatest common divisor), and splits each share
    into a count of micro-batches that `count_suits` (a pipeline schedule's minimum)."""
    shares = []
    for dp in dp_sizes:
        if global_batch % dp:
            raise ValueError(f"global batch {global_batch} does not divide over {dp} data-parallel ranks")
        shares.append(global_batch // dp)
    return common_sizes(shares, count_suits)


@dataclass(frozen=True)
class MicroBatchChoice:
    """The micro-batch the estimate allows, and what it rests on (bytes)."""
    size: int
    estimate_bytes: int
    """fixed + size x activations per sample: what this rank is estimated to need."""
    largest: int
    """The largest size the batch arithmetic allows (the choice with memory to spare)."""
    budget_bytes: int
    fixed_bytes: int
    activation_bytes_per_sample: float
    needs: dict[int, int] = field(default_factory=dict, compare=False)
    """Each allowed size's estimate (bytes): where the ranks agree on a smaller size than this one's."""

    def estimate_at(self, size: int) -> int:
        """The estimate at an allowed `size`: the activations a rank holds there (under a pipeline, what its
        schedule keeps in flight), not `size` times a sample's."""
        return self.needs[size]


def choose_micro_batch(budget_bytes: int, fixed_bytes: int, activation_bytes_per_sample: float, global_batch: int,
                       dp_sizes: Iterable[int], budget_source: str = "`train.memory_budget_gb`",
                       count_suits: Callable[[int], bool] = lambda n: True,
                       activation_samples: Callable[[int], float] = float) -> MicroBatchChoice:
    """The largest allowed size (`micro_batch_sizes`) whose estimate fits `budget_bytes`. A
    `MemoryBudgetError` when not even the smallest does. `activation_samples(m)`: how many samples'
    activations a rank holds at its peak at micro-batch `m` (`m` itself; under a pipeline, what its
    schedule keeps in flight: `ParallelismConfig.activation_samples`)."""
    sizes = micro_batch_sizes(global_batch, dp_sizes, count_suits)

    def need(m: int) -> int:
        return int(fixed_bytes + math.ceil(activation_samples(m) * activation_bytes_per_sample))

    fits = [m for m in sizes if need(m) <= budget_bytes]
    if not fits:
        raise MemoryBudgetError(
            f"`train.micro_batch_size: auto`: even a micro-batch of {sizes[0]} needs an estimated "
            f"{need(sizes[0]) / GB:.3g} GB per worker ({fixed_bytes / GB:.3g} GB of parameters, gradients and "
            f"optimizer state, {activation_bytes_per_sample / GB:.3g} GB of activations per sample), more than "
            f"the budget of {budget_bytes / GB:.3g} GB ({budget_source}). Shard the state "
            f"(`parallelism.strategy: fsdp`, `parallelism.tensor`), recompute activations "
            f"(`parallelism.activation_checkpointing: full`), use a smaller model, or raise the budget.")
    return MicroBatchChoice(fits[-1], need(fits[-1]), sizes[-1], int(budget_bytes), int(fixed_bytes),
                            float(activation_bytes_per_sample), {m: need(m) for m in sizes})


def confirm_micro_batch(size: int, sizes: list[int], try_size: Callable[[int], Any]) -> tuple[int, list[int]]:
    """Run `try_size(size)` (a forward and backward at that micro-batch); on a CUDA out-of-memory error
    try the largest allowed size at most half of it, and so on. Returns the size that ran and those that
    did not; a `MemoryBudgetError` when the smallest did not either."""
    failed: list[int] = []
    while True:
        try:
            try_size(size)
            return size, failed
        except torch.cuda.OutOfMemoryError:
            failed.append(size)
        smaller = [m for m in sizes if m <= size // 2]
        if not smaller:
            raise MemoryBudgetError(
                f"`train.micro_batch_size: auto`: the device ran out of memory at every micro-batch tried "
                f"({', '.join(map(str, failed))}). Shard the state (`parallelism.strategy: fsdp`), recompute "
                f"activations (`parallelism.activation_checkpointing: full`) or use a smaller model.")
        size = smaller[-1]


# ---- measuring activations -----------------------------------------------------------------------

@dataclass(frozen=True)
class TensorSplit:
    """How tensor parallelism shares a model's saved activations over a group of `size` ranks: what
    `whole_inputs` save of their input (column-wise layers, which gather it whole: the input itself, or
    under autocast its 16-bit copy: the input's size either way), everything saved after `whole_after`
    (a head whose logits are gathered) and integer tensors (token ids) are whole on every rank; every
    other activation is split (heads, hidden layers, sequence-parallel norms): 1/size."""
    size: int
    whole_inputs: tuple[nn.Module, ...] = ()
    whole_after: nn.Module | None = None


def saved_activation_bytes(run: Callable[[], Any], params: Iterable[torch.Tensor],
                           split: TensorSplit | None = None) -> int:
    """Bytes of the tensors autograd saves for the backward while `run()` builds its graph (each storage
    once, the parameters' own storages excluded): the activations a step holds at its peak, measured
    the same way on any device. With `split`: one tensor-parallel rank's share of them."""
    return sum(n for _, n in _saved(run, params, [], split))


def part_activation_bytes(run: Callable[[], Any], params: Iterable[torch.Tensor], parts: list[nn.Module],
                          split: TensorSplit | None = None) -> tuple[list[int], int]:
    """`saved_activation_bytes` of each of `parts` (modules, none inside another) while `run()` runs: the
    storages first saved inside its forward; and of the rest, saved outside them all (the loss's, say).
    A block's is what it holds again while its backward recomputes it under activation checkpointing."""
    by_part, rest = [0] * len(parts), 0
    for part, n in _saved(run, params, parts, split):
        if part is None:
            rest += n
        else:
            by_part[part] += n
    return by_part, rest


def _saved(run: Callable[[], Any], params: Iterable[torch.Tensor], parts: list[nn.Module],
           split: TensorSplit | None) -> list[tuple[int | None, int]]:
    """(index in `parts` of the part running when it was first saved, or None; bytes on one rank of
    `split`) of each storage autograd saves while `run()` builds its graph."""
    skip = {StorageWeakRef(p.untyped_storage()) for p in params}
    seen: dict[StorageWeakRef, list] = {}  # storage -> [part, bytes, whole on every rank]
    at: dict[str, Any] = {"part": None, "after": False, "gathered": None}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        key = StorageWeakRef(storage)  # a storage's identity, for fake tensors too (they have no data)
        if key not in skip:
            whole = at["after"] or not t.is_floating_point() or t.numel() == at["gathered"]
            entry = seen.setdefault(key, [at["part"], 0, whole])
            entry[1] = max(entry[1], storage.nbytes())
        return t  # the graph keeps `t` alive, so no other saved tensor reuses its memory while we count

    def gathering(_module, args) -> None:
        at["gathered"] = args[0].numel() if args and isinstance(args[0], torch.Tensor) else None

    hooks = [h for i, b in enumerate(parts) for h in (
        b.register_forward_pre_hook(lambda *_, i=i: at.__setitem__("part", i)),
        b.register_forward_hook(lambda *_: at.__setitem__("part", None)))]
    if split is not None:
        hooks += [h for m in split.whole_inputs for h in (
            m.register_forward_pre_hook(gathering), m.register_forward_hook(lambda *_: at.__setitem__("gathered", None)))]
        if split.whole_after is not None:
            hooks.append(split.whole_after.register_forward_hook(lambda *_: at.__setitem__("after", True)))
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = run()
        del out
    finally:
        for h in hooks:
            h.remove()
    size = split.size if split is not None else 1
    return [(part, n if whole else math.ceil(n / size)) for key, (part, n, whole) in seen.items()]


def probes_whole(num_params: int, budget_bytes: int) -> bool:
    """Whether the probe may run a whole copy of the model on the device: its fp32 parameters and
    gradients in half the budget, the other half left for the probe micro-batches' activations. A model
    too big for that (one FSDP, TP or PP shard among several) has its activations counted on fake tensors
    (`fake_tensors`), with no memory, and the size is not confirmed on the device."""
    return 8 * num_params <= budget_bytes // 2


def probes_on_gpu(model_parallel: int, num_params: int, budget_bytes: int) -> bool:
    """Whether the probe runs a whole copy of the model on the GPU (the allocator's peak, then the size
    confirmed): only where a rank runs the whole model's forward (DDP, FSDP) and the copy fits
    (`probes_whole`). A tensor-parallel rank holds a slice of the activations and a pipeline stage a
    part of the layers, which a whole copy would overstate or misplace: their share is counted on fake
    tensors (`TensorSplit`, `ParallelismConfig.held_fraction`)."""
    return model_parallel == 1 and probes_whole(num_params, budget_bytes)


def fake_tensors() -> FakeTensorMode:
    """A mode in which tensors have shapes, dtypes and a device but no memory (torch's `FakeTensorMode`,
    as `torch.compile` traces with): a model of any size built and run in it costs nothing, and autocast
    treats its tensors as it treats the device's, so `saved_activation_bytes` counts what a real run saves."""
    return FakeTensorMode(allow_non_fake_inputs=True)


def cuda_peak_bytes(run: Callable[[], Any], device: torch.device) -> int:
    """The CUDA allocator's peak above what was allocated before, while `run()` runs."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    run()
    torch.cuda.synchronize(device)
    return int(torch.cuda.max_memory_allocated(device) - base)


def per_sample_bytes(measure: Callable[[int], int], probe: int) -> float:
    """Activation bytes per sample from `measure(m)` at micro-batches of `probe` and `2 x probe`: the
    difference, so that what does not grow with the batch (gradients allocated by the first backward,
    weight casts) is not counted per sample."""
    small, large = measure(probe), measure(2 * probe)
    return (large - small) / probe if large > small else large / (2 * probe)
