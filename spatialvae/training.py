"""Two-phase training with checkpoints that survive a dead session.

Phase 1 learns to reconstruct (beta = 0, AdamW, cosine warm restarts); phase 2 adds the KL term
with beta annealed linearly and ReduceLROnPlateau. `Trainer` owns one run folder::

    runs/003-seed/
      config.json      the full Config (rebuilds the run)
      history.csv      one row per epoch: phase, beta, lr, every loss part (train and val), speed
      train.log        what was printed
      samples/epoch_010.png   aggregate-posterior samples on top, val originals / reconstructions below
      checkpoints/last.pt     every epoch: model, optimizer, scheduler, scaler, RNG, history, config
      checkpoints/best.pt     lowest validation loss at the final beta (see `Trainer.evaluate`)

Checkpoints are written atomically (temp file + ``os.replace``) and read with
``torch.load(weights_only=True)``: nothing in a checkpoint is executed. Resuming continues at the
next epoch with the same optimizer, scheduler, RNG and shuffling state, so an interrupted run ends
with the same weights as one that never stopped (on CPU, where kernels are deterministic).
"""

from __future__ import annotations

import csv
import io
import logging
import math
import os
import random
import sys
import time
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler

from .config import Config, PhaseConfig, TrainConfig
from .data import make_dataloader
from .engine import autocast_context, train_step
from .errors import CheckpointError, SpatialVAEError, short_reason
from .files import atomic_torch_save, atomic_write_bytes  # noqa: F401 - re-exported
from .metrics import psnr, ssim_score

CHECKPOINT_VERSION = 2  # 2: model.shortcut, model.logvar_init and kl_reduction=mean became the defaults
# Keys a version-1 checkpoint's config lacks, with the values it was trained with.
_V1_DEFAULTS = {"model": {"shortcut": "conv", "logvar_init": None}, "loss": {"kl_reduction": "sum"}}


class TrainingDivergedError(SpatialVAEError):
    """The loss stayed NaN/inf for too many steps in a row."""


# ---------------------------------------------------------------------------------------------
# Schedules (pure functions of the epoch)
# ---------------------------------------------------------------------------------------------

def total_epochs(cfg: TrainConfig) -> int:
    return cfg.phase1.epochs + cfg.phase2.epochs


def phase_at(epoch: int, cfg: TrainConfig) -> tuple[int, int, PhaseConfig]:
    """Global 0-based epoch -> (phase number 1 or 2, epoch within the phase, its PhaseConfig)."""
    if epoch < cfg.phase1.epochs:
        return 1, epoch, cfg.phase1
    return 2, epoch - cfg.phase1.epochs, cfg.phase2


def get_beta(epoch: int, cfg: TrainConfig) -> float:
    """KL weight at a global 0-based epoch: linear from beta_start to beta_end over
    beta_anneal_epochs of its phase, then held. Seed: 0 for epochs 0-49 (phase 1), then
    0, 2e-5, ..., 9.8e-4 for phase-2 epochs 0-49 and 1e-3 from phase-2 epoch 50 on."""
    _, e, p = phase_at(epoch, cfg)
    if p.beta_anneal_epochs <= 0:
        return float(p.beta_end)
    t = min(1.0, e / p.beta_anneal_epochs)
    return float(p.beta_start + (p.beta_end - p.beta_start) * t)


def final_beta(cfg: TrainConfig) -> float:
    """The beta the schedule ends at: the objective `best.pt` is chosen by."""
    return get_beta(total_epochs(cfg) - 1, cfg)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ---------------------------------------------------------------------------------------------
# Run folders and atomic files
# ---------------------------------------------------------------------------------------------

