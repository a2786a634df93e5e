"""The lab's one small-classifier trainer: AdamW, a per-step cosine decay to 0, seeded batches and
seeded augmentation. The X-ray feature network (`features`, and TSTR through it) and the classifier
two-sample test (`c2st`) both train with it, so a fix to one is a fix to both::

    schedule = ClassifierSchedule(epochs=12, batch_size=32, lr=2e-3, augment=hflip)
    losses = fit_classifier(net, x, y, loss_fn, schedule, torch.Generator().manual_seed(0))
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn
from tqdm.std import tqdm


@dataclass(frozen=True)
class ClassifierSchedule:
    epochs: int
    batch_size: int
    lr: float  # AdamW peak, decayed to 0 by a cosine over every step
    weight_decay: float = 0.0
    full_batches_only: bool = False  # True: the last, smaller batch of an epoch is dropped
    augment: Optional[Callable] = None  # augment(batch, g), drawn from g after each epoch's order
    desc: str = "classifier"  # the progress bar's label
    progress: bool = False


def hflip(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Each image mirrored left-right with probability 0.5 (seeded): a chest X-ray's side is no clue."""
    flip = (torch.rand(len(x), generator=g) < 0.5).to(x.device).view(-1, 1, 1, 1)
    return torch.where(flip, x.flip(-1), x)


def _batches(n: int, s: ClassifierSchedule, g: torch.Generator) -> list[torch.Tensor]:
    order = torch.randperm(n, generator=g)
    if s.full_batches_only:
        return [order[i * s.batch_size:(i + 1) * s.batch_size] for i in range(max(1, n // s.batch_size))]
    return list(order.split(s.batch_size))


def fit_classifier(net: nn.Module, x: torch.Tensor, y: torch.Tensor,
                   loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], s: ClassifierSchedule,
                   g: torch.Generator, on_epoch: Optional[Callable[[int, float], None]] = None) -> list[float]:
    """Train ``net`` on images x (N, C, H, W) and targets y (N, ...) -> each epoch's mean loss per image.

    A batch is augmented (``s.augment``) and then moved to the net's device. ``on_epoch(epoch,
    mean_loss)`` runs after each epoch (validation, logging)."""
    device = next(net.parameters()).device
    opt = torch.optim.AdamW(net.parameters(), lr=s.lr, weight_decay=s.weight_decay)
    steps = max(1, len(x) // s.batch_size) if s.full_batches_only else -(-len(x) // s.batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, s.epochs * steps))
    losses = []
    for epoch in tqdm(range(s.epochs), desc=s.desc, disable=not s.progress, leave=False, file=sys.stderr):
        net.train()
        total, seen = 0.0, 0
        for idx in _batches(len(x), s, g):
            xb = s.augment(x[idx], g) if s.augment is not None else x[idx]
            loss = loss_fn(net(xb.to(device)), y[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total, seen = total + float(loss.detach()) * len(idx), seen + len(idx)
        losses.append(total / seen)
        if on_epoch is not None:
            on_epoch(epoch, losses[-1])
    return losses


__all__ = ["ClassifierSchedule", "fit_classifier", "hflip"]
