"""Evaluation of a trained run: reconstruction, sample quality, diversity, memorisation.

``evaluate_run(run_dir)`` loads a checkpoint, rebuilds its config, model and data splits, and
writes ``run_dir/metrics.json`` plus sample grids under ``run_dir/samples/eval_*.png``:

* reconstruction of the test split (decoding the posterior mean): SSIM, PSNR, L1, overall and
  per class;
* sample quality for each sampler (``standard_normal`` = N(0, I), ``aggregate_posterior`` = a Gaussian
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
  since training used horizontal flips), next to the same distance for test images.

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
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import nn

from .c2st import MIN_PER_SIDE, classifier_two_sample_test
from .config import DataConfig, perceptual_mode
from .data import CLASSES, as_float_images, load_split, make_datasets, seeded_subset, unused_train_files
from .engine import default_device
from .errors import SpatialVAEError, short_reason
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
    psnr,
    reconstruction_scores,
    ssim_score,
    summarize,
)
from .prior import load_prior, prior_path
from .runs import atomic_torch_save, atomic_write_bytes, load_model
from .sampling import (
    StandardNormalSampler,
    decode_latents,
    encode_dataset,
    encode_originals,
    fit_sampler,
    generate,
    interpolate,
    save_grid,
)
from .tstr import LabelledImages, run_tstr
from .viz import interleave_rows

# Unconditional, then class-conditional (one fit per class, or the learned prior with labels, drawn
# in the training class mix); learned_label_free is the learned prior's label-free model.
SAMPLERS = ("standard_normal", "aggregate_posterior", "gmm", "aggregate_posterior_per_class", "gmm_per_class", "learned",
            "learned_label_free")
LEARNED = ("learned", "learned_label_free")  # need the run's checkpoints/prior.pt
TSTR_SOURCES = ("aggregate_posterior_per_class", "gmm_per_class", "learned")  # class-conditional samplers


# ---------------------------------------------------------------------------------------------
# Pieces of evaluate_run
# ---------------------------------------------------------------------------------------------

def _checkpoint_path(run_dir: Path, checkpoint: str) -> Path:
    if checkpoint in ("best", "last"):
        return run_dir / "checkpoints" / f"{checkpoint}.pt"
    return Path(checkpoint)


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


def _sample_metrics(images: torch.Tensor, train_images: torch.Tensor, seed: int) -> dict:
    dist, _ = nearest_neighbour(images, train_images)
    return {"ms_ssim_diversity": pairwise_ms_ssim(images, seed=seed), "nn_train_rmse": summarize(dist)}


def _json_safe(x):
    """NaN/inf -> None, tuples -> lists, so json.dumps(allow_nan=False) succeeds."""
    if isinstance(x, dict):
        return {str(k): _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def sampler_labels(name: str, train_labels: torch.Tensor, n: int, seed: int) -> Optional[torch.Tensor]:
    """Labels a conditional row asks for: those of a seeded subset of the training split (its class
    mix); the label-free row asks for label 2 (no label); unconditional rows for none."""
    if name == "learned_label_free":
        return torch.full((n,), len(CLASSES), dtype=torch.long)
    if name in ("aggregate_posterior_per_class", "gmm_per_class", "learned"):
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
    base = name.removesuffix("_per_class")
    kind = "gaussian" if base == "aggregate_posterior" else base
    return fit_sampler(kind, train_mu, train_labels if name.endswith("_per_class") else None, seed)


def _class_grids(model: nn.Module, sampler, name: str, out_dir: Path, seed: int, batch_size: int) -> dict:
    """32 samples of each class from a class-conditional sampler -> samples/eval_NAME_CLASS.png."""
    out = {}
    for k, cls in enumerate(CLASSES):
        labels = torch.full((32,), k, dtype=torch.long)
        images = generate(model, sampler, 32, torch.Generator().manual_seed(seed), batch_size, labels=labels)
        key = f"{name}_{cls.lower()}"
        save_grid(images, out_dir / f"eval_{key}.png")
        out[key] = f"samples/eval_{key}.png"
    return out


def decoder_floor(model: nn.Module, train_mu: torch.Tensor, ref_b: torch.Tensor, test_recons: torch.Tensor,
                  domain_net, size: int, dom_ref_a: torch.Tensor, seed: int, device) -> dict:
    """What a perfect latent sampler scores: FD vs train of the decoder's own images.

    ``fd_vs_train``: reconstructions of training images (the half not used as the reference,
    so the same N and images as the real train-vs-train floor): a sampler that reproduced the
    training latents exactly would score this. ``test_reconstructions_fd_vs_train``: the test
    split's reconstructions, which also carry the test split's shift from train (class mix)."""

    recon_b = decode_latents(model, train_mu[ref_b])
    fd_b = domain_fd_kid(dom_ref_a, extract_features(domain_net, recon_b, size, device=device), seed)
    fd_test = domain_fd_kid(dom_ref_a, extract_features(domain_net, test_recons, size, device=device), seed)
    return {"fd_vs_train": fd_b["fd"], "kid_vs_train": fd_b["kid_mean"], "n": len(ref_b),
            "test_reconstructions_fd_vs_train": fd_test["fd"]}


def tstr_block(model: nn.Module, samplers: dict, splits, test_u8: torch.Tensor, per_class: int, seed: int,
               batch_size: int, progress: bool, repeats: int = 3) -> dict:
    """Train-on-synthetic, test-on-real for the class-conditional samplers (see `spatialvae.tstr`)."""

    def source(sampler):
        return lambda labels, s: generate(model, sampler, len(labels), torch.Generator().manual_seed(s), batch_size,
                                          labels=labels)

    gens = {name: source(samplers[name]) for name in TSTR_SOURCES if name in samplers}
    real_val = LabelledImages(splits.val.images, splits.val.labels)
    log = (lambda msg: print(msg, file=sys.stderr, flush=True)) if progress else (lambda msg: None)
    return run_tstr(LabelledImages(splits.train.images, splits.train.labels), real_val,
                    LabelledImages(test_u8, splits.test.labels), gens, per_class=per_class, seed=seed, log=log,
                    repeats=repeats)


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


@dataclass
class _DomainRefs:
    """The X-ray feature extractor and the real images' features every sampler is compared with."""
    net: nn.Module
    size: int
    test_feats: torch.Tensor  # (n_test, D)
    ref_a: torch.Tensor  # indices of the training half used as the reference
    ref_b: torch.Tensor  # the other half (the real and the decoder's floors)
    ref_a_feats: torch.Tensor  # (len(ref_a), D)
    n_val: int  # images of the validation row: it and every sampler are compared at this n


