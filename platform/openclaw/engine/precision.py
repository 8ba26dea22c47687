"""Which floating-point precision a device trains in (plain torch; worker process).

`choose_precision` is a pure function of what was asked and what the device is (`DeviceFacts`), so every
row of the table is tested on a CPU; `device_facts` reads a real device, and `apply_matmul_precision`
is the one place that sets torch's global TF32 switches.

    asked  device                      trains in                 why
    auto   CUDA, compute capability 8+  bf16 autocast             bf16 tensor cores, no loss scaling needed
    auto   CUDA 7.x (V100, T4)          fp16 autocast + scaler    tensor cores without bf16
    auto   older CUDA, CPU              fp32                      no 16-bit tensor cores (CPU: see below)
    bf16   CUDA without bf16            fp16 autocast + scaler    the nearest the device has
    fp16   any                          fp16 autocast + scaler
    fp32   any                          fp32 (TF32 matmuls on 8+ unless `train.tf32: false`)
    fp8    CUDA 8.9+ (Ada, Hopper)      float8 Linears + bf16     torchao float8 training (`engine.fp8`)
    fp8    CUDA below 8.9               bf16 autocast (or fp16)   no float8 tensor cores
    fp8    CPU                          float8 emulated           a config error before any worker starts
    auto + `train.fp8: auto` on 8.9+    fp8                       as `fp8`; bf16 where fp8 measures slower

On CPU `auto` is fp32: bf16 autocast measured no faster on this project's CPUs (`python
bench/cpu_precision.py`: the digits MLP at 0.67x fp32's samples/s, the text-lm GPT at 1.05x with
overlapping spreads), and it costs precision; fp16 has no fast CPU kernels.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp8": torch.bfloat16}
"""The autocast dtype of each precision (fp8: the layers that stay high precision run in bf16)."""
FP8_CAPABILITY = (8, 9)


@dataclass(frozen=True)
class DeviceFacts:
    """What precision depends on: the device type, and a GPU's compute capability and bf16 support."""
    type: str
    capability: tuple[int, int] | None = None
    bf16: bool = False


@dataclass(frozen=True)
class Precision:
    """A precision decision: what the step runs in, and why."""
    name: str
    """fp32, bf16, fp16 or fp8."""
    scaler: bool
    """Loss scaling (`torch.amp.GradScaler`): fp16 only, whose range is too small for small gradients."""
    tf32: bool
    """fp32 matmuls run as TF32 on the tensor cores (compute capability 8.0 and later)."""
    reason: str

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.name]


def device_facts(device: torch.device) -> DeviceFacts:
    if device.type != "cuda":
        return DeviceFacts(device.type)
    return DeviceFacts("cuda", torch.cuda.get_device_capability(device), torch.cuda.is_bf16_supported())


def choose_precision(asked: str, facts: DeviceFacts, tf32: bool = True, fp8: str = "off") -> Precision:
    """`train.precision` (auto, fp32, bf16, fp16, fp8) and `train.fp8` on a device: see the module's table."""
    cap = facts.capability or (0, 0)
    on_gpu = facts.type == "cuda"
    allow_tf32 = tf32 and on_gpu and cap >= (8, 0)
    where = f"compute capability {cap[0]}.{cap[1]}" if on_gpu else facts.type.upper()
    if asked == "fp8" or (asked == "auto" and fp8 == "auto" and on_gpu and cap >= FP8_CAPABILITY):
        how = "as asked" if asked == "fp8" else "auto with `train.fp8: auto`"
        if on_gpu and cap < FP8_CAPABILITY:
            fallback = choose_precision("bf16", facts, tf32)
            return Precision(fallback.name, fallback.scaler, fallback.tf32,
                             f"fp8 asked, but {where} has no float8 tensor cores (8.9+): {fallback.reason}")
        if not on_gpu:
            return Precision("fp8", False, False, "fp8 as asked, emulated on CPU (no float8 hardware: slow)")
        return Precision("fp8", False, allow_tf32, f"fp8 {how}: torchao float8 Linears on {where}, bf16 elsewhere")
    if asked == "auto":
        if on_gpu and cap >= (8, 0) and facts.bf16:
            return Precision("bf16", False, allow_tf32, f"auto: bf16 autocast on {where} (bf16 tensor cores)")
        if on_gpu and cap >= (7, 0):
            return Precision("fp16", True, False, f"auto: fp16 autocast with loss scaling on {where} "
                                                  f"(tensor cores without bf16)")
        why = "no 16-bit tensor cores" if on_gpu else "bf16 autocast on CPUs is faster for some models, slower for others"
        return Precision("fp32", False, allow_tf32, f"auto: fp32 on {where} ({why})")
    if asked == "bf16" and on_gpu and not facts.bf16:
        return Precision("fp16", True, False, f"bf16 asked, but {where} has no bf16: fp16 autocast with loss "
                                              f"scaling instead")
    if asked == "fp16":
        return Precision("fp16", True, False, "fp16 autocast with loss scaling, as asked")
    if asked == "fp32":
        return Precision("fp32", False, allow_tf32, "fp32, as asked" + (" (TF32 matmuls)" if allow_tf32 else ""))
    return Precision(asked, False, allow_tf32, f"{asked} autocast, as asked")


PRECISION_ORDER = ("fp32", "fp16", "bf16", "fp8")
"""From what any device trains in to what the fewest do: on mixed devices every rank trains in the first
of the ranks' own choices (`common_precision`)."""


def common_precision(mine: Precision, names: list[str], facts: DeviceFacts, tf32: bool = True) -> Precision:
    """The precision this rank trains in, given every rank's own choice (`names`; pure). One group must
    train in one precision: under DDP an fp16 rank's scaler would skip updates the bf16 ranks apply, so
    their weights part; FSDP's parameter dtype would differ; only the fp8 ranks would time fp8, in
    collectives the others never enter. So every rank takes the least capable choice, chosen again on its
    own device, and says why."""
    least = min(names, key=PRECISION_ORDER.index)
    if least == mine.name:
        return mine
    again = choose_precision(least, facts, tf32)
    return Precision(again.name, again.scaler, again.tf32, f"{again.name}: the least capable worker's precision "
                     f"(another worker's device takes no more); this one alone would train in {mine.name} ({mine.reason})")


def sharded_param_dtype(precision: str) -> torch.dtype | None:
    """The dtype sharded strategies gather parameters in and compute with (FSDP's mixed-precision
    policy) under this precision: bf16 for bf16 and for fp8 (whose other layers run in bf16); None keeps
    the fp32 parameters as they are."""
    return torch.bfloat16 if precision in ("bf16", "fp8") else None


def apply_matmul_precision(p: Precision) -> None:
    """torch's process-wide TF32 switches, set from the decision (both ways, so a switch is undone)."""
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = p.tf32
        torch.backends.cudnn.allow_tf32 = p.tf32
