"""A learned prior over the spatial latent: a small class-conditional flow-matching transformer.

With beta at 1e-3 per latent value the aggregate posterior q(z) is far from N(0, I), so decoding
prior draws gives noise, and a Gaussian or a GMM fitted to the posterior means gives smooth,
alike chests. latent-diffusion and Medfusion learn a generative model over the autoencoder's
latent instead. Ours is 64 x 4 x 4 = 16 tokens of 64 values, so a transformer of a few hundred
thousand parameters trains in CPU minutes::

    prior = LearnedPrior(PriorConfig()).fit(latents, labels)        # (N, 64, 4, 4), (N,)
    z = prior.sample(64, generator=g, labels=torch.ones(64).long())  # 64 PNEUMONIA latents
    images = model.decode(z)

Flow matching (rectified flow, Lipman et al. 2023; Liu et al. 2023): with x0 ~ N(0, I) and x1 a
standardised training latent, x_t = (1 - t) x0 + t x1 and the network regresses the velocity
x1 - x0. Sampling integrates dx/dt = v(x, t) from t = 0 to 1 (Heun's method). Labels are dropped
with probability ``label_dropout`` in training, so one network is both conditional and not;
sampling with ``guidance`` w mixes them as classifier-free guidance: v_u + w (v_c - v_u).

This module is the model alone; a run folder's ``checkpoints/prior.pt`` (encoding the run's data,
logging, resumable saves, loading) is `spatialvae.prior_run`.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .config import PriorConfig
from .data import CLASSES
from .errors import CheckpointError, SpatialVAEError, short_reason

PRIOR_VERSION = 1
N_CLASSES = 2  # NORMAL, PNEUMONIA; index 2 is "no label"


# ---------------------------------------------------------------------------------------------
# The velocity network
# ---------------------------------------------------------------------------------------------

def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """t in [0, 1] (B,) -> sinusoidal features (B, dim), as in DDPM / DiT (t scaled to 0..1000)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = 1000.0 * t.float()[:, None] * freqs[None]  # (B, half)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


class Block(nn.Module):
    """Pre-norm transformer block with adaLN-Zero conditioning (DiT): the condition c sets a
    shift, scale and gate for the attention and the MLP; the gates start at zero."""

    def __init__(self, width: int, heads: int, mlp_ratio: int = 4):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False)
        self.mlp = nn.Sequential(nn.Linear(width, mlp_ratio * width), nn.GELU(), nn.Linear(mlp_ratio * width, width))
        self.ada = nn.Linear(width, 6 * width)
        nn.init.zeros_(self.ada.weight)
        nn.init.zeros_(self.ada.bias)

    def forward(self, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        # h: (B, T, W) tokens, c: (B, W) condition
        s1, b1, g1, s2, b2, g2 = self.ada(F.silu(c)).unsqueeze(1).chunk(6, dim=2)  # each (B, 1, W)
        x = self.norm1(h) * (1 + s1) + b1
        h = h + g1 * self.attn(x, x, x, need_weights=False)[0]
        return h + g2 * self.mlp(self.norm2(h) * (1 + s2) + b2)


class FlowNet(nn.Module):
    """Velocity v(x_t, t, label) for latents (B, C, H, W): one token per latent position."""

    def __init__(self, latent_shape: tuple, width: int = 192, depth: int = 4, heads: int = 4):
        super().__init__()
        c, h, w = latent_shape
        self.latent_shape = tuple(latent_shape)
        self.inp = nn.Linear(c, width)
        self.pos = nn.Parameter(0.02 * torch.randn(1, h * w, width))
        self.time = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.label = nn.Embedding(N_CLASSES + 1, width)  # the last row: no label (classifier-free)
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(width, elementwise_affine=False)
        self.out = nn.Linear(width, c)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)
        self.width = width

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        b, c, hh, ww = x.shape
        h = self.inp(x.flatten(2).transpose(1, 2)) + self.pos  # (B, H*W, width)
        cond = self.time(timestep_embedding(t, self.width)) + self.label(labels)  # (B, width)
        for block in self.blocks:
            h = block(h, cond)
        v = self.out(self.norm(h))  # (B, H*W, C)
        return v.transpose(1, 2).reshape(b, c, hh, ww)


# ---------------------------------------------------------------------------------------------
# The sampler
# ---------------------------------------------------------------------------------------------