def _val_in_train_mix(val_labels: torch.Tensor, train_labels: torch.Tensor, k: int, seed: int) -> torch.Tensor:
    """The most validation images (at most k) whose class counts follow the training split's mix:
    the extractor's features separate the classes, so a mix unlike train's would inflate the bar."""
    shares = torch.bincount(train_labels.long(), minlength=len(CLASSES)).float() / len(train_labels)
    counts = torch.bincount(val_labels.long(), minlength=len(CLASSES)).float()
    n = min([k] + [int(counts[c] / shares[c]) for c in range(len(CLASSES)) if shares[c] > 0])
    return _pick_in_mix(val_labels.long(), n, shares, seed)


def _domain_references(domain_net, domain_info: dict, features_path, train_u8: torch.Tensor, test_u8: torch.Tensor,
                       splits, train_subset: torch.Tensor, n_gen: int, seed: int,
                       device) -> tuple[_DomainRefs, dict]:
    """Features of the real references and the `domain` block of metrics.json (the real floors).

    The extractor is a classifier, so its features (and the FD) react strongly to the class mix.
    Two references: train vs test (what a perfect copy of the training distribution scores against
    the test split), two disjoint halves of train (the floor for FD against train itself), and the
    validation split (real held-out patients of the training distribution: the bar a sampler should
    meet, compared at the same number of images, since FD grows as n shrinks)."""

    size = domain_info["config"].image_size
    dom_test = extract_features(domain_net, test_u8, size, device=device)
    dom_train = extract_features(domain_net, train_u8[train_subset], size, device=device)
    half = len(train_u8) // 2
    perm = torch.randperm(len(train_u8), generator=torch.Generator().manual_seed(seed + 1))
    ref_a, ref_b = perm[:min(half, n_gen)], perm[half:half + min(half, n_gen)]
    dom_ref_a = extract_features(domain_net, train_u8[ref_a], size, device=device)
    dom_ref_b = extract_features(domain_net, train_u8[ref_b], size, device=device)
    val_pick = _val_in_train_mix(splits.val.labels, splits.train.labels, min(len(ref_a), n_gen), seed)
    n_val = len(val_pick)
    dom_val = extract_features(domain_net, splits.val.images[val_pick], size, device=device)
    val_counts = {c: int((splits.val.labels[val_pick] == i).sum()) for i, c in enumerate(CLASSES)}
    domain = {"features": str(features_path), "feature_dim": domain_net.num_features,
              "extractor_image_size": size, "extractor_test_accuracy": domain_info["test"]["accuracy"],
              "n_test": len(test_u8), "n_generated": n_gen, "n_train_reference": len(ref_a),
              "floor_train_vs_test": {"n_train": len(train_subset), **domain_fd_kid(dom_test, dom_train, seed)},
              "floor_train_vs_train": {"n": len(ref_a), **domain_fd_kid(dom_ref_a, dom_ref_b, seed)},
              "val_vs_train": {"n": n_val, "class_counts": val_counts,
                               **domain_fd_kid(dom_ref_a[:n_val], dom_val, seed)},
              "note_class_mix": "the extractor is a NORMAL/PNEUMONIA classifier: FD against test also measures "
                                "the class mix (test is 62.5% PNEUMONIA); domain_fd_vs_train compares with "
                                "the distribution the VAE was trained on"}
    if (note := feature_dim_ok(min(len(test_u8), n_gen), domain_net.num_features)):
        domain["note"] = note
    return _DomainRefs(domain_net, size, dom_test, ref_a, ref_b, dom_ref_a, n_val), domain


