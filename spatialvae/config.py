"""Configuration: one dataclass per concern, the seed recipe as defaults, named presets.

Every default carries the reason it has that value. A `Config` round-trips through JSON
(`to_json` / `from_json`), so a run folder's `config.json` and a checkpoint's config rebuild
exactly the same run. `validate()` raises `ConfigError` (a `ValueError`) naming the field,
the bad value and what would work.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Tuple

from .errors import ConfigError

# Each field's allowed values live here, once; the model and the loss validate their config with them.
ARCHITECTURES = ("spatial", "original")
UPSAMPLE_MODES = ("bilinear", "transposed")
SHORTCUTS = ("space", "conv")
DECODER_SKIPS = ("latent", "last")
RECONS = ("l1", "mse")
CRITIC_INPUTS = ("high_pass", "image")
TIME_SAMPLINGS = ("logit_normal", "uniform")  # prior.time_sampling
REDUCTIONS = ("mean", "sum")  # loss.pixel_reduction and loss.kl_reduction
# The recipe read literally where this package's defaults depart from it (README, Configuration):
# learned 1x1-conv skips from a random start, PyTorch's logvar init, and beta times the KL summed
# over the latent values. The `*-literal` presets, the ablation's `literal` variant and checkpoints
# written before format 2 (spatialvae.runs) all use exactly these.
LITERAL_SETTINGS = {"model.shortcut": "conv", "model.logvar_init": None, "loss.kl_reduction": "sum"}


@dataclass
class DataConfig:
    root: Optional[str] = None  # None: $SPATIALVAE_DATA, then the Kaggle input mounts
    image_size: int = 128  # the recipe's resolution; 64 for CPU-sized runs
    clahe_clip: float = 2.0  # CLAHE clip limit from the recipe: lifts rib/lung contrast, caps noise boost
    clahe_tiles: int = 8  # CLAHE grid is 8x8 tiles, relative to the image, so any resolution works
    hflip: bool = True  # the recipe's only augmentation (note: a flipped X-ray has its heart on the right)
    batch_size: int = 32  # the recipe's batch; fits a 16 GB T4 at 128 px with AMP
    val_split: str = "auto"  # auto | kaggle | patient; auto = patient split when Kaggle's val/ is tiny
    val_fraction: float = 0.1  # share of train images (by patient) carved out for validation
    min_kaggle_val: int = 100  # Kaggle's val/ has 16 images: too few to pick a best checkpoint
    split_seed: int = 0  # fixed apart from the training seed, so every run validates on the same patients
    max_per_class: Optional[int] = None  # cap per class and split (quick/smoke runs); None = everything
    cache_dir: Optional[str] = None  # None: $SPATIALVAE_CACHE, /kaggle/working/.cache/spatialvae, ~/.cache/spatialvae
    preprocess_workers: Optional[int] = None  # processes for the one-time decode; None = all cores
    num_workers: int = 0  # DataLoader workers: images are already decoded in memory, so 0 is fastest


@dataclass
class ModelConfig:
    architecture: str = "spatial"  # spatial (the recipe) | original (the recipe's flat-latent baseline)
    in_channels: int = 1  # grayscale X-rays
    channels: Tuple[int, ...] = (32, 64, 128, 256, 512)  # encoder widths, stem first, one per 2x downsampling
    latent_channels: int = 64  # 64 x 4 x 4 = 1,024 latent values keep spatial layout for sharp decoding
    latent_size: int = 4  # spatial side of the latent grid
    attention_resolutions: Tuple[int, ...] = (16,)  # self-attention where the grid is 16x16 (256 tokens: cheap)
    attention_heads: int = 1  # one head is what the recipe describes
    norm_groups: int = 8  # GroupNorm groups: batch-size independent, unlike BatchNorm
    flat_latent_dim: int = 256  # only for architecture=original: its flattened latent
    upsample: str = "bilinear"  # bilinear | transposed: bilinear avoids checkerboards; transposed is the ablation
    # space: DC-AE's parameter-free space-to-channel skips, every branch starting at zero, so the
    # untrained model is an area-downsample + bicubic-upsample autoencoder that learns the residual;
    # conv: the recipe's literal 1x1-conv skips (random start).
    shortcut: str = "space"  # space | conv (see above): on a CPU budget the conv skips' random start costs far more (docs/results/defaults.md)
    # Where the decoder's bicubic output skip starts (shortcut=space). latent: the side whose one
    # channel holds the latent's values (32x32 at 128 px), so the untrained map is one bicubic x4 of
    # the 4x4 area downsample instead of nearest x2 then bicubic x2, a closer start; last: the last
    # feature map (the older form). At 64 px the two are the same map.
    decoder_skip: str = "latent"  # latent | last (see above)
    logvar_init: Optional[float] = -8.0  # bias of the logvar head (sigma 0.018): an autoencoder from step 1; None = PyTorch's init

    def validate(self) -> "ModelConfig":
        """Each field on its own (what needs the image size is checked by `spatialvae.model`)."""
        _check(self.architecture in ARCHITECTURES, "model.architecture", self.architecture, "spatial or original")
        _check(self.in_channels >= 1, "model.in_channels", self.in_channels, "at least 1")
        _check(len(self.channels) >= 1 and all(c >= 1 for c in self.channels), "model.channels", self.channels,
               "a non-empty list of positive widths, stem first, e.g. [32, 64, 128, 256, 512]")
        _check(self.latent_channels >= 1, "model.latent_channels", self.latent_channels, "at least 1")
        _check(self.latent_size >= 1, "model.latent_size", self.latent_size, "at least 1")
        _check(self.attention_heads >= 1, "model.attention_heads", self.attention_heads, "at least 1")
        _check(self.norm_groups >= 1, "model.norm_groups", self.norm_groups, "at least 1 (the recipe uses 8)")
        _check(self.flat_latent_dim >= 1, "model.flat_latent_dim", self.flat_latent_dim, "at least 1")
        _check(self.upsample in UPSAMPLE_MODES, "model.upsample", self.upsample, "bilinear or transposed")
        _check(self.shortcut in SHORTCUTS, "model.shortcut", self.shortcut, "space (DC-AE skips) or conv (literal)")
        _check(self.decoder_skip in DECODER_SKIPS, "model.decoder_skip", self.decoder_skip,
               "latent (bicubic from the latent's side) or last (from the last feature map)")
        return self


@dataclass
class LossConfig:
    recon: str = "l1"  # l1 (the recipe: sharper than MSE) | mse (the original baseline)
    recon_weight: float = 1.0  # pixel term weight
    pixel_reduction: str = "mean"  # mean over pixels (the recipe's weights assume it) | sum per image (classic ELBO)
    perceptual_weight: float = 0.1  # VGG16 feature L1: texture and edges that pixel losses blur
    perceptual_layers: Tuple[int, ...] = (3, 8, 15)  # vgg16.features indices of relu1_2, relu2_2, relu3_3
    vgg_weights: str = "imagenet"  # imagenet (torchvision cache/download) | a local .pth path | random (explicit opt-in)
    ssim_weight: float = 0.5  # 0.5 * (1 - SSIM): structure and local contrast
    ssim_window: int = 11  # Gaussian window of pytorch-msssim; shrunk automatically for tiny images
    # What beta multiplies. mean: the KL per latent value (summed KL / 1,024), on the same per-value
    # footing as the per-pixel-mean L1 and SSIM, so the recipe's "very low beta, for sharp images"
    # is low: the KL stays a small share of the reconstruction terms and phase 2 keeps phase 1.
    # sum (the literal ELBO KL, seed-literal): beta 1e-3 times the summed KL outweighs L1 many times
    # over at the phase boundary and collapses the latent to a template chest (docs/results/defaults.md).
    kl_reduction: str = "mean"  # mean (per latent value: low beta is low) | sum (the literal ELBO KL), see above

    def validate(self) -> "LossConfig":
        _check(self.recon in RECONS, "loss.recon", self.recon, "l1 or mse")
        _check(self.pixel_reduction in REDUCTIONS, "loss.pixel_reduction", self.pixel_reduction, "mean or sum")
        for name in ("recon_weight", "perceptual_weight", "ssim_weight"):
            _check(getattr(self, name) >= 0, f"loss.{name}", getattr(self, name), "0 or more")
        _check(all(i >= 0 for i in self.perceptual_layers), "loss.perceptual_layers", self.perceptual_layers,
               "indices into torchvision vgg16().features (the recipe uses 3, 8, 15)")
        _check(bool(self.vgg_weights), "loss.vgg_weights", self.vgg_weights,
               "imagenet, random, or a path to a .pth file")
        _check(self.ssim_window >= 3 and self.ssim_window % 2 == 1, "loss.ssim_window", self.ssim_window,
               "an odd window of at least 3 (pytorch-msssim uses 11)")
        _check(self.kl_reduction in REDUCTIONS, "loss.kl_reduction", self.kl_reduction, "sum or mean")
        return self


@dataclass
class PhaseConfig:
    epochs: int = 50  # 0 skips the phase
    lr: float = 1e-4  # AdamW learning rate at the start of the phase
    scheduler: str = "cosine"  # cosine (warm restarts) | plateau (on val loss) | none
    beta_start: float = 0.0  # KL weight at the first epoch of the phase
    beta_end: float = 0.0  # KL weight reached after beta_anneal_epochs
    beta_anneal_epochs: int = 0  # linear ramp length; 0 = beta_end from the start
    cosine_t0: int = 10  # epochs in the first cosine cycle
    cosine_t_mult: int = 1  # cycle length multiplier after each restart
    plateau_factor: float = 0.5  # lr multiplier when val loss stalls
    plateau_patience: int = 5  # epochs without improvement before the lr drops


def _phase1() -> PhaseConfig:
    # Reconstruction only: learn to draw X-rays before being asked to be a good prior.
    return PhaseConfig(epochs=50, lr=1e-4, scheduler="cosine")


def _phase2() -> PhaseConfig:
    # Gentle KL: beta 0 -> 1e-3 over 50 epochs keeps reconstructions sharp while the prior forms.
    return PhaseConfig(
        epochs=100, lr=5e-5, scheduler="plateau", beta_start=0.0, beta_end=1e-3, beta_anneal_epochs=50
    )


@dataclass
class TrainConfig:
    phase1: PhaseConfig = field(default_factory=_phase1)
    phase2: PhaseConfig = field(default_factory=_phase2)
    weight_decay: float = 1e-5  # AdamW decoupled weight decay from the recipe
    grad_clip: float = 1.0  # max grad norm: attention + KL spikes otherwise blow up early steps
    seed: int = 0  # model init, shuffling and flips
    amp: bool = True  # fp16/bf16 autocast on CUDA only; CPU always runs fp32
    channels_last: bool = True  # NHWC: never slower in `bench`, faster with the VGG term
    compile: bool = False  # torch.compile: slower start, faster steps on long GPU runs
    sample_every: int = 10  # epochs between sample/reconstruction grids
    n_samples: int = 64  # images per sample grid
    max_nonfinite_steps: int = 5  # consecutive NaN/inf losses tolerated before the run stops


@dataclass
class PriorConfig:
    # A flow-matching transformer over the latent's 16 positions (spatialvae.prior), trained after
    # phase 2 on the training split's posterior means: the sampler behind `sample --sampler learned`.
    enabled: bool = True  # train it at the end of `train`; `python -m spatialvae prior --run RUN` does it later
    width: int = 128  # token width: under a million parameters at depth 3, so it trains in CPU minutes
    depth: int = 3  # transformer blocks (adaLN-Zero, DiT)
    heads: int = 4  # attention heads over the 16 latent positions
    steps: int = 1600  # optimizer steps: the validation loss has flattened by here at lr 2e-3
    batch_size: int = 128  # latents per step
    lr: float = 2e-3  # AdamW peak, after warm-up, cosine to 0
    warmup_steps: int = 100  # linear warm-up
    weight_decay: float = 0.0  # the EMA and the short schedule are the regularisers
    ema: float = 0.999  # EMA of the weights: what samples
    label_dropout: float = 0.1  # share of steps without the label: the unconditional model for guidance
    # Classifier-free guidance (1 = plain conditional): higher draws more typical chests of each class
    # and fewer kinds of chest. The sweep is in docs/results/defaults.md.
    guidance: float = 1.75  # fidelity vs diversity: keeps the samples' MS-SSIM near real images' at 64 px
    sample_steps: int = 16  # Heun steps (two velocity calls each): more did not lower the FD
    # Where on the noise-to-latent path training steps fall: "logit_normal" (t = sigmoid of a standard
    # normal, Esser et al. 2024) spends them mid-path, where the velocity is hardest to learn;
    # "uniform" is plain rectified flow.
    time_sampling: str = "logit_normal"
    # An under-trained velocity net pulls its samples toward the mean: they come out with less spread
    # than the latents it learned, and decode to softer chests. Sampling rescales each draw so that
    # its standardised latents' RMS is `spread` (1.0: the training latents' own), with one scale per
    # guidance measured on a fixed calibration draw; 0 samples the flow as it is.
    spread: float = 1.0
    calibration_samples: int = 256  # the draw that measures that scale
    log_every: int = 200  # steps between log lines, validation losses and resumable saves
    seed: int = 0  # init, batches, noise


@dataclass
class TextureConfig:
    # An optional stage after phase 2 (spatialvae.texture): the encoder and the decoder body are
    # frozen, so the latent and the learned prior stay as they are, and only the decoder's head
    # learns, against a patch discriminator, to draw the fine texture an L1 + SSIM decoder
    # averages away (DC-AE's phase 3). Its output is checkpoints/sharp.pt beside best.pt.
    enabled: bool = False  # off in seed: the recipe has no such stage; quick128 turns it on
    steps: int = 400  # head and critic steps: much past this the drawn grain turns to noise
    batch_size: int = 8  # images a step
    hflip: bool = False  # True: the body's output is cached for each image and its mirror too (2x the cache time)
    head_blocks: int = 1  # decoder upsampling blocks trained with the output convs (1: the 64x64 block)
    lr: float = 2e-4  # Adam for the head: at 1e-4 the detail did not come within the step budget
    # The critic at 2.5x the head's lr, and a slightly stronger adversarial term: over four stage
    # seeds this drew more detail in reconstructions and samples than 5x with 0.05, at the same
    # PSNR; 2.5x with 0.05 drew less, 0.07 went past the PSNR limit, and at 1x the head overshot
    # real detail (docs/results/texture_stage_128.md).
    disc_lr: float = 5e-4  # Adam for the critic
    adv_weight: float = 0.06  # hinge adversarial term beside L1 + 0.5 (1 - SSIM)
    feature_match_weight: float = 0.0  # L1 between the discriminator's features of real and drawn images
    disc_channels: int = 32  # width of the discriminator's first conv, doubled each layer
    disc_layers: int = 3  # stride-2 4x4 convs: a patch of 46 px at 3 layers
    disc_warmup_steps: int = 0  # discriminator-only steps first, so the head meets a critic that already sees
    # What the critic judges: "high_pass", only the image above anchor_cutoff of Nyquist (the band the
    # head is free to draw), so it tells texture from texture; "image", the whole image, where it also
    # sees the coarse errors the anchor forbids the head to fix, and the head answers with streaks
    # along the ribs that the X-ray features read as unreal (docs/results/texture_stage_128.md).
    critic_input: str = "high_pass"
    # The smooth decoder is already the best guess of everything the latent pins down (its error is
    # largest at 0.25-0.5 of Nyquist, detail the critic would redraw at a cost in distortion); what
    # it lacks is the finer detail the latent cannot hold. This term keeps the sharp head's image
    # below anchor_cutoff of Nyquist on the smooth head's, so the critic buys texture above it.
    anchor_weight: float = 10.0  # L1 of the low-passed difference, sharp minus smooth head (0: off; 25 held all detail back)
    anchor_cutoff: float = 0.5  # of Nyquist: an ideal low-pass, so the band above it is the critic's alone
    # The head is exported as an EMA of its weights, as GANs' generators are (StyleGAN, DiT):
    # the adversarial game swings the live head from step to step, and the average does not.
    ema: float = 0.99  # per head step (0: the last step's weights)
    log_every: int = 100  # steps between log lines and resumable saves
    seed: int = 0  # batches and any noise: a generator of the stage's own

    def validate(self) -> "TextureConfig":
        for name in ("steps", "batch_size", "head_blocks", "disc_channels", "disc_layers", "log_every"):
            _check(getattr(self, name) >= 1, f"texture.{name}", getattr(self, name), "at least 1")
        for name in ("lr", "disc_lr"):
            _check(getattr(self, name) > 0, f"texture.{name}", getattr(self, name), "a positive learning rate")
        for name in ("adv_weight", "feature_match_weight", "disc_warmup_steps", "anchor_weight"):
            _check(getattr(self, name) >= 0, f"texture.{name}", getattr(self, name), "0 or more")
        _check(0 < self.anchor_cutoff <= 1, "texture.anchor_cutoff", self.anchor_cutoff,
               "a fraction of Nyquist in (0, 1]")
        _check(0 <= self.ema < 1, "texture.ema", self.ema, "a decay in [0, 1)")
        _check(self.critic_input in CRITIC_INPUTS, "texture.critic_input", self.critic_input,
               " or ".join(CRITIC_INPUTS))
        return self


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    prior: PriorConfig = field(default_factory=PriorConfig)
    texture: TextureConfig = field(default_factory=TextureConfig)
    preset: str = "seed"  # the preset this config started from (for logs and run folder names)

    # ---- serialisation ---------------------------------------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self, path: str | os.PathLike | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=2)
        if path is not None:
            Path(path).write_text(text + "\n")
        return text

    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        cfg = _from_dict(cls, d, prefix="")
        cfg.validate()
        return cfg

    @classmethod
    def from_json(cls, text_or_path: str | os.PathLike) -> "Config":
        """Parse a JSON string or read a JSON file. Keys missing from the file keep their defaults."""
        text = str(text_or_path)
        if not text.lstrip().startswith("{"):
            p = Path(text_or_path)
            if not p.is_file():
                raise ConfigError(f"config file {p} does not exist; pass a JSON file written by a run (config.json)")
            text = p.read_text()
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"config is not valid JSON ({e}); fix the file or start from a preset") from None
        if not isinstance(d, dict):
            raise ConfigError("config JSON must be an object like {\"data\": {...}, \"model\": {...}}")
        return cls.from_dict(d)

    def differences(self, other: "Config", ignore: tuple[str, ...] = ()) -> dict[str, tuple]:
        """{dotted key: (self's value, other's value)} for every leaf that differs (``preset`` and
        the keys in ``ignore`` left out)."""
        a, b = flatten(self.to_dict()), flatten(other.to_dict())
        skip = {"preset", *ignore}
        return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if k not in skip and a.get(k) != b.get(k)}

    # ---- overrides and validation ------------------------------------------------------
    def with_overrides(self, overrides: list[str] | dict[str, Any]) -> "Config":
        """Return a copy with `section.key=value` overrides applied (as from `--set`)."""
        cfg = copy.deepcopy(self)
        items = overrides.items() if isinstance(overrides, dict) else (_split_override(o) for o in overrides)
        for key, value in items:
            _set_path(cfg, key, value)
        cfg.validate()
        return cfg

    def with_data_root(self, root: Optional[str | os.PathLike]) -> "Config":
        """A copy reading its images from ``root`` (None: this config itself): the one way a command's
        --data reaches a run's config, since the folder is where the data is, not how the run was made."""
        if root is None or root == "":
            return self
        cfg = copy.deepcopy(self)
        cfg.data.root = str(root)
        return cfg

    def validate(self) -> "Config":
        d, m, lo, t = self.data, self.model, self.loss, self.train
        _check(d.image_size >= 16 and d.image_size % 16 == 0, "data.image_size", d.image_size,
               "a multiple of 16, at least 16 (e.g. 64 or 128)")
        _check(d.clahe_clip > 0, "data.clahe_clip", d.clahe_clip, "a positive clip limit (the recipe uses 2.0)")
        _check(d.clahe_tiles >= 1, "data.clahe_tiles", d.clahe_tiles, "a tile grid of at least 1 (the recipe uses 8)")
        _check(d.batch_size >= 1, "data.batch_size", d.batch_size, "at least 1")
        _check(d.val_split in ("auto", "kaggle", "patient"), "data.val_split", d.val_split,
               "one of auto, kaggle, patient")
        _check(0.0 < d.val_fraction < 1.0, "data.val_fraction", d.val_fraction, "a fraction between 0 and 1")
        _check(d.max_per_class is None or d.max_per_class >= 1, "data.max_per_class", d.max_per_class,
               "null (all images) or at least 1")
        _check(d.preprocess_workers is None or d.preprocess_workers >= 1, "data.preprocess_workers",
               d.preprocess_workers, "null (all cores) or at least 1")
        _check(d.num_workers >= 0, "data.num_workers", d.num_workers, "0 or more")
        m.validate()
        lo.validate()
        for pname in ("phase1", "phase2"):
            p: PhaseConfig = getattr(t, pname)
            _check(p.epochs >= 0, f"train.{pname}.epochs", p.epochs, "0 (skip the phase) or more")
            _check(p.lr > 0, f"train.{pname}.lr", p.lr, "a positive learning rate")
            _check(p.scheduler in ("cosine", "plateau", "none"), f"train.{pname}.scheduler", p.scheduler,
                   "cosine, plateau or none")
            _check(p.beta_start >= 0 and p.beta_end >= 0, f"train.{pname}.beta_end", (p.beta_start, p.beta_end),
                   "KL weights of 0 or more")
            _check(p.beta_anneal_epochs >= 0, f"train.{pname}.beta_anneal_epochs", p.beta_anneal_epochs, "0 or more")
            _check(p.cosine_t0 >= 1, f"train.{pname}.cosine_t0", p.cosine_t0, "at least 1")
            _check(p.cosine_t_mult >= 1, f"train.{pname}.cosine_t_mult", p.cosine_t_mult, "at least 1")
            _check(0 < p.plateau_factor < 1, f"train.{pname}.plateau_factor", p.plateau_factor, "between 0 and 1")
            _check(p.plateau_patience >= 0, f"train.{pname}.plateau_patience", p.plateau_patience, "0 or more")
        _check(t.phase1.epochs + t.phase2.epochs >= 1, "train.phase1.epochs + train.phase2.epochs",
               t.phase1.epochs + t.phase2.epochs, "at least one epoch in total")
        _check(t.weight_decay >= 0, "train.weight_decay", t.weight_decay, "0 or more")
        _check(t.grad_clip > 0, "train.grad_clip", t.grad_clip, "a positive max-norm (the recipe uses 1.0)")
        _check(t.sample_every >= 1, "train.sample_every", t.sample_every, "at least 1")
        _check(t.n_samples >= 1, "train.n_samples", t.n_samples, "at least 1")
        _check(t.max_nonfinite_steps >= 1, "train.max_nonfinite_steps", t.max_nonfinite_steps, "at least 1")
        self._validate_prior()
        self.texture.validate()
        _check(not (self.texture.enabled and m.architecture != "spatial"), "texture.enabled", self.texture.enabled,
               "false for model.architecture=original (the stage trains the spatial decoder's head)")
        return self

    def _validate_prior(self) -> None:
        pr = self.prior
        for name in ("width", "depth", "heads", "steps", "batch_size", "sample_steps", "log_every"):
            _check(getattr(pr, name) >= 1, f"prior.{name}", getattr(pr, name), "at least 1")
        _check(pr.width % pr.heads == 0, "prior.width", pr.width, f"a multiple of prior.heads={pr.heads}")
        _check(pr.lr > 0, "prior.lr", pr.lr, "a positive learning rate")
        _check(pr.warmup_steps >= 0 and pr.weight_decay >= 0, "prior.warmup_steps / prior.weight_decay",
               (pr.warmup_steps, pr.weight_decay), "0 or more")
        _check(0 <= pr.ema < 1, "prior.ema", pr.ema, "a decay in [0, 1), e.g. 0.999")
        _check(0 <= pr.label_dropout <= 1, "prior.label_dropout", pr.label_dropout, "a probability in [0, 1]")
        _check(pr.guidance >= 0, "prior.guidance", pr.guidance, "0 or more (1 = no guidance)")
        _check(pr.time_sampling in TIME_SAMPLINGS, "prior.time_sampling", pr.time_sampling,
               " or ".join(repr(t) for t in TIME_SAMPLINGS))
        _check(pr.spread >= 0, "prior.spread", pr.spread, "0 (off) or a target RMS, e.g. 1.0")
        _check(pr.calibration_samples >= 2, "prior.calibration_samples", pr.calibration_samples, "at least 2")


