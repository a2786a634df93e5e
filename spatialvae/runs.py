"""Run folders and the files in them: atomic writes, checkpoints, the log and history.csv.

Every file is written crash-safe: to a temp file in the same folder, fsync, then ``os.replace``.
A session that dies mid-write leaves the previous file intact and no half-written one; used for
checkpoints, the preprocessing cache, PNG grids, history.csv, config.json and metrics.json.

Checkpoints are read with ``torch.load(weights_only=True)``: nothing in one is executed. Each
carries ``version``; a checkpoint from a newer spatialvae is refused with a clear message.
"""

from __future__ import annotations

import csv
import io
import logging
import os
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import BinaryIO, Callable, Optional

import torch

from .config import LITERAL_SETTINGS, Config
from .errors import CheckpointError, ConfigError, SpatialVAEError, short_reason, write_error
from .model import build_model

# 2: the departures from the literal recipe became the defaults; 3: model.decoder_skip
CHECKPOINT_VERSION = 3


def _nested(dotted: dict) -> dict:
    """{"model.shortcut": "conv"} -> {"model": {"shortcut": "conv"}}."""
    out: dict = {}
    for key, value in dotted.items():
        section, name = key.split(".")
        out.setdefault(section, {})[name] = value
    return out


# Keys an older checkpoint's config lacks, with the values it was trained with, by the version that
# added them: before 2 the defaults were the literal recipe's.
_OLD_DEFAULTS = {2: _nested(LITERAL_SETTINGS), 3: {"model": {"decoder_skip": "last"}}}


# ---- atomic files ------------------------------------------------------------------------------
def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> Path:
    """Call ``write(f)`` on a temp file next to ``path``, then move it into place atomically.
    A path that cannot be written (a folder or file in the way, no permission, a full disk) is one
    `WriteError` (`DiskFullError` for space, quota, I/O: see `errors.write_error`); whatever was at
    ``path`` before is left as it was, and the temp file is removed."""
    path = Path(path)
    try:
        _write_via_temp(path, write)
    except OSError as e:
        raise write_error(path, e) from None
    return path


