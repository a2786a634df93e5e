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

import math
from typing import Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import Config, ModelConfig
from .engine import eval_mode
from .errors import ConfigError

# exp(20) still fits fp32 and exp(0.5 * 20) = 2.2e4 fits fp16 (max 6.5e4), so neither the
# reparameterisation under fp16 autocast nor the fp32 KL can overflow; -30 keeps exp() > 0.
LOGVAR_MIN = -30.0
LOGVAR_MAX = 20.0


def clamp_logvar(logvar: torch.Tensor) -> torch.Tensor:
    return logvar.clamp(LOGVAR_MIN, LOGVAR_MAX)


def Normalize(ch: int, groups: int) -> nn.GroupNorm:
    # GroupNorm, not BatchNorm: statistics per image, so batch size 1 sampling and small
    # last batches behave exactly like training.
    return nn.GroupNorm(num_groups=groups, num_channels=ch, eps=1e-6, affine=True)


# ---- parameter-free shortcuts (DC-AE's "residual autoencoding") ------------------------------
#
# A strided block's skip is a fixed space-to-channel map instead of a learned 1x1 conv, and an
# upsampling block's skip is the matching channel-to-space map (Chen et al. 2024, DC-AE). With
# every residual branch starting at zero, the untrained autoencoder is exactly a fixed linear
# down/up-sampling map and training learns only what that map misses.
#
# Channel layout: duplicates are TILED (copy-major, x.repeat) and averaging merges channels that
# are out_ch apart (view(B, g, out_ch, ...)). pixel_unshuffle puts each new 2x2 offset in the
# lowest bits of the channel index, so averaging first merges tiled copies (no information lost)
# and, once every channel is distinct, merges the OLDEST offsets: those of the finest scale. The
# encoder's shortcut path is therefore exactly an area downsample, 2x2 at 64 px and 4x4 at 128 px
# (both 1,024 values, the latent's size), and the decoder's path undoes the layout exactly.

def match_channels(x: torch.Tensor, out_ch: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, out_ch, H, W): average channels out_ch apart, or tile copies."""
    b, c, h, w = x.shape
    if c == out_ch:
        return x
    if c > out_ch:
        return x.reshape(b, c // out_ch, out_ch, h, w).mean(1)
    return x.repeat(1, out_ch // c, 1, 1)


def space_to_channel(x: torch.Tensor, out_ch: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, out_ch, H/2, W/2): pixel_unshuffle(2), then match_channels."""
    return match_channels(F.pixel_unshuffle(x, 2), out_ch)


