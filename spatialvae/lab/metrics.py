"""Metrics on image tensors (N, C, H, W) in [0, 1]: per-image L1 / PSNR / SSIM, MS-SSIM
diversity, nearest neighbours, PCA floors, and FID / KID with the Inception loader.

Shared by the trainer's per-epoch monitor, `evaluate` and `features` (which depend on this
module and not on each other). FID/KID use the standard Inception features (torch-fidelity's
InceptionV3 port of the TF FID network, through torchmetrics).
"""

from __future__ import annotations

import math
import os
import socket
import sys
import time
import warnings
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from pytorch_msssim import ms_ssim
from torch import nn
from tqdm.std import tqdm

from ..data import as_float_images, seeded_subset
from ..errors import WeightsError, short_reason

DUPLICATE_MSE = 1e-6  # originals closer than this (PSNR > 60 dB) are the same picture: Kaggle's test split has such pairs


def nearest_is_self(recons: torch.Tensor, originals: torch.Tensor, chunk: int = 256,
                    duplicate_mse: float = DUPLICATE_MSE) -> torch.Tensor:
    """Identity: for each reconstruction, is its own original the nearest (pixel MSE) of all
    originals? -> (N,) bool. A model that draws one template chest for everyone scores low.
    An original that is a duplicate of the reconstruction's own (MSE below ``duplicate_mse``)
    counts as its own: no reconstruction can be nearer to one of two identical pictures."""
    r = recons.float().flatten(1)
    o = originals.float().flatten(1)
    o_sq = o.pow(2).sum(1)
    hits = []
    for s in range(0, len(r), chunk):
        rc = r[s:s + chunk]
        d = rc.pow(2).sum(1, keepdim=True) - 2 * rc @ o.T + o_sq  # (chunk, N) squared distances
        own = torch.arange(s, s + len(rc))
        nearest = d.argmin(1)
        same = (o[nearest] - o[own]).pow(2).mean(1) < duplicate_mse
        hits.append((nearest == own) | same)
    return torch.cat(hits)


def duplicate_count(images: torch.Tensor, duplicate_mse: float = DUPLICATE_MSE) -> int:
    """How many images have a duplicate (MSE below ``duplicate_mse``) elsewhere in the set."""
    x = images.float().flatten(1)
    d = torch.cdist(x, x).pow(2) / x.shape[1]
    d.fill_diagonal_(float("inf"))
    return int((d.min(1).values < duplicate_mse).sum())


def pca_reconstruct(train: torch.Tensor, test: torch.Tensor, k: int) -> torch.Tensor:
    """The linear floor: project test images onto the top-k principal components of the training
    images and back. train (N, ...), test (M, ...) floats in [0, 1] -> (M, ...) clamped to [0, 1].
    With k = the latent's number of values, a nonlinear autoencoder should beat it."""
    x = train.float().flatten(1)  # (N, D)
    mean = x.mean(0, keepdim=True)
    k = min(k, x.shape[0], x.shape[1])
    # Exact SVD of the centred data: small enough at these sizes to need no randomised solver.
    _, _, vh = torch.linalg.svd(x - mean, full_matrices=False)
    v = vh[:k]  # (k, D)
    t = test.float().flatten(1) - mean
    return ((t @ v.T) @ v + mean).clamp(0, 1).reshape(test.shape)


INCEPTION_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                 "weights-inception-2015-12-05-6726825d.pth")  # torch-fidelity's URL_INCEPTION_V3


INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"  # its name in the torch hub cache


INCEPTION_FEATURES = 2048  # pool3 features, the standard FID layer


DOWNLOAD_TIMEOUT_S = 20.0  # per socket operation: a firewalled network fails instead of hanging


def ms_ssim_window(side: int) -> int:
    """Gaussian window for pytorch-msssim's MS-SSIM at this image side.

    ``pytorch_msssim.ms_ssim`` asserts ``side > (win_size - 1) * 16`` (its 4 downsamplings),
    whatever the weights, so the default window 11 needs more than 160 px. We keep the standard 5
    scales and weights and shrink the window instead: the largest odd window <= 11 that fits, i.e.
    7 at 128 px and 3 at 64 px. Below 33 px even 3 does not fit (see `pairwise_ms_ssim`).
    """
    for win in range(11, 2, -2):
        if side > (win - 1) * 16:
            return win
    return 3


