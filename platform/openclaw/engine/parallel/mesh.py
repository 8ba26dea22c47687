"""Where each rank sits in the device mesh: pure arithmetic of plain integers (no torch.distributed), so
layouts we cannot run (64 ranks as 4 x 4 x 4) are unit-tested (worker process).

The mesh's dimensions, outermost first: pipeline stages, data-parallel replicas (HSDP's replicate),
data-parallel shards, tensor parallelism. Ranks are laid out row-major, so tensor-parallel ranks are
neighbours (on one node, where their frequent collectives are cheapest) and pipeline stages are
farthest apart (their point-to-point traffic is the lightest), as torchtitan lays them out.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

DIM_NAMES = ("pp", "dp_replicate", "dp_shard", "tp")


@dataclass(frozen=True)
class MeshLayout:
    pipeline: int
    replicate: int
    shard: int
    tensor: int

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.pipeline, self.replicate, self.shard, self.tensor)

    @property
    def world(self) -> int:
        return math.prod(self.shape)

    @property
    def dp(self) -> int:
        """The data-parallel degree: how many different batches one optimizer step trains on."""
        return self.replicate * self.shard

    def coords(self, rank: int) -> dict[str, int]:
        if not 0 <= rank < self.world:
            raise ValueError(f"rank {rank} outside a world of {self.world}")
        out = {}
        for name, size in zip(reversed(DIM_NAMES), reversed(self.shape)):
            rank, out[name] = divmod(rank, size)
        return {name: out[name] for name in DIM_NAMES}

    def rank_of(self, coords: dict[str, int]) -> int:
        rank = 0
        for name, size in zip(DIM_NAMES, self.shape):
            rank = rank * size + coords[name]
        return rank

    def dp_rank(self, rank: int) -> int:
        """Which share of the global batch `rank` trains on: ranks of one tensor or pipeline group share it."""
        c = self.coords(rank)
        return c["dp_replicate"] * self.shard + c["dp_shard"]

    def counts_its_share(self, rank: int) -> bool:
        """Whether `rank` counts its data-parallel share's samples and loss in a run's totals: the first of
        the ranks that train on that share (its tensor and pipeline peers report the same samples and
        loss, so a sum over every rank counts each sample once per peer)."""
        c = self.coords(rank)
        return c["pp"] == 0 and c["tp"] == 0

    def group(self, dims: tuple[str, ...] | str, rank: int) -> list[int]:
        """The ranks that differ from `rank` only along `dims` (the members of its group there)."""
        dims = (dims,) if isinstance(dims, str) else dims
        c = self.coords(rank)
        ranks = [c]
        for name in dims:
            size = self.shape[DIM_NAMES.index(name)]
            ranks = [{**r, name: i} for r in ranks for i in range(size)]
        return sorted(self.rank_of(r) for r in ranks)

    def groups(self, dims: tuple[str, ...] | str) -> list[list[int]]:
        """Every group along `dims`, each once: what `dist.new_group` must be called for on every rank."""
        seen: dict[tuple[int, ...], None] = {}
        for rank in range(self.world):
            seen.setdefault(tuple(self.group(dims, rank)), None)
        return [list(g) for g in seen]


def nodes_spanned(layout: MeshLayout, node_of_rank: list[int], dims: tuple[str, ...] | str = "tp") -> int:
    """The most nodes any group along `dims` spans, given each rank's node (`node_of_rank[rank]`, as Ray
    Train numbers them): 1 where every group sits within one node. Ray Train gives the workers of a node
    consecutive ranks, so with `tensor` dividing every node's worker count each tensor-parallel group is on
    one node; an uneven node (an elastic run grown onto a half-free machine) or a `tensor` larger than a
    node splits some across the network."""
    if len(node_of_rank) != layout.world:
        raise ValueError(f"{len(node_of_rank)} node numbers for a world of {layout.world}")
    return max(len({node_of_rank[r] for r in group}) for group in layout.groups(dims))


def whole_layouts(workers: int, unit: int) -> int:
    """The most workers, at most `workers`, that lay out as whole layouts of `unit` workers (the world
    sizes `ParallelismConfig.worlds` allows)."""
    return workers // unit * unit


def mesh_layout(world: int, replicate: int = 1, tensor: int = 1, pipeline: int = 1) -> MeshLayout:
    """The layout of `world` ranks: the data-parallel shard degree is what is left after the others."""
    fixed = replicate * tensor * pipeline
    if world % fixed:
        raise ValueError(f"a world of {world} rank(s) cannot be laid out as replicate {replicate} x tensor {tensor} "
                         f"x pipeline {pipeline} x shard: {world} is not a multiple of {fixed}")
    return MeshLayout(pipeline=pipeline, replicate=replicate, shard=world // fixed, tensor=tensor)