def channel_to_space(x: torch.Tensor, out_ch: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, out_ch, 2H, 2W): pixel_shuffle(2), then match_channels."""
    return match_channels(F.pixel_shuffle(x, 2), out_ch)


def _check_shortcut_widths(widths: Sequence[int], in_channels: int, latent_channels: int) -> None:
    """Every shortcut must be a whole-number average or copy; say which widths break it."""
    def fits(a: int, b: int) -> bool:
        return a % b == 0 or b % a == 0

    pairs = [("the input's 2x2 pixels", 4 * in_channels, widths[0])]
    pairs += [(f"stage {i} -> {i + 1}", 4 * widths[i - 1], widths[i]) for i in range(1, len(widths))]
    pairs += [("the widest stage -> latent", widths[-1], latent_channels)]
    pairs += [(f"decoder stage {i + 1} -> {i}", widths[i] // 4, widths[i - 1]) for i in range(1, len(widths))]
    bad = [f"{name} ({a} vs {b} channels)" for name, a, b in pairs if a < 1 or not fits(a, b)]
    if any(w % 4 for w in widths[1:]):
        bad.append(f"widths {list(widths[1:])} must be multiples of 4 for channel_to_space")
    if bad:
        raise ConfigError(f"model.shortcut=space needs widths that divide each other: {'; '.join(bad)}. Use "
                          "powers of two (e.g. [32, 64, 128, 256, 512]) or model.shortcut=conv")


# ---- building blocks ----------------------------------------------------------------------

class ResBlock(nn.Module):
    """Pre-activation residual block: (GroupNorm, SiLU, 3x3 conv) x 2 plus a skip.

    stride=2 halves the side in the first conv. The skip: ``shortcut="conv"`` (the recipe's
    literal form) is a strided 1x1 conv whenever the shape changes; ``"space"`` is the
    parameter-free space_to_channel (stride 2) and the second conv starts at zero, so the block
    starts as its skip; ``"none"`` returns the residual branch alone (an `UpBlock` adds its own).
    """

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1, groups: int = 8, shortcut: str = "conv"):
        super().__init__()
        if stride not in (1, 2):
            raise ConfigError(f"ResBlock stride={stride} is invalid: expected 1 or 2")
        for ch in (in_ch, out_ch):
            if ch % groups:
                raise ConfigError(f"ResBlock width {ch} is not divisible by model.norm_groups={groups}: "
                                  f"use widths that are multiples of {groups} or change model.norm_groups")
        self.in_ch, self.out_ch, self.stride, self.shortcut = in_ch, out_ch, stride, shortcut
        self.norm1 = Normalize(in_ch, groups)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1)
        self.norm2 = Normalize(out_ch, groups)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, stride=1, padding=1)
        if shortcut == "conv" and (in_ch != out_ch or stride != 1):
            self.skip = nn.Conv2d(in_ch, out_ch, 1, stride=stride)
        else:
            self.skip = nn.Identity()
        if shortcut != "conv":
            zero_(self.conv2)

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))  # (B, out_ch, H/stride, W/stride)
        return self.conv2(F.silu(self.norm2(h)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.branch(x)
        if self.shortcut == "none":
            return h
        if self.shortcut == "space" and self.stride == 2:
            return space_to_channel(x, self.out_ch) + h
        if self.shortcut == "space" and self.in_ch != self.out_ch:
            return match_channels(x, self.out_ch) + h
        return self.skip(x) + h


def zero_(module: nn.Module) -> nn.Module:
    """Zero a layer's weights and bias: a residual branch ending in it starts as "add nothing"."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class AttentionBlock(nn.Module):
    """Self-attention over all H*W positions, single- or multi-head, with a residual.

    All heads go through one `scaled_dot_product_attention` call (fused kernel on CPU and GPU,
    1/sqrt(head_dim) scaling); 16x16 = 256 tokens keeps the attention matrix small. The fused
    kernels need q, k and v with head_dim as the unit-stride axis: the 1x1 convs run on an NHWC
    (channels_last) tensor so that their output is laid out that way (NCHW would leave HW there and
    send SDPA down the unfused math path; tests/test_attention.py checks which kernel runs).
    """

    def __init__(self, ch: int, heads: int = 1, groups: int = 8, zero_init: bool = False):
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
        if zero_init:  # starts as the identity (with shortcut=space, so the whole model is its skip path)
            zero_(self.proj)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        hn = self.norm(x).contiguous(memory_format=torch.channels_last)  # (B, C, H, W) stored NHWC (no-op if so)
        qkv = self.qkv(hn)  # (B, 3C, H, W), stored NHWC like its input
        qkv = qkv.reshape(b, 3, self.heads, c // self.heads, h * w)  # (B, 3, heads, d, HW): a view, d unit-stride
        q, k, v = qkv.permute(1, 0, 2, 4, 3).unbind(0)  # each (B, heads, HW, d), d unit-stride: fused SDPA
        out = F.scaled_dot_product_attention(q, k, v)  # (B, heads, HW, d)
        out = out.transpose(2, 3).reshape(b, c, h, w)  # heads back into channels: (B, C, H, W)
        return x + self.proj(out)


class Upsample(nn.Module):
    """2x upsampling. bilinear (the recipe) has no checkerboard artefacts; transposed is the
    ablation (a learned 4x4 stride-2 ConvTranspose2d)."""

    def __init__(self, ch: int, mode: str = "bilinear"):
        super().__init__()
        self.mode = mode
        self.up = nn.ConvTranspose2d(ch, ch, 4, stride=2, padding=1) if mode == "transposed" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.up is not None:
            return self.up(x)  # (B, C, 2H, 2W)
        return F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)  # (B, C, 2H, 2W)


class UpBlock(nn.Module):
    """2x upsampling + a residual branch that narrows the width, with the channel_to_space skip
    (shortcut=space): (B, C, H, W) -> (B, out_ch, 2H, 2W). The branch upsamples as the recipe
    says (bilinear, or transposed for the ablation) and starts at zero."""

    def __init__(self, in_ch: int, out_ch: int, groups: int = 8, mode: str = "bilinear"):
        super().__init__()
        self.out_ch = out_ch
        self.up = Upsample(in_ch, mode)
        self.res = ResBlock(in_ch, out_ch, stride=1, groups=groups, shortcut="none")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return channel_to_space(x, self.out_ch) + self.res(self.up(x))


