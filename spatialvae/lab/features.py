"""A chest X-ray feature space for Fréchet distance, trained here: nothing is downloaded.

FID needs Inception weights from the internet; this machine, many hospital clusters and Kaggle
with internet off have none. Following the FXD idea (Fréchet distance in the features of a
network that knows chest X-rays), `XRayFeatureNet` is a small CNN trained to tell NORMAL from
PNEUMONIA on the train split, with the VAE's own preprocessing (CLAHE, [0, 1]). Its pooled
penultimate activations are the features; the domain FD and KID between two image sets are
computed from them with torchmetrics, exactly like FID/KID from Inception features.

    python -m spatialvae features --data PATH --out xray_features.pt [--image-size 64]

The file holds weights, config, test accuracy, the real-vs-real floor and a sanity check (clean,
blurred, noised and random images ranked by FD); it is read with ``weights_only=True``.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.transforms.functional import gaussian_blur

from ..config import DataConfig
from ..data import as_float_images, make_datasets
from ..engine import default_device, seed_everything
from ..errors import CheckpointError, SpatialVAEError, on_disk_full, short_reason
from ..runs import atomic_torch_save
from .classifier import ClassifierSchedule, fit_classifier
from .metrics import fid_kid

FEATURES_VERSION = 1


@dataclass
class FeatureNetConfig:
    image_size: int = 64  # the resolution it is trained at; other sizes are resized to it
    widths: tuple = (16, 32, 64, 128)  # conv stage widths; the last is the feature dimension
    epochs: int = 8  # a few minutes at 64 px on 2 CPU cores
    batch_size: int = 64  # small images, small net: a larger batch only slows convergence here
    lr: float = 2e-3  # AdamW with a cosine decay to 0
    weight_decay: float = 1e-4  # mild: the net is small and the augmentation light
    dropout: float = 0.3  # before the classifier only; the features are taken before it
    seed: int = 0  # init, shuffling and augmentation


class XRayFeatureNet(nn.Module):
    """(B, 1, S, S) in [0, 1] -> logits (B, 2); ``features`` gives the pooled (B, widths[-1]) vector.

    Conv-BN-ReLU pairs with max-pooling between stages, then global average pooling: a VGG-like
    classifier small enough to train in minutes on a CPU.
    """

    def __init__(self, widths: Sequence[int] = (16, 32, 64, 128), dropout: float = 0.3):
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 1
        for i, w in enumerate(widths):
            if i > 0:
                layers.append(nn.MaxPool2d(2))  # halve the side between stages
            layers += [nn.Conv2d(c_in, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True),
                       nn.Conv2d(w, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
            c_in = w
        self.body = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(c_in, 2))
        self.num_features = c_in

    def features(self, x: torch.Tensor) -> torch.Tensor:
        h = self.body(x)  # (B, C, S / 2^(k-1), S / 2^(k-1))
        return h.mean(dim=(2, 3))  # (B, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))  # (B, 2)


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------

def _augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Seeded, per image: horizontal flip (p = 0.5), zoom 0.9-1.1 with a shift of up to 6% of the
    side, and a gamma of 0.8-1.25. Kaggle's test split comes from a shifted distribution (a plain
    classifier calls many of its NORMAL images pneumonia), and geometry and exposure jitter are
    what narrows that gap."""
    b = x.shape[0]
    flip = torch.rand(b, generator=g) < 0.5
    x = torch.where(flip.view(b, 1, 1, 1), x.flip(-1), x)
    scale = 0.9 + 0.2 * torch.rand(b, generator=g)
    shift = 0.12 * (torch.rand(b, 2, generator=g) - 0.5)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = 1 / scale
    theta[:, :, 2] = shift
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)  # (B, S, S, 2)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    gamma = torch.exp(torch.empty(b).uniform_(-0.223, 0.223, generator=g)).view(b, 1, 1, 1)  # 0.8 .. 1.25
    return x.clamp(1e-6, 1).pow(gamma)


@torch.no_grad()
def predict(net: XRayFeatureNet, images: torch.Tensor, batch_size: int = 256,
            device: torch.device | str = "cpu") -> torch.Tensor:
    """Class probabilities (N, 2) for images (N, 1, S, S) in [0, 1]."""
    net.eval()
    out = [F.softmax(net(images[i:i + batch_size].to(device)), dim=1).cpu() for i in range(0, len(images), batch_size)]
    return torch.cat(out)


def classification_report(probs: torch.Tensor, labels: torch.Tensor) -> dict:
    pred = probs.argmax(1)
    tp = int(((pred == 1) & (labels == 1)).sum())
    tn = int(((pred == 0) & (labels == 0)).sum())
    sens = tp / max(1, int((labels == 1).sum()))  # pneumonia found
    spec = tn / max(1, int((labels == 0).sum()))  # normal called normal
    return {"accuracy": float((pred == labels).float().mean()), "sensitivity": sens, "specificity": spec,
            "balanced_accuracy": (sens + spec) / 2, "n": len(labels)}