class LearnedPrior:
    """``fit(latents, labels)`` / ``sample(n, generator, labels)``, like the other samplers.

    ``labels`` (N,) holds 0 (NORMAL) / 1 (PNEUMONIA). ``sample(labels=None)`` draws the labels in
    the training class mix; with labels, each latent is of its class. Labelled draws are guided
    with ``guidance`` (1 = the plain conditional model); labels of 2 use the label-free model.
    """

    name = "learned"

    def __init__(self, cfg: Optional[PriorConfig] = None):
        self.cfg = cfg or PriorConfig()
        self.net: Optional[FlowNet] = None  # the EMA weights: what samples
        self.latent_shape: tuple = ()
        self.mean: Optional[torch.Tensor] = None  # (C, H, W) per-value standardisation
        self.std: Optional[torch.Tensor] = None
        self.history: list[dict] = []
        self.train_seconds = 0.0
        self.class_counts = [0, 0]
        self.vae_epoch: Optional[int] = None
        self._spread: dict = {}  # (guidance, steps, label-free) -> 1 / the calibration draw's RMS

    # ---- training ----------------------------------------------------------------------------
    def fit(self, latents: torch.Tensor, labels: Optional[torch.Tensor] = None, state: Optional[dict] = None,
            after_step: Optional[Callable[["PriorFit", float], None]] = None) -> "LearnedPrior":
        """Train on posterior latents (N, C, H, W) for ``cfg.steps`` steps. ``after_step(fit, loss)``
        is called after each step; ``fit.state()`` passed back as ``state`` continues exactly where
        it was (`spatialvae.prior_run` logs and saves that way, so a killed session resumes)."""
        fit = PriorFit(self, latents, labels, state)
        t0 = time.perf_counter() - self.train_seconds
        while fit.step < self.cfg.steps:
            loss = fit.train_step()
            self.train_seconds = time.perf_counter() - t0
            if after_step is not None:
                after_step(fit, loss)
        self.net.eval()
        self._spread = {}
        return self

    # ---- sampling ------------------------------------------------------------------------------
    @torch.no_grad()
    def velocity(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor, guidance: float) -> torch.Tensor:
        if guidance == 1.0 or bool((labels == N_CLASSES).all()):
            return self.net(x, t, labels)
        v = self.net(torch.cat([x, x]), torch.cat([t, t]), torch.cat([labels, torch.full_like(labels, N_CLASSES)]))
        v_cond, v_uncond = v.chunk(2)
        return v_uncond + guidance * (v_cond - v_uncond)

    @torch.no_grad()
    def sample(self, n: int, generator: Optional[torch.Generator] = None, labels: Optional[torch.Tensor] = None,
               guidance: Optional[float] = None, steps: Optional[int] = None, batch_size: int = 256,
               spread: Optional[float] = None) -> torch.Tensor:
        """n latents (n, C, H, W) float32 on the CPU; the same generator state gives the same latents.
        ``guidance``, ``steps`` and ``spread`` default to the prior's config."""
        if self.net is None:
            raise SpatialVAEError("LearnedPrior.sample called before fit() or load")
        guidance = self.cfg.guidance if guidance is None else float(guidance)
        steps = steps or self.cfg.sample_steps
        if labels is None:
            labels = self._mix_labels(n, generator)
        labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
        if len(labels) != n or bool(((labels < 0) | (labels > N_CLASSES)).any()):
            raise SpatialVAEError(f"labels must be {n} values in 0 (NORMAL), 1 (PNEUMONIA) or {N_CLASSES} (none)")
        unseen = [CLASSES[k] for k in sorted(set(labels.tolist()) - {N_CLASSES})
                  if sum(self.class_counts) > 0 and self.class_counts[k] == 0]
        if unseen:
            raise SpatialVAEError(f"the learned prior saw no {' or '.join(unseen)} training images, so it cannot draw "
                                  "that class; train on a dataset with both classes, or sample without --label")
        x = torch.randn((n, *self.latent_shape), generator=generator)  # one draw for all: batch-size independent
        z = self._integrate_batches(x, labels, guidance, steps, batch_size)
        scale = self.spread_scale(guidance, steps, bool((labels == N_CLASSES).all()), spread)
        return z * scale * self.std + self.mean

    def spread_scale(self, guidance: float, steps: int, label_free: bool = False,
                     spread: Optional[float] = None) -> float:
        """The factor that brings the standardised samples' RMS to ``spread`` (default ``cfg.spread``;
        1.0 when it is 0). Measured once per setting on a fixed calibration draw in the training class
        mix (or label-free), so it does not depend on what is being sampled."""
        spread = self.cfg.spread if spread is None else float(spread)
        if not spread:
            return 1.0
        key = (float(guidance), int(steps), bool(label_free))
        if key not in self._spread:
            gen = torch.Generator().manual_seed(self.cfg.seed + 2)
            n = self.cfg.calibration_samples
            labels = self._mix_labels(n, gen)
            if label_free:  # after the draw, so both calibrations integrate the same noise
                labels = torch.full((n,), N_CLASSES, dtype=torch.long)
            x = torch.randn((n, *self.latent_shape), generator=gen)
            z = self._integrate_batches(x, labels, guidance, steps, 256)
            self._spread[key] = float(1.0 / z.pow(2).mean().sqrt().clamp(min=1e-6))
        return spread * self._spread[key]

    def _mix_labels(self, n: int, generator: Optional[torch.Generator]) -> torch.Tensor:
        """n labels drawn in the training class mix; all N_CLASSES (the label-free model) if it had no labels."""
        weights = torch.tensor(self.class_counts, dtype=torch.float64)
        if weights.sum() == 0:
            return torch.full((n,), N_CLASSES, dtype=torch.long)
        return torch.multinomial(weights, n, replacement=True, generator=generator)

    def _integrate_batches(self, x: torch.Tensor, labels: torch.Tensor, guidance: float, steps: int,
                           batch_size: int) -> torch.Tensor:
        """`_integrate` over batches of ``batch_size`` (standardised latents, unscaled)."""
        self.net.eval()
        return torch.cat([self._integrate(x[s:s + batch_size], labels[s:s + batch_size], guidance, steps)
                          for s in range(0, len(x), batch_size)])

    def _integrate(self, x: torch.Tensor, labels: torch.Tensor, guidance: float, steps: int) -> torch.Tensor:
        """Heun's method from t = 0 (noise) to t = 1 (data), ``steps`` velocity pairs."""
        ts = torch.linspace(0.0, 1.0, steps + 1)
        for i in range(steps):
            t0, t1 = ts[i].expand(len(x)), ts[i + 1].expand(len(x))
            v0 = self.velocity(x, t0, labels, guidance)
            x_euler = x + (t1 - t0).view(-1, 1, 1, 1) * v0
            v1 = self.velocity(x_euler, t1, labels, guidance)
            x = x + (t1 - t0).view(-1, 1, 1, 1) * 0.5 * (v0 + v1)
        return x

    def describe(self) -> dict:
        n_params = sum(p.numel() for p in self.net.parameters()) if self.net is not None else 0
        return {"kind": "class-conditional flow-matching transformer over the latent (spatialvae.prior)",
                "parameters": n_params, "steps": self.cfg.steps, "sample_steps": self.cfg.sample_steps,
                "guidance": self.cfg.guidance, "time_sampling": self.cfg.time_sampling,
                "spread": self.cfg.spread, "train_seconds": round(self.train_seconds, 1),
                "class_counts": list(self.class_counts)}

    # ---- files ------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"version": PRIOR_VERSION, "kind": "spatialvae-latent-prior", "config": asdict(self.cfg),
                "latent_shape": list(self.latent_shape), "net": self.net.state_dict(), "mean": self.mean,
                "std": self.std, "history": self.history, "train_seconds": self.train_seconds,
                "class_counts": list(self.class_counts)}

    @classmethod
    def from_state_dict(cls, blob: dict, latent_shape: Optional[tuple] = None, where: str = "the prior") -> "LearnedPrior":
        """Rebuild from `state_dict()`; ``latent_shape``: the VAE's, checked against the prior's."""
        if not isinstance(blob, dict) or blob.get("kind") != "spatialvae-latent-prior":
            raise CheckpointError(f"{where} is not a spatialvae latent prior (made by `python -m spatialvae prior`)")
        shape = tuple(int(s) for s in blob["latent_shape"])
        if latent_shape is not None and shape != tuple(latent_shape):
            raise CheckpointError(f"{where} was trained for latents of shape {shape}, but this run's VAE has "
                                  f"{tuple(latent_shape)}; train a prior for this run: "
                                  "`python -m spatialvae prior --run RUN_DIR --force`")
        # Priors saved before these settings existed were trained on uniform times and sampled unscaled.
        prior = cls(PriorConfig(**{"time_sampling": "uniform", "spread": 0.0, **blob["config"]}))
        prior._build(shape)
        try:
            prior.net.load_state_dict(blob["net"])
        except RuntimeError as e:
            raise CheckpointError(f"{where} does not match its own config ({short_reason(e)})") from None
        prior.mean, prior.std = blob["mean"], blob["std"]
        prior.history = list(blob.get("history", []))
        prior.train_seconds = float(blob.get("train_seconds", 0.0))
        prior.class_counts = list(blob.get("class_counts", [0, 0]))
        prior.vae_epoch = blob.get("vae_epoch")  # the VAE checkpoint whose latents it learned
        prior.net.eval()
        return prior

    def _build(self, latent_shape: tuple) -> FlowNet:
        self.latent_shape = tuple(latent_shape)
        c = self.cfg
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(c.seed)
            self.net = FlowNet(self.latent_shape, c.width, c.depth, c.heads)
        return self.net