def _check(ok: bool, name: str, value: Any, expected: str) -> None:
    if not ok:
        raise ConfigError(f"{name}={value!r} is invalid: expected {expected}")


# ---- presets ----------------------------------------------------------------------------

def _seed() -> Config:
    return Config(preset="seed")


def _quick() -> Config:
    # CPU-sized: 64 px (one stage fewer), a class-balanced subset, both phases kept short.
    cfg = Config(preset="quick")
    cfg.data.image_size = 64
    cfg.data.max_per_class = 1000
    # Small budgets need optimizer steps more than big batches: batch 8 gives 4x the updates of 32
    # for the same images, and gave the best PSNR for the same epochs (docs/results/defaults.md).
    cfg.data.batch_size = 8
    cfg.train.phase1.lr = 2e-4
    cfg.train.phase2.lr = 1e-4  # half of phase 1's, as in the recipe (1e-4 -> 5e-5)
    cfg.train.phase1.epochs = 10
    cfg.train.phase1.cosine_t0 = 10  # one cosine cycle
    cfg.train.phase2.epochs = 12
    cfg.train.phase2.beta_anneal_epochs = 6
    cfg.train.phase2.plateau_patience = 2
    cfg.train.sample_every = 4
    return cfg


def _quick128() -> Config:
    # The recipe's own resolution on a CPU budget (README's main job): the quick preset's subset,
    # batch and phase-1 lr at 128 px, the seed's model and widths, fewer epochs.
    cfg = _quick()
    cfg.preset = "quick128"
    cfg.data.image_size = 128
    cfg.train.phase1.epochs = 6
    cfg.train.phase1.cosine_t0 = 6  # one cosine cycle: the lr ends near 0, so phase 1 ends on settled weights
    cfg.train.phase2.epochs = 3
    cfg.train.phase2.beta_anneal_epochs = 2  # 0, 5e-4, then 1e-3 in the last epoch (best.pt is picked at 1e-3)
    # Phase 2 "maintains reconstruction quality": it goes on near where phase 1's cosine ended;
    # restarting at quick's 1e-4 undid part of phase 1 (docs/results/defaults.md).
    cfg.train.phase2.lr = 2e-5
    cfg.train.phase2.plateau_patience = 1
    cfg.train.sample_every = 3
    # The texture stage (a sharp decoder head beside the smooth one): at 16x compression the smooth
    # decoder cannot draw the fine detail a 128 px X-ray has (docs/results/texture_stage_128.md).
    cfg.texture.enabled = True
    # The 128 px latent holds more detail than the 64 px one, and the prior was still learning at
    # 1,600 steps; the job's time limit leaves room for half as many again. Guidance 2 drew samples
    # nearer the validation split than 1.75 on every measure (docs/results/learned_prior.md).
    cfg.prior.steps = 2400
    cfg.prior.guidance = 2.0
    return cfg


