"""Command line: ``python -m spatialvae <command>`` (also installed as ``spatialvae``).

Every user error (`SpatialVAEError`) ends as one ``error: ...`` line on stderr and exit status 2,
never a traceback.

Each command imports the modules it runs inside its function: they import torch (slow),
so ``--help`` and argument errors answer at once. Everything else is imported here.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

from . import __version__
from .config import PRESETS, Config, DataConfig, get_preset
from .errors import ConfigError, SpatialVAEError, WeightsError, on_disk_full

# ---- argument checks: argparse prints the usage and one error line, exits 2, before any work ------

MAX_GRID = 4096  # images in one `sample` PNG: 64 x 64 tiles; more is unreadable and may not fit in memory


def count(lo: int, hi: Optional[int] = None, unit: str = "") -> Callable[[str], int]:
    """An argparse type: a whole number in [lo, hi]."""
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if v < lo or (hi is not None and v > hi):
            span = f"at least {lo}" if hi is None else f"between {lo} and {hi}"
            raise argparse.ArgumentTypeError(f"{v} is out of range: expected {span}{unit}")
        return v
    parse.__name__ = "count"
    return parse


def non_negative(text: str) -> float:
    """An argparse type: a finite number >= 0."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (v >= 0 and v != float("inf")):
        raise argparse.ArgumentTypeError(f"{text} is out of range: expected a finite number >= 0")
    return v


def output_file(text: str) -> Path:
    """An argparse type: a path that can become a file (not a folder, no file where a folder must be)."""
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a folder; give a file name inside it")
    above = path.parent
    while not above.exists() and above != above.parent:
        above = above.parent
    if not above.is_dir():
        raise argparse.ArgumentTypeError(f"cannot write {text}: {above} is a file, not a folder")
    return path


def _add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", metavar="PATH", default=None,
                   help="folder with train/ and test/ (or its parent); default: $SPATIALVAE_DATA, then Kaggle mounts")
    p.add_argument("--image-size", type=int, default=128, help="side of the preprocessed images (default 128)")
    p.add_argument("--val-split", choices=("auto", "kaggle", "patient"), default="auto",
                   help="validation split: auto (patient split when Kaggle's val/ is tiny), kaggle, patient")
    p.add_argument("--cache-dir", default=None, help="where preprocessed arrays are cached (default: see README)")
    p.add_argument("--no-cache", action="store_true", help="decode everything again, do not read or write the cache")
    p.add_argument("--workers", type=int, default=None, help="processes for the one-time decode (default: all cores)")


def cmd_data(args: argparse.Namespace) -> int:
    """Per split and class counts, original image sizes, skipped files, validation split used."""
    from .data import make_datasets, summarize

    cfg = DataConfig(root=args.data, image_size=args.image_size, val_split=args.val_split,
                     cache_dir=args.cache_dir, preprocess_workers=args.workers)
    Config(data=cfg).validate()
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:  # skipped files are reported below instead
        warnings.simplefilter("always")
        splits = make_datasets(cfg, progress=not args.json, use_cache=not args.no_cache)
    seconds = time.perf_counter() - t0
    sets = [splits.train, splits.val, splits.test]
    report = summarize(sets)
    plan = splits.train.plan
    patients = {ds.split: set(ds.patients) for ds in sets}
    n_images = sum(len(ds) + len(ds.skipped) for ds in sets)
    report = {
        "root": str(plan.root),
        "counts": report["counts"],
        "on_disk": plan.on_disk,
        "val_split": {"method": plan.val_method, "reason": plan.val_reason},
        "patients": {
            **{s: len(p) for s, p in patients.items()},
            "train_val_shared": len(patients["train"] & patients["val"]),
            "train_test_shared": len(patients["train"] & patients["test"]),
        },
        "image_sizes": report["image_sizes"],
        "skipped": report["skipped"],
        "skip_reasons": report["skip_reasons"],
        "preprocess": {
            "image_size": cfg.image_size,
            "from_cache": all(ds.from_cache for ds in sets),
            "seconds": round(seconds, 3),
            "images_per_second": round(n_images / seconds, 1) if seconds > 0 else None,
        },
    }
    other = [str(w.message) for w in caught if "unreadable" not in str(w.message)]
    for msg in other:
        print(f"warning: {msg}", file=sys.stderr)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    _print_data_report(report)
    return 0


