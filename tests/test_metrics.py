"""Per-image metrics and the linear floors: closed-form values."""

from __future__ import annotations

import math

import pytest
import torch

from spatialvae.metrics import PSNR_CAP_DB, nearest_is_self, pca_reconstruct, psnr

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
    from spatialvae.metrics import duplicate_count
    assert duplicate_count(originals) == 2