@dataclass
class _SampleScorer:
    """Scores one sampler's images: FID/KID (Inception), domain FD/KID, diversity, memorisation."""
    train_u8: torch.Tensor
    seed: int
    batch_size: int
    device: torch.device
    progress: bool
    inception: Optional[nn.Module]
    inception_test: Optional[torch.Tensor]
    domain: Optional[_DomainRefs]

    def score(self, name: str, images: torch.Tensor) -> dict:

        res: dict = {"fid": None, "kid_mean": None, "kid_std": None}
        if self.inception is not None:
            feats = inception_features(self.inception, images, self.batch_size, self.device, self.progress,
                                       f"inception {name}")
            res.update(fid_kid(self.inception_test, feats, self.seed))
        if self.domain is not None:
            d = self.domain
            fake = extract_features(d.net, images, d.size, device=self.device)
            dom = domain_fd_kid(d.test_feats, fake, self.seed)
            dom_tr = domain_fd_kid(d.ref_a_feats, fake[:len(d.ref_a)], self.seed)
            pick = torch.randperm(len(fake), generator=torch.Generator().manual_seed(self.seed))[:d.n_val]  # rows are in label order
            at_val_n = domain_fd_kid(d.ref_a_feats[:d.n_val], fake[pick], self.seed)["fd"] if d.n_val else None
            res.update({"domain_fd": dom["fd"], "domain_kid_mean": dom["kid_mean"], "domain_kid_std": dom["kid_std"],
                        "domain_fd_vs_train": dom_tr["fd"], "domain_kid_vs_train": dom_tr["kid_mean"],
                        "domain_fd_vs_train_at_val_n": at_val_n})
        return {**res, **_sample_metrics(images, self.train_u8, self.seed)}


