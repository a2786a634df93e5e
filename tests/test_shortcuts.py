"""The DC-AE style parameter-free shortcuts (model.shortcut=space): closed-form checks that the
untrained model is exactly an area-downsample + bicubic-upsample autoencoder, that the layout
helpers invert each other, that training wakes every zero-initialised branch, and the literal
presets."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from spatialvae.config import ModelConfig, get_preset
from spatialvae.errors import ConfigError
from spatialvae.model import SpatialVAE, channel_to_space, match_channels, space_to_channel

torch.set_num_threads(2)


def test_match_channels_averages_or_tiles():
    x = torch.arange(8.0).reshape(1, 8, 1, 1)
    assert match_channels(x, 4).flatten().tolist() == [2, 3, 4, 5]  # channels 4 apart averaged
    assert match_channels(x[:, :2], 6).flatten().tolist() == [0, 1, 0, 1, 0, 1]  # tiled copies
    assert match_channels(x, 8) is x


def test_channel_to_space_undoes_space_to_channel_when_nothing_is_merged():
    x = torch.rand(2, 3, 8, 8)
    down = space_to_channel(x, 12)  # 3 x 4 offsets: nothing averaged
    assert down.shape == (2, 12, 4, 4)
    assert torch.equal(channel_to_space(down, 3), x)


@pytest.mark.parametrize("channels,latent_ch,size,pool", [
    ((32, 64, 128, 256), 64, 64, 2),     # the quick model: 2x2 area pool = 1,024 values
    ((32, 64, 128, 256, 512), 64, 128, 4),  # the seed model: 4x4 area pool = 1,024 values
    ((8, 16, 32, 64), 16, 64, 4),        # narrower: fewer values, a coarser pool
])
def test_untrained_encoder_is_an_area_downsample(channels, latent_ch, size, pool):
    cfg = dataclasses.replace(ModelConfig(), channels=channels, latent_channels=latent_ch)
    torch.manual_seed(0)
    model = SpatialVAE(cfg, size).eval()
    x = torch.rand(2, 1, size, size)
    with torch.no_grad():
        mu, logvar = model.encode(x)
    pooled = F.avg_pool2d(x, pool).flatten(1)
    assert mu.numel() // 2 == pooled.shape[1]
    torch.testing.assert_close(mu.flatten(1).sort(1).values, pooled.sort(1).values, atol=1e-5, rtol=0)
    assert torch.allclose(logvar, torch.full_like(logvar, -8.0))


def test_untrained_quick_model_decodes_to_the_bicubic_upsample():
    cfg = get_preset("quick")
    torch.manual_seed(0)
    model = SpatialVAE(cfg.model, 64).eval()
    x = torch.rand(3, 1, 64, 64)
    with torch.no_grad():
        recon = model.decode(model.encode(x)[0])
    ref = F.interpolate(F.avg_pool2d(x, 2), scale_factor=2, mode="bicubic", align_corners=False).clamp(1e-3, 1 - 1e-3)
    torch.testing.assert_close(recon, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("decoder_skip", ["latent", "last"])
def test_untrained_seed_model_decodes_to_its_closed_form_upsample(decoder_skip):
    # 128 px: the latent is the 4x4 area downsample (a 32x32 image). decoder_skip=latent upsamples it
    # bicubically x4; last (the older form) repeats it nearest x2 to 64x64, then bicubic x2.
    cfg = dataclasses.replace(ModelConfig(), decoder_skip=decoder_skip)
    torch.manual_seed(0)
    model = SpatialVAE(cfg, 128).eval()
    x = torch.rand(2, 1, 128, 128)
    with torch.no_grad():
        recon = model.decode(model.encode(x)[0])
    pooled = F.avg_pool2d(x, 4)
    if decoder_skip == "last":
        pooled = F.interpolate(pooled, scale_factor=2, mode="nearest")
    ref = F.interpolate(pooled, size=128, mode="bicubic", align_corners=False).clamp(1e-3, 1 - 1e-3)
    torch.testing.assert_close(recon, ref, atol=1e-5, rtol=0)


def test_decoder_skip_falls_back_to_the_last_map_when_the_latent_is_not_a_square_image():
    # smoke: 8 x 4 x 4 = 128 latent values, no side s with s * s = 128: the last map, as before
    model = SpatialVAE(get_preset("smoke").model, 32)
    assert (model.decoder.skip_scale, model.decoder.skip_after) == (2, len(model.decoder.blocks))
    assert SpatialVAE(ModelConfig(), 128).decoder.skip_scale == 4


def test_every_parameter_learns_after_one_step():
    # Zero-initialised branch ends give their inner layers no gradient at step 0; one update wakes them.
    torch.manual_seed(0)
    model = SpatialVAE(get_preset("smoke").model, 32)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.rand(4, 1, 32, 32)
    for _ in range(2):
        opt.zero_grad()
        recon, mu, logvar = model(x)
        ((recon - x).abs().mean() + 1e-3 * logvar.exp().mean()).backward()
        opt.step()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"{name} gets no gradient"


def test_widths_that_cannot_be_averaged_are_a_config_error():
    cfg = dataclasses.replace(ModelConfig(), channels=(24, 40, 128, 256), norm_groups=8)
    with pytest.raises(ConfigError, match="model.shortcut=conv"):
        SpatialVAE(cfg, 64)
    SpatialVAE(dataclasses.replace(cfg, shortcut="conv"), 64)  # the literal skips take any widths


def test_reparameterize_draws_the_same_noise_in_channels_last():
    mu = torch.rand(2, 8, 4, 4)
    logvar = torch.zeros_like(mu)
    torch.manual_seed(3)
    a = SpatialVAE.reparameterize(mu, logvar)
    torch.manual_seed(3)
    b = SpatialVAE.reparameterize(mu.contiguous(memory_format=torch.channels_last),
                                  logvar.contiguous(memory_format=torch.channels_last))
    assert torch.equal(a, b)


def test_literal_presets_keep_the_recipe_as_written():
    for name in ("seed", "quick"):
        lit, new = get_preset(f"{name}-literal"), get_preset(name)
        assert (lit.model.shortcut, lit.model.logvar_init, lit.loss.kl_reduction) == ("conv", None, "sum")
        assert (new.model.shortcut, new.model.logvar_init, new.loss.kl_reduction) == ("space", -8.0, "mean")
        assert lit.data.image_size == new.data.image_size
    seed_lit = get_preset("seed-literal")
    assert (seed_lit.data.batch_size, seed_lit.train.phase1.lr, seed_lit.train.phase2.lr) == (32, 1e-4, 5e-5)
    assert get_preset("quick-literal").data.batch_size == 32