def _literal(cfg: Config) -> Config:
    # The recipe read literally (LITERAL_SETTINGS; see LossConfig.kl_reduction).
    cfg.preset += "-literal"
    for key, value in LITERAL_SETTINGS.items():
        _set_path(cfg, key, value)
    return cfg


def _quick_literal() -> Config:
    # The quick preset as it was before the departures (README, Results): batch 32, lr 1e-4 / 5e-5.
    cfg = _literal(_quick())
    cfg.data.batch_size = 32
    cfg.train.phase1.lr, cfg.train.phase2.lr = 1e-4, 5e-5
    cfg.train.phase1.epochs, cfg.train.phase1.cosine_t0 = 10, 10
    cfg.train.phase2.epochs, cfg.train.phase2.beta_anneal_epochs = 14, 7
    return cfg


def _smoke() -> Config:
    # Seconds: a handful of images, tiny widths, one epoch per phase. For tests and CI.
    cfg = Config(preset="smoke")
    cfg.data.image_size = 32
    cfg.data.batch_size = 8
    cfg.data.max_per_class = 16
    cfg.model.channels = (8, 16, 32)  # 32 px -> 4x4 latent takes 3 downsamplings
    cfg.model.latent_channels = 8
    cfg.model.latent_size = 4
    cfg.model.attention_resolutions = (8,)
    cfg.model.norm_groups = 4
    # Off: smoke runs on CI machines with no internet, so no VGG16 weights. Every run logs
    # "perceptual term OFF"; --set loss.perceptual_weight=0.1 loss.vgg_weights=random exercises it.
    cfg.loss.perceptual_weight = 0.0
    cfg.train.phase1.epochs = 1
    cfg.train.phase2.epochs = 2  # the second phase-2 epoch runs at the final beta: KL is exercised
    cfg.train.phase2.beta_anneal_epochs = 1
    cfg.train.sample_every = 1
    cfg.train.n_samples = 16
    cfg.prior.width, cfg.prior.depth, cfg.prior.heads = 32, 1, 2  # the prior stage runs, in a second
    cfg.prior.steps, cfg.prior.batch_size, cfg.prior.log_every = 20, 16, 10
    cfg.prior.warmup_steps, cfg.prior.sample_steps = 5, 4
    cfg.texture.steps, cfg.texture.log_every = 20, 10  # off, but a second when a test turns it on
    return cfg