def _load_feature_file(features_path) -> tuple:
    """The X-ray feature extractor (domain FD) from a `features` file, or (None, None)."""
    if features_path is None:
        return None, None
    return load_feature_net(features_path)


def _evaluation_data(cfg, data_root, n_samples: Optional[int], progress: bool):
    """The run's splits (``data_root`` overrides its folder) and the number of images per sampler."""

    if data_root is not None:
        cfg.data.root = str(data_root)
    splits = make_datasets(cfg.data, seed=cfg.train.seed, progress=progress)
    n_gen = int(n_samples) if n_samples is not None else len(splits.test.images)
    if n_gen < 2:
        raise SpatialVAEError(f"n_samples={n_gen}: need at least 2 generated images for the metrics")
    return splits, n_gen


def _write_metrics(run_dir: Path, metrics: dict) -> dict:
    """NaN/inf -> null, then run_dir/metrics.json atomically; returns what was written."""

    metrics = _json_safe(metrics)
    atomic_write_bytes(run_dir / "metrics.json", (json.dumps(metrics, indent=2, allow_nan=False) + "\n").encode())
    return metrics


def _reconstruction_block(model: nn.Module, test_u8: torch.Tensor, test_labels: torch.Tensor, batch_size: int,
                          seed: int, out_dir: Path, pictures: dict, tensors: dict) -> tuple[dict, torch.Tensor]:
    """Test reconstructions: metrics with identity, the reconstruction and interpolation grids."""
    recon, recons = reconstruction_metrics(model, test_u8, test_labels, batch_size)
    pick = _class_balanced_indices(test_labels, 16, seed)
    sheet = interleave_rows(as_float_images(test_u8[pick]), recons[pick])  # (32, 1, S, S)
    save_grid(sheet, out_dir / "eval_reconstructions.png")
    tensors["reconstructions"] = sheet[:16]  # 8 originals above their 8 reconstructions
    pictures["reconstructions"] = "samples/eval_reconstructions.png"
    save_grid(_interpolation_sheet(model, test_u8, test_labels, steps=8, n_pairs=4, seed=seed),
              out_dir / "eval_interpolation.png", nrow=10)
    pictures["interpolation"] = "samples/eval_interpolation.png"
    recon["identity"] = float(nearest_is_self(recons, as_float_images(test_u8)).float().mean())
    recon["test_images_with_a_duplicate"] = duplicate_count(as_float_images(test_u8))
    return recon, recons


def _real_references(splits, train_subset: torch.Tensor, net: Optional[nn.Module], seed: int, batch_size: int,
                     device, progress: bool) -> tuple[dict, Optional[torch.Tensor]]:
    """What real images score (diversity, distance to train, train-vs-test FID) -> (reference, test Inception features)."""
    train_u8, test_u8 = splits.train.images, splits.test.images
    reference = {
        "test_ms_ssim_diversity": pairwise_ms_ssim(as_float_images(test_u8), seed=seed),
        "test_nn_train_rmse": summarize(nearest_neighbour(test_u8, train_u8)[0]),
        "val_nn_train_rmse": summarize(nearest_neighbour(splits.val.images, train_u8)[0]) if len(splits.val) else None,
    }
    if net is None:
        reference["train_vs_test"] = {"n_train": len(train_subset), "fid": None, "kid_mean": None, "kid_std": None}
        return reference, None
    feats_test = inception_features(net, test_u8, batch_size, device, progress, "inception test")
    feats_train = inception_features(net, train_u8[train_subset], batch_size, device, progress, "inception train")
    reference["train_vs_test"] = {"n_train": len(train_subset), **fid_kid(feats_test, feats_train, seed)}
    return reference, feats_test