def train_feature_net(train, val, test, cfg: Optional[FeatureNetConfig] = None,
                      device: torch.device | str | None = None, progress: bool = True, log=print) -> tuple:
    """Train on ``train``, keep the epoch with the best balanced validation accuracy, report test.

    The classes are imbalanced (about 1:3 NORMAL:PNEUMONIA), so the loss is class-weighted and the
    checkpoint is chosen by balanced accuracy. Returns ``(net, info)``.
    """

    cfg = cfg or FeatureNetConfig()
    device = default_device(device)
    g = torch.Generator().manual_seed(cfg.seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        net = XRayFeatureNet(cfg.widths, cfg.dropout).to(device)
    x_train, y_train = _resize(as_float_images(train.images), cfg.image_size), train.labels
    x_val, y_val = _resize(as_float_images(val.images), cfg.image_size), val.labels
    counts = torch.bincount(y_train, minlength=2).float()
    weight = (counts.sum() / (2 * counts.clamp(min=1))).to(device)  # inverse frequency
    best, best_state, history = -1.0, None, []
    t0 = time.perf_counter()

    def on_epoch(epoch: int, loss: float) -> None:
        nonlocal best, best_state
        val_report = classification_report(predict(net, x_val, device=device), y_val)
        history.append({"epoch": epoch + 1, "train_loss": loss, **{f"val_{k}": v for k, v in val_report.items()}})
        log(f"features epoch {epoch + 1}/{cfg.epochs}: loss {loss:.4f}, "
            f"val accuracy {val_report['accuracy']:.3f}, balanced {val_report['balanced_accuracy']:.3f}")
        if val_report["balanced_accuracy"] > best:
            best = val_report["balanced_accuracy"]
            best_state = {k: v.detach().clone() for k, v in net.state_dict().items()}

    schedule = ClassifierSchedule(cfg.epochs, cfg.batch_size, cfg.lr, cfg.weight_decay, full_batches_only=True,
                                  augment=_augment, desc="features", progress=progress)
    fit_classifier(net, x_train, y_train, lambda logits, y: F.cross_entropy(logits, y, weight=weight), schedule, g,
                   on_epoch=on_epoch)
    net.load_state_dict(best_state)
    net.eval()
    x_test = _resize(as_float_images(test.images), cfg.image_size)
    test_report = classification_report(predict(net, x_test, device=device), test.labels)
    info = {"config": asdict(cfg), "history": history, "val_best_balanced_accuracy": best,
            "test": test_report, "train_seconds": time.perf_counter() - t0}
    return net.cpu(), info


# ---------------------------------------------------------------------------------------------
# Features, distances and the sanity check
# ---------------------------------------------------------------------------------------------

def _resize(images: torch.Tensor, size: int) -> torch.Tensor:
    if images.shape[-1] == size:
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", antialias=True, align_corners=False).clamp(0, 1)


@torch.no_grad()
def extract_features(net: XRayFeatureNet, images: torch.Tensor, image_size: int, batch_size: int = 256,
                     device: torch.device | str = "cpu") -> torch.Tensor:
    """Images (N, 1, S, S) in [0, 1] or uint8 (N, S, S) -> features (N, D) float64 on the CPU.

    Images of another size are resized (bilinear, antialiased) to the extractor's ``image_size``.
    """
    net = net.to(device).eval()
    out = []
    for i in range(0, len(images), batch_size):
        x = as_float_images(images[i:i + batch_size])  # (B, 1, S, S)
        out.append(net.features(_resize(x, image_size).to(device)).double().cpu())
    return torch.cat(out)


def domain_fd_kid(real: torch.Tensor, fake: torch.Tensor, seed: int = 0) -> dict:
    """Fréchet distance and KID in the X-ray feature space (torchmetrics, as for FID)."""

    r = fid_kid(real, fake, seed)
    return {"fd": r["fid"], "kid_mean": r["kid_mean"], "kid_std": r["kid_std"]}


def degraded_versions(images: torch.Tensor, seed: int = 0) -> dict[str, torch.Tensor]:
    """Obviously worse images for the sanity check: blurred, noised, and pure noise (all [0, 1])."""

    g = torch.Generator().manual_seed(seed)
    side = images.shape[-1]
    k = max(3, (side // 16) | 1)  # odd kernel ~ 1/16 of the side
    return {
        "blurred": gaussian_blur(images, [k, k], [k / 3.0, k / 3.0]),
        "noised": (images + 0.15 * torch.randn(images.shape, generator=g)).clamp(0, 1),
        "random_noise": torch.rand(images.shape, generator=g),
    }


def sanity_check(net: XRayFeatureNet, reference: torch.Tensor, test: torch.Tensor, image_size: int,
                 seed: int = 0, device: torch.device | str = "cpu") -> dict:
    """FD to ``reference`` (train images) of clean, blurred, noised test images and random noise.
    A usable metric ranks them clean < blurred, noised < random_noise."""
    ref = extract_features(net, reference, image_size, device=device)
    out = {"clean": domain_fd_kid(ref, extract_features(net, test, image_size, device=device), seed)["fd"]}
    for name, imgs in degraded_versions(test, seed).items():
        out[name] = domain_fd_kid(ref, extract_features(net, imgs, image_size, device=device), seed)["fd"]
    out["ranked"] = sorted(out, key=out.get)
    return out


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------

def save_feature_net(path: str | os.PathLike, net: XRayFeatureNet, info: dict) -> Path:

    path = Path(path)
    atomic_torch_save({"version": FEATURES_VERSION, "kind": "spatialvae-xray-features",
                       "model": net.state_dict(), **info}, path)
    return path


def load_feature_net(path: str | os.PathLike) -> tuple[XRayFeatureNet, dict]:
    """Read a features file safely (``weights_only=True``); returns ``(net in eval mode, info)``."""
    path = Path(path)
    if not path.is_file():
        raise SpatialVAEError(f"no features file at {path}; create one with `python -m spatialvae features "
                              "--data PATH --out FILE.pt`")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - corrupt or unsafe
        raise CheckpointError(f"cannot read features file {path} ({type(e).__name__}); create it again with "
                              "`python -m spatialvae features`") from None
    if not isinstance(blob, dict) or blob.get("kind") != "spatialvae-xray-features":
        raise CheckpointError(f"{path} is not a spatialvae features file (made by `python -m spatialvae features`)")
    cfg = FeatureNetConfig(**{**blob["config"], "widths": tuple(blob["config"]["widths"])})
    net = XRayFeatureNet(cfg.widths, cfg.dropout)
    try:
        net.load_state_dict(blob["model"])
    except RuntimeError as e:
        raise CheckpointError(f"{path} does not match its own config ({short_reason(e)})") from None
    info = {k: v for k, v in blob.items() if k != "model"}
    info["config"] = cfg
    return net.eval(), info


def build_features_file(data_root, out: str | os.PathLike, image_size: int = 64, epochs: Optional[int] = None,
                        max_per_class: Optional[int] = None, widths: Optional[Sequence[int]] = None,
                        seed: int = 0, device=None, progress: bool = True, log=None,
                        cache_dir: str | os.PathLike | None = None) -> dict:
    """The `features` command: data (same preprocessing and splits as the VAE), training, floor,
    sanity check, file. Returns the info dict that was saved."""

    log = log or (lambda msg: print(msg, flush=True))
    cfg = FeatureNetConfig(image_size=image_size, seed=seed)
    if epochs is not None:
        cfg.epochs = epochs
    if widths is not None:
        cfg.widths = tuple(widths)
    seed_everything(seed)
    splits = make_datasets(DataConfig(root=data_root, image_size=image_size, max_per_class=max_per_class,
                                      cache_dir=None if cache_dir is None else str(cache_dir)),
                           seed=seed, progress=progress)
    net, info = train_feature_net(splits.train, splits.val, splits.test, cfg, device, progress, log)
    # Real-vs-real floor: a seeded train subset the size of the test split against the test split.
    test_x = as_float_images(splits.test.images)
    g = torch.Generator().manual_seed(seed)
    pick = torch.randperm(len(splits.train), generator=g)[:len(test_x)]
    train_x = as_float_images(splits.train.images)[pick]
    feats_train = extract_features(net, train_x, cfg.image_size)
    info["floor"] = {**domain_fd_kid(feats_train, extract_features(net, test_x, cfg.image_size), seed),
                     "n_train": len(train_x), "n_test": len(test_x)}
    info["sanity"] = sanity_check(net, train_x, test_x, cfg.image_size, seed)
    info["data_root"] = str(splits.train.plan.root)
    with on_disk_full(f"nothing was written to {out} (a file there before is as it was)",
                      "free space (or pass --out on a disk with room), then run `python -m spatialvae features` "
                      "again"):
        save_feature_net(out, net, info)
    return info


def feature_dim_ok(n_images: int, dim: int) -> Optional[str]:
    """FD with fewer images than feature dimensions has a singular covariance: say so in results."""
    if n_images < dim:
        return (f"only {n_images} images for {dim}-d features: the covariance is singular and the FD is "
                "noisy; compare only at equal N")
    return None


__all__ = ["FeatureNetConfig", "XRayFeatureNet", "train_feature_net", "extract_features", "domain_fd_kid",
           "sanity_check", "degraded_versions", "save_feature_net", "load_feature_net", "build_features_file",
           "classification_report"]
