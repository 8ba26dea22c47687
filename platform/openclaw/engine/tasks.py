"""Tasks turn a batch into a loss. A loss is a *sum* over samples plus the sample count, so the engine
can normalise by the global batch size and keep the optimization independent of the world size."""
from __future__ import annotations

from typing import Callable, Protocol

import torch
from torch import nn
from torch.nn import functional as F

from openclaw.user_code import import_path

Batch = dict[str, torch.Tensor]


class Task(Protocol):
    def loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, int]:
        """Sum of per-sample losses over the batch, and the number of samples."""

    def eval_sums(self, model: nn.Module, batch: Batch) -> dict[str, float]:
        """Sums to aggregate over the validation set; must include `loss` and `count`."""


class Classification:
    def loss(self, model, batch):
        return F.cross_entropy(model(batch["x"]).float(), batch["y"].long(), reduction="sum"), len(batch["y"])

    def eval_sums(self, model, batch):
        logits = model(batch["x"]).float()
        y = batch["y"].long()
        return {"loss": F.cross_entropy(logits, y, reduction="sum").item(),
                "correct": (logits.argmax(-1) == y).sum().item(), "count": len(y)}


class LanguageModeling:
    """Next-token prediction over a `[B, T+1]` token column; a sample's loss is its mean token loss."""

    def _per_sample(self, model, batch):
        tokens = batch["x"].long()
        logits = model(tokens[:, :-1]).float()
        t = tokens.shape[1] - 1
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1), reduction="sum") / t

    def loss(self, model, batch):
        return self._per_sample(model, batch), len(batch["x"])

    def eval_sums(self, model, batch):
        return {"loss": self._per_sample(model, batch).item(), "count": len(batch["x"])}


class UserLoss:
    """A user's `module:function(model, batch) -> (loss_sum, count)`."""

    def __init__(self, fn: Callable):
        self.fn = fn

    def loss(self, model, batch):
        return self.fn(model, batch)

    def eval_sums(self, model, batch):
        loss, count = self.fn(model, batch)
        return {"loss": float(loss), "count": int(count)}


def build_task(name: str) -> Task:
    if name == "classification":
        return Classification()
    if name == "language_modeling":
        return LanguageModeling()
    return UserLoss(import_path(name, "task"))
