"""Losses: pixel (L1 or MSE) + VGG16 perceptual + (1 - SSIM) + beta * KL.

    total = recon_weight * pixel + perceptual_weight * perceptual
            + ssim_weight * (1 - SSIM) + beta * KL

`VAELoss.forward` returns `(total, parts)`. `parts` always has the same five keys, each a
detached 0-dim fp32 tensor holding the UNWEIGHTED term (comparable across configs):

    recon       the pixel loss, L1 or MSE as chosen by loss.recon (no separate "l1" key)
    perceptual  mean over the chosen VGG layers of the feature L1
    ssim        1 - SSIM
    kl          KL(q(z|x) || N(0, I)) with loss.kl_reduction
    total       the weighted sum that was back-propagated

A term whose weight is 0 is not computed and reports 0.0 (so perceptual_weight=0 never builds
VGG). KL is always computed (it is cheap and worth watching in the beta = 0 phase) and enters
the total only when beta > 0.

The VGG network is frozen, always in eval mode, and kept out of `parameters()` and
`state_dict()` (it is held outside the module tree, see `PerceptualLoss`), so it never reaches
the optimizer or a checkpoint. Call `loss_fn.to(device)` to move it with the loss.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Dict, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from pytorch_msssim import ssim
from torchvision.models import VGG16_Weights
from torchvision.models.vgg import cfgs, make_layers

from .config import Config, LossConfig
from .errors import ConfigError, WeightsError, short_reason
from .model import clamp_logvar

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
VGG16_FILE = "vgg16-397923af.pth"  # torchvision's file name for VGG16_Weights.IMAGENET1K_V1
VGG16_N_FEATURES = 31  # len(torchvision.models.vgg16().features)


# ---- KL ---------------------------------------------------------------------------------------

def kl_divergence(mu: torch.Tensor, logvar: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """KL( N(mu, exp(logvar)) || N(0, I) ) for a diagonal Gaussian posterior, in fp32.

    Per latent value: 0.5 * (mu^2 + exp(logvar) - 1 - logvar). Inputs are cast up to fp32 (and
    autocast is disabled here), and logvar is clamped to [-30, 20], so fp16 inputs cannot overflow.

    reduction (`LossConfig.kl_reduction`, which validates it): "mean" (the default) is the mean per
    latent value, on the same per-value footing as the per-pixel L1 and SSIM, so the recipe's
    "very low beta" stays low; "sum" sums over an image's latent values and averages over the
    batch: the ELBO's KL, the literal reading, 1,024x the mean for a 64 x 4 x 4 latent.
    """
    with torch.autocast(device_type=mu.device.type, enabled=False):
        mu = mu.float()
        logvar = clamp_logvar(logvar.float())
        kl = 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar)  # (B, 64, 4, 4)
        if reduction == "mean":
            return kl.mean()
        return kl.flatten(1).sum(dim=1).mean()


# ---- SSIM -------------------------------------------------------------------------------------

def ssim_window_for(side: int, window: int = 11) -> int:
    """The largest odd window <= both `window` and the image side (pytorch-msssim otherwise
    skips the Gaussian blur on images smaller than its window)."""
    side_odd = side if side % 2 else side - 1
    return max(1, min(window, side_odd))


class SSIMLoss(nn.Module):
    """1 - SSIM (pytorch-msssim, data_range=1, averaged over the batch), computed in fp32.

    The Gaussian window (default 11) shrinks to the largest odd size that fits the image, so
    tiny images (e.g. 8 px in tests) work.
    """

    def __init__(self, window: int = 11, sigma: float = 1.5):
        super().__init__()
        self.window, self.sigma = window, sigma

    def forward(self, recon: torch.Tensor, x: torch.Tensor) -> torch.Tensor:

        win = ssim_window_for(min(x.shape[-2:]), self.window)
        # fp32: SSIM divides small variances; fp16 under autocast loses them.
        with torch.autocast(device_type=x.device.type, enabled=False):
            s = ssim(recon.float(), x.float(), data_range=1.0, size_average=True, win_size=win, win_sigma=self.sigma)
        return 1.0 - s


# ---- VGG perceptual loss ------------------------------------------------------------------------

def _weights_help(problem: str) -> str:
    hub = Path(torch.hub.get_dir()) / "checkpoints"
    return (f"{problem}. VGG16 weights are needed for the perceptual loss; fix one of: "
            f"(1) turn internet on (Kaggle: Settings > Internet) with loss.vgg_weights=imagenet so torchvision "
            f"downloads them into {hub}; "
            f"(2) set loss.vgg_weights=/path/to/{VGG16_FILE} (e.g. attached as a Kaggle dataset), "
            f"or put that file in {hub} ($TORCH_HOME/hub/checkpoints); "
            f"(3) set loss.perceptual_weight=0 to train without the perceptual loss")


def _vgg16_features_module() -> nn.Sequential:

    return make_layers(cfgs["D"], batch_norm=False)  # == vgg16().features, without the 120M-param classifier


def _features_state_dict(sd: dict) -> dict:
    """Accept a full torchvision VGG16 state dict ("features.0.weight", "classifier...") or a
    features-only one ("0.weight")."""
    if any(k.startswith("features.") for k in sd):
        return {k[len("features."):]: v for k, v in sd.items() if k.startswith("features.")}
    return dict(sd)


def load_vgg16_features(weights: str = "imagenet") -> nn.Sequential:
    """torchvision VGG16 `features` with the requested weights (see LossConfig.vgg_weights).

    "imagenet": VGG16_Weights.IMAGENET1K_V1 through torchvision's own cache
    ($TORCH_HOME/hub/checkpoints, downloaded and hash-checked if missing; only the `features`
    half is kept). A path: a state dict loaded with torch.load(weights_only=True). "random":
    explicit opt-in random features, with a loud warning. Anything that fails raises WeightsError:
    random weights are never substituted silently.

    Building the network never advances the global RNG (model init and shuffling stay identical
    with and without the perceptual loss); "random" features are seeded with 0.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        features = _vgg16_features_module()
        if weights == "random":
            # VGG's own init (kaiming fan_out), so activations keep their scale through the layers.
            for m in features.modules():
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                    nn.init.zeros_(m.bias)
    if weights == "random":
        msg = ("loss.vgg_weights=random: the perceptual loss uses RANDOM VGG16 features, not ImageNet ones; "
               "fine for tests and CPU smoke runs, meaningless for real training")
        warnings.warn(msg, UserWarning, stacklevel=2)  # the trainer's first log line repeats it
        return features

    if weights == "imagenet":

        try:
            sd = VGG16_Weights.IMAGENET1K_V1.get_state_dict(progress=True, check_hash=True)
        except Exception as e:  # URLError, hash mismatch, truncated cache file, ...
            raise WeightsError(_weights_help(
                f"could not load ImageNet VGG16 weights ({short_reason(e)})")) from e
        source = "ImageNet (torchvision cache)"
    else:
        path = Path(os.path.expandvars(weights)).expanduser()
        if not path.is_file():
            raise WeightsError(_weights_help(
                f"loss.vgg_weights={weights!r} is neither imagenet, random, nor an existing file"))
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise WeightsError(_weights_help(
                f"could not read VGG16 weights from {path} ({short_reason(e)})")) from e
        if not isinstance(sd, dict):
            raise WeightsError(_weights_help(f"{path} holds a {type(sd).__name__}, not a VGG16 state dict"))
        source = str(path)
    try:
        features.load_state_dict(_features_state_dict(sd), strict=True)
    except Exception as e:
        raise WeightsError(_weights_help(
            f"the VGG16 weights from {source} do not fit torchvision's vgg16 ({short_reason(e)})")) from e
    log.info("perceptual loss: VGG16 features from %s", source)
    return features


