"""What the advice rules read (`Facts`) and what they return (`Recommendation`): plain values, in any
process. `openclaw.advice.rules` re-exports both; `openclaw.advice.facts` builds Facts from a run."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class Recommendation:
    """One rule's decision: what was measured, what to change, and what that should do."""
    rule: str
    """The rule's name (its function's, without `rule_`)."""
    finding: str
    """What was measured, with its number: "the step waits on data for 23% of its time"."""
    key: str | None
    """The config key to change (dotted, as `--set` takes it); None where the fix is not a key."""
    value: Any
    """The suggested value of `key`."""
    effect: str
    """The expected effect, as a number where it can be estimated: "up to 1.3x samples/s"."""
    at_stake: float = 0.0
    """The fraction of step time (or of the peak) the finding concerns: the order of the advice."""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Facts:
    """What the rules read. Fractions are of a step's wall time, medians over a run's log windows (the
    first window of each attempt excluded: it holds start-up). None: not measured on this run."""
    config: Any
    """The run's resolved `openclaw.config.Config`."""
    data_wait_frac: float | None = None
    """`perf/data_wait_frac`: waiting for the batch."""
    read_share: float | None = None
    """The part of the data wait spent waiting for shards to be read (not read ahead in time)."""
    comm_frac: float | None = None
    """`perf/comm_frac`: exposed collective time (the slowest rank's)."""
    checkpoint_frac: float | None = None
    """Checkpoint stalls' share of the step."""
    idle_frac: float | None = None
    """`perf/idle_frac`: neither data, compute, communication nor checkpoint (the loop's own overhead)."""
    straggler_index: float | None = None
    """`perf/straggler_index`: the slowest rank's busy time over the median rank's."""
    slowest_rank: int | None = None
    step_s: float | None = None
    """Wall time of one optimizer step."""
    micro_batch_s: float | None = None
    """Compute time of one micro-batch's forward and backward."""
    samples_per_s: float | None = None
    mfu: float | None = None
    """`perf/mfu` (GPUs in the peak table only)."""
    device_type: str = "cpu"
    device_name: str | None = None
    capability: tuple[int, int] | None = None
    """A GPU's compute capability."""
    precision: str | None = None
    """The precision the run trained in (`resolved/precision`): fp32, bf16, fp16."""
    tf32: bool | None = None
    """fp32 matmuls ran as TF32."""
    peak_memory_bytes: float | None = None
    memory_capacity_bytes: float | None = None
    """`perf/memory_capacity_bytes`: the GPU's memory, or on a CPU the worker's memory budget."""
    graph_breaks: int | None = None
    recompiles: int | None = None
    kernel_idle_frac: float | None = None
    """After a GPU profile: the share of the profiled steps with no kernel running (launch-bound)."""
    grad_noise_scale: float | None = None
    """`train/grad_noise_scale_smooth`: the critical batch size estimate (B_simple)."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Other measurements a rule may read (named by the rule's docstring)."""
    # ---- added for the rules of `openclaw.advice` (after the fields colleagues fill) ----
    compute_frac: float | None = None
    """`perf/step_compute_s`'s share of the step (exposed collective wait included)."""
    world_size: int | None = None
    """Workers in the run's newest attempt."""
    accumulation: int | None = None
    """Micro-batches per optimizer step and worker, in the newest attempt."""
    checkpoint_bytes: float | None = None
    """What one rank writes per checkpoint: its parameters and optimizer state (`perf/param_bytes_per_rank`
    + `perf/optimizer_bytes_per_rank`)."""
    state_bytes: float | None = None
    """`perf/state_bytes_per_rank`: parameters, gradients and optimizer state (the largest rank's)."""
    activation_bytes: float | None = None
    """`perf/peak_activation_bytes`: the peak memory above the state, the largest rank's (pipeline
    stages differ in both: the largest state and the largest peak may be two ranks')."""
    grad_bytes: float | None = None
    """`perf/grad_bytes_per_rank`: the gradients one rank holds (and, under DDP, all-reduces) per step."""
    prepare_s: float | None = None
    """Seconds this run spent preparing its data (`data.transforms`) before training; 0 on a cache hit."""
    prepare_cache: str | None = None
    """The prepared-data cache: `miss` (this run prepared), `hit`, or `off` (nothing to prepare)."""
    prepare_dir: str | None = None
    """The prepared-data cache's folder (absolute) where the run found or put its data."""
    wall_s: float | None = None
    """The run's wall time, from the job's start (preparation included) to its end."""
    tensor_group_nodes: int | None = None
    """The most nodes a tensor-parallel group spans in the newest attempt (1: each on one node)."""
    workers_per_node: tuple[int, ...] | None = None
    """The newest attempt's workers on each node, in Ray Train's node order."""
    model_blocks: int | None = None
    """The repeated blocks the model keeps in `blocks` (what `parallelism.activation_checkpointing`
    recomputes), from the newest attempt event; 0: none."""
    rank_busy: tuple[float, ...] | None = None
    """Each rank's busy share of its wall time (`perf/rank<i>/{data,compute}_frac`: compute net of its
    measured wait), rank 0 first; None where a rank's wait was not measured (no `comm_frac`)."""

    def above_state(self) -> float:
        """Bytes a rank's peak holds above its state (activations, and transient buffers): the largest
        rank's where logged, else the largest peak less the largest state."""
        if self.activation_bytes is not None:
            return max(1.0, self.activation_bytes)
        return max(1.0, (self.peak_memory_bytes or 0.0) - (self.state_bytes or 0.0))
