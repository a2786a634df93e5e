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

import copy
import dataclasses
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

from .config import Config, LossConfig, PhaseConfig, get_preset
from .errors import ConfigError


@dataclass(frozen=True)
class Variant:
    name: str
    change: str  # what differs from `recipe`, in words (a table column)
    apply: Callable[[Config], None]  # edits a copy of the recipe config in place


def _set(overrides: dict) -> Callable[[Config], None]:
    def apply(cfg: Config) -> None:
        changed = cfg.with_overrides(overrides)  # validated copy
        for f in dataclasses.fields(cfg):
            setattr(cfg, f.name, getattr(changed, f.name))
    return apply


def _single_phase(cfg: Config) -> None:
    # One phase as long as both: KL at its final weight from the first step (no reconstruction-only
    # warm-up, no annealing), the phase-1 learning rate, ReduceLROnPlateau.
    t = cfg.train
    total = t.phase1.epochs + t.phase2.epochs
    beta = t.phase2.beta_end
    t.phase2 = PhaseConfig(epochs=total, lr=t.phase1.lr, scheduler="plateau", beta_start=beta, beta_end=beta,
                           beta_anneal_epochs=0, plateau_factor=t.phase2.plateau_factor,
                           plateau_patience=t.phase2.plateau_patience)
    t.phase1 = PhaseConfig(epochs=0)


def _original(cfg: Config) -> None:
    # The `original` preset's model, loss and single phase, on the recipe's data, widths and epoch
    # budget. OriginalVAE ignores attention/upsample/GroupNorm settings: it has none of them.
    orig = get_preset("original")
    total = cfg.train.phase1.epochs + cfg.train.phase2.epochs
    cfg.model.architecture = orig.model.architecture
    cfg.model.flat_latent_dim = orig.model.flat_latent_dim
    cfg.loss = copy.deepcopy(orig.loss)
    phase2 = copy.deepcopy(orig.train.phase2)
    phase2.epochs = total
    phase2.plateau_patience = cfg.train.phase2.plateau_patience
    cfg.train.phase1 = PhaseConfig(epochs=0)
    cfg.train.phase2 = phase2


VARIANTS: tuple[Variant, ...] = (
    Variant("recipe", "the recipe with this package's defaults (DC-AE skips, per-value KL)", lambda cfg: None),
    Variant("literal", "the recipe read literally: 1x1-conv skips from a random start, PyTorch's logvar init, "
                       "beta x summed KL", _set({"model.shortcut": "conv", "model.logvar_init": None,
                                                 "loss.kl_reduction": "sum"})),
    Variant("conv_skips", "learned 1x1-conv skips from a random start, PyTorch's logvar init",
            _set({"model.shortcut": "conv", "model.logvar_init": None})),
    Variant("kl_sum", "beta x the KL summed over the 1,024 latent values", _set({"loss.kl_reduction": "sum"})),
    Variant("original", "flat 256-d latent, BatchNorm + LeakyReLU, transposed convs, no attention, "
                        "MSE (sum) + 0.5 KL, one phase", _original),
    Variant("no_perceptual", "no VGG perceptual term", _set({"loss.perceptual_weight": 0.0})),
    Variant("no_ssim", "no SSIM term", _set({"loss.ssim_weight": 0.0})),
    Variant("mse", "MSE instead of L1", _set({"loss.recon": "mse"})),
    Variant("no_attention", "no self-attention", _set({"model.attention_resolutions": []})),
    Variant("transposed", "transposed convs instead of bilinear + conv", _set({"model.upsample": "transposed"})),
    Variant("single_phase", "one phase: beta 1e-3 from the start, no reconstruction-only warm-up", _single_phase),
)
VARIANT_NAMES = tuple(v.name for v in VARIANTS)
PERCEPTUAL_MODES = ("imagenet", "random", "off")