def _original() -> Config:
    # The recipe's flat-latent baseline, for comparison: BatchNorm/LeakyReLU/ConvTranspose2d with a
    # 256-d latent, MSE only, a constant beta of 0.5 from the first epoch, one phase as long as the
    # seed's two together (50 + 100 = 150 epochs) so curves line up epoch for epoch.
    # Reductions: the squared error is SUMMED over pixels and the KL over the 256 latent values
    # (per image, averaged over the batch), the classic ELBO form such baselines are written in.
    # "beta 0.5" only means something with a stated reduction: against a per-pixel MEAN MSE the
    # same 0.5 would weigh the KL 16,384x (128 px) more and collapse the posterior.
    cfg = Config(preset="original")
    cfg.model.architecture = "original"
    cfg.loss.recon = "mse"
    cfg.loss.pixel_reduction = "sum"
    cfg.loss.kl_reduction = "sum"
    cfg.loss.perceptual_weight = 0.0
    cfg.loss.ssim_weight = 0.0
    cfg.train.phase1.epochs = 0
    cfg.train.phase2 = PhaseConfig(epochs=150, lr=1e-4, scheduler="plateau",
                                   beta_start=0.5, beta_end=0.5, beta_anneal_epochs=0)
    cfg.prior.enabled = False  # the learned prior is over the spatial latent; this baseline samples N(0, I)
    return cfg