class PerceptualLoss(nn.Module):
    """L1 between VGG16 features of recon and target, averaged over `layers`.

    Default layers 3, 8, 15 = relu1_2, relu2_2, relu3_3 of `vgg16().features`; the network is cut
    after the last of them. Grayscale inputs in [0, 1] are repeated to 3 channels and normalised
    with the ImageNet mean/std. Each layer contributes the mean absolute feature difference and
    the layers are averaged (not summed), so the weight does not depend on how many layers are used.

    The VGG is frozen (requires_grad False), always in eval mode, and deliberately NOT registered
    as a submodule: it is absent from parameters() (never in the optimizer) and state_dict()
    (never in a checkpoint). `_apply` forwards .to()/.cuda()/.half() to it, so `loss.to(device)`
    moves it. Target features are computed under torch.no_grad().
    """

    def __init__(self, layers: Sequence[int] = (3, 8, 15), weights: str = "imagenet"):
        super().__init__()
        layers = tuple(int(i) for i in layers)
        if not layers or any(i < 0 or i >= VGG16_N_FEATURES for i in layers):
            raise ConfigError(f"loss.perceptual_layers={layers!r} is invalid: expected indices 0..{VGG16_N_FEATURES - 1} "
                              "into torchvision vgg16().features (the recipe uses 3, 8, 15)")
        self.layers = tuple(sorted(set(layers)))
        features = load_vgg16_features(weights)[: max(self.layers) + 1]  # drop everything after the last layer
        features.requires_grad_(False)
        features.eval()
        object.__setattr__(self, "vgg", features)  # outside the module tree on purpose (see docstring)
        # Non-persistent buffers: follow .to(device) but stay out of the state dict.
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self.vgg._apply(fn)
        return self

    def train(self, mode: bool = True) -> "PerceptualLoss":
        super().train(mode)
        self.vgg.eval()  # VGG has no dropout/BN in `features`, but stay safe if layers change
        return self

    def _features(self, x: torch.Tensor) -> list:
        if x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)  # (B, 3, H, W): VGG was trained on RGB
        x = (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)
        feats = []
        for i, layer in enumerate(self.vgg):
            x = layer(x)
            if i in self.layers:
                feats.append(x)
        return feats

    def forward(self, recon: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        f_recon = self._features(recon)
        with torch.no_grad():
            f_x = self._features(x)
        losses = [F.l1_loss(a.float(), b.float()) for a, b in zip(f_recon, f_x)]
        return torch.stack(losses).mean()


# ---- total ------------------------------------------------------------------------------------

PART_KEYS = ("recon", "perceptual", "ssim", "kl", "total")


class VAELoss(nn.Module):
    """recon_weight * pixel + perceptual_weight * perceptual + ssim_weight * (1 - SSIM) + beta * KL.

    forward(recon, x, mu, logvar, beta) -> (total, parts); see the module docstring for `parts`.
    """

    def __init__(self, cfg: LossConfig):
        super().__init__()
        self.cfg = cfg.validate()
        # Built only when used: perceptual_weight=0 never touches VGG (no weights needed).
        self.perceptual = PerceptualLoss(cfg.perceptual_layers, cfg.vgg_weights) if cfg.perceptual_weight > 0 else None
        self.ssim = SSIMLoss(cfg.ssim_window) if cfg.ssim_weight > 0 else None

    def forward(self, recon: torch.Tensor, x: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor,
                beta: float) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        c = self.cfg
        zero = torch.zeros((), device=x.device, dtype=torch.float32)
        total = zero
        parts: Dict[str, torch.Tensor] = {}
        if c.recon_weight > 0:
            pixel = F.l1_loss if c.recon == "l1" else F.mse_loss
            if c.pixel_reduction == "sum":  # summed over C*H*W, averaged over the batch: (B,) -> ()
                parts["recon"] = pixel(recon.float(), x.float(), reduction="sum") / x.shape[0]
            else:
                parts["recon"] = pixel(recon.float(), x.float())
            total = total + c.recon_weight * parts["recon"]
        if self.perceptual is not None:
            parts["perceptual"] = self.perceptual(recon, x).float()
            total = total + c.perceptual_weight * parts["perceptual"]
        if self.ssim is not None:
            parts["ssim"] = self.ssim(recon, x)
            total = total + c.ssim_weight * parts["ssim"]
        parts["kl"] = kl_divergence(mu, logvar, c.kl_reduction)
        if beta > 0:
            total = total + beta * parts["kl"]
        parts["total"] = total
        return total, {k: parts[k].detach() if k in parts else zero for k in PART_KEYS}


def build_loss(cfg: Union[Config, LossConfig]) -> VAELoss:
    """The training loss for a Config (or its LossConfig)."""
    return VAELoss(cfg.loss if isinstance(cfg, Config) else cfg)