def _ms_ssim(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """MS-SSIM per image pair -> (N,). Images under 33 px are upsampled to 33 px first (bilinear),
    the smallest side where the 3-px window fits: only smoke-sized runs hit this."""

    side = min(a.shape[-2:])
    if side <= 32:
        a = F.interpolate(a, size=(33, 33), mode="bilinear", align_corners=False)
        b = F.interpolate(b, size=(33, 33), mode="bilinear", align_corners=False)
        side = 33
    return ms_ssim(a.float(), b.float(), data_range=1.0, size_average=False, win_size=ms_ssim_window(side))


def pairwise_ms_ssim(images: torch.Tensor, max_images: int = 50, seed: int = 0, chunk: int = 256) -> dict:
    """Mean MS-SSIM over all pairs of up to ``max_images`` images (a seeded subset).

    A diversity measure: 1 means every image is the same; lower is more diverse.
    """
    idx = seeded_subset(len(images), max_images, seed)
    x = images[idx].float()  # (k, C, H, W)
    i, j = torch.triu_indices(len(x), len(x), offset=1)  # every unordered pair once
    if len(i) == 0:
        return {"mean": None, "n_images": len(x), "n_pairs": 0}
    vals = torch.cat([_ms_ssim(x[i[s:s + chunk]], x[j[s:s + chunk]]) for s in range(0, len(i), chunk)])
    return {"mean": float(vals.mean()), "std": float(vals.std()) if len(vals) > 1 else 0.0,
            "n_images": len(x), "n_pairs": len(vals), "win_size": ms_ssim_window(max(33, min(x.shape[-2:])))}


@torch.no_grad()
def nearest_neighbour(queries: torch.Tensor, reference: torch.Tensor, flips: bool = True,
                      query_chunk: int = 256, ref_chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel RMSE from each query image to its nearest reference image -> (distance (M,), index (M,)).

    ``reference`` may be the uint8 ``dataset.images`` (N, H, W): it is converted a chunk at a
    time, so memory stays at a (query_chunk x ref_chunk) distance block. With ``flips`` the
    mirrored query is compared too (training flipped images horizontally, so a mirrored copy of
    a training image is memorisation as well). The nearest neighbour is found with the fast
    ||q||^2 + ||r||^2 - 2 q.r expansion; its distance is then recomputed exactly (so a query
    that is in the reference set gets exactly 0).
    """
    q_all = as_float_images(queries)  # (M, 1, H, W)
    n_ref = len(reference)
    best_d2 = torch.full((len(q_all),), math.inf)
    best_i = torch.zeros(len(q_all), dtype=torch.long)
    best_flip = torch.zeros(len(q_all), dtype=torch.bool)
    for qs in range(0, len(q_all), query_chunk):
        q = q_all[qs:qs + query_chunk]
        variants = [q.flatten(1)] + ([q.flip(-1).flatten(1)] if flips else [])  # each (m, D)
        norms = [v.pow(2).sum(1, keepdim=True) for v in variants]  # each (m, 1)
        sl = slice(qs, qs + len(q))
        for rs in range(0, n_ref, ref_chunk):
            r = as_float_images(reference[rs:rs + ref_chunk]).flatten(1)  # (n, D)
            r2 = r.pow(2).sum(1)  # (n,)
            for flipped, (v, v2) in enumerate(zip(variants, norms)):
                d, i = (v2 + r2 - 2 * v @ r.T).min(1)  # squared distances (m, n) -> nearest (m,)
                better = d < best_d2[sl]
                best_d2[sl] = torch.where(better, d, best_d2[sl])
                best_i[sl] = torch.where(better, i + rs, best_i[sl])
                best_flip[sl] = torch.where(better, torch.tensor(bool(flipped)), best_flip[sl])
    nearest = as_float_images(reference[best_i])  # (M, 1, H, W)
    q_used = torch.where(best_flip.view(-1, 1, 1, 1), q_all.flip(-1), q_all)
    dist = (q_used - nearest).pow(2).flatten(1).mean(1).sqrt()  # exact RMSE, (M,)
    return dist, best_i


def summarize(values: torch.Tensor) -> dict:
    v = values.double()
    return {"mean": float(v.mean()), "median": float(v.median()), "min": float(v.min()), "max": float(v.max())}


def inception_cache_path() -> Path:
    """Where torch hub (and so torch-fidelity) keeps the FID Inception weights."""
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE


def _download_inception(dst: Path) -> None:
    """Download the weights into the hub cache, hash-checked, with a socket timeout.

    torch hub's own download has no timeout, so on a network that drops packets it would hang;
    the default socket timeout bounds every connect/read instead (and is restored afterwards).
    Offline with no DNS (this machine, Kaggle with internet off) it fails in well under a second.
    """
    dst.parent.mkdir(parents=True, exist_ok=True)
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        # The file name carries the first 8 hex digits of its SHA-256, torch hub's convention.
        torch.hub.download_url_to_file(INCEPTION_URL, str(dst), hash_prefix=INCEPTION_FILE.rsplit("-", 1)[1][:8],
                                       progress=False)
    finally:
        socket.setdefaulttimeout(old)


def load_inception(spec: str = "auto") -> tuple[Optional[nn.Module], Optional[str], Optional[str]]:
    """The FID InceptionV3 feature extractor -> (module or None, weights path, reason if None).

    spec: "off" (skip), "auto" (the torch hub cache, downloaded there if missing; a failure is
    reported, not raised), or a path to ``weights-inception-2015-12-05-6726825d.pth`` (a failure
    raises WeightsError: an explicit file that cannot be used is a user error). The file is first
    read with ``torch.load(weights_only=True)``, so nothing in it is executed, before
    torch-fidelity loads it.
    """
    if spec == "off":
        return None, None, "skipped (inception='off')"
    explicit = spec != "auto"
    path = Path(os.path.expandvars(spec)).expanduser() if explicit else inception_cache_path()
    fix = (f"put {INCEPTION_FILE} in {path.parent} ($TORCH_HOME/hub/checkpoints) or pass "
           "inception=PATH (e.g. a Kaggle dataset), or turn internet on")
    if explicit and not path.is_file():
        raise WeightsError(f"inception={spec!r} is not a file; pass the path of {INCEPTION_FILE}, 'auto' or 'off'")
    if not path.is_file():
        t0 = time.perf_counter()
        try:
            _download_inception(path)
        except Exception as e:  # URLError, timeout, hash mismatch, ...
            return None, None, (f"Inception weights not cached at {path} and the download failed after "
                                f"{time.perf_counter() - t0:.2f} s ({short_reason(e)}); {fix}")
    try:
        torch.load(path, map_location="cpu", weights_only=True)
        from torchmetrics.image.fid import NoTrainInceptionV3  # torchmetrics is slow to import: only when FID runs

        net = NoTrainInceptionV3(name="inception-v3-compat", features_list=[str(INCEPTION_FEATURES)],
                                 feature_extractor_weights_path=str(path))
    except Exception as e:  # corrupt/truncated file, torch-fidelity missing, ...
        if explicit:
            raise WeightsError(f"cannot use Inception weights {path} ({short_reason(e)}); {fix}") from e
        return None, None, f"cannot use Inception weights {path} ({short_reason(e)}); {fix}"
    return net, str(path), None


@torch.no_grad()
def inception_features(net: nn.Module, images: torch.Tensor, batch_size: int = 64,
                       device: torch.device | str = "cpu", progress: bool = False, desc: str = "inception") -> torch.Tensor:
    """Images (N, 1, H, W) in [0, 1] (or uint8 (N, H, W)) -> pool3 features (N, 2048) on the CPU.

    Exactly what torchmetrics' FID/KID do with ``normalize=True`` (``(x * 255).byte()``), with
    the grayscale channel repeated to RGB; torch-fidelity resizes to 299 px inside.
    """

    net = net.to(device)
    out = []
    for s in tqdm(range(0, len(images), batch_size), desc=desc, disable=not progress, leave=False, file=sys.stderr):
        x = as_float_images(images[s:s + batch_size])  # (B, 1, H, W)
        x = (x.clamp(0, 1) * 255).byte().repeat(1, 3, 1, 1)  # (B, 3, H, W) uint8
        out.append(net(x.to(device)).double().cpu())  # (B, 2048)
    return torch.cat(out)


class _Precomputed(nn.Identity):
    """A 'feature extractor' that passes features through, so torchmetrics computes FID/KID from
    features extracted once per image set (the test features serve every comparison)."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features


def fid_kid(real: torch.Tensor, fake: torch.Tensor, seed: int = 0, kid_subsets: int = 100) -> dict:
    """FID and KID (torchmetrics) between two feature sets (N, D) and (M, D).

    KID uses subsets of min(1000, N/2, M/2) images (torchmetrics' default 1000 exceeds the 624 test
    images, and subsets as large as the set would all be the same, giving a std of 0), drawn under
    a fixed seed, without touching the global RNG.
    """
    from torchmetrics.image.fid import FrechetInceptionDistance  # slow to import: only when FID runs
    from torchmetrics.image.kid import KernelInceptionDistance

    d = real.shape[1]
    fid = FrechetInceptionDistance(feature=_Precomputed(d))
    fid.update(real.double(), real=True)
    fid.update(fake.double(), real=False)
    with warnings.catch_warnings():  # "will save all extracted features": 2 x 624 x 2048 doubles is 20 MB
        warnings.filterwarnings("ignore", message=".*save all extracted features.*")
        kid = KernelInceptionDistance(feature=_Precomputed(d), subsets=kid_subsets,
                                      subset_size=max(2, min(1000, len(real) // 2, len(fake) // 2)))
    kid.update(real.double(), real=True)
    kid.update(fake.double(), real=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        kid_mean, kid_std = kid.compute()
    return {"fid": float(fid.compute()), "kid_mean": float(kid_mean), "kid_std": float(kid_std)}


# ---- sharpness: how much fine detail images hold, as a ratio to real images -----------------------
# The two-sample test tells every smooth decoder from real images, so it cannot rank them; these
# graded figures can. Both sides are rounded to 8 bits first, as the real files are.
SHARPNESS_BANDS = ((0.25, 0.5), (0.5, 0.75), (0.75, 1.0))  # radial frequency, in units of Nyquist


def _to_8bit(images: torch.Tensor) -> torch.Tensor:
    x = as_float_images(images).float()  # (N, 1, H, W) in [0, 1]
    return (x.clamp(0, 1) * 255).round() / 255


def band_power(images: torch.Tensor, bands=SHARPNESS_BANDS, chunk: int = 256) -> torch.Tensor:
    """Mean spectral power of each image in each radial band -> (N, len(bands)).

    The image's mean is removed and a Hann window applied, so the frame's edges do not leak into
    every frequency; the radius is |f| / 0.5 cycles per pixel (1 = Nyquist)."""
    x = _to_8bit(images)
    h, w = x.shape[-2:]
    win = torch.outer(torch.hann_window(h, periodic=False), torch.hann_window(w, periodic=False))
    fy, fx = torch.fft.fftfreq(h).abs(), torch.fft.fftfreq(w).abs()
    radius = torch.sqrt(fy[:, None] ** 2 + fx[None, :] ** 2) / 0.5  # (H, W)
    masks = [(radius >= lo) & (radius < hi) for lo, hi in bands]
    out = []
    for s in range(0, len(x), chunk):
        b = x[s:s + chunk, 0]
        b = (b - b.mean((-2, -1), keepdim=True)) * win
        power = torch.fft.fft2(b).abs().pow(2)  # (B, H, W)
        out.append(torch.stack([power[:, m].mean(1) for m in masks], 1))
    return torch.cat(out)


def laplacian_variance(images: torch.Tensor) -> torch.Tensor:
    """Variance of the 3x3 Laplacian per image (a focus measure; valid region only) -> (N,)."""
    x = _to_8bit(images)
    k = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]]).view(1, 1, 3, 3)
    return F.conv2d(x, k).flatten(1).var(1)


def sharpness_ratios(images: torch.Tensor, real: torch.Tensor, bands=SHARPNESS_BANDS) -> dict:
    """Fine detail of ``images`` over ``real``'s: the mean band power and the mean Laplacian variance,
    each as a ratio (1.0 = as much detail as the real images) -> {"power_0.25-0.5": r, ..., "laplacian": r}."""
    gen_p, real_p = band_power(images, bands).mean(0), band_power(real, bands).mean(0)
    out = {f"power_{lo:g}-{hi:g}": float(g / r) for (lo, hi), g, r in zip(bands, gen_p, real_p)}
    out["laplacian"] = float(laplacian_variance(images).mean() / laplacian_variance(real).mean())
    return out