def _print_data_report(r: dict) -> None:
    print(f"dataset     {r['root']}")
    print(f"validation  {r['val_split']['method']}: {r['val_split']['reason']}")
    print()
    print(f"{'split':<8}{'NORMAL':>8}{'PNEUMONIA':>11}{'total':>8}   on disk (NORMAL/PNEUMONIA)")
    for split in ("train", "val", "test"):
        c = r["counts"][split]
        d = r["on_disk"][split]
        print(f"{split:<8}{c['NORMAL']:>8}{c['PNEUMONIA']:>11}{c['NORMAL'] + c['PNEUMONIA']:>8}"
              f"   {d['NORMAL']}/{d['PNEUMONIA']}")
    p = r["patients"]
    print(f"\npatients    train {p['train']}, val {p['val']}, test {p['test']}; shared by train and val: "
          f"{p['train_val_shared']}, by train and test: {p['train_test_shared']} (ids from file names)")
    print("\noriginal image sizes (width x height, px)")
    for split, s in r["image_sizes"].items():
        w, h = s["width"], s["height"]
        modes = ", ".join(f"{m} {n}" for m, n in s["modes"].items())
        print(f"  {split:<6} {w['min']}-{w['max']} (median {w['median']:.0f}) x "
              f"{h['min']}-{h['max']} (median {h['median']:.0f}); modes: {modes}")
    if r["skipped"]:
        print(f"\nskipped {len(r['skipped'])} unreadable file(s):")
        for path in r["skipped"]:
            print(f"  {path}: {r['skip_reasons'][path]}")
    else:
        print("\nskipped     none")
    pp = r["preprocess"]
    how = "loaded from cache" if pp["from_cache"] else "decoded + CLAHE + resized"
    print(f"\npreprocess  {how} at {pp['image_size']} px in {pp['seconds']:.1f} s "
          f"({pp['images_per_second']} images/s)")


def _load_train_config(args: argparse.Namespace) -> Config:
    if args.resume:
        return _resume_config(args)
    cfg = Config.from_json(args.config) if args.config else get_preset(args.preset or "seed")
    cfg = cfg.with_overrides(args.set or [])
    cfg = cfg.with_data_root(args.data)
    return cfg


def _resume_config(args: argparse.Namespace) -> Config:
    """The run's own config.json (+ --set). A --preset / --config given too (the first command
    re-typed with --resume added) is accepted when it matches the run, and refused naming the keys
    that differ otherwise."""
    from .runs import RunDir

    cfg = RunDir(args.resume).config().with_overrides(args.set or [])
    if args.config or args.preset:
        given = Config.from_json(args.config) if args.config else get_preset(args.preset)
        diff = cfg.differences(given.with_overrides(args.set or []), ignore=("data.root",))
        if diff:
            shown = "; ".join(f"{k}: run {a!r} vs given {b!r}" for k, (a, b) in list(diff.items())[:4])
            more = f" (+{len(diff) - 4} more)" if len(diff) > 4 else ""
            raise ConfigError(f"--resume {args.resume}: the run's config.json differs from "
                              f"{args.config or '--preset ' + args.preset} in {shown}{more}; drop --preset/--config "
                              "to continue the run as it was (use --set to change e.g. train.phase2.epochs)")
    cfg = cfg.with_data_root(args.data)
    return cfg


