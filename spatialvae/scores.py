"""Per-image scores of reconstructions, in the units the trainer logs and `evaluate` reports:
L1, PSNR (dB, data range 1) and SSIM (the training loss's own), on image tensors (N, C, H, W) in [0, 1].

The core's one measurement: the trainer's per-epoch monitor uses it, and so does the lab
(`spatialvae.lab.metrics` holds the rest: diversity, nearest neighbours, PCA floors, FID / KID,
sharpness).
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
from pytorch_msssim import ssim
from torch import nn

from .data import as_float_images, make_dataloader
from .engine import eval_mode
from .losses import ssim_window_for

PSNR_CAP_DB = 100.0  # PSNR of identical images is infinite; capped (MSE floor 1e-10) so means and JSON stay finite


def l1(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean absolute error per image -> (N,)."""
    return (a.float() - b.float()).abs().flatten(1).mean(1)


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """PSNR in dB per image with data range 1 -> (N,), capped at PSNR_CAP_DB (identical images)."""
    mse = (a.float() - b.float()).pow(2).flatten(1).mean(1)
    return (-10.0 * torch.log10(mse)).clamp(max=PSNR_CAP_DB)  # mse 0 -> inf -> the cap


def ssim_score(a: torch.Tensor, b: torch.Tensor, window: int = 11) -> torch.Tensor:
    """SSIM per image (pytorch-msssim, data range 1, Gaussian window 11 shrunk to fit) -> (N,).

    The same implementation as the training loss's SSIM term, so 1 - this equals the loss's
    ``ssim`` part on the same images.
    """

    win = ssim_window_for(min(a.shape[-2:]), window)
    with torch.autocast(device_type=a.device.type, enabled=False):
        return ssim(a.float(), b.float(), data_range=1.0, size_average=False, win_size=win)


def _image_batches(data, batch_size: int):
    """Batches of images from a tensor (sliced) or from an (image, label) dataset, in order."""
    if torch.is_tensor(data):
        return (data[s:s + batch_size] for s in range(0, len(data), batch_size))
    return (x for x, _ in make_dataloader(data, batch_size, train=False))


@torch.no_grad()
def reconstruction_scores(model: nn.Module, data, batch_size: int, prepare=lambda x: x, autocast=nullcontext,
                          keep_recons: bool = False) -> dict:
    """Per-image SSIM / PSNR / L1 of the decoded posterior means of ``data``, in eval mode (restored
    after) -> {"ssim", "psnr_db", "l1": (N,) each, on the CPU}, plus "recons" (N, 1, H, W) on the CPU
    with ``keep_recons``. ``data``: (image, label) pairs (a ChestXRayDataset) or an image tensor (uint8
    (N, H, W) or float (N, 1, H, W)); ``prepare`` moves a batch to the model's device, where it is scored."""
    scores = {"ssim": [], "psnr_db": [], "l1": []}
    recons = []
    with eval_mode(model):
        for batch in _image_batches(data, batch_size):
            x = prepare(as_float_images(batch))  # (B, 1, H, W)
            with autocast():
                recon = model(x, sample_posterior=False)[0].float().clamp(0, 1)  # (B, 1, H, W)
            for name, score in (("ssim", ssim_score), ("psnr_db", psnr), ("l1", l1)):
                scores[name].append(score(recon, x).cpu())
            if keep_recons:
                recons.append(recon.cpu())
    out = {k: torch.cat(v) for k, v in scores.items()}
    return {**out, "recons": torch.cat(recons)} if keep_recons else out


__all__ = ["PSNR_CAP_DB", "l1", "psnr", "ssim_score", "reconstruction_scores"]
