"""Tensor parallelism (plain torch; worker process): each large matrix split over the ranks of a tensor-
parallel group, with torch's DTensor plans (`parallelize_module`).

The built-in gpt's plan, per block: q, k, v and the MLP's first layer column-wise (each rank computes
its heads and its slice of the hidden layer), the attention's output projection and the MLP's second
layer row-wise (their outputs summed over the group). The layer norms run sequence-parallel: between
blocks each rank holds a slice of the sequence, so their activations are not replicated. The
embeddings are split by vocabulary row; the output head column-wise. With loss parallelism (the
default for language modeling) its logits stay split by vocabulary, and the cross-entropy runs on the
split logits under torch's `loss_parallel` (`loss_context`); without it they are gathered whole. A
user's model opts in with a method `parallelize_plan(mesh)` that returns such a plan.
"""
from __future__ import annotations

import contextlib
from fnmatch import fnmatch
from typing import ContextManager

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    ParallelStyle,
    RowwiseParallel,
    SequenceParallel,
    loss_parallel,
    parallelize_module,
)

from openclaw.engine.models import GPT, retie, tied_parameters
from openclaw.engine.parallel.layout_checks import check_tensor_parallel
from openclaw.errors import ConfigError


def gpt_plan(model: GPT, loss_parallel: bool = False) -> dict:
    """`loss_parallel`: the head's logits stay a DTensor split by vocabulary (`Shard(-1)`), for a loss
    computed under `loss_context`; else they are gathered whole (`Replicate`). A pipeline stage's part
    (`pp`: the ends it does not hold are None, the other stages' blocks removed) gets the plan of what
    it holds; between stages each rank passes on its slice of the sequence (`pp_stage.StageView`)."""
    logits = Shard(-1) if loss_parallel else Replicate()
    plan: dict = {}
    if model.tok is not None:
        plan.update({
            # the embeddings' sum stays replicated (a DTensor plus a plain tensor is refused); block 0 slices it
            "tok": RowwiseParallel(input_layouts=Replicate()),
            "pos": RowwiseParallel(input_layouts=Replicate()),
            f"blocks.{next(iter(model.blocks))}": PrepareModuleInput(
                input_layouts=(Replicate(),), desired_input_layouts=(Shard(1),), use_local_output=False)})
    if model.head is not None:
        plan.update({"ln": SequenceParallel(),
                     "head": ColwiseParallel(input_layouts=Shard(1), output_layouts=logits,
                                             use_local_output=not loss_parallel)})
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


def whole_activations(model: nn.Module, loss_parallel: bool) -> tuple[list[str], str | None] | None:
    """Under the built-in gpt's plan, the activations every rank of the group holds whole: the inputs of
    the column-wise layers (q, k, v, the MLP's first layer and the head gather theirs from the sequence
    slices), and without loss parallelism everything from the head's gathered logits on. As (those
    modules' names, the module after which all is whole or None). Every other activation is split: the
    heads, the MLP's hidden layer, the sequence-parallel norms. None for another model: its own plan."""
    if not isinstance(model, GPT):
        return None
    plan = gpt_plan(model, loss_parallel)
    return [name for name, style in plan.items() if isinstance(style, ColwiseParallel)], \
        None if loss_parallel else "head"


def apply_tensor_parallel(model: nn.Module, mesh: DeviceMesh, loss_parallel: bool = False,
                          plan: dict | None = None) -> bool:
    """Split `model` over the tensor-parallel `mesh` in place, keeping its tied parameters tied. Returns
    whether its output is split logits, which its loss needs `loss_context` for (the built-in gpt with
    `loss_parallel`; a user's plan gives what it gives). `plan`: a user's model's plan, where the caller
    asked it of another copy (a pipeline stage's part is asked of the whole model: `pp_stage.held_plan`)."""
    check_tensor_parallel(model, mesh.size())
    tied = tied_parameters(model)
    split = loss_parallel and isinstance(model, GPT)
    if isinstance(model, GPT):
        plan = gpt_plan(model, split)
    elif plan is None:
        plan = checked_plan(model, model.parallelize_plan(mesh))
    parallelize_module(model, mesh, plan)
    check_ties_alike(model, [(a, b, split_of(model.get_parameter(a)), split_of(model.get_parameter(b)))
                             for a, b in tied])
    retie(model, tied)  # parallelize_module gives each module a new parameter: tie them again
    return split