# ---- stage plan and validation --------------------------------------------------------------

def stage_plan(cfg: ModelConfig, image_size: int) -> Tuple[list, list]:
    """Widths and output sides of the encoder stages, stem first.

    Seed at 128 px: widths [32, 64, 128, 256, 512], sides [64, 32, 16, 8, 4]. Raises ConfigError
    for an invalid field (`ModelConfig.validate`) or when image_size is not latent_size * 2^k (k >= 1).
    """
    cfg.validate()
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
    widths = [int(cfg.channels[min(i, len(cfg.channels) - 1)]) for i in range(n_down)]
    sides = [image_size >> (i + 1) for i in range(n_down)]
    return widths, sides


def _validate_spatial(cfg: ModelConfig, image_size: int) -> Tuple[list, list]:
    widths, sides = stage_plan(cfg, image_size)
    g = cfg.norm_groups
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
    if cfg.shortcut == "space":
        _check_shortcut_widths(widths, cfg.in_channels, cfg.latent_channels)
    return widths, sides


def decoder_skip_side(cfg: ModelConfig, sides: Sequence[int]) -> Optional[int]:
    """The feature side the decoder's bicubic output skip starts from (None: the last one).

    ``model.decoder_skip=latent``: the side s with s * s = the latent's values, where the untrained
    decoder holds the area-downsampled image itself (32 at 128 px: bicubic x4 instead of nearest x2
    then bicubic x2). Without such a side (latent values not a square) it falls back to the last.
    """
    if cfg.decoder_skip != "latent":
        return None
    s = math.isqrt(cfg.latent_channels * cfg.latent_size ** 2)
    return s if s * s == cfg.latent_channels * cfg.latent_size ** 2 and s in sides else None


# ---- encoder / decoder ----------------------------------------------------------------------

class Encoder(nn.Module):
    """x (B, 1, 128, 128) -> mu, logvar, each (B, 64, 4, 4).

    shortcut="space": the stem, every strided block and the mu head add a parameter-free
    space_to_channel / channel-average skip, and each branch starts at zero, so the untrained
    encoder's mu is exactly an area downsample of the image (4x4 at 128 px, 2x2 at 64 px).
    """

    def __init__(self, in_channels: int, widths: Sequence[int], latent_channels: int, image_size: int,
                 attention_resolutions: Sequence[int] = (16,), attention_heads: int = 1, norm_groups: int = 8,
                 shortcut: str = "space", logvar_init: Optional[float] = -8.0):
        super().__init__()
        attn = set(attention_resolutions)
        space = shortcut == "space"
        self.space = space
        self.widths, self.latent_channels = list(widths), latent_channels
        side = image_size // 2
        # A 7x7 stride-2 stem sees a wide context at full resolution and halves the cost of
        # every later layer.
        if space:  # conv + skip; the next block is pre-activation, so no norm here
            self.stem = zero_(nn.Conv2d(in_channels, widths[0], 7, stride=2, padding=3))
        else:
            self.stem = nn.Sequential(
                nn.Conv2d(in_channels, widths[0], 7, stride=2, padding=3),
                Normalize(widths[0], norm_groups),
                nn.SiLU(),
            )  # (B, 32, 64, 64)
        blocks: list = []
        if side in attn:
            blocks.append(AttentionBlock(widths[0], attention_heads, norm_groups, zero_init=space))
        for i in range(1, len(widths)):
            blocks.append(ResBlock(widths[i - 1], widths[i], stride=2, groups=norm_groups, shortcut=shortcut))
            side //= 2  # (B, 64, 32, 32) -> (B, 128, 16, 16) -> (B, 256, 8, 8) -> (B, 512, 4, 4)
            if side in attn:
                # Global context at 16x16: lungs left and right, heart and diaphragm are related.
                blocks.append(AttentionBlock(widths[i], attention_heads, norm_groups, zero_init=space))
        self.blocks = nn.Sequential(*blocks)
        self.norm_out = Normalize(widths[-1], norm_groups)
        # Separate heads so mu and logvar are read from the same normalised 4x4 features.
        self.to_mu = nn.Conv2d(widths[-1], latent_channels, 3, padding=1)
        self.to_logvar = nn.Conv2d(widths[-1], latent_channels, 3, padding=1)
        if space:
            zero_(self.to_mu)
        if logvar_init is not None:
            # A near-deterministic posterior from the first step (sigma = exp(-4) = 0.018 at -8):
            # phase 1 is an autoencoder at once instead of first learning to shrink the noise.
            zero_(self.to_logvar)
            nn.init.constant_(self.to_logvar.bias, float(logvar_init))

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        if self.space:
            h = self.stem(x) + space_to_channel(x, self.widths[0])  # (B, 32, 64, 64)
        else:
            h = self.stem(x)
        h = self.blocks(h)  # (B, 512, 4, 4)
        a = F.silu(self.norm_out(h))
        mu = self.to_mu(a)
        if self.space:
            mu = mu + match_channels(h, self.latent_channels)  # (B, 64, 4, 4): the area-downsampled image
        return mu, self.to_logvar(a)  # (B, 64, 4, 4) each


