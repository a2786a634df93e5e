"""A run's learned prior: ``checkpoints/prior.pt``, fitted to the latents of its ``best.pt``.

`spatialvae.prior` is the flow model; this is its life in a run folder: encoding the run's
training and validation splits, a progress bar and a log line with the validation loss every
``prior.log_every`` steps, a resumable save there (a killed session continues exactly: the same
weights as never stopping), keeping or refusing a finished prior, and loading it back checked.
"""

from __future__ import annotations

import sys
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn
from tqdm.std import tqdm

from .data import make_datasets
from .engine import default_device
from .errors import CheckpointError, SpatialVAEError, on_disk_full, short_reason
from .prior import N_CLASSES, LearnedPrior, PriorFit, flow_matching_loss
from .runs import RunDir, atomic_torch_save, load_model
from .sampling import encode_originals


def prior_path(run_dir) -> Path:
    return RunDir(run_dir).checkpoint("prior")


def _read_prior_file(path: Path) -> dict:
    fix = f"train it again with `python -m spatialvae prior --run {path.parent.parent} --force`"
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)  # nothing in the file is executed
    except Exception as e:  # noqa: BLE001 - corrupt, truncated or unsafe
        raise CheckpointError(f"cannot read the latent prior {path} ({short_reason(e)}); {fix}") from None
    if not isinstance(blob, dict) or blob.get("kind") != "spatialvae-latent-prior":
        raise CheckpointError(f"{path} is not a spatialvae latent prior; {fix}")
    return blob


def load_prior(run_dir, latent_shape: Optional[tuple] = None) -> LearnedPrior:
    """The finished learned prior of a run, checked against the VAE's latent shape."""
    path = prior_path(run_dir)
    if not path.is_file():
        raise SpatialVAEError(f"run {run_dir} has no learned prior ({path} is missing); train one with "
                              f"`python -m spatialvae prior --run {run_dir}`, or choose --sampler gmm")
    blob = _read_prior_file(path)
    if not blob.get("done", True):
        raise SpatialVAEError(f"the latent prior in {path} stopped at step {blob.get('step')} of "
                              f"{blob.get('config', {}).get('steps')}; finish it with "
                              f"`python -m spatialvae prior --run {run_dir}`")
    return LearnedPrior.from_state_dict(blob, latent_shape, where=str(path))


def run_latents(model: nn.Module, splits, device=None, progress: bool = False, val: bool = True) -> dict:
    """Posterior means and labels of a run's train (unflipped) and, with ``val``, validation splits."""
    out = {"train": encode_originals(model, splits.train, 64, device, progress), "train_labels": splits.train.labels}
    if val and splits.val is not None and len(splits.val):
        out.update(val=encode_originals(model, splits.val, 64, device, progress), val_labels=splits.val.labels)
    return out


@torch.no_grad()
def val_loss(prior: LearnedPrior, latents: torch.Tensor, labels: Optional[torch.Tensor]) -> float:
    """Flow-matching loss of the EMA net on held-out latents, with fixed noise and uniform times (whatever
    ``time_sampling`` trained it, so the figure compares across settings)."""
    y = torch.full((len(latents),), N_CLASSES, dtype=torch.long) if labels is None else labels.long()
    prior.net.eval()
    x1 = (latents.float() - prior.mean) / prior.std
    return float(flow_matching_loss(prior.net, x1, y, torch.Generator().manual_seed(0)))


