"""Ablation: the recipe against its `original` baseline and one-change variants, measured.

Every variant trains on the same images (one `make_datasets` call, shared), at the same image
size, for the same number of epochs, i.e. the same number of training images seen, then is
evaluated by `evaluate.evaluate_run` on the test split. Results go to ``OUT/``:

- ``OUT/<variant>/``: an ordinary run folder (config.json, train.log, history.csv, checkpoints,
  samples, metrics.json); an interrupted ablation resumes each variant from its last.pt, and a
  variant that already has its metrics.json is not trained again;
- ``OUT/ablation.json``: one row per variant; ``OUT/ablation.md``: the markdown table;
- ``OUT/ablation.png``: reconstructions, prior and aggregate-posterior samples side by side.

The variants change exactly one thing each relative to ``recipe`` (`original` changes all of
them at once, as the recipe's own baseline does).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Optional, Sequence

from ..config import Config, flatten, perceptual_mode
from ..data import make_datasets
from ..errors import ConfigError
from ..losses import build_loss
from ..model import build_model, count_parameters
from ..runs import RunDir, atomic_write_bytes, make_logger, read_history_csv
from ..training import build_trainer, total_epochs
from ..viz import ablation_figure, close_figure
from .evaluate import evaluate_run, load_eval_images, read_metrics
from .features import build_features_file
from .report import ablation_table
from .variants import VARIANT_NAMES, VARIANTS, variant_configs


def _row(name: str, cfg: Config, run_dir: Path, metrics: dict, history: list[dict], images_per_epoch: int) -> dict:

    s = metrics["samplers"]
    rec = metrics["reconstruction"]["overall"]

    def sampler(key: str) -> dict:
        r = s.get(key) or {}
        return {"fid": r.get("fid"), "domain_fd_vs_train": r.get("domain_fd_vs_train"),
                "ms_ssim_diversity": (r.get("ms_ssim_diversity") or {}).get("mean"),
                "nn_train_rmse": (r.get("nn_train_rmse") or {}).get("mean")}

    return {
        "variant": name,
        "change": next(v.change for v in VARIANTS if v.name == name),
        "run_dir": str(run_dir),
        "parameters": count_parameters(build_model(cfg)),
        "image_size": cfg.data.image_size,
        "epochs": len(history),
        "train_images_seen": images_per_epoch * len(history),
        "train_seconds": round(sum(float(h["seconds"]) for h in history), 1),
        "best_epoch": metrics["checkpoint"]["epoch"],
        "test_ssim": rec["ssim"], "test_psnr_db": rec["psnr_db"], "test_l1": rec["l1"],
        "test_identity": metrics["reconstruction"].get("identity"),
        "standard_normal": sampler("standard_normal"), "gaussian": sampler("gaussian"), "gmm": sampler("gmm"),
        "perceptual_mode": metrics["perceptual_mode"],
        "eval_seconds": metrics["seconds"],
    }


def _comparable(cfg: Config) -> dict:
    """The config without where the data lives and speed-only switches (same results, other speed)."""
    d = cfg.to_dict()
    d["data"] = {k: v for k, v in d["data"].items() if k not in ("root", "cache_dir", "preprocess_workers")}
    d["train"] = {k: v for k, v in d["train"].items() if k not in ("channels_last", "compile")}
    return d


def _check_same_base(out: Path, base: Config) -> None:
    """Resuming into a folder made with another size/budget would mix incomparable rows."""
    saved = out / "base_config.json"
    if not saved.is_file():
        return
    old = Config.from_json(saved)
    if _comparable(old) != _comparable(base):
        a, b = flatten(_comparable(old)), flatten(_comparable(base))
        diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
        raise ConfigError(f"{out} holds an ablation with a different base config ({', '.join(diff[:4])} differ); "
                          "pass a new --out, or the same --preset/--epochs/--perceptual/--set as before")


def run_ablation(out: str | os.PathLike, base: Config, names: Optional[Sequence[str]] = None,
                 features_path: str | os.PathLike | None = None, inception: str = "auto",
                 progress: bool = True, device=None, n_samples: Optional[int] = None,
                 log: Optional[logging.Logger] = None) -> list[dict]:
    """Train and evaluate each variant into ``out/<variant>/``; write ablation.{json,md,png}.
    features_path: an extractor file for the domain FD, None to skip it, or "auto" (train one into
    ``out/xray_features.pt`` unless it is there already).
    Progress lines go to ``log`` (default: the console and ``out/train.log``)."""

    out = Path(out)
    _check_same_base(out, base)
    log = log or make_logger(out)
    configs = variant_configs(base, names)
    for name in set(names or VARIANT_NAMES) - set(configs):
        log.info(f"variant {name} skipped: identical to the recipe here ({perceptual_mode(base)})")
    # Every loss is built before anything trains: missing VGG weights fail in seconds, not after an hour.
    losses = {name: build_loss(cfg) for name, cfg in configs.items()}
    splits = make_datasets(base.data, seed=base.train.seed, progress=progress)  # shared: same images for all
    out.mkdir(parents=True, exist_ok=True)
    if features_path == "auto":  # the extractor for the domain FD, trained once per ablation folder
        features_path = out / "xray_features.pt"
        if not features_path.is_file():
            log.info(f"training the X-ray feature extractor for the domain FD -> {features_path}")
            build_features_file(base.data.root, features_path, image_size=min(base.data.image_size, 128),
                                seed=base.train.seed, progress=progress, cache_dir=base.data.cache_dir)
    atomic_write_bytes(out / "base_config.json", (base.to_json() + "\n").encode())
    rows = []
    for i, (name, cfg) in enumerate(configs.items()):
        run_dir = out / name
        metrics_path, history_path = RunDir(run_dir).metrics, RunDir(run_dir).history
        done = history_path.is_file() and len(read_history_csv(history_path)) >= total_epochs(cfg.train)
        log.info(f"[{i + 1}/{len(configs)}] {name}: {next(v.change for v in VARIANTS if v.name == name)}"
                 + (" (already trained)" if done else ""))
        if not done:
            trainer = build_trainer(cfg, splits.train, splits.val, run_dir, device=device, progress=progress,
                                    resume="auto", loss=losses[name])
            trainer.fit()
            del trainer
        if not metrics_path.is_file():
            evaluate_run(run_dir, checkpoint="best", features_path=features_path, inception=inception,
                         samplers=("standard_normal", "gaussian", "gmm"), progress=progress, device=device,
                         n_samples=n_samples, seed=base.train.seed)
        metrics = read_metrics(metrics_path)
        history = read_history_csv(history_path)
        per_epoch = len(splits.train) // cfg.data.batch_size * cfg.data.batch_size  # full batches only
        rows.append(_row(name, cfg, run_dir, metrics, history, per_epoch))
        r = rows[-1]
        log.info(f"[{i + 1}/{len(configs)}] {name}: {r['train_seconds']:.0f} s training, test SSIM "
                 f"{r['test_ssim']:.3f}, PSNR {r['test_psnr_db']:.2f} dB")
        write_results(out, rows, base)
    return rows


def write_results(out: Path, rows: list[dict], base: Config) -> None:

    atomic_write_bytes(out / "ablation.json", (json.dumps({"rows": rows}, indent=2) + "\n").encode())
    atomic_write_bytes(out / "ablation.md", (ablation_table(rows, base) + "\n").encode())
    if rows:
        images = {r["variant"]: load_eval_images(r["run_dir"]) for r in rows}
        close_figure(ablation_figure(rows, images, out / "ablation.png"))


