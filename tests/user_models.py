"""Models a user might name in `model.name` (`tests.user_models:<function>`): built by the tests that need
a model the built-ins are not."""
from __future__ import annotations

import torch
from torch import nn


class ReadsAValue(nn.Module):
    """An MLP whose forward reads a tensor's value (a data-dependent branch): it cannot run on fake
    tensors, which have no values."""

    def __init__(self, in_features: int, hidden: int, num_classes: int):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(in_features, hidden), nn.GELU(), nn.Linear(hidden, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.abs().max().item() > 1e6:  # a guard some models keep
            x = x.clamp(-1e6, 1e6)
        return self.body(x)


def reads_a_value(in_features: int = 64, hidden: int = 128, num_classes: int = 10, **_) -> nn.Module:
    return ReadsAValue(in_features, hidden, num_classes)


class KeepsACache(nn.Module):
    """An MLP with a buffer left out of its state dict (`persistent=False`): a checkpoint or a broadcast of
    the state dict would not carry it."""

    def __init__(self, in_features: int, num_classes: int):
        super().__init__()
        self.body = nn.Linear(in_features, num_classes)
        self.register_buffer("scale", torch.full((in_features,), 0.5), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x * self.scale)


def keeps_a_cache(in_features: int = 64, num_classes: int = 10, **_) -> nn.Module:
    return KeepsACache(in_features, num_classes)


def built_from_a_value(in_features: int = 64, num_classes: int = 10, **_) -> nn.Module:
    """A constructor that reads a tensor's value (a width computed from data): it cannot run on the meta
    device."""
    hidden = int(torch.tensor([2.0 * in_features]).item())
    return nn.Sequential(nn.Linear(in_features, hidden), nn.Linear(hidden, num_classes))


class BlockStack(nn.Module):
    """A classifier of residual MLP blocks kept in `self.blocks`, as a user's transformer keeps its layers:
    FSDP shards them one by one, and activation checkpointing recomputes them."""

    def __init__(self, in_features: int, hidden: int, depth: int, num_classes: int):
        super().__init__()
        self.inp = nn.Linear(in_features, hidden)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, 4 * hidden), nn.GELU(), nn.Linear(4 * hidden, hidden))
            for _ in range(depth))
        self.out = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.inp(x.flatten(1).float())
        for block in self.blocks:
            x = x + block(x)
        return self.out(x)


def block_stack(in_features: int = 64, hidden: int = 64, depth: int = 3, num_classes: int = 10, **_) -> nn.Module:
    return BlockStack(in_features, hidden, depth, num_classes)


class StagedStack(nn.Module):
    """A small language model shaped as a pipeline splits it (torchtitan's convention): its blocks in an
    `nn.ModuleDict`, the modules before and after them named in `pipeline_ends`, a forward that skips what
    a stage does not hold. The head shares the embedding's matrix (with `tied`)."""
    pipeline_ends = (["embed"], ["norm", "head"])

    def __init__(self, vocab_size: int, dim: int, depth: int, tied: bool):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, dim)
        self.blocks = nn.ModuleDict({str(i): nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 2 * dim), nn.GELU(),
                                                           nn.Linear(2 * dim, dim)) for i in range(depth)})
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab_size, bias=False)
        if tied:
            self.head.weight = self.embed.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.embed is not None:
            x = self.embed(x.long())
        for block in self.blocks.values():
            x = x + block(x)
        return self.head(self.norm(x)) if self.head is not None else x


def staged_stack(vocab_size: int = 64, dim: int = 32, depth: int = 4, tied: bool = True, **_) -> nn.Module:
    return StagedStack(vocab_size, dim, depth, tied)


def untied_stack(vocab_size: int = 64, dim: int = 32, depth: int = 4, **_) -> nn.Module:
    return StagedStack(vocab_size, dim, depth, tied=False)


class PlannedStack(StagedStack):
    """A staged stack that says how tensor parallelism splits it (`parallelize_plan`): each block's first
    linear by column, its second by row (whole, replicated activations between them), the embedding and
    head whole. Asked of the whole model, it names every block; a pipeline stage keeps its blocks' entries."""

    def parallelize_plan(self, mesh) -> dict:
        from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel
        plan = {}
        for key in self.blocks:
            plan[f"blocks.{key}.1"], plan[f"blocks.{key}.3"] = ColwiseParallel(), RowwiseParallel()
        return plan