def cmd_train(args: argparse.Namespace) -> int:
    """Train both phases into a numbered run folder (or continue one with --resume)."""
    from . import distributed
    from .data import make_datasets
    from .losses import build_loss
    from .model import check_buildable
    from .runs import create_run_dir
    from .training import build_trainer

    cfg = _load_train_config(args)
    check_buildable(cfg)  # an impossible model fails here, before any data is decoded
    rank, _, device = distributed.init_distributed()
    try:
        with distributed.main_first():  # rank 0 decodes (all cores) and writes the cache; the others read it
            splits = make_datasets(cfg.data, seed=cfg.train.seed, progress=not args.quiet and rank == 0)
        _warn_missing_classes(splits.train.labels, rank)
        loss = build_loss(cfg)  # fails on missing VGG weights before a run folder is made
        if args.resume:
            run_dir = Path(args.resume)
        else:
            run_dir = Path(distributed.run_on_main(lambda: str(create_run_dir(args.out, args.name or cfg.preset))))
        trainer = build_trainer(cfg, splits.train, splits.val, run_dir, device=device, progress=not args.quiet,
                                resume=bool(args.resume), loss=loss,
                                monitor_data=splits.test if args.monitor_test else None)
        t0 = time.perf_counter()
        trainer.fit()
        # Rank 0 alone runs the stages after training; the others wait for its word (or its failure,
        # at once), so every rank leaves the process group together.
        distributed.run_on_main(lambda: _after_training(trainer, splits, args.quiet, t0))
    finally:
        distributed.shutdown()
    return 0


def _after_training(trainer, splits, quiet: bool, t0: float) -> None:
    """Rank 0, once both phases are done: the summary line, the texture stage and the learned prior.
    Each stage's full disk names its own file; the rest (train.log) names the run's last checkpoint."""
    cfg, run_dir, log = trainer.cfg, trainer.run_dir, trainer.log
    with trainer.on_disk_full(trainer.epoch):
        best = min((h["val_select"] for h in trainer.history if "val_select" in h), default=float("nan"))
        log.info(f"done: {run_dir} | {len(trainer.history)} epochs, best val loss (final beta) {best:.4f} | "
                 f"{time.perf_counter() - t0:.0f} s this session")
        if cfg.texture.enabled:  # the sharp decoder head: resumes like the rest, kept once finished
            from .texture_run import fit_run_texture

            t1 = time.perf_counter()
            fit_run_texture(run_dir, cfg, splits, trainer.device, progress=not quiet, log=log.info)
            log.info(f"texture stage: {time.perf_counter() - t1:.0f} s this session")
        if cfg.prior.enabled:  # the short last stage: resumes like the rest, skipped once finished
            from .prior_run import fit_run_prior, prior_path

            t1 = time.perf_counter()
            fit_run_prior(run_dir, cfg, splits, trainer.device, progress=not quiet, log=log.info)
            log.info(f"latent prior: {prior_path(run_dir)} | {time.perf_counter() - t1:.0f} s this session")


def _warn_missing_classes(labels, rank: int) -> None:
    """One warning when the training split lacks a class: it trains, but only on the other."""
    from .data import CLASSES

    missing = [name for k, name in enumerate(CLASSES) if not bool((labels == k).any())]
    if missing and rank == 0:
        print(f"warning: the training split has no {' or '.join(missing)} images (train/{missing[0]} is empty): "
              f"the model and its prior learn the other class only, and sampling --label "
              f"{missing[0].lower()} will be refused", file=sys.stderr)


def cmd_sample(args: argparse.Namespace) -> int:
    """Samples from a run's checkpoint as one PNG grid: the run's learned prior by default (a GMM on
    the training latents when it has none), per class with --label; the last line names the sampler."""

    import torch

    from .runs import RunDir, load_model
    from .sampling import parse_label_mix
    from .viz import image_grid, save_png

    labels = parse_label_mix(args.label, args.n)  # an unknown label fails before anything is loaded
    args.sampler = _sampler_name(args.sampler, args.run)
    if labels is not None and args.sampler == "standard_normal":
        raise ConfigError("--label needs a sampler that knows the classes: learned, gmm or gaussian")
    for flag in ("guidance", "spread"):
        if getattr(args, flag) is not None and args.sampler != "learned":
            raise ConfigError(f"--{flag} applies to --sampler learned only, not {args.sampler}; drop it or use learned")
    if args.checkpoint == "last":
        path = RunDir(args.run).last
    else:
        from .texture_run import decoder_checkpoint
        path = decoder_checkpoint(args.run, args.decoder)
    model, cfg, ckpt = load_model(path)
    gen = torch.Generator().manual_seed(args.seed)
    if args.sampler == "standard_normal":
        images = model.sample(args.n, generator=gen)
    else:
        sampler = _fitted_sampler(args, model, cfg, int(ckpt.get("epoch", 0)), labels is not None)
        if args.sampler == "learned":
            from .sampling import decode_latents
            z = sampler.sample(args.n, gen, labels=labels, guidance=args.guidance, spread=args.spread)
            images = decode_latents(model, z)
        else:
            from .sampling import generate
            images = generate(model, sampler, args.n, gen, labels=labels)
    out = save_png(image_grid(images, nrow=int(max(1, round(args.n ** 0.5)))), args.out)
    kind = {"learned": "learned-prior", "standard_normal": "N(0, I)", "gmm": "GMM", "gaussian": "Gaussian"}[args.sampler]
    what = f"{kind} samples (--sampler {args.sampler})" + (f" ({args.label})" if args.label else "")
    print(f"wrote {args.n} {what} from {path} (epoch {ckpt['epoch']}) to {out}")
    return 0


