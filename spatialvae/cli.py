"""Command line: ``python -m spatialvae <command>`` (also installed as ``spatialvae``).

Every user error (`SpatialVAEError`) ends as one ``error: ...`` line on stderr and exit status 2,
never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from typing import Optional, Sequence

from . import __version__
from .errors import SpatialVAEError


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
    from .config import DataConfig
    from .data import make_datasets, summarize

    cfg = DataConfig(root=args.data, image_size=args.image_size, val_split=args.val_split,
                     cache_dir=args.cache_dir, preprocess_workers=args.workers)
    from .config import Config
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="spatialvae", description="Spatial-latent VAE for chest X-rays (see README.md).")
    parser.add_argument("--version", action="version", version=f"spatialvae {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("data", help="check the dataset: counts, sizes, skipped files, validation split")
    _add_data_args(p)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.set_defaults(func=cmd_data)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except SpatialVAEError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: finished files and checkpoints are kept", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
