"""Picking the strategy a `ParallelismConfig` names, for one rank of a world (a Ray Train worker, or any
torch process)."""
from __future__ import annotations

import torch
from torch.distributed.device_mesh import init_device_mesh

from openclaw.engine.parallel.base import Strategy
from openclaw.engine.parallel.config import ParallelismConfig
from openclaw.engine.parallel.ddp import DDPStrategy
from openclaw.engine.parallel.fsdp import FSDPStrategy
from openclaw.engine.parallel.mesh import DIM_NAMES, MeshLayout, mesh_layout
from openclaw.engine.parallel.pp import PipelineStrategy


def layout_for(cfg: ParallelismConfig, world: int) -> MeshLayout:
    """Where the ranks of a world of `world` sit. With `ddp`, every data-parallel rank is a replica."""
    if cfg.strategy == "ddp":
        return mesh_layout(world, replicate=world // cfg.model_parallel, tensor=cfg.tensor, pipeline=cfg.pipeline)
    return mesh_layout(world, replicate=cfg.replicate, tensor=cfg.tensor, pipeline=cfg.pipeline)


def build_strategy(cfg: ParallelismConfig | None = None, *, world: int = 1, rank: int = 0,
                   device: torch.device | None = None, param_dtype: torch.dtype | None = None,
                   split_logits_ok: bool = False) -> Strategy:
    """The strategy the config names, for this rank of a world of `world` (the default process group).
    `param_dtype`: bf16 keeps sharded parameters in bf16 for compute (gradients are reduced in fp32).
    `split_logits_ok`: the task's loss takes logits split by vocabulary (the built-in language modeling:
    `LanguageModeling`'s cross-entropy under `loss_context`), so `cfg.loss_parallel` applies. Off unless
    the caller says so: another loss gets whole logits, as it would on one device."""
    cfg = cfg or ParallelismConfig()
    if not cfg.sharded_state:
        return DDPStrategy(activation_checkpointing=cfg.activation_checkpointing, bucket_cap_mb=cfg.bucket_cap_mb)
    layout = layout_for(cfg, world)
    if device is not None and device.type == "cuda":  # where the mesh, and `fully_shard`, place tensors
        torch.cuda.set_device(device)
    mesh = init_device_mesh((device or torch.device("cpu")).type, layout.shape, mesh_dim_names=DIM_NAMES)
    kwargs = dict(reshard_after_forward=cfg.reshard_after_forward, activation_checkpointing=cfg.activation_checkpointing,
                  param_dtype=param_dtype, always_shard=cfg.strategy == "fsdp")
    if cfg.pipeline > 1:
        return PipelineStrategy(layout, mesh, rank, schedule=cfg.pipeline_schedule, microbatches=cfg.microbatches,
                                loss_parallel=cfg.loss_parallel and split_logits_ok, split=cfg.pipeline_split,
                                **kwargs)
    return FSDPStrategy(layout, mesh, loss_parallel=cfg.loss_parallel and split_logits_ok, **kwargs)
