"""What a quantized export costs and saves, measured (plain torch): sizes on disk and in memory, the
quantized layers' bytes against their fp32 bytes, forward latency, and the peak memory of a process that
loads the model and runs one forward pass."""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from typing import Callable

import torch
from torch import nn

from openclaw.errors import ConfigError
from openclaw.exports.quantize import tensor_bytes
from openclaw.user_code import import_path


def state_bytes(model: nn.Module) -> int:
    """The model's weights in memory (each tensor once: tied weights count once)."""
    seen, total = set(), 0
    for t in model.state_dict(keep_vars=True).values():
        if id(t) not in seen:
            seen.add(id(t))
            total += tensor_bytes(t.data if isinstance(t, nn.Parameter) else t)
    return total


def layer_bytes(model: nn.Module, names: list[str]) -> int:
    """The weights (and biases) of the named layers."""
    return sum(tensor_bytes(p.data) for p in _layer_params(model, names))


def layer_numel(model: nn.Module, names: list[str]) -> int:
    """How many numbers the named layers' weights (and biases) hold: their size at 16 or 32 bits, whatever
    dtype the model itself has."""
    return sum(p.numel() for p in _layer_params(model, names))


def _layer_params(model: nn.Module, names: list[str]) -> list[torch.Tensor]:
    modules = [model.get_submodule(name) for name in names]
    return [p for m in modules for p in (m.weight, m.bias) if p is not None]


@torch.no_grad()
def latency_ms(model: nn.Module, batch: torch.Tensor, repeats: int = 20, budget_s: float = 5.0) -> float:
    """Median wall time of a forward pass, after two warm-up passes: `repeats` passes, or as many as fit
    in `budget_s` (at least five)."""
    for _ in range(2):
        model(batch)
    times: list[float] = []
    while len(times) < repeats and (len(times) < 5 or sum(times) < budget_s * 1e3):
        t0 = time.perf_counter()
        model(batch)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


PEAK_SCRIPT = """
import json, os, sys, torch
import openclaw, openclaw.sdk, safetensors.torch
from openclaw.engine.metrics import peak_memory_bytes
from openclaw.exports.quantize import torchao
from openclaw.user_code import import_path
torchao()  # both sides import the same libraries, so they start from the same footprint
model_fn = import_path(sys.argv[5], "model_fn") if sys.argv[5] else None
resident = lambda: os.sysconf("SC_PAGE_SIZE") * int(open("/proc/self/statm").read().split()[1])
before = resident()  # after every import loading needs (the SDK's alone were 210 MB): the model's growth only
model = openclaw.load_model(sys.argv[1], trust_code=sys.argv[4] == "trust", model_fn=model_fn)
shape, dtype = json.loads(sys.argv[2]), getattr(torch, sys.argv[3])
with torch.no_grad():
    model(torch.zeros(shape, dtype=dtype))
print(json.dumps({"peak": peak_memory_bytes(torch.device("cpu")), "model": resident() - before}))
"""


def importable(fn: Callable | None) -> str:
    """`module:qualname` by which a fresh process finds `fn` ("" for None). A ConfigError for a function it
    cannot import: a lambda, a nested function, or one defined in `__main__` (a script, a notebook)."""
    if fn is None:
        return ""
    ref = f"{getattr(fn, '__module__', '')}:{getattr(fn, '__qualname__', '')}"
    try:
        found = import_path(ref, "model_fn") if not ref.startswith("__main__:") and "<" not in ref else None
    except ConfigError:
        found = None
    if found is not fn:
        raise ConfigError(f"`model_fn` {ref} cannot be imported by name, and the export measures memory in a fresh "
                          f"process that must build the model with it: define it at the top level of a module on "
                          f"PYTHONPATH (not in a script, a notebook cell or another function).")
    return ref


def forward_memory(sources: dict[str, str], shape: list[int], dtype: torch.dtype,
                   trust_code: bool = False, model_fn: str = "") -> Callable[[], dict[str, dict[str, int]]]:
    """Start measuring the memory of a fresh process that loads a source (a checkpoint or an export) and runs
    one forward pass on a batch of `shape`, as a deployment pays it, for each of `sources` (name -> source);
    the returned function waits for the results: `peak`, the process's peak resident memory, torch's own
    footprint included; `model`, how much its resident memory grew from just before loading the model to
    just after the forward pass (Linux). The processes run at once, and beside the caller's untimed work:
    each measures only itself, and each spends most of its time importing torch. `model_fn`: the
    `importable` name of the function that builds the model, if the caller passed one."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.dirname(os.path.dirname(os.path.dirname(
        os.path.abspath(__file__)))), os.environ.get("PYTHONPATH", "")])}
    procs = {name: subprocess.Popen([sys.executable, "-c", PEAK_SCRIPT, source, json.dumps(shape),
                                     str(dtype).removeprefix("torch."), "trust" if trust_code else "no", model_fn],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for name, source in sources.items()}

    def results() -> dict[str, dict[str, int]]:
        out, failed = {}, []
        for name, proc in procs.items():
            try:
                stdout, stderr = proc.communicate(timeout=600)
            except subprocess.TimeoutExpired:
                proc.kill()
                stdout, stderr = proc.communicate()
            if proc.returncode != 0:
                failed.append(f"{name}: {stderr[-1500:]}")
            else:
                out[name] = json.loads(stdout.strip().splitlines()[-1])
        if failed:
            raise RuntimeError(f"measuring the forward pass's memory failed: {'; '.join(failed)}")
        return out
    return results
