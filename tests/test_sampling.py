"""Latent samplers on synthetic latents with known statistics, plus encode/generate/interpolate
on a tiny model. Everything runs on the CPU in a few seconds."""

from __future__ import annotations

import pytest
import torch

from spatialvae.config import get_preset
from spatialvae.data import seeded_subset
from spatialvae.errors import SpatialVAEError
from spatialvae.model import build_model
from spatialvae.sampling import (
    GaussianSampler,
    GMMSampler,
    StandardNormalSampler,
    encode_dataset,
    generate,
    interpolate,
    save_grid,
)

torch.set_num_threads(2)


def correlated_latents(n: int, seed: int = 0):
    """n draws of a known 8-dim Gaussian with strong correlations, shaped (n, 2, 2, 2)."""
    g = torch.Generator().manual_seed(seed)
    mean = torch.linspace(-2.0, 3.0, 8, dtype=torch.float64)
    a = torch.randn(8, 8, generator=g, dtype=torch.float64)
    cov = a @ a.T / 8 + 0.1 * torch.eye(8, dtype=torch.float64)
    x = mean + torch.randn(n, 8, generator=g, dtype=torch.float64) @ torch.linalg.cholesky(cov).T
    return x.float().view(n, 2, 2, 2), mean, cov


def empirical(z: torch.Tensor):
    x = z.flatten(1).double()
    return x.mean(0), torch.cov(x.T)


def tiny_model():
    cfg = get_preset("smoke")
    torch.manual_seed(0)
    return build_model(cfg).eval(), cfg


# ---- samplers ------------------------------------------------------------------------------------

def test_prior_sampler_draws_what_model_sample_draws():
    model, _ = tiny_model()
    s = StandardNormalSampler(model.latent_shape).fit(None)
    z = s.sample(5, torch.Generator().manual_seed(3))
    assert z.shape == (5, *model.latent_shape)
    assert torch.equal(z, torch.randn((5, *model.latent_shape), generator=torch.Generator().manual_seed(3)))
    images = generate(model, s, 5, torch.Generator().manual_seed(3))
    assert torch.allclose(images, model.sample(5, generator=torch.Generator().manual_seed(3)), atol=1e-6)


def test_gaussian_sampler_reproduces_mean_and_covariance():
    latents, mean, cov = correlated_latents(5000)
    s = GaussianSampler().fit(latents)
    z = s.sample(20000, torch.Generator().manual_seed(0))
    assert z.shape == (20000, 2, 2, 2) and z.dtype == torch.float32
    m, c = empirical(z)
    m_fit, c_fit = empirical(latents)
    # The sampler reproduces the fitted statistics up to Monte Carlo error of 20,000 draws ...
    assert torch.allclose(m, m_fit, atol=0.05)
    assert torch.allclose(c, c_fit, atol=0.08 * float(cov.diagonal().max()))
    # ... and those are the true ones up to the error of 5,000 training latents.
    assert torch.allclose(m, mean, atol=0.1)
    assert torch.allclose(c, cov, atol=0.12 * float(cov.diagonal().max()))


def test_gaussian_sampler_is_reproducible_and_handles_singular_covariance():
    latents, _, _ = correlated_latents(200)
    s = GaussianSampler().fit(latents)
    a = s.sample(7, torch.Generator().manual_seed(1))
    assert torch.equal(a, s.sample(7, torch.Generator().manual_seed(1)))
    assert not torch.equal(a, s.sample(7, torch.Generator().manual_seed(2)))
    # Fewer latents than dimensions (the smoke/quick situation): the ridge keeps Cholesky possible.
    few = torch.randn(5, 4, 4, 4)
    z = GaussianSampler().fit(few).sample(10, torch.Generator().manual_seed(0))
    assert z.shape == (10, 4, 4, 4) and torch.isfinite(z).all()


def test_sampler_errors_are_clear():
    with pytest.raises(SpatialVAEError, match="at least 2 latents"):
        GaussianSampler().fit(torch.randn(1, 4))
    with pytest.raises(SpatialVAEError, match="before fit"):
        GaussianSampler().sample(3)
    with pytest.raises(SpatialVAEError, match="NaN"):
        GMMSampler().fit(torch.full((4, 2), float("nan")))


