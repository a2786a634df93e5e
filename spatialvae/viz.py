"""Pictures: sample grids and reconstruction sheets written as PNG."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from PIL import Image
from torchvision.utils import make_grid, save_image

from .runs import atomic_write


def image_grid(images: torch.Tensor, nrow: int = 8, padding: int = 2) -> torch.Tensor:
    """(N, 1, H, W) in [0, 1] -> (1, H', W') grid, white padding so dark X-rays stay distinct."""
    return make_grid(images.detach().float().clamp(0, 1).cpu(), nrow=nrow, padding=padding, pad_value=1.0)[:1]


def interleave_rows(originals: torch.Tensor, recons: torch.Tensor, nrow: int = 8) -> torch.Tensor:
    """Rows of ``nrow`` originals alternating with rows of their reconstructions -> (2N, C, H, W),
    so a grid of ``nrow`` columns shows each original directly above its reconstruction."""
    n = min(len(originals), len(recons))
    rows = []
    for start in range(0, n, nrow):
        rows += [originals[start:min(start + nrow, n)], recons[start:min(start + nrow, n)]]
    return torch.cat(rows)


def sample_sheet(samples: torch.Tensor, originals: Optional[torch.Tensor] = None,
                 recons: Optional[torch.Tensor] = None, nrow: int = 8) -> torch.Tensor:
    """Prior samples on top; below, rows of originals alternating with their reconstructions."""
    parts = [image_grid(samples, nrow)]
    if originals is not None and recons is not None:
        pairs = image_grid(interleave_rows(originals, recons, nrow), nrow)
        width = max(p.shape[-1] for p in parts + [pairs])
        gap = torch.ones(1, 6, width)
        parts = [_pad_width(parts[0], width), gap, _pad_width(pairs, width)]
    return torch.cat(parts, dim=1)


def _pad_width(img: torch.Tensor, width: int) -> torch.Tensor:
    if img.shape[-1] == width:
        return img
    return torch.cat([img, torch.ones(img.shape[0], img.shape[1], width - img.shape[-1])], dim=-1)


def save_png(image: torch.Tensor, path: str | os.PathLike) -> Path:
    """Write a (C, H, W) or (N, C, H, W) tensor in [0, 1] as PNG, atomically (see `runs.atomic_write`).
    One channel is written as an 8-bit grayscale PNG (a third of the RGB file, the same picture)."""

    if image.dim() == 4:
        image = image_grid(image)
    if image.shape[0] != 1:
        return atomic_write(path, lambda f: save_image(image, f, format="png"))
    pixels = (image[0].detach().float().clamp(0, 1) * 255 + 0.5).to(torch.uint8).cpu().numpy()  # as save_image rounds
    return atomic_write(path, lambda f: Image.fromarray(pixels).save(f, format="png", optimize=True))


# ---- matplotlib figures (notebook and reports) -------------------------------------------------

def _plt():
    import matplotlib  # slow to import: only when a figure is drawn

    if not os.environ.get("MPLBACKEND") and "ipykernel" not in sys.modules:
        matplotlib.use("Agg")  # headless scripts and CI; notebooks keep their inline backend
    import matplotlib.pyplot as plt

    return plt


def _finish(fig, path):
    fig.tight_layout()
    if path is not None:  # crash-safe like every other file we write (runs.atomic_write)

        fmt = Path(path).suffix.lstrip(".").lower() or "png"
        atomic_write(path, lambda f: fig.savefig(f, format=fmt, dpi=110))
    return fig


def plot_history(history: list[dict], path: str | os.PathLike | None = None):
    """Loss curves: every part (train solid, val dashed), beta and lr; the phase boundary marked."""
    plt = _plt()
    epochs = [h["epoch"] for h in history]
    parts = [k for k in ("total", "recon", "perceptual", "ssim", "kl")
             if any(h.get(f"train_{k}", 0) for h in history)]
    fig, axes = plt.subplots(1, len(parts) + 1, figsize=(3.2 * (len(parts) + 1), 3.0))
    boundary = next((h["epoch"] - 0.5 for h in history if h["phase"] == 2), None)
    for ax, k in zip(axes, parts):
        ax.plot(epochs, [h[f"train_{k}"] for h in history], label="train")
        if f"val_{k}" in history[0]:
            ax.plot(epochs, [h[f"val_{k}"] for h in history], "--", label="val")
        ax.set_title(k)
        ax.set_xlabel("epoch")
        if k == "kl":
            ax.set_yscale("log")
    ax = axes[-1]
    ax.plot(epochs, [h["lr"] for h in history], color="tab:green", label="lr")
    ax.set_ylabel("lr")
    ax.set_xlabel("epoch")
    ax2 = ax.twinx()
    ax2.plot(epochs, [h["beta"] for h in history], color="tab:red", label="beta")
    ax2.set_ylabel("beta")
    ax.set_title("lr (green), beta (red)")
    for a in axes:
        if boundary is not None:
            a.axvline(boundary, color="gray", lw=0.8, ls=":")
    axes[0].legend(fontsize=8)
    fig.suptitle("training history (dotted line: phase 1 | phase 2)", fontsize=10)
    return _finish(fig, path)


def show_images(images: torch.Tensor, title: str = "", nrow: int = 8, path: str | os.PathLike | None = None,
                scale: float = 1.2):
    """A grid of (N, 1, H, W) images in [0, 1] as a matplotlib figure."""
    plt = _plt()
    grid = image_grid(images, nrow)[0].numpy()
    rows = (len(images) + nrow - 1) // nrow
    fig, ax = plt.subplots(figsize=(scale * min(nrow, len(images)), scale * rows + 0.4))
    ax.imshow(grid, cmap="gray", vmin=0, vmax=1)
    ax.set_title(title, fontsize=10)
    ax.axis("off")
    return _finish(fig, path)


def plot_intensity_histograms(before: list, after: list, path: str | os.PathLike | None = None):
    """Pixel-intensity histograms of the same images without and with CLAHE (uint8 arrays)."""

    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3))
    bins = np.arange(257)
    ax.hist(np.concatenate([b.ravel() for b in before]), bins=bins, alpha=0.6, density=True, label="resize only")
    ax.hist(np.concatenate([a.ravel() for a in after]), bins=bins, alpha=0.6, density=True, label="CLAHE + resize")
    ax.set_xlabel("pixel value (0-255)")
    ax.set_ylabel("density")
    ax.set_title("intensity histograms")
    ax.legend()
    return _finish(fig, path)


def plot_class_balance(counts: dict, path: str | os.PathLike | None = None):
    """Bars of NORMAL / PNEUMONIA per split (`counts` as in the data report)."""

    plt = _plt()
    splits = list(counts)
    x = np.arange(len(splits))
    fig, ax = plt.subplots(figsize=(5, 3))
    for i, cls in enumerate(("NORMAL", "PNEUMONIA")):
        vals = [counts[s][cls] for s in splits]
        bars = ax.bar(x + (i - 0.5) * 0.38, vals, 0.38, label=cls)
        ax.bar_label(bars, fontsize=8)
    ax.set_xticks(x, splits)
    ax.set_ylabel("images")
    ax.set_title("class balance")
    ax.legend()
    return _finish(fig, path)


def ablation_figure(rows: list[dict], images: dict, path: str | os.PathLike | None = None):
    """One row per ablation variant: test originals above their reconstructions, prior samples and
    GMM (aggregate-posterior) samples. ``images``: {variant: {"reconstructions": (2k, 1, S, S)
    interleaved, "standard_normal": (k, 1, S, S), "gmm": (k, 1, S, S)}} in [0, 1] (see `evaluate.load_eval_images`)."""
    plt = _plt()
    columns = [("reconstructions", "test: original / reconstruction"), ("standard_normal", "N(0, I) samples"),
               ("gmm", "GMM (aggregate posterior) samples")]
    fig, axes = plt.subplots(len(rows), len(columns), figsize=(4.2 * len(columns), 1.25 * len(rows) + 0.4),
                             squeeze=False)
    for r, row in enumerate(rows):
        for c, (key, title) in enumerate(columns):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            tiles = images.get(row["variant"], {}).get(key)
            if tiles is not None:
                ax.imshow(image_grid(tiles, nrow=len(tiles) // 2 if key == "reconstructions" else len(tiles))[0],
                          cmap="gray", vmin=0, vmax=1)
            else:
                ax.text(0.5, 0.5, "missing", ha="center", va="center", transform=ax.transAxes)
            if r == 0:
                ax.set_title(title, fontsize=10)
            if c == 0:
                ax.set_ylabel(row["variant"], fontsize=10, rotation=0, ha="right", va="center")
    fig.tight_layout()
    return _finish(fig, path)


def close_figure(fig) -> None:
    """Free a figure once written (scripts that draw many)."""
    _plt().close(fig)


def time_to_quality_figure(curves: dict, path: str | os.PathLike | None = None, floors: Optional[dict] = None):
    """Test PSNR and SSIM against training minutes, one line per run; phase boundaries dotted.
    curves: {label: {"minutes": [...], "psnr": [...], "ssim": [...], "boundary": minutes or None}};
    floors: {label: {"psnr_db": .., "ssim": ..}} drawn as grey dashed lines."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(9.5, 3.4))
    for j, (label, f) in enumerate((floors or {}).items()):
        for ax, key in zip(axes, ("psnr_db", "ssim")):
            ax.axhline(f[key], color="0.5", lw=0.9, ls=("--", "-.", ":")[j % 3], label=f"floor: {label}")
    for i, (label, c) in enumerate(curves.items()):
        color = f"C{i}"
        for ax, key in zip(axes, ("psnr", "ssim")):
            ax.plot(c["minutes"], c[key], "o-", ms=3, color=color, label=label)
            if c.get("boundary") is not None:
                ax.axvline(c["boundary"], color=color, lw=0.8, ls=":")
    for ax, key in zip(axes, ("test PSNR (dB)", "test SSIM")):
        ax.set_xlabel("training wall clock (minutes)")
        ax.set_title(key)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("time to quality (posterior mean on the test split; dotted: start of phase 2)", fontsize=10)
    return _finish(fig, path)