class Decoder(nn.Module):
    """z (B, 64, 4, 4) -> image (B, 1, 128, 128) in [0, 1].

    shortcut="space": conv_in adds the latent tiled to its width, each upsampling block adds a
    channel_to_space skip, and the output adds (in logit space, before the Sigmoid) the channel
    mean of the features at side ``skip_side``, upsampled bicubically. Untrained, it decodes an
    area-downsampled image back to its bicubic upsample. ``skip_side`` None = the last feature map
    (at 128 px that map is the 32x32 content repeated nearest-neighbour to 64x64).
    """

    def __init__(self, out_channels: int, widths: Sequence[int], latent_channels: int, image_size: int,
                 attention_resolutions: Sequence[int] = (16,), attention_heads: int = 1, norm_groups: int = 8,
                 upsample: str = "bilinear", shortcut: str = "space", skip_side: Optional[int] = None):
        super().__init__()
        attn = set(attention_resolutions)
        space = shortcut == "space"
        self.space, self.widths, self.out_channels = space, list(widths), out_channels
        side = image_size >> len(widths)
        skip_side = skip_side or image_size // 2
        self.skip_scale = image_size // skip_side  # bicubic factor of the output skip
        self.conv_in = nn.Conv2d(latent_channels, widths[-1], 3, padding=1)  # (B, 512, 4, 4)
        if space:
            zero_(self.conv_in)
        blocks: list = []
        if side in attn:
            blocks.append(AttentionBlock(widths[-1], attention_heads, norm_groups, zero_init=space))
        self.skip_after = len(blocks)  # moved below to the block that reaches skip_side
        for i in range(len(widths) - 1, 0, -1):
            if space:
                blocks.append(UpBlock(widths[i], widths[i - 1], norm_groups, upsample))
            else:
                # Upsample first, then a ResBlock at the new side mixes and narrows the channels.
                blocks.append(Upsample(widths[i], upsample))
                blocks.append(ResBlock(widths[i], widths[i - 1], stride=1, groups=norm_groups))
            side *= 2  # (B, 256, 8, 8) -> (B, 128, 16, 16) -> (B, 64, 32, 32) -> (B, 32, 64, 64)
            if side in attn:
                blocks.append(AttentionBlock(widths[i - 1], attention_heads, norm_groups, zero_init=space))
            if side == skip_side:
                self.skip_after = len(blocks)  # blocks[:skip_after] reach the skip's side
        self.blocks = nn.Sequential(*blocks)
        self.up_out = Upsample(widths[0], upsample)  # (B, 32, 128, 128)
        self.conv_out = nn.Sequential(
            nn.Conv2d(widths[0], widths[0], 3, padding=1),
            Normalize(widths[0], norm_groups),
            nn.SiLU(),
            nn.Conv2d(widths[0], out_channels, 3, padding=1),
        )  # (B, 1, 128, 128)
        if space:
            zero_(self.conv_out[-1])

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.head(*self.body(z, 0), 0)

    def body(self, z: torch.Tensor, head_blocks: int) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Everything but the last ``head_blocks`` upsampling blocks and the output convs ->
        (features, the output skip when already taken). The texture stage trains only the head on
        these, frozen and computed once."""
        h = self.conv_in(z)
        if self.space:
            h = h + match_channels(z, self.widths[-1])  # (B, 512, 4, 4)
        skip = None
        for i in range(len(self.blocks) - head_blocks):  # (B, 512, 4, 4) -> (B, 32, 64, 64) with head_blocks 0
            if i == self.skip_after and self.space:
                skip = match_channels(h, self.out_channels)  # (B, 1, 32, 32) with skip_side 32
            h = self.blocks[i](h)
        return h, skip

    def head(self, h: torch.Tensor, skip: Optional[torch.Tensor], head_blocks: int) -> torch.Tensor:
        """The last ``head_blocks`` blocks and the output convs on `body`'s output -> the image."""
        for i in range(len(self.blocks) - head_blocks, len(self.blocks)):
            if i == self.skip_after and self.space and skip is None:
                skip = match_channels(h, self.out_channels)
            h = self.blocks[i](h)
        if skip is None and self.space:  # skip_side is the last side
            skip = match_channels(h, self.out_channels)
        logits = self.conv_out(self.up_out(h))  # (B, 1, 128, 128)
        if skip is not None:
            skip = F.interpolate(skip, scale_factor=float(self.skip_scale), mode="bicubic", align_corners=False)
            logits = logits + torch.logit(skip.float().clamp(1e-3, 1 - 1e-3)).to(logits.dtype)
        # Sigmoid: pixels live in [0, 1], which L1, SSIM (data_range=1) and VGG all assume.
        return torch.sigmoid(logits)  # (B, 1, 128, 128)

    def head_modules(self, head_blocks: int) -> list:
        """The modules `head` runs with these ``head_blocks``: what the texture stage trains."""
        if not 1 <= head_blocks <= len(self.blocks):
            raise ConfigError(f"texture.head_blocks={head_blocks} is invalid: expected 1 to {len(self.blocks)}, the "
                              "decoder's number of blocks at this image size")
        return [*self.blocks[len(self.blocks) - head_blocks:], self.up_out, self.conv_out]


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
    def reparameterize(mu: torch.Tensor, logvar: torch.Tensor,
                       generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """z = mu + sigma * eps, eps ~ N(0, I) from ``generator`` (None: torch's global stream);
        logvar clamped so exp() cannot overflow."""
        std = torch.exp(0.5 * clamp_logvar(logvar))
        # Noise drawn in the logical (contiguous) order, so channels_last draws the same values.
        return mu + std * torch.randn(std.shape, generator=generator, device=std.device, dtype=std.dtype)

    def forward(self, x: torch.Tensor, sample_posterior: bool = True, generator: Optional[torch.Generator] = None):
        """x (B, C, H, W) in [0, 1] -> (recon, mu, logvar). sample_posterior=False decodes mu
        (deterministic reconstructions for grids and metrics); ``generator`` draws the posterior
        noise (the trainer owns one, so no other loop's draws can change training)."""
        mu, logvar = self.encode(x)
        z = self.reparameterize(mu, logvar, generator) if sample_posterior else mu
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
        with eval_mode(self):
            return self.decode(z.to(model_device))


class SpatialVAE(_VAEBase):
    """The recipe: a convolutional VAE with a spatial (64, 4, 4) latent, GroupNorm + SiLU,
    self-attention at 16x16 and bilinear upsampling."""

    def __init__(self, model_cfg: ModelConfig, image_size: int):
        super().__init__()
        widths, sides = _validate_spatial(model_cfg, image_size)
        self.image_size = image_size
        self.widths = widths
        self._latent_shape = (model_cfg.latent_channels, model_cfg.latent_size, model_cfg.latent_size)
        common = dict(widths=widths, latent_channels=model_cfg.latent_channels, image_size=image_size,
                      attention_resolutions=tuple(model_cfg.attention_resolutions),
                      attention_heads=model_cfg.attention_heads, norm_groups=model_cfg.norm_groups)
        self.encoder = Encoder(model_cfg.in_channels, shortcut=model_cfg.shortcut, logvar_init=model_cfg.logvar_init,
                               **common)
        self.decoder = Decoder(model_cfg.in_channels, upsample=model_cfg.upsample, shortcut=model_cfg.shortcut,
                               skip_side=decoder_skip_side(model_cfg, sides), **common)

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


MODELS = {"spatial": SpatialVAE, "original": OriginalVAE}  # by model.architecture


def build_model(cfg: Config) -> nn.Module:
    """The model named by cfg.model.architecture, for images of cfg.data.image_size."""
    return MODELS[cfg.model.validate().architecture](cfg.model, cfg.data.image_size)


def check_buildable(cfg: Config) -> None:
    """Raise the `ConfigError` building this config's model would, without allocating its weights
    (meta device): the CLI calls it before any data is decoded."""
    with torch.device("meta"):
        model = build_model(cfg)
    if cfg.texture.enabled:
        model.decoder.head_modules(cfg.texture.head_blocks)


def count_parameters(model: nn.Module, trainable_only: bool = True) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