def planned_stack(vocab_size: int = 64, dim: int = 32, depth: int = 4, **_) -> nn.Module:
    return PlannedStack(vocab_size, dim, depth, tied=True)


class MisplannedStack(StagedStack):
    """A planned stack whose plan has a typo: `blocks.*.l` for the blocks' first linear (`blocks.*.1`)."""

    def parallelize_plan(self, mesh) -> dict:
        from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel
        return {"blocks.*.l": ColwiseParallel(), "blocks.*.3": RowwiseParallel()}


def misplanned_stack(vocab_size: int = 64, dim: int = 32, depth: int = 4, **_) -> nn.Module:
    return MisplannedStack(vocab_size, dim, depth, tied=True)


class MistiedStack(StagedStack):
    """A planned stack whose plan splits the head (by column: the tied matrix's rows) and leaves the
    embedding that shares its matrix whole."""

    def parallelize_plan(self, mesh) -> dict:
        from torch.distributed.tensor.parallel import ColwiseParallel
        return {"head": ColwiseParallel()}


def mistied_stack(vocab_size: int = 64, dim: int = 32, depth: int = 4, **_) -> nn.Module:
    return MistiedStack(vocab_size, dim, depth, tied=True)


class LooseParameter(StagedStack):
    """A staged stack with a parameter of its own, in no block and no end: no stage would own it."""

    def __init__(self, vocab_size: int, dim: int, depth: int):
        super().__init__(vocab_size, dim, depth, tied=False)
        self.gate = nn.Parameter(torch.ones(dim))


def loose_parameter(vocab_size: int = 64, dim: int = 32, depth: int = 4, **_) -> nn.Module:
    return LooseParameter(vocab_size, dim, depth)


class StagedClassifier(nn.Module):
    """A classifier of residual blocks shaped as a pipeline splits it (see `StagedStack`)."""
    pipeline_ends = (["inp"], ["out"])

    def __init__(self, in_features: int, hidden: int, depth: int, num_classes: int):
        super().__init__()
        self.inp = nn.Linear(in_features, hidden)
        self.blocks = nn.ModuleDict({str(i): nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, hidden), nn.GELU())
                                     for i in range(depth)})
        self.out = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.inp is not None:
            x = self.inp(x.flatten(1).float())
        for block in self.blocks.values():
            x = x + block(x)
        return self.out(x) if self.out is not None else x


def staged_classifier(in_features: int = 64, hidden: int = 32, depth: int = 4, num_classes: int = 10,
                      **_) -> nn.Module:
    return StagedClassifier(in_features, hidden, depth, num_classes)


class NormedStages(StagedClassifier):
    """A staged classifier whose blocks hold BatchNorm (running statistics: buffers a checkpoint keeps)."""

    def __init__(self, in_features: int, hidden: int, depth: int, num_classes: int):
        super().__init__(in_features, hidden, depth, num_classes)
        self.blocks = nn.ModuleDict({str(i): nn.Sequential(nn.Linear(hidden, hidden), nn.BatchNorm1d(hidden), nn.GELU())
                                     for i in range(depth)})


def normed_stages(in_features: int = 4, hidden: int = 8, depth: int = 2, num_classes: int = 2, **_) -> nn.Module:
    return NormedStages(in_features, hidden, depth, num_classes)


class NarrowEmbedding(nn.Module):
    """A language model whose input embedding has fewer rows than its head scores tokens. `BUILDS` counts
    its constructions in this process (how often a check builds it)."""
    BUILDS = 0

    def __init__(self, rows: int, vocab_size: int):
        super().__init__()
        NarrowEmbedding.BUILDS += 1
        self.embed, self.head = nn.Embedding(rows, 8), nn.Linear(8, vocab_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(x))


def narrow_embedding(rows: int = 50, vocab_size: int = 300, **_) -> nn.Module:
    return NarrowEmbedding(rows, vocab_size)


class DropStack(PlannedStack):
    """A planned stack with dropout on each block's (replicated) output, as a transformer's residual
    dropout: the tensor-parallel peers must draw the same masks."""

    def __init__(self, *args, p: float = 0.1, **kwargs):
        super().__init__(*args, **kwargs)
        for block in self.blocks.values():
            block.append(nn.Dropout(p))


def drop_stack(vocab_size: int = 64, dim: int = 32, depth: int = 4, p: float = 0.1, **_) -> nn.Module:
    return DropStack(vocab_size, dim, depth, tied=True, p=p)
