from __future__ import annotations

import dataclasses

import pytest

from spatialvae.config import PRESETS, Config, get_preset
from spatialvae.errors import ConfigError


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_round_trip_through_json(name, tmp_path):
    cfg = get_preset(name)
    assert cfg.preset == name
    assert Config.from_json(cfg.to_json()) == cfg
    cfg.to_json(tmp_path / "config.json")
    again = Config.from_json(tmp_path / "config.json")
    assert again == cfg and isinstance(again.model.channels, tuple)


def test_seed_defaults_are_the_recipe():
    c = get_preset("seed")
    assert (c.data.image_size, c.data.clahe_clip, c.data.clahe_tiles, c.data.batch_size) == (128, 2.0, 8, 32)
    assert c.model.channels == (32, 64, 128, 256, 512) and c.model.latent_channels * c.model.latent_size ** 2 == 1024
    assert (c.loss.recon_weight, c.loss.perceptual_weight, c.loss.ssim_weight) == (1.0, 0.1, 0.5)
    assert c.loss.perceptual_layers == (3, 8, 15)
    p1, p2 = c.train.phase1, c.train.phase2
    assert (p1.epochs, p1.lr, p1.scheduler, p1.beta_end) == (50, 1e-4, "cosine", 0.0)
    assert (p2.epochs, p2.lr, p2.scheduler, p2.beta_end, p2.beta_anneal_epochs) == (100, 5e-5, "plateau", 1e-3, 50)
    assert (c.train.weight_decay, c.train.grad_clip) == (1e-5, 1.0)


def test_quick_and_smoke_are_smaller():
    q, s = get_preset("quick"), get_preset("smoke")
    assert q.data.image_size == 64 and q.train.phase1.epochs >= 1 and q.train.phase2.epochs >= 1
    assert s.data.image_size < q.data.image_size and s.data.max_per_class < q.data.max_per_class


def test_partial_json_keeps_defaults():
    cfg = Config.from_json('{"data": {"image_size": 64}, "train": {"phase2": {"epochs": 3}}}')
    assert cfg.data.image_size == 64 and cfg.train.phase2.epochs == 3 and cfg.train.phase2.lr == 5e-5


def test_overrides_parse_types():
    cfg = get_preset("seed").with_overrides(
        ["data.image_size=64", "model.channels=16,32", "data.hflip=false", "data.max_per_class=none",
         "loss.vgg_weights=random", "train.phase2.lr=1e-3", "model.attention_resolutions=[]"])
    assert cfg.data.image_size == 64 and cfg.model.channels == (16, 32) and cfg.data.hflip is False
    assert cfg.data.max_per_class is None and cfg.loss.vgg_weights == "random" and cfg.train.phase2.lr == 1e-3
    assert cfg.model.attention_resolutions == ()
    assert get_preset("seed").data.image_size == 128  # the preset itself is untouched


@pytest.mark.parametrize("override,match", [
    ("data.image_size=65", "data.image_size=65 is invalid"),
    ("data.image_size=abc", "not a valid int"),
    ("data.imagesize=64", "unknown config key 'data.imagesize'"),
    ("nope.x=1", "unknown config key"),
    ("train.phase1=3", "is a section"),
    ("loss.recon=huber", "expected l1 or mse"),
    ("data.val_fraction=1.5", "between 0 and 1"),
    ("train.grad_clip=0", "positive max-norm"),
    ("loss.ssim_window=4", "odd window"),
    ("data.hflip=maybe", "not a valid bool"),
    ("image_size", "section.key=value"),
])
def test_bad_overrides_raise_value_error_naming_the_field(override, match):
    with pytest.raises(ValueError, match=match):
        get_preset("seed").with_overrides([override])


def test_bad_json_and_unknown_preset():
    with pytest.raises(ConfigError, match="not valid JSON"):
        Config.from_json("{not json")
    with pytest.raises(ConfigError, match="unknown config key 'model.width'"):
        Config.from_json('{"model": {"width": 3}}')
    with pytest.raises(ConfigError, match="does not exist"):
        Config.from_json("/no/such/config.json")
    with pytest.raises(ConfigError, match="choose one of"):
        get_preset("huge")


def test_zero_total_epochs_is_rejected():
    cfg = get_preset("smoke")
    with pytest.raises(ConfigError, match="at least one epoch"):
        cfg.with_overrides(["train.phase1.epochs=0", "train.phase2.epochs=0"])


def test_every_field_has_a_default_reason_comment():
    import inspect

    from spatialvae import config
    src = inspect.getsource(config)
    for cls in (config.DataConfig, config.ModelConfig, config.LossConfig, config.PhaseConfig, config.TrainConfig):
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(f.type) or f.name.startswith("phase"):
                continue
            line = next(line for line in src.splitlines() if line.strip().startswith(f"{f.name}:"))
            assert "#" in line, f"{cls.__name__}.{f.name} has no reason comment"
