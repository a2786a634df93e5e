from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import re
import typing
from pathlib import Path

import pytest

from spatialvae.config import PRESETS, Config, get_preset
from spatialvae.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


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


def test_quick128_is_the_seed_model_at_the_quick_budget():
    q128, q, seed = get_preset("quick128"), get_preset("quick"), get_preset("seed")
    assert q128.data.image_size == 128 and q128.model == seed.model  # the recipe's model, widths and skips
    assert (q128.data.max_per_class, q128.data.batch_size) == (q.data.max_per_class, q.data.batch_size)
    p1, p2 = q128.train.phase1, q128.train.phase2
    assert p1.cosine_t0 == p1.epochs and p2.beta_anneal_epochs < p2.epochs  # one cosine cycle; last epoch at 1e-3
    assert p2.beta_end == seed.train.phase2.beta_end and q128.prior.enabled
    # the texture stage: on at the CPU's 128 px, off where the recipe is kept as written
    assert q128.texture.enabled and not q.texture.enabled and not seed.texture.enabled
    assert not get_preset("seed-literal").texture.enabled


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


def _leaf_fields(cls=Config, prefix: str = ""):
    """(dotted key, owning dataclass) of every settable field of Config, sections walked recursively."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            yield from _leaf_fields(hints[f.name], f"{prefix}{f.name}.")
        else:
            yield prefix + f.name, cls


LEAF_KEYS = [key for key, _ in _leaf_fields()]


def _get(cfg, key: str):
    return functools.reduce(getattr, key.split("."), cfg)


def _as_set_value(value) -> str:
    """A value as one would type it after --set (the command-line spelling, not JSON)."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value) if value else "[]"
    if isinstance(value, float):
        return repr(value)
    return str(value)


def test_the_walk_finds_every_section():
    # Guards the walk itself: if it missed a section, the per-field tests below would silently shrink.
    sections = {key.rsplit(".", 1)[0] for key in LEAF_KEYS if "." in key}
    assert sections >= {"data", "model", "loss", "train", "train.phase1", "train.phase2", "prior"}
    assert "preset" in LEAF_KEYS and len(LEAF_KEYS) == len(set(LEAF_KEYS)) >= 60


@pytest.mark.parametrize("key", LEAF_KEYS)
def test_every_field_can_be_set_from_the_command_line_and_round_trips(key):
    """Each field is reachable with --set, for every value the presets give it, and survives JSON."""
    values = []
    for name in sorted(PRESETS):
        v = _get(get_preset(name), key)
        if v not in values:
            values.append(v)
    for name in sorted(PRESETS):
        cfg = get_preset(name)
        # Its own value, typed as a string, gives back exactly the same config (type included).
        same = cfg.with_overrides([f"{key}={_as_set_value(_get(cfg, key))}"])
        assert same == cfg, (name, key)
        assert type(_get(same, key)) is type(_get(cfg, key))
    base = get_preset("seed")
    for v in values:  # the values other presets use: a real change of this one field
        changed = base.with_overrides([f"{key}={_as_set_value(v)}"])
        assert _get(changed, key) == v and type(_get(changed, key)) is type(v)
        assert [k for k in LEAF_KEYS if _get(changed, k) != _get(base, k)] == ([key] if v != _get(base, key) else [])
        again = Config.from_json(changed.to_json())
        assert again == changed and type(_get(again, key)) is type(v)
        # A partial JSON file holding only this key (missing keys keep their defaults) sets it too.
        *sections, leaf = key.split(".")
        partial: dict = {leaf: json.loads(json.dumps(v))}
        for sec in reversed(sections):
            partial = {sec: partial}
        assert _get(Config.from_dict(partial), key) == v


def test_every_field_has_a_default_reason_comment():
    """Every settable field documents why it has its default: a comment on its line in its own class,
    or a comment block right above it (the config module is where the defaults are explained)."""
    for key, cls in _leaf_fields():
        name = key.rsplit(".", 1)[-1]
        lines = inspect.getsource(cls).splitlines()
        idx = [i for i, line in enumerate(lines) if re.match(rf"\s+{name}\s*:", line)]
        assert len(idx) == 1, f"{cls.__name__}.{name}: not found once in its class body"
        line, above = lines[idx[0]], lines[idx[0] - 1].strip()
        comment = line.partition("#")[2]
        assert comment.strip() or above.startswith("#"), f"{key} ({cls.__name__}.{name}) has no reason comment"


def _readme_config_mentions() -> list:
    text = "\n".join(p.read_text() for p in [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))])
    pattern = re.compile(r"(?<![\w./-])((?:data|model|loss|train|prior|texture)(?:\.[A-Za-z_]\w*)+)(?:=([^\s`\"'\])},;]+))?")
    found = []
    for m in pattern.finditer(text):
        key, value = m.group(1), m.group(2)
        if key.rsplit(".", 1)[-1] in ("py", "pt", "log", "json", "csv", "png", "md"):
            continue  # a file name such as prior.pt or train.log, not a config key
        found.append((key, value))
    return found


def test_every_config_key_the_readme_names_exists_and_its_values_are_accepted():
    mentions = _readme_config_mentions()
    assert len({k for k, _ in mentions}) >= 20  # README and docs do document the config (guards the regex)
    unknown = sorted({k for k, _ in mentions if k not in LEAF_KEYS})
    assert not unknown, f"README or docs name config keys that do not exist: {unknown}"
    seed = get_preset("seed")
    for key, value in mentions:
        if value is None or re.fullmatch(r"[A-Z]+", value):
            continue  # a bare key, or a placeholder such as data.batch_size=B
        got = _get(seed.with_overrides([f"{key}={value}"]), key)
        if got is None:
            assert value.lower() in ("none", "null"), (key, value)
        elif isinstance(got, (int, float)) and not isinstance(got, bool):
            assert got == float(value), (key, value, got)
        else:  # spelled back the way --set takes it (booleans in lower case)
            assert _as_set_value(got) == (value.lower() if isinstance(got, bool) else value), (key, value, got)