def checked_plan(model: nn.Module, plan) -> dict:
    """A user's `parallelize_plan`, asked of the whole `model`, checked as torch resolves it: a dict of
    module paths (`*`, `?` and `[...]` match a name at their level, as in `parallelize_module`) to
    parallel styles. A key that matches no module would be skipped by torch with a warning, leaving
    that module whole on every rank (a typo costs the split silently): a `ConfigError` names it."""
    name = f"{type(model).__name__}.parallelize_plan"
    if not isinstance(plan, dict) or not all(isinstance(k, str) and isinstance(v, ParallelStyle) for k, v in plan.items()):
        raise ConfigError(f"`{name}(mesh)` returned {type(plan).__name__}: it must return a dict of module paths "
                          f"to torch parallel styles (ColwiseParallel(), RowwiseParallel(), ...).")
    for key in plan:
        why = unresolved(model, key)
        if why:
            raise ConfigError(f"`{name}(mesh)` names {key!r}, which matches no module of the model ({why}): torch "
                              f"would skip it and leave that module whole on every rank. Give the module's path "
                              f"as `model.named_modules()` names it.")
    return plan


def split_of(p: torch.Tensor) -> str:
    """How tensor parallelism left a parameter: its placements, or whole."""
    return f"split {', '.join(map(repr, p.placements))}" if isinstance(p, DTensor) else "whole"


def check_ties_alike(model: nn.Module, ties: list[tuple[str, str, str, str]]) -> None:
    """Each (name, other name, how the plan split the one, the other) of a tied parameter: both names must
    be split alike (the gpt splits its embedding's and its head's rows, the vocabulary), or the one
    matrix the two share would be given two layouts (and a pipeline would sum unlike slices of it)."""
    for a, b, split_a, split_b in ties:
        if split_a != split_b:
            raise ConfigError(f"`{type(model).__name__}.parallelize_plan(mesh)` splits the tied parameter "
                              f"{a!r} ({split_a}) and {b!r} ({split_b}) unalike: the matrix they share must be "
                              f"split alike under both names, or not at all (an embedding `RowwiseParallel()` and "
                              f"its head `ColwiseParallel()` both split its rows, as the built-in gpt's plan does).")


def unresolved(model: nn.Module, key: str) -> str | None:
    """Why a plan key names no module of `model`, resolved as torch resolves it (one `fnmatch` pattern per
    level of the path, against the names of the children of what the levels before it matched); None
    where it names one."""
    found, done = [model], []
    for atom in key.split(".") if key else []:
        children = [(n, c) for m in found for n, c in m.named_children()]
        found = [c for n, c in children if fnmatch(n, atom)]
        if not found:
            at = f"under {'.'.join(done)!r}" if done else "at the top"
            names = sorted({n for n, _ in children})
            return (f"no module {at} is named {atom!r}; there: {', '.join(names[:8])}{', ...' if len(names) > 8 else ''}"
                    if names else f"{'.'.join(done)!r} holds no modules")
        done.append(atom)
    return None


def loss_context(split_logits: bool) -> ContextManager:
    """Where a loss of split logits is computed and back-propagated: torch's `loss_parallel` (its
    cross-entropy reduces the per-token maxima and sums over the group instead of gathering the logits)."""
    return loss_parallel() if split_logits else contextlib.nullcontext()


def whole_loss(loss: torch.Tensor) -> torch.Tensor:
    """A loss computed on split logits is a replicated DTensor: the plain tensor every rank holds, still
    differentiable (the engine adds and scales plain tensors)."""
    return loss.full_tensor() if isinstance(loss, DTensor) else loss
