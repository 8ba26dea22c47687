"""What each strategy's wrap refuses for a model, as checks of plain attributes (any process: the driver's
preflight runs them on the meta device before any worker starts, and the wraps run them again). They
import none of torch.distributed, so the driver starts without it."""
from __future__ import annotations

from torch import nn

from openclaw.engine.models import GPT
from openclaw.engine.parallel.base import transformer_blocks
from openclaw.engine.parallel.config import ParallelismConfig
from openclaw.errors import ConfigError


def check_layout(model: nn.Module, cfg: ParallelismConfig, *, builtin_task: bool) -> None:
    """What the strategy's wrap (or its first step) would refuse for this model, found before any worker
    starts: a `ConfigError` naming the key. `model` may be on the meta device (`build_model` there costs
    nothing, whatever its size)."""
    if cfg.activation_checkpointing != "none" and not transformer_blocks(model):
        raise ConfigError(f"`parallelism.activation_checkpointing` ({cfg.activation_checkpointing}) recomputes a "
                          f"model's repeated blocks, which openclaw finds in its `blocks` (an nn.ModuleList, "
                          f"ModuleDict or Sequential, as the built-in gpt keeps them); {type(model).__name__} has "
                          f"none, so nothing would be recomputed. Set it to `none`, or keep the blocks in "
                          f"`self.blocks`.")
    if cfg.tensor > 1:
        check_tensor_parallel(model, cfg.tensor)
    if cfg.pipeline > 1:
        check_pipeline(model, cfg.pipeline * cfg.stages_per_rank,
                       builtin_task=builtin_task)


def check_tensor_parallel(model: nn.Module, tensor: int) -> None:
    """Whether `model` can be split `tensor` ways; raises a `ConfigError` naming the key otherwise."""
    if isinstance(model, GPT):
        bad = [f"`model.kwargs.{k}` ({v})" for k, v in (("heads", model.heads), ("dim", model.dim)) if v % tensor]
        if bad:
            raise ConfigError(f"`parallelism.tensor` ({tensor}) must divide {' and '.join(bad)}: each rank computes "
                              f"an equal share of the heads. Change `parallelism.tensor` or the model's size.")
    elif not callable(getattr(model, "parallelize_plan", None)):
        raise ConfigError(f"`parallelism.tensor` ({tensor}) needs a model that says how to split it: the built-in "
                          f"gpt, or a model with a method `parallelize_plan(mesh)` returning a torch "
                          f"`parallelize_module` plan. {type(model).__name__} has none; set `parallelism.tensor: 1`.")


def stage_blocks(depth: int, stages: int) -> list[list[int]]:
    """The blocks of each of `stages` consecutive stages: as even as can be, earlier stages one more."""
    if depth < stages:
        raise ConfigError(f"`parallelism.pipeline` needs at least one block per stage: {stages} stage(s), but "
                          f"`model.kwargs.depth` is {depth}. Lower `parallelism.pipeline` (or use `gpipe`/`1f1b` "
                          f"rather than `interleaved_1f1b`, which runs two stages per rank).")
    per, extra = divmod(depth, stages)
    bounds, start = [], 0
    for s in range(stages):
        n = per + (s < extra)
        bounds.append(list(range(start, start + n)))
        start += n
    return bounds


NEEDS_BUILTIN_TASK = ("`parallelism.pipeline` computes the loss on the last stage: it needs a built-in `task`, not "
                      "a user's loss function.")


def check_pipeline(model: nn.Module, stages: int, *, builtin_task: bool = True) -> None:
    """Whether `model` (on any device, the meta device included) splits into `stages` stages; a `ConfigError`
    naming the key otherwise."""
    if not isinstance(model, GPT):
        raise ConfigError(f"`parallelism.pipeline` splits the built-in gpt into stages; {type(model).__name__} "
                          f"is not one. Set `parallelism.pipeline: 1`.")
    if not builtin_task:
        raise ConfigError(NEEDS_BUILTIN_TASK)
    stage_blocks(model.depth, stages)
