"""Loss tests: closed-form KL, zero loss on identical images, VGG handling (frozen, eval, out of
the state dict, never downloaded in tests, clear WeightsError), SSIM on tiny images."""

from __future__ import annotations

import dataclasses
import math
import warnings

import pytest
import torch
import torch.nn.functional as F

import spatialvae.losses as losses
from spatialvae.config import LossConfig, get_preset
from spatialvae.errors import ConfigError, WeightsError
from spatialvae.losses import (
    PART_KEYS,
    PerceptualLoss,
    SSIMLoss,
    VAELoss,
    build_loss,
    kl_divergence,
    load_vgg16_features,
    ssim_window_for,
)

torch.set_num_threads(2)

RANDOM_VGG = LossConfig(vgg_weights="random")


@pytest.fixture(scope="module")
def random_loss() -> VAELoss:
    with pytest.warns(UserWarning, match="RANDOM VGG16"):
        return VAELoss(RANDOM_VGG)


def assert_three_ways_out(msg: str) -> None:
    assert "Settings > Internet" in msg
    assert "loss.vgg_weights=" in msg and "vgg16-397923af.pth" in msg and "hub/checkpoints" in msg
    assert "loss.perceptual_weight=0" in msg
    assert "\n" not in msg  # one line for the CLI's `error: ...`


# ---- KL ---------------------------------------------------------------------------------------

def test_kl_matches_closed_form_by_hand():
    # Two images of two latent values; per value KL = 0.5 * (mu^2 + e^lv - 1 - lv).
    mu = torch.tensor([[1.0, 0.0], [2.0, 0.0]]).view(2, 2, 1, 1)
    logvar = torch.tensor([[0.0, math.log(2.0)], [0.0, 0.0]]).view(2, 2, 1, 1)
    # image 0: 0.5 * 1 + 0.5 * (2 - 1 - ln 2) = 0.5 + 0.1534264 = 0.6534264; image 1: 0.5 * 4 = 2
    assert kl_divergence(mu, logvar, "sum").item() == pytest.approx(1.3267132, rel=1e-6)  # (0.6534264 + 2) / 2
    assert kl_divergence(mu, logvar, "mean").item() == pytest.approx(0.6633566, rel=1e-6)  # 2.6534264 / 4
    assert kl_divergence(mu, logvar).item() == kl_divergence(mu, logvar, "mean").item()  # LossConfig's default


def test_kl_sum_scales_with_latent_size_mean_does_not():
    mu, logvar = torch.ones(3, 64, 4, 4), torch.zeros(3, 64, 4, 4)
    assert kl_divergence(mu, logvar, "sum").item() == pytest.approx(0.5 * 1024)
    assert kl_divergence(mu, logvar, "mean").item() == pytest.approx(0.5)


def test_kl_is_exactly_zero_at_the_prior():
    z = torch.zeros(2, 64, 4, 4)
    assert kl_divergence(z, z).item() == 0.0
    assert kl_divergence(z, z, "mean").item() == 0.0


def test_kl_is_fp32_and_finite_for_low_precision_and_huge_logvar():
    mu = torch.zeros(2, 8, 2, 2, dtype=torch.float16)
    logvar = torch.full_like(mu, 1e4)  # exp would overflow without the clamp
    kl = kl_divergence(mu, logvar, "sum")
    assert kl.dtype == torch.float32 and torch.isfinite(kl)
    assert kl.item() == pytest.approx(32 * 0.5 * (math.exp(20) - 1 - 20), rel=1e-3)  # clamped at 20
    assert torch.isfinite(kl_divergence(mu.float(), torch.full((2, 8, 2, 2), -1e4)))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        kl_auto = kl_divergence(torch.randn(2, 4, 2, 2).bfloat16(), torch.randn(2, 4, 2, 2).bfloat16())
    assert kl_auto.dtype == torch.float32


@pytest.mark.parametrize("field, value", [("kl_reduction", "batchmean"), ("recon", "l2"),
                                          ("pixel_reduction", "none"), ("ssim_window", 4)])
def test_the_loss_rejects_an_impossible_config(field, value):
    with pytest.raises(ConfigError, match=f"loss.{field}="):
        VAELoss(dataclasses.replace(LossConfig(perceptual_weight=0.0), **{field: value}))


# ---- VAELoss ----------------------------------------------------------------------------------

def test_identical_images_give_zero_loss(random_loss):
    torch.manual_seed(0)
    x = torch.rand(2, 1, 32, 32)
    z = torch.zeros(2, 8, 4, 4)
    total, parts = random_loss(x, x, z, z, beta=1e-3)
    assert set(parts) == set(PART_KEYS)
    assert parts["recon"].item() == 0.0
    assert parts["perceptual"].item() == 0.0
    assert abs(parts["ssim"].item()) < 1e-6
    assert parts["kl"].item() == 0.0
    assert abs(total.item()) < 1e-6


