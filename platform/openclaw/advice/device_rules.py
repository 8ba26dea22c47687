"""The rules that read how the device is used (pure; see `openclaw.advice.rules`): launch gaps, precision,
memory, compilation, MFU, and the batch against the critical batch. Each is `rule(facts) ->
Recommendation | None`, quiet when its fix is in place or its fact was not measured."""
from __future__ import annotations

from typing import Any

from openclaw.advice import batching
from openclaw.advice.measured import Facts, Recommendation
from openclaw.engine.flops import peak_flops

KERNEL_IDLE_FRAC = 0.10
"""After a GPU profile: no kernel running for more than this share of the profiled steps."""
MEMORY_HEADROOM_FRAC = 0.40
"""A GPU's peak memory leaves more than this share of it unused."""
MEMORY_HIGH_FRAC = 0.90
"""The peak memory is above this share of the capacity."""
MFU_LOW = 0.5
"""MFU under half of the device's peak."""
RECOMPUTE_STEP_DOWN = {"full": ("selective", 74.2 / 14.0, 1 - 770.5 / 973.9),
                       "selective": ("none", 134.3 / 74.2, 1 - 754.3 / 770.5)}
"""For each `parallelism.activation_checkpointing` but `none`: the one below it, how many times the bytes
saved for the backward grow going there, and the share of the step's time that saves, as
`bench/activation_checkpointing.py` measured them on the gpt (saved bytes none 134.3, selective 74.2,
full 14.0 MiB; steps 754.3, 770.5 and 973.9 ms): estimates for another model."""
CRITICAL_BATCH_LOW, CRITICAL_BATCH_HIGH = 0.25, 4.0
"""The global batch over the measured critical batch (`grad_noise_scale`): far below, or far above."""


def _compute_share(f: Facts) -> float:
    """The share of the step that the device's speed decides (compute, not data or checkpoints)."""
    if f.compute_frac is not None:
        return max(0.0, f.compute_frac - (f.comm_frac or 0.0))
    return max(0.0, 1.0 - (f.data_wait_frac or 0.0) - (f.checkpoint_frac or 0.0) - (f.comm_frac or 0.0))


def _compile_key(config: Any, option: str, value: Any) -> tuple[str, Any]:
    """`train.compile.<option>`, or (`train.compile: true` being a value, not a section) the whole section."""
    if isinstance(config.train.compile, bool):
        return "train.compile", {option: value}
    return f"train.compile.{option}", value


def _peak_ratio(f: Facts, to: str, to_tf32: bool = False) -> float | None:
    """How many times the device's peak for `to` is its peak for what the run used (a GPU in the table)."""
    if not f.device_name or not f.precision:
        return None
    now, then = peak_flops(f.device_name, f.precision, bool(f.tf32)), peak_flops(f.device_name, to, to_tf32)
    return then / now if now and then else None


def rule_launch_bound(f: Facts) -> Recommendation | None:
    """After a GPU profile, no kernel runs for over 10% of the steps' compute (forward/backward and optimizer;
    data waits and checkpoints are other rules'): the host launches too slowly. Compile
    (fewer, fused kernels); compiled already, CUDA graphs (`mode: reduce-overhead`) remove the gaps."""
    idle, cfg = f.kernel_idle_frac, f.config
    if idle is None or idle <= KERNEL_IDLE_FRAC or f.device_type != "cuda":
        return None
    finding = (f"the GPU runs no kernel for {idle:.0%} of the profiled steps' forward, backward and optimizer: "
               f"they are launch-bound")
    at_stake = idle * (f.compute_frac if f.compute_frac is not None else 1.0)  # of the whole step
    if not cfg.train.compile:
        return Recommendation("launch_bound", finding, "train.compile", True,
                              f"fewer, fused kernels: up to {1 / (1 - at_stake):.2f}x samples/s", at_stake)
    if isinstance(cfg.train.compile, bool) or cfg.train.compile.mode == "default":
        key, value = _compile_key(cfg, "mode", "reduce-overhead")
        return Recommendation("launch_bound", finding, key, value,
                              f"CUDA graphs replay each unit's kernels without launch gaps: up to "
                              f"{1 / (1 - at_stake):.2f}x samples/s", at_stake)
    return None


