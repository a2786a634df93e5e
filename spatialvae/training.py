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

Checkpoints are written atomically and read with ``torch.load(weights_only=True)`` (see
`spatialvae.runs`): nothing in a checkpoint is executed. Resuming continues at the
next epoch with the same optimizer, scheduler, RNG and shuffling state, so an interrupted run ends
with the same weights as one that never stopped (on CPU, where kernels are deterministic).
"""

from __future__ import annotations

import math
import os
import sys
import time
import warnings
from functools import partial
from pathlib import Path
from typing import Optional

import torch
from torch import nn
from torch.utils.data import Dataset, DistributedSampler, RandomSampler
from tqdm.std import tqdm  # the plain-text bar: readable in a committed Kaggle run's log

from . import distributed
from .config import Config, PhaseConfig, TrainConfig, perceptual_mode
from .data import make_dataloader
from .engine import (
    StepTools,
    amp_dtype_for,
    autocast_context,
    default_device,
    eval_mode,
    gpu_warning,
    noise_generator,
    seed_everything,
    train_step,
)
from .errors import CheckpointError, SpatialVAEError, on_disk_full, short_reason
from .losses import build_loss
from .model import build_model
from .runs import (
    CHECKPOINT_VERSION,
    RunDir,
    atomic_torch_save,
    atomic_write_bytes,
    check_compatible,
    config_from_checkpoint,
    load_checkpoint,
    make_logger,
    write_history_csv,
)
from .sampling import epoch_sheet
from .scores import reconstruction_scores
from .viz import save_png


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


# ---------------------------------------------------------------------------------------------
# The trainer
# ---------------------------------------------------------------------------------------------

class Trainer:
    """Trains a VAE on datasets passed in: ``fit()``, ``train_epoch()``, ``evaluate()``,
    ``save()``, ``load()``. Works on CPU (fp32) and CUDA (fp16/bf16 autocast), alone or under
    torchrun (DistributedDataParallel, see `spatialvae.distributed`; rank 0 writes every file).
    ``monitor_data`` (the test split in time-to-quality runs) is only watched, never used to select.
    """

    def __init__(self, model: nn.Module, loss: nn.Module, train_data: Dataset, val_data: Optional[Dataset],
                 config: Config, run_dir: str | os.PathLike | None = None, device: str | torch.device | None = None,
                 progress: bool = True, monitor_data: Optional[Dataset] = None):
        self.cfg, t = config, config.train
        self.device = default_device(device)
        self.rank, self.world_size = distributed.dist_info()
        self.is_main = self.rank == 0
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.progress = progress and self.is_main
        self.log = make_logger(self.run_dir if self.is_main else None)
        if self.is_main and (msg := gpu_warning(self.device)):
            self.log.warning("warning: " + msg)
            warnings.warn(msg)
        self.raw_model, self.model, self.memory_format = place_model(model, self.device, t)
        self.loss_fn = loss.to(self.device)
        self.amp_dtype = amp_dtype_for(self.device, t.amp)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        self.train_data, self.val_data, self.monitor_data = train_data, val_data, monitor_data
        self.train_sampler, self.train_loader, self.val_loader = make_loaders(
            train_data, val_data, config, self.world_size, self.rank, self.device)
        first = t.phase1 if t.phase1.epochs > 0 else t.phase2
        self.optimizer = torch.optim.AdamW(self.raw_model.parameters(), lr=first.lr, weight_decay=t.weight_decay)
        self.scheduler, self.scheduler_phase = None, 0
        self.epoch = 0  # the next epoch to run, global and 0-based
        self.history: list[dict] = []
        self.best_val = math.inf
        self.nonfinite_total, self._bad_in_a_row = 0, 0
        self._rank_rngs: Optional[list[dict]] = None  # under DDP: each rank's random streams at the last epoch end
        self._sample_gen_seed = t.seed + 12345  # fixed draws: grids from epoch to epoch are comparable
        self.noise = noise_generator(t.seed, self.rank, self.device)  # checkpointed with the rank's streams
        self.step_tools = StepTools(
            self.optimizer, self.scaler, [p for p in self.raw_model.parameters() if p.requires_grad], t.grad_clip,
            autocast=partial(autocast_context, self.device, self.amp_dtype),  # not self._autocast: no cycle through self
            all_finite=lambda v: distributed.all_true(v.isfinite().all()), noise=self.noise)

    # ---- phases ------------------------------------------------------------------------------
    def _enter_phase(self, phase: int) -> None:
        """Set the phase's lr and a fresh scheduler; Adam moments carry over."""
        if self.scheduler_phase == phase:
            return
        p = self.cfg.train.phase1 if phase == 1 else self.cfg.train.phase2
        for g in self.optimizer.param_groups:
            g.update(lr=p.lr, initial_lr=p.lr)
        self.scheduler = make_scheduler(self.optimizer, p)
        self.scheduler_phase = phase

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    # ---- one epoch -----------------------------------------------------------------------------
    def _autocast(self):
        return autocast_context(self.device, self.amp_dtype)

    def _to_device(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.device, non_blocking=True).contiguous(memory_format=self.memory_format)

    def train_epoch(self, beta: Optional[float] = None) -> dict:
        """One pass over the training data at the current epoch; returns mean loss parts."""
        beta = get_beta(self.epoch, self.cfg.train) if beta is None else beta
        set_epoch(self.train_data, self.train_sampler, self.cfg.train.seed, self.epoch)
        self.model.train()
        self.loss_fn.train()
        sums, n_seen = {}, 0
        bar = progress_bar(self.train_loader, f"epoch {self.epoch + 1}/{total_epochs(self.cfg.train)}", self.progress)
        for step, (x, _) in enumerate(bar):
            x = self._to_device(x)
            res = train_step(self.model, self.loss_fn, x, beta, self.step_tools)
            if res.skipped:
                self._skip_step(res.skipped)
                continue
            self._bad_in_a_row = 0
            n_seen += x.shape[0]
            for k, v in res.parts.items():
                sums[k] = sums.get(k, 0.0) + v.float() * x.shape[0]
            if self.progress and step % 10 == 0:
                bar.set_postfix(loss=f"{float(res.parts['total']):.4f}", beta=f"{beta:.1e}")
        bar.close()
        if n_seen == 0:
            raise TrainingDivergedError(f"no finite training step in epoch {self.epoch + 1}; lower the learning "
                                        "rate or turn off AMP (train.amp=false)")
        return {**{k: float(v) / n_seen for k, v in sums.items()}, "images": n_seen * self.world_size}

    def _skip_step(self, why: str) -> None:
        self.nonfinite_total += 1
        self._bad_in_a_row += 1
        limit = self.cfg.train.max_nonfinite_steps
        self.log.warning(f"warning: skipped a step at epoch {self.epoch + 1}: {why} "
                         f"({self._bad_in_a_row} in a row, limit {limit})")
        if self._bad_in_a_row >= limit:
            raise diverged_error(limit, self.epoch, self.run_dir)

    # ---- validation ---------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, data: Optional[Dataset] = None, beta: Optional[float] = None) -> dict:
        """Mean loss parts on the validation data, decoding the posterior mean (deterministic,
        and it leaves the training RNG untouched). ``select`` is the loss at the schedule's final
        beta: it ranks epochs for `best.pt` and drives ReduceLROnPlateau, so a rising beta during
        annealing does not look like a worsening model."""
        beta = get_beta(self.epoch, self.cfg.train) if beta is None else beta
        loader = self.val_loader if data is None else make_dataloader(data, self.cfg.data.batch_size, train=False)
        if loader is None:
            return {}
        out = mean_loss_parts(self.raw_model, self.loss_fn, loader, beta, self._to_device, self._autocast)
        out["select"] = out["total"] - beta * out["kl"] + final_beta(self.cfg.train) * out["kl"]
        return out

    def monitor(self) -> dict:
        """PSNR / SSIM of ``monitor_data`` reconstructions -> {monitor_psnr, monitor_ssim, monitor_seconds}.
        Its time is kept apart from ``seconds``, so a watched run's clock is the same as an unwatched one's."""
        return monitor_scores(self.raw_model, self.monitor_data, max(64, self.cfg.data.batch_size),
                              self._to_device, self._autocast)

    # ---- the loop -------------------------------------------------------------------------------
    def fit(self, until_epoch: Optional[int] = None) -> list[dict]:
        """Run the remaining epochs of both phases (or stop once ``until_epoch`` epochs are done,
        e.g. to train a notebook session in chunks); returns the history, one dict per epoch."""
        n_total = total_epochs(self.cfg.train)
        stop = n_total if until_epoch is None else min(n_total, until_epoch)
        if self.run_dir is not None:
            with self.on_disk_full(self.epoch):
                distributed.run_on_main(self._write_config)
        while self.epoch < stop:
            row = self._run_epoch()
            self.history.append(row)
            self.epoch += 1
            improved = "val_select" in row and row["val_select"] < self.best_val
            if improved:
                self.best_val = row["val_select"]
            self._end_epoch(row, improved)
            distributed.barrier()
        return self.history

    def _write_config(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(RunDir(self.run_dir).config_json, (self.cfg.to_json() + "\n").encode())
        if self.epoch == 0:
            self.log.info(describe_run(self))

    def on_disk_full(self, last_good: int):
        """What a write that fails for lack of space says was kept and how to go on, ``last_good``
        being the epoch that ``last.pt`` holds (see `errors.on_disk_full`)."""
        if last_good == 0:
            return on_disk_full("no checkpoint was written yet", "free space, then start the run again")
        return on_disk_full(f"the last good checkpoint is epoch {last_good} ({self.run_dir / 'checkpoints' / 'last.pt'})",
                            f"free space, then `python -m spatialvae train --resume {self.run_dir}`")

    def _run_epoch(self) -> dict:
        """Train, validate and step the scheduler at ``self.epoch`` -> its history row."""
        phase, phase_epoch, p = phase_at(self.epoch, self.cfg.train)
        self._enter_phase(phase)
        beta, lr = get_beta(self.epoch, self.cfg.train), self.lr
        t0 = time.perf_counter()
        train = self.train_epoch(beta)
        train_seconds = time.perf_counter() - t0
        val = distributed.run_on_main(lambda: self.evaluate(beta=beta))  # rank 0 validates
        if p.scheduler == "plateau":
            self.scheduler.step(val.get("select", train["total"]))
        elif self.scheduler is not None:
            self.scheduler.step()
        seconds = time.perf_counter() - t0
        row = {"phase": phase, "epoch": self.epoch + 1, "phase_epoch": phase_epoch + 1, "beta": beta, "lr": lr,
               **{f"train_{k}": v for k, v in train.items() if k != "images"}, **{f"val_{k}": v for k, v in val.items()},
               "seconds": seconds, "images_per_s": train["images"] / max(train_seconds, 1e-9),
               "nonfinite_steps": self.nonfinite_total}
        if self.monitor_data is not None and self.is_main:
            row.update(self.monitor())
        return row

    def _end_epoch(self, row: dict, improved: bool) -> None:
        """After an epoch: rank 0 logs it, writes the grid (every sample_every epochs and the last),
        history and checkpoints; every rank hands over its random streams once the grid has drawn from
        rank 0's. A write that fails on rank 0 stops the other ranks at once (`distributed.run_on_main`)."""
        line = epoch_line(row, total_epochs(self.cfg.train), improved)
        if self.run_dir is None:
            if self.is_main:
                self.log.info(line)
            return
        with self.on_disk_full(self.epoch - 1):  # this epoch's last.pt is not written yet
            distributed.run_on_main(lambda: self._log_and_draw(line))
            if self.world_size > 1:
                self._rank_rngs = distributed.gather(rng_state(self.noise))
            distributed.run_on_main(lambda: self._write_files(improved or "val_select" not in row))

    def _log_and_draw(self, line: str) -> None:
        self.log.info(line)
        if self.epoch % self.cfg.train.sample_every == 0 or self.epoch == total_epochs(self.cfg.train):
            self.save_samples()

    def _write_files(self, best: bool) -> None:
        """history.csv, then best.pt before last.pt: if writing stops between the two, resuming from the
        older last.pt replays this epoch and writes both again, where the other order would leave best.pt
        without this epoch for good."""
        run = RunDir(self.run_dir)
        write_history_csv(self.history, run.history)
        if best:
            self.save(run.best)
        self.save(run.last)

    def save_samples(self, path: Optional[Path] = None) -> Path:
        """Samples (the same draws every time) and val reconstructions -> samples/epoch_XXX.png
        (see `sampling.epoch_sheet`)."""
        path = path or RunDir(self.run_dir).epoch_grid(self.epoch)
        gen = torch.Generator().manual_seed(self._sample_gen_seed)
        return save_png(epoch_sheet(self.raw_model, self.val_data, self.cfg.train.n_samples, gen, self._autocast), path)

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
            "rng": {"world_size": self.world_size, "ranks": self._rank_rngs or [rng_state(self.noise)]},
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Atomic checkpoint; refuses to write weights that are not finite."""
        check_finite_weights(self.raw_model, path)
        return atomic_torch_save(self.state_dict(), Path(path))

    def load(self, path: str | os.PathLike) -> "Trainer":
        """Restore everything `save` wrote; `fit()` then continues at the next epoch."""
        ckpt = load_checkpoint(path)
        check_compatible(config_from_checkpoint(ckpt), self.cfg, path)
        own_rng = rank_rng(ckpt.get("rng") or {}, path, self.world_size, self.rank)  # before touching anything
        restore_weights(self, ckpt, path)
        self.epoch = int(ckpt["epoch"])
        self.history = list(ckpt["history"])
        self.best_val = float(ckpt["best_val"])
        self.nonfinite_total = int(ckpt.get("nonfinite_total", 0))
        set_rng_state(own_rng, self.noise)
        return self


def restore_weights(tr: Trainer, ckpt: dict, path) -> None:
    """The model, phase, optimizer, scheduler and scaler a checkpoint holds, into the trainer ``tr``."""
    try:
        tr.raw_model.load_state_dict(ckpt["model"])
        if ckpt.get("scheduler_phase"):
            tr._enter_phase(int(ckpt["scheduler_phase"]))
        tr.optimizer.load_state_dict(ckpt["optimizer"])
        if tr.scheduler is not None and ckpt.get("scheduler") is not None:
            tr.scheduler.load_state_dict(ckpt["scheduler"])
        tr.scaler.load_state_dict(ckpt["scaler"])
    except (RuntimeError, KeyError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path} does not fit this model ({short_reason(e)}); "
                              "resume with the run's own config.json") from None


def place_model(model: nn.Module, device: torch.device, t: TrainConfig) -> tuple[nn.Module, nn.Module, object]:
    """-> (the model on the device, channels_last if asked; what runs: DDP-wrapped and / or compiled;
    the memory format batches are given in)."""
    memory_format = torch.channels_last if t.channels_last else torch.contiguous_format
    raw = model.to(device, memory_format=memory_format)
    run = distributed.wrap_model(raw, device)
    return raw, (torch.compile(run) if t.compile else run), memory_format


def monitor_scores(model: nn.Module, data, batch_size: int, prepare, autocast) -> dict:
    """PSNR / SSIM of the posterior-mean reconstructions of ``data`` -> {monitor_psnr, monitor_ssim,
    monitor_seconds}; its time is kept apart from the epoch's."""
    t0 = time.perf_counter()
    r = reconstruction_scores(model, data, batch_size, prepare=prepare, autocast=autocast)  # per image
    return {"monitor_psnr": float(r["psnr_db"].mean()), "monitor_ssim": float(r["ssim"].mean()),
            "monitor_seconds": time.perf_counter() - t0}


def make_loaders(train_data: Dataset, val_data: Optional[Dataset], cfg: Config, world_size: int, rank: int,
                 device) -> tuple:
    """-> (train sampler, train loader, val loader or None). The sampler is seeded per epoch by the
    trainer: a DistributedSampler under torchrun, else a RandomSampler with its own generator."""
    batch, workers = cfg.data.batch_size, cfg.data.num_workers
    if batch % world_size:
        raise SpatialVAEError(f"data.batch_size={batch} is not divisible by {world_size} processes; "
                              "the global batch is split evenly across GPUs")
    if world_size > 1:
        sampler = DistributedSampler(train_data, world_size, rank, shuffle=True, seed=cfg.train.seed, drop_last=True)
    else:
        sampler = RandomSampler(train_data, generator=torch.Generator())
    train_loader = make_dataloader(train_data, batch // world_size, train=True, num_workers=workers, device=device,
                                   sampler=sampler)
    if len(train_loader) == 0:
        raise SpatialVAEError(f"the training split has {len(train_data)} images, fewer than one batch of "
                              f"{batch}; lower data.batch_size or use more images")
    val_loader = None if val_data is None else make_dataloader(val_data, batch, train=False, num_workers=workers,
                                                                device=device)
    return sampler, train_loader, val_loader


@torch.no_grad()
def mean_loss_parts(model: nn.Module, loss_fn: nn.Module, loader, beta: float, prepare, autocast) -> dict:
    """Each loss part averaged over ``loader``'s images, decoding the posterior mean in eval mode."""
    sums, n = {}, 0
    with eval_mode(model):
        for x, _ in loader:
            x = prepare(x)
            with autocast():
                recon, mu, logvar = model(x, sample_posterior=False)
                _, parts = loss_fn(recon, x, mu, logvar, beta)
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + v.float() * x.shape[0]
            n += x.shape[0]
    return {k: float(v) / n for k, v in sums.items()}


def set_epoch(train_data: Dataset, sampler, seed: int, epoch: int) -> None:
    """The epoch's flips and data order, each a function of the seed and the epoch alone."""
    if hasattr(train_data, "set_epoch"):
        train_data.set_epoch(epoch)  # flips
    if isinstance(sampler, DistributedSampler):
        sampler.set_epoch(epoch)
    else:
        sampler.generator.manual_seed(seed * 1_000_003 + epoch)


def progress_bar(loader, desc: str, enabled: bool) -> tqdm:
    return tqdm(loader, desc=desc, disable=not enabled, leave=False, dynamic_ncols=True, mininterval=2.0,
                file=sys.stderr)


def check_finite_weights(model: nn.Module, path) -> None:
    for name, p in model.state_dict().items():
        if p.is_floating_point() and not torch.isfinite(p).all():
            raise TrainingDivergedError(f"weights {name} contain NaN/inf; not saving over {path}")


def diverged_error(limit: int, epoch: int, run_dir: Optional[Path]) -> TrainingDivergedError:
    where = f" {run_dir / 'checkpoints' / 'last.pt'} holds the last good epoch;" if run_dir else ""
    return TrainingDivergedError(
        f"training diverged: the loss was NaN/inf for {limit} steps in a row at epoch {epoch + 1}.{where} "
        "lower the learning rate (train.phase1.lr / train.phase2.lr), keep train.grad_clip, "
        "or turn off AMP (train.amp=false)")


def rank_rng(rng: dict, path, world_size: int, rank: int) -> dict:
    """This rank's random streams (posterior noise) from a checkpoint's ``rng``; every rank saved
    its own, so a resume needs as many processes as wrote it."""
    if "ranks" not in rng:  # written before streams were saved per rank: rank 0's alone
        return rng
    saved = int(rng["world_size"])
    if saved != world_size:
        raise CheckpointError(f"checkpoint {path} was written by {saved} process(es) and this run has "
                              f"{world_size}; each process's random stream is saved, so resume with "
                              f"{'torchrun --nproc-per-node ' + str(saved) if saved > 1 else 'one process'}")
    return rng["ranks"][rank]


def rng_state(noise: torch.Generator) -> dict:
    """This process's random streams: the posterior noise's own, and torch's global ones."""
    return {"noise": noise.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(rng: dict, noise: torch.Generator) -> None:
    """Restore `rng_state`; a checkpoint written before the noise had its own stream keeps the seeded one."""
    if "noise" in rng:
        noise.set_state(rng["noise"])
    if "torch" in rng:
        torch.set_rng_state(rng["torch"])
    if rng.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


def make_scheduler(optimizer: torch.optim.Optimizer, p: PhaseConfig):
    if p.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(optimizer, T_0=p.cosine_t0, T_mult=p.cosine_t_mult)
    if p.scheduler == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="min", factor=p.plateau_factor,
                                                          patience=p.plateau_patience)
    return None


def epoch_line(row: dict, n_total: int, improved: bool) -> str:
    """One history row as the log line printed after each epoch."""
    parts = " ".join(f"{k}={row[f'train_{k}']:.4f}" for k in ("recon", "perceptual", "ssim", "kl")
                     if f"train_{k}" in row)
    val = f" | val total={row['val_total']:.4f} select={row['val_select']:.4f}" if "val_total" in row else ""
    if "monitor_psnr" in row:
        val += f" | test PSNR {row['monitor_psnr']:.2f} dB SSIM {row['monitor_ssim']:.3f}"
    return (f"epoch {row['epoch']:>3}/{n_total} phase {row['phase']} beta={row['beta']:.2e} lr={row['lr']:.2e} | "
            f"train total={row['train_total']:.4f} {parts}{val} | {row['seconds']:.1f}s "
            f"{row['images_per_s']:.0f} img/s{' *best' if improved else ''}")


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
                  device: str | torch.device | None = None, progress: bool = True, resume: bool | str = "auto",
                  loss: Optional[nn.Module] = None, monitor_data: Optional[Dataset] = None) -> Trainer:
    """Seed, build the model and loss, and a Trainer for ``run_dir``.

    ``resume="auto"`` continues from ``run_dir/checkpoints/last.pt`` when it exists (so re-running
    a notebook cell picks up where it stopped), ``True`` requires it, ``False`` starts fresh.
    ``loss`` may be built beforehand (building it checks the VGG weights before any folder exists).
    """
    run_dir = Path(run_dir)
    seed_everything(cfg.train.seed)
    model = build_model(cfg)
    loss = loss if loss is not None else build_loss(cfg)
    trainer = Trainer(model, loss, train_data, val_data, cfg, run_dir=run_dir, device=device, progress=progress,
                      monitor_data=monitor_data)
    last = RunDir(run_dir).last
    if resume is True or (resume == "auto" and last.is_file()):
        trainer.load(last)
        n = total_epochs(cfg.train)
        where = f"at epoch {trainer.epoch + 1} of {n}" if trainer.epoch < n else f"after all {n} epochs"
        trainer.log.info(f"resumed {run_dir} {where}")
    return trainer