def test_parts_are_detached_unweighted_and_sum_to_total(random_loss):
    torch.manual_seed(0)
    x = torch.rand(2, 1, 32, 32)
    recon = torch.rand(2, 1, 32, 32, requires_grad=True)
    mu, logvar = torch.randn(2, 8, 4, 4), torch.randn(2, 8, 4, 4)
    beta = 1e-3
    total, parts = random_loss(recon, x, mu, logvar, beta)
    for k, v in parts.items():
        assert not v.requires_grad and v.dtype == torch.float32 and v.dim() == 0, k
        assert v.item() > 0, k
    assert parts["recon"].item() == pytest.approx(F.l1_loss(recon, x).item(), rel=1e-6)
    c = RANDOM_VGG
    expect = (c.recon_weight * parts["recon"] + c.perceptual_weight * parts["perceptual"]
              + c.ssim_weight * parts["ssim"] + beta * parts["kl"])
    assert total.item() == pytest.approx(expect.item(), rel=1e-5)
    assert parts["total"].item() == pytest.approx(total.item())
    total.backward()
    assert recon.grad is not None and recon.grad.abs().sum() > 0


def test_perceptual_term_has_a_gradient_of_its_own(random_loss):
    recon = torch.rand(1, 1, 32, 32, requires_grad=True)
    random_loss.perceptual(recon, torch.rand(1, 1, 32, 32)).backward()
    assert recon.grad.abs().sum() > 0


def test_mse_recon_and_zero_weights_and_beta_zero():
    cfg = LossConfig(recon="mse", perceptual_weight=0.0, ssim_weight=0.0)
    loss = build_loss(cfg)
    x, recon = torch.rand(2, 1, 16, 16), torch.rand(2, 1, 16, 16)
    mu, logvar = torch.randn(2, 4, 2, 2), torch.zeros(2, 4, 2, 2)
    total, parts = loss(recon, x, mu, logvar, beta=0.0)
    assert parts["recon"].item() == pytest.approx(F.mse_loss(recon, x).item(), rel=1e-6)
    assert parts["perceptual"].item() == 0.0 and parts["ssim"].item() == 0.0
    assert parts["kl"].item() > 0  # still reported during the beta = 0 phase ...
    assert total.item() == pytest.approx(parts["recon"].item(), rel=1e-6)  # ... but not added
    total, parts = loss(recon, x, mu, logvar, beta=0.5)
    assert total.item() == pytest.approx(parts["recon"].item() + 0.5 * parts["kl"].item(), rel=1e-6)


@pytest.mark.parametrize("recon", ["l1", "mse"])
def test_summed_pixel_term_is_the_mean_times_pixels_per_image(recon):
    x, recon_img = torch.rand(3, 1, 8, 8), torch.rand(3, 1, 8, 8)
    mu, logvar = torch.zeros(3, 4, 2, 2), torch.zeros(3, 4, 2, 2)
    mean = VAELoss(LossConfig(recon=recon, perceptual_weight=0.0, ssim_weight=0.0))
    summed = VAELoss(LossConfig(recon=recon, perceptual_weight=0.0, ssim_weight=0.0, pixel_reduction="sum"))
    m = mean(recon_img, x, mu, logvar, 0.0)[1]["recon"].item()
    s = summed(recon_img, x, mu, logvar, 0.0)[1]["recon"].item()
    assert s == pytest.approx(m * 64, rel=1e-5)  # 1 x 8 x 8 values per image, batch averaged
    with pytest.raises(ConfigError, match="pixel_reduction"):
        VAELoss(LossConfig(pixel_reduction="max"))


