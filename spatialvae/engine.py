"""How tensors run: the one training step, autocast, eval mode, the default device and seeding.

Shared by the `Trainer`, `bench`, `features` and the samplers (so `bench` times the step that trains)::

    forward (sampling the posterior) -> loss -> backward -> unscale -> clip -> optimizer step

Under fp16 autocast the GradScaler skips a step whose gradients overflowed by itself; in fp32 and
bf16 a non-finite loss or gradient norm skips the step here and says why.
"""

from __future__ import annotations

import random
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Callable, Dict, Optional

import numpy as np
import torch
from torch import nn


def default_device(device: str | torch.device | None = None) -> torch.device:
    """``device`` as given, else CUDA when there is one, else the CPU."""
    if device is not None and str(device) != "auto":
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def seed_everything(seed: int) -> None:
    """Python, NumPy and torch (CPU and CUDA) global generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@contextmanager
def eval_mode(model: nn.Module):
    """``with eval_mode(model):`` runs in eval mode (BatchNorm running stats, no dropout) and
    restores the previous train/eval mode afterwards, also on an exception."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def gpu_warning(device: torch.device) -> Optional[str]:
    """Kaggle's P100 (sm_60) has no kernels in current PyTorch builds: say so before a crash."""
    if device.type != "cuda":
        return None
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (7, 0):
        name = torch.cuda.get_device_name(device)
        arches = getattr(torch.cuda, "get_arch_list", lambda: [])()
        if f"sm_{major}{minor}" not in arches:
            return (f"GPU {name} (compute capability {major}.{minor}) is not supported by this PyTorch build "
                    f"(kernels for {', '.join(arches) or 'unknown'}); on Kaggle choose 'GPU T4 x2' under "
                    "Settings > Accelerator")
    return None


def amp_dtype_for(device: torch.device, enabled: bool) -> Optional[torch.dtype]:
    """Mixed precision on CUDA only: bf16 where native (no GradScaler needed), else fp16; None = fp32."""
    if not enabled or device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


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
    skipped: Optional[str] = None  # why no update was made, or None


@dataclass
class StepTools:
    """What one update needs beside the model, the loss and the batch; built once per trainer."""

    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    params: list  # the parameters whose gradient norm is clipped
    grad_clip: float
    autocast: Callable = nullcontext  # a context factory (see `autocast_context`)
    all_finite: Callable[[torch.Tensor], bool] = _finite  # may all-reduce across DDP ranks so all skip together
    noise: Optional[torch.Generator] = None  # the posterior noise's own stream (see `noise_generator`)


def noise_generator(seed: int, rank: int, device: torch.device) -> torch.Generator:
    """The stream a trainer draws its posterior noise from: one per rank, on the batch's device,
    apart from torch's global stream, which data loaders and sample grids also draw from."""
    return torch.Generator(device=device).manual_seed(seed * 1_000_003 + 7919 * (rank + 1))


def train_step(model: nn.Module, loss_fn: nn.Module, x: torch.Tensor, beta: float, tools: StepTools) -> StepResult:
    """One optimizer update on batch ``x``."""
    optimizer, scaler, all_finite = tools.optimizer, tools.scaler, tools.all_finite
    with tools.autocast():
        recon, mu, logvar = model(x, generator=tools.noise)
        total, parts = loss_fn(recon, x, mu, logvar, beta)
    if not all_finite(total):
        return StepResult(total.detach(), parts, f"loss is {float(total.detach())}")
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(total).backward()
    scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(tools.params, tools.grad_clip)
    if not scaler.is_enabled() and not all_finite(grad_norm):
        optimizer.zero_grad(set_to_none=True)
        return StepResult(total.detach(), parts, f"gradient norm is {float(grad_norm)}")
    scaler.step(optimizer)  # fp16: skips the update itself when gradients overflowed
    scaler.update()
    return StepResult(total.detach(), parts)
