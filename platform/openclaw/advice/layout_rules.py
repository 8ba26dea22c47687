"""The rules that read the layout (pure; see `openclaw.advice.rules`): tensor-parallel groups split
across nodes, a pipeline whose schedule leaves its stages idle, and one whose stages are unequally
busy. Each is `rule(facts) -> Recommendation | None`, quiet when its fix is in place or its fact is
unknown."""
from __future__ import annotations

import statistics

from openclaw.advice import batching
from openclaw.advice.measured import Facts, Recommendation
from openclaw.engine.parallel.config import PER_STAGE
from openclaw.engine.parallel.layout_checks import stage_blocks
from openclaw.engine.parallel.mesh import mesh_layout

BUBBLE_FRAC = 0.2
"""A pipeline schedule idles its stages for more than this share of the step."""
IMBALANCE = 1.2
"""The busiest pipeline stage is busy more than this many times as long as the least busy one."""


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
    fits = max(t for t in range(1, tensor + 1) if tensor % t == 0 and all(n % t == 0 for n in per_node)
               and (t == 1 or batching.takes(f.config, {"parallelism.tensor": t})))
    finding = (f"tensor-parallel groups of {tensor} workers span up to {spanned} nodes (workers per node: "
               f"{', '.join(map(str, per_node))}): their collectives, several per block in every forward and "
               f"backward, cross the network")
    effect = (f"every tensor-parallel group within one node; the freed factor of {tensor // fits} goes to the "
              f"data-parallel degree")
    if fits == 1:
        effect += f"; or keep `tensor` and give every node a multiple of {tensor} workers"
    return Recommendation("tensor_across_nodes", finding, "parallelism.tensor", fits, effect, 0.0)


def bubble(stages: int, microbatches: int, per_rank: int = 1) -> float:
    """The share of a step each pipeline stage idles, filling and draining the pipeline, with stages that
    take equal time: (S - 1) / (v M + S - 1) for S ranks, M micro-batches and v stages per rank (the
    interleaved schedule's 2; GPipe's and 1F1B's 1)."""
    return (stages - 1) / (per_rank * microbatches + stages - 1)


