"""Sampling: latent samplers, encoding a dataset, generation, interpolation, sample grids.

A VAE trained with a small KL weight (beta up to 1e-3) does not make its aggregate posterior
q(z) = E_x q(z|x) equal to the prior N(0, I), so decoding prior draws can land where the decoder
has never been trained. Fitting a density to the training set's posterior means and sampling from
it instead is the usual remedy ("ex-post density estimation", Ghosh et al. 2020). All samplers
share one interface, fitted on posterior means ``mu`` of shape ``(N, *latent_shape)``::

    sampler = GaussianSampler().fit(encode_dataset(model, train_set))
    z = sampler.sample(64, generator=torch.Generator().manual_seed(0))   # (64, 64, 4, 4)
    images = model.decode(z)                                             # (64, 1, 128, 128)

pythae calls the two fitted samplers ``NormalSampler`` and ``GaussianMixtureSampler``. Sampling
always uses torch with the caller's generator (sklearn only fits), so a seeded generator gives the
same latents on every call and machine.
"""

from __future__ import annotations

import math
import os
import sys
from contextlib import nullcontext
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.std import tqdm

from .data import CLASSES
from .engine import eval_mode
from .errors import SpatialVAEError
from .viz import image_grid, sample_sheet, save_png

# ---------------------------------------------------------------------------------------------
# Latent samplers
# ---------------------------------------------------------------------------------------------

def _generator_device(generator: Optional[torch.Generator]) -> torch.device:
    return generator.device if generator is not None else torch.device("cpu")


def _flatten_latents(latents: torch.Tensor, min_count: int = 2) -> torch.Tensor:
    """(N, *latent_shape) -> (N, D) float64 on the CPU (covariances lose precision in fp32)."""
    if latents.dim() < 2 or latents.shape[0] < min_count:
        raise SpatialVAEError(f"need at least {min_count} latents of shape (N, *latent_shape) to fit a sampler, "
                              f"got a tensor of shape {tuple(latents.shape)}")
    x = latents.detach().flatten(1).to("cpu", torch.float64)
    if not torch.isfinite(x).all():
        raise SpatialVAEError("the latents contain NaN/inf; the checkpoint's encoder is broken")
    return x


def _cholesky_with_ridge(cov: torch.Tensor, ridge: float, tries: int = 6) -> tuple[torch.Tensor, float]:
    """Cholesky factor of cov + ridge * I, growing the ridge 10x until it succeeds.

    With fewer latents than dimensions (1,024 for the seed) the sample covariance is singular;
    the ridge makes it positive definite without visibly changing the samples.
    """
    eye = torch.eye(cov.shape[0], dtype=cov.dtype)
    for _ in range(tries):
        L, info = torch.linalg.cholesky_ex(cov + ridge * eye)
        if int(info) == 0:
            return L, ridge
        ridge *= 10.0
    raise SpatialVAEError(f"covariance of the latents is not positive definite even with a ridge of {ridge:g}")