def _sampler_name(name: Optional[str], run: str) -> str:
    """``--sampler`` as given, or the run's learned prior when it has one (else the GMM)."""
    if name is None:
        from .prior_run import prior_path
        return "learned" if prior_path(run).is_file() else "gmm"
    return name


def _fitted_sampler(args: argparse.Namespace, model, cfg, epoch: int, per_class: bool):
    """The learned prior from the run folder (``epoch``: the loaded checkpoint's, checked against the
    prior's), or a Gaussian / GMM fitted to the training split's posterior means (per class with --label)."""
    if args.sampler == "learned":
        from .prior_run import load_prior
        prior = load_prior(args.run, model.latent_shape)
        if prior.vae_epoch is not None and prior.vae_epoch != epoch:
            print(f"warning: the learned prior was fitted to the latents of the epoch-{prior.vae_epoch} checkpoint "
                  f"(best.pt), not this epoch-{epoch} one; its samples may be off", file=sys.stderr)
        return prior
    from .data import make_datasets
    from .prior_run import run_latents
    from .sampling import fit_sampler

    cfg = cfg.with_data_root(args.data)
    lat = run_latents(model, make_datasets(cfg.data, seed=cfg.train.seed, progress=False), val=False)
    return fit_sampler(args.sampler, lat["train"], lat["train_labels"] if per_class else None, args.seed)


def cmd_prior(args: argparse.Namespace) -> int:
    """Train (or finish) the learned latent prior of an existing run."""

    from .prior_run import fit_run_prior, prior_path
    from .runs import RunDir

    run = RunDir(args.run)
    run.config()  # a run folder, or one line saying it is not
    bad = [s for s in args.set if not s.startswith("prior.")]
    if bad:
        raise ConfigError(f"`prior --set` changes only prior.* settings, not {bad[0]!r}; e.g. --set prior.steps=3000")
    cfg = run.config().with_overrides(args.set)
    cfg = cfg.with_data_root(args.data)
    t0 = time.perf_counter()
    prior = fit_run_prior(args.run, cfg, progress=not args.quiet, if_done="replace" if args.force else "error",
                          log=lambda msg: print(msg, flush=True))
    d = prior.describe()
    print(f"wrote {prior_path(args.run)}: {d['parameters']:,} parameters, {d['steps']} steps, "
          f"{time.perf_counter() - t0:.0f} s")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Reconstruction and sample metrics of a run on the test split -> RUN_DIR/metrics.json."""

    from .lab.evaluate import evaluate_run
    from .lab.report import metrics_table

    if args.decoder and args.checkpoint:
        raise ConfigError(f"pass --decoder or --checkpoint, not both (--decoder {args.decoder} picks "
                          f"{'sharp.pt' if args.decoder == 'sharp' else 'best.pt'})")
    checkpoint = args.decoder or args.checkpoint or "auto"  # auto: sharp.pt when the run has one, else best.pt
    metrics = evaluate_run(args.run, data_root=args.data, checkpoint=checkpoint, n_samples=args.n,
                           features_path=args.features, inception=args.inception, progress=not args.quiet,
                           seed=args.seed, tstr_per_class=args.tstr, c2st=args.c2st)
    print(metrics_table(metrics))
    print(f"\nwrote {Path(args.run) / 'metrics.json'} ({metrics['seconds']:.0f} s)")
    return 0


def cmd_figures(args: argparse.Namespace) -> int:
    """README's pictures of a run: learned samples per class beside real X-rays, and reconstructions."""
    from .lab.figures import readme_figures

    paths = readme_figures(args.run, args.out, data_root=args.data, n=args.n, seed=args.seed, guidance=args.guidance)
    for path in paths.values():
        print(f"wrote {path} ({path.stat().st_size / 1024:.0f} KB)")
    return 0


