"""README's pictures of a run, at full size: what the product makes, beside real X-rays.

``readme_figures(run_dir, out)`` writes two PNGs:

* ``samples.png``: per class, a row of real validation X-rays above a row of the learned prior's
  samples of that class (NORMAL first, then PNEUMONIA), decoded by the run's sharp decoder when it
  has one;
* ``reconstructions.png``: test originals (half of each class), their reconstructions by the smooth
  decoder (``best.pt``) and, with a texture stage, by the sharp one (``sharp.pt``), a row each.

Both are grayscale 8-bit PNGs made from the run alone (no extra data is derived or stored), small
enough for a repository; each file is replaced whole or not at all.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import torch

from ..data import CLASSES, as_float_images, make_datasets, seeded_per_class
from ..prior_run import load_prior
from ..runs import RunDir, load_model
from ..sampling import decode_latents, encode_dataset
from ..texture_run import decoder_checkpoint
from ..viz import image_grid, save_png


def _class_rows(labels: torch.Tensor, n: int, seed: int) -> list[torch.Tensor]:
    """n seeded indices of each class (fewer where a class has fewer images), NORMAL first."""
    return seeded_per_class(labels, n, seed, range(len(CLASSES)))


def sample_rows(run_dir, splits, n: int, seed: int, guidance: Optional[float] = None) -> torch.Tensor:
    """Per class: n real validation images, then n learned-prior samples -> (4n, 1, S, S) in [0, 1]."""
    model = load_model(decoder_checkpoint(run_dir))[0]
    prior = load_prior(run_dir, model.latent_shape)
    rows = []
    for k, pick in enumerate(_class_rows(splits.val.labels, n, seed)):
        labels = torch.full((n,), k, dtype=torch.long)
        z = prior.sample(n, generator=torch.Generator().manual_seed(seed + k), labels=labels, guidance=guidance)
        rows += [_full_row(as_float_images(splits.val.images[pick]), n), decode_latents(model, z)]
    return torch.cat(rows)


def _full_row(images: torch.Tensor, n: int) -> torch.Tensor:
    """``images`` (k, 1, S, S) with white tiles after them up to n, so a short class keeps the grid's rows."""
    blank = torch.ones((n - len(images), *images.shape[1:]))
    return torch.cat([images, blank])


def reconstruction_rows(run_dir, splits, n: int, seed: int) -> torch.Tensor:
    """n test originals (half of each class), their smooth reconstructions and, when the run has a
    texture stage, their sharp ones -> (2n or 3n, 1, S, S) in [0, 1]."""
    picks = _class_rows(splits.test.labels, n - n // 2, seed)
    pick = torch.cat([picks[0][:n // 2], picks[1][:n - n // 2]])
    x = as_float_images(splits.test.images[pick])  # (n, 1, S, S)
    run = RunDir(run_dir)
    decoders = [run.best] + ([run.checkpoint("sharp")] if run.checkpoint("sharp").is_file() else [])
    models = [load_model(path)[0] for path in decoders]  # each checkpoint loaded once
    z = encode_dataset(models[0], x)  # the encoder is the same in both checkpoints: one latent per image
    rows = [x] + [decode_latents(model, z) for model in models]
    return torch.cat([_full_row(r, n) for r in rows])


def readme_figures(run_dir: str | os.PathLike, out: str | os.PathLike, data_root: Optional[str] = None,
                   n: int = 6, seed: int = 0, guidance: Optional[float] = None) -> dict:
    """Write ``samples.png`` and ``reconstructions.png`` for a run into ``out`` -> {name: path}."""
    cfg = RunDir(run_dir).config().with_data_root(data_root)
    splits = make_datasets(cfg.data, seed=cfg.train.seed, progress=False)
    out = Path(out)
    grids = {"samples": sample_rows(run_dir, splits, n, seed, guidance),
             "reconstructions": reconstruction_rows(run_dir, splits, n, seed)}
    return {name: save_png(image_grid(images, nrow=n), out / f"{name}.png") for name, images in grids.items()}


__all__ = ["readme_figures", "sample_rows", "reconstruction_rows"]