def create_run_dir(out: str | os.PathLike, name: str) -> Path:
    """``out/NNN-name`` with NNN one more than the highest existing number (DiT-style)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    taken = [int(p.name.split("-", 1)[0]) for p in out.iterdir() if p.is_dir() and p.name[:3].isdigit()]
    index = max(taken, default=-1) + 1
    while True:
        run = out / f"{index:03d}-{name}"
        try:
            run.mkdir()
            return run
        except FileExistsError:  # another process took it: try the next number
            index += 1


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Read a checkpoint safely (tensors and plain containers only; no code is executed)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}; check the run folder (checkpoints/last.pt or best.pt)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - corrupt, truncated or unsafe pickle
        raise CheckpointError(f"cannot read checkpoint {path} ({short_reason(e)}); it is corrupt or not a spatialvae "
                              "checkpoint: resume from another file or start a new run") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        raise CheckpointError(f"{path} is not a spatialvae checkpoint (no model/config entries)")
    return ckpt


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu"):
    """The model a checkpoint holds, rebuilt from its own config, in eval mode -> (model, cfg, ckpt)."""
    from .model import build_model

    ckpt = load_checkpoint(path)
    cfg = config_from_checkpoint(ckpt)
    model = build_model(cfg)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint {path} does not fit its own config ({short_reason(e)})") from None
    return model.to(device).eval(), cfg, ckpt


def config_from_checkpoint(ckpt: dict) -> Config:
    d = ckpt["config"]
    if int(ckpt.get("version", 1)) < 2 and isinstance(d, dict):  # written before the defaults changed
        d = {**d, **{sec: {**_V1_DEFAULTS[sec], **d.get(sec, {})} for sec in _V1_DEFAULTS}}
    try:
        return Config.from_dict(d)
    except ValueError as e:
        raise CheckpointError(f"the checkpoint's config is not valid for this version of spatialvae: {e}") from None


def _architecture(cfg: Config) -> dict:
    return {"data.image_size": cfg.data.image_size, **{f"model.{k}": v for k, v in asdict(cfg.model).items()}}


def check_compatible(ckpt_cfg: Config, cfg: Config, path) -> None:
    """Same architecture, or one clear error naming what differs."""
    a, b = _architecture(ckpt_cfg), _architecture(cfg)
    diff = [f"{k}: checkpoint {a[k]!r} vs config {b[k]!r}" for k in a if a[k] != b.get(k)]
    if diff:
        raise CheckpointError(f"checkpoint {path} is from an incompatible config ({'; '.join(diff)}); "
                              "resume with the run's own config.json or start a new run")


# ---------------------------------------------------------------------------------------------
# The trainer
# ---------------------------------------------------------------------------------------------

def _dist_info() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def gpu_warning(device: torch.device) -> Optional[str]:
    """Kaggle's P100 (sm_60) has no kernels in current PyTorch builds: say so before a crash."""
    if device.type != "cuda":
        return None
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (7, 0):
        name = torch.cuda.get_device_name(device)
        arches = getattr(torch.cuda, "get_arch_list", lambda: [])()
        if f"sm_{major}{minor}" not in arches:
            return (f"GPU {name} (compute capability {major}.{minor}) is not supported by this PyTorch build "
                    f"(kernels for {', '.join(arches) or 'unknown'}); on Kaggle choose 'GPU T4 x2' under "
                    "Settings > Accelerator")
    return None


