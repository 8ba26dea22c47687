"""`torch.compile` for training (plain torch; worker process): in place, per transformer block, with
its cost and its health counted.

`compile_in_place` compiles each block of a model that has `blocks` (the built-in gpt, a pipeline
stage's part of it) and other models whole, with `nn.Module.compile`, which keeps the module and its
parameter names: checkpoints are the same with compile on and off, so a run resumes with it toggled.
Dynamo compiles lazily, at a block's first call; `CompileCounters` reads torch's counters around each
step so the engine can say which steps compiled (their time is compile time, not training), how many
graph breaks and recompiles there were, and how many compiled graphs came from a cache.

torch exposes these counts only in `torch._dynamo.utils.counters` (private; read here alone, and a
missing key reads as 0 so a torch that renames one loses the metric, not the run).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from openclaw.engine.config import CompileConfig


def compile_options(value: bool | CompileConfig) -> CompileConfig | None:
    """`train.compile` as options, None when off."""
    if value is True:
        return CompileConfig()
    return value or None


def compile_units(model: nn.Module) -> list[nn.Module]:
    """What is compiled: each transformer block where the model has `blocks` (repeated blocks compile
    once and reuse the code), else the whole model."""
    blocks = getattr(model, "blocks", None)
    if isinstance(blocks, (nn.ModuleDict, nn.ModuleList)) and len(blocks):
        return list(blocks.values() if isinstance(blocks, nn.ModuleDict) else blocks)
    return [model]


def compile_in_place(model: nn.Module, options: CompileConfig) -> int:
    """Compile `model`'s units in place; returns how many."""
    units = compile_units(model)
    for unit in units:
        unit.compile(mode=options.mode, fullgraph=options.fullgraph)
    return len(units)


def uncompile(model: nn.Module) -> None:
    """Back to eager (the `fallback: eager` path after a compile failure)."""
    for unit in compile_units(model):
        unit._compiled_call_impl = None


def _counters() -> dict[str, int]:
    from torch._dynamo.utils import counters
    return {"frames": counters["frames"].get("ok", 0),
            "graph_breaks": sum(counters["graph_break"].values()),
            "cache_hits": counters["inductor"].get("fxgraph_cache_hit", 0)
            + counters["aot_autograd"].get("autograd_cache_hit", 0)}


@dataclass
class CompileCounters:
    """Compile cost and health since the engine started: `begin()`/`end(seconds)` around each step."""
    compile_s: float = 0.0
    """Wall time of the steps that compiled something (compilation dominates them)."""
    compiled_steps: int = 0
    graph_breaks: int = 0
    recompiles: int = 0
    """Frames compiled after the first compiling step: new shapes or modes (eval) the guards refused."""
    cache_hits: int = 0
    """Compiled graphs taken from inductor's and AOTAutograd's caches instead of compiled anew."""
    _start: dict[str, int] = field(default_factory=dict)
    _before: dict[str, int] = field(default_factory=dict)

    def __post_init__(self):
        self._start = _counters()

    def begin(self) -> None:
        self._before = _counters()

    def end(self, seconds: float) -> bool:
        """After a step: True when it compiled (its `seconds` are compile time)."""
        now = _counters()
        compiled = now["frames"] > self._before["frames"]
        if compiled:
            if self.compiled_steps:
                self.recompiles += now["frames"] - self._before["frames"]
            self.compile_s += seconds
            self.compiled_steps += 1
        self.graph_breaks = now["graph_breaks"] - self._start["graph_breaks"]
        self.cache_hits = now["cache_hits"] - self._start["cache_hits"]
        return compiled

    def metrics(self) -> dict[str, float]:
        return {"perf/compile_s": self.compile_s, "perf/graph_breaks": self.graph_breaks,
                "perf/recompiles": self.recompiles, "perf/compile_cache_hits": self.cache_hits}


def is_compile_error(error: BaseException) -> bool:
    """A failure inside torch.compile (Dynamo, AOTAutograd, Inductor), not in the model's own code."""
    return isinstance(error, torch._dynamo.exc.TorchDynamoException) or type(error).__module__.startswith(
        ("torch._dynamo", "torch._inductor"))
