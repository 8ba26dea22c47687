"""Which floating-point precision a device trains in (plain torch; worker process)."""
from __future__ import annotations

import torch


def resolve_precision(precision: str, device: torch.device) -> torch.dtype:
    """`train.precision` on `device`: auto is bf16 where the GPU supports it, else fp32."""
    if precision == "auto":
        bf16_ok = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if bf16_ok else torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