class Trainer:
    """Trains a VAE on datasets passed in: ``fit()``, ``train_epoch()``, ``evaluate()``,
    ``save()``, ``load()``. Works on CPU (fp32) and CUDA (fp16/bf16 autocast), alone or under
    torchrun (DistributedDataParallel; rank 0 writes every file).
    """

    def __init__(self, model: nn.Module, loss: nn.Module, train_data: Dataset, val_data: Optional[Dataset],
                 config: Config, run_dir: str | os.PathLike | None = None, device: str | torch.device | None = None,
                 progress: bool = True, log: Optional[logging.Logger] = None,
                 monitor_data: Optional[Dataset] = None):
        self.cfg = config
        t = config.train
        self.device = torch.device(device) if device is not None else default_device()
        self.rank, self.world_size = _dist_info()
        self.is_main = self.rank == 0
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.progress = progress and self.is_main
        self.log = log or make_logger(self.run_dir if self.is_main else None)
        if self.is_main and (msg := gpu_warning(self.device)):
            self.log.warning("warning: " + msg)
            warnings.warn(msg)

        self.raw_model = model.to(self.device)
        self.memory_format = torch.channels_last if t.channels_last else torch.contiguous_format
        if t.channels_last:
            self.raw_model = self.raw_model.to(memory_format=torch.channels_last)
        self.model: nn.Module = self.raw_model
        if self.world_size > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = nn.parallel.DistributedDataParallel(self.raw_model, device_ids=ids)
        if t.compile:
            self.model = torch.compile(self.model)
        self.loss_fn = loss.to(self.device)

        # Mixed precision on CUDA only: bf16 where native (no scaler needed), else fp16 + GradScaler.
        cuda = self.device.type == "cuda"
        self.amp_dtype = None
        if cuda and t.amp:
            self.amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)

        self.train_data, self.val_data = train_data, val_data
        # Only watched (PSNR / SSIM per epoch, for time-to-quality curves), never used to select.
        self.monitor_data = monitor_data
        batch = config.data.batch_size
        if batch % self.world_size:
            raise SpatialVAEError(f"data.batch_size={batch} is not divisible by {self.world_size} processes; "
                                  "the global batch is split evenly across GPUs")
        self.batch_per_rank = batch // self.world_size
        if self.world_size > 1:
            self.train_sampler = DistributedSampler(train_data, self.world_size, self.rank, shuffle=True,
                                                    seed=t.seed, drop_last=True)
        else:
            self._shuffle_gen = torch.Generator()
            self.train_sampler = RandomSampler(train_data, generator=self._shuffle_gen)
        workers = config.data.num_workers
        self.train_loader = make_dataloader(train_data, self.batch_per_rank, train=True, num_workers=workers,
                                            device=self.device, sampler=self.train_sampler)
        if len(self.train_loader) == 0:
            raise SpatialVAEError(f"the training split has {len(train_data)} images, fewer than one batch of "
                                  f"{batch}; lower data.batch_size or use more images")
        self.val_loader = None if val_data is None else make_dataloader(
            val_data, batch, train=False, num_workers=workers, device=self.device)

        first = t.phase1 if t.phase1.epochs > 0 else t.phase2
        self.optimizer = torch.optim.AdamW(self.raw_model.parameters(), lr=first.lr, weight_decay=t.weight_decay)
        self.scheduler = None
        self.scheduler_phase = 0
        self.epoch = 0  # the next epoch to run, global and 0-based
        self.history: list[dict] = []
        self.best_val = math.inf
        self.nonfinite_total = 0
        self._bad_in_a_row = 0
        self._sample_gen_seed = t.seed + 12345  # fixed prior draws: grids from epoch to epoch are comparable

    # ---- phases ------------------------------------------------------------------------------
    def _enter_phase(self, phase: int) -> None:
        """Set the phase's lr and a fresh scheduler; Adam moments carry over."""
        if self.scheduler_phase == phase:
            return
        p = self.cfg.train.phase1 if phase == 1 else self.cfg.train.phase2
        for g in self.optimizer.param_groups:
            g["lr"] = p.lr
            g["initial_lr"] = p.lr
        self.scheduler = make_scheduler(self.optimizer, p)
        self.scheduler_phase = phase

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    # ---- one epoch -----------------------------------------------------------------------------
    def _autocast(self):
        return autocast_context(self.device, self.amp_dtype)

    def _set_epoch(self, epoch: int) -> None:
        if hasattr(self.train_data, "set_epoch"):
            self.train_data.set_epoch(epoch)  # flips
        if isinstance(self.train_sampler, DistributedSampler):
            self.train_sampler.set_epoch(epoch)
        else:
            self._shuffle_gen.manual_seed(self.cfg.train.seed * 1_000_003 + epoch)  # order depends only on epoch

    def train_epoch(self, beta: Optional[float] = None) -> dict:
        """One pass over the training data at the current epoch; returns mean loss parts."""
        beta = get_beta(self.epoch, self.cfg.train) if beta is None else beta
        self._set_epoch(self.epoch)
        self.model.train()
        self.loss_fn.train()
        sums: dict[str, torch.Tensor] = {}
        n_seen = 0
        params = [p for p in self.raw_model.parameters() if p.requires_grad]
        from tqdm.std import tqdm  # plain text bar: also readable in a committed Kaggle run's log

        bar = tqdm(self.train_loader, desc=f"epoch {self.epoch + 1}/{total_epochs(self.cfg.train)}",
                   disable=not self.progress, leave=False, dynamic_ncols=True, mininterval=2.0, file=sys.stderr)
        for step, (x, _) in enumerate(bar):
            x = x.to(self.device, non_blocking=True).contiguous(memory_format=self.memory_format)
            res = train_step(self.model, self.loss_fn, self.optimizer, self.scaler, x, beta, self.cfg.train.grad_clip,
                             params, autocast=self._autocast, all_finite=self._all_finite)
            if res.skipped:
                self._skip_step(res.skipped)
                continue
            parts = res.parts
            self._bad_in_a_row = 0
            b = x.shape[0]
            n_seen += b
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + v.float() * b
            if self.progress and step % 10 == 0:
                bar.set_postfix(loss=f"{float(parts['total']):.4f}", beta=f"{beta:.1e}")
        bar.close()
        if n_seen == 0:
            raise TrainingDivergedError(f"no finite training step in epoch {self.epoch + 1}; lower the learning "
                                        "rate or turn off AMP (train.amp=false)")
        out = {k: float(v) / n_seen for k, v in sums.items()}
        out["images"] = n_seen * self.world_size
        return out

    def _all_finite(self, value: torch.Tensor) -> bool:
        ok = torch.isfinite(value.detach()).all().float().reshape(1)
        if self.world_size > 1:  # every rank must skip together, or DDP's all-reduce would hang
            dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        return bool(ok.item())

    def _skip_step(self, why: str) -> None:
        self.nonfinite_total += 1
        self._bad_in_a_row += 1
        limit = self.cfg.train.max_nonfinite_steps
        self.log.warning(f"warning: skipped a step at epoch {self.epoch + 1}: {why} "
                         f"({self._bad_in_a_row} in a row, limit {limit})")
        if self._bad_in_a_row >= limit:
            where = f" {self.run_dir / 'checkpoints' / 'last.pt'} holds the last good epoch;" if self.run_dir else ""
            raise TrainingDivergedError(
                f"training diverged: the loss was NaN/inf for {limit} steps in a row at epoch {self.epoch + 1}.{where} "
                "lower the learning rate (train.phase1.lr / train.phase2.lr), keep train.grad_clip, "
                "or turn off AMP (train.amp=false)")

    # ---- validation ---------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, data: Optional[Dataset] = None, beta: Optional[float] = None) -> dict:
        """Mean loss parts on the validation data, decoding the posterior mean (deterministic,
        and it leaves the training RNG untouched). ``select`` is the loss at the schedule's final
        beta: it ranks epochs for `best.pt` and drives ReduceLROnPlateau, so a rising beta during
        annealing does not look like a worsening model."""
        beta = get_beta(self.epoch, self.cfg.train) if beta is None else beta
        loader = self.val_loader if data is None else DataLoader(data, batch_size=self.cfg.data.batch_size)
        if loader is None:
            return {}
        was_training = self.raw_model.training
        self.raw_model.eval()
        sums: dict[str, torch.Tensor] = {}
        n = 0
        for x, _ in loader:
            x = x.to(self.device, non_blocking=True).contiguous(memory_format=self.memory_format)
            with self._autocast():
                recon, mu, logvar = self.raw_model(x, sample_posterior=False)
                _, parts = self.loss_fn(recon, x, mu, logvar, beta)
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + v.float() * x.shape[0]
            n += x.shape[0]
        self.raw_model.train(was_training)
        out = {k: float(v) / n for k, v in sums.items()}
        out["select"] = out["total"] - beta * out["kl"] + final_beta(self.cfg.train) * out["kl"]
        return out

    @torch.no_grad()
    def monitor(self) -> dict:
        """PSNR / SSIM of posterior-mean reconstructions of ``monitor_data`` (the test split in
        time-to-quality runs) -> {monitor_psnr, monitor_ssim, monitor_seconds}. Its time is kept
        apart from ``seconds``, so a watched run's clock is the same as an unwatched one's."""
        t0 = time.perf_counter()
        loader = DataLoader(self.monitor_data, batch_size=max(64, self.cfg.data.batch_size))
        was_training = self.raw_model.training
        self.raw_model.eval()
        p, s = [], []
        for x, _ in loader:
            x = x.to(self.device).contiguous(memory_format=self.memory_format)
            with self._autocast():
                recon = self.raw_model(x, sample_posterior=False)[0].float().clamp(0, 1)
            p.append(psnr(recon, x).cpu())
            s.append(ssim_score(recon, x).cpu())
        self.raw_model.train(was_training)
        return {"monitor_psnr": float(torch.cat(p).mean()), "monitor_ssim": float(torch.cat(s).mean()),
                "monitor_seconds": time.perf_counter() - t0}

    # ---- the loop -------------------------------------------------------------------------------
    def fit(self, until_epoch: Optional[int] = None) -> list[dict]:
        """Run the remaining epochs of both phases (or stop once ``until_epoch`` epochs are done,
        e.g. to train a notebook session in chunks); returns the history, one dict per epoch."""
        t = self.cfg.train
        n_total = total_epochs(t)
        stop = n_total if until_epoch is None else min(n_total, until_epoch)
        if self.is_main and self.run_dir is not None:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(self.run_dir / "config.json", (self.cfg.to_json() + "\n").encode())
            if self.epoch == 0:
                self.log.info(describe_run(self))
        while self.epoch < stop:
            phase, phase_epoch, p = phase_at(self.epoch, t)
            self._enter_phase(phase)
            beta = get_beta(self.epoch, t)
            lr = self.lr
            t0 = time.perf_counter()
            train = self.train_epoch(beta)
            train_seconds = time.perf_counter() - t0
            val = self._evaluate_everywhere(beta)
            if p.scheduler == "plateau":
                self.scheduler.step(val.get("select", train["total"]))
            elif self.scheduler is not None:
                self.scheduler.step()
            seconds = time.perf_counter() - t0
            watched = self.monitor() if self.monitor_data is not None and self.is_main else {}
            row = {"phase": phase, "epoch": self.epoch + 1, "phase_epoch": phase_epoch + 1, "beta": beta, "lr": lr}
            row.update({f"train_{k}": v for k, v in train.items() if k != "images"})
            row.update({f"val_{k}": v for k, v in val.items()})
            row.update({"seconds": seconds, "images_per_s": train["images"] / max(train_seconds, 1e-9),
                        "nonfinite_steps": self.nonfinite_total})
            row.update(watched)
            self.history.append(row)
            self.epoch += 1
            improved = "val_select" in row and row["val_select"] < self.best_val
            if improved:
                self.best_val = row["val_select"]
            if self.is_main:
                self._log_epoch(row, improved)
                if self.run_dir is not None:
                    if self.epoch % t.sample_every == 0 or self.epoch == n_total:
                        self.save_samples()
                    write_history_csv(self.history, self.run_dir / "history.csv")
                    self.save(self.run_dir / "checkpoints" / "last.pt")
                    if improved or val == {}:
                        self.save(self.run_dir / "checkpoints" / "best.pt")
            if self.world_size > 1:
                dist.barrier()
        return self.history

    def _evaluate_everywhere(self, beta: float) -> dict:
        """Rank 0 evaluates the full validation set; the result reaches every rank (plateau lr)."""
        if self.world_size == 1:
            return self.evaluate(beta=beta)
        box = [self.evaluate(beta=beta) if self.is_main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def _log_epoch(self, row: dict, improved: bool) -> None:
        parts = " ".join(f"{k}={row[f'train_{k}']:.4f}" for k in ("recon", "perceptual", "ssim", "kl")
                         if f"train_{k}" in row)
        val = f" | val total={row['val_total']:.4f} select={row['val_select']:.4f}" if "val_total" in row else ""
        if "monitor_psnr" in row:
            val += f" | test PSNR {row['monitor_psnr']:.2f} dB SSIM {row['monitor_ssim']:.3f}"
        self.log.info(
            f"epoch {row['epoch']:>3}/{total_epochs(self.cfg.train)} phase {row['phase']} "
            f"beta={row['beta']:.2e} lr={row['lr']:.2e} | train total={row['train_total']:.4f} {parts}{val} | "
            f"{row['seconds']:.1f}s {row['images_per_s']:.0f} img/s{' *best' if improved else ''}")

    # ---- pictures ---------------------------------------------------------------------------------
    @torch.no_grad()
    def save_samples(self, path: Optional[Path] = None) -> Path:
        """Samples (the same noise every time) and val reconstructions -> samples/epoch_XXX.png.

        The samples decode a full-covariance Gaussian fitted to the validation set's posterior
        means (the aggregate posterior): with the per-value KL the latent does not fill N(0, I),
        and prior noise decodes to noise. Without validation data they decode N(0, I)."""
        from .sampling import GaussianSampler, decode_latents, encode_dataset
        from .viz import sample_sheet, save_png

        path = path or (self.run_dir / "samples" / f"epoch_{self.epoch:03d}.png")
        gen = torch.Generator().manual_seed(self._sample_gen_seed)
        n = self.cfg.train.n_samples
        originals = recons = None
        if self.val_data is not None and len(self.val_data) >= 2:
            latents = encode_dataset(self.raw_model, self.val_data, batch_size=64, device=self.device)
            samples = decode_latents(self.raw_model, GaussianSampler().fit(latents).sample(n, generator=gen))
            k = min(16, len(self.val_data))
            originals = torch.stack([self.val_data[i][0] for i in range(k)])
            recons = decode_latents(self.raw_model, latents[:k])
        else:
            with self._autocast():
                samples = self.raw_model.sample(n, generator=gen).float().cpu()
        return save_png(sample_sheet(samples, originals, recons), path)

    # ---- checkpoints ------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "version": CHECKPOINT_VERSION,
            "model": self.raw_model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": None if self.scheduler is None else self.scheduler.state_dict(),
            "scheduler_phase": self.scheduler_phase,
            "scaler": self.scaler.state_dict(),
            "epoch": self.epoch,
            "history": self.history,
            "best_val": self.best_val,
            "nonfinite_total": self.nonfinite_total,
            "config": self.cfg.to_dict(),
            "rng": {"torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Atomic checkpoint; refuses to write weights that are not finite."""
        for name, p in self.raw_model.state_dict().items():
            if p.is_floating_point() and not torch.isfinite(p).all():
                raise TrainingDivergedError(f"weights {name} contain NaN/inf; not saving over {path}")
        path = Path(path)
        atomic_torch_save(self.state_dict(), path)
        return path

    def load(self, path: str | os.PathLike) -> "Trainer":
        """Restore everything `save` wrote; `fit()` then continues at the next epoch."""
        ckpt = load_checkpoint(path)
        check_compatible(config_from_checkpoint(ckpt), self.cfg, path)
        try:
            self.raw_model.load_state_dict(ckpt["model"])
            if ckpt.get("scheduler_phase"):
                self._enter_phase(int(ckpt["scheduler_phase"]))
            self.optimizer.load_state_dict(ckpt["optimizer"])
            if self.scheduler is not None and ckpt.get("scheduler") is not None:
                self.scheduler.load_state_dict(ckpt["scheduler"])
            self.scaler.load_state_dict(ckpt["scaler"])
        except (RuntimeError, KeyError, ValueError) as e:
            raise CheckpointError(f"checkpoint {path} does not fit this model ({short_reason(e)}); "
                                  "resume with the run's own config.json") from None
        self.epoch = int(ckpt["epoch"])
        self.history = list(ckpt["history"])
        self.best_val = float(ckpt["best_val"])
        self.nonfinite_total = int(ckpt.get("nonfinite_total", 0))
        rng = ckpt.get("rng") or {}
        if "torch" in rng:
            torch.set_rng_state(rng["torch"])
        if rng.get("cuda") and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        return self


def make_scheduler(optimizer: torch.optim.Optimizer, p: PhaseConfig):
    if p.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(optimizer, T_0=p.cosine_t0, T_mult=p.cosine_t_mult)
    if p.scheduler == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="min", factor=p.plateau_factor,
                                                          patience=p.plateau_patience)
    return None


def write_history_csv(history: list[dict], path: Path) -> None:
    keys: list[str] = []
    for row in history:
        keys += [k for k in row if k not in keys]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys)
    w.writeheader()
    for row in history:
        w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    atomic_write_bytes(path, buf.getvalue().encode())