def cmd_features(args: argparse.Namespace) -> int:
    """Train the chest X-ray feature extractor used for the domain Fréchet distance."""
    from .lab.features import build_features_file

    info = build_features_file(args.data, args.out, image_size=args.image_size, epochs=args.epochs,
                               max_per_class=args.max_per_class, seed=args.seed, progress=not args.quiet)
    t, fl, sc = info["test"], info["floor"], info["sanity"]
    print(f"test accuracy {t['accuracy']:.3f} (balanced {t['balanced_accuracy']:.3f}, sensitivity "
          f"{t['sensitivity']:.3f}, specificity {t['specificity']:.3f}, n={t['n']}) after {info['train_seconds']:.0f} s")
    print(f"floor: domain FD train vs test {fl['fd']:.3f} (KID {fl['kid_mean']:.4f}), "
          f"{fl['n_train']} vs {fl['n_test']} images")
    print("sanity check, FD to train images: " + ", ".join(f"{k} {sc[k]:.3f}" for k in sc["ranked"]))
    print(f"wrote {args.out}")
    return 0


def cmd_ablate(args: argparse.Namespace) -> int:
    """Recipe vs original vs one-change variants on the same images and budget -> OUT/ablation.{md,json,png}."""

    from .lab.ablation import run_ablation
    from .lab.report import ablation_table
    from .lab.variants import ablation_base

    variants = [v.strip() for v in args.variants.split(",") if v.strip()] if args.variants else None
    base = ablation_base(args.preset, tuple(args.epochs), args.perceptual, args.set or [])
    base = base.with_data_root(args.data)
    out = Path(args.out)
    features = args.features
    if features is not None and str(features).lower() == "none":
        features = None
    elif features is None:
        features = "auto"

    t0 = time.perf_counter()
    try:
        rows = run_ablation(out, base, variants, features_path=features, inception=args.inception,
                            progress=not args.quiet, n_samples=args.n)
    except WeightsError as e:
        raise WeightsError(f"{e}; for the ablation that is --perceptual off (no perceptual term anywhere) "
                           "or --perceptual random (explicit random VGG16 features)") from None
    print(ablation_table(rows, base))
    print(f"\nwrote {out / 'ablation.md'}, {out / 'ablation.json'}, {out / 'ablation.png'} "
          f"({(time.perf_counter() - t0) / 60:.1f} min this session)")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    """Data and training-step speed on this machine -> a table on stdout and JSON in --out."""

    from .lab.bench import run_bench
    from .lab.report import bench_table
    from .runs import atomic_write_bytes

    if args.curve:
        return _bench_curve(args)
    settings = [s.strip() for s in args.settings.split(",") if s.strip()] if args.settings else None
    perceptual = {"both": (False, True), "off": (False,), "on": (True,)}[args.perceptual]
    res = run_bench(args.data, preset=args.preset, image_size=args.image_size, batch=args.batch,
                    repeats=args.repeats, settings=settings, perceptual=perceptual, kaggle_n=args.kaggle_n,
                    skip_data=args.skip_data, progress=not args.quiet)
    print(bench_table(res))
    with on_disk_full("the figures are in the table above", "free space (or pass --out on a disk with room), "
                      "then run bench again"):
        out = atomic_write_bytes(args.out, (json.dumps(res, indent=2) + "\n").encode())  # makes the folder
    print(f"\nwrote {out}")
    return 0