PRESETS = {"seed": _seed, "quick": _quick, "smoke": _smoke, "original": _original,
           "seed-literal": lambda: _literal(_seed()), "quick-literal": _quick_literal, "quick128": _quick128}


def get_preset(name: str) -> Config:
    """A fresh, validated copy of the named preset."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}: choose one of {', '.join(PRESETS)}")
    return PRESETS[name]().validate()


# ---- dataclass <-> dict helpers -----------------------------------------------------------

def _from_dict(cls, d: dict, prefix: str, base=None):
    """Build ``cls`` from a dict; keys not given keep ``base``'s values (the parent's defaults)."""
    if not isinstance(d, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a JSON object, got {d!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ConfigError(f"unknown config key '{prefix}{unknown[0]}'; valid keys here: {', '.join(sorted(names))}")
    obj = copy.deepcopy(base) if base is not None else cls()
    for name, value in d.items():
        tp = hints[name]
        if dataclasses.is_dataclass(tp):  # nested section: start from this field's own default
            setattr(obj, name, _from_dict(tp, value, prefix + name + ".", base=getattr(obj, name)))
        else:
            setattr(obj, name, _coerce(tp, value, prefix + name))
    return obj


def _coerce(tp, value, name: str):
    """Convert a JSON (or command-line string) value to the field's declared type."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return _from_dict(tp, value, prefix=name + ".")
    if origin is typing.Union:  # Optional[X]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        inner = [a for a in args if a is not type(None)][0]
        return _coerce(inner, value, name)
    if origin in (tuple, Tuple):
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                value = json.loads(text)
            else:
                value = [v for v in text.strip("()").split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name} must be a list like [32, 64], got {value!r}")
        return tuple(_coerce(args[0], v, name) for v in value)
    try:
        if tp is bool:
            if isinstance(value, str):
                low = value.strip().lower()
                if low in ("1", "true", "yes", "on"):
                    return True
                if low in ("0", "false", "no", "off"):
                    return False
                raise ValueError(value)
            if isinstance(value, (bool, int)) and value in (0, 1):
                return bool(value)
            raise ValueError(value)
        if tp is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError(value)
            return int(value)
        if tp is float:
            if isinstance(value, bool):
                raise ValueError(value)
            return float(value)
        if tp is str:
            if not isinstance(value, str):
                raise ValueError(value)
            return value
    except (TypeError, ValueError):
        raise ConfigError(f"{name}={value!r} is not a valid {getattr(tp, '__name__', tp)}") from None
    return value


