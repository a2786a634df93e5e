"""The texture stage: a decoder head that draws fine detail, trained against a patch discriminator.

An L1 + SSIM decoder at 16x compression draws close to the conditional mean, and the mean of many
plausible chests has no grain, vessel markings or crisp rib edges. This stage (DC-AE's phase 3)
freezes the encoder and the decoder body, so the latent, and the learned prior fitted to it, do
not change, and trains only the decoder head (the last ``texture.head_blocks`` upsampling blocks
and the output convs) with the run's reconstruction loss plus a hinge adversarial term from a
small PatchGAN (latent-diffusion's NLayerDiscriminator, with GroupNorm), and an anchor that keeps
the image below half of Nyquist on the untrained (smooth) head's, so the critic buys fine detail
rather than redrawn coarse structure. The critic sees only the image above that cutoff, real and
drawn alike, so it compares texture with texture instead of pushing the head to answer coarse
errors it may not fix with streaks; the exported head is an EMA of the trained one
(docs/results/texture_stage_128.md). The frozen body's output
for every training image is computed once (`head_inputs`), so a step costs only the head and the
discriminator. The discriminator lives here, with the stage, never in the exported model.

`TextureStage` holds the head's and the discriminator's optimizers and the stage's own random
generator (batches only; no global RNG is drawn), so ``state_dict`` / ``load_state_dict``
continue a killed stage exactly.
"""

from __future__ import annotations

import copy
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .config import Config
from .data import as_float_images
from .engine import eval_mode

TEXTURE_KIND = "spatialvae-texture-stage"


class PatchDiscriminator(nn.Module):
    """(B, 1, S, S) in [0, 1] -> (patch logits (B, 1, S / 2^layers - 1, ...), each layer's features).

    ``layers`` stride-2 4x4 convs from ``channels`` wide, doubling, GroupNorm after all but the
    first, LeakyReLU 0.2; then a stride-1 4x4 conv to one logit per patch."""

    def __init__(self, channels: int = 32, layers: int = 3, in_channels: int = 1, groups: int = 8):
        super().__init__()
        blocks, ch_in = [], in_channels
        for i in range(layers):
            ch = channels * 2 ** i
            norm = nn.GroupNorm(min(groups, ch), ch) if i > 0 else nn.Identity()
            blocks.append(nn.Sequential(nn.Conv2d(ch_in, ch, 4, stride=2, padding=1), norm, nn.LeakyReLU(0.2)))
            ch_in = ch  # (B, ch, S / 2^(i+1), S / 2^(i+1))
        self.blocks = nn.ModuleList(blocks)
        self.out = nn.Conv2d(ch_in, 1, 4, stride=1, padding=1)  # (B, 1, S / 2^layers - 1, ...)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list]:
        h, feats = x * 2 - 1, []
        for block in self.blocks:
            h = block(h)
            feats.append(h)
        return self.out(h), feats


@torch.no_grad()
def head_inputs(model: nn.Module, images: torch.Tensor, head_blocks: int, hflip: bool, batch_size: int = 64,
                progress: Optional[Callable[[int], None]] = None) -> dict:
    """The frozen part's output for each image (posterior mean, decoder body) and the image itself,
    computed once -> {"h": (M, C, s, s), "skip": (M, 1, s', s') or None, "images": (M, S, S) uint8,
    "smooth": (M, 1, S, S) float16, the untrained head's output} on the CPU, M = N (or 2N with
    ``hflip``: each image and its mirror, the recipe's augmentation)."""
    device = next(model.parameters()).device
    views = [images, images.flip(-1)] if hflip else [images]
    hs, skips, originals, smooth = [], [], [], []
    with eval_mode(model):
        for view in views:
            for s in range(0, len(view), batch_size):
                x = as_float_images(view[s:s + batch_size]).to(device)  # (B, 1, S, S)
                h, skip = model.decoder.body(model.encode(x)[0], head_blocks)
                smooth.append(model.decoder.head(h, skip, head_blocks).half().cpu())
                hs.append(h.float().cpu())
                skips.append(None if skip is None else skip.float().cpu())
                originals.append(view[s:s + batch_size])
                if progress is not None:
                    progress(len(x))
    return {"h": torch.cat(hs), "skip": None if skips[0] is None else torch.cat(skips), "images": torch.cat(originals),
            "smooth": torch.cat(smooth)}


def hinge_d_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    return F.relu(1 - real_logits).mean() + F.relu(1 + fake_logits).mean()