def _sampler_row(name: str, model: nn.Module, prior, train_mu: torch.Tensor, train_labels: torch.Tensor, n_gen: int,
                 scorer: "_SampleScorer", out_dir: Path, pictures: dict) -> tuple[object, dict, torch.Tensor]:
    """Fit one sampler, draw n_gen images, score them and save its grids -> (sampler, its row, the images)."""
    seed, batch_size = scorer.seed, scorer.batch_size
    t0 = time.perf_counter()
    sampler = _fit_sampler(name, model, seed, prior, train_mu, train_labels)
    fit_seconds = time.perf_counter() - t0 if name not in LEARNED else prior.train_seconds
    labels = sampler_labels(name, train_labels, n_gen, seed)
    t0 = time.perf_counter()
    images = generate(model, sampler, n_gen, torch.Generator().manual_seed(seed), batch_size,
                      labels=labels)  # (n, 1, S, S)
    row = {"sampler": sampler.describe(), "fit_seconds": round(fit_seconds, 2),
           "sample_seconds": round(time.perf_counter() - t0, 2), "conditional": labels is not None,
           **scorer.score(name, images)}
    save_grid(images[:64], out_dir / f"eval_{name}.png")
    pictures[name] = f"samples/eval_{name}.png"
    if labels is not None and name != "learned_label_free":
        pictures.update(_class_grids(model, sampler, name, out_dir, seed, batch_size))
    return sampler, row, images