def flow_matching_loss(net: FlowNet, x1: torch.Tensor, y: torch.Tensor, gen: torch.Generator,
                       time_sampling: str = "uniform") -> torch.Tensor:
    """Flow-matching loss for standardised latents x1 (B, C, H, W); ``time_sampling``: how t is drawn
    (`PriorConfig.time_sampling`)."""
    x0 = torch.randn(x1.shape, generator=gen)
    if time_sampling == "logit_normal":
        t = torch.sigmoid(torch.randn(len(x1), generator=gen))
    else:
        t = torch.rand(len(x1), generator=gen)
    xt = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * x1
    return F.mse_loss(net(xt, t, y), x1 - x0)


class PriorFit:
    """One fit of a `LearnedPrior`: AdamW with warm-up and cosine decay, EMA weights, label dropout."""

    def __init__(self, prior: LearnedPrior, latents: torch.Tensor, labels: Optional[torch.Tensor],
                 state: Optional[dict] = None):
        c = prior.cfg
        if latents.dim() != 4 or len(latents) < 2:
            raise SpatialVAEError(f"need latents of shape (N, C, H, W) with N >= 2, got {tuple(latents.shape)}")
        self.prior, self.c = prior, c
        self.x = latents.detach().float().cpu()
        self.y = (torch.full((len(self.x),), N_CLASSES, dtype=torch.long) if labels is None
                  else torch.as_tensor(labels, dtype=torch.long).reshape(-1))
        if len(self.y) != len(self.x):
            raise SpatialVAEError(f"{len(self.y)} labels for {len(self.x)} latents")
        prior.class_counts = [int((self.y == k).sum()) for k in range(N_CLASSES)]
        prior.mean = self.x.mean(0)
        prior.std = self.x.std(0).clamp(min=1e-6)
        self.x = (self.x - prior.mean) / prior.std  # standardised once, not every step
        self.online = prior._build(tuple(self.x.shape[1:]))
        prior.net = copy.deepcopy(self.online).requires_grad_(False)  # EMA copy
        self.opt = torch.optim.AdamW(self.online.parameters(), lr=c.lr, weight_decay=c.weight_decay)
        self.gen = torch.Generator().manual_seed(c.seed + 1)
        self.step = 0
        if state is not None:
            self.load(state)

    def lr_at(self, step: int) -> float:
        c = self.c
        if step < c.warmup_steps:
            return c.lr * (step + 1) / c.warmup_steps
        t = (step - c.warmup_steps) / max(1, c.steps - c.warmup_steps)
        return c.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))

    def train_step(self) -> float:
        c = self.c
        idx = torch.randint(len(self.x), (c.batch_size,), generator=self.gen)
        y = self.y[idx].clone()
        y[torch.rand(len(y), generator=self.gen) < c.label_dropout] = N_CLASSES
        for g in self.opt.param_groups:
            g["lr"] = self.lr_at(self.step)
        self.online.train()
        loss = flow_matching_loss(self.online, self.x[idx], y, self.gen, c.time_sampling)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.online.parameters(), 1.0)
        self.opt.step()
        decay = min(c.ema, (1 + self.step) / (10 + self.step))
        with torch.no_grad():
            for e, p in zip(self.prior.net.parameters(), self.online.parameters()):
                e.lerp_(p, 1 - decay)
        self.step += 1
        return float(loss.detach())

    def state(self) -> dict:
        """The prior's `state_dict` with what continues this fit exactly: the online weights, the
        optimizer, the batch generator and the step."""
        return {**self.prior.state_dict(), "online": self.online.state_dict(), "optimizer": self.opt.state_dict(),
                "step": self.step, "gen": self.gen.get_state(), "done": self.step >= self.c.steps}

    def load(self, state: dict) -> None:
        self.online.load_state_dict(state["online"])
        self.prior.net.load_state_dict(state["net"])
        self.opt.load_state_dict(state["optimizer"])
        self.gen.set_state(state["gen"])
        self.step = int(state["step"])
        self.prior.history = list(state.get("history", []))
        self.prior.train_seconds = float(state.get("train_seconds", 0.0))


__all__ = ["LearnedPrior", "PriorFit", "FlowNet", "PRIOR_VERSION", "timestep_embedding", "flow_matching_loss",
           "N_CLASSES"]