def rule_no_autocast(f: Facts) -> Recommendation | None:
    """fp32 on a GPU with tensor cores (compute capability 7.0+): bf16 autocast (8.0+) or fp16 with loss
    scaling (7.x). Quiet in bf16 or fp16."""
    cap = f.capability
    if f.device_type != "cuda" or cap is None or cap < (7, 0) or f.precision != "fp32":
        return None
    to = "bf16" if cap >= (8, 0) else "fp16"
    ratio = _peak_ratio(f, to)
    effect = (f"{ratio:.1f}x the device's peak FLOP/s for the matmuls" if ratio else
              "matmuls on the 16-bit tensor cores") + ", and half the activation memory"
    return Recommendation("no_autocast", f"the run trains in fp32 on a GPU of compute capability "
                          f"{cap[0]}.{cap[1]}, whose tensor cores run 16-bit matmuls", "train.precision", to,
                          effect, _compute_share(f))


def rule_no_tf32(f: Facts) -> Recommendation | None:
    """fp32 matmuls without TF32 on compute capability 8.0+: `train.tf32`. Quiet with TF32 on, or in
    bf16/fp16."""
    cap = f.capability
    if f.device_type != "cuda" or cap is None or cap < (8, 0) or f.precision != "fp32" or f.tf32 is not False:
        return None
    ratio = _peak_ratio(f, "fp32", True)
    effect = (f"{ratio:.1f}x the device's peak FLOP/s for fp32 matmuls" if ratio else
              "fp32 matmuls on the tensor cores") + " (TF32 keeps fp32's range, with a 10-bit mantissa)"
    return Recommendation("no_tf32", f"fp32 matmuls run without TF32 on compute capability {cap[0]}.{cap[1]}",
                          "train.tf32", True, effect, 0.9 * _compute_share(f))


def _headroom(f: Facts) -> bool:
    """A GPU's peak memory leaves over 40% of it unused (on CPUs the peak is the process's resident set)."""
    peak, cap = f.peak_memory_bytes, f.memory_capacity_bytes
    return f.device_type == "cuda" and bool(peak) and bool(cap) and peak / cap < 1 - MEMORY_HEADROOM_FRAC


def _less_recompute(f: Facts) -> tuple[str, float, float] | None:
    """With headroom and blocks recomputed: (the recomputation a step below, the peak it is estimated to
    reach as a share of the device, the share of the step it saves), or None if that estimate passes 90%.
    The bytes above the held state grow as the gpt's saved activations do (`RECOMPUTE_STEP_DOWN`), the
    transient ones too: an overestimate."""
    ac = f.config.parallelism.activation_checkpointing
    if ac not in RECOMPUTE_STEP_DOWN or not _headroom(f):
        return None
    to, growth, saves = RECOMPUTE_STEP_DOWN[ac]
    peak = ((f.state_bytes or 0.0) + f.above_state() * growth) / f.memory_capacity_bytes
    return (to, peak, saves) if peak <= MEMORY_HIGH_FRAC else None


def rule_less_recompute(f: Facts) -> Recommendation | None:
    """Activation checkpointing (`full` or `selective`) on a GPU whose peak leaves over 40% of it unused:
    the setting a step below, if the peak it is estimated to reach stays under 90% (`_less_recompute`).
    What it saves is the gpt's measured share of the step, times the share of the step compute decides."""
    found = _less_recompute(f)
    if found is None:
        return None
    to, peak, saves = found
    ac, stake = f.config.parallelism.activation_checkpointing, saves * _compute_share(f)
    blocks = "every block" if ac == "full" else "every other block"
    return Recommendation("less_recompute", f"{blocks} recomputes its activations in the backward (`{ac}`), yet "
                          f"the peak memory is {f.peak_memory_bytes / f.memory_capacity_bytes:.0%} of the device's "
                          f"{f.memory_capacity_bytes / 2**30:.3g} GiB", "parallelism.activation_checkpointing", to,
                          f"less recomputed: up to {1 / (1 - stake):.2f}x samples/s, the peak about {peak:.0%} of the "
                          f"device (both estimated from the gpt's measured recompute cost and saved bytes)", stake)


def rule_memory_headroom(f: Facts) -> Recommendation | None:
    """A GPU's peak memory leaves over 40% of it unused and a larger micro-batch fits the global batch:
    `train.micro_batch_size: auto` where this openclaw has it, else the larger size memory allows. Quiet
    with `auto`, on CPUs (a CPU's peak is its process's resident set; `small_micro_batch` speaks there),
    and where recomputing less fits (`less_recompute`: it spends the same headroom, and saves compute)."""
    peak, cap, cfg = f.peak_memory_bytes, f.memory_capacity_bytes, f.config
    micro = batching.fixed_micro(cfg)
    if micro is None or not _headroom(f) or _less_recompute(f) is not None:
        return None
    held = f.state_bytes or 0.0
    bigger = batching.larger_micro(cfg, micro * (0.8 * cap - held) / f.above_state())
    if bigger is None:
        return None
    value = "auto" if batching.takes_auto_micro(cfg) else bigger
    return Recommendation("memory_headroom", f"the peak memory is {peak / cap:.0%} of the device's "
                          f"{cap / 2**30:.3g} GiB", "train.micro_batch_size", value,
                          f"micro-batches of about {bigger} (from {micro}) fit: fewer per step, each fuller", 0.0)