def _bench_curve(args: argparse.Namespace) -> int:
    """Time-to-quality of finished runs: a figure, a markdown table and JSON next to --out."""

    from .lab.bench import time_to_quality
    from .lab.report import time_to_quality_table
    from .runs import atomic_write_bytes
    from .viz import time_to_quality_figure

    res = time_to_quality(args.curve)
    out = Path(args.out).with_name("time_to_quality.json") if args.out == "runs/bench.json" else Path(args.out)
    table = time_to_quality_table(res)
    print(table)
    with on_disk_full("the table is above, and the runs are untouched", "free space (or pass --out on a disk "
                      "with room), then run bench --curve again"):
        time_to_quality_figure(res["curves"], out.with_suffix(".png"), floors=res["floors"])
        atomic_write_bytes(out, (json.dumps(res, indent=2) + "\n").encode())
        atomic_write_bytes(out.with_suffix(".md"), (table + "\n").encode())
    print(f"\nwrote {out}, {out.with_suffix('.png')} and {out.with_suffix('.md')}")
    return 0


def _add_data_parser(sub) -> None:
    p = sub.add_parser("data", help="check the dataset: counts, sizes, skipped files, validation split")
    _add_data_args(p)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.set_defaults(func=cmd_data)


def _add_train_parser(sub) -> None:
    p = sub.add_parser("train", help="train both phases into a numbered run folder")
    p.add_argument("--data", metavar="PATH", default=None, help="dataset folder (default: $SPATIALVAE_DATA, Kaggle)")
    p.add_argument("--out", default="runs", help="parent folder of run folders (default: runs)")
    p.add_argument("--preset", choices=tuple(PRESETS), default=None,
                   help="starting config (default: seed)")
    p.add_argument("--config", metavar="FILE.json", default=None, help="start from a JSON config instead")
    p.add_argument("--set", metavar="KEY=VALUE", action="append", default=[],
                   help="override a config value, e.g. --set train.phase1.epochs=3 (repeatable)")
    p.add_argument("--resume", metavar="RUN_DIR", default=None, help="continue this run from checkpoints/last.pt")
    p.add_argument("--name", default=None, help="run folder suffix (default: the preset name)")
    p.add_argument("--quiet", action="store_true", help="no progress bars (summary lines only)")
    p.add_argument("--monitor-test", action="store_true",
                   help="also log test-split PSNR/SSIM every epoch (history.csv monitor_*; never used to select; "
                        "its time is kept out of 'seconds'), for time-to-quality curves")
    p.set_defaults(func=cmd_train)


def _add_sample_parser(sub) -> None:
    p = sub.add_parser("sample", help="draw samples from a trained run")
    p.add_argument("--run", metavar="RUN_DIR", required=True)
    p.add_argument("--n", type=count(1, MAX_GRID, " images in one grid"), default=64)
    p.add_argument("--out", metavar="FILE.png", type=output_file, required=True)
    p.add_argument("--checkpoint", choices=("best", "last"), default="best")
    p.add_argument("--decoder", choices=("sharp", "smooth"), default=None,
                   help="sharp: the texture stage's decoder (checkpoints/sharp.pt, the default when the run has one); "
                        "smooth: best.pt's L1 + SSIM decoder")
    p.add_argument("--sampler", choices=("learned", "gmm", "gaussian", "standard_normal"), default=None,
                   help="learned: the run's flow-matching prior (checkpoints/prior.pt; the default when the run has "
                        "one); gmm (the default otherwise) or gaussian: fitted to the training latents (needs the "
                        "data); standard_normal: N(0, I), which the low-KL latent does not fill")
    p.add_argument("--label", default=None,
                   help="normal, pneumonia, or a mix such as normal:0.3,pneumonia:0.7 (default: the training mix)")
    p.add_argument("--guidance", type=non_negative, default=None,
                   help="classifier-free guidance scale of the learned prior (default: the run's prior.guidance)")
    p.add_argument("--spread", type=non_negative, default=None,
                   help="the RMS the learned prior's standardised draws are rescaled to: 1 = the training latents', "
                        "above 1 sharper and more varied, 0 = as the flow draws them (default: the run's prior.spread)")
    p.add_argument("--data", metavar="PATH", default=None, help="dataset folder for gmm/gaussian (default: the run's)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_sample)


def _add_prior_parser(sub) -> None:
    p = sub.add_parser("prior", help="train the learned latent prior of an existing run (checkpoints/prior.pt)")
    p.add_argument("--run", metavar="RUN_DIR", required=True)
    p.add_argument("--data", metavar="PATH", default=None, help="dataset folder (default: the run's own)")
    p.add_argument("--set", metavar="KEY=VALUE", action="append", default=[],
                   help="override a prior setting, e.g. --set prior.steps=3000 (repeatable)")
    p.add_argument("--force", action="store_true", help="replace a finished or differently configured prior")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_prior)