def read_history_csv(path: str | os.PathLike) -> list[dict]:
    with open(path, newline="") as f:
        return [{k: _num(v) for k, v in row.items()} for row in csv.DictReader(f)]


def _num(v: str):
    try:
        return int(v)
    except ValueError:
        try:
            return float(v)
        except ValueError:
            return v


def make_logger(run_dir: Optional[Path]) -> logging.Logger:
    """Console + ``train.log`` in the run folder (one logger per run folder)."""
    name = f"spatialvae.run.{run_dir}" if run_dir else "spatialvae.run"
    log = logging.getLogger(name)
    log.setLevel(logging.INFO)
    log.propagate = False
    if not log.handlers:
        console = logging.StreamHandler(sys.stdout)
        console.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(console)
        if run_dir is not None:
            Path(run_dir).mkdir(parents=True, exist_ok=True)
            fh = logging.FileHandler(Path(run_dir) / "train.log")
            fh.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S"))
            log.addHandler(fh)
    return log


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


def describe_run(tr: Trainer) -> str:
    c = tr.cfg
    n_params = sum(p.numel() for p in tr.raw_model.parameters())
    amp = {None: "fp32", torch.float16: "fp16 autocast", torch.bfloat16: "bf16 autocast"}[tr.amp_dtype]
    return (f"run {tr.run_dir} | preset {c.preset} | {c.model.architecture} model, {n_params:,} parameters, "
            f"latent {tuple(getattr(tr.raw_model, 'latent_shape', ()))} | {c.data.image_size} px, "
            f"{len(tr.train_data)} train / {len(tr.val_data) if tr.val_data is not None else 0} val images | "
            f"device {tr.device} x{tr.world_size}, {amp} | epochs {c.train.phase1.epochs} + {c.train.phase2.epochs} | "
            f"{perceptual_mode(c)}")


