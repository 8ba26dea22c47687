"""The gradient noise scale, measured as the model trains (plain torch; worker process).

McCandlish et al. 2018, "An Empirical Model of Large-Batch Training", Appendix A.1. The simple noise
scale B_simple = tr(Sigma) / |G|^2 (Sigma: the per-sample gradients' covariance, G: the true gradient)
is about the batch size above which a larger batch stops buying fewer steps. Two measurements of the
squared norm of a mean gradient, |G_small|^2 over B_small samples and |G_big|^2 over B_big, give
unbiased estimates of both terms (E|G_B|^2 = |G|^2 + tr(Sigma)/B):

    |G|^2 ~= (B_big |G_big|^2 - B_small |G_small|^2) / (B_big - B_small)
    S     ~= (|G_small|^2 - |G_big|^2) / (1/B_small - 1/B_big)

Every step gives such a pair nearly for free: the big one is the step's global gradient (its norm is
computed for clipping anyway); the small one is a gradient this rank computed on part of the global
batch before any synchronization (the strategy's `local_grad`: after the first of several
micro-batches, or before DDP's all-reduce). The paper's advice is followed: S and |G|^2 are each
smoothed over steps before their ratio is taken, since the ratio of two noisy estimates is biased.
"""
from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from openclaw.engine.metrics import allreduce_sum

NOISE_EMA_DECAY = 0.99
"""Per step: the smoothed |G|^2 and S forget a step's estimate with a time constant of ~100 steps."""


@dataclass
class LocalGrad:
    """A gradient this rank computed on part of the global batch, before any synchronization."""
    sq_norm: torch.Tensor
    """Its squared L2 norm as the backward left it (scaled by the engine's loss scale and the fp16 loss
    scaler); a 0-d tensor on the device, not read yet."""
    samples: int
    """The samples it sums over."""


@dataclass(frozen=True)
class GradPair:
    """One step's two measurements: squared norms of mean gradients over a small and the global batch."""
    small_sq: float
    small_batch: int
    big_sq: float
    big_batch: int


def measure_local(params: Iterable[nn.Parameter], samples: int) -> LocalGrad | None:
    """The parameters' gradients as they are now (whole tensors, this rank's, over `samples` samples);
    None when none has one. One fused norm, not read."""
    grads = [p.grad for p in params if p.grad is not None]
    return LocalGrad(nn.utils.get_total_norm(grads).float() ** 2, samples) if grads else None


def mean_grad_sq(local: LocalGrad, loss_scale: float, amp_scale: torch.Tensor) -> torch.Tensor:
    """|G_small|^2: the local gradient is amp_scale x loss_scale x its samples' sum (see `engine.engine`)."""
    return local.sq_norm.float() / (amp_scale.float() * (loss_scale * local.samples)) ** 2


def grad_pair(small_sq: float, small_batch: int, big_norm: float, big_batch: int) -> GradPair | None:
    """The step's pair, or None when there is nothing to compare (or the small one overflowed)."""
    if not 0 < small_batch < big_batch or not math.isfinite(small_sq):
        return None
    return GradPair(small_sq, small_batch, big_norm ** 2, big_batch)


def noise_terms(p: GradPair) -> tuple[float, float]:
    """Unbiased estimates (|G|^2, S = tr(Sigma)) from one pair."""
    g2 = (p.big_batch * p.big_sq - p.small_batch * p.small_sq) / (p.big_batch - p.small_batch)
    s = (p.small_sq - p.big_sq) / (1 / p.small_batch - 1 / p.big_batch)
    return g2, s


def noise_metrics(ema: list[float], g2_sum: float, s_sum: float, count: float, ranks: float,
                  decay: float = NOISE_EMA_DECAY) -> tuple[dict[str, float], list[float]]:
    """A logging window's metrics and the smoothed state after it (pure).

    `ema`: the smoothed [|G|^2, S] so far ([0, 0] at the start: both are biased toward 0 alike, which
    their ratio cancels). `g2_sum`, `s_sum`: the window's estimates summed over its steps and the
    measuring ranks, `count` of them, on `ranks` ranks. The window's steps each weigh in as the window's
    mean (an EMA over steps, applied a window at a time). A ratio whose terms are not both positive
    (too few or too noisy measurements) is left out rather than logged."""
    if count <= 0:
        return {}, ema
    g2, s = g2_sum / count, s_sum / count
    keep = decay ** (count / max(ranks, 1.0))
    ema = [keep * ema[0] + (1 - keep) * g2, keep * ema[1] + (1 - keep) * s]
    out = {}
    if g2 > 0 and s > 0:
        out["train/grad_noise_scale"] = s / g2
    if ema[0] > 0 and ema[1] > 0:
        out["train/grad_noise_scale_smooth"] = ema[1] / ema[0]
    return out, ema


class NoiseWindow:
    """One logging window's gradient pairs on this rank."""

    def __init__(self):
        self.reset()

    def reset(self, carried: list[float] | None = None, mine: bool = False) -> None:
        """A new window. `carried`: the sums [|G|^2, S, count, ranks] of the window a checkpoint cut (the
        same on every rank; `carry`), which `mine` (one rank) holds as its own, so that the window's
        close sums what the uninterrupted run's does."""
        carried = carried if carried and len(carried) == 4 else [0.0, 0.0, 0.0, 0.0]
        self.g2_sum, self.s_sum, count = (carried[0], carried[1], carried[2]) if mine else (0.0, 0.0, 0.0)
        self.count, self.carried_ranks = int(count), carried[3]

    def carry(self, device: torch.device) -> list[float]:
        """Collective: the window so far over every rank, [|G|^2, S, count, ranks], for a checkpoint."""
        g2, s, count, ranks = allreduce_sum([self.g2_sum, self.s_sum, float(self.count), float(self.count > 0)],
                                            device)
        return [g2, s, count, max(ranks, self.carried_ranks)]

    def add(self, pair: GradPair | None) -> None:
        if pair is not None:
            g2, s = noise_terms(pair)
            self.g2_sum, self.s_sum, self.count = self.g2_sum + g2, self.s_sum + s, self.count + 1

    def close(self, ema: list[float], device: torch.device) -> tuple[dict[str, float], list[float]]:
        """Collective (every rank, at every log step): the window's metrics over all ranks, and the
        smoothed state after it (the same on every rank); a new window begins."""
        g2, s, count, ranks = self.carry(device)
        self.reset()
        return noise_metrics(ema, g2, s, count, ranks)
