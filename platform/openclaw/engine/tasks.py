"""Tasks turn a batch into a loss (plain torch; worker process). A loss is a *sum* over samples plus the
sample count, so the engine can normalise by the global batch size and keep the optimization
independent of the world size.

The built-in tasks also split a batch into the model's input and the targets and score a model's
output against the targets (`output_loss`, and for validation `output_sums`): what a pipeline needs,
whose last stage computes the loss without seeing the batch.
"""
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
    def split(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        return batch["x"], batch["y"]

    def output_loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float(), y.long(), reduction="sum")

    def loss(self, model, batch):
        x, y = self.split(batch)
        return self.output_loss(model(x), y), len(y)

    def output_sums(self, logits: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        """The validation sums of one output: the loss and the correct predictions (a target of -100, a
        pipeline's padding row, counts in neither)."""
        return {"loss": self.output_loss(logits, y), "correct": (logits.argmax(-1) == y.long()).sum()}

    def eval_sums(self, model, batch):
        x, y = self.split(batch)
        return {**{k: v.item() for k, v in self.output_sums(model(x).float(), y).items()}, "count": len(y)}


class LanguageModeling:
    """Next-token prediction over a `[B, T+1]` token column; a sample's loss is its mean token loss."""

    def split(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = batch["x"].long()
        return tokens[:, :-1], tokens[:, 1:]

    def output_loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                               reduction="sum") / targets.shape[1]

    def loss(self, model, batch):
        x, y = self.split(batch)
        return self.output_loss(model(x), y), len(x)

    def output_sums(self, logits: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"loss": self.output_loss(logits, targets)}

    def eval_sums(self, model, batch):
        loss, count = self.loss(model, batch)
        return {"loss": loss.item(), "count": count}


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