def ablation_base(preset: str = "quick", epochs: tuple[int, int] = (8, 10), perceptual: str = "imagenet",
                  overrides: Sequence[str] = ()) -> Config:
    """The recipe at ablation size: ``preset`` (default quick: 64 px, 1,000 images per class) with
    ``epochs`` = (phase 1, phase 2) and the phase-2 annealing over the first half of phase 2.

    perceptual: "imagenet" (the recipe), "random" (explicit random VGG16 features) or "off"
    (perceptual_weight 0 for every variant; `no_perceptual` is then the recipe itself and skipped).
    """
    if perceptual not in PERCEPTUAL_MODES:
        raise ConfigError(f"perceptual={perceptual!r} is invalid: expected one of {', '.join(PERCEPTUAL_MODES)}")
    p1, p2 = epochs
    if p1 < 1 or p2 < 1:
        raise ConfigError(f"ablation epochs {epochs} are invalid: both phases need at least 1 epoch "
                          "(the single_phase variant is one of the comparisons)")
    cfg = get_preset(preset)
    t = cfg.train
    t.phase1.epochs, t.phase1.cosine_t0 = p1, p1  # one cosine cycle
    t.phase2.epochs, t.phase2.beta_anneal_epochs = p2, max(1, p2 // 2)
    t.sample_every = max(1, (p1 + p2) // 3)
    if perceptual == "off":
        cfg.loss.perceptual_weight = 0.0
    else:  # presets that switch the term off (smoke) get the recipe's weight back
        cfg.loss.perceptual_weight = cfg.loss.perceptual_weight or LossConfig().perceptual_weight
        cfg.loss.vgg_weights = perceptual
    cfg.preset = f"ablation-{preset}"
    return cfg.with_overrides(list(overrides))


def variant_configs(base: Config, names: Optional[Sequence[str]] = None) -> dict[str, Config]:
    """{name: config} for the chosen variants (default all), each one change away from ``base``.
    A variant identical to the recipe (no_perceptual when the perceptual term is off) is dropped."""
    names = list(names) if names else list(VARIANT_NAMES)
    unknown = [n for n in names if n not in VARIANT_NAMES]
    if unknown:
        raise ConfigError(f"unknown ablation variant(s) {', '.join(unknown)}: choose from {', '.join(VARIANT_NAMES)}")
    out: dict[str, Config] = {}
    for v in VARIANTS:
        if v.name not in names:
            continue
        cfg = copy.deepcopy(base)
        v.apply(cfg)
        cfg.validate()
        if v.name != "recipe" and cfg.to_dict() == base.to_dict():
            continue  # e.g. no_perceptual when the perceptual term is off everywhere
        out[v.name] = cfg
    return out


def _row(name: str, cfg: Config, run_dir: Path, metrics: dict, history: list[dict], images_per_epoch: int) -> dict:
    from .model import build_model, count_parameters

    s = metrics["samplers"]
    rec = metrics["reconstruction"]["overall"]

    def sampler(key: str) -> dict:
        r = s.get(key, {})
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
        "prior": sampler("prior"), "aggregate_posterior": sampler("aggregate_posterior"), "gmm": sampler("gmm"),
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
        a, b = _flat(_comparable(old)), _flat(_comparable(base))
        diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
        raise ConfigError(f"{out} holds an ablation with a different base config ({', '.join(diff[:4])} differ); "
                          "pass a new --out, or the same --preset/--epochs/--perceptual/--set as before")


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def run_ablation(out: str | os.PathLike, base: Config, names: Optional[Sequence[str]] = None,
                 features_path: str | os.PathLike | None = None, inception: str = "auto",
                 progress: bool = True, device=None, n_samples: Optional[int] = None,
                 log: Optional[logging.Logger] = None) -> list[dict]:
    """Train and evaluate each variant into ``out/<variant>/``; write ablation.{json,md,png}.
    features_path: an extractor file for the domain FD, None to skip it, or "auto" (train one into
    ``out/xray_features.pt`` unless it is there already).
    Progress lines go to ``log`` (default: the console and ``out/train.log``)."""
    from .data import make_datasets
    from .evaluate import evaluate_run
    from .files import atomic_write_bytes
    from .losses import build_loss
    from .training import build_trainer, make_logger, perceptual_mode, read_history_csv, total_epochs

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
            from .features import build_features_file
            log.info(f"training the X-ray feature extractor for the domain FD -> {features_path}")
            build_features_file(base.data.root, features_path, image_size=min(base.data.image_size, 128),
                                seed=base.train.seed, progress=progress, cache_dir=base.data.cache_dir)
    atomic_write_bytes(out / "base_config.json", (base.to_json() + "\n").encode())
    rows = []
    for i, (name, cfg) in enumerate(configs.items()):
        run_dir = out / name
        metrics_path = run_dir / "metrics.json"
        done = (run_dir / "history.csv").is_file() and len(read_history_csv(run_dir / "history.csv")) >= total_epochs(cfg.train)
        log.info(f"[{i + 1}/{len(configs)}] {name}: {next(v.change for v in VARIANTS if v.name == name)}"
                 + (" (already trained)" if done else ""))
        if not done:
            trainer = build_trainer(cfg, splits.train, splits.val, run_dir, device=device, progress=progress,
                                    resume="auto", loss=losses[name])
            trainer.fit()
            del trainer
        if not metrics_path.is_file():
            evaluate_run(run_dir, checkpoint="best", features_path=features_path, inception=inception,
                         samplers=("prior", "aggregate_posterior", "gmm"), progress=progress, device=device,
                         n_samples=n_samples, seed=base.train.seed)
        metrics = json.loads(metrics_path.read_text())
        history = read_history_csv(run_dir / "history.csv")
        per_epoch = len(splits.train) // cfg.data.batch_size * cfg.data.batch_size  # full batches only
        rows.append(_row(name, cfg, run_dir, metrics, history, per_epoch))
        r = rows[-1]
        log.info(f"[{i + 1}/{len(configs)}] {name}: {r['train_seconds']:.0f} s training, test SSIM "
                 f"{r['test_ssim']:.3f}, PSNR {r['test_psnr_db']:.2f} dB")
        write_results(out, rows, base)
    return rows


def write_results(out: Path, rows: list[dict], base: Config) -> None:
    from .files import atomic_write_bytes

    atomic_write_bytes(out / "ablation.json", (json.dumps({"rows": rows}, indent=2) + "\n").encode())
    atomic_write_bytes(out / "ablation.md", (ablation_table(rows, base) + "\n").encode())
    if rows:
        from .viz import _plt, ablation_figure
        fig = ablation_figure(rows, out / "ablation.png")
        _plt().close(fig)


def ablation_table(rows: list[dict], base: Optional[Config] = None) -> str:
    """One markdown table: reconstruction on the test split (with identity), prior and GMM samples."""
    def f(v, fmt):
        return "n/a" if v is None else fmt.format(v)

    head = ("| variant | change | params | train s | test SSIM | PSNR dB | identity | prior dFD | GMM dFD | "
            "prior FID | GMM FID | prior MS-SSIM | GMM MS-SSIM |")
    lines = [head, "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        p, q = r["prior"], r.get("gmm") or {}
        ident = r.get("test_identity")
        lines.append(
            f"| {r['variant']} | {r['change']} | {r['parameters'] / 1e6:.2f} M | {r['train_seconds']:.0f} | "
            f"{f(r['test_ssim'], '{:.3f}')} | {f(r['test_psnr_db'], '{:.2f}')} | "
            f"{f(None if ident is None else 100 * ident, '{:.1f} %')} | "
            f"{f(p['domain_fd_vs_train'], '{:.1f}')} | {f(q.get('domain_fd_vs_train'), '{:.1f}')} | "
            f"{f(p['fid'], '{:.1f}')} | {f(q.get('fid'), '{:.1f}')} | "
            f"{f(p['ms_ssim_diversity'], '{:.3f}')} | {f(q.get('ms_ssim_diversity'), '{:.3f}')} |")
    if base is not None:
        from .training import perceptual_mode
        lines += ["", f"{base.data.image_size} px, {base.train.phase1.epochs} + {base.train.phase2.epochs} epochs "
                      f"per variant on the same images, seed {base.train.seed}; {perceptual_mode(base)}. "
                      "dFD = domain Fréchet distance to training images in the X-ray feature space "
                      "(lower is better; n/a without --features); FID n/a when the Inception weights are "
                      "unavailable; MS-SSIM = mean pairwise MS-SSIM of samples (lower = more diverse)."]
    return "\n".join(lines)
