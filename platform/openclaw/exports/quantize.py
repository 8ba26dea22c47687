"""Which Linear layers a quantization mode takes, and quantizing them with torchao (plain torch + torchao).

A layer is left in full precision, and listed with the reason, when the mode cannot take it (int4's CPU
kernel needs output features divisible by 16), or when it shares its weight with another module (the
gpt's output head is its token embedding: quantizing it would store the weight twice).

int4 layers are quantized from bf16 weights and compute in bf16 (`Int4Linear`): torchao's int4 kernels
take bf16 activations (its CUDA int4 tensor asserts it), and torch's CPU int4 matmul
(`_weight_int4pack_mm_for_cpu`) has a fast path only for bf16: with fp32 activations a 256-1024-256 MLP's
int4 forward of 1,024 rows took 969 ms against 15 ms in bf16 (torch 2.13, one thread, this 2-core CPU),
for the same output error.
"""
from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.utils import parametrize

from openclaw.engine.models import tied_parameters
from openclaw.errors import ConfigError

MODES = ("int8", "int8-dynamic", "int4")
GROUP_SIZES = (32, 64, 128)
INT4_OUT_MULTIPLE = 16


@dataclass
class Plan:
    mode: str
    quantized: list[str] = field(default_factory=list)
    kept: dict[str, str] = field(default_factory=dict)
    """Linear layers left in full precision, with why."""
    groups: dict[str, int] = field(default_factory=dict)
    """int4: each quantized layer's group size (weights per scale)."""

    @property
    def group_size(self) -> int | str | None:
        """The one group size of every int4 layer, "per layer" where they differ, None for int8."""
        sizes = set(self.groups.values())
        return None if not sizes else sizes.pop() if len(sizes) == 1 else "per layer"

    def describe(self) -> str:
        counts = {g: list(self.groups.values()).count(g) for g in sorted(set(self.groups.values()))}
        if len(counts) > 1:
            return f"{self.mode}, group sizes " + ", ".join(f"{g} ({n} layer{'s' * (n > 1)})" for g, n in counts.items())
        return f"{self.mode}, group size {self.group_size}" if counts else self.mode


def plan(model: nn.Module, mode: str, group_size: int | None) -> Plan:
    """Which of the model's Linear layers `mode` quantizes (and, for int4, each one's group size: `group_size`,
    else the largest of 128, 64 and 32 that divides the layer's input features, as fewer scales take
    fewer bytes). A `ConfigError` naming the option if it takes none, or if `group_size` does not
    divide a layer it would take."""
    if mode not in MODES:
        raise ConfigError(f"`--quantize` must be one of {', '.join(MODES)}, got {mode!r}.")
    if mode == "int4" and group_size is not None and group_size not in GROUP_SIZES:
        raise ConfigError(f"`--group-size` must be one of {', '.join(map(str, GROUP_SIZES))}, got {group_size}.")
    if mode != "int4" and group_size is not None:
        raise ConfigError(f"`--group-size` is for int4 (it groups int4 weights for their scales), not {mode}.")
    tied = tied_modules(model)
    out = Plan(mode)
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        divisors = [g for g in sorted(GROUP_SIZES, reverse=True) if module.in_features % g == 0]
        if name in tied:
            out.kept[name] = f"its weight is tied to {tied[name]}'s, which stays in full precision"
        elif type(module) is not nn.Linear:
            out.kept[name] = (f"its weight is parametrized ({', '.join(module.parametrizations)})"
                              if parametrize.is_parametrized(module) else
                              f"it is a {type(module).__name__}, a subclass of nn.Linear whose owner may read its "
                              f"weight directly (nn.MultiheadAttention's out_proj does)")
        elif mode == "int4" and module.out_features % INT4_OUT_MULTIPLE:
            out.kept[name] = (f"int4 needs output features divisible by {INT4_OUT_MULTIPLE} "
                              f"({module.out_features} here)")
        elif mode == "int4" and not divisors:  # kept whatever `--group-size` says, as when it is left out
            out.kept[name] = f"int4 needs input features divisible by {min(GROUP_SIZES)} ({module.in_features} here)"
        elif mode == "int4" and group_size and module.in_features % group_size:
            raise ConfigError(f"`--group-size` {group_size} does not divide the {module.in_features} input features of "
                              f"layer {name}; use {' or '.join(map(str, divisors[::-1]))}, or leave it out to choose "
                              f"per layer.")
        else:
            out.quantized.append(name)
            if mode == "int4":
                out.groups[name] = group_size or divisors[0]
    if not out.quantized:
        kept = "; ".join(f"{k}: {v}" for k, v in out.kept.items()) or "it has no nn.Linear layer"
        raise ConfigError(f"`--quantize {mode}` finds no Linear layer it can quantize in this model ({kept}). "
                          f"Quantized export works on models whose weights are mostly nn.Linear layers.")
    return out