def fit_logged(prior: LearnedPrior, train: tuple, val: Optional[tuple] = None,
               progress: bool = False, log: Callable[[str], None] = lambda s: None,
               state: Optional[dict] = None, save: Optional[Callable[[dict], None]] = None) -> LearnedPrior:
    """``prior.fit`` on ``train`` = (latents (N, C, H, W), labels (N,) or None) with a progress bar and, every ``log_every`` steps and at the end, a row of
    ``prior.history`` (mean training loss, lr, seconds, the EMA net's loss on ``val`` = (latents,
    labels), if given), a log line and ``save(training state)``; ``state`` (a saved one) continues from it."""
    c = prior.cfg
    bar = tqdm(total=c.steps, initial=int(state["step"]) if state is not None else 0, desc="latent prior",
               disable=not progress, leave=False, file=sys.stderr, mininterval=2.0)
    running, n = 0.0, 0

    def after_step(fit: PriorFit, loss: float) -> None:
        nonlocal running, n
        running, n = running + loss, n + 1
        bar.update(1)
        if fit.step % c.log_every != 0 and fit.step != c.steps:
            return
        row = {"step": fit.step, "loss": running / n, "lr": fit.lr_at(fit.step - 1), "seconds": prior.train_seconds}
        if val is not None and len(val[0]):
            row["val_loss"] = val_loss(prior, *val)
        prior.history.append(row)
        log(f"prior step {fit.step}/{c.steps}: loss {row['loss']:.4f}"
            + (f", val {row['val_loss']:.4f}" if "val_loss" in row else "") + f" | {row['seconds']:.0f} s")
        running, n = 0.0, 0
        if save is not None:
            save(fit.state())

    prior.fit(*train, state=state, after_step=after_step)
    bar.close()
    return prior


def fit_run_prior(run_dir, cfg=None, splits=None, device=None, progress: bool = True,
                  log: Callable[[str], None] = print, if_done: str = "keep") -> LearnedPrior:
    """Train (or finish) the learned prior of a run on its best checkpoint's latents.

    cfg: the run's Config (default: its config.json) whose ``prior`` section is used. A finished
    ``checkpoints/prior.pt`` is kept (``if_done="keep"``), refused (``"error"``) or trained again (``"replace"``);
    an unfinished one is resumed when its settings match. Saves every ``prior.log_every`` steps.
    """
    run_dir = Path(run_dir)
    ckpt_path = RunDir(run_dir).best
    device = device or default_device()  # the VAE encodes there; the prior itself trains on the CPU
    model, run_cfg, ckpt = load_model(ckpt_path, device)
    if len(model.latent_shape) != 3:
        raise SpatialVAEError(f"the learned prior needs a spatial latent (C, H, W); run {run_dir} has a flat latent "
                              f"{tuple(model.latent_shape)} (architecture {run_cfg.model.architecture})")
    run = RunDir(run_dir)
    cfg = cfg or (run.config() if run.is_run() else run_cfg)
    path = prior_path(run_dir)
    state = None
    if path.is_file() and if_done != "replace":
        blob = _read_prior_file(path)
        same_vae = blob.get("vae_epoch") == int(ckpt.get("epoch", 0))
        same_cfg = blob.get("config") == asdict(cfg.prior)
        if blob.get("done") and same_vae and (same_cfg or if_done == "keep"):
            if if_done == "error":
                raise SpatialVAEError(f"{path} already holds a trained prior; add --force to train it again")
            log(f"latent prior: {path} is already trained ({blob['step']} steps); kept")
            return LearnedPrior.from_state_dict(blob, model.latent_shape, where=str(path))
        if not blob.get("done") and same_vae and same_cfg:
            state = blob
            log(f"latent prior: resuming {path} at step {blob['step']} of {cfg.prior.steps}")
        elif if_done == "error":
            raise SpatialVAEError(f"{path} was trained with other settings or for another best.pt; add --force to "
                                  "replace it")
        else:
            log(f"latent prior: {path} is for another best.pt or other settings; training it again")
    if splits is None:
        splits = make_datasets(cfg.data, seed=cfg.train.seed, progress=progress)
    lat = run_latents(model, splits, device, progress)
    extra = {"vae_checkpoint": str(ckpt_path), "vae_epoch": int(ckpt.get("epoch", 0))}
    log(f"latent prior: flow matching on {len(lat['train'])} latents of shape {tuple(model.latent_shape)}, "
        f"{cfg.prior.steps} steps of {cfg.prior.batch_size}")
    with on_disk_full(f"{ckpt_path} and the rest of the run are kept, and {path.name} holds the prior's last save, "
                      "if any", f"free space, then `python -m spatialvae prior --run {run_dir}` continues it"):
        return fit_logged(LearnedPrior(cfg.prior), (lat["train"], lat["train_labels"]),
                          (lat["val"], lat["val_labels"]) if "val" in lat else None,
                          progress=progress, log=log, state=state,
                          save=lambda s: atomic_torch_save({**s, **extra}, path))


__all__ = ["prior_path", "load_prior", "run_latents", "val_loss", "fit_logged", "fit_run_prior"]
