"""The rules table (pure: plain values in, decisions out; runs in whichever process asks: the driver at
the end of a run, `openclaw advise`, rank 0 after a profile).

Each rule is one small function `rule(facts) -> Recommendation | None`: it reads the measured `Facts`
and the run's config, and returns a recommendation that quotes the measurement and names the config
key to change, or nothing. A rule stays quiet when its fix is already in place, and when the fact it
reads was not measured (None). `advise` runs them all and orders what fired by what is at stake.

    rule               fires when                                        suggests
    data_wait          data wait > 5% of the step                        micro-batch x2 (or CPUs for reads)
    data_preparation   preparing the data > 5% of the run (cache miss)   data.cache.dir pinned
    exposed_comm       exposed collectives > 10% of the step             FSDP reshard, micro-batch; DDP buckets; global batch
    straggler          slowest rank > 1.2x the median rank               (its node: no key)
    checkpoint_stall   checkpoint stalls > 5% of the step                checkpoint.async or every_steps
    small_micro_batch  micro-batch computes in < 2 ms, accumulation > 1  micro-batch up to the worker's batch
    launch_bound       no kernel running > 10% of profiled steps         train.compile (mode reduce-overhead)
    no_autocast        fp32 on tensor cores (7.0+)                       train.precision bf16 / fp16
    no_tf32            fp32 without TF32 on 8.0+                         train.tf32
    less_recompute     blocks recomputed, a GPU's peak < 60% of it       activation_checkpointing a step down
    memory_headroom    a GPU's peak memory < 60% of it                   train.micro_batch_size auto / larger
    memory_high        peak memory > 90%                                 activation checkpointing, FSDP, smaller
    graph_breaks       graph breaks under compile                        train.compile.fullgraph
    low_mfu            MFU < 50% on a GPU in the peak table, eager       train.compile
    critical_batch     global batch < 0.25x or > 4x grad_noise_scale     global batch near it, LR by lr_rule
    tensor_across_nodes  a tensor-parallel group spans nodes             parallelism.tensor dividing each node's workers
    pipeline_bubble    the schedule idles stages > 20% of the step       parallelism.microbatches, 4 per stage
    pipeline_imbalance  one pipeline rank busy > 1.2x another (measured) parallelism.pipeline_split, balanced
"""
from __future__ import annotations

from dataclasses import replace
from typing import Callable

from openclaw.advice import batching
from openclaw.advice.device_rules import (rule_critical_batch, rule_graph_breaks, rule_launch_bound,
                                          rule_less_recompute, rule_low_mfu, rule_memory_headroom, rule_memory_high,
                                          rule_no_autocast, rule_no_tf32)
from openclaw.advice.layout_rules import rule_pipeline_bubble, rule_pipeline_imbalance, rule_tensor_across_nodes
from openclaw.advice.measured import Facts, Recommendation
from openclaw.advice.render import line
from openclaw.advice.step_rules import (rule_checkpoint_stall, rule_data_preparation, rule_data_wait,
                                        rule_exposed_comm, rule_small_micro_batch, rule_straggler)

__all__ = ["Facts", "Recommendation", "Rule", "RULES", "advise", "data_wait_line", "placement_line"]

Rule = Callable[[Facts], "Recommendation | None"]
RULES: list[Rule] = [rule_data_wait, rule_data_preparation, rule_exposed_comm, rule_straggler, rule_checkpoint_stall,
                     rule_small_micro_batch, rule_launch_bound, rule_no_autocast, rule_no_tf32, rule_less_recompute,
                     rule_memory_headroom, rule_memory_high, rule_graph_breaks, rule_low_mfu, rule_critical_batch,
                     rule_tensor_across_nodes, rule_pipeline_bubble, rule_pipeline_imbalance]
"""The rules, in the order they are documented; `advise` orders their findings by `at_stake`."""


def advise(facts: Facts, rules: list[Rule] | None = None) -> list[Recommendation]:
    """Every rule's recommendation for these facts, the one with the most at stake first. Where two rules
    name the same key, the one with more at stake speaks (a key takes one value)."""
    found = [_checked(r, facts.config) for r in (rule(facts) for rule in (RULES if rules is None else rules))
             if r is not None]
    ordered, keys = [], set()
    for rec in sorted(found, key=lambda r: -r.at_stake):
        if rec.key is None or rec.key not in keys:
            ordered.append(rec)
            keys.add(rec.key)
    return ordered


def _checked(rec: Recommendation, config) -> Recommendation:
    """A recommendation whose value the config would refuse keeps its finding, without the change: the
    rules search for values the config takes, and this is the one place that holds them to it."""
    why = batching.refusal(config, {rec.key: rec.value}) if rec.key is not None else None
    if why is None:
        return rec
    return replace(rec, key=None, value=None,
                   effect=f"{rec.effect}; but `{rec.key}={rec.value}` is one the config refuses here ({why})")


def data_wait_line(config, data_wait_frac: float, read_share: float, world: int) -> str | None:
    """The mid-run advice line (rank 0, once a run): `rule_data_wait` on one log window, when it fires."""
    rec = rule_data_wait(Facts(config, data_wait_frac=data_wait_frac, read_share=read_share, world_size=world))
    return f"advice: {line(_checked(rec, config))}" if rec else None


def placement_line(config, tensor_group_nodes: int, workers_per_node: tuple[int, ...]) -> str | None:
    """The attempt's start-up advice line (rank 0, each attempt): `rule_tensor_across_nodes` on where this
    attempt's workers sit, when it fires."""
    rec = rule_tensor_across_nodes(Facts(config, tensor_group_nodes=tensor_group_nodes,
                                         workers_per_node=workers_per_node))
    return f"advice: {line(_checked(rec, config))}" if rec else None