class StandardNormalSampler:
    """The VAE's nominal prior N(0, I): what ``model.sample`` decodes. ``fit`` does nothing.
    (Not the learned prior of `spatialvae.prior`, which is fitted to the latents.)"""

    name = "standard_normal"

    def __init__(self, latent_shape: Sequence[int]):
        self.latent_shape = tuple(int(s) for s in latent_shape)

    def fit(self, latents: Optional[torch.Tensor] = None) -> "StandardNormalSampler":
        return self

    def sample(self, n: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        # Same draw as model.sample(n, generator): the same seed gives the same images.
        return torch.randn((n, *self.latent_shape), generator=generator, device=_generator_device(generator))

    def describe(self) -> dict:
        return {"kind": "N(0, I)"}


class GaussianSampler:
    """One Gaussian with full covariance over the flattened latent, fitted to posterior means.

    pythae's ``NormalSampler``. ``fit`` stores the mean (D,) and the Cholesky factor L (D, D) of
    the covariance plus a small ridge (``ridge`` times the mean per-dimension variance, grown
    10x if needed); ``sample`` returns ``mean + L @ eps`` with eps ~ N(0, I) drawn by torch.
    """

    name = "gaussian"

    def __init__(self, ridge: float = 1e-5):
        self.ridge = ridge
        self.latent_shape: tuple = ()
        self.mean: Optional[torch.Tensor] = None
        self.chol: Optional[torch.Tensor] = None
        self.ridge_used = 0.0

    def fit(self, latents: torch.Tensor) -> "GaussianSampler":
        x = _flatten_latents(latents)  # (N, D)
        self.latent_shape = tuple(latents.shape[1:])
        self.mean = x.mean(0)  # (D,)
        centred = x - self.mean
        cov = centred.T @ centred / (x.shape[0] - 1)  # (D, D)
        scale = float(cov.diagonal().mean()) or 1.0  # all-equal latents: fall back to an absolute ridge
        self.chol, self.ridge_used = _cholesky_with_ridge(cov, self.ridge * scale)
        return self

    def sample(self, n: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        if self.mean is None:
            raise SpatialVAEError("GaussianSampler.sample called before fit(latents)")
        device = _generator_device(generator)
        eps = torch.randn((n, self.mean.numel()), generator=generator, device=device, dtype=torch.float64)
        z = self.mean.to(device) + eps @ self.chol.to(device).T  # (n, D)
        return z.float().view(n, *self.latent_shape)

    def describe(self) -> dict:
        return {"kind": "full-covariance Gaussian on posterior means", "dims": int(self.mean.numel()),
                "ridge": self.ridge_used}


class GMMSampler:
    """A Gaussian mixture (full covariances) over the flattened posterior means.

    pythae's ``GaussianMixtureSampler``. Fitted with scikit-learn's ``GaussianMixture`` (k-means
    init, ``random_state=seed``); ``n_components`` is capped at N // 2 so tiny sets still fit.
    ``reg_covar`` is added to every component's covariance diagonal, as a fraction of the
    latents' mean per-dimension variance (sklearn's own ``reg_covar`` is absolute; scaling it
    keeps the meaning for latents of any scale). It matters here: a few hundred latents per component
    in 1,024 dimensions give singular covariances without it.

    Sampling uses torch: a component by the mixture weights, then ``mean_k + L_k @ eps``.
    """

    name = "gmm"

    def __init__(self, n_components: int = 10, seed: int = 0, reg_covar: float = 1e-4, max_iter: int = 100):
        self.n_components = n_components
        self.seed = seed
        self.reg_covar = reg_covar
        self.max_iter = max_iter
        self.latent_shape: tuple = ()
        self.gmm = None
        self.weights: Optional[torch.Tensor] = None  # (K,)
        self.means: Optional[torch.Tensor] = None  # (K, D)
        self.chols: Optional[torch.Tensor] = None  # (K, D, D)

    def fit(self, latents: torch.Tensor) -> "GMMSampler":
        from sklearn.mixture import GaussianMixture  # scikit-learn is slow to import: only for a GMM

        x = _flatten_latents(latents)  # (N, D)
        self.latent_shape = tuple(latents.shape[1:])
        k = max(1, min(self.n_components, x.shape[0] // 2))
        scale = float(x.var(0).mean()) or 1.0
        self.gmm = GaussianMixture(n_components=k, covariance_type="full", reg_covar=self.reg_covar * scale,
                                   max_iter=self.max_iter, random_state=self.seed).fit(x.numpy())
        self.weights = torch.from_numpy(self.gmm.weights_)
        self.means = torch.from_numpy(self.gmm.means_)
        # covariances_ already include reg_covar, so they are positive definite.
        self.chols = torch.linalg.cholesky(torch.from_numpy(self.gmm.covariances_))
        return self

    def sample(self, n: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        if self.gmm is None:
            raise SpatialVAEError("GMMSampler.sample called before fit(latents)")
        device = _generator_device(generator)
        comp = torch.multinomial(self.weights.to(device), n, replacement=True, generator=generator)  # (n,)
        eps = torch.randn((n, self.means.shape[1]), generator=generator, device=device, dtype=torch.float64)
        z = torch.empty_like(eps)  # (n, D)
        # One component at a time: gathering a (n, D, D) stack of factors would need gigabytes.
        for c in comp.unique().tolist():
            idx = comp == c
            z[idx] = self.means[c].to(device) + eps[idx] @ self.chols[c].to(device).T
        return z.float().view(n, *self.latent_shape)

    def describe(self) -> dict:
        return {"kind": "Gaussian mixture on posterior means (sklearn, full covariances)",
                "n_components": int(self.gmm.n_components), "reg_covar": float(self.gmm.reg_covar),
                "converged": bool(self.gmm.converged_), "n_iter": int(self.gmm.n_iter_)}




class PerClass:
    """One sampler per class, each fitted on its class's latents: class-conditional Gaussian / GMM.

    ``sample(n, generator, labels)`` draws latent i from the model of ``labels[i]``; without
    labels, the classes are drawn in their training proportions.
    """

    def __init__(self, make: Callable[[], object], name: str):
        self.make, self.name = make, name
        self.samplers: dict[int, object] = {}
        self.weights: Optional[torch.Tensor] = None

    def fit(self, latents: torch.Tensor, labels: torch.Tensor) -> "PerClass":
        labels = torch.as_tensor(labels).long()
        if len(labels) != len(latents):
            raise SpatialVAEError(f"{len(labels)} labels for {len(latents)} latents")
        counts = torch.bincount(labels, minlength=len(CLASSES)).double()
        self.weights = counts / counts.sum()
        self.samplers = {k: self.make().fit(latents[labels == k]) for k in range(len(CLASSES)) if counts[k] >= 2}
        return self

    def sample(self, n: int, generator: Optional[torch.Generator] = None,
               labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        if labels is None:
            labels = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        labels = torch.as_tensor(labels).long().reshape(-1)
        missing = sorted(set(labels.tolist()) - set(self.samplers))
        if missing:
            raise SpatialVAEError(f"no training latents of class {[CLASSES[k] for k in missing]} to sample from")
        out: Optional[torch.Tensor] = None
        for k, sampler in self.samplers.items():
            idx = (labels == k).nonzero().flatten()
            if len(idx):
                z = sampler.sample(len(idx), generator=generator)
                out = z.new_zeros((n, *z.shape[1:])) if out is None else out
                out[idx] = z
        return out

    def describe(self) -> dict:
        return {"kind": "one sampler per class", "classes": {CLASSES[k]: s.describe() for k, s in self.samplers.items()}}


# One name per sampler, spelled the same in the CLI, `evaluate`, metrics.json and the notebook:
# unconditional, then class-conditional (one fit per class, or the learned prior with labels, drawn
# in the training class mix); learned_label_free is the learned prior's label-free model.
SAMPLER_NAMES = ("standard_normal", "gaussian", "gmm", "gaussian_per_class", "gmm_per_class", "learned",
                 "learned_label_free")
# What files written before the names were unified call them; read at the file boundary only.
OLD_SAMPLER_NAMES = {"aggregate_posterior": "gaussian", "aggregate_posterior_per_class": "gaussian_per_class",
                     "prior": "standard_normal"}


def fit_sampler(kind: str, latents: torch.Tensor, labels: Optional[torch.Tensor] = None, seed: int = 0):
    """A ``gaussian`` or ``gmm`` (10 components) sampler fitted to posterior means (N, *latent_shape);
    with ``labels``, one per class (`PerClass`)."""
    makers = {"gaussian": GaussianSampler, "gmm": lambda: GMMSampler(n_components=10, seed=seed)}
    if kind not in makers:
        raise SpatialVAEError(f"unknown fitted sampler {kind!r}: choose gaussian or gmm")
    if labels is not None:
        return PerClass(makers[kind], kind).fit(latents, labels)
    return makers[kind]().fit(latents)


def parse_label_mix(text: Optional[str], n: int) -> Optional[torch.Tensor]:
    """``normal``, ``pneumonia`` or a mix ``normal:0.3,pneumonia:0.7`` -> n labels (NORMAL first).

    None or "" -> None (unconditional). Shares are normalised; counts use the largest remainder.
    """
    if not text:
        return None
    shares: dict[int, float] = {}
    for part in text.split(","):
        name, _, share = part.strip().partition(":")
        key = name.strip().upper()
        if key not in CLASSES:
            raise SpatialVAEError(f"unknown label {name.strip()!r}: use normal, pneumonia, or a mix such as "
                                  "normal:0.5,pneumonia:0.5")
        try:
            value = float(share) if share else 1.0
        except ValueError:
            value = -1.0
        if not (math.isfinite(value) and value >= 0):
            raise SpatialVAEError(f"label share {share!r} for {name.strip()} is not a number >= 0; write e.g. "
                                  "normal:0.25,pneumonia:0.75")
        shares[CLASSES.index(key)] = shares.get(CLASSES.index(key), 0.0) + value
    total = sum(shares.values())
    if total <= 0:
        raise SpatialVAEError(f"the label shares in {text!r} add up to 0; give at least one class a share")
    exact = {k: n * v / total for k, v in shares.items()}
    counts = {k: int(v) for k, v in exact.items()}
    for k in sorted(exact, key=lambda k: counts[k] - exact[k])[:n - sum(counts.values())]:
        counts[k] += 1
    return torch.cat([torch.full((counts.get(k, 0),), k, dtype=torch.long) for k in range(len(CLASSES))])


# ---------------------------------------------------------------------------------------------
# Encoding, generation, interpolation
# ---------------------------------------------------------------------------------------------

def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _images_of(batch) -> torch.Tensor:
    """A DataLoader batch of (image, label) pairs, or of bare images -> the images."""
    return batch[0] if isinstance(batch, (list, tuple)) else batch


@torch.no_grad()
def encode_dataset(model: nn.Module, dataset: Dataset | torch.Tensor, batch_size: int = 64,
                   device: torch.device | str | None = None, progress: bool = False) -> torch.Tensor:
    """Posterior means of every image: ``(N, *latent_shape)`` float32 on the CPU.

    ``dataset`` yields ``(image, label)`` (a ChestXRayDataset) or is an image tensor (N, 1, H, W).
    The model runs in eval mode without gradients, on ``device`` (default: where it is).
    """
    device = torch.device(device) if device is not None else _model_device(model)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    out = []
    with eval_mode(model):
        for batch in tqdm(loader, desc="encode", disable=not progress, leave=False, file=sys.stderr):
            mu, _ = model.encode(_images_of(batch).to(device).float())  # (B, *latent_shape)
            out.append(mu.float().cpu())
    return torch.cat(out)  # (N, *latent_shape)


def encode_originals(model: nn.Module, dataset, batch_size: int = 64, device: torch.device | str | None = None,
                     progress: bool = False) -> torch.Tensor:
    """`encode_dataset` of a ChestXRayDataset's images as stored, without the training flips: the
    latents every sampler is fitted to. The dataset's flip setting and epoch are left as they were."""
    flip, epoch = dataset.hflip, dataset.epoch
    dataset.hflip = False
    dataset.set_epoch(epoch)
    try:
        return encode_dataset(model, dataset, batch_size, device, progress)
    finally:
        dataset.hflip = flip
        dataset.set_epoch(epoch)


@torch.no_grad()
def decode_latents(model: nn.Module, z: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """Decode latents in batches on the model's device -> (N, C, H, W) float32 in [0, 1] on the CPU."""
    device = _model_device(model)
    with eval_mode(model):
        out = [model.decode(chunk.to(device)).float().clamp(0, 1).cpu() for chunk in z.split(batch_size)]
    return torch.cat(out)


def generate(model: nn.Module, sampler, n: int, generator: Optional[torch.Generator] = None,
             batch_size: int = 64, labels: Optional[torch.Tensor] = None) -> torch.Tensor:
    """n images decoded from ``sampler`` draws -> (n, C, H, W) in [0, 1] on the CPU. ``labels``
    (n,) asks a class-conditional sampler (`PerClass`, `LearnedPrior`) for those classes."""
    kwargs = {} if labels is None else {"labels": labels}
    z = sampler.sample(n, generator=generator, **kwargs)  # (n, *latent_shape)
    return decode_latents(model, z, batch_size)


@torch.no_grad()
def interpolate(model: nn.Module, x_a: torch.Tensor, x_b: torch.Tensor, steps: int = 8) -> torch.Tensor:
    """Decode ``steps`` points on the straight line between the posterior means of two images.

    x_a, x_b: (C, H, W) or (1, C, H, W) in [0, 1] -> (steps, C, H, W); the first and last images
    are the reconstructions of x_a and x_b.
    """
    device = _model_device(model)
    pair = torch.stack([x_a.reshape(x_a.shape[-3:]), x_b.reshape(x_b.shape[-3:])]).to(device).float()  # (2, C, H, W)
    with eval_mode(model):
        mu, _ = model.encode(pair)  # (2, *latent_shape)
    t = torch.linspace(0.0, 1.0, steps, device=device).view(-1, *([1] * (mu.dim() - 1)))  # (steps, 1, ...)
    z = (1 - t) * mu[0:1] + t * mu[1:2]  # (steps, *latent_shape)
    return decode_latents(model, z)


def save_grid(images: torch.Tensor, path: str | os.PathLike, nrow: int = 8) -> Path:
    """(N, C, H, W) in [0, 1] -> one PNG grid with white padding, written atomically."""
    return save_png(image_grid(images, nrow=nrow), path)


@torch.no_grad()
def epoch_sheet(model: nn.Module, val_data: Optional[Dataset], n: int, generator: torch.Generator,
                autocast=nullcontext) -> torch.Tensor:
    """The training grid: ``n`` samples on top, up to 16 validation originals / reconstructions below.

    The samples decode a full-covariance Gaussian fitted to the validation set's posterior means
    (the aggregate posterior): with the per-value KL the latent does not fill N(0, I), and prior
    noise decodes to noise. Without (enough) validation data they decode N(0, I)."""
    if val_data is None or len(val_data) < 2:
        with autocast():
            return sample_sheet(model.sample(n, generator=generator).float().cpu())
    latents = encode_dataset(model, val_data, batch_size=64)
    samples = decode_latents(model, GaussianSampler().fit(latents).sample(n, generator=generator))
    k = min(16, len(val_data))
    originals = torch.stack([val_data[i][0] for i in range(k)])
    return sample_sheet(samples, originals, decode_latents(model, latents[:k]))


__all__ = ["StandardNormalSampler", "GaussianSampler", "GMMSampler", "PerClass", "fit_sampler", "parse_label_mix",
           "SAMPLER_NAMES", "OLD_SAMPLER_NAMES",
           "CLASSES", "encode_dataset", "encode_originals", "decode_latents", "generate", "interpolate",
           "save_grid", "epoch_sheet"]
