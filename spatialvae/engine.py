"""The one training step, shared by the `Trainer` and `bench` (so `bench` times the step that trains).

    forward (sampling the posterior) -> loss -> backward -> unscale -> clip -> optimizer step

Under fp16 autocast the GradScaler skips a step whose gradients overflowed by itself; in fp32 and
bf16 a non-finite loss or gradient norm skips the step here and says why.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, Optional

import torch
from torch import nn


def autocast_context(device: torch.device, amp_dtype: Optional[torch.dtype]):
    """fp16/bf16 autocast on CUDA; nullcontext (fp32) everywhere else: one code path."""
    if amp_dtype is None or device.type != "cuda":
        return nullcontext()
    return torch.autocast(device_type="cuda", dtype=amp_dtype)


def _finite(t: torch.Tensor) -> bool:
    return bool(torch.isfinite(t.detach()).all())


@dataclass
class StepResult:
    total: torch.Tensor  # the back-propagated loss (detached)
    parts: Dict[str, torch.Tensor]  # unweighted loss parts (see losses.VAELoss)
    grad_norm: Optional[torch.Tensor]  # before clipping; None when the step was skipped before backward
    skipped: Optional[str] = None  # why no update was made, or None


def train_step(model: nn.Module, loss_fn: nn.Module, optimizer: torch.optim.Optimizer,
               scaler: torch.amp.GradScaler, x: torch.Tensor, beta: float, grad_clip: float,
               params: Iterable[torch.Tensor], autocast=nullcontext,
               all_finite: Callable[[torch.Tensor], bool] = _finite) -> StepResult:
    """One optimizer update on batch ``x``. ``autocast`` is a context factory (see
    `autocast_context`); ``all_finite`` may all-reduce across DDP ranks so every rank skips together."""
    with autocast():
        recon, mu, logvar = model(x)
        total, parts = loss_fn(recon, x, mu, logvar, beta)
    if not all_finite(total):
        return StepResult(total.detach(), parts, None, f"loss is {float(total.detach())}")
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(total).backward()
    scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(list(params), grad_clip)
    if not scaler.is_enabled() and not all_finite(grad_norm):
        optimizer.zero_grad(set_to_none=True)
        return StepResult(total.detach(), parts, grad_norm, f"gradient norm is {float(grad_norm)}")
    scaler.step(optimizer)  # fp16: skips the update itself when gradients overflowed
    scaler.update()
    return StepResult(total.detach(), parts, grad_norm)
