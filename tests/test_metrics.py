"""Per-image metrics, the linear floors and the sharpness ratios: closed-form values."""

from __future__ import annotations

import math

import pytest
import torch
from torchvision.transforms.functional import gaussian_blur

from spatialvae.lab.metrics import SHARPNESS_BANDS, band_power, nearest_is_self, pca_reconstruct, sharpness_ratios
from spatialvae.scores import PSNR_CAP_DB, psnr

torch.set_num_threads(2)


def test_psnr_closed_form_and_cap():
    x = torch.full((2, 1, 4, 4), 0.5)
    assert psnr(x, x).tolist() == [PSNR_CAP_DB, PSNR_CAP_DB]
    assert psnr(x + 0.1, x)[0].item() == pytest.approx(20.0, abs=1e-4)  # mse 0.01 -> 20 dB


def test_identity_sees_a_template_and_a_faithful_copy():
    g = torch.Generator().manual_seed(0)
    originals = torch.rand(10, 1, 8, 8, generator=g)
    assert nearest_is_self(originals + 0.01, originals).all()
    template = originals.mean(0, keepdim=True).expand_as(originals)
    hits = nearest_is_self(template, originals)
    assert hits.sum() <= 1  # one image is nearest to the template for every reconstruction
    assert nearest_is_self(originals, originals, chunk=3).tolist() == [True] * 10  # chunking changes nothing


def test_pca_floor_is_exact_on_low_rank_data_and_mean_at_k0():
    g = torch.Generator().manual_seed(0)
    basis = torch.randn(3, 64, generator=g)
    coeffs = torch.randn(40, 3, generator=g) * 0.05
    data = (0.5 + coeffs @ basis).clamp(0, 1).reshape(40, 1, 8, 8)
    train, test = data[:30], data[30:]
    rec = pca_reconstruct(train, test, k=3)
    assert (rec - test).abs().max() < 1e-4  # rank-3 data: 3 components reconstruct it
    mean = pca_reconstruct(train, test, k=0)
    assert torch.allclose(mean, train.mean(0, keepdim=True).expand_as(test), atol=1e-6)
    one = psnr(pca_reconstruct(train, test, k=1), test).mean()
    assert psnr(mean, test).mean() < one < psnr(rec, test).mean()
    assert math.isfinite(float(one))


def test_identity_counts_an_exact_duplicate_as_the_own_original():
    g = torch.Generator().manual_seed(1)
    originals = torch.rand(6, 1, 8, 8, generator=g)
    originals[4] = originals[3]  # a duplicate pair, as in Kaggle's test split
    recons = originals + 0.01
    assert nearest_is_self(recons, originals).all()
    assert not nearest_is_self(recons, originals, duplicate_mse=0.0)[4]  # ties go to the first index
    from spatialvae.lab.metrics import duplicate_count
    assert duplicate_count(originals) == 2


# ---- sharpness: fine detail as a ratio to real images ------------------------------------------------

SHARPNESS_KEYS = {"power_0.25-0.5", "power_0.5-0.75", "power_0.75-1", "laplacian"}


def textured(n=6, size=64, seed=0):
    """(n, 1, size, size) in [0, 1] with detail at every frequency (mid-grey plus noise)."""
    g = torch.Generator().manual_seed(seed)
    return (0.5 + 0.15 * torch.randn(n, 1, size, size, generator=g)).clamp(0, 1)


def test_sharpness_of_images_against_themselves_is_exactly_one():
    x = textured()
    r = sharpness_ratios(x, x)
    assert set(r) == SHARPNESS_KEYS and all(v == 1.0 for v in r.values()), r


def test_blur_lowers_every_band_and_the_laplacian_more_with_sigma():
    x = textured()
    mild = sharpness_ratios(gaussian_blur(x, [5, 5], [0.5, 0.5]), x)
    strong = sharpness_ratios(gaussian_blur(x, [7, 7], [1.0, 1.0]), x)
    for k in SHARPNESS_KEYS:
        assert strong[k] < mild[k] < 1, (k, mild[k], strong[k])


def test_added_noise_raises_the_top_band_above_real():
    x = textured()
    noisy = (x + 0.1 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))).clamp(0, 1)
    assert sharpness_ratios(noisy, x)["power_0.75-1"] > 1


@pytest.mark.parametrize("band", range(len(SHARPNESS_BANDS)))
def test_band_power_of_a_cosine_lies_in_its_band(band):
    """A horizontal cosine at the middle of a band (cycles per pixel = radius * 0.5): its power
    there, next to nothing (the 8-bit rounding and the window's skirt) in the others."""
    lo, hi = SHARPNESS_BANDS[band]
    n = 64
    f = (lo + hi) / 2 * 0.5
    row = 0.5 + 0.4 * torch.cos(2 * math.pi * f * torch.arange(n).float())
    p = band_power(row.view(1, 1, 1, n).expand(2, 1, n, n))[0]  # (bands,)
    others = torch.cat([p[:band], p[band + 1:]])
    assert p.argmax() == band and (others < 1e-3 * p[band]).all(), p
