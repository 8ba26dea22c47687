"""`train.micro_batch_size: auto` on the workers (worker process), before the sampler is built.

Every rank takes the size its run's train state keeps (chosen for the same model, precision, strategy,
device type and memory: the `micro_batch_key`), or else probes its own device for one: the training
state estimated under the strategy and precision, activations counted on a probe micro-batch (on fake
tensors: no memory, whatever the model's size; a tensor-parallel rank's share, checkpointed blocks as
they recompute), the largest allowed size that fits its memory budget, confirmed where a rank runs the
whole model on a GPU with room for a whole copy of it (`runtime.micro_batch_probe`). The probe
touches no process group, so one rank's out-of-memory error cannot stall the others. The ranks then
all-gather their sizes and all take the smallest, and the rest of the attempt reads a config that holds
that number. The train state records it, so that restarts, resizes and resumes keep it and the
optimization stays the same.
"""
from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass, field
from typing import Any

import psutil
import torch

from openclaw.config import Config
from openclaw.data.stream import ShardedData
from openclaw.engine.memory import GB, MicroBatchChoice, micro_batch_sizes
from openclaw.engine.metrics import allgather_ints
from openclaw.engine.precision import Precision, choose_precision, device_facts
from openclaw.engine.state import TrainState
from openclaw.runtime.checkpoint_store import newest_finished_file
from openclaw.runtime.micro_batch_probe import probe
from openclaw.runtime.policies import micro_batch_dp_sizes

@dataclass(frozen=True)
class AutoMicroBatch:
    """What `auto` resolved to on this attempt, as every rank agreed."""
    size: int
    source: str
    """`probe` (chosen now) or `train_state` (kept from the run's train state)."""
    key: str
    proposed: list[int]
    """Each rank's size before they agreed on the smallest, in rank order."""
    probed: int
    """How many ranks probed their device (0 when every rank kept the train state's size)."""
    estimate_gb: float
    choice: MicroBatchChoice | None = None
    """This rank's probe, when it probed."""
    backed_off: list[int] = field(default_factory=list)
    """Sizes the confirmation probe ran out of memory at."""
    activations: str = ""
    """How this rank measured the activations when it probed (`micro_batch_probe.probe`)."""


def resolve_micro_batch(cfg: Config, *, device: torch.device, world: int, local_world: int, run_dir: str,
                        data: ShardedData) -> tuple[Config, AutoMicroBatch | None]:
    """The config with `train.micro_batch_size` a number (unchanged unless it is `auto`). Collective when
    `auto`: every rank calls it, and one all-gather agrees on the size."""
    if cfg.train.micro_batch_size != "auto":
        return cfg, None
    precision = choose_precision(cfg.train.precision, device_facts(device), cfg.train.tf32, cfg.train.fp8)
    key = choice_key(cfg, device, precision)
    dp_sizes = micro_batch_dp_sizes(cfg.elastic.on_resize, cfg.worlds, cfg.parallelism.model_parallel)
    stored = stored_state(run_dir)
    counts = cfg.parallelism.auto_counts(cfg.train.global_batch_size, dp_sizes)
    if stored and stored.get("micro_batch_key") == key and \
            stored.get("micro_batch_size") in micro_batch_sizes(cfg.train.global_batch_size, dp_sizes, counts):
        mine, choice, backed_off, measured = stored["micro_batch_size"], None, [], ""
    else:
        choice, mine, backed_off, measured = probe(cfg, device, data, precision, dp_sizes, counts, local_world)
    estimate = choice.estimate_at(mine) if choice else float(stored.get("micro_batch_estimate_gb", 0.0)) * GB
    gathered = allgather_ints([mine, int(choice is not None), round(estimate)], device, world)
    size, source, estimate = agree_on_size(gathered)
    auto = AutoMicroBatch(size, source, key, [g[0] for g in gathered], sum(g[1] for g in gathered), estimate,
                          choice, backed_off, measured)
    return with_micro_batch(cfg, size), auto


