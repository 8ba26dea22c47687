"""The rule that reads where the workers sit (pure; see `openclaw.advice.rules`): tensor-parallel groups
split across nodes. `rule(facts) -> Recommendation | None`, quiet when every group is on one node or
the placement was not recorded."""
from __future__ import annotations

from openclaw.advice.measured import Facts, Recommendation


def rule_tensor_across_nodes(f: Facts) -> Recommendation | None:
    """A tensor-parallel group on more than one node: its collectives (several per block, in every
    forward and backward) cross the network instead of the node's own links. Ray Train numbers a node's
    workers consecutively, so a `parallelism.tensor` that divides every node's worker count keeps each
    group on one node: the largest such divisor of the current degree is the fix (1 where only that
    fits, with the other fix named: nodes holding a multiple of the degree). The collectives' share of
    the step is not measured under tensor parallelism, so nothing is quoted as at stake."""
    tensor, spanned, per_node = f.config.parallelism.tensor, f.tensor_group_nodes, f.workers_per_node
    if tensor == 1 or not spanned or spanned < 2 or not per_node:
        return None
    fits = max(t for t in range(1, tensor + 1) if tensor % t == 0 and all(n % t == 0 for n in per_node))
    finding = (f"tensor-parallel groups of {tensor} workers span up to {spanned} nodes (workers per node: "
               f"{', '.join(map(str, per_node))}): their collectives, several per block in every forward and "
               f"backward, cross the network")
    effect = (f"every tensor-parallel group within one node; the freed factor of {tensor // fits} goes to the "
              f"data-parallel degree")
    if fits == 1:
        effect += f"; or keep `tensor` and give every node a multiple of {tensor} workers"
    return Recommendation("tensor_across_nodes", finding, "parallelism.tensor", fits, effect, 0.0)
