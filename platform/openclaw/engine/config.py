"""The engine's config sections: `model`, and `train` with its `optimizer` and `schedule` (foundation:
pydantic only, validated with the rest of the tree before any worker starts)."""
from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, field_validator

from openclaw.section import Section, import_path_or

BUILTIN_MODELS = ("mlp", "gpt")


class ModelConfig(Section):
    name: str = "mlp"
    """A built-in model (`mlp`, `gpt`) or a `module:function` that returns a `torch.nn.Module`."""
    kwargs: dict[str, Any] = Field(default_factory=dict)
    """Keyword arguments passed to the model builder."""

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return import_path_or(v, BUILTIN_MODELS, "model.name")


class OptimizerConfig(Section):
    name: Literal["adamw", "adam", "sgd"] = "adamw"
    """The optimizer. Biases and norms (parameters with fewer than 2 dimensions) get no weight decay."""
    lr: float = Field(1e-3, gt=0)
    """Peak learning rate, reached after `train.schedule.warmup_steps`."""
    weight_decay: float = Field(0.0, ge=0)
    """Decoupled weight decay (AdamW) or L2 penalty (Adam, SGD) on matrices and embeddings."""
    betas: tuple[Annotated[float, Field(ge=0, lt=1)], Annotated[float, Field(ge=0, lt=1)]] = (0.9, 0.95)
    """Adam betas, each in [0, 1) (ignored by sgd)."""
    momentum: float = Field(0.9, ge=0)
    """SGD momentum (ignored by Adam)."""


class ScheduleConfig(Section):
    name: Literal["constant", "cosine", "linear"] = "constant"
    """LR after warmup: constant, cosine decay or linear decay to `min_lr_ratio * lr` at `max_steps`."""
    warmup_steps: int = Field(0, ge=0)
    """Steps of linear warmup from `lr / warmup_steps` to `lr`."""
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    """The LR at `train.max_steps`, as a fraction of `lr` (cosine and linear)."""


class CompileConfig(Section):
    mode: Literal["default", "reduce-overhead", "max-autotune-no-cudagraphs"] = "default"
    """torch.compile's mode."""
    fullgraph: bool = False
    """Fail on any graph break instead of running the broken part eagerly."""
    fallback: Literal["fail", "eager"] = "fail"
    """When compiling fails: `fail` the run with the compiler's error, or train `eager` (uncompiled),
    saying so."""
    cache: bool = False
    """Save the compiled graphs and kernels beside the checkpoints (`<storage>/<name>/compile_cache/`) and
    load them when the worker group restarts or resizes, so it does not compile from cold. Loading runs
    the code stored there: turn it on for checkpoint storage only you can write."""


class AmpConfig(Section):
    init_scale: float = Field(65536.0, gt=0)
    """fp16: the loss scaler's first scale (`torch.amp.GradScaler`); it halves at each overflow and
    doubles after 2000 steps without one."""
    switch: bool = True
    """Switch a run that proves unstable in fp16 to the next safer precision (bf16 where the device has
    it, else fp32), or in bf16 to fp32, at its next checkpoint; later attempts keep the switch (it is in
    the train state)."""
    window_steps: int = Field(50, gt=0)
    """fp16: the recent steps over which overflowing steps are counted."""
    max_overflow_frac: float = Field(0.25, gt=0, le=1)
    """fp16: switch when more than this fraction of the last `window_steps` steps overflowed."""
    min_scale: float = Field(1.0, gt=0)
    """fp16: switch when the loss scale falls below this (gradients overflow fp16 even unscaled)."""
    bf16_max_rollbacks: int = Field(2, ge=0)
    """bf16: switch to fp32 once this many non-finite losses were rolled back (`train.on_nonfinite_loss:
    rollback`): 2 means a non-finite loss that recurs after a rollback. 0: never."""