class TextureStage:
    """Trains ``model``'s decoder head in place (the rest frozen) against a `PatchDiscriminator`:
    ``fit(inputs)``, ``state_dict()``, ``load_state_dict()``. ``loss`` is the run's `VAELoss`
    (its KL part unused: the latent is fixed)."""

    def __init__(self, model: nn.Module, loss: nn.Module, cfg: Config):
        t = self.t = cfg.texture
        self.model, self.loss_fn = model, loss
        self.device = next(model.parameters()).device
        for p in model.parameters():
            p.requires_grad_(False)
        self.head = nn.ModuleList(model.decoder.head_modules(t.head_blocks))
        for p in self.head.parameters():
            p.requires_grad_(True)
        # The exported head: an EMA of the head's weights, which smooths the GAN's step-to-step swings.
        self.ema_head = copy.deepcopy(self.head).requires_grad_(False)
        with torch.random.fork_rng(devices=[]):  # the discriminator's init is the seed's, not the global stream's
            torch.manual_seed(t.seed)
            self.disc = PatchDiscriminator(t.disc_channels, t.disc_layers, model.decoder.out_channels).to(self.device)
        # Adam betas (0.5, 0.9): the GAN setting of latent-diffusion's and MONAI's autoencoders.
        self.opt_g = torch.optim.Adam(self.head.parameters(), lr=t.lr, betas=(0.5, 0.9))
        self.opt_d = torch.optim.Adam(self.disc.parameters(), lr=t.disc_lr, betas=(0.5, 0.9))
        self.gen = torch.Generator().manual_seed(t.seed)
        self.step = 0
        self.history: list[dict] = []
        self._keep: Optional[torch.Tensor] = None  # the anchor's low-pass mask

    def _batch(self, inputs: dict) -> tuple:
        idx = torch.randint(0, len(inputs["images"]), (self.t.batch_size,), generator=self.gen)
        h = inputs["h"][idx].to(self.device)
        skip = None if inputs["skip"] is None else inputs["skip"][idx].to(self.device)
        return h, skip, as_float_images(inputs["images"][idx]).to(self.device), inputs["smooth"][idx].to(self.device)

    def train_step(self, inputs: dict) -> dict:
        """One discriminator step and (after the warm-up) one head step -> the step's loss parts."""
        t = self.t
        h, skip, real, smooth = self._batch(inputs)
        self.model.decoder.train()
        fake = self.model.decoder.head(h, skip, t.head_blocks)  # (B, 1, S, S)
        real_logits, real_feats = self.disc(self.critic_view(real))
        fake_logits, _ = self.disc(self.critic_view(fake.detach()))
        d_loss = hinge_d_loss(real_logits, fake_logits)
        self.opt_d.zero_grad(set_to_none=True)
        d_loss.backward()
        self.opt_d.step()
        parts = {"d_loss": d_loss.item(), "d_real": real_logits.mean().item(), "d_fake": fake_logits.mean().item()}
        if self.step >= t.disc_warmup_steps:
            parts.update(self._head_step(fake, real, [f.detach() for f in real_feats], smooth.float()))
            self._update_ema()
        self.step += 1
        return parts

    @torch.no_grad()
    def _update_ema(self) -> None:
        for e, p in zip(self.ema_head.parameters(), self.head.parameters()):
            e.lerp_(p, 1.0 - self.t.ema)

    @torch.no_grad()
    def use_ema(self) -> None:
        """Put the EMA weights into the model's head (what `sharp.pt` exports)."""
        for e, p in zip(self.ema_head.parameters(), self.head.parameters()):
            p.copy_(e)

    def _low_pass(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, S, S) -> its frequencies below ``anchor_cutoff`` of Nyquist only (an ideal radial filter)."""
        h, w = x.shape[-2:]
        if self._keep is None or self._keep.shape != (h, w // 2 + 1):  # built once, not every step
            fy, fx = torch.fft.fftfreq(h, device=x.device), torch.fft.rfftfreq(w, device=x.device)
            self._keep = (fy[:, None] ** 2 + fx[None, :] ** 2).sqrt() < 0.5 * self.t.anchor_cutoff  # (S, S // 2 + 1)
        return torch.fft.irfft2(torch.fft.rfft2(x) * self._keep, s=(h, w))

    def critic_view(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, S, S) -> what the critic judges: the image, or (``critic_input="high_pass"``) its part above
        ``anchor_cutoff`` of Nyquist around mid-grey, x4, since that residual spans a few grey levels where
        whole images span the range."""
        if self.t.critic_input == "image":
            return x
        return (x - self._low_pass(x)) * 4 + 0.5

    def _head_step(self, fake: torch.Tensor, real: torch.Tensor, real_feats: list, smooth: torch.Tensor) -> dict:
        t = self.t
        zeros = torch.zeros(len(real), 1, device=self.device)
        rec, parts = self.loss_fn(fake, real, zeros, zeros, 0.0)  # L1 + 0.5 (1 - SSIM) (+ perceptual)
        logits, feats = self.disc(self.critic_view(fake))
        adv = -logits.mean()  # hinge generator loss
        fm = sum(F.l1_loss(a, b) for a, b in zip(feats, real_feats)) / len(feats)
        anchor = self._low_pass(fake - smooth).abs().mean() if t.anchor_weight else fake.new_zeros(())
        total = rec + t.adv_weight * adv + t.feature_match_weight * fm + t.anchor_weight * anchor
        self.opt_g.zero_grad(set_to_none=True)
        total.backward()
        self.opt_g.step()
        return {"rec": rec.item(), "recon": parts["recon"].item(), "ssim": parts["ssim"].item(), "adv": adv.item(),
                "fm": fm.item(), "anchor": anchor.item(), "g_total": total.item()}

    def fit(self, inputs: dict, after_step: Callable[["TextureStage", dict], None] = lambda stage, parts: None) -> None:
        """The remaining steps up to ``texture.steps``; ``after_step(self, parts)`` after each."""
        try:
            while self.step < self.t.steps:
                after_step(self, self.train_step(inputs))
        finally:
            self.model.decoder.eval()

    def state_dict(self) -> dict:
        return {"step": self.step, "head": self.head.state_dict(), "ema_head": self.ema_head.state_dict(),
                "disc": self.disc.state_dict(),
                "opt_g": self.opt_g.state_dict(), "opt_d": self.opt_d.state_dict(), "gen": self.gen.get_state(),
                "history": list(self.history)}

    def load_state_dict(self, state: dict) -> "TextureStage":
        self.head.load_state_dict(state["head"])
        self.ema_head.load_state_dict(state["ema_head"])
        self.disc.load_state_dict(state["disc"])
        self.opt_g.load_state_dict(state["opt_g"])
        self.opt_d.load_state_dict(state["opt_d"])
        self.gen.set_state(state["gen"])
        self.step = int(state["step"])
        self.history = list(state["history"])
        return self


__all__ = ["PatchDiscriminator", "TextureStage", "head_inputs", "hinge_d_loss", "TEXTURE_KIND"]