def test_build_loss_with_perceptual_weight_zero_never_builds_vgg(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("VGG was constructed")

    monkeypatch.setattr(losses, "load_vgg16_features", boom)
    monkeypatch.setattr(losses, "_vgg16_features_module", boom)
    monkeypatch.setattr(PerceptualLoss, "__init__", boom)
    cfg = get_preset("smoke")
    cfg.loss.perceptual_weight = 0.0
    cfg.loss.vgg_weights = "/nonexistent/vgg16.pth"  # would fail loudly if it were read
    loss = build_loss(cfg)
    assert loss.perceptual is None
    x = torch.rand(2, 1, 32, 32)
    _, parts = loss(x, x, torch.zeros(2, 8, 4, 4), torch.zeros(2, 8, 4, 4), 0.0)
    assert parts["perceptual"].item() == 0.0


def test_original_preset_loss_needs_no_vgg(offline):
    loss = build_loss(get_preset("original"))
    assert loss.perceptual is None and loss.ssim is None and loss.cfg.recon == "mse"
    assert loss.cfg.pixel_reduction == "sum" and loss.cfg.kl_reduction == "sum"  # the classic ELBO form
    assert offline == []


# ---- the VGG network ----------------------------------------------------------------------------

def test_vgg_is_truncated_frozen_eval_and_out_of_state_dict(random_loss):
    p = random_loss.perceptual
    assert len(p.vgg) == 16  # indices 0..15: cut after relu3_3
    assert isinstance(p.vgg[15], torch.nn.ReLU)
    assert all(not q.requires_grad for q in p.vgg.parameters())
    random_loss.train()
    assert random_loss.training and p.training and not p.vgg.training
    assert list(random_loss.parameters()) == []  # nothing for an optimizer to pick up
    assert random_loss.state_dict() == {}  # nothing in a checkpoint
    random_loss.load_state_dict({})  # and a checkpoint without VGG loads strictly


def test_vgg_moves_with_the_loss():
    with pytest.warns(UserWarning):
        p = PerceptualLoss((3,), "random")
    p.to(torch.float64)
    assert p.vgg[0].weight.dtype == torch.float64 and p.mean.dtype == torch.float64
    assert p(torch.rand(1, 1, 16, 16, dtype=torch.float64), torch.rand(1, 1, 16, 16, dtype=torch.float64)) > 0


def test_building_vgg_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    with pytest.warns(UserWarning):
        load_vgg16_features("random")
    assert torch.equal(torch.rand(3), expected)


def test_invalid_perceptual_layers():
    with pytest.raises(ConfigError, match="perceptual_layers"):
        PerceptualLoss((3, 31), "random")


def test_imagenet_without_cache_or_network_raises_weights_error(offline):
    with pytest.raises(WeightsError) as info:
        build_loss(LossConfig(vgg_weights="imagenet"))
    assert offline and offline[0].endswith("vgg16-397923af.pth")  # it did try torchvision's cache/URL
    assert "URLError" in str(info.value)
    assert_three_ways_out(str(info.value))


def test_missing_weights_file_raises_weights_error(tmp_path, offline):
    with pytest.raises(WeightsError) as info:
        build_loss(LossConfig(vgg_weights=str(tmp_path / "nope" / "vgg16.pth")))
    assert "nope" in str(info.value)
    assert_three_ways_out(str(info.value))
    assert offline == []


@pytest.mark.parametrize("content", [b"not a checkpoint", "wrong_keys"])
def test_corrupt_or_foreign_weights_file_raises_weights_error(tmp_path, content):
    path = tmp_path / "vgg16.pth"
    if content == "wrong_keys":
        torch.save({"conv.weight": torch.zeros(1)}, path)
    else:
        path.write_bytes(content)
    with pytest.raises(WeightsError) as info:
        PerceptualLoss((3, 8, 15), str(path))
    assert_three_ways_out(str(info.value))


def test_local_weights_file_is_loaded(tmp_path):
    with pytest.warns(UserWarning):
        feats = load_vgg16_features("random")
    with torch.no_grad():
        for q in feats.parameters():
            q.add_(0.01)  # differs from the seeded random init
    full = {f"features.{k}": v for k, v in feats.state_dict().items()}  # torchvision vgg16() key layout
    full["classifier.0.weight"] = torch.zeros(1)  # ignored: only `features` is used
    path = tmp_path / "vgg16-397923af.pth"
    torch.save(full, path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "random" warning for real weights
        p = PerceptualLoss((3, 8), str(path))
    assert len(p.vgg) == 9
    torch.testing.assert_close(p.vgg[2].weight, feats[2].weight)


# ---- SSIM -------------------------------------------------------------------------------------

@pytest.mark.parametrize("side,window", [(128, 11), (16, 11), (11, 11), (10, 9), (8, 7), (3, 3)])
def test_ssim_window_shrinks_to_fit(side, window):
    assert ssim_window_for(side, 11) == window


@pytest.mark.parametrize("side", [16, 8])
def test_ssim_works_on_tiny_images(side):
    torch.manual_seed(0)
    x = torch.rand(2, 1, side, side)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # pytorch-msssim warns when it skips the blur
        same = SSIMLoss(11)(x, x)
        diff = SSIMLoss(11)(torch.rand(2, 1, side, side), x)
    assert abs(same.item()) < 1e-6
    assert 0.5 < diff.item() < 1.5  # unrelated noise: SSIM near 0
