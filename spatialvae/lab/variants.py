"""The ablation's variants: the recipe at ablation size and one-change copies of it (configs only).

Kept apart from `ablation` (which trains and evaluates them) so the CLI can list the variants
without importing torch. Each variant changes exactly one thing relative to ``recipe``
(`original` changes all of them at once, as the recipe's own baseline does).
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

from ..config import LITERAL_SETTINGS, Config, LossConfig, PhaseConfig, get_preset
from ..errors import ConfigError


@dataclass(frozen=True)
class Variant:
    name: str
    change: str  # what differs from `recipe`, in words (a table column)
    apply: Callable[[Config], None]  # edits a copy of the recipe config in place


def _set(overrides: dict) -> Callable[[Config], None]:
    def apply(cfg: Config) -> None:
        changed = cfg.with_overrides(overrides)  # validated copy
        for f in dataclasses.fields(cfg):
            setattr(cfg, f.name, getattr(changed, f.name))
    return apply


def _single_phase(cfg: Config) -> None:
    # One phase as long as both: KL at its final weight from the first step (no reconstruction-only
    # warm-up, no annealing), the phase-1 learning rate, ReduceLROnPlateau.
    t = cfg.train
    total = t.phase1.epochs + t.phase2.epochs
    beta = t.phase2.beta_end
    t.phase2 = PhaseConfig(epochs=total, lr=t.phase1.lr, scheduler="plateau", beta_start=beta, beta_end=beta,
                           beta_anneal_epochs=0, plateau_factor=t.phase2.plateau_factor,
                           plateau_patience=t.phase2.plateau_patience)
    t.phase1 = PhaseConfig(epochs=0)


def _original(cfg: Config) -> None:
    # The `original` preset's model, loss and single phase, on the recipe's data, widths and epoch
    # budget. OriginalVAE ignores attention/upsample/GroupNorm settings: it has none of them.
    orig = get_preset("original")
    total = cfg.train.phase1.epochs + cfg.train.phase2.epochs
    cfg.model.architecture = orig.model.architecture
    cfg.model.flat_latent_dim = orig.model.flat_latent_dim
    cfg.loss = copy.deepcopy(orig.loss)
    phase2 = copy.deepcopy(orig.train.phase2)
    phase2.epochs = total
    phase2.plateau_patience = cfg.train.phase2.plateau_patience
    cfg.train.phase1 = PhaseConfig(epochs=0)
    cfg.train.phase2 = phase2


VARIANTS: tuple[Variant, ...] = (
    Variant("recipe", "the recipe with this package's defaults (DC-AE skips, per-value KL)", lambda cfg: None),
    Variant("literal", "the recipe read literally: 1x1-conv skips from a random start, PyTorch's logvar init, "
                       "beta x summed KL", _set(LITERAL_SETTINGS)),
    Variant("conv_skips", "learned 1x1-conv skips from a random start, PyTorch's logvar init",
            _set({k: v for k, v in LITERAL_SETTINGS.items() if k.startswith("model.")})),
    Variant("kl_sum", "beta x the KL summed over the 1,024 latent values",
            _set({k: v for k, v in LITERAL_SETTINGS.items() if k.startswith("loss.")})),
    Variant("original", "flat 256-d latent, BatchNorm + LeakyReLU, transposed convs, no attention, "
                        "MSE (sum) + 0.5 KL, one phase", _original),
    Variant("no_perceptual", "no VGG perceptual term", _set({"loss.perceptual_weight": 0.0})),
    Variant("no_ssim", "no SSIM term", _set({"loss.ssim_weight": 0.0})),
    Variant("mse", "MSE instead of L1", _set({"loss.recon": "mse"})),
    Variant("no_attention", "no self-attention", _set({"model.attention_resolutions": []})),
    Variant("transposed", "transposed convs instead of bilinear + conv", _set({"model.upsample": "transposed"})),
    Variant("single_phase", "one phase: beta 1e-3 from the start, no reconstruction-only warm-up", _single_phase),
)
VARIANT_NAMES = tuple(v.name for v in VARIANTS)
PERCEPTUAL_MODES = ("imagenet", "random", "off")


def ablation_base(preset: str = "quick", epochs: tuple[int, int] = (8, 10), perceptual: str = "imagenet",
                  overrides: Sequence[str] = ()) -> Config:
    """The recipe at ablation size: ``preset`` (default quick: 64 px, 1,000 images per class) with
    ``epochs`` = (phase 1, phase 2) and the phase-2 annealing over the first half of phase 2.

    perceptual: "imagenet" (the recipe), "random" (explicit random VGG16 features) or "off"
    (perceptual_weight 0 for every variant; `no_perceptual` is then the recipe itself and skipped).
    """
    if perceptual not in PERCEPTUAL_MODES:
        raise ConfigError(f"perceptual={perceptual!r} is invalid: expected one of {', '.join(PERCEPTUAL_MODES)}")
    p1, p2 = epochs
    if p1 < 1 or p2 < 1:
        raise ConfigError(f"ablation epochs {epochs} are invalid: both phases need at least 1 epoch "
                          "(the single_phase variant is one of the comparisons)")
    cfg = get_preset(preset)
    t = cfg.train
    t.phase1.epochs, t.phase1.cosine_t0 = p1, p1  # one cosine cycle
    t.phase2.epochs, t.phase2.beta_anneal_epochs = p2, max(1, p2 // 2)
    t.sample_every = max(1, (p1 + p2) // 3)
    if perceptual == "off":
        cfg.loss.perceptual_weight = 0.0
    else:  # presets that switch the term off (smoke) get the recipe's weight back
        cfg.loss.perceptual_weight = cfg.loss.perceptual_weight or LossConfig().perceptual_weight
        cfg.loss.vgg_weights = perceptual
    cfg.preset = f"ablation-{preset}"
    return cfg.with_overrides(list(overrides))


def variant_configs(base: Config, names: Optional[Sequence[str]] = None) -> dict[str, Config]:
    """{name: config} for the chosen variants (default all), each one change away from ``base``.
    A variant identical to the recipe (no_perceptual when the perceptual term is off) is dropped."""
    names = list(names) if names else list(VARIANT_NAMES)
    unknown = [n for n in names if n not in VARIANT_NAMES]
    if unknown:
        raise ConfigError(f"unknown ablation variant(s) {', '.join(unknown)}: choose from {', '.join(VARIANT_NAMES)}")
    out: dict[str, Config] = {}
    for v in VARIANTS:
        if v.name not in names:
            continue
        cfg = copy.deepcopy(base)
        v.apply(cfg)
        cfg.validate()
        if v.name != "recipe" and cfg.to_dict() == base.to_dict():
            continue  # e.g. no_perceptual when the perceptual term is off everywhere
        out[v.name] = cfg
    return out
