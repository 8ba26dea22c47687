"""What each strategy's wrap refuses for a model, as checks of plain attributes (any process: the driver's
preflight runs them on the meta device before any worker starts, and the wraps run them again). They
import none of torch.distributed, so the driver starts without it."""
from __future__ import annotations

from torch import nn

from openclaw.engine.models import GPT, tied_parameters
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
        check_pipeline(model, cfg.pipeline * cfg.stages_per_rank, builtin_task=builtin_task, split=cfg.pipeline_split)


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


def stage_blocks(depth: int, stages: int, split: list[int] | None = None) -> list[list[int]]:
    """The blocks of each of `stages` consecutive stages: `split` of them each (`parallelism.pipeline_split`),
    or as even as can be, earlier stages one more."""
    if split is not None and (len(split) != stages or sum(split) != depth):
        raise ConfigError(f"`parallelism.pipeline_split` {split} gives {sum(split)} block(s) to {len(split)} stage(s), "
                          f"but the model has {depth} block(s) in {stages} stage(s) (the gpt's "
                          f"`model.kwargs.depth`). Give every stage its count, adding up to {depth}.")
    if depth < stages:
        raise ConfigError(f"`parallelism.pipeline` needs at least one block per stage: {stages} stage(s), but "
                          f"the model has {depth} block(s) (the gpt's `model.kwargs.depth`). Lower "
                          f"`parallelism.pipeline` (or use `gpipe`/`1f1b` rather than `interleaved_1f1b`, which "
                          f"runs two stages per rank).")
    per, extra = divmod(depth, stages)
    bounds, start = [], 0
    for s in range(stages):
        n = split[s] if split is not None else per + (s < extra)
        bounds.append(list(range(start, start + n)))
        start += n
    return bounds


NEEDS_BUILTIN_TASK = ("`parallelism.pipeline` computes the loss on the last stage: it needs a built-in `task`, not "
                      "a user's loss function.")

PIPELINE_PROTOCOL = (
    "the built-in gpt, or a model shaped as torchtitan's are: its repeated blocks in an nn.ModuleDict "
    "`self.blocks` (a stage keeps the names of those it holds), the modules that run before and after them "
    "named in a class attribute `pipeline_ends = ([first stage's], [last stage's])`, and a forward that skips "
    "each of those set to None (a later stage's input is the hidden state)")


def pipeline_ends(model: nn.Module) -> tuple[list[str], list[str]] | None:
    """The module names `model` runs before its blocks and after them (`PIPELINE_PROTOCOL`), or None where
    it cannot be split into stages."""
    ends = getattr(model, "pipeline_ends", None)
    if not isinstance(getattr(model, "blocks", None), nn.ModuleDict) or not isinstance(ends, (tuple, list)) \
            or len(ends) != 2:
        return None
    return list(ends[0]), list(ends[1])


def check_pipeline(model: nn.Module, stages: int, *, builtin_task: bool = True,
                   split: list[int] | None = None) -> None:
    """Whether `model` (on any device, the meta device included) splits into `stages` stages; a `ConfigError`
    naming the key otherwise."""
    name = type(model).__name__
    ends = pipeline_ends(model)
    if ends is None:
        raise ConfigError(f"`parallelism.pipeline` ({stages} stage(s)) needs a model that says how to split it into "
                          f"stages: {PIPELINE_PROTOCOL}. {name} is neither; set `parallelism.pipeline: 1`.")
    if not builtin_task:
        raise ConfigError(NEEDS_BUILTIN_TASK)
    _check_ends(model, *ends)
    stage_blocks(len(model.blocks), stages, split)


def _check_ends(model: nn.Module, first: list[str], last: list[str]) -> None:
    """Every parameter in a block or an end (else every stage would train its own copy), and each tie
    within one stage or between the first and the last."""
    name = type(model).__name__
    modules = dict(model.named_modules())
    missing = [m for m in first + last if m not in modules or not m]
    if missing:
        raise ConfigError(f"`parallelism.pipeline`: {name}.pipeline_ends names {missing}, which it has no module "
                          f"called.")
    loose = [p for p, _ in model.named_parameters() if stage_part(p, first, last) is None]
    if loose:
        raise ConfigError(f"`parallelism.pipeline`: {name}'s parameters {loose[:3]} are neither in a block nor in "
                          f"a module `pipeline_ends` names, so no stage would own them. Name their modules there.")
    for owner, alias in tied_parameters(model):
        where = {stage_part(owner, first, last), stage_part(alias, first, last)}
        if len(where) > 1 and where != {"first", "last"}:
            raise ConfigError(f"`parallelism.pipeline`: {name}'s {owner} and {alias} are one parameter on two "
                              f"stages; a pipeline keeps a tie only between its first and last stages.")


def stage_part(param: str, first: list[str], last: list[str]) -> str | None:
    """Where a parameter of a pipelined model lives (pure): `blocks.<key>`, `first` or `last` (in a module
    `pipeline_ends` names), None where neither."""
    if param.startswith("blocks."):
        return "blocks." + param.split(".")[1]
    return next((where for group, where in ((first, "first"), (last, "last")) for m in group
                 if param.startswith(m + ".")), None)


def stage_activation_shares(block_bytes: list[int], first_bytes: int, last_bytes: int, stages: int,
                            split: list[int] | None = None, block_inputs: list[int] | None = None) -> list[float] | None:
    """Each of `stages` stages' share of one micro-batch's activations through the whole model (pure): its
    blocks' bytes (`block_bytes`, in order), and the first stage's ends' (the embeddings) or the last's
    (`last_bytes`: its norm, head, logits and the loss, saved outside the blocks). A large vocabulary's
    logits make the last stage hold more than its share of the blocks. `block_inputs`: each block's
    input bytes; a stage also keeps its output (the next stage's first block's input), until its
    backward, beside the copy the next stage saves. None where nothing was counted."""
    bounds = stage_blocks(len(block_bytes), stages, split)
    per = [sum(block_bytes[b] for b in blocks) for blocks in bounds]
    per[0] += first_bytes
    per[-1] += last_bytes
    for s in range(stages - 1) if block_inputs else []:
        per[s] += block_inputs[bounds[s + 1][0]]
    total = sum(per)
    return [p / total for p in per] if total else None


def pipeline_rank_params(model: nn.Module, pipeline: int, split: list[int] | None = None,
                         stages_per_rank: int = 1) -> list[int]:
    """Each pipeline rank's parameters, on any device (the meta device included): its stages' blocks
    (rank r runs stages r, r + `pipeline`, ...) and the ends they hold, the first stage's (the gpt's
    embeddings) and the last's (its norm and head); a parameter tied between those two is held by both.
    What the rank holds before tensor parallelism or FSDP split it."""
    starts, ends = pipeline_ends(model)
    stages = pipeline * stages_per_rank
    keys = list(model.blocks)
    stage_of = {keys[b]: s for s, blocks in enumerate(stage_blocks(len(keys), stages, split)) for b in blocks}
    held: list[dict[int, int]] = [{} for _ in range(pipeline)]
    for name, param in model.named_parameters(remove_duplicate=False):
        where = stage_part(name, starts, ends)
        stage = stage_of[where.split(".", 1)[1]] if where.startswith("blocks.") else 0 if where == "first" else stages - 1
        held[stage % pipeline][id(param)] = param.numel()
    return [sum(rank.values()) for rank in held]
