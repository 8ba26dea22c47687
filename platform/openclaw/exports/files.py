"""A quantized export on disk, and loading it back (plain torch + torchao): the quantized weights, as
`model.safetensors` where torchao can flatten every tensor type (int8, int8-dynamic, int4 on CUDA) and
otherwise as `model.pt`, a state dict loaded with `weights_only` (int4 on a CPU, whose packed tensor
torchao cannot yet write as safetensors); `config.json`, the source's redacted config;
`quantization.json`, what was quantized and what it cost.

Neither file runs code on loading: safetensors holds plain tensors and a JSON description that torchao
turns back into its own tensor types (an allowlist), and the `.pt` loader admits torch's types and
torchao's. A weight tied to another (the gpt's head and embedding) is stored once and tied again on
loading. The model is rebuilt from its config on the meta device (no memory, no initialization) and the
weights are assigned into it, so the loaded model is exactly the exported one.
"""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from openclaw.engine.model_io import build_from_config
from openclaw.engine.models import retie, tied_parameters
from openclaw.errors import CheckpointError
from openclaw.exports.quantize import compute_int4_in_bf16, tensor_types, torchao

SAFETENSORS_FILE, PT_FILE, CONFIG_FILE, REPORT_FILE = "model.safetensors", "model.pt", "config.json", "quantization.json"


def is_export(path: str | os.PathLike) -> bool:
    return (Path(path) / REPORT_FILE).is_file()


def model_file(directory: str | os.PathLike) -> Path:
    """The weights file of an export folder."""
    d = Path(directory)
    return d / SAFETENSORS_FILE if (d / SAFETENSORS_FILE).is_file() else d / PT_FILE


def save_export(directory: str | os.PathLike, model: nn.Module, config: dict[str, Any],
                report: dict[str, Any]) -> Path:
    """Write the export; its report last, since the report is what marks a folder as an export."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    for name in (REPORT_FILE, SAFETENSORS_FILE, PT_FILE):
        (d / name).unlink(missing_ok=True)
    aliases = {alias for _, alias in tied_parameters(model)}
    state = {k: v for k, v in model.state_dict().items() if k not in aliases}
    if _safetensors_can_hold(state):
        from safetensors.torch import save_file
        from torchao.prototype.safetensors.safetensors_support import flatten_tensor_state_dict
        tensors, metadata = flatten_tensor_state_dict(state)
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(d / SAFETENSORS_FILE), metadata=metadata)
    else:
        torch.save(state, d / PT_FILE)
    (d / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True))
    write_report(d, report)
    return d


def _safetensors_can_hold(state: dict[str, torch.Tensor]) -> bool:
    torchao()
    from torchao.prototype.safetensors.safetensors_utils import ALLOWED_TENSORS_SUBCLASSES
    return all(type(t) is torch.Tensor or type(t).__name__ in ALLOWED_TENSORS_SUBCLASSES for t in state.values())


def discard_export(directory: str | os.PathLike) -> None:
    """Remove what `save_export` wrote (the report first: it marks the folder as an export), and the
    folder if nothing else is left in it."""
    d = Path(directory)
    for name in (REPORT_FILE, SAFETENSORS_FILE, PT_FILE, CONFIG_FILE):
        (d / name).unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        d.rmdir()


def write_report(directory: str | os.PathLike, report: dict[str, Any]) -> Path:
    path = Path(directory) / REPORT_FILE
    path.write_text(json.dumps(report, indent=2, sort_keys=True))
    return path


def load_export(directory: str | os.PathLike, *, trust_code: bool = False,
                model_fn: Callable[..., nn.Module] | None = None) -> nn.Module:
    """The quantized model of an export folder, in eval mode."""
    d = Path(directory)
    config = json.loads((d / CONFIG_FILE).read_text())
    with torch.device("meta"):
        model = build_from_config(config, str(d), trust_code=trust_code, model_fn=model_fn)
    tied = tied_parameters(model)
    weights = read_weights(d)
    missing, unexpected = model.load_state_dict(weights, assign=True, strict=False)
    if unexpected or set(missing) - {alias for _, alias in tied}:
        raise CheckpointError(f"{model_file(d)} does not match the model its config.json describes (missing "
                              f"{sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}).")
    retie(model, tied)
    return compute_int4_in_bf16(model).eval()


def read_weights(directory: Path) -> dict[str, torch.Tensor]:
    """An export's state dict, read without running anything from the file."""
    path = model_file(directory)
    try:
        if path.name == SAFETENSORS_FILE:
            from safetensors import safe_open
            from torchao.prototype.safetensors.safetensors_support import unflatten_tensor_state_dict
            with safe_open(str(path), framework="pt") as f:
                tensors, metadata = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
            state, leftover = unflatten_tensor_state_dict(tensors, metadata)
            if leftover or len(state) != len(json.loads(metadata["tensor_names"])):
                raise ValueError(f"tensors without a description: {sorted(leftover)[:5]}, or descriptions without "
                                 f"their tensors")
            return state
        with torch.serialization.safe_globals(tensor_types()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path} is not a quantized export's weights ({str(e)[:300]}).") from None
