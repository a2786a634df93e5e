"""Evaluation of a trained run: reconstruction, sample quality, diversity, memorisation.

``evaluate_run(run_dir)`` loads a checkpoint, rebuilds its config, model and data splits, and
writes ``run_dir/metrics.json`` plus sample grids under ``run_dir/samples/eval_*.png``:

* reconstruction of the test split (decoding the posterior mean): SSIM, PSNR, L1, overall and
  per class;
* sample quality for each sampler (``standard_normal`` = N(0, I), ``gaussian`` = a Gaussian
  fitted to the training posterior means, ``gmm`` = a Gaussian mixture on them, their
  ``*_per_class`` versions fitted per class, and ``learned`` = the run's flow-matching prior,
  `spatialvae.prior`): FID and KID against the test split, with the train-vs-test value as the
  floor a perfect generator reaches; with an X-ray feature file also the domain FD, next to the
  decoder's floor (its reconstructions of training images: no latent sampler can beat it);
* usefulness: train on synthetic, test on real (`spatialvae.tstr`) for the conditional samplers;
* a classifier two-sample test (`spatialvae.c2st`): can a small CNN tell the learned prior's
  samples, or the reconstructions, from real images the VAE never trained on (the training-split
  files a capped run left out, else the validation split)? 0.5 = it cannot;
* diversity: mean pairwise MS-SSIM among samples (lower = more diverse; the test split's value
  is the reference);
* memorisation: each sample's pixel RMSE to its nearest training image (either orientation,
  since training used horizontal flips), next to the same distance for test images;
* sharpness: how much fine detail the reconstructions and learned-prior samples hold, as ratios
  to real images' (`metrics.sharpness_ratios`), beside real-vs-real and blurred references.

The decoder: a run with a texture stage (`spatialvae.texture_run`) has ``checkpoints/sharp.pt``
beside the smooth ``best.pt``; it is evaluated by default, and then the smooth decoder's
reconstruction scores, sharpness and decoder floor come in ``smooth_decoder`` (the same latents
decoded both ways), so one evaluation shows the stage's before and after.

FID/KID use the standard Inception features (torch-fidelity's InceptionV3 port of the TF FID
network, through torchmetrics). Without its weights (offline and not cached), the FID/KID
fields are ``null`` and ``inception_unavailable`` says why; everything else still runs.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from torch import nn
from torchvision.transforms.functional import gaussian_blur

from ..config import DataConfig, perceptual_mode
from ..data import CLASSES, as_float_images, load_split, make_datasets, seeded_subset, unused_train_files
from ..engine import default_device
from ..errors import SpatialVAEError, on_disk_full, short_reason
from ..prior_run import load_prior, prior_path
from ..runs import RunDir, atomic_torch_save, atomic_write_bytes, load_model
from ..sampling import (
    OLD_SAMPLER_NAMES,
    SAMPLER_NAMES,
    StandardNormalSampler,
    decode_latents,
    encode_dataset,
    encode_originals,
    fit_sampler,
    generate,
    interpolate,
)
from ..scores import psnr, reconstruction_scores, ssim_score
from ..texture_run import DECODERS, decoder_checkpoint
from ..viz import image_grid, interleave_rows, save_png
from .c2st import MIN_PER_SIDE, classifier_two_sample_test
from .features import domain_fd_kid, extract_features, feature_dim_ok, load_feature_net
from .metrics import (
    duplicate_count,
    fid_kid,
    inception_features,
    load_inception,
    nearest_is_self,
    nearest_neighbour,
    pairwise_ms_ssim,
    pca_reconstruct,
    sharpness_ratios,
    summarize,
)
from .tstr import LabelledImages, run_tstr

SAMPLERS = SAMPLER_NAMES  # every row evaluate can score (spatialvae.sampling names them)
LEARNED = ("learned", "learned_label_free")  # need the run's checkpoints/prior.pt
TSTR_SOURCES = ("gaussian_per_class", "gmm_per_class", "learned")  # class-conditional samplers


@dataclass(frozen=True)
class EvalOptions:
    """What `evaluate_run` measures, and how. checkpoint: "auto" (the texture stage's sharp.pt when the
    run has one, else best.pt), "sharp" (an error without one), "smooth" (best.pt), "best", "last" or a
    path to a .pt file; with the sharp decoder, best.pt's scores come too (``smooth_decoder``)."""

    checkpoint: str = "auto"
    n_samples: Optional[int] = None  # images generated per sampler (default: the size of the test split)
    features_path: Optional[str | os.PathLike] = None  # a `features` file: the domain FD and KID, the floors
    device: Optional[torch.device | str] = None
    batch_size: int = 64
    progress: bool = True
    inception: str = "auto"  # "auto" | "off" | a path to the FID Inception weights (see `load_inception`)
    samplers: Optional[Sequence[str]] = None  # any of `SAMPLERS` (default: all; the learned ones with a prior.pt)
    seed: int = 0  # every random choice: samples, subsets, KID
    tstr_per_class: int = 300  # images per class for train-on-synthetic-test-on-real; 0 skips it
    tstr_repeats: int = 3  # TSTR classifier seeds
    c2st: bool = True  # the classifier two-sample test of the learned prior's samples and of reconstructions


@dataclass(frozen=True)
class EvalContext:
    """What every part of one evaluation shares: built once by `evaluate_run`, passed to each block."""

    run_dir: Path
    model: nn.Module  # the evaluated checkpoint's VAE, on ``device``
    splits: object  # the run's DataSplits
    n_gen: int  # images per sampler
    seed: int
    device: torch.device
    batch_size: int = 64
    progress: bool = False
    grids: dict = field(default_factory=dict)  # {samples/eval_*.png: grid}, written after everything is computed


@dataclass(frozen=True)
class DomainSpace:
    """The X-ray feature space of one evaluation: the extractor and the real references in it."""

    features: Callable[[torch.Tensor], torch.Tensor]  # images -> features (N, D)
    test: torch.Tensor  # the test split's features
    ref_a: torch.Tensor  # training half A's features: the reference of every FD vs train
    ref_b: torch.Tensor  # the indices of training half B (the decoder floor's images)
    n_val: int  # the validation row's number of images
    train_mu: torch.Tensor  # the training split's posterior means