def _add_evaluate_parser(sub) -> None:
    p = sub.add_parser("evaluate", help="measure a run on the test split and write RUN_DIR/metrics.json")
    p.add_argument("--run", metavar="RUN_DIR", required=True)
    p.add_argument("--data", metavar="PATH", default=None, help="dataset folder (default: the run's own)")
    p.add_argument("--checkpoint", default=None,
                   help="best, last, or a path to a .pt file (default: the one --decoder picks)")
    p.add_argument("--decoder", choices=("sharp", "smooth"), default=None,
                   help="sharp: the texture stage's decoder (checkpoints/sharp.pt, the default when the run has one), "
                        "scored beside the smooth one; smooth: best.pt alone")
    p.add_argument("--n", type=count(2), default=None, help="images generated per sampler (default: test split size)")
    p.add_argument("--inception", default="auto",
                   help="auto (cache, else download), off, or a path to the FID Inception weights")
    p.add_argument("--features", metavar="FILE.pt", default=None,
                   help="X-ray feature extractor from the `features` command: adds domain FD/KID")
    p.add_argument("--tstr", type=count(0), default=300, metavar="N",
                   help="train-on-synthetic-test-on-real with N images per class per conditional sampler, three "
                        "classifier seeds each (default 300; minutes on a CPU); 0 skips it")
    p.add_argument("--no-c2st", dest="c2st", action="store_false",
                   help="skip the classifier two-sample test (a small CNN tells learned-prior samples and "
                        "reconstructions from real images the VAE never trained on)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_evaluate)


def _add_figures_parser(sub) -> None:
    p = sub.add_parser("figures", help="README's pictures of a run: samples per class beside real X-rays, reconstructions")
    p.add_argument("--run", metavar="RUN_DIR", required=True, help="a run with a learned prior (checkpoints/prior.pt)")
    p.add_argument("--out", metavar="DIR", default="docs/img", help="folder for samples.png and reconstructions.png "
                                                                   "(default docs/img)")
    p.add_argument("--data", metavar="PATH", default=None, help="dataset folder (default: the run's own)")
    p.add_argument("--n", type=count(2), default=6, help="images per row (default 6)")
    p.add_argument("--guidance", type=non_negative, default=None, help="the learned prior's guidance (default: its own)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_figures)


def _add_features_parser(sub) -> None:
    p = sub.add_parser("features", help="train the chest X-ray feature extractor for the domain Fréchet distance")
    p.add_argument("--data", metavar="PATH", default=None, help="dataset folder (default: $SPATIALVAE_DATA, Kaggle)")
    p.add_argument("--out", metavar="FILE.pt", type=output_file, required=True)
    p.add_argument("--image-size", type=int, choices=(32, 64, 128), default=64)
    p.add_argument("--epochs", type=count(1), default=None, help="training epochs (default 8)")
    p.add_argument("--max-per-class", type=count(1), default=None, help="cap images per class and split (tests)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_features)


def _add_ablate_parser(sub) -> None:
    from .lab.variants import VARIANT_NAMES  # names only: config and errors, no torch

    p = sub.add_parser("ablate", help="train and evaluate the recipe, the original baseline and one-change variants")
    p.add_argument("--data", metavar="PATH", default=None, help="dataset folder (default: $SPATIALVAE_DATA, Kaggle)")
    p.add_argument("--out", default="runs/ablation", help="results folder; re-running it resumes (default: runs/ablation)")
    p.add_argument("--preset", choices=("quick", "smoke", "seed"), default="quick",
                   help="size of every variant (default quick: 64 px, 1,000 images per class)")
    p.add_argument("--epochs", type=int, nargs=2, metavar=("P1", "P2"), default=[8, 10],
                   help="epochs of phase 1 and phase 2 for every variant (default 8 10)")
    p.add_argument("--variants", default=None,
                   help=f"comma-separated subset of: {', '.join(VARIANT_NAMES)} (default: all)")
    p.add_argument("--perceptual", choices=("imagenet", "random", "off"), default="imagenet",
                   help="VGG16 weights of the perceptual term: imagenet (the recipe), random (explicit opt-in), "
                        "off (no perceptual term anywhere; no_perceptual is then skipped)")
    p.add_argument("--features", metavar="FILE.pt", default=None,
                   help="X-ray feature extractor for the domain FD (default: OUT/xray_features.pt, trained if "
                        "missing); 'none' to skip")
    p.add_argument("--inception", default="auto", help="FID Inception weights: auto, off, or a path")
    p.add_argument("--n", type=count(2), default=None, help="images generated per sampler (default: test split size)")
    p.add_argument("--set", metavar="KEY=VALUE", action="append", default=[],
                   help="override the base config of every variant, e.g. --set data.max_per_class=500")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_ablate)


def _add_bench_parser(sub) -> None:
    p = sub.add_parser("bench", help="measure data and training-step speed (eager, channels_last, compile, AMP)")
    p.add_argument("--data", metavar="PATH", default=None, help="dataset folder (default: $SPATIALVAE_DATA, Kaggle)")
    p.add_argument("--out", metavar="FILE.json", type=output_file, default="runs/bench.json", help="figures as JSON (default runs/bench.json)")
    p.add_argument("--preset", choices=("seed", "quick", "smoke"), default="seed", help="model to time (default seed)")
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--batch", type=count(1), default=32)
    p.add_argument("--repeats", type=count(1), default=3, help="timed steps per setting, after a warm-up (median)")
    p.add_argument("--settings", default=None,
                   help="comma-separated subset of eager, channels_last, compile, compile+channels_last "
                        "(+ fp16, bf16, fp16+channels_last, bf16+channels_last on CUDA); default: all")
    p.add_argument("--perceptual", choices=("both", "off", "on"), default="both",
                   help="time steps without and/or with the VGG16 perceptual term (random weights: same cost)")
    p.add_argument("--kaggle-n", type=count(1), default=200, help="Kaggle-size JPEGs synthesised for the decode rate")
    p.add_argument("--skip-data", action="store_true", help="model figures only")
    p.add_argument("--curve", metavar="RUN_DIR", nargs="+", default=None,
                   help="instead of timing: time-to-quality curves (test PSNR/SSIM vs minutes) of runs trained "
                        "with `train --monitor-test`; writes time_to_quality.{png,md,json} beside --out")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_bench)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="spatialvae", description="Spatial-latent VAE for chest X-rays (see README.md).")
    parser.add_argument("--version", action="version", version=f"spatialvae {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_data_parser(sub)
    _add_train_parser(sub)
    _add_sample_parser(sub)
    _add_prior_parser(sub)
    _add_evaluate_parser(sub)
    _add_figures_parser(sub)
    _add_features_parser(sub)
    _add_ablate_parser(sub)
    _add_bench_parser(sub)
    return parser


@contextmanager
def _one_line_warnings() -> Iterator[None]:
    """Warnings print as one ``warning: ...`` line like the CLI's own, without Python's source line."""
    saved = warnings.formatwarning
    warnings.formatwarning = lambda message, *args, **kwargs: f"warning: {message}\n"
    try:
        yield
    finally:
        warnings.formatwarning = saved


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    with _one_line_warnings():
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    try:
        return int(args.func(args) or 0)
    except SpatialVAEError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:  # under torchrun: a collective broken by another process's death
        from .distributed import peer_failure

        if (line := peer_failure(e)) is None:
            raise
        print(f"error: {line}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: finished files and checkpoints are kept", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
