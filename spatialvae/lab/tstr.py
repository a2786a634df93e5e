"""Usefulness of synthetic images: train on synthetic, test on real (TSTR).

The project's X-ray classifier (`features.XRayFeatureNet`, the same network and recipe as the
domain feature extractor) is trained once on N real training images per class (the reference)
and once on N synthetic images per class from each class-conditional sampler, and every one is
tested on the real test split. A sampler is useful for augmentation or teaching when its
classifier comes close to the real-trained one: the synthetic/real ratio of balanced accuracy.

Each classifier picks its best epoch on a validation set from its own source (real: the run's
validation patients; synthetic: N/4 more samples per class), so no real image steers a
synthetic-trained classifier.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Callable, Optional

import torch

from ..data import seeded_per_class
from .features import FeatureNetConfig, train_feature_net
from .report import fmt


@dataclass
class LabelledImages:
    """What `train_feature_net` reads: images (N, 1, S, S) float in [0, 1] or uint8 (N, S, S), labels (N,)."""
    images: torch.Tensor
    labels: torch.Tensor


def balanced_subset(labels: torch.Tensor, per_class: int, seed: int) -> torch.Tensor:
    """Up to ``per_class`` seeded indices of each class, sorted."""
    return torch.cat(seeded_per_class(labels, per_class, seed, labels.unique().tolist())).sort().values


def class_labels(per_class: int, n_classes: int = 2) -> torch.Tensor:
    """(n_classes * per_class,) labels, class 0 first."""
    return torch.arange(n_classes).repeat_interleave(per_class)


def train_and_test(train: LabelledImages, val: LabelledImages, test: LabelledImages, cfg: FeatureNetConfig,
                   device=None) -> dict:
    """One classifier: trained on ``train`` (best epoch on ``val``), reported on ``test``."""
    t0 = time.perf_counter()
    with torch.random.fork_rng(devices=[]):  # dropout draws from the global RNG: the same every time
        torch.manual_seed(cfg.seed)
        net, info = train_feature_net(train, val, test, cfg, device=device, progress=False, log=lambda s: None)
    return {**info["test"], "n_train": len(train.labels), "final_train_loss": info["history"][-1]["train_loss"],
            "seconds": round(time.perf_counter() - t0, 1)}


def repeated(train: LabelledImages, val: LabelledImages, test: LabelledImages, cfg: FeatureNetConfig,
             repeats: int, device=None) -> dict:
    """`train_and_test` with classifier seeds cfg.seed, +1, ...: the test split is shifted from
    train, so one classifier's balanced accuracy swings by several points with its seed alone.
    Reports the mean, the spread and each run."""
    runs = [train_and_test(train, val, test, replace(cfg, seed=cfg.seed + r), device) for r in range(repeats)]
    bal = torch.tensor([r["balanced_accuracy"] for r in runs], dtype=torch.float64)
    acc = torch.tensor([r["accuracy"] for r in runs], dtype=torch.float64)
    return {"accuracy": float(acc.mean()), "balanced_accuracy": float(bal.mean()),
            "balanced_accuracy_std": float(bal.std()) if repeats > 1 else 0.0, "repeats": repeats,
            "n_train": len(train.labels), "n": runs[0]["n"], "seconds": round(sum(r["seconds"] for r in runs), 1),
            "runs": runs}


def run_tstr(real_train: LabelledImages, real_val: LabelledImages, test: LabelledImages,
             generators: dict[str, Callable[[torch.Tensor, int], torch.Tensor]], per_class: int = 300,
             seed: int = 0, cfg: Optional[FeatureNetConfig] = None, device=None, log=print,
             repeats: int = 3) -> dict:
    """The TSTR table: ``generators[name](labels, seed)`` returns images (N, 1, S, S) of those labels.

    The real reference uses ``per_class`` training images per class (fewer if a class has fewer);
    every synthetic source the same number per class. Each source trains ``repeats`` classifiers
    (seeds seed, seed + 1, ...) on the same images. Returns {"real": {...}, name: {..., "ratio_to_real"}}.
    """
    cfg = replace(cfg or FeatureNetConfig(), seed=seed)
    counts = torch.bincount(real_train.labels.long(), minlength=2)
    per_class = int(min(per_class, int(counts.min())))
    pick = balanced_subset(real_train.labels.long(), per_class, seed)
    out = {"per_class": per_class, "repeats": repeats,
           "classifier": {"epochs": cfg.epochs, "image_size": cfg.image_size, "widths": list(cfg.widths)}}
    out["real"] = repeated(LabelledImages(real_train.images[pick], real_train.labels[pick].long()), real_val, test,
                           cfg, repeats, device)
    log(f"TSTR real: balanced accuracy {out['real']['balanced_accuracy']:.3f} ({out['real']['seconds']:.0f} s)")
    ref = out["real"]["balanced_accuracy"]
    n_val = max(2, per_class // 4)
    for name, make in generators.items():
        y, y_val = class_labels(per_class), class_labels(n_val)
        synthetic = LabelledImages(make(y, seed + 101), y)
        synthetic_val = LabelledImages(make(y_val, seed + 202), y_val)
        res = repeated(synthetic, synthetic_val, test, cfg, repeats, device)
        res["ratio_to_real"] = res["balanced_accuracy"] / ref if ref > 0 else None
        out[name] = res
        ratio = fmt(res["ratio_to_real"], "{:.2f}")
        log(f"TSTR {name}: balanced accuracy {res['balanced_accuracy']:.3f}, {ratio} x real ({res['seconds']:.0f} s)")
    return out


__all__ = ["LabelledImages", "run_tstr", "repeated", "balanced_subset", "class_labels", "train_and_test"]