def rule_memory_high(f: Facts) -> Recommendation | None:
    """Peak memory over 90% of the capacity: activation checkpointing (a model with blocks: the built-in
    gpt, or a user's that keeps them in `blocks`), then FSDP (several data-parallel ranks to shard over),
    then a smaller micro-batch."""
    peak, cap, cfg = f.peak_memory_bytes, f.memory_capacity_bytes, f.config
    if not peak or not cap or peak / cap <= MEMORY_HIGH_FRAC:
        return None
    p, finding = cfg.parallelism, f"the peak memory is {peak / cap:.0%} of the {cap / 2**30:.3g} GiB a worker has"
    stake = min(1.0, (peak / cap - MEMORY_HIGH_FRAC) * 10)
    if (cfg.model.name == "gpt" or f.model_blocks) and p.activation_checkpointing != "full":
        to = "selective" if p.activation_checkpointing == "none" else "full"
        return Recommendation("memory_high", finding, "parallelism.activation_checkpointing", to,
                              "blocks recompute their activations in the backward: less memory, about "
                              f"{'a sixth' if to == 'selective' else 'a third'} more compute", stake)
    if p.strategy == "ddp" and (f.world_size or cfg.scaling.max_workers) // p.model_parallel > 1:
        return Recommendation("memory_high", finding, "parallelism.strategy", "fsdp",
                              "parameters, gradients and optimizer state sharded over the workers", stake)
    smaller = batching.smaller_micro(cfg)
    if smaller is None:
        return None
    return Recommendation("memory_high", finding, "train.micro_batch_size", smaller,
                          "smaller activations; more micro-batches per step, the same global batch", stake)


def rule_graph_breaks(f: Facts) -> Recommendation | None:
    """Graph breaks under `train.compile`: `fullgraph: true` fails at the first one, naming its cause and
    line, to fix in the model. Quiet without compile, or with fullgraph on."""
    cfg, breaks = f.config, f.graph_breaks
    if not breaks or not cfg.train.compile or (not isinstance(cfg.train.compile, bool) and cfg.train.compile.fullgraph):
        return None
    key, value = _compile_key(cfg, "fullgraph", True)
    return Recommendation("graph_breaks", f"torch.compile broke the graph {breaks} time(s): the parts between "
                          "breaks run as separate graphs, with eager Python between them", key, value,
                          "the run stops at the first break with its cause and line; fixed, each unit compiles "
                          "to one graph", 0.0)


def rule_low_mfu(f: Facts) -> Recommendation | None:
    """MFU under half of the peak on a GPU in the peak table, uncompiled: `train.compile`. A summary of the
    causes the other rules name, so it sorts after them."""
    if f.mfu is None or f.mfu >= MFU_LOW or f.config.train.compile:
        return None
    peak = f"{f.precision} peak" if f.precision else "peak"
    return Recommendation("low_mfu", f"MFU is {f.mfu:.0%} of the device's {peak}", "train.compile", True,
                          "fused kernels and fewer memory round trips per step", 0.0)


def rule_critical_batch(f: Facts) -> Recommendation | None:
    """The global batch far below (under 0.25x) or far above (over 4x) the measured critical batch
    (`grad_noise_scale`, B_simple): the batch near it, with the LR by `elastic.lr_rule`."""
    g, cfg = f.grad_noise_scale, f.config
    if not g or g <= 0:
        return None
    b = cfg.train.global_batch_size
    if CRITICAL_BATCH_LOW <= b / g <= CRITICAL_BATCH_HIGH:
        return None
    new = batching.global_batch_near(cfg, g)
    if new == b:
        return None
    below = b < g
    finding = f"the global batch ({b}) is {b / g:.2g}x the measured critical batch ({g:.0f})"
    effect = ("fewer, less noisy steps for the same loss" if below else
              "the same loss from fewer samples (beyond the critical batch, larger batches add little per step)")
    return Recommendation("critical_batch", finding, "train.global_batch_size", new,
                          f"{effect}; set `train.optimizer.lr` to {batching.scaled_lr(cfg, new):.3g} "
                          f"(`elastic.lr_rule`: {cfg.elastic.lr_rule})", 0.0)
