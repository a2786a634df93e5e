"""Model tests: tiny parametrised shape checks in the style of MONAI GenerativeModels, plus the
architectural promises (GroupNorm only, attention at 16x16, bilinear upsampling) and
constructor-time config errors."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn as nn

from spatialvae.config import Config, ModelConfig, get_preset
from spatialvae.errors import ConfigError
from spatialvae.model import (
    LOGVAR_MAX,
    LOGVAR_MIN,
    AttentionBlock,
    OriginalVAE,
    ResBlock,
    SpatialVAE,
    build_model,
    stage_plan,
)

torch.set_num_threads(2)

TINY = dict(channels=(8, 8), latent_channels=4, latent_size=4, attention_resolutions=(8,), norm_groups=4)


def tiny_cfg(**kw) -> ModelConfig:
    return dataclasses.replace(ModelConfig(**TINY), **kw)


def attention_sides(model: nn.Module, x: torch.Tensor) -> list:
    """Feature map (H, W) seen by every AttentionBlock during one forward, in call order."""
    seen, hooks = [], []
    for m in model.modules():
        if isinstance(m, AttentionBlock):
            hooks.append(m.register_forward_hook(lambda mod, inp, out: seen.append(tuple(inp[0].shape[-2:]))))
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return seen


# ---- shapes -----------------------------------------------------------------------------------

SHAPE_CASES = [
    # (model config, image size, batch, latent shape)
    (ModelConfig(), 128, 1, (64, 4, 4)),
    (ModelConfig(), 64, 2, (64, 4, 4)),
    (tiny_cfg(), 16, 2, (4, 4, 4)),
    (tiny_cfg(latent_size=2, attention_resolutions=(4,)), 16, 1, (4, 2, 2)),
    (tiny_cfg(upsample="transposed"), 16, 2, (4, 4, 4)),
    (get_preset("smoke").model, 32, 2, (8, 4, 4)),
]


@pytest.mark.parametrize("cfg,size,batch,latent", SHAPE_CASES)
def test_spatial_shapes(cfg, size, batch, latent):
    torch.manual_seed(0)
    model = SpatialVAE(cfg, size)
    x = torch.rand(batch, 1, size, size)
    recon, mu, logvar = model(x)
    assert model.latent_shape == latent
    assert mu.shape == logvar.shape == (batch, *latent)
    assert recon.shape == x.shape
    assert recon.min() >= 0 and recon.max() <= 1  # sigmoid output, the range the losses assume
    assert model.decode(torch.randn(batch, *latent)).shape == x.shape
    # sample_posterior=False decodes mu: deterministic
    r1, _, _ = model(x, sample_posterior=False)
    r2, _, _ = model(x, sample_posterior=False)
    assert torch.equal(r1, r2)


@pytest.mark.parametrize("size,batch", [(128, 2), (16, 2)])
def test_original_shapes(size, batch):
    cfg = ModelConfig(architecture="original") if size == 128 else tiny_cfg(architecture="original", flat_latent_dim=16)
    model = OriginalVAE(cfg, size)
    x = torch.rand(batch, 1, size, size)
    recon, mu, logvar = model(x)
    assert model.latent_shape == (cfg.flat_latent_dim,)
    assert mu.shape == logvar.shape == (batch, cfg.flat_latent_dim)
    assert recon.shape == x.shape and recon.min() >= 0 and recon.max() <= 1


@pytest.mark.parametrize("size,widths,sides", [
    (128, [32, 64, 128, 256, 512], [64, 32, 16, 8, 4]),
    (64, [32, 64, 128, 256], [32, 16, 8, 4]),  # one stage fewer
    (256, [32, 64, 128, 256, 512, 512], [128, 64, 32, 16, 8, 4]),  # one more: last width repeats
])
def test_stage_plan_follows_image_size(size, widths, sides):
    assert stage_plan(ModelConfig(), size) == (widths, sides)
    model = SpatialVAE(ModelConfig(), size)
    strided = [m for m in model.encoder.modules() if isinstance(m, ResBlock) and m.stride == 2]
    assert [m.out_ch for m in strided] == widths[1:]  # the stem is the first halving
    assert model.latent_shape == (64, 4, 4)


def test_repeated_last_width_runs():
    cfg = tiny_cfg(channels=(8,), attention_resolutions=())
    model = SpatialVAE(cfg, 32)  # 3 halvings from a single width
    assert model.widths == [8, 8, 8]
    assert model(torch.rand(1, 1, 32, 32))[0].shape == (1, 1, 32, 32)


# ---- architecture promises ---------------------------------------------------------------------

def test_spatial_has_no_batchnorm_or_transposed_conv():
    types = {type(m) for m in SpatialVAE(ModelConfig(), 128).modules()}
    assert not any(issubclass(t, nn.modules.batchnorm._BatchNorm) for t in types)
    assert not any(issubclass(t, nn.modules.conv._ConvTransposeNd) for t in types)
    assert nn.GroupNorm in types


def test_original_has_batchnorm_transposed_conv_and_no_attention():
    types = {type(m) for m in OriginalVAE(ModelConfig(architecture="original"), 128).modules()}
    assert nn.BatchNorm2d in types and nn.ConvTranspose2d in types and nn.LeakyReLU in types
    assert AttentionBlock not in types and nn.GroupNorm not in types


def test_transposed_ablation_uses_transposed_convs():
    model = SpatialVAE(tiny_cfg(upsample="transposed"), 16)
    n_up = sum(isinstance(m, nn.ConvTranspose2d) for m in model.modules())
    assert n_up == 2  # one per decoder doubling: 4 -> 8 -> 16
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def test_attention_sits_at_16x16_in_the_default_model():
    model = SpatialVAE(ModelConfig(), 128)
    assert attention_sides(model, torch.rand(1, 1, 128, 128)) == [(16, 16), (16, 16)]  # encoder, decoder
    widths = [m.ch for m in model.modules() if isinstance(m, AttentionBlock)]
    assert widths == [128, 128]


def test_attention_follows_the_side_not_the_stage():
    # At 64 px the 16x16 map is one stage earlier (width 64), and attention moves with it.
    model = SpatialVAE(ModelConfig(), 64)
    assert attention_sides(model, torch.rand(1, 1, 64, 64)) == [(16, 16), (16, 16)]
    assert [m.ch for m in model.modules() if isinstance(m, AttentionBlock)] == [64, 64]


def test_no_attention_ablation():
    model = SpatialVAE(dataclasses.replace(ModelConfig(), attention_resolutions=()), 64)
    assert not any(isinstance(m, AttentionBlock) for m in model.modules())


@pytest.mark.parametrize("heads", [1, 2, 4])
def test_attention_block_matches_reference(heads):
    torch.manual_seed(0)
    block = AttentionBlock(8, heads=heads, groups=4)
    x = torch.randn(2, 8, 3, 5)
    out = block(x)
    # Reference: explicit per-head softmax(q k^T / sqrt(d)) v.
    b, c, h, w = x.shape
    d = c // heads
    q, k, v = block.qkv(block.norm(x)).reshape(b, 3 * c, h * w).chunk(3, dim=1)  # (B, C, HW) each
    heads_out = []
    for i in range(heads):
        qi, ki, vi = (t[:, i * d:(i + 1) * d].transpose(1, 2) for t in (q, k, v))  # (B, HW, d)
        att = torch.softmax(qi @ ki.transpose(1, 2) / d ** 0.5, dim=-1)
        heads_out.append((att @ vi).transpose(1, 2))  # (B, d, HW)
    ref = x + block.proj(torch.cat(heads_out, dim=1).reshape(b, c, h, w))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_resblock_downsamples_and_skips():
    block = ResBlock(8, 16, stride=2, groups=4)
    assert block(torch.randn(1, 8, 8, 8)).shape == (1, 16, 4, 4)
    assert isinstance(block.skip, nn.Conv2d) and block.skip.stride == (2, 2)
    assert isinstance(ResBlock(8, 8, groups=4).skip, nn.Identity)


@pytest.mark.parametrize("model_fn", [  # literal skips; zero-initialised branches: test_shortcuts.py
    lambda: SpatialVAE(tiny_cfg(shortcut="conv"), 16),
    lambda: SpatialVAE(tiny_cfg(upsample="transposed", attention_heads=2, shortcut="conv"), 16),
    lambda: SpatialVAE(dataclasses.replace(get_preset("smoke").model, shortcut="conv"), 32),
    lambda: OriginalVAE(tiny_cfg(architecture="original", flat_latent_dim=8), 16),
])
def test_every_parameter_gets_a_gradient(model_fn):
    torch.manual_seed(0)
    model = model_fn()
    x = torch.rand(2, 1, model.image_size, model.image_size)
    recon, mu, logvar = model(x)
    (recon - x).abs().mean().backward()  # reaches mu and logvar through the reparameterisation
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, f"{name} gets a zero gradient"


# ---- sampling, clamp, build --------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["spatial", "original"])
def test_seeded_sample_is_reproducible(arch):
    torch.manual_seed(0)
    model = SpatialVAE(tiny_cfg(), 16) if arch == "spatial" else OriginalVAE(tiny_cfg(flat_latent_dim=8), 16)
    model.train()
    a = model.sample(3, generator=torch.Generator().manual_seed(1))
    b = model.sample(3, generator=torch.Generator().manual_seed(1))
    c = model.sample(3, generator=torch.Generator().manual_seed(2))
    assert a.shape == (3, 1, 16, 16)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    assert model.training  # sample() restores the mode it switched away from
    assert not a.requires_grad


def test_sample_single_image_with_batchnorm():
    # n=1 would fail in BatchNorm train mode; sample() decodes in eval mode.
    model = OriginalVAE(tiny_cfg(flat_latent_dim=8), 16).train()
    assert model.sample(1, generator=torch.Generator().manual_seed(0)).shape == (1, 1, 16, 16)


def test_encode_clamps_logvar():
    model = SpatialVAE(tiny_cfg(), 16)
    with torch.no_grad():
        model.encoder.to_logvar.bias.fill_(1e6)
    _, logvar = model.encode(torch.rand(1, 1, 16, 16))
    assert logvar.max().item() == LOGVAR_MAX
    with torch.no_grad():
        model.encoder.to_logvar.bias.fill_(-1e6)
    assert model.encode(torch.rand(1, 1, 16, 16))[1].min().item() == LOGVAR_MIN


def test_reparameterize_clamps_huge_logvar():
    mu = torch.zeros(2, 4, 4, 4)
    for big in (1e4, -1e4):
        z = SpatialVAE.reparameterize(mu, torch.full_like(mu, big))
        assert torch.isfinite(z).all()
    # fp16: exp(0.5 * 20) still fits
    z16 = SpatialVAE.reparameterize(mu.half(), torch.full_like(mu, 1e4).half())
    assert torch.isfinite(z16).all()


@pytest.mark.parametrize("preset,arch,latent", [
    ("seed", SpatialVAE, (64, 4, 4)),
    ("quick", SpatialVAE, (64, 4, 4)),
    ("smoke", SpatialVAE, (8, 4, 4)),
    ("original", OriginalVAE, (256,)),
])
def test_build_model_from_presets(preset, arch, latent):
    cfg = get_preset(preset)
    model = build_model(cfg)
    assert type(model) is arch and model.latent_shape == latent and model.image_size == cfg.data.image_size


def test_original_preset_runs_forward():
    cfg = get_preset("original")
    assert cfg.model.architecture == "original" and cfg.loss.recon == "mse"
    assert cfg.loss.perceptual_weight == 0 and cfg.loss.ssim_weight == 0
    assert cfg.train.phase1.epochs == 0
    assert cfg.train.phase2.beta_start == cfg.train.phase2.beta_end == 0.5
    seed = get_preset("seed")
    assert cfg.train.phase1.epochs + cfg.train.phase2.epochs == seed.train.phase1.epochs + seed.train.phase2.epochs
    model = build_model(cfg)
    recon, mu, logvar = model(torch.rand(2, 1, 128, 128))
    assert recon.shape == (2, 1, 128, 128) and mu.shape == (2, 256)


def test_ablation_configs_round_trip():
    cfg = get_preset("seed").with_overrides(["model.upsample=transposed", "model.attention_resolutions=[]"])
    assert cfg.model.upsample == "transposed" and cfg.model.attention_resolutions == ()
    with pytest.raises(ConfigError, match="model.upsample"):
        get_preset("seed").with_overrides(["model.upsample=nearest"])


# ---- invalid configs fail in the constructor ---------------------------------------------------

@pytest.mark.parametrize("kw,size,match", [
    (dict(), 100, "latent_size \\* 2\\^k"),  # 100 is not 4 * 2^k
    (dict(), 4, "latent_size \\* 2\\^k"),  # no downsampling at all
    (dict(latent_size=3), 128, "latent_size"),
    (dict(channels=(30, 64, 128, 256, 512)), 128, "norm_groups"),
    (dict(channels=(32, 64, 128, 256, 500)), 128, "norm_groups"),
    (dict(attention_heads=3), 128, "attention_heads"),
    (dict(attention_resolutions=(128,)), 128, "never occur"),  # the input side is not a feature map
    (dict(attention_resolutions=(12,)), 128, "never occur"),
    (dict(attention_resolutions=(64,)), 64, "never occur"),  # 64 px: sides are 32, 16, 8, 4
    (dict(upsample="nearest"), 128, "model.upsample"),
    (dict(channels=()), 128, "model.channels"),
])
def test_invalid_spatial_config_raises_config_error(kw, size, match):
    cfg = dataclasses.replace(ModelConfig(), **kw)
    with pytest.raises(ConfigError, match=match):
        SpatialVAE(cfg, size)


def test_config_error_is_a_value_error_and_says_what_to_change():
    with pytest.raises(ValueError) as info:
        SpatialVAE(dataclasses.replace(ModelConfig(), attention_resolutions=(12,)), 128)
    msg = str(info.value)
    assert "[64, 32, 16, 8, 4]" in msg and "[]" in msg


def test_invalid_original_config_raises_config_error():
    with pytest.raises(ConfigError, match="latent_size"):
        OriginalVAE(ModelConfig(architecture="original"), 96)


def test_build_model_rejects_unknown_architecture():
    cfg = Config()
    cfg.model.architecture = "unet"  # bypasses validate(), as a hand-edited config could
    with pytest.raises(ConfigError, match="model.architecture"):
        build_model(cfg)
