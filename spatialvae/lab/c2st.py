"""Classifier two-sample test (C2ST; Lopez-Paz & Oquab 2017, "Revisiting Classifier Two-Sample Tests").

Were two image sets (generated or reconstructed images vs real ones) drawn from the same
distribution? A small CNN learns to tell them apart on half of each set and is scored on the
other half. If the sets are indistinguishable, no classifier beats chance on images it never
saw: the held-out accuracy is 0.5 up to noise (under that null the number of correct answers is
Binomial(n, 1/2), i.e. the accuracy is about N(1/2, 1/(4 n)) for n held-out images). The higher
above 0.5, the more easily fake is told from real; 1.0 = every time. Unlike FID it needs no
pretrained network and its unit is plain: how separable the two sets are.

It answers for this classifier and budget: a small CNN trained for a few epochs finds pixel
statistics (noise, blur, texture) and coarse layout, not every subtle difference, so 0.5 means
"not told apart by it", not "the same distribution"::

    res = classifier_two_sample_test(samples, real_images, seed=0)   # (N, 1, H, W) in [0, 1] each
    res["accuracy"], res["p_value"], res["auc"]
"""

from __future__ import annotations

import math
import time
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..engine import default_device, eval_mode
from .classifier import ClassifierSchedule, fit_classifier, hflip

MIN_PER_SIDE = 8  # fewer: 4 held-out images a side, so the accuracy moves in steps of 1/8 and means little
# The schedule's calibration (same distribution, blurred, noised: docs/results/defaults.md) is what set
# these constants.
EPOCHS = 12  # fewer miss much of a slight blur; more cost time for little
IMAGE_SIZE = 64  # larger images are area-downsampled to it: 4x less work than 128 px, blur and noise stay visible
WIDTHS = (16, 32, 64, 64)  # conv widths, stride 2 after the first: a small net, small next to 300 + 300 images
BATCH_SIZE = 32  # enough updates an epoch at a few hundred training images a side
LR = 2e-3  # AdamW peak, cosine to 0 (higher peaks were no better)
WEIGHT_DECAY = 1e-4  # mild: flips are the only augmentation and the net is small


class C2STNet(nn.Module):
    """(B, C, S, S) in [0, 1] -> one logit per image (B,), positive = "fake".

    Conv 3x3 - BatchNorm - SiLU stages (stride 2 after the first, so the first sees every pixel
    at full resolution: noise and blur show there), then global average pooling and a linear layer.
    BatchNorm, not GroupNorm: a per-image norm divides out each image's own contrast and noise
    level, which is often what tells the sets apart: with GroupNorm, pixel noise went unseen that
    BatchNorm caught at half the level, and with no norm the net learnt nothing.
    """

    def __init__(self, in_channels: int = 1, widths: tuple = WIDTHS):
        super().__init__()
        layers: list[nn.Module] = []
        c = in_channels
        for i, w in enumerate(widths):
            layers += [nn.Conv2d(c, w, 3, stride=1 if i == 0 else 2, padding=1, bias=False),
                       nn.BatchNorm2d(w), nn.SiLU()]
            c = w
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x).mean(dim=(2, 3))).squeeze(1)  # (B,)


def _check_inputs(fake: torch.Tensor, real: torch.Tensor) -> None:
    """One-sentence ValueErrors for what the test cannot use."""
    for name, x in (("fake", fake), ("real", real)):
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or not x.is_floating_point():
            got = f"shape {tuple(x.shape)}, {x.dtype}" if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"the {name} images must be a float tensor (N, C, H, W) in [0, 1], got {got}; "
                             "convert uint8 images with x.float() / 255")
    if fake.shape[1:] != real.shape[1:]:
        raise ValueError(f"the fake images are {tuple(fake.shape[1:])} (C, H, W) but the real ones "
                         f"{tuple(real.shape[1:])}; resize one set so both have the same shape")
    if min(len(fake), len(real)) < MIN_PER_SIDE:
        raise ValueError(f"got {len(fake)} fake and {len(real)} real images, but the test needs at least "
                         f"{MIN_PER_SIDE} of each (half train the classifier, half test it); pass more images")


def _downsample(x: torch.Tensor, size: Optional[int]) -> torch.Tensor:
    """Area-downsample so the longer side is at most ``size`` (None: as given)."""
    h, w = x.shape[-2:]
    if size is None or max(h, w) <= size:
        return x.float()
    s = size / max(h, w)
    return F.interpolate(x.float(), size=(max(1, round(h * s)), max(1, round(w * s))), mode="area")


