"""Tensor parallelism (plain torch; worker process): each large matrix split over the ranks of a tensor-
parallel group, with torch's DTensor plans (`parallelize_module`).

The built-in gpt's plan, per block: q, k, v and the MLP's first layer column-wise (each rank computes
its heads and its slice of the hidden layer), the attention's output projection and the MLP's second
layer row-wise (their outputs summed over the group). The layer norms run sequence-parallel: between
blocks each rank holds a slice of the sequence, so their activations are not replicated. The
embeddings are split by vocabulary row; the output head column-wise, its logits gathered whole (no loss
parallelism: the task computes the loss on whole logits). A user's model opts in with a method
`parallelize_plan(mesh)` that returns such a plan.
"""
from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

from openclaw.engine.models import GPT, retie, tied_parameters
from openclaw.engine.parallel.layout_checks import check_tensor_parallel


def gpt_plan(model: GPT) -> dict:
    first = next(iter(model.blocks))
    plan = {
        # the embeddings' sum stays replicated (a DTensor plus a plain tensor is refused); block 0 slices it
        "tok": RowwiseParallel(input_layouts=Replicate()),
        "pos": RowwiseParallel(input_layouts=Replicate()),
        f"blocks.{first}": PrepareModuleInput(input_layouts=(Replicate(),), desired_input_layouts=(Shard(1),),
                                              use_local_output=False),
        "ln": SequenceParallel(),
        "head": ColwiseParallel(input_layouts=Shard(1), output_layouts=Replicate()),
    }
    for i in model.blocks:
        b = f"blocks.{i}"
        plan.update({
            f"{b}.ln1": SequenceParallel(), f"{b}.ln2": SequenceParallel(),
            f"{b}.attn": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
            f"{b}.attn.q": ColwiseParallel(), f"{b}.attn.k": ColwiseParallel(), f"{b}.attn.v": ColwiseParallel(),
            f"{b}.attn.proj": RowwiseParallel(output_layouts=Shard(1), use_local_output=False),
            f"{b}.mlp": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
            f"{b}.mlp.0": ColwiseParallel(),
            f"{b}.mlp.2": RowwiseParallel(output_layouts=Shard(1), use_local_output=False),
        })
    return plan


def apply_tensor_parallel(model: nn.Module, mesh: DeviceMesh) -> nn.Module:
    """Split `model` over the tensor-parallel `mesh`, keeping its tied parameters tied."""
    check_tensor_parallel(model, mesh.size())
    tied = tied_parameters(model)
    plan = gpt_plan(model) if isinstance(model, GPT) else model.parallelize_plan(mesh)
    parallelize_module(model, mesh, plan)
    retie(model, tied)  # parallelize_module gives each module a new parameter: tie them again
    return model