def rule_pipeline_bubble(f: Facts) -> Recommendation | None:
    """A pipeline whose schedule idles each stage for over 20% of the step: more micro-batches per step
    (`parallelism.microbatches`, each a smaller slice of the same batch), the fewest giving each stage
    `PER_STAGE` of them (the interleaved schedule's two stages per rank: half as many), or as many as the
    batch allows. The share is the schedule's arithmetic for stages of equal time, and orders the advice
    as what is at stake; where the run measured its stages' waits (`perf/comm_frac`: the most-waiting
    rank's share of the step, the transfers and closing collectives in it too) the finding quotes that
    beside it."""
    cfg = f.config
    p = cfg.parallelism
    now = p.microbatches if isinstance(p.microbatches, int) else f.accumulation
    if p.pipeline == 1 or not now:
        return None
    v = p.stages_per_rank
    idle = bubble(p.pipeline, now, v)
    if idle <= BUBBLE_FRAC:
        return None
    shares = [cfg.train.global_batch_size // dp for dp in batching.dp_degrees(cfg)]
    counts = [n for n in range(now + 1, min(shares) + 1)
              if all(s % n == 0 for s in shares) and p.schedule_refuses(n) is None]
    if not counts:
        return None
    n = next((c for c in counts if c * v >= PER_STAGE * p.pipeline), counts[-1])
    after = bubble(p.pipeline, n, v)
    finding = (f"the {p.pipeline_schedule} schedule of {p.pipeline} stages runs {now} micro-batch(es) per step: "
               f"by its arithmetic each stage idles {idle:.0%} of the step filling and draining the pipeline")
    if f.comm_frac is not None:
        finding += f"; measured, a stage waited {f.comm_frac:.0%} of the step (transfers included)"
    effect = (f"{after:.0%} idle: up to {(1 - after) / (1 - idle):.2g}x samples/s, with pipeline micro-batches of "
              f"{min(shares) // n} sample(s) (a smaller slice of the same batch: each computes less efficiently)")
    return Recommendation("pipeline_bubble", finding, "parallelism.microbatches", n, effect, idle)


def stage_ranks(f: Facts) -> list[list[int]] | None:
    """The ranks at each pipeline position (each runs a stage; two, `pipeline` apart, under interleaved
    1F1B), for the world `rank_busy` was measured at (None: not measured)."""
    p = f.config.parallelism
    world = len(f.rank_busy or ())
    if not world or world % p.model_parallel:
        return None
    layout = mesh_layout(world, tensor=p.tensor, pipeline=p.pipeline)
    return [[r for r in range(world) if layout.coords(r)["pp"] == s] for s in range(p.pipeline)]


def stage_busy(f: Facts) -> list[float] | None:
    """Each pipeline position's busy share of the step: the median of its ranks' (`rank_busy`)."""
    stages = stage_ranks(f)
    return [statistics.median(f.rank_busy[r] for r in ranks) for ranks in stages] if stages else None


def _candidate_split(depth: int, ranks: int, per_rank: int, last: int) -> list[int]:
    """Blocks per stage (in stage order) giving the ranks but the last an even share of `depth - last`
    blocks and the last rank `last`, each rank's share split evenly over its stages (stages r, r + ranks,
    ... run on rank r)."""
    totals = [len(b) for b in stage_blocks(depth - last, ranks - 1)] + [last]
    split = [0] * (ranks * per_rank)
    for r, total in enumerate(totals):
        for k, part in enumerate(stage_blocks(total, per_rank)):
            split[r + k * ranks] = len(part)
    return split


def rule_pipeline_imbalance(f: Facts) -> Recommendation | None:
    """Pipeline ranks whose measured busy shares differ by over 1.2x: the busiest sets every rank's pace.
    A new `parallelism.pipeline_split`, from a model of the measurement: a block costs the same on every
    stage (its cost from the ranks that do not run the last stage: blocks, and at most the embeddings),
    and the last stage's head and loss cost what its rank's share leaves. A rank's work is its stages'
    (under interleaved 1F1B two, `pipeline` apart). The split whose busiest rank that model puts lowest,
    the fewest blocks moved among equals; at stake, the share of the step it saves. An estimate, and the
    finding says so."""
    p = f.config.parallelism
    busy = stage_busy(f) if p.pipeline > 1 and f.model_blocks else None
    if not busy or min(busy) <= 0 or max(busy) <= IMBALANCE * min(busy):
        return None
    depth, ranks, v = f.model_blocks, p.pipeline, p.stages_per_rank
    now = [len(b) for b in stage_blocks(depth, ranks * v, p.pipeline_split)]

    def held(split: list[int], r: int) -> int:
        return sum(split[r::ranks])
    per_block = statistics.median(busy[r] / held(now, r) for r in range(ranks - 1))
    head = max(0.0, busy[-1] - held(now, ranks - 1) * per_block)

    def slowest(split: list[int]) -> float:
        return max(held(split, r) * per_block + (head if r == ranks - 1 else 0.0) for r in range(ranks))
    splits = [_candidate_split(depth, ranks, v, last) for last in range(v, depth - (ranks - 1) * v + 1)]
    best = min(splits, key=lambda sp: (slowest(sp), sum(abs(a - b) for a, b in zip(sp, now))))
    if best == now or slowest(best) >= max(busy):
        return None
    shares, unit = ', '.join(f'{b:.0%}' for b in busy), "stage" if v == 1 else "rank"
    finding = (f"the pipeline's stages are busy {shares} of the step with {now} blocks each" if v == 1 else
               f"the pipeline's ranks are busy {shares} of the step, each running {v} of the stages of {now} "
               f"blocks (rank r stages r, r + {ranks}, ...)") + f": the busiest sets every {unit}'s pace"
    effect = (f"{unit}s busy at most about {slowest(best):.0%}: up to "
              f"{max(busy) / slowest(best):.2g}x samples/s (estimated: a block costs the same on every stage, "
              f"the last stage's head and loss on top)")
    return Recommendation("pipeline_imbalance", finding, "parallelism.pipeline_split", best, effect,
                          1 - slowest(best) / max(busy))