class TrainConfig(Section):
    global_batch_size: int = Field(64, gt=0)
    """Samples per optimizer step, whatever the world size: micro_batch_size x accumulation x world_size."""
    micro_batch_size: int | Literal["auto"] = 16
    """Samples per forward/backward on one worker. `auto`: the largest that fits the memory, chosen on the
    workers before the first step (parameters, gradients and optimizer state estimated under the strategy
    and precision, activations measured on a probe micro-batch, then confirmed on a GPU) among the sizes
    that divide every allowed world size's batch, agreed on by all workers, printed and logged
    (`resolved/micro_batch_size`), and kept in the train state across restarts and resizes."""
    memory_budget_gb: float | None = Field(None, gt=0)
    """With `micro_batch_size: auto`: the memory (GB) one worker's training state and activations may use.
    Default: on a CPU the worker's share of the node's memory (total / workers on the node), on a GPU 90%
    of its free memory (the smaller of the two when set)."""
    max_steps: int = Field(100, gt=0)
    """Optimizer steps to train; the run ends (and logs its model) at this step."""
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    """The optimizer and its hyperparameters."""
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    """The learning-rate schedule, a pure function of the step (it survives restarts and resizes)."""
    grad_clip: float | None = Field(1.0, gt=0)
    """Clip the global gradient norm to this value; null disables clipping."""
    precision: Literal["auto", "fp32", "bf16", "fp16", "fp8"] = "auto"
    """auto: bf16 autocast on GPUs of compute capability 8.0+, fp16 autocast with loss scaling on 7.x
    (V100, T4), fp32 on CPUs and older GPUs. The choice and its reason are printed at the start and
    logged (`resolved/precision`, `resolved/precision_reason`). bf16 on a GPU without it trains in fp16.
    fp8: float8 Linears (see `fp8`) on GPUs of compute capability 8.9+, bf16 on older GPUs; GPU workers only."""
    fp8: Literal["off", "auto"] = "off"
    """`auto`: `precision: auto` trains in fp8 on GPUs of compute capability 8.9+ (Ada, Hopper). fp8 (either
    way) converts the Linears whose shapes gain (torchao's float8 training, tensorwise scaling) and runs the
    rest in bf16; on the first step it times a micro-batch both ways and keeps bf16 if fp8 is no faster,
    saying so. Needs `pip install 'openclaw[quantize]'` (torchao) and GPU workers."""
    amp: AmpConfig = Field(default_factory=AmpConfig)
    """fp16's loss scaling, and when a run switches to a safer precision."""
    tf32: bool = True
    """fp32 matmuls and convolutions run as TF32 on the tensor cores of GPUs of compute capability 8.0+."""
    compile: bool | CompileConfig = False
    """`torch.compile` the model after the parallelism wrap, in place (checkpoint keys are the same with
    it on or off): the built-in gpt block by block, other models whole. `true`, or options."""
    log_every: int = Field(10, gt=0)
    """Log `train/` and `perf/` metrics, and print a progress line, every N steps (and at the last)."""
    eval_every: int = Field(0, ge=0)
    """Evaluate every N steps (0: only at the end). Needs `data.val`."""
    eval_rows: int | None = Field(None, gt=0)
    """Score at most this many rows of `data.val` at each evaluation: its first N, in their stored order,
    the same rows every time, so that successive `val/` metrics compare (shuffle the set when you prepare
    it if its order is not random). null: the whole set."""
    threads_per_worker: int | None = Field(None, gt=0)
    """torch intra-op threads per worker; default: the worker's CPU count. Pinned so restarts reproduce."""
    deterministic: bool = False
    """Deterministic kernels on GPUs (`torch.use_deterministic_algorithms`, cuDNN's deterministic
    convolutions, cuBLAS's fixed workspace): two runs, or a resumed run and the uninterrupted one, then
    compute the same bits on the same GPUs. Off, some CUDA kernels (an embedding's backward, `index_add`,
    `scatter_add`) add in the order their threads finish, so GPU runs agree only to rounding. Costs speed
    where those kernels run, and torch then fills memory it allocates uninitialized (`torch.empty`); an op
    with no deterministic kernel fails, naming itself. CPU workers compute deterministically either way
    (their threads pinned: `threads_per_worker`). Set as each worker starts."""
    flush_denormal: bool = True
    """CPU workers flush subnormal floats (below ~1.2e-38) to zero. Late in training, tiny gradients and
    Adam's second moments turn subnormal and every operation on them is slow: the digits MLP's throughput
    fell from 1,750 to 1,230 samples/s over 8,000 steps without it, and held at 1,700+ with it. No effect
    on GPUs."""
    record_samples: bool = False
    """Write the sample positions of every step to `<checkpoint.storage>/<name>/samples/` (JSON lines per
    rank), to audit the data order across restarts and resizes. Local storage only."""
    on_nonfinite_loss: Literal["fail", "skip", "rollback"] = "fail"
    """A NaN/inf loss or gradient: `fail` naming the step; `skip` the batch (counted); or `rollback` to the
    newest valid checkpoint and skip the offending batch on the replay."""

    @field_validator("micro_batch_size", mode="before")
    @classmethod
    def _micro_batch(cls, v: Any) -> Any:
        if v == "auto" or (isinstance(v, int) and not isinstance(v, bool) and v > 0):
            return v
        raise ValueError(f"`train.micro_batch_size` must be a positive integer or `auto` (got {v!r})")

    def intra_op_threads(self, cpus: float) -> int:
        """torch's intra-op threads on a CPU worker that reserves `cpus` CPUs: `threads_per_worker`, else all."""
        return self.threads_per_worker or max(1, int(cpus))