@dataclass(frozen=True)
class _OpenRun:
    """A run opened for evaluation: its context and what was loaded before any measuring."""

    ctx: EvalContext
    cfg: object
    ckpt_path: Path
    ckpt: dict
    decoder: str
    smooth: tuple  # (the smooth decoder's model or None, best.pt's path)
    samplers: list
    prior: object
    prior_note: Optional[str]
    domain_net: object
    domain_info: Optional[dict]
    inception_net: Optional[nn.Module]
    inception_weights: Optional[str]
    inception_reason: Optional[str]


def _open_run(run_dir: Path, data_root, opts: EvalOptions) -> _OpenRun:
    """Load the checkpoint, the samplers, the feature files and the data, in that order: an explicit
    weights file that cannot be used fails before any data or model work."""
    device = default_device(opts.device)
    ckpt_path = _checkpoint_path(run_dir, opts.checkpoint)
    model, cfg, ckpt = load_model(ckpt_path, device)  # weights_only: nothing in the file is executed
    decoder = decoder_name(ckpt)
    smooth = _smooth_decoder(run_dir, decoder, device)  # (None, path) unless the sharp decoder is evaluated
    samplers, prior, prior_note = _select_samplers(run_dir, model, opts.samplers)
    domain_net, domain_info = _load_feature_file(opts.features_path)
    net, inception_weights, inception_reason = load_inception(opts.inception)
    cfg = cfg.with_data_root(data_root)  # c2st's unused training files are found there too
    splits, n_gen = _evaluation_data(cfg, opts.n_samples, opts.progress)
    ctx = EvalContext(run_dir, model, splits, n_gen, opts.seed, device, opts.batch_size, opts.progress)
    return _OpenRun(ctx, cfg, ckpt_path, ckpt, decoder, smooth, samplers, prior, prior_note, domain_net,
                    domain_info, net, inception_weights, inception_reason)


# ---------------------------------------------------------------------------------------------
# Reconstruction of the test split
# ---------------------------------------------------------------------------------------------

def reconstruction_metrics(model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                           batch_size: int = 64) -> tuple[dict, torch.Tensor]:
    """SSIM / PSNR / L1 of decoded posterior means, overall and per class -> (dict, recons (N, 1, H, W))."""
    device = next(model.parameters()).device
    per = reconstruction_scores(model, images, batch_size, prepare=lambda x: x.to(device), keep_recons=True)
    recons = per.pop("recons")  # the rest: {ssim, psnr_db, l1}, (N,) each

    def block(mask: torch.Tensor) -> dict:
        return {"n": int(mask.sum()), **{k: (float(v[mask].mean()) if mask.any() else None) for k, v in per.items()}}

    out = {"overall": block(torch.ones(len(labels), dtype=torch.bool))}
    for c, name in enumerate(CLASSES):
        out[name] = block(labels == c)
    return out, recons


def _reconstruction_row(ctx: EvalContext) -> tuple[dict, torch.Tensor]:
    """metrics.json's reconstruction block (with identity) -> (block, recons (N, 1, S, S))."""
    test_u8, test_labels = ctx.splits.test.images, ctx.splits.test.labels
    recon, recons = reconstruction_metrics(ctx.model, test_u8, test_labels, ctx.batch_size)
    test = as_float_images(test_u8)  # (N, 1, S, S)
    recon["identity"] = float(nearest_is_self(recons, test).float().mean())
    recon["test_images_with_a_duplicate"] = duplicate_count(test)
    return {"split": "test", "decoded": "posterior mean", **recon}, recons


def _save_eval_grid(ctx: EvalContext, images: torch.Tensor, key: str, nrow: int = 8) -> str:
    """The grid of ``images`` into ``ctx.grids`` as samples/eval_KEY.png -> that path relative to the run
    folder (metrics.json "images"). Written by `_write_grids` once everything is computed, so a crash
    leaves no new grids beside an old metrics.json."""
    path = f"samples/eval_{key}.png"
    ctx.grids[path] = image_grid(images, nrow=nrow)  # (1, H', W')
    return path


def _write_grids(grids: dict, run_dir: Path) -> None:
    """Every grid `_save_eval_grid` collected, as a PNG under the run folder."""
    for path, grid in grids.items():
        save_png(grid, run_dir / path)


def _reconstruction_pictures(ctx: EvalContext, recons: torch.Tensor) -> tuple[dict, torch.Tensor]:
    """The reconstruction and interpolation grids -> ({name: path}, 8 originals above their 8 reconstructions)."""
    test_u8, test_labels = ctx.splits.test.images, ctx.splits.test.labels
    pick = _class_balanced_indices(test_labels, 16, ctx.seed)
    sheet = interleave_rows(as_float_images(test_u8[pick]), recons[pick])  # (32, 1, S, S)
    interpolation = _interpolation_sheet(ctx.model, test_u8, test_labels, steps=8, n_pairs=4, seed=ctx.seed)
    pictures = {"reconstructions": _save_eval_grid(ctx, sheet, "reconstructions"),
                "interpolation": _save_eval_grid(ctx, interpolation, "interpolation", nrow=10)}
    return pictures, sheet[:16]


@torch.no_grad()
def linear_floors(train_u8: torch.Tensor, test_u8: torch.Tensor, k: int) -> dict:
    """What anyone can recompute without a model, on the same test images: the training mean
    image for every patient, and PCA with k components (k = the latent's number of values)."""
    train, test = as_float_images(train_u8), as_float_images(test_u8)  # (N, 1, S, S)
    mean = train.mean(0, keepdim=True).expand_as(test)
    pca = pca_reconstruct(train, test, k)
    return {"mean_image": {"psnr_db": float(psnr(mean, test).mean()), "ssim": float(ssim_score(mean, test).mean())},
            "pca": {"components": min(k, len(train)), "psnr_db": float(psnr(pca, test).mean()),
                    "ssim": float(ssim_score(pca, test).mean()),
                    "identity": float(nearest_is_self(pca, test).float().mean())},
            "note": "fitted on the run's training images; the model should beat PCA with as many components "
                    "as its latent has values"}


def _seeded_class_indices(labels: torch.Tensor, cls: int, k: int, g: torch.Generator) -> torch.Tensor:
    idx = (labels == cls).nonzero().flatten()
    return idx[torch.randperm(len(idx), generator=g)[:k]]


