"""What a training step computes and what the device could compute (plain torch; worker process).

`training_flops` counts one micro-batch's forward and backward with torch's `FlopCounterMode`, for the
built-in models and user models alike (matmuls, convolutions and attention: what MFU counts).
`peak_flops` looks a GPU's name up in a table of dense peaks per precision, matching the model exactly
("L4" is not "L40S"); `mfu` divides the one by the other.
"""
from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

# Dense (no 2:4 sparsity) peak FLOP/s from NVIDIA's datasheets, per precision class: fp8, bf16 (= fp16
# on the tensor cores), tf32 (fp32 matmuls on the tensor cores, compute capability 8.0+) and fp32 (CUDA
# cores). Volta and Turing have no bf16 or tf32: their "bf16" is the fp16 tensor-core peak.
PEAKS: dict[str, dict[str, float]] = {
    "H100 SXM": {"fp8": 1979e12, "bf16": 989e12, "tf32": 494.5e12, "fp32": 66.9e12},
    "H100 PCIe": {"fp8": 1513e12, "bf16": 756e12, "tf32": 378e12, "fp32": 51.2e12},
    "H100 NVL": {"fp8": 1670e12, "bf16": 835e12, "tf32": 417.5e12, "fp32": 60e12},
    "H200": {"fp8": 1979e12, "bf16": 989e12, "tf32": 494.5e12, "fp32": 66.9e12},
    "H200 NVL": {"fp8": 1670e12, "bf16": 835e12, "tf32": 417.5e12, "fp32": 60e12},
    "A100": {"bf16": 312e12, "tf32": 156e12, "fp32": 19.5e12},
    "L40S": {"fp8": 733e12, "bf16": 362e12, "tf32": 183e12, "fp32": 91.6e12},
    "L4": {"fp8": 242e12, "bf16": 121e12, "tf32": 60e12, "fp32": 30.3e12},
    "A10G": {"bf16": 125e12, "tf32": 62.5e12, "fp32": 31.2e12},  # the A10's datasheet; AWS publishes none
    "V100 SXM2": {"bf16": 125e12, "fp32": 15.7e12},
    "V100 PCIe": {"bf16": 112e12, "fp32": 14e12},
    "T4": {"bf16": 65e12, "fp32": 8.1e12},
}


def gpu_model(name: str) -> str | None:
    """The `PEAKS` entry of a CUDA device name (`torch.cuda.get_device_name`), matched on whole words:
    "NVIDIA H100 80GB HBM3" is an H100 SXM, "NVIDIA H100 PCIe" a PCIe card, "NVIDIA L40S" not an L4."""
    words = set(re.split(r"[^A-Z0-9]+", name.upper()))
    variant = "PCIe" if "PCIE" in words else "NVL" if "NVL" in words else None
    if "H100" in words or "GH200" in words:
        return f"H100 {variant or 'SXM'}"
    if "H200" in words:
        return "H200 NVL" if variant == "NVL" else "H200"
    if "V100" in words or "V100S" in words:
        return "V100 PCIe" if variant == "PCIe" else "V100 SXM2"
    return next((key for key in ("A100", "L40S", "L4", "A10G", "T4") if key in words), None)


def peak_flops(name: str, precision: str, tf32: bool = False) -> float | None:
    """The dense peak of GPU `name` for a run in `precision` (fp8, bf16, fp16, fp32; with `tf32`, fp32
    matmuls on the tensor cores). None for a GPU not in the table (no MFU, only FLOP/s)."""
    model = gpu_model(name)
    if model is None:
        return None
    peaks = PEAKS[model]
    kind = {"fp16": "bf16"}.get(precision, precision)
    if kind == "fp32" and tf32:
        kind = "tf32" if "tf32" in peaks else "fp32"
    return peaks.get(kind)


def device_peak_flops(device: torch.device, precision: str, tf32: bool = False) -> float | None:
    if device.type != "cuda":
        return None
    return peak_flops(torch.cuda.get_device_name(device), precision, tf32)


def training_flops(model: nn.Module, loss_fn: Any, batch: dict[str, torch.Tensor]) -> int:
    """FLOPs of one forward and backward of `batch` (`loss_fn(model, batch)` returns (loss, samples)).
    Gradients are left as they were: the count runs on the real model before the first step."""
    before = {name: p.grad for name, p in model.named_parameters()}
    with FlopCounterMode(display=False) as counter:
        loss, _ = loss_fn(model, batch)
        loss.backward()
    for name, p in model.named_parameters():
        p.grad = before[name]
    return int(counter.get_total_flops())


def mfu(flops_per_s: float, peak: float | None, world: int) -> float | None:
    """Model FLOPs utilization: the step's useful FLOP/s over the peak of every device in the world."""
    return flops_per_s / (peak * world) if peak else None
