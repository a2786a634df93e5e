"""Pictures: sample grids and reconstruction sheets written as PNG."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import torch
from torchvision.utils import make_grid, save_image


def image_grid(images: torch.Tensor, nrow: int = 8, padding: int = 2) -> torch.Tensor:
    """(N, 1, H, W) in [0, 1] -> (1, H', W') grid, white padding so dark X-rays stay distinct."""
    return make_grid(images.detach().float().clamp(0, 1).cpu(), nrow=nrow, padding=padding, pad_value=1.0)[:1]


def sample_sheet(samples: torch.Tensor, originals: Optional[torch.Tensor] = None,
                 recons: Optional[torch.Tensor] = None, nrow: int = 8) -> torch.Tensor:
    """Prior samples on top; below, rows of originals alternating with their reconstructions."""
    parts = [image_grid(samples, nrow)]
    if originals is not None and recons is not None:
        n = min(len(originals), len(recons))
        rows = []
        for start in range(0, n, nrow):
            rows += [originals[start:start + nrow], recons[start:start + nrow]]
        pairs = image_grid(torch.cat(rows), nrow)
        width = max(p.shape[-1] for p in parts + [pairs])
        gap = torch.ones(1, 6, width)
        parts = [_pad_width(parts[0], width), gap, _pad_width(pairs, width)]
    return torch.cat(parts, dim=1)


def _pad_width(img: torch.Tensor, width: int) -> torch.Tensor:
    if img.shape[-1] == width:
        return img
    return torch.cat([img, torch.ones(img.shape[0], img.shape[1], width - img.shape[-1])], dim=-1)


def save_png(image: torch.Tensor, path: str | os.PathLike) -> Path:
    """Write a (1, H, W) or (N, 1, H, W) tensor in [0, 1] as PNG, atomically (temp file + replace)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    if image.dim() == 4:
        image = image_grid(image)
    save_image(image, tmp, format="png")
    os.replace(tmp, path)
    return path