def _class_balanced_indices(labels: torch.Tensor, k: int, seed: int) -> torch.Tensor:
    """Up to k indices, half from each class when possible (for the picture grids)."""
    g = torch.Generator().manual_seed(seed)
    got = torch.cat([_seeded_class_indices(labels, c, k // 2, g) for c in range(len(CLASSES))])
    if len(got) < k:  # a class is short: fill from the other images
        taken = set(got.tolist())
        rest = torch.tensor([i for i in range(len(labels)) if i not in taken], dtype=torch.long)
        got = torch.cat([got, rest[: k - len(got)]])
    return got


def _interpolation_sheet(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, steps: int,
                         n_pairs: int, seed: int) -> torch.Tensor:
    """n_pairs rows of: a NORMAL original, `steps` decoded interpolants, a PNEUMONIA original."""
    g = torch.Generator().manual_seed(seed)
    a_idx = _seeded_class_indices(labels, 0, n_pairs, g).tolist()
    b_idx = _seeded_class_indices(labels, 1, n_pairs, g).tolist()
    if not a_idx or not b_idx:  # one class only: pair images within it
        half = min(n_pairs, len(images) // 2)
        a_idx, b_idx = list(range(half)), list(range(half, 2 * half))
    rows = []
    for a, b in zip(a_idx, b_idx):
        xa, xb = as_float_images(images[a:a + 1]), as_float_images(images[b:b + 1])  # (1, 1, H, W) each
        rows += [xa, interpolate(model, xa, xb, steps), xb]
    return torch.cat(rows)  # (pairs * (steps + 2), 1, H, W)


# ---------------------------------------------------------------------------------------------
# What real images score: the references every sampler is compared with
# ---------------------------------------------------------------------------------------------

def _real_references(ctx: EvalContext, train_subset: torch.Tensor,
                     net: Optional[nn.Module]) -> tuple[dict, Optional[torch.Tensor]]:
    """What real images score (diversity, distance to train, train-vs-test FID) -> (reference, test Inception features)."""
    splits, seed = ctx.splits, ctx.seed
    train_u8, test_u8 = splits.train.images, splits.test.images
    reference = {
        "test_ms_ssim_diversity": pairwise_ms_ssim(as_float_images(test_u8), seed=seed),
        "test_nn_train_rmse": summarize(nearest_neighbour(test_u8, train_u8)[0]),
        "val_nn_train_rmse": summarize(nearest_neighbour(splits.val.images, train_u8)[0]) if len(splits.val) else None,
    }
    if net is None:
        reference["train_vs_test"] = {"n_train": len(train_subset), "fid": None, "kid_mean": None, "kid_std": None}
        return reference, None
    feats_test = inception_features(net, test_u8, ctx.batch_size, ctx.device, ctx.progress, "inception test")
    feats_train = inception_features(net, train_u8[train_subset], ctx.batch_size, ctx.device, ctx.progress,
                                     "inception train")
    reference["train_vs_test"] = {"n_train": len(train_subset), **fid_kid(feats_test, feats_train, seed)}
    return reference, feats_test


def _val_in_train_mix(val_labels: torch.Tensor, train_labels: torch.Tensor, k: int, seed: int) -> torch.Tensor:
    """The most validation images (at most k) whose class counts follow the training split's mix:
    the extractor's features separate the classes, so a mix unlike train's would inflate the bar."""
    shares = torch.bincount(train_labels.long(), minlength=len(CLASSES)).float() / len(train_labels)
    counts = torch.bincount(val_labels.long(), minlength=len(CLASSES)).float()
    n = min([k] + [int(counts[c] / shares[c]) for c in range(len(CLASSES)) if shares[c] > 0])
    return _pick_in_mix(val_labels.long(), n, shares, seed)


def _train_halves(n_train: int, n_gen: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two disjoint seeded halves of the training split, at most n_gen indices each: A is the domain
    FD's training reference, B the other side of the real and the decoder's floors."""
    half = n_train // 2
    perm = torch.randperm(n_train, generator=torch.Generator().manual_seed(seed + 1))
    return perm[:min(half, n_gen)], perm[half:half + min(half, n_gen)]


def _domain_references(features, splits, train_subset: torch.Tensor, n_gen: int,
                       seed: int) -> tuple[dict, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The real floors of the domain FD -> (their rows, test features (n_test, D), the features of
    training half A (n_ref, D), the indices of half B). ``features``: images -> X-ray features (N, D).

    The extractor is a classifier, so its features (and the FD) react strongly to the class mix.
    Three references: train vs test (what a perfect copy of the training distribution scores against
    the test split), two disjoint halves of train (the floor for FD against train itself), and the
    validation split (real held-out patients of the training distribution: the bar a sampler should
    meet, compared at the same number of images, since FD grows as n shrinks)."""
    train_u8 = splits.train.images
    ref_a, ref_b = _train_halves(len(train_u8), n_gen, seed)
    dom_test, dom_train = features(splits.test.images), features(train_u8[train_subset])
    dom_ref_a, dom_ref_b = features(train_u8[ref_a]), features(train_u8[ref_b])
    val_pick = _val_in_train_mix(splits.val.labels, splits.train.labels, min(len(ref_a), n_gen), seed)
    dom_val = features(splits.val.images[val_pick])
    val_counts = {c: int((splits.val.labels[val_pick] == i).sum()) for i, c in enumerate(CLASSES)}
    rows = {"floor_train_vs_test": {"n_train": len(train_subset), **domain_fd_kid(dom_test, dom_train, seed)},
            "floor_train_vs_train": {"n": len(ref_a), **domain_fd_kid(dom_ref_a, dom_ref_b, seed)},
            "val_vs_train": {"n": len(val_pick), "class_counts": val_counts,
                             **domain_fd_kid(dom_ref_a[:len(val_pick)], dom_val, seed)}}
    return rows, dom_test, dom_ref_a, ref_b


def _domain_block(domain_net, domain_info: dict, features_path, rows: dict, n_test: int, n_gen: int) -> dict:
    """metrics.json's domain block: the extractor, the numbers of images and the real floors (``rows``)."""
    domain = {"features": str(features_path), "feature_dim": domain_net.num_features,
              "extractor_image_size": domain_info["config"].image_size,
              "extractor_test_accuracy": domain_info["test"]["accuracy"],
              "n_test": n_test, "n_generated": n_gen, "n_train_reference": rows["floor_train_vs_train"]["n"], **rows,
              "note_class_mix": "the extractor is a NORMAL/PNEUMONIA classifier: FD against test also measures "
                                "the class mix (test is 62.5% PNEUMONIA); domain_fd_vs_train compares with "
                                "the distribution the VAE was trained on"}
    if (note := feature_dim_ok(min(n_test, n_gen), domain_net.num_features)):
        domain["note"] = note
    return domain


def decoder_floor(ctx: EvalContext, dom: DomainSpace, model: nn.Module, test_recons: torch.Tensor) -> dict:
    """What a perfect latent sampler scores: FD vs train of the decoder's own images.

    ``fd_vs_train``: reconstructions of training images (the half not used as the reference,
    so the same N and images as the real train-vs-train floor): a sampler that reproduced the
    training latents exactly would score this. ``test_reconstructions_fd_vs_train``: the test
    split's reconstructions, which also carry the test split's shift from train (class mix)."""

    recon_b = decode_latents(model, dom.train_mu[dom.ref_b])
    fd_b = domain_fd_kid(dom.ref_a, dom.features(recon_b), ctx.seed)
    fd_test = domain_fd_kid(dom.ref_a, dom.features(test_recons), ctx.seed)
    return {"fd_vs_train": fd_b["fd"], "kid_vs_train": fd_b["kid_mean"], "n": len(dom.ref_b),
            "test_reconstructions_fd_vs_train": fd_test["fd"]}


def _domain_evaluation(ctx: EvalContext, domain_net, domain_info: dict, features_path, train_subset: torch.Tensor,
                       train_mu: torch.Tensor, recons: torch.Tensor) -> tuple[dict, DomainSpace]:
    """With an X-ray feature file: metrics.json's domain block (the real floors, the decoder's floor)
    and the feature space every sampler (and the smooth decoder, `smooth_decoder_block`) is scored in."""
    size = domain_info["config"].image_size
    features = partial(extract_features, domain_net, image_size=size, device=ctx.device)  # images -> (N, D)
    floors, dom_test, dom_ref_a, ref_b = _domain_references(features, ctx.splits, train_subset, ctx.n_gen, ctx.seed)
    dom = DomainSpace(features, dom_test, dom_ref_a, ref_b, floors["val_vs_train"]["n"], train_mu)
    block = {**_domain_block(domain_net, domain_info, features_path, floors, len(ctx.splits.test.images), ctx.n_gen),
             "decoder_floor": decoder_floor(ctx, dom, ctx.model, recons)}
    return block, dom


# ---------------------------------------------------------------------------------------------
# Samplers: fit and draw (and save the grids), then score
# ---------------------------------------------------------------------------------------------

def _select_samplers(run_dir: Path, model: nn.Module, samplers: Optional[Sequence[str]]):
    """-> (sampler names, the learned prior or None, why it was skipped or None). By default every
    sampler, the learned ones only if the run has a finished prior; asked for explicitly, a missing
    or unfinished prior is an error."""
    if samplers is not None:
        unknown = sorted(set(samplers) - set(SAMPLERS))
        if unknown:
            raise SpatialVAEError(f"unknown sampler(s) {unknown}: choose from {', '.join(SAMPLERS)}")
        prior = load_prior(run_dir, model.latent_shape) if set(LEARNED) & set(samplers) else None
        return list(samplers), prior, None
    prior, note = None, None
    try:
        prior = load_prior(run_dir, model.latent_shape) if prior_path(run_dir).is_file() else None
    except SpatialVAEError as e:
        note = str(e)
    return [n for n in SAMPLERS if prior is not None or n not in LEARNED], prior, note


def _training_latents(ctx: EvalContext, names: Sequence[str], for_domain: bool) -> Optional[torch.Tensor]:
    """Posterior means of the training split (N, *latent_shape), when a fitted sampler or the
    decoder's floor needs them; else None."""
    if not for_domain and all(n == "standard_normal" or n in LEARNED for n in names):
        return None
    return encode_originals(ctx.model, ctx.splits.train, ctx.batch_size, ctx.device, ctx.progress)


def sampler_labels(name: str, train_labels: torch.Tensor, n: int, seed: int) -> Optional[torch.Tensor]:
    """Labels a conditional row asks for: those of a seeded subset of the training split (its class
    mix); the label-free row asks for label 2 (no label); unconditional rows for none."""
    if name == "learned_label_free":
        return torch.full((n,), len(CLASSES), dtype=torch.long)
    if name in ("gaussian_per_class", "gmm_per_class", "learned"):
        if n <= len(train_labels):
            return train_labels[seeded_subset(len(train_labels), n, seed)].long()
        return train_labels.long()[torch.randint(len(train_labels), (n,), generator=torch.Generator().manual_seed(seed))]
    return None


def _fit_sampler(name: str, model: nn.Module, seed: int, prior, train_mu, train_labels):
    """The sampler behind an evaluate row: N(0, I), the learned prior, or a Gaussian / GMM fitted to
    the training latents (``*_per_class``: one per class)."""
    if name == "standard_normal":
        return StandardNormalSampler(model.latent_shape)
    if name in LEARNED:
        return prior
    return fit_sampler(name.removesuffix("_per_class"), train_mu, train_labels if name.endswith("_per_class") else None, seed)


def _draw(ctx: EvalContext, name: str, prior, train_mu: Optional[torch.Tensor]) -> tuple[object, torch.Tensor, torch.Tensor, dict]:
    """Fit one sampler and draw n_gen images -> (sampler, their latents (n_gen, *latent_shape), the
    images (n_gen, 1, S, S), the start of its row: what it is, its times, whether it is conditional).
    The latents, so another decoder can draw the very same samples (`smooth_decoder_block`)."""
    train_labels, n_gen, seed = ctx.splits.train.labels, ctx.n_gen, ctx.seed
    t0 = time.perf_counter()
    sampler = _fit_sampler(name, ctx.model, seed, prior, train_mu, train_labels)
    fit_seconds = time.perf_counter() - t0 if name not in LEARNED else prior.train_seconds
    labels = sampler_labels(name, train_labels, n_gen, seed)
    t0 = time.perf_counter()
    kwargs = {} if labels is None else {"labels": labels}
    latents = sampler.sample(n_gen, generator=torch.Generator().manual_seed(seed), **kwargs)  # as `generate` draws
    images = decode_latents(ctx.model, latents, ctx.batch_size)
    row = {"sampler": sampler.describe(), "fit_seconds": round(fit_seconds, 2),
           "sample_seconds": round(time.perf_counter() - t0, 2), "conditional": labels is not None}
    return sampler, latents, images, row


def _class_grids(ctx: EvalContext, sampler, name: str) -> dict:
    """32 samples of each class from a class-conditional sampler -> {NAME_CLASS: samples/eval_NAME_CLASS.png}."""
    out = {}
    for k, cls in enumerate(CLASSES):
        labels = torch.full((32,), k, dtype=torch.long)
        images = generate(ctx.model, sampler, 32, torch.Generator().manual_seed(ctx.seed), ctx.batch_size, labels=labels)
        key = f"{name}_{cls.lower()}"
        out[key] = _save_eval_grid(ctx, images, key)
    return out


def _sampler_pictures(ctx: EvalContext, name: str, sampler, images: torch.Tensor, conditional: bool) -> dict:
    """A sampler's grid of its first 64 images, and one per class for a class-conditional one -> {name: path}."""
    pictures = {name: _save_eval_grid(ctx, images[:64], name)}
    if conditional and name != "learned_label_free":
        pictures.update(_class_grids(ctx, sampler, name))
    return pictures


def _inception_scores(ctx: EvalContext, inception: Optional[tuple], images: torch.Tensor, name: str) -> dict:
    """FID / KID of images (n, 1, S, S) against the test split's Inception features; nulls without
    Inception. ``inception``: (the network, the test split's features) or None."""
    if inception is None:
        return {"fid": None, "kid_mean": None, "kid_std": None}
    net, test_feats = inception
    feats = inception_features(net, images, ctx.batch_size, ctx.device, ctx.progress, f"inception {name}")  # (n, 2048)
    return fid_kid(test_feats, feats, ctx.seed)


def _domain_scores(fake: torch.Tensor, test_feats: torch.Tensor, ref_a_feats: torch.Tensor, n_val: int,
                   seed: int) -> dict:
    """Domain FD / KID of a sampler's X-ray features fake (n, D): against test, against training half A,
    and against A at the validation row's n (``n_val`` images, the row's own comparison)."""
    dom = domain_fd_kid(test_feats, fake, seed)
    dom_tr = domain_fd_kid(ref_a_feats, fake[:len(ref_a_feats)], seed)
    pick = torch.randperm(len(fake), generator=torch.Generator().manual_seed(seed))[:n_val]  # rows are in label order
    at_val_n = domain_fd_kid(ref_a_feats[:n_val], fake[pick], seed)["fd"] if n_val else None
    return {"domain_fd": dom["fd"], "domain_kid_mean": dom["kid_mean"], "domain_kid_std": dom["kid_std"],
            "domain_fd_vs_train": dom_tr["fd"], "domain_kid_vs_train": dom_tr["kid_mean"],
            "domain_fd_vs_train_at_val_n": at_val_n}


def _sample_metrics(images: torch.Tensor, train_images: torch.Tensor, seed: int) -> dict:
    dist, _ = nearest_neighbour(images, train_images)
    return {"ms_ssim_diversity": pairwise_ms_ssim(images, seed=seed), "nn_train_rmse": summarize(dist)}


def _score_samples(ctx: EvalContext, name: str, images: torch.Tensor, inception: Optional[tuple] = None,
                   dom: Optional[DomainSpace] = None) -> dict:
    """One sampler's images (n, 1, S, S) -> their scores: FID/KID (Inception), domain FD/KID (in ``dom``,
    see `_domain_scores`), diversity, memorisation."""
    row = _inception_scores(ctx, inception, images, name)
    if dom is not None:
        row.update(_domain_scores(dom.features(images), dom.test, dom.ref_a, dom.n_val, ctx.seed))
    return {**row, **_sample_metrics(images, ctx.splits.train.images, ctx.seed)}


def _sampler_rows(ctx: EvalContext, names: Sequence[str], prior, train_mu: Optional[torch.Tensor], score,
                  keep: Sequence[str] = ("learned",)) -> tuple[dict, dict, dict, dict, dict]:
    """Each sampler in turn: fit and draw (collecting its grids), then score its images with ``score(name,
    images)`` -> ({name: row}, {name: fitted sampler}, {grid name: path}, {name: its first 8 images},
    {name in ``keep``: (latents, images)}: all it drew, for the sharpness block)."""
    rows, fitted, pictures, tiles, drawn = {}, {}, {}, {}, {}
    for name in names:
        sampler, latents, images, row = _draw(ctx, name, prior, train_mu)
        pictures.update(_sampler_pictures(ctx, name, sampler, images, row["conditional"]))
        rows[name], fitted[name], tiles[name] = {**row, **score(name, images)}, sampler, images[:8]
        if name in keep:
            drawn[name] = (latents, images)
    return rows, fitted, pictures, tiles, drawn


# ---------------------------------------------------------------------------------------------
# Usefulness: train on synthetic, test on real (spatialvae.tstr)
# ---------------------------------------------------------------------------------------------

def tstr_block(ctx: EvalContext, samplers: dict, per_class: int, repeats: int = 3) -> dict:
    """Train-on-synthetic, test-on-real for the class-conditional samplers (see `spatialvae.tstr`)."""
    model, splits, batch_size = ctx.model, ctx.splits, ctx.batch_size

    def source(sampler):
        return lambda labels, s: generate(model, sampler, len(labels), torch.Generator().manual_seed(s), batch_size,
                                          labels=labels)

    gens = {name: source(samplers[name]) for name in TSTR_SOURCES if name in samplers}
    real_val = LabelledImages(splits.val.images, splits.val.labels)
    log = (lambda msg: print(msg, file=sys.stderr, flush=True)) if ctx.progress else (lambda msg: None)
    return run_tstr(LabelledImages(splits.train.images, splits.train.labels), real_val,
                    LabelledImages(splits.test.images, splits.test.labels), gens, per_class=per_class, seed=ctx.seed,
                    log=log, repeats=repeats)


# ---------------------------------------------------------------------------------------------
# Classifier two-sample test (spatialvae.c2st)
# ---------------------------------------------------------------------------------------------

def _pick_in_mix(labels: torch.Tensor, k: int, shares: torch.Tensor, seed: int) -> torch.Tensor:
    """Up to k seeded indices (sorted), each class's ``shares`` of them where the classes have enough,
    the rest from the other images."""
    perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    first = torch.cat([perm[labels[perm] == c][:round(k * float(share))] for c, share in enumerate(shares)])
    rest = perm[~torch.isin(perm, first)][:k - len(first)]
    return torch.cat([first, rest]).sort().values


def _c2st_reference(splits, d: DataConfig, k: int, seed: int,
                    progress: bool) -> tuple[torch.Tensor, torch.Tensor, str]:
    """Up to k real images the VAE never trained on, in the training split's class mix where possible
    -> (uint8 (N, S, S), labels (N,), source). ``train_unused``: training-split files a capped run left
    out (none of their patients trained it), decoded like the run's own (and cached); else ``val``."""
    labels = splits.train.labels.long()
    shares = torch.bincount(labels, minlength=len(CLASSES)).float() / len(labels)
    unused = unused_train_files(d, splits.train.plan)
    if len(unused) >= 2 * MIN_PER_SIDE:
        pick = _pick_in_mix(torch.tensor([e.label for e in unused]), k, shares, seed)
        got = load_split([unused[i] for i in pick.tolist()], d.image_size, d.clahe_clip, d.clahe_tiles, d.cache_dir,
                         True, d.preprocess_workers, progress, desc="train-unused")
        return torch.from_numpy(got.images), torch.from_numpy(got.labels), "train_unused"
    val = splits.val
    pick = _pick_in_mix(val.labels.long(), k, shares, seed)
    return val.images[pick], val.labels[pick], "val"


def _halves_by_class(labels: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two disjoint seeded halves with the same number of images of each class (an odd one out is dropped)."""
    g = torch.Generator().manual_seed(seed)
    a, b = [], []
    for c in range(len(CLASSES)):
        idx = (labels == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        a.append(idx[:len(idx) // 2])
        b.append(idx[len(idx) // 2:2 * (len(idx) // 2)])
    return torch.cat(a), torch.cat(b)


def _c2st_row(fake: torch.Tensor, real: torch.Tensor, source: str, what: str, seed: int, device,
              progress: bool) -> dict:
    # At the run's own resolution: a 128 px run's missing fine texture is what the test should see.
    # Both sides 8-bit, as the real images are (and as a saved PNG would be): continuous decoder
    # output against multiples of 1/255 would be a tell that says nothing about the images.
    fake, real = (x.float().mul(255).round().div(255) for x in (fake, real))
    res = classifier_two_sample_test(fake, real, seed=seed, image_size=None, device=device, progress=progress)
    return {**res, "reference": source, "fake": what}


def c2st_block(ctx: EvalContext, d: DataConfig, prior) -> dict:
    """Classifier two-sample tests against real images the VAE never trained on (`_c2st_reference`):
    2 * n_gen of them split into halves A and B with the same class counts; B is the real side of
    both tests. ``reconstructions``: the decoded posterior means of A (other images than B, so the
    classifier cannot match pairs); ``learned``: the learned prior's samples with B's labels."""
    seed, model = ctx.seed, ctx.model
    images, labels, source = _c2st_reference(ctx.splits, d, 2 * ctx.n_gen, seed, ctx.progress)
    a, b = _halves_by_class(labels.long(), seed)
    if len(b) < MIN_PER_SIDE:
        return {"skipped": f"{len(images)} real images the VAE never trained on ({source}) give {len(b)} a side; "
                           f"the test needs {MIN_PER_SIDE} (raise n_samples or use more data)"}
    real = as_float_images(images[b])
    row = partial(_c2st_row, real=real, source=source, seed=seed, device=ctx.device, progress=ctx.progress)
    out = {"reference": {"source": source, "n": len(b),
                         "class_counts": {c: int((labels[b] == i).sum()) for i, c in enumerate(CLASSES)}},
           "note": "held-out accuracy of a small CNN telling fake from real: 0.5 = indistinguishable, 1 = always told "
                   "apart; p_value is one-sided against 0.5"}
    recons = decode_latents(model, encode_dataset(model, as_float_images(images[a]), ctx.batch_size))
    out["reconstructions"] = row(recons, what="reconstructions (posterior mean) of the other half")
    if prior is None:
        out["learned"] = {"accuracy": None, "skipped": "the learned sampler was not evaluated (no finished checkpoints/prior.pt, or not among samplers)"}
    else:
        fake = generate(model, prior, len(b), torch.Generator().manual_seed(seed), ctx.batch_size,
                        labels=labels[b].long())
        out["learned"] = row(fake, what="learned prior samples with the real half's labels")
    return out


# ---------------------------------------------------------------------------------------------
# Sharpness, and the smooth decoder beside the sharp one (spatialvae.texture_run)
# ---------------------------------------------------------------------------------------------

BLURS = ((0.5, 5), (1.0, 7))  # (sigma in px, kernel size): the blur references a decoder's detail is read against
_SHARPNESS_NOTE = ("ratios generated / real of the mean spectral power in radial bands (units of Nyquist) and of "
                   "the mean Laplacian variance, both sides 8-bit: 1 = as much fine detail as real images. "
                   "reconstructions: the test split's (posterior mean) over their originals; learned: the learned "
                   "prior's samples over the validation split (its images in the training split's class mix); "
                   "reference_real: those validation images over the test split (two real sets of other patients: "
                   "how far from 1 real images land); blur_sigma_S: the test originals after a Gaussian blur of "
                   "sigma S px, over themselves")


def _decoder_sharpness(recons: torch.Tensor, test: torch.Tensor, learned: Optional[torch.Tensor],
                       val: torch.Tensor) -> dict:
    """One decoder's sharpness: its test reconstructions (N, 1, S, S) against their originals ``test``, and
    its learned-prior samples (or None) against the validation split ``val``."""
    return {"reconstructions": sharpness_ratios(recons, test),
            "learned": sharpness_ratios(learned, val) if learned is not None and len(val) else None}


def sharpness_references(test: torch.Tensor, val: torch.Tensor) -> dict:
    """What real and slightly blurred images score: the validation split against the test split (None
    without validation images), and the test images blurred (`BLURS`) against themselves."""
    refs = {"reference_real": sharpness_ratios(val, test) if len(val) else None}
    for sigma, k in BLURS:
        refs[f"blur_sigma_{sigma:g}"] = sharpness_ratios(gaussian_blur(test, [k, k], [sigma, sigma]), test)
    return refs


def _smooth_decoder(run_dir: Path, decoder: str, device) -> tuple[Optional[nn.Module], Path]:
    """The run's smooth decoder (best.pt) when the sharp one is evaluated and best.pt is there -> (model or
    None, best.pt's path)."""
    path = decoder_checkpoint(run_dir, "smooth")
    if decoder != "sharp" or not path.is_file():
        return None, path
    return load_model(path, device)[0], path


def smooth_decoder_block(ctx: EvalContext, smooth: tuple, learned_latents: Optional[torch.Tensor], val: torch.Tensor,
                         dom: Optional[DomainSpace]) -> tuple[dict, torch.Tensor]:
    """The smooth decoder's scores beside the sharp one's: test PSNR / SSIM / L1 (posterior mean, as the
    reconstruction block), its sharpness for its reconstructions and for the learned prior's very
    latents the sharp decoder drew, and its decoder floor in ``dom`` (None without a features file).
    ``smooth``: (its model, best.pt's path) -> (block, its test reconstructions (N, 1, S, S))."""
    model, path = smooth
    test_u8 = ctx.splits.test.images
    rec, recons = reconstruction_metrics(model, test_u8, ctx.splits.test.labels, ctx.batch_size)
    learned = None if learned_latents is None else decode_latents(model, learned_latents, ctx.batch_size)
    block = {"checkpoint": str(path), **{k: rec["overall"][k] for k in ("psnr_db", "ssim", "l1")},
             "sharpness": _decoder_sharpness(recons, as_float_images(test_u8), learned, val),
             "decoder_floor": decoder_floor(ctx, dom, model, recons) if dom is not None else None}
    return block, recons


def _texture_pictures(ctx: EvalContext, smooth: nn.Module, smooth_recons: torch.Tensor, sharp_recons: torch.Tensor,
                      prior) -> dict:
    """Before and after the texture stage, full size: 8 test originals above their smooth and then their
    sharp (``ctx.model``) reconstructions; with the learned prior, per class 8 latents decoded smooth
    (top row) and sharp (bottom row) -> {name: path}."""
    test_u8, seed = ctx.splits.test.images, ctx.seed
    pick = _class_balanced_indices(ctx.splits.test.labels, 8, seed)
    sheet = torch.cat([as_float_images(test_u8[pick]), smooth_recons[pick], sharp_recons[pick]])  # (3k, 1, S, S)
    pictures = {"texture_reconstructions": _save_eval_grid(ctx, sheet, "texture_reconstructions", nrow=len(pick))}
    if prior is None:
        return pictures
    for k, cls in enumerate(CLASSES):
        labels = torch.full((8,), k, dtype=torch.long)
        z = prior.sample(8, generator=torch.Generator().manual_seed(seed), labels=labels)  # (8, *latent_shape)
        both = torch.cat([decode_latents(smooth, z, ctx.batch_size), decode_latents(ctx.model, z, ctx.batch_size)])
        pictures[f"texture_learned_{cls}"] = _save_eval_grid(ctx, both, f"texture_learned_{cls}")
    return pictures


def _sharpness_evaluation(ctx: EvalContext, decoder: str, smooth: tuple, recons: torch.Tensor,
                          learned: Optional[tuple], prior, dom: Optional[DomainSpace]) -> tuple[dict, Optional[dict], dict]:
    """metrics.json's sharpness block for the evaluated decoder, and with a sharp one the smooth decoder's
    block and the before / after pictures -> (sharpness, smooth_decoder or None, {name: path}).
    ``smooth``: (its model or None, best.pt's path); ``learned``: (latents, images) the learned prior
    drew for its row, or None."""
    splits = ctx.splits
    latents, images = learned if learned is not None else (None, None)
    test = as_float_images(splits.test.images)  # (N, 1, S, S)
    # The samples follow the training split's class mix and the classes differ in detail: the validation
    # images they are read against follow the same mix.
    val_pick = _val_in_train_mix(splits.val.labels, splits.train.labels, len(splits.val.labels), ctx.seed)
    val = as_float_images(splits.val.images[val_pick])  # (M, 1, S, S)
    sharpness = {"decoder": decoder, **_decoder_sharpness(recons, test, images, val),
                 **sharpness_references(test, val), "note": _SHARPNESS_NOTE}
    if decoder != "sharp":
        return sharpness, None, {}
    if smooth[0] is None:
        return sharpness, {"skipped": f"no smooth decoder to compare with ({smooth[1]} is missing)"}, {}
    block, smooth_recons = smooth_decoder_block(ctx, smooth, latents, val, dom)
    pictures = _texture_pictures(ctx, smooth[0], smooth_recons, recons, prior)
    return sharpness, block, pictures


# ---------------------------------------------------------------------------------------------
# The evaluation
# ---------------------------------------------------------------------------------------------

def _checkpoint_path(run_dir: Path, checkpoint: str) -> Path:
    """The file a ``checkpoint`` name means: auto = sharp.pt when the run has one, else best.pt; sharp (an
    error without one); smooth = best.pt; best; last; anything else is a path."""
    if checkpoint == "auto" or checkpoint in DECODERS:
        return decoder_checkpoint(run_dir, None if checkpoint == "auto" else checkpoint)
    if checkpoint in ("best", "last"):
        return RunDir(run_dir).checkpoint(checkpoint)
    return Path(checkpoint)


def decoder_name(ckpt: dict) -> str:
    """Which decoder a checkpoint holds: sharp for a texture stage's export (it records the stage), else smooth."""
    return "sharp" if "texture" in ckpt else "smooth"


def _load_feature_file(features_path) -> tuple:
    """The X-ray feature extractor (domain FD) from a `features` file, or (None, None)."""
    if features_path is None:
        return None, None
    return load_feature_net(features_path)


def _evaluation_data(cfg, n_samples: Optional[int], progress: bool):
    """The run's splits and the number of images per sampler."""

    splits = make_datasets(cfg.data, seed=cfg.train.seed, progress=progress)
    n_gen = int(n_samples) if n_samples is not None else len(splits.test.images)
    if n_gen < 2:
        raise SpatialVAEError(f"n_samples={n_gen}: need at least 2 generated images for the metrics")
    return splits, n_gen


def _run_header(ctx: EvalContext, cfg, ckpt_path: Path, ckpt: dict, n_samples: Optional[int]) -> dict:
    """What was evaluated: run, checkpoint (and its decoder), config, device, data and the number of samples."""
    splits = ctx.splits
    return {
        "run_dir": str(ctx.run_dir),
        "checkpoint": {"path": str(ckpt_path), "epoch": int(ckpt.get("epoch", 0))},
        "decoder": decoder_name(ckpt),
        "preset": cfg.preset,
        "architecture": cfg.model.architecture,
        "image_size": cfg.data.image_size,
        "latent_shape": list(ctx.model.latent_shape),
        "perceptual_mode": perceptual_mode(cfg),
        "device": str(ctx.device),
        "data": {"root": str(splits.train.plan.root), "n_train": len(splits.train.images),
                 "n_test": len(splits.test.images), "test_counts": splits.test.class_counts()},
        "n_generated": ctx.n_gen,
        "n_generated_note": ("images per sampler, " + ("the size of the test split (default)"
                                                       if n_samples is None else "set by n_samples")),
    }


_INCEPTION_NOTES = {"features": "InceptionV3 pool3 (2048), torch-fidelity weights via torchmetrics; "
                                "grayscale repeated to RGB, (x * 255).byte() as normalize=True does",
                    "fid_note": "FID is biased upward at small N: compare runs only at equal N"}
_NOTES = {
    "ms_ssim_diversity": "mean MS-SSIM over all pairs of a seeded subset of up to 50 images; lower = more "
                         "diverse; compare with reference.test_ms_ssim_diversity",
    "nn_train_rmse": "pixel RMSE to the nearest training image (either orientation); samples much closer "
                     "than reference.test_nn_train_rmse suggest memorisation",
}


def evaluate_run(run_dir: str | os.PathLike, data_root: str | os.PathLike | None = None,
                 options: Optional[EvalOptions] = None, **overrides) -> dict:
    """Evaluate a run folder; writes ``run_dir/metrics.json`` (atomically) and returns its dict.

    data_root: overrides the dataset folder stored in the run's config (the splits, image size and
    preprocessing stay the run's). ``options`` (`EvalOptions`), or its fields as keywords, e.g.
    ``evaluate_run(run, checkpoint="best", samplers=["learned"], features_path="xray_features.pt")``.
    """
    opts = replace(options or EvalOptions(), **overrides)
    t_start = time.perf_counter()
    run = _open_run(Path(run_dir), data_root, opts)
    ctx = run.ctx
    recon, recons = _reconstruction_row(ctx)  # recons (n_test, 1, S, S)
    pictures, recon_tiles = _reconstruction_pictures(ctx, recons)
    train_subset = seeded_subset(len(ctx.splits.train.images), ctx.n_gen, ctx.seed)
    reference, inception_test = _real_references(ctx, train_subset, run.inception_net)
    train_mu = _training_latents(ctx, run.samplers, run.domain_net is not None)
    domain, dom = None, None
    if run.domain_net is not None:
        domain, dom = _domain_evaluation(ctx, run.domain_net, run.domain_info, opts.features_path, train_subset,
                                         train_mu, recons)
    inception = (run.inception_net, inception_test) if run.inception_net is not None else None
    score = partial(_score_samples, ctx, inception=inception, dom=dom)
    rows, fitted, sampler_pictures, tiles, drawn = _sampler_rows(ctx, run.samplers, run.prior, train_mu, score)
    tstr = None
    if opts.tstr_per_class > 0 and any(n in fitted for n in TSTR_SOURCES):
        tstr = tstr_block(ctx, fitted, opts.tstr_per_class, opts.tstr_repeats)
    c2st_res = c2st_block(ctx, run.cfg.data, fitted.get("learned")) if opts.c2st else None
    sharpness, smooth_block, texture_pictures = _sharpness_evaluation(
        ctx, run.decoder, run.smooth, recons, drawn.get("learned"), run.prior, dom)
    metrics = {
        **_run_header(ctx, run.cfg, run.ckpt_path, run.ckpt, opts.n_samples),
        "reconstruction": recon,
        "floors": linear_floors(ctx.splits.train.images, ctx.splits.test.images, int(math.prod(ctx.model.latent_shape))),
        "inception": {"weights": run.inception_weights, **_INCEPTION_NOTES},
        "reference": reference, "domain": domain, "samplers": rows, "tstr": tstr, "c2st": c2st_res,
        "sharpness": sharpness, **({"smooth_decoder": smooth_block} if smooth_block is not None else {}),
        "images": {**pictures, **sampler_pictures, **texture_pictures}, "notes": _NOTES,
        **({"inception_unavailable": run.inception_reason} if run.inception_reason is not None else {}),
        **({"learned_prior_unavailable": run.prior_note} if run.prior_note is not None else {}),
    }
    metrics["seconds"] = round(time.perf_counter() - t_start, 2)
    tensors = {"reconstructions": recon_tiles, **tiles}
    return _write_results(ctx.run_dir, ctx.grids, tensors, metrics)


def _write_results(run_dir: Path, grids: dict, tensors: dict, metrics: dict) -> dict:
    """The grids, eval_images.pt and metrics.json, metrics last: a write that fails leaves the previous
    metrics.json, and the one line says so (the measurements themselves are lost with the process)."""
    with on_disk_full(f"the run's checkpoints are untouched and {run_dir / 'metrics.json'} is as before",
                      f"free space, then `python -m spatialvae evaluate --run {run_dir}` again"):
        _write_grids(grids, run_dir)
        atomic_torch_save({k: (v * 255).round().to(torch.uint8) for k, v in tensors.items()},
                          eval_images_path(run_dir))
        return _write_metrics(run_dir, metrics)


def _json_safe(x):
    """NaN/inf -> None, tuples -> lists, so json.dumps(allow_nan=False) succeeds."""
    if isinstance(x, dict):
        return {str(k): _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def _write_metrics(run_dir: Path, metrics: dict) -> dict:
    """NaN/inf -> null, then run_dir/metrics.json atomically; returns what was written."""

    metrics = _json_safe(metrics)
    atomic_write_bytes(RunDir(run_dir).metrics, (json.dumps(metrics, indent=2, allow_nan=False) + "\n").encode())
    return metrics


def eval_images_path(run_dir: str | os.PathLike) -> Path:
    return RunDir(run_dir).samples / "eval_images.pt"


def read_metrics(path: str | os.PathLike) -> dict:
    """A metrics.json as `evaluate_run` writes it today: sampler names of older files are read as
    the current ones (`spatialvae.sampling.OLD_SAMPLER_NAMES`), here and nowhere else."""
    metrics = json.loads(Path(path).read_text())
    for section in ("samplers", "tstr"):
        if isinstance(metrics.get(section), dict):
            metrics[section] = {OLD_SAMPLER_NAMES.get(k, k): v for k, v in metrics[section].items()}
    return metrics


def load_eval_images(run_dir: str | os.PathLike) -> dict:
    """The first tiles of the last evaluation's grids ({"reconstructions": 8 originals above their
    8 reconstructions, sampler name: 8 samples}, (N, 1, S, S) float in [0, 1]); {} when there are none.
    Read with ``weights_only``: nothing in the file is executed."""
    path = eval_images_path(run_dir)
    if not path.is_file():
        return {}
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a damaged file only costs its pictures
        warnings.warn(f"cannot read {path} ({short_reason(e)}); run `evaluate` again to redraw its pictures")
        return {}
    if not isinstance(saved, dict):
        return {}
    return {OLD_SAMPLER_NAMES.get(k, k): v.float() / 255 for k, v in saved.items() if isinstance(v, torch.Tensor)}