def _split_override(text: str) -> tuple[str, str]:
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value, e.g. data.image_size=64")
    key, value = text.split("=", 1)
    return key.strip(), value.strip()


def _set_path(cfg: Config, key: str, value: Any) -> None:
    parts = key.split(".")
    obj = cfg
    for i, part in enumerate(parts):
        if not dataclasses.is_dataclass(obj) or part not in {f.name for f in dataclasses.fields(obj)}:
            where = ".".join(parts[:i]) or "config"
            valid = ", ".join(f.name for f in dataclasses.fields(obj)) if dataclasses.is_dataclass(obj) else ""
            raise ConfigError(f"unknown config key {key!r}: {where} has no field {part!r} (valid: {valid})")
        if i == len(parts) - 1:
            tp = typing.get_type_hints(type(obj))[part]
            if dataclasses.is_dataclass(tp):
                raise ConfigError(f"{key} is a section; set one of its fields, e.g. {key}.epochs=3")
            setattr(obj, part, _coerce(tp, value, key))
        else:
            obj = getattr(obj, part)


def perceptual_mode(cfg: Config) -> str:
    """How the perceptual term runs, in words, for logs and results."""
    lo = cfg.loss
    if lo.perceptual_weight == 0:
        return "perceptual term OFF (loss.perceptual_weight=0)"
    if lo.vgg_weights == "random":
        return "perceptual term uses RANDOM VGG16 features (explicit opt-in, not the recipe's ImageNet features)"
    if lo.vgg_weights == "imagenet":
        return "perceptual term uses VGG16 ImageNet weights"
    return f"perceptual term uses VGG16 weights from {lo.vgg_weights}"


def flatten(d: dict, prefix: str = "") -> dict:
    """A nested dict as {\"a.b.c\": leaf}."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
