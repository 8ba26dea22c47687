"""Sharded data parallelism with FSDP2 (`fully_shard`), alone or as hybrid sharding (HSDP), and composed
with tensor parallelism (plain torch; worker process).

In the order torchtitan applies them: tensor parallelism over the mesh's `tp` dimension, activation
checkpointing per block, then `fully_shard` on every transformer block and on the root over the
data-parallel dimensions. A rank then holds 1/shard of each parameter, its gradient and its optimizer
state; a block's parameters are gathered for its forward and backward and freed after.
`strategy: ddp` with tensor parallelism replicates over the data-parallel ranks the same way (a
mesh of replicate x 1).

Gradients are averaged over the data-parallel ranks (the engine scales each loss by dp / global
batch, so the gradient is the global batch's mean). Accumulation keeps the gathered parameters and
the unsharded gradients between micro-batches and reduce-scatters once, after the last.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from openclaw.engine.models import tied_parameters
from openclaw.engine.noise import LocalGrad, measure_local
from openclaw.engine.parallel.base import (Batch, CommClock, StepFns, apply_activation_checkpointing, evaluate_each,
                                          on_meta, place, transformer_blocks)
from openclaw.engine.parallel.clip import clip_global
from openclaw.engine.parallel.fsdp_comm import measure_collectives
from openclaw.engine.parallel.mesh import MeshLayout
from openclaw.engine.parallel.tp import apply_tensor_parallel, loss_context, whole_loss

SHARDED = StateDictOptions(flatten_optimizer_state_dict=True)
"""Optimizer state keyed by parameter name, flat: loadable at any layout, including pipeline stages
that each hold different parameters."""
FULL_MODEL = StateDictOptions(full_state_dict=True, strict=False)
FROM_RANK0 = StateDictOptions(full_state_dict=True, strict=False, broadcast_from_rank0=True)
"""Rank 0's whole state dict, each tensor broadcast in turn and kept as this rank's part: the other ranks
never hold the whole model."""


def dp_mesh(layout: MeshLayout, mesh: DeviceMesh, always_shard: bool) -> DeviceMesh | None:
    """The data-parallel part of the mesh FSDP shards over (2-D for HSDP), or None: nothing to shard."""
    if layout.dp == 1 and not always_shard:
        return None
    return mesh["dp_shard"] if layout.replicate == 1 else mesh["dp_replicate", "dp_shard"]


def shard(model: nn.Module, dp_mesh: DeviceMesh, reshard_after_forward: bool,
          param_dtype: torch.dtype | None) -> nn.Module:
    """`fully_shard` each block, then the root (which holds the embeddings, the final norm and the head,
    tied weights included)."""
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32) if param_dtype else None
    kwargs: dict[str, Any] = {"mesh": dp_mesh, **({"mp_policy": mp} if mp else {})}
    for block in transformer_blocks(model):
        fully_shard(block, reshard_after_forward=reshard_after_forward, **kwargs)
    fully_shard(model, reshard_after_forward=reshard_after_forward, **kwargs)
    return model


class ShardedState:
    """State dicts of strategies whose parameters are DTensors or pipeline stages: by parameter name,
    through torch.distributed.checkpoint's state-dict API."""
    sharded = True

    def state_dict(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        msd, osd = get_state_dict(model, optimizer, options=SHARDED)
        return {"model": msd, "optimizer": osd}

    def load_state_dict(self, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                       options=SHARDED)

    def load_full_model(self, model: nn.Module, state: dict[str, torch.Tensor], from_rank0: bool = False) -> None:
        set_model_state_dict(model, without_aliases(model, state), options=FROM_RANK0 if from_rank0 else FULL_MODEL)


def without_aliases(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` less the second name of each parameter `model` holds under two (the gpt's head, its
    embedding's matrix): loading the first fills both, and from rank 0 each name is a broadcast of the
    whole tensor. A pipeline stage holding one of the two keeps its own name (no pair in its part)."""
    aliases = {alias for _, alias in tied_parameters(model)}
    return {k: v for k, v in state.items() if k not in aliases}


def kept_buffers(model: nn.Module) -> set[str]:
    """The names of the buffers a checkpoint keeps (not `persistent=False` ones): what `sync_buffers` syncs."""
    return {name for name, _ in model.named_buffers()} & set(model.state_dict())


def sync_buffers(model: nn.Module, kept: set[str], dp: DeviceMesh | None) -> None:
    """The buffers named in `kept` (BatchNorm's running statistics), data-parallel rank 0's on every rank
    of `dp`, as DDP keeps them: FSDP leaves each rank its own, so the ranks evaluated with different
    statistics and a checkpoint kept one rank's, which a resume then gave them all. Nothing kept (a
    transformer), or no `dp`: nothing per step."""
    if dp is None or not kept:
        return
    buffers = [b.to_local() if isinstance(b, DTensor) else b  # (a user's tensor plan may replicate them)
               for name, b in model.named_buffers() if name in kept]
    for dtype in dict.fromkeys(b.dtype for b in buffers):
        same = [b for b in buffers if b.dtype == dtype]
        flat = torch.cat([b.detach().reshape(-1) for b in same])
        for dim in range(dp.ndim):  # along the shards, then across the replicas: rank (0, 0)'s
            group = dp.get_group(dim)
            dist.broadcast(flat, src=dist.get_global_rank(group, 0), group=group)
        for b, part in zip(same, flat.split([b.numel() for b in same])):
            b.detach().copy_(part.view_as(b))


class FSDPStrategy(ShardedState):
    name = "fsdp"

    def __init__(self, layout: MeshLayout, mesh: DeviceMesh, *, reshard_after_forward: bool = True,
                 activation_checkpointing: str = "none", param_dtype: torch.dtype | None = None,
                 always_shard: bool = True, loss_parallel: bool = False):
        """`always_shard`: `fully_shard` even over one data-parallel rank (`strategy: fsdp`); without it
        (tensor parallelism under `strategy: ddp`) one rank keeps its parameters as they are.
        `loss_parallel`: under tensor parallelism, the built-in gpt's logits stay split (`tp.gpt_plan`)."""
        self.layout, self.mesh, self.always_shard = layout, mesh, always_shard
        self.loss_parallel, self.split_logits = loss_parallel, False
        self.reshard_after_forward, self.ac, self.param_dtype = reshard_after_forward, activation_checkpointing, param_dtype
        self._local: LocalGrad | None = None
        self.comm: CommClock | None = None
        self._kept_buffers: set[str] = set()

    def dp_mesh(self) -> DeviceMesh | None:
        return dp_mesh(self.layout, self.mesh, self.always_shard)

    def wrap(self, model: nn.Module, device: torch.device) -> nn.Module:
        """The model, still on the host, goes to the device a piece at a time: tensor parallelism places
        each parameter as it splits it, and `fully_shard` moves a block's parameters and keeps this rank's
        shard before it takes the next block. A model bigger than one device's memory never sits on one
        whole (`build_strategy` set the device the mesh places on)."""
        if self.layout.tensor > 1:
            self.split_logits = apply_tensor_parallel(model, self.mesh["tp"], self.loss_parallel)
        apply_activation_checkpointing(model, self.ac)
        self._kept_buffers = kept_buffers(model)
        dp = self.dp_mesh()
        if dp is None:  # tensor parallelism alone: what it did not split (norms, biases) goes whole
            return place(model, device)
        model = shard(model, dp, self.reshard_after_forward, self.param_dtype)
        if on_meta(model):  # `fully_shard` keeps a meta model's shards on the meta device
            place(model, device)
        # FSDP's (and HSDP's) collectives alone: under tensor parallelism its collectives, inside the
        # blocks' forward and backward, stay in compute. Over one shard there is no reduce-scatter to
        # time HSDP's all-reduce from: not measured.
        if self.layout.shard > 1:
            self.comm = measure_collectives(model, device, replicated=self.layout.replicate > 1)
        return model

    def forward_backward(self, model: nn.Module, micro_batches: list[Batch],
                         fns: StepFns) -> tuple[list[torch.Tensor], int]:
        losses, samples, last = [], 0, len(micro_batches) - 1
        self._local = None
        for i, batch in enumerate(micro_batches):
            if isinstance(model, FSDPModule):  # one reduce-scatter per step, after the last micro-batch
                model.set_requires_gradient_sync(i == last)
                model.set_reshard_after_backward(i == last)
            with loss_context(self.split_logits):
                loss, count = fns.loss(model, batch)
                loss = whole_loss(loss)
                fns.backward(loss)  # the last one's returns once the compute stream waits for the reductions
            if i == last and self.comm:
                self.comm.done()
            if i == 0 < last:
                self._local = self._first_local_grad(model, count)
            losses.append(loss.detach())
            samples += count
        self._sync_buffers(model)
        return losses, samples

    def _sync_buffers(self, model: nn.Module) -> None:
        sync_buffers(model, self._kept_buffers, self.dp_mesh() if self._kept_buffers else None)

    def _first_local_grad(self, model: nn.Module, count: int) -> LocalGrad | None:
        """The first micro-batch's gradient (`engine.noise`): not reduce-scattered nor resharded yet, so
        the parameters are the whole, unsharded ones with this rank's gradients. None with tensor
        parallelism (not measured yet) and with bf16 parameters (FSDP keeps their fp32 gradients aside)."""
        return measure_local(model.parameters(), count) if self.layout.tensor == 1 else None

    def local_grad(self) -> LocalGrad | None:
        return self._local

    def clip_grad_norm(self, model: nn.Module, max_norm: float | None) -> torch.Tensor:
        return clip_global(model.parameters(), max_norm)

    def evaluate(self, model: nn.Module, batches, fns: StepFns) -> dict[str, float]:
        with loss_context(self.split_logits):  # shares may differ by a micro-batch: every forward all-gathers
            return evaluate_each(model, batches, fns, alike=True)

    def take_comm_s(self) -> float | None:
        # On CPUs the all-gathers and reduce-scatters block the step: timed. On GPUs, the reductions'
        # exposed tail (`fsdp_comm`). Tensor parallelism's collectives are not measured.
        return self.comm.take() if self.comm else None

    def unwrap(self, model: nn.Module) -> nn.Module:
        return model  # fully_shard and parallelize_module change the model in place