def two_clusters(n: int = 400):
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[-4.0, 0.0, 2.0, 0.0], [4.0, 1.0, -2.0, 0.0]])
    which = torch.arange(n) % 2
    x = centres[which] + 0.5 * torch.randn(n, 4, generator=g)
    return x.view(n, 2, 2), centres


def test_gmm_sampler_recovers_both_cluster_means():
    latents, centres = two_clusters()
    s = GMMSampler(n_components=2, seed=0).fit(latents)
    means = s.means[s.means[:, 0].argsort()].float()
    assert torch.allclose(means, centres, atol=0.15)
    assert torch.allclose(s.weights, torch.tensor([0.5, 0.5], dtype=torch.float64), atol=0.05)
    z = s.sample(4000, torch.Generator().manual_seed(0)).flatten(1)
    left, right = z[z[:, 0] < 0], z[z[:, 0] >= 0]
    assert 0.45 < len(left) / len(z) < 0.55
    assert torch.allclose(left.mean(0), centres[0], atol=0.1) and torch.allclose(right.mean(0), centres[1], atol=0.1)
    assert s.describe()["n_components"] == 2 and s.describe()["converged"]


def test_gmm_sampler_is_seeded_and_caps_components_for_tiny_sets():
    latents, _ = two_clusters(100)
    s = GMMSampler(n_components=3, seed=0).fit(latents)
    a = s.sample(50, torch.Generator().manual_seed(5))
    assert a.shape == (50, 2, 2)
    assert torch.equal(a, s.sample(50, torch.Generator().manual_seed(5)))
    b = GMMSampler(n_components=3, seed=0).fit(latents).sample(50, torch.Generator().manual_seed(5))
    assert torch.allclose(a, b)  # refitting with the same seed gives the same mixture
    assert GMMSampler(n_components=10).fit(torch.randn(6, 3)).describe()["n_components"] == 3  # N // 2


# ---- encode / generate / interpolate / grids ---------------------------------------------------------

def test_encode_dataset_returns_posterior_means_for_datasets_and_tensors():
    model, cfg = tiny_model()
    x = torch.rand(10, 1, cfg.data.image_size, cfg.data.image_size)
    model.train()
    pairs = [(x[i], 0) for i in range(len(x))]
    mu = encode_dataset(model, pairs, batch_size=4)
    assert model.training  # the mode is restored
    assert mu.shape == (10, *model.latent_shape)
    with torch.no_grad():
        expected = model.eval().encode(x)[0]
    assert torch.allclose(mu, expected, atol=1e-5)
    assert torch.allclose(encode_dataset(model, x, batch_size=3), expected, atol=1e-5)


def test_generate_and_interpolate_shapes_and_endpoints(tmp_path):
    model, cfg = tiny_model()
    s = cfg.data.image_size
    latents = torch.randn(20, *model.latent_shape)
    images = generate(model, GaussianSampler().fit(latents), 9, torch.Generator().manual_seed(0), batch_size=4)
    assert images.shape == (9, 1, s, s) and images.min() >= 0 and images.max() <= 1
    xa, xb = torch.rand(1, s, s), torch.rand(1, 1, s, s)
    path = interpolate(model, xa, xb, steps=5)
    assert path.shape == (5, 1, s, s)
    with torch.no_grad():
        ends = model(torch.stack([xa, xb[0]]), sample_posterior=False)[0]
    assert torch.allclose(path[0], ends[0], atol=1e-5) and torch.allclose(path[-1], ends[1], atol=1e-5)
    out = save_grid(images, tmp_path / "g" / "grid.png", nrow=3)
    assert out.is_file() and not list((tmp_path / "g").glob("*.tmp"))


def test_seeded_subset():
    a = seeded_subset(100, 10, seed=1)
    assert len(a) == 10 and len(set(a.tolist())) == 10 and torch.equal(a, seeded_subset(100, 10, seed=1))
    assert torch.equal(seeded_subset(5, 10, seed=1), torch.arange(5))