def _run_header(run_dir: Path, ckpt_path: Path, ckpt: dict, cfg, model: nn.Module, device, splits, n_gen: int,
                n_samples: Optional[int]) -> dict:
    """What was evaluated: run, checkpoint, config, device, data and the number of samples."""

    return {
        "run_dir": str(run_dir),
        "checkpoint": {"path": str(ckpt_path), "epoch": int(ckpt.get("epoch", 0))},
        "preset": cfg.preset,
        "architecture": cfg.model.architecture,
        "image_size": cfg.data.image_size,
        "latent_shape": list(model.latent_shape),
        "perceptual_mode": perceptual_mode(cfg),
        "device": str(device),
        "data": {"root": str(splits.train.plan.root), "n_train": len(splits.train.images),
                 "n_test": len(splits.test.images), "test_counts": splits.test.class_counts()},
        "n_generated": n_gen,
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


# ---------------------------------------------------------------------------------------------
# The evaluation
# ---------------------------------------------------------------------------------------------

def evaluate_run(run_dir: str | os.PathLike, data_root: str | os.PathLike | None = None, checkpoint: str = "best",
                 n_samples: Optional[int] = None, features_path: str | os.PathLike | None = None,
                 device: torch.device | str | None = None, batch_size: int = 64, progress: bool = True,
                 inception: str = "auto", samplers: Optional[Sequence[str]] = None, seed: int = 0,
                 tstr_per_class: int = 300, tstr_repeats: int = 3, c2st: bool = True) -> dict:
    """Evaluate a run folder; writes ``run_dir/metrics.json`` (atomically) and returns its dict.

    checkpoint: "best", "last" or a path to a .pt file. data_root: overrides the dataset folder
    stored in the run's config (the splits, image size and preprocessing stay the run's).
    n_samples: images generated per sampler (default: the size of the test split). inception:
    "auto" | "off" | path to the FID Inception weights (see `load_inception`). samplers: any of
    `SAMPLERS` (default: all; the learned ones only when the run has ``checkpoints/prior.pt``).
    features_path: a file from `python -m spatialvae features`: adds the domain Fréchet distance and
    KID (per sampler, the real floors and the decoder's floor). tstr_per_class: images per class for
    train-on-synthetic-test-on-real (0 skips it). c2st: the classifier two-sample test of the learned
    prior's samples and of reconstructions, n_samples a side (see `c2st_block`; False skips it).
    seed: every random choice (samples, subsets, KID).
    """

    t_start = time.perf_counter()
    run_dir = Path(run_dir)
    device = default_device(device)
    ckpt_path = _checkpoint_path(run_dir, checkpoint)
    model, cfg, ckpt = load_model(ckpt_path, device)  # weights_only: nothing in the file is executed
    samplers, prior, prior_note = _select_samplers(run_dir, model, samplers)
    # Before the data and the model work: an explicit weights file that cannot be used fails fast.
    domain_net, domain_info = _load_feature_file(features_path)
    net, inception_weights, inception_reason = load_inception(inception)
    splits, n_gen = _evaluation_data(cfg, data_root, n_samples, progress)
    ctx = _Context(model, splits, device, seed, batch_size, progress, run_dir / "samples", {}, {})

    recon, recons = _reconstruction_block(model, splits.test.images, splits.test.labels, batch_size, seed,
                                          ctx.out_dir, ctx.pictures, ctx.tensors)
    train_subset = seeded_subset(len(splits.train.images), n_gen, seed)
    reference, feats_test = _real_references(splits, train_subset, net, seed, batch_size, device, progress)
    refs, domain = None, None
    if domain_net is not None:
        refs, domain = _domain_references(domain_net, domain_info, features_path, splits.train.images,
                                          splits.test.images, splits, train_subset, n_gen, seed, device)
    scorer = _SampleScorer(splits.train.images, seed, batch_size, device, progress, net, feats_test, refs)
    results, fitted = _sampler_rows(ctx, samplers, prior, scorer, n_gen, domain, recons)
    tstr = None
    if tstr_per_class > 0 and any(n in fitted for n in TSTR_SOURCES):
        tstr = tstr_block(model, fitted, splits, splits.test.images, tstr_per_class, seed, batch_size, progress,
                          tstr_repeats)
    c2st_res = c2st_block(ctx, cfg.data, fitted.get("learned"), n_gen) if c2st else None
    metrics = {
        **_run_header(run_dir, ckpt_path, ckpt, cfg, model, device, splits, n_gen, n_samples),
        "reconstruction": {"split": "test", "decoded": "posterior mean", **recon},
        "floors": linear_floors(splits.train.images, splits.test.images, int(math.prod(model.latent_shape))),
        "inception": {"weights": inception_weights, **_INCEPTION_NOTES},
        "reference": reference, "domain": domain, "samplers": results, "tstr": tstr, "c2st": c2st_res,
        "images": ctx.pictures, "notes": _NOTES,
        **({"inception_unavailable": inception_reason} if inception_reason is not None else {}),
        **({"learned_prior_unavailable": prior_note} if prior_note is not None else {}),
    }
    metrics["seconds"] = round(time.perf_counter() - t_start, 2)
    atomic_torch_save({k: (v * 255).round().to(torch.uint8) for k, v in ctx.tensors.items()}, eval_images_path(run_dir))
    return _write_metrics(run_dir, metrics)


def eval_images_path(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / "samples" / "eval_images.pt"


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
    return {k: v.float() / 255 for k, v in saved.items() if isinstance(v, torch.Tensor)} if isinstance(saved, dict) else {}


@dataclass
class _Context:
    """What every part of one evaluation shares."""
    model: nn.Module
    splits: object  # data.DataSplits
    device: torch.device
    seed: int
    batch_size: int
    progress: bool
    out_dir: Path  # run_dir/samples: the grids
    pictures: dict  # grid name -> path relative to the run folder (metrics.json "images")
    tensors: dict  # the first tiles of each grid, for figures drawn from tensors (samples/eval_images.pt)


def _sampler_rows(ctx: _Context, samplers: Sequence[str], prior, scorer: "_SampleScorer", n_gen: int,
                  domain: Optional[dict], recons: torch.Tensor) -> tuple[dict, dict]:
    """Fit, draw and score every sampler (and, with domain features, the decoder's floor, which needs
    the training latents too) -> ({name: row}, {name: fitted sampler})."""
    fitted_rows = [n for n in samplers if n != "standard_normal" and n not in LEARNED]  # they need the training latents
    train_mu = (encode_originals(ctx.model, ctx.splits.train, ctx.batch_size, ctx.device, ctx.progress)
                if fitted_rows or domain is not None else None)  # (N, *latent_shape)
    if domain is not None:
        refs = scorer.domain
        domain["decoder_floor"] = decoder_floor(ctx.model, train_mu, refs.ref_b, recons, refs.net, refs.size,
                                                refs.ref_a_feats, ctx.seed, ctx.device)
    results, fitted = {}, {}
    for name in samplers:
        fitted[name], results[name], images = _sampler_row(name, ctx.model, prior, train_mu, ctx.splits.train.labels,
                                                           n_gen, scorer, ctx.out_dir, ctx.pictures)
        ctx.tensors[name] = images[:8]
    return results, fitted




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


def _c2st_reference(ctx: _Context, d: DataConfig, k: int) -> tuple[torch.Tensor, torch.Tensor, str]:
    """Up to k real images the VAE never trained on, in the training split's class mix where possible
    -> (uint8 (N, S, S), labels (N,), source). ``train_unused``: training-split files a capped run left
    out (none of their patients trained it), decoded like the run's own (and cached); else ``val``."""
    labels = ctx.splits.train.labels.long()
    shares = torch.bincount(labels, minlength=len(CLASSES)).float() / len(labels)
    unused = unused_train_files(d, ctx.splits.train.plan)
    if len(unused) >= 2 * MIN_PER_SIDE:
        pick = _pick_in_mix(torch.tensor([e.label for e in unused]), k, shares, ctx.seed)
        got = load_split([unused[i] for i in pick.tolist()], d.image_size, d.clahe_clip, d.clahe_tiles, d.cache_dir,
                         True, d.preprocess_workers, ctx.progress, desc="train-unused")
        return torch.from_numpy(got.images), torch.from_numpy(got.labels), "train_unused"
    val = ctx.splits.val
    pick = _pick_in_mix(val.labels.long(), k, shares, ctx.seed)
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


def _c2st_row(ctx: _Context, fake: torch.Tensor, real: torch.Tensor, source: str, what: str) -> dict:
    # At the run's own resolution: a 128 px run's missing fine texture is what the test should see.
    # Both sides 8-bit, as the real images are (and as a saved PNG would be): continuous decoder
    # output against multiples of 1/255 would be a tell that says nothing about the images.
    fake, real = (x.float().mul(255).round().div(255) for x in (fake, real))
    res = classifier_two_sample_test(fake, real, seed=ctx.seed, image_size=None, device=ctx.device,
                                     progress=ctx.progress)
    return {**res, "reference": source, "fake": what}


def c2st_block(ctx: _Context, d: DataConfig, prior, n_gen: int) -> dict:
    """Classifier two-sample tests against real images the VAE never trained on (`_c2st_reference`):
    2 * n_gen of them split into halves A and B with the same class counts; B is the real side of
    both tests. ``reconstructions``: the decoded posterior means of A (other images than B, so the
    classifier cannot match pairs); ``learned``: the learned prior's samples with B's labels."""
    images, labels, source = _c2st_reference(ctx, d, 2 * n_gen)
    a, b = _halves_by_class(labels.long(), ctx.seed)
    if len(b) < MIN_PER_SIDE:
        return {"skipped": f"{len(images)} real images the VAE never trained on ({source}) give {len(b)} a side; "
                           f"the test needs {MIN_PER_SIDE} (raise n_samples or use more data)"}
    real = as_float_images(images[b])
    out = {"reference": {"source": source, "n": len(b),
                         "class_counts": {c: int((labels[b] == i).sum()) for i, c in enumerate(CLASSES)}},
           "note": "held-out accuracy of a small CNN telling fake from real: 0.5 = indistinguishable, 1 = always told "
                   "apart; p_value is one-sided against 0.5"}
    recons = decode_latents(ctx.model, encode_dataset(ctx.model, as_float_images(images[a]), ctx.batch_size))
    out["reconstructions"] = _c2st_row(ctx, recons, real, source, "reconstructions (posterior mean) of the other half")
    if prior is None:
        out["learned"] = {"accuracy": None, "skipped": "the learned sampler was not evaluated (no finished checkpoints/prior.pt, or not among samplers)"}
    else:
        fake = generate(ctx.model, prior, len(b), torch.Generator().manual_seed(ctx.seed), ctx.batch_size,
                        labels=labels[b].long())
        out["learned"] = _c2st_row(ctx, fake, real, source, "learned prior samples with the real half's labels")
    return out
