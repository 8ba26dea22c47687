"""float8 training through torchao (plain torch + torchao; worker process).

`train.precision: fp8` swaps the model's `nn.Linear` layers whose GEMMs gain from float8 for torchao's
`Float8Linear` (tensorwise dynamic scaling), before the parallelism wrap, as torchtitan does; the rest
of the model runs under bf16 autocast. Which layers gain is `gains_from_fp8`, torchao's tensorwise
auto-filter (`auto_filter_small_kn` in torchtitan): both dimensions multiples of 16, and not small in
both (in_features <= 4096 and out_features <= 1024 measured slower than bf16 on H100s).

A `Float8Linear` keeps its weight in high precision and casts per GEMM, so going back to bf16
(`unconvert`) makes each one an `nn.Linear` in place: the same modules and parameters, which FSDP's
sharding and the optimizer state point at, stay valid.
Whether fp8 pays on this model and device is measured, not assumed: `probe` times the first micro-
batch's forward and backward both ways, and `runtime.policies.fp8_decision` keeps fp8 only if faster.
"""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from openclaw.engine.models import GPT

SMALL_IN, SMALL_OUT = 4096, 1024
"""torchao's tensorwise auto-filter: a Linear with in_features <= 4096 and out_features <= 1024 stays
in bf16 (`torchao.float8.float8_linear_utils._auto_filter_for_tensorwise`)."""


def gains_from_fp8(in_features: int, out_features: int) -> bool:
    """Whether a Linear of this shape is converted: float8 GEMMs need multiples of 16, and small ones lose
    to the casts around them."""
    if in_features % 16 or out_features % 16:
        return False
    return not (in_features <= SMALL_IN and out_features <= SMALL_OUT)


def _filter(module: nn.Module, fqn: str) -> bool:
    return isinstance(module, nn.Linear) and gains_from_fp8(module.in_features, module.out_features)


def kept_in_bf16(model: nn.Module) -> set[str]:
    """Linears never converted: the built-in gpt's output head. Logits in float8 cost loss, so torchtitan's
    float8 configs filter their `output` layer out, and its MX converter does by default."""
    return {"head"} if isinstance(model, GPT) else set()


def convert(model: nn.Module, module_filter: Callable[[nn.Module, str], bool] = _filter) -> list[str]:
    """Swap the Linears that gain for `Float8Linear`, in place, but those `kept_in_bf16`; the names of those
    swapped."""
    from torchao.float8 import convert_to_float8_training
    from torchao.float8.float8_linear import Float8Linear
    kept = kept_in_bf16(model)
    convert_to_float8_training(model, module_filter_fn=lambda m, fqn: fqn not in kept and module_filter(m, fqn))
    return [name for name, m in model.named_modules() if isinstance(m, Float8Linear)]


def converted(model: nn.Module) -> list[str]:
    """The names of the model's float8 Linears (none without torchao's layers)."""
    return [name for name, m in model.named_modules() if type(m).__name__ == "Float8Linear"]


def unconvert(model: nn.Module) -> list[str]:
    """Make every `Float8Linear` an `nn.Linear` again, in place: the same module objects, parameters and
    hooks (a subclass's instance takes its base class; `Float8Linear` keeps nothing `nn.Linear.forward`
    reads besides the weight and bias). FSDP's and the pipeline's bookkeeping, which point at these
    modules, stay valid, and so does an optimizer built on the parameters. The names of those made bf16."""
    names = converted(model)
    for name in names:
        model.get_submodule(name).__class__ = nn.Linear
    return names


def reconvert(model: nn.Module, names: list[str]) -> None:
    """Undo `unconvert` for the modules `names`: each is a `Float8Linear` again, with its float8 settings."""
    from torchao.float8.float8_linear import Float8Linear
    for name in names:
        model.get_submodule(name).__class__ = Float8Linear


def pays(fp8_s: float, bf16_s: float) -> bool:
    """Keep fp8 only when its micro-batch is faster than bf16's: any measured slowdown falls back."""
    return fp8_s < bf16_s


def probe(model: nn.Module, run_micro_batch: Callable[[], None], repeats: int = 3) -> tuple[float, float]:
    """Median seconds of `run_micro_batch` (a forward and backward whose gradients the caller drops) with
    the model's float8 Linears, then with them made bf16 Linears in place; the model ends converted as it
    began, the same modules throughout, so a sharded model's (FSDP, pipeline stages) is probed as it trains.
    The first run of each side warms it up and is not timed."""
    fp8_s = _median_time(run_micro_batch, repeats)
    names = unconvert(model)
    try:
        bf16_s = _median_time(run_micro_batch, repeats)
    finally:
        reconvert(model, names)
    return fp8_s, bf16_s


def _median_time(fn: Callable[[], None], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)