def agree_on_size(gathered: list[list[int]]) -> tuple[int, str, float]:
    """The ranks' (size, probed, estimate in bytes) agreed on: the smallest size, with the estimate of a rank that
    proposed it, and `probe` where any rank probed (a rank that kept the stored size takes another's
    smaller one: it was chosen now, and its estimate is not the stored size's)."""
    at = min(range(len(gathered)), key=lambda r: gathered[r][0])
    return gathered[at][0], "probe" if any(g[1] for g in gathered) else "train_state", gathered[at][2] / GB


def with_micro_batch(cfg: Config, size: int) -> Config:
    raw = cfg.resolved()
    raw["train"]["micro_batch_size"] = size
    return Config.model_validate(raw)


def choice_key(cfg: Config, device: torch.device, precision: Precision) -> str:
    """What a size is chosen for: a new key (another model, precision, strategy, device type or memory)
    chooses again."""
    model = hashlib.sha1(json.dumps([cfg.model.name, cfg.model.kwargs, cfg.task], sort_keys=True,
                                    default=str).encode()).hexdigest()[:12]
    p = cfg.parallelism
    strategy = f"{p.strategy} replicate {p.replicate} tensor {p.tensor} pipeline {p.pipeline} " \
               f"checkpointing {p.activation_checkpointing}"
    if device.type == "cuda":
        memory = f"{torch.cuda.get_device_name(device)} {torch.cuda.get_device_properties(device).total_memory / GB:.0f} GB"
    else:
        memory = f"{psutil.virtual_memory().total / GB:.0f} GB"
    if cfg.train.memory_budget_gb:
        memory += f", budget {cfg.train.memory_budget_gb:g} GB"
    return f"model {cfg.model.name} {model}; precision {precision.name}; strategy {strategy}; " \
           f"device {device.type} {memory}"


def stored_state(run_dir: str) -> dict[str, Any] | None:
    """The train state of the run's newest finished checkpoint (its `state.pt` alone), or None."""
    found = newest_finished_file(run_dir, "state.pt")
    if found is None:
        return None
    try:
        return torch.load(io.BytesIO(found[1]), map_location="cpu", weights_only=True)
    except Exception:  # unreadable: the restore will skip it too
        return None


# ---- recording it ----------------------------------------------------------------------------------

def record_micro_batch(auto: AutoMicroBatch | None, state: TrainState, tracker) -> None:
    """After the restore: the train state keeps the size (or forgets one when the config sets it); rank 0
    records it as an event every attempt, and prints and logs it as params when it was chosen now."""
    state.micro_batch_size = auto.size if auto else 0
    state.micro_batch_key = auto.key if auto else ""
    state.micro_batch_estimate_gb = auto.estimate_gb if auto else 0.0
    if auto is None:
        return
    c = auto.choice
    probe_facts = {"budget_gb": c.budget_bytes / GB, "fixed_gb": c.fixed_bytes / GB,
                   "activation_mb_per_sample": c.activation_bytes_per_sample / 1e6,
                   "largest": c.largest, "backed_off": auto.backed_off, "activations": auto.activations} if c else {}
    tracker.event("micro_batch", size=auto.size, source=auto.source, proposed=auto.proposed, probed=auto.probed,
                  estimate_gb=auto.estimate_gb, key=auto.key, step=state.step, **probe_facts)
    if auto.source != "probe":
        return
    tracker.params({"resolved/micro_batch_size": str(auto.size),
                    "resolved/micro_batch_estimate_gb": f"{auto.estimate_gb:.6g}"})
    why = f", of at most {c.largest}, in a {c.budget_bytes / GB:.3g} GB budget" if c else ""
    tracker.progress({"message": f"micro-batch: {auto.size} (`auto`: an estimated {auto.estimate_gb:.3g} GB per "
                                 f"worker{why}; every worker proposed {auto.proposed})"})
