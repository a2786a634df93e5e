"""A run's texture stage in its folder: ``checkpoints/texture.pt`` while it trains, ``sharp.pt`` after.

`spatialvae.texture` is the stage itself; this is its life in a run folder. It starts from the
run's ``best.pt`` (the smooth decoder, kept as it is), saves a resumable state (head,
discriminator, both optimizers, the stage's generator) every ``texture.log_every`` steps, so a
killed session continues to the same weights as one never stopped, and at the end exports
``checkpoints/sharp.pt``: the same VAE with the trained head, in `best.pt`'s format, without the
discriminator. `sample` and `evaluate` use ``sharp.pt`` when it exists (``--decoder smooth``
picks ``best.pt``).
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Optional

import torch
from tqdm.std import tqdm

from .config import Config
from .data import make_datasets
from .engine import default_device
from .errors import CheckpointError, SpatialVAEError, on_disk_full, short_reason
from .losses import build_loss
from .runs import CHECKPOINT_VERSION, RunDir, atomic_torch_save, load_model
from .texture import TEXTURE_KIND, TextureStage, head_inputs

DECODERS = ("sharp", "smooth")


def texture_state_path(run_dir) -> Path:
    return RunDir(run_dir).checkpoint("texture")


def sharp_path(run_dir) -> Path:
    return RunDir(run_dir).checkpoint("sharp")


def decoder_checkpoint(run_dir, decoder: Optional[str] = None) -> Path:
    """The checkpoint a command decodes with: ``sharp.pt`` when the run has one (or when asked for:
    an error if missing), else ``best.pt``; ``decoder="smooth"`` always ``best.pt``."""
    run_dir = Path(run_dir)
    sharp = sharp_path(run_dir)
    if decoder == "sharp" and not sharp.is_file():
        raise SpatialVAEError(f"run {run_dir} has no sharp decoder ({sharp} is missing); train it with "
                              f"`python -m spatialvae train --resume {run_dir} --set texture.enabled=true`, "
                              "or pass --decoder smooth")
    if decoder in (None, "sharp") and sharp.is_file():
        return sharp
    return RunDir(run_dir).best


def _read_state(path: Path, run_dir: Path) -> dict:
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)  # nothing in the file is executed
    except Exception as e:  # noqa: BLE001 - corrupt, truncated or unsafe
        raise CheckpointError(f"cannot read the texture stage {path} ({short_reason(e)}); delete it and run "
                              f"`python -m spatialvae train --resume {run_dir}` to train the stage again") from None
    if not isinstance(blob, dict) or blob.get("kind") != TEXTURE_KIND:
        raise CheckpointError(f"{path} is not a spatialvae texture stage; delete it and resume the run")
    return blob


def fit_run_texture(run_dir, cfg: Config, splits=None, device=None, progress: bool = True,
                    log: Callable[[str], None] = print) -> Path:
    """Train (or finish, or keep) the texture stage of a run on its ``best.pt`` -> ``sharp.pt``'s path.

    A finished stage with the same settings for the same ``best.pt`` is kept; an unfinished one
    with them is resumed; anything else is trained again from ``best.pt``."""
    run_dir = Path(run_dir)
    best = RunDir(run_dir).best
    model, _, ckpt = load_model(best, device or default_device())
    vae_epoch, settings = int(ckpt.get("epoch", 0)), asdict(cfg.texture)
    state_path, out = texture_state_path(run_dir), sharp_path(run_dir)
    state = None
    if state_path.is_file():
        blob = _read_state(state_path, run_dir)
        same = blob.get("vae_epoch") == vae_epoch and blob.get("config") == settings
        if same and blob.get("done") and out.is_file():
            log(f"texture stage: {out} is already trained ({blob['step']} steps); kept")
            return out
        if same and not blob.get("done"):
            state = blob
            log(f"texture stage: resuming {state_path} at step {blob['step']} of {cfg.texture.steps}")
        else:
            log(f"texture stage: {state_path} is for another best.pt or other settings; training it again")
    stage = TextureStage(model, build_loss(cfg), cfg)
    t0 = time.perf_counter()
    # Before the state is loaded: the anchor's target is the smooth head's output, not a half-trained one's.
    inputs = _cached_inputs(model, splits or make_datasets(cfg.data, seed=cfg.train.seed, progress=progress),
                            cfg, progress)
    if state is not None:
        stage.load_state_dict(state)
    log(f"texture stage: head ({cfg.texture.head_blocks} block(s) + output convs, "
        f"{sum(p.numel() for p in stage.head.parameters()):,} parameters) against a patch discriminator "
        f"({sum(p.numel() for p in stage.disc.parameters()):,}), {len(inputs['images'])} cached inputs in "
        f"{time.perf_counter() - t0:.0f} s, {cfg.texture.steps} steps of {cfg.texture.batch_size}")
    extra = {"kind": TEXTURE_KIND, "config": settings, "vae_epoch": vae_epoch}
    with on_disk_full(f"{best} and the rest of the run are kept, and {state_path.name} holds the stage's last "
                      "save, if any", f"free space, then `python -m spatialvae train --resume {run_dir}` continues it"):
        _fit_logged(stage, inputs, progress, log, save=lambda done: atomic_torch_save(
            {**stage.state_dict(), **extra, "done": done}, state_path))
        stage.use_ema()
        exported = {"version": CHECKPOINT_VERSION, "model": model.state_dict(), "config": ckpt["config"],
                    "epoch": vae_epoch, "history": ckpt.get("history", []),
                    "texture": {"config": settings, "steps": stage.step, "history": stage.history}}
        atomic_torch_save(exported, out)
        atomic_torch_save({**stage.state_dict(), **extra, "done": True}, state_path)
        log(f"texture stage: wrote {out} (the smooth decoder stays in {best})")
    return out


def _cached_inputs(model, splits, cfg: Config, progress: bool) -> dict:
    images = splits.train.images  # (N, S, S) uint8, unflipped
    n = len(images) * (2 if cfg.texture.hflip else 1)
    bar = tqdm(total=n, desc="texture stage: caching the decoder body", disable=not progress, leave=False,
               file=sys.stderr, mininterval=2.0)
    try:
        return head_inputs(model, images, cfg.texture.head_blocks, cfg.texture.hflip, progress=bar.update)
    finally:
        bar.close()


def _fit_logged(stage: TextureStage, inputs: dict, progress: bool, log: Callable[[str], None],
                save: Callable[[bool], None]) -> None:
    """``stage.fit`` with a progress bar, and every ``log_every`` steps a history row (the window's
    mean loss parts and the stage's seconds so far), a log line and a resumable save."""
    t = stage.t
    bar = tqdm(total=t.steps, initial=stage.step, desc="texture stage", disable=not progress, leave=False,
               file=sys.stderr, mininterval=2.0)
    sums: dict = {}
    n = 0
    t0 = time.perf_counter()
    seconds0 = stage.history[-1]["seconds"] if stage.history else 0.0

    def after_step(st: TextureStage, parts: dict) -> None:
        nonlocal n
        n += 1
        for k, v in parts.items():
            sums[k] = sums.get(k, 0.0) + v
        bar.update(1)
        if st.step % t.log_every and st.step != t.steps:
            return
        row = {"step": st.step, **{k: v / n for k, v in sums.items()},
               "seconds": seconds0 + time.perf_counter() - t0}
        st.history.append(row)
        log(f"texture step {st.step}/{t.steps}: " + " ".join(f"{k} {row[k]:.4f}" for k in
            ("rec", "adv", "d_loss") if k in row) + f" | {row['seconds']:.0f} s")
        sums.clear()
        n = 0
        save(False)

    try:
        stage.fit(inputs, after_step)
    finally:
        bar.close()


__all__ = ["DECODERS", "texture_state_path", "sharp_path", "decoder_checkpoint", "fit_run_texture"]