def _write_via_temp(path: Path, write: Callable[[BinaryIO], None]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")  # unique per writer
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600; the result should read like any other file
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    return atomic_write(path, lambda f: f.write(data))


def atomic_torch_save(obj, path: str | os.PathLike) -> Path:
    """torch.save, atomically: a crash mid-write leaves the previous checkpoint intact."""
    return atomic_write(path, lambda f: _torch_save(obj, f))


def _torch_save(obj, f: BinaryIO) -> None:
    """torch.save that fails with the `OSError` of the failed write. torch's zip writer reports it as a
    RuntimeError ("unexpected pos ...") raised while handling that OSError, and its text says nothing
    of the disk: handing the OSError on lets `atomic_write` report it like every other writer's."""
    try:
        torch.save(obj, f)
    except RuntimeError as e:
        cause = e.__context__
        while cause is not None and not isinstance(cause, OSError):
            cause = cause.__context__
        if cause is None:
            raise
        raise cause from None


# ---- run folders, log, history -----------------------------------------------------------------
class RunDir:
    """One run folder, and the one place its layout is spelled::

        RUN/config.json  train.log  history.csv  metrics.json
        RUN/checkpoints/best.pt  last.pt  sharp.pt  texture.pt  prior.pt
        RUN/samples/epoch_XXX.png  eval_*.png  eval_images.pt

    ``RunDir(path).config()`` is the run's config: its ``config.json``, which `train --resume` reads.
    """

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"RunDir({str(self.root)!r})"

    def __fspath__(self) -> str:
        return str(self.root)

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    def checkpoint(self, name: str) -> Path:
        """``checkpoints/NAME.pt``: best, last, sharp, texture or prior."""
        return self.checkpoints / f"{name}.pt"

    best = property(lambda self: self.checkpoint("best"))
    last = property(lambda self: self.checkpoint("last"))
    config_json = property(lambda self: self.root / "config.json")
    history = property(lambda self: self.root / "history.csv")
    log_file = property(lambda self: self.root / "train.log")
    metrics = property(lambda self: self.root / "metrics.json")
    samples = property(lambda self: self.root / "samples")

    def epoch_grid(self, epoch: int) -> Path:
        return self.samples / f"epoch_{epoch:03d}.png"

    def is_run(self) -> bool:
        return self.config_json.is_file()

    def config(self) -> Config:
        """The run's config from its config.json; one line naming the folder when there is none."""
        if not self.is_run():
            raise ConfigError(f"{self.root} is not a run folder (no config.json); pass the folder that `train` "
                              "created, e.g. runs/003-seed")
        return Config.from_json(self.config_json)


def create_run_dir(out: str | os.PathLike, name: str) -> Path:
    """``out/NNN-name`` with NNN one more than the highest existing number (DiT-style)."""
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a file in the way, no permission, read-only disk
        raise SpatialVAEError(f"cannot make the runs folder {out} ({short_reason(e)}); pass --out a folder "
                              "you can write to") from None
    taken = [int(p.name.split("-", 1)[0]) for p in out.iterdir() if p.is_dir() and p.name[:3].isdigit()]
    index = max(taken, default=-1) + 1
    while True:
        run = out / f"{index:03d}-{name}"
        try:
            run.mkdir()
            return run
        except FileExistsError:  # another process took it: try the next number
            index += 1
        except OSError as e:  # a full disk or quota
            raise write_error(run, e) from None


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
    if run_dir is not None and not any(isinstance(h, _LogFile) for h in log.handlers):  # (again, after a failure)
        path = RunDir(run_dir).log_file
        try:
            Path(run_dir).mkdir(parents=True, exist_ok=True)
            fh = _LogFile(path, log)
        except OSError as e:
            raise write_error(path, e) from None
        fh.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S"))
        log.addHandler(fh)
    return log


class _LogFile(logging.FileHandler):
    """``train.log``. A line it cannot write stops the run with one error line naming the file, where
    logging would print a traceback to stderr and go on, leaving a log that silently ends early."""

    def __init__(self, path: Path, log: logging.Logger):
        super().__init__(path)
        self._log = log

    def handleError(self, record: logging.LogRecord) -> None:
        e = sys.exc_info()[1]
        if not isinstance(e, OSError):
            return super().handleError(record)
        # Let go of the file, so a run continued in this process (a notebook) opens it afresh.
        self._log.removeHandler(self)
        try:
            self.close()
        except OSError:  # the line that could not be written cannot be flushed now either
            pass
        raise write_error(self.baseFilename, e) from None


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


# ---- checkpoints -------------------------------------------------------------------------------
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
    version = ckpt.get("version", 1)
    if not isinstance(version, int) or version > CHECKPOINT_VERSION:
        raise CheckpointError(f"{path} is checkpoint version {version!r}, newer than this spatialvae reads "
                              f"(up to {CHECKPOINT_VERSION}); upgrade spatialvae (pip install -U spatialvae)")
    return ckpt


def config_from_checkpoint(ckpt: dict) -> Config:
    d = ckpt["config"]
    version = int(ckpt.get("version", 1))
    for added, defaults in _OLD_DEFAULTS.items():
        if version < added and isinstance(d, dict):  # written before these keys or defaults existed
            d = {**d, **{sec: {**defaults[sec], **d.get(sec, {})} for sec in defaults}}
    try:
        return Config.from_dict(d)
    except ValueError as e:
        raise CheckpointError(f"the checkpoint's config is not valid for this version of spatialvae: {e}") from None


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu"):
    """The model a checkpoint holds, rebuilt from its own config, in eval mode -> (model, cfg, ckpt)."""
    ckpt = load_checkpoint(path)
    cfg = config_from_checkpoint(ckpt)
    model = build_model(cfg)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint {path} does not fit its own config ({short_reason(e)})") from None
    return model.to(device).eval(), cfg, ckpt


def _architecture(cfg: Config) -> dict:
    return {"data.image_size": cfg.data.image_size, **{f"model.{k}": v for k, v in asdict(cfg.model).items()}}


def check_compatible(ckpt_cfg: Config, cfg: Config, path) -> None:
    """Same architecture, or one clear error naming what differs."""
    a, b = _architecture(ckpt_cfg), _architecture(cfg)
    diff = [f"{k}: checkpoint {a[k]!r} vs config {b[k]!r}" for k in a if a[k] != b.get(k)]
    if diff:
        raise CheckpointError(f"checkpoint {path} is from an incompatible config ({'; '.join(diff)}); "
                              "resume with the run's own config.json or start a new run")
