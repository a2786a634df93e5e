"""Models: the recipe's spatial-latent VAE and its flat-latent "original" baseline.

Layout follows latent-diffusion's `ldm/modules/diffusionmodules/model.py`: small modules
(`ResBlock`, `AttentionBlock`, `Upsample`), an `Encoder` and a `Decoder` built from a stage
plan, and a thin VAE wrapper. Shapes in comments are for the seed config at 128 px.

Stage plan. The encoder halves the side n_down = log2(image_size / latent_size) times: the
7x7 stem is the first halving, each further one is a stride-2 `ResBlock`. Stage i has width
`channels[i]`; when more stages are needed than widths are given, the last width repeats.
So with the seed widths (32, 64, 128, 256, 512) and a 4x4 latent, 128 px uses all five,
64 px uses the first four and 256 px uses (32, 64, 128, 256, 512, 512). The decoder mirrors
the encoder side by side, so a feature map of side s has the same width on both paths.

Every combination that cannot be built raises `ConfigError` in the constructor, naming the
field to change, so a bad config fails before any data is loaded.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import Config, ModelConfig
from .errors import ConfigError

# exp(20) still fits fp32 and exp(0.5 * 20) = 2.2e4 fits fp16 (max 6.5e4), so neither the
# reparameterisation under fp16 autocast nor the fp32 KL can overflow; -30 keeps exp() > 0.
LOGVAR_MIN = -30.0
LOGVAR_MAX = 20.0

UPSAMPLE_MODES = ("bilinear", "transposed")


def clamp_logvar(logvar: torch.Tensor) -> torch.Tensor:
    return logvar.clamp(LOGVAR_MIN, LOGVAR_MAX)


def Normalize(ch: int, groups: int) -> nn.GroupNorm:
    # GroupNorm, not BatchNorm: statistics per image, so batch size 1 sampling and small
    # last batches behave exactly like training.
    return nn.GroupNorm(num_groups=groups, num_channels=ch, eps=1e-6, affine=True)


# ---- building blocks ----------------------------------------------------------------------

class ResBlock(nn.Module):
    """Pre-activation residual block: (GroupNorm, SiLU, 3x3 conv) x 2 plus a skip.

    stride=2 halves the side in the first conv; the skip is then a strided 1x1 conv (also
    used when the width changes) so the two paths can be added.
    """

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1, groups: int = 8):
        super().__init__()
        if stride not in (1, 2):
            raise ConfigError(f"ResBlock stride={stride} is invalid: expected 1 or 2")
        for ch in (in_ch, out_ch):
            if ch % groups:
                raise ConfigError(f"ResBlock width {ch} is not divisible by model.norm_groups={groups}: "
                                  f"use widths that are multiples of {groups} or change model.norm_groups")
        self.in_ch, self.out_ch, self.stride = in_ch, out_ch, stride
        self.norm1 = Normalize(in_ch, groups)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1)
        self.norm2 = Normalize(out_ch, groups)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, stride=1, padding=1)
        if in_ch != out_ch or stride != 1:
            self.skip = nn.Conv2d(in_ch, out_ch, 1, stride=stride)
        else:
            self.skip = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))  # (B, out_ch, H/stride, W/stride)
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class AttentionBlock(nn.Module):
    """Self-attention over all H*W positions, single- or multi-head, with a residual.

    All heads go through one `scaled_dot_product_attention` call (fused kernel on GPU,
    1/sqrt(head_dim) scaling); 16x16 = 256 tokens keeps the attention matrix small.
    """

    def __init__(self, ch: int, heads: int = 1, groups: int = 8):
        super().__init__()
        if heads < 1 or ch % heads:
            raise ConfigError(f"model.attention_heads={heads} does not divide the width {ch} at an attention "
                              f"resolution: pick a head count that divides {ch} (e.g. 1)")
        if ch % groups:
            raise ConfigError(f"attention width {ch} is not divisible by model.norm_groups={groups}: "
                              f"use widths that are multiples of {groups} or change model.norm_groups")
        self.ch, self.heads = ch, heads
        self.norm = Normalize(ch, groups)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)  # q, k and v in one matmul
        self.proj = nn.Conv2d(ch, ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        qkv = self.qkv(self.norm(x))  # (B, 3C, H, W)
        qkv = qkv.reshape(b, 3, self.heads, c // self.heads, h * w)  # (B, 3, heads, d, HW)
        q, k, v = qkv.permute(1, 0, 2, 4, 3).unbind(0)  # each (B, heads, HW, d)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, heads, HW, d)
        out = out.transpose(2, 3).reshape(b, c, h, w)  # heads back into channels: (B, C, H, W)
        return x + self.proj(out)


class Upsample(nn.Module):
    """2x upsampling. bilinear (the recipe) has no checkerboard artefacts; transposed is the
    ablation (a learned 4x4 stride-2 ConvTranspose2d)."""

    def __init__(self, ch: int, mode: str = "bilinear"):
        super().__init__()
        if mode not in UPSAMPLE_MODES:
            raise ConfigError(f"model.upsample={mode!r} is invalid: expected one of {', '.join(UPSAMPLE_MODES)}")
        self.mode = mode
        self.up = nn.ConvTranspose2d(ch, ch, 4, stride=2, padding=1) if mode == "transposed" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.up is not None:
            return self.up(x)  # (B, C, 2H, 2W)
        return F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)  # (B, C, 2H, 2W)


# ---- stage plan and validation --------------------------------------------------------------

def stage_plan(cfg: ModelConfig, image_size: int) -> Tuple[list, list]:
    """Widths and output sides of the encoder stages, stem first.

    Seed at 128 px: widths [32, 64, 128, 256, 512], sides [64, 32, 16, 8, 4].
    Raises ConfigError when image_size is not latent_size * 2^k (k >= 1) or widths are empty.
    """
    ls = cfg.latent_size
    if ls < 1 or image_size < 2:
        raise ConfigError(f"model.latent_size={ls} with data.image_size={image_size}: both must be positive "
                          "and the image larger than the latent grid (e.g. 128 and 4)")
    ratio = image_size // ls
    if image_size % ls or ratio < 2 or ratio & (ratio - 1):
        fits = [ls * 2 ** k for k in range(1, 9) if ls * 2 ** k <= max(4096, 2 * image_size)][:6]
        raise ConfigError(
            f"data.image_size={image_size} cannot be reduced to model.latent_size={ls} by 2x downsamplings: "
            f"the image side must be latent_size * 2^k with k >= 1 (for latent_size {ls}: "
            f"{', '.join(map(str, fits))}); change data.image_size or model.latent_size")
    n_down = ratio.bit_length() - 1
    if not cfg.channels or any(c < 1 for c in cfg.channels):
        raise ConfigError(f"model.channels={tuple(cfg.channels)!r} is invalid: expected positive widths, "
                          "stem first, e.g. [32, 64, 128, 256, 512]")
    widths = [int(cfg.channels[min(i, len(cfg.channels) - 1)]) for i in range(n_down)]
    sides = [image_size >> (i + 1) for i in range(n_down)]
    return widths, sides


def _validate_spatial(cfg: ModelConfig, image_size: int) -> Tuple[list, list]:
    widths, sides = stage_plan(cfg, image_size)
    if cfg.in_channels < 1 or cfg.latent_channels < 1:
        raise ConfigError(f"model.in_channels={cfg.in_channels} and model.latent_channels={cfg.latent_channels} "
                          "must both be at least 1")
    g = cfg.norm_groups
    if g < 1:
        raise ConfigError(f"model.norm_groups={g} is invalid: expected at least 1 (the recipe uses 8)")
    bad = sorted({w for w in widths if w % g})
    if bad:
        raise ConfigError(f"model.channels width(s) {bad} not divisible by model.norm_groups={g} "
                          f"(widths used at image_size {image_size}: {widths}): use multiples of {g} "
                          "or set model.norm_groups to a common divisor")
    missing = sorted(set(cfg.attention_resolutions) - set(sides))
    if missing:
        raise ConfigError(f"model.attention_resolutions={tuple(cfg.attention_resolutions)!r}: side(s) {missing} "
                          f"never occur at image_size {image_size} (feature map sides: {sides}); "
                          "use sides from that list, or [] for no attention")
    h = cfg.attention_heads
    for w, s in zip(widths, sides):
        if s in cfg.attention_resolutions and (h < 1 or w % h):
            raise ConfigError(f"model.attention_heads={h} does not divide the width {w} at the {s}x{s} "
                              f"attention: use a head count dividing {w} (the recipe uses 1)")
    up = getattr(cfg, "upsample", "bilinear")
    if up not in UPSAMPLE_MODES:
        raise ConfigError(f"model.upsample={up!r} is invalid: expected one of {', '.join(UPSAMPLE_MODES)}")
    return widths, sides


# ---- encoder / decoder ----------------------------------------------------------------------

class Encoder(nn.Module):
    """x (B, 1, 128, 128) -> mu, logvar, each (B, 64, 4, 4)."""

    def __init__(self, in_channels: int, widths: Sequence[int], latent_channels: int, image_size: int,
                 attention_resolutions: Sequence[int] = (16,), attention_heads: int = 1, norm_groups: int = 8):
        super().__init__()
        attn = set(attention_resolutions)
        side = image_size // 2
        # A 7x7 stride-2 stem sees a wide context at full resolution and halves the cost of
        # every later layer.
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, widths[0], 7, stride=2, padding=3),
            Normalize(widths[0], norm_groups),
            nn.SiLU(),
        )  # (B, 32, 64, 64)
        blocks: list = []
        if side in attn:
            blocks.append(AttentionBlock(widths[0], attention_heads, norm_groups))
        for i in range(1, len(widths)):
            blocks.append(ResBlock(widths[i - 1], widths[i], stride=2, groups=norm_groups))
            side //= 2  # (B, 64, 32, 32) -> (B, 128, 16, 16) -> (B, 256, 8, 8) -> (B, 512, 4, 4)
            if side in attn:
                # Global context at 16x16: lungs left and right, heart and diaphragm are related.
                blocks.append(AttentionBlock(widths[i], attention_heads, norm_groups))
        self.blocks = nn.Sequential(*blocks)
        self.norm_out = Normalize(widths[-1], norm_groups)
        # Separate heads so mu and logvar are read from the same normalised 4x4 features.
        self.to_mu = nn.Conv2d(widths[-1], latent_channels, 3, padding=1)
        self.to_logvar = nn.Conv2d(widths[-1], latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        h = self.blocks(self.stem(x))  # (B, 512, 4, 4)
        h = F.silu(self.norm_out(h))
        return self.to_mu(h), self.to_logvar(h)  # (B, 64, 4, 4) each


class Decoder(nn.Module):
    """z (B, 64, 4, 4) -> image (B, 1, 128, 128) in [0, 1]."""

    def __init__(self, out_channels: int, widths: Sequence[int], latent_channels: int, image_size: int,
                 attention_resolutions: Sequence[int] = (16,), attention_heads: int = 1, norm_groups: int = 8,
                 upsample: str = "bilinear"):
        super().__init__()
        attn = set(attention_resolutions)
        side = image_size >> len(widths)
        self.conv_in = nn.Conv2d(latent_channels, widths[-1], 3, padding=1)  # (B, 512, 4, 4)
        blocks: list = []
        if side in attn:
            blocks.append(AttentionBlock(widths[-1], attention_heads, norm_groups))
        for i in range(len(widths) - 1, 0, -1):
            # Upsample first, then a ResBlock at the new side mixes and narrows the channels.
            blocks.append(Upsample(widths[i], upsample))
            blocks.append(ResBlock(widths[i], widths[i - 1], stride=1, groups=norm_groups))
            side *= 2  # (B, 256, 8, 8) -> (B, 128, 16, 16) -> (B, 64, 32, 32) -> (B, 32, 64, 64)
            if side in attn:
                blocks.append(AttentionBlock(widths[i - 1], attention_heads, norm_groups))
        self.blocks = nn.Sequential(*blocks)
        self.up_out = Upsample(widths[0], upsample)  # (B, 32, 128, 128)
        self.conv_out = nn.Sequential(
            nn.Conv2d(widths[0], widths[0], 3, padding=1),
            Normalize(widths[0], norm_groups),
            nn.SiLU(),
            nn.Conv2d(widths[0], out_channels, 3, padding=1),
        )  # (B, 1, 128, 128)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.blocks(self.conv_in(z))  # (B, 32, 64, 64)
        # Sigmoid: pixels live in [0, 1], which L1, SSIM (data_range=1) and VGG all assume.
        return torch.sigmoid(self.conv_out(self.up_out(h)))  # (B, 1, 128, 128)


# ---- VAEs -------------------------------------------------------------------------------------

class _VAEBase(nn.Module):
    """Shared VAE plumbing: reparameterisation, forward and prior sampling."""

    image_size: int
    _latent_shape: Tuple[int, ...]

    @property
    def latent_shape(self) -> Tuple[int, ...]:
        """Shape of one image's latent, without the batch dimension."""
        return self._latent_shape

    def encode(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def decode(self, z: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    @staticmethod
    def reparameterize(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
        """z = mu + sigma * eps, eps ~ N(0, I); logvar clamped so exp() cannot overflow."""
        std = torch.exp(0.5 * clamp_logvar(logvar))
        return mu + std * torch.randn_like(std)

    def forward(self, x: torch.Tensor, sample_posterior: bool = True):
        """x (B, C, H, W) in [0, 1] -> (recon, mu, logvar). sample_posterior=False decodes mu
        (deterministic reconstructions for grids and metrics)."""
        mu, logvar = self.encode(x)
        z = self.reparameterize(mu, logvar) if sample_posterior else mu
        return self.decode(z), mu, logvar

    @torch.no_grad()
    def sample(self, n: int, generator: Optional[torch.Generator] = None,
               device: Optional[torch.device | str] = None) -> torch.Tensor:
        """Decode n draws from the prior N(0, I) -> (n, C, H, W) in [0, 1].

        The noise is drawn on `device` (default: the generator's device if one is given, else
        the model's), so a seeded generator gives the same images on every call. Decoding runs
        on the model's device, in eval mode (running BatchNorm statistics for the original
        model); the previous train/eval mode is restored.
        """
        model_device = next(self.parameters()).device
        if device is None:
            device = generator.device if generator is not None else model_device
        z = torch.randn((n, *self.latent_shape), generator=generator, device=device)
        was_training = self.training
        self.eval()
        try:
            return self.decode(z.to(model_device))
        finally:
            self.train(was_training)


class SpatialVAE(_VAEBase):
    """The recipe: a convolutional VAE with a spatial (64, 4, 4) latent, GroupNorm + SiLU,
    self-attention at 16x16 and bilinear upsampling."""

    def __init__(self, model_cfg: ModelConfig, image_size: int):
        super().__init__()
        widths, sides = _validate_spatial(model_cfg, image_size)
        self.image_size = image_size
        self.widths, self.sides = widths, sides
        self._latent_shape = (model_cfg.latent_channels, model_cfg.latent_size, model_cfg.latent_size)
        common = dict(widths=widths, latent_channels=model_cfg.latent_channels, image_size=image_size,
                      attention_resolutions=tuple(model_cfg.attention_resolutions),
                      attention_heads=model_cfg.attention_heads, norm_groups=model_cfg.norm_groups)
        self.encoder = Encoder(model_cfg.in_channels, **common)
        self.decoder = Decoder(model_cfg.in_channels, upsample=getattr(model_cfg, "upsample", "bilinear"), **common)

    def encode(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        mu, logvar = self.encoder(x)  # (B, 64, 4, 4) each
        return mu, clamp_logvar(logvar)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z)  # (B, 1, 128, 128)


class OriginalVAE(_VAEBase):
    """The recipe's flat-latent baseline, kept for comparison: strided 4x4 convs with
    BatchNorm + LeakyReLU down to latent_size, a flattened `flat_latent_dim` (256) latent via
    linear layers, ConvTranspose2d upsampling back, no attention. Uses the same width plan as
    SpatialVAE (attention_resolutions, norm_groups and upsample are ignored)."""

    def __init__(self, model_cfg: ModelConfig, image_size: int):
        super().__init__()
        widths, _ = stage_plan(model_cfg, image_size)
        if model_cfg.flat_latent_dim < 1 or model_cfg.in_channels < 1:
            raise ConfigError(f"model.flat_latent_dim={model_cfg.flat_latent_dim} and model.in_channels="
                              f"{model_cfg.in_channels} must both be at least 1")
        self.image_size = image_size
        self.widths = widths
        ls, d = model_cfg.latent_size, model_cfg.flat_latent_dim
        self._latent_shape = (d,)
        self._feat_shape = (widths[-1], ls, ls)
        feat = widths[-1] * ls * ls

        enc: list = []
        ch = model_cfg.in_channels
        for w in widths:
            # bias=False: BatchNorm's shift makes a conv bias redundant.
            enc += [nn.Conv2d(ch, w, 4, stride=2, padding=1, bias=False), nn.BatchNorm2d(w), nn.LeakyReLU(0.2)]
            ch = w
        self.encoder = nn.Sequential(*enc)  # (B, 512, 4, 4)
        self.fc_mu = nn.Linear(feat, d)  # (B, 256)
        self.fc_logvar = nn.Linear(feat, d)  # (B, 256)

        self.fc_dec = nn.Sequential(nn.Linear(d, feat), nn.LeakyReLU(0.2))  # (B, 8192) -> (B, 512, 4, 4)
        dec: list = []
        for i in range(len(widths) - 1, 0, -1):
            dec += [nn.ConvTranspose2d(widths[i], widths[i - 1], 4, stride=2, padding=1, bias=False),
                    nn.BatchNorm2d(widths[i - 1]), nn.LeakyReLU(0.2)]
        dec += [nn.ConvTranspose2d(widths[0], model_cfg.in_channels, 4, stride=2, padding=1), nn.Sigmoid()]
        self.decoder = nn.Sequential(*dec)  # (B, 1, 128, 128)

    def encode(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        h = self.encoder(x).flatten(1)  # (B, 8192)
        return self.fc_mu(h), clamp_logvar(self.fc_logvar(h))  # (B, 256) each

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        h = self.fc_dec(z).view(z.shape[0], *self._feat_shape)  # (B, 512, 4, 4)
        return self.decoder(h)  # (B, 1, 128, 128)


ARCHITECTURES = {"spatial": SpatialVAE, "original": OriginalVAE}


def build_model(cfg: Config) -> nn.Module:
    """The model named by cfg.model.architecture, for images of cfg.data.image_size."""
    arch = cfg.model.architecture
    if arch not in ARCHITECTURES:
        raise ConfigError(f"model.architecture={arch!r} is invalid: expected one of {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[arch](cfg.model, cfg.data.image_size)


def count_parameters(model: nn.Module, trainable_only: bool = True) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