def tied_modules(model: nn.Module) -> dict[str, str]:
    """Each module that shares a parameter with another, and that other module (`tok` for the gpt's head)."""
    out = {}
    for a, b in tied_parameters(model):
        ma, mb = a.rsplit(".", 1)[0], b.rsplit(".", 1)[0]
        out.setdefault(ma, mb)
        out.setdefault(mb, ma)
    return out


def torchao():
    """torchao, imported quietly: on a machine without CUDA it logs that its CUDA kernels cannot load,
    which is expected and not the user's concern."""
    quiet = [logging.getLogger(n) for n in ("torchao", "torch.utils._pytree")]
    levels = [log.level for log in quiet]
    for log in quiet:
        log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import torchao as ao
            import torchao.prototype.safetensors.safetensors_support  # noqa: F401  (imported quietly, once)
            import torchao.quantization  # noqa: F401  (registers its tensor types for weights_only loading)
    except ImportError:
        raise ConfigError("quantized export needs torchao: pip install 'openclaw[quantize]'.") from None
    finally:
        for log, level in zip(quiet[1:], levels[1:]):
            log.setLevel(level)
    return ao


def tensor_types() -> list[type]:
    """torchao's tensor types that `torch.load(weights_only=True)` must be told about (the CPU int4 one is
    a prototype, which torchao does not register); library classes, so allowing them runs no file's code."""
    torchao()
    from torchao.prototype.quantization.int4 import Int4OpaqueTensor
    return [Int4OpaqueTensor]


def config_for(mode: str, group_size: int | None, device: torch.device):
    """torchao's config for `mode` on `device`; int4 on a CPU is torchao's CPU int4 weight-only path."""
    torchao()
    from torchao.quantization import Int4WeightOnlyConfig, Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig
    if mode == "int8":
        return Int8WeightOnlyConfig()
    if mode == "int8-dynamic":
        return Int8DynamicActivationInt8WeightConfig()
    if device.type == "cuda":
        return Int4WeightOnlyConfig(group_size=group_size)
    from torchao.prototype.quantization.int4 import PrototypeInt4WeightOnlyConfig
    return PrototypeInt4WeightOnlyConfig(group_size=group_size)


class Int4Linear(nn.Linear):
    """An int4-quantized Linear that computes in its weight's dtype (bf16): the input is cast to it and the
    output back to the input's dtype, so the rest of the model keeps its own precision. Its state dict is
    an `nn.Linear`'s."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.to(self.weight.dtype)).to(x.dtype)


def compute_int4_in_bf16(model: nn.Module) -> nn.Module:
    """Make every Linear holding a bf16 quantized weight (a torchao tensor, as int4 layers are) an `Int4Linear`,
    in place; on quantizing and on loading an export."""
    for module in model.modules():
        w = getattr(module, "weight", None)
        if type(module) is nn.Linear and type(w) not in (torch.Tensor, nn.Parameter) and w.dtype == torch.bfloat16:
            module.__class__ = Int4Linear
    return model


def quantize(model: nn.Module, p: Plan, device: torch.device) -> nn.Module:
    """Quantize the planned layers of `model` (on `device`) in place; returns it, in eval mode. int4 layers are
    quantized from their weights in bf16, and compute in bf16."""
    from torchao.quantization import quantize_
    model.to(device).eval()
    if p.mode == "int4":
        for name in p.quantized:
            model.get_submodule(name).to(torch.bfloat16)
    batches = {g: {n for n in p.quantized if p.groups.get(n) == g} for g in set(p.groups.get(n) for n in p.quantized)}
    for group_size, names in batches.items():  # one torchao config per group size
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quantize_(model, config_for(p.mode, group_size, device), filter_fn=lambda module, fqn: fqn in names)
    return compute_int4_in_bf16(model)


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes a tensor holds, a quantized tensor's inner data and scales included."""
    if type(t) is not torch.Tensor and hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        return sum(tensor_bytes(getattr(t, n)) for n in names)
    return t.numel() * t.element_size()