def _halves(x: torch.Tensor, n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """n seeded images of x (the larger set is cut to the smaller's count), split into (train, held out)."""
    pick = torch.randperm(len(x), generator=g)[:n]
    return x[pick[: n // 2]], x[pick[n // 2:]]


@torch.no_grad()
def _recalibrate_batchnorm(net: nn.Module, x: torch.Tensor, g: torch.Generator) -> None:
    """BatchNorm's running statistics, recomputed over all training images with the final weights
    ("precise BN"). The running averages lag weights that moved until the last steps, so without
    this a difference told apart in training mode can be near chance in eval mode."""
    bns = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over the batches below
    net.train()
    for idx in torch.randperm(len(x), generator=g).split(256):  # mixed chunks: both sets in every one
        net(x[idx])


@torch.no_grad()
def _logits(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The classifier's logits for x (N,) in eval mode, on the CPU (positive = fake)."""
    with eval_mode(net):
        return torch.cat([net(chunk).float().cpu() for chunk in x.split(256)])


def roc_auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Area under the ROC curve of ``scores`` (N,) for binary ``labels`` (N,; 1 = positive), by ranks
    (Mann-Whitney U / (n_pos n_neg)): the chance that a random positive scores above a random
    negative, a tie counting one half. Threshold-free, so it grades a classifier whose accuracy
    sits at 1.0 or whose threshold is off. Tied scores share their mean rank."""
    s, y = scores.detach().double().flatten(), labels.flatten().bool()
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"the ROC AUC needs both classes, got {n_pos} positive and {n_neg} negative scores")
    _, inverse, counts = torch.unique(s, sorted=True, return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).double()  # 1-based rank of each distinct value's last copy
    mid_ranks = ends - (counts.double() - 1) / 2  # (distinct,) the mean rank of each value's copies
    rank_sum = float(mid_ranks[inverse][y].sum())
    return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def binomial_p_value(correct: int, n: int) -> float:
    """One-sided exact P(at least ``correct`` of ``n`` right by chance), Binomial(n, 1/2): the
    null of indistinguishable sets (the paper's N(1/2, 1/(4 n)) is its normal approximation)."""
    return sum(math.comb(n, k) for k in range(correct, n + 1)) / 2 ** n


def classifier_two_sample_test(fake: torch.Tensor, real: torch.Tensor, *, seed: int = 0, epochs: int = EPOCHS,
                               image_size: Optional[int] = IMAGE_SIZE, device: torch.device | str | None = None,
                               progress: bool = False) -> dict:
    """Held-out accuracy of a small CNN telling ``fake`` (label 1) from ``real`` (label 0).

    fake, real: float (N, C, H, W) in [0, 1] of the same (C, H, W). The larger set is cut to the
    smaller's count (seeded), each set is split 50/50 (seeded) into training and held-out halves,
    and images larger than ``image_size`` are area-downsampled to it (None: kept as they are).
    Same inputs and seed -> the same result on the CPU. Returns accuracy (0.5 = indistinguishable),
    std_error (of the accuracy), p_value (one-sided, against 0.5), auc (held-out ROC AUC of the
    logits, `roc_auc`: 0.5 = indistinguishable, and still graded when the accuracy is saturated),
    log_loss (mean held-out binary cross-entropy in nats: ln 2 for a classifier that always answers
    one half, more when it is confidently wrong on images it never saw), the counts and seconds.
    Raises ValueError for different shapes or fewer than `MIN_PER_SIDE` images a side.
    """
    _check_inputs(fake, real)
    t0 = time.perf_counter()
    device = default_device(device)
    g = torch.Generator().manual_seed(seed)
    n = min(len(fake), len(real))
    fake_tr, fake_te = _halves(_downsample(fake, image_size), n, g)
    real_tr, real_te = _halves(_downsample(real, image_size), n, g)
    with torch.random.fork_rng(devices=[]):  # the init draws from the global RNG: the same every time
        torch.manual_seed(seed)
        net = C2STNet(fake.shape[1]).to(device)

    def labelled(f, r):
        return torch.cat([f, r]).to(device), torch.cat([torch.ones(len(f)), torch.zeros(len(r))]).to(device)

    x_train, y_train = labelled(fake_tr, real_tr)
    schedule = ClassifierSchedule(epochs, BATCH_SIZE, LR, WEIGHT_DECAY, augment=hflip, desc="C2ST", progress=progress)
    final_loss = fit_classifier(net, x_train, y_train, F.binary_cross_entropy_with_logits, schedule, g)[-1]
    _recalibrate_batchnorm(net, x_train, g)
    n_test = len(fake_te) + len(real_te)
    x_test, y_test = labelled(fake_te, real_te)
    logits, y_test = _logits(net, x_test), y_test.cpu()  # (n_test,) each
    correct = int(((logits > 0) == y_test.bool()).sum())
    acc = correct / n_test
    return {"accuracy": acc, "std_error": math.sqrt(acc * (1 - acc) / n_test),
            "p_value": binomial_p_value(correct, n_test), "auc": roc_auc(logits, y_test),
            "log_loss": float(F.binary_cross_entropy_with_logits(logits.double(), y_test.double())),
            "n_fake": len(fake), "n_real": len(real),
            "n_per_side": n, "n_train": len(fake_tr) + len(real_tr), "n_heldout": n_test,
            "final_train_loss": final_loss, "epochs": epochs, "image_size": list(fake_tr.shape[-2:]),
            "seconds": round(time.perf_counter() - t0, 2)}


__all__ = ["classifier_two_sample_test", "C2STNet", "binomial_p_value", "roc_auc", "MIN_PER_SIDE"]
