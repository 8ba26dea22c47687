"""The strategy protocol every kind of parallelism implements (plain torch; worker process). See
`openclaw.engine.parallel` for what a strategy does."""
from __future__ import annotations

from typing import Any, Callable, Protocol

import torch
from torch import nn

Batch = dict[str, torch.Tensor]
LossFn = Callable[[nn.Module, Batch], tuple[torch.Tensor, int]]
"""(model, micro-batch) -> (loss: the sum over the micro-batch's samples, sample count)."""
BackwardFn = Callable[[torch.Tensor], None]
"""Back-propagates one micro-batch's loss (the engine scales it: global-batch mean, fp16 loss scale)."""


class Strategy(Protocol):
    name: str

    def wrap(self, model: nn.Module, device: torch.device) -> nn.Module:
        """The model, on `device`, ready for the ranks of the default process group (if any)."""

    def forward_backward(self, model: nn.Module, micro_batches: list[Batch], loss_fn: LossFn,
                         backward: BackwardFn) -> tuple[list[torch.Tensor], int]:
        """Forward and backward every micro-batch; gradients are synchronized after the last. Returns
        each micro-batch's (detached) loss sum and the samples seen on this rank."""

    def clip_grad_norm(self, model: nn.Module, max_norm: float | None) -> torch.Tensor:
        """The global gradient norm (over every rank's gradients), clipped to `max_norm` unless None."""

    def unwrap(self, model: nn.Module) -> nn.Module:
        """The user's module inside the wrapper: evaluation, FLOP counts, attributes of the model."""

    def state_dict(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """{"model": ..., "optimizer": ...}: the full state, loadable into a bare model."""

    def load_state_dict(self, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
        """Load a `state_dict` (from this strategy's or any other's save)."""