def build_trainer(cfg: Config, train_data: Dataset, val_data: Optional[Dataset], run_dir: str | os.PathLike,
                  device: str | torch.device | None = None, progress: bool = True,
                  log: Optional[logging.Logger] = None, resume: bool | str = "auto",
                  loss: Optional[nn.Module] = None, monitor_data: Optional[Dataset] = None) -> Trainer:
    """Seed, build the model and loss, and a Trainer for ``run_dir``.

    ``resume="auto"`` continues from ``run_dir/checkpoints/last.pt`` when it exists (so re-running
    a notebook cell picks up where it stopped), ``True`` requires it, ``False`` starts fresh.
    ``loss`` may be built beforehand (building it checks the VGG weights before any folder exists).
    """
    from .losses import build_loss
    from .model import build_model

    run_dir = Path(run_dir)
    seed_everything(cfg.train.seed)
    model = build_model(cfg)
    loss = loss if loss is not None else build_loss(cfg)
    trainer = Trainer(model, loss, train_data, val_data, cfg, run_dir=run_dir, device=device, progress=progress,
                      log=log or make_logger(run_dir if _dist_info()[0] == 0 else None), monitor_data=monitor_data)
    last = run_dir / "checkpoints" / "last.pt"
    if resume is True or (resume == "auto" and last.is_file()):
        trainer.load(last)
        trainer.log.info(f"resumed {run_dir} at epoch {trainer.epoch + 1} of {total_epochs(cfg.train)}")
    return trainer
