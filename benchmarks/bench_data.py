"""Data pipeline figures: one-time preprocessing rate and the cost of a cached epoch.

    python benchmarks/bench_data.py --data ../shared/data/chest_xray [--kaggle-n 200]

Prints a table and writes nothing into the repository (temp folders only). Measures:
  * the one-time decode + CLAHE + resize rate on the given data, with all cores and with one;
  * the same on Kaggle-size originals (shared images upscaled to 1500x1200 grayscale JPEGs),
    with libjpeg's reduced-scale decode (what the package does) and a full-size decode (naive);
  * the time to deliver one epoch of batches of 32 from the in-memory cache, and to load the
    cache file from disk, against decoding every epoch.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from spatialvae import data as D  # noqa: E402


def _rate(entries, image_size: int, workers: int) -> float:
    t0 = time.perf_counter()
    out = D.load_split(entries, image_size, workers=workers, use_cache=False, progress=False)
    dt = time.perf_counter() - t0
    assert not out.skipped, out.skipped
    return len(entries) / dt


def _naive_process(args):
    """Full-resolution cv2 decode, then the same CLAHE + resize: what per-epoch code usually does."""
    import cv2
    cv2.setNumThreads(1)
    path, size, clip, tiles = args
    gray = cv2.imread(path, cv2.IMREAD_GRAYSCALE)
    return D.preprocess(gray, size, clip, tiles), (gray.shape[1], gray.shape[0]), "L", None


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=os.environ.get("SPATIALVAE_DATA", "../shared/data/chest_xray"))
    ap.add_argument("--image-size", type=int, default=128)
    ap.add_argument("--kaggle-n", type=int, default=200, help="how many 1500x1200 images to synthesise")
    args = ap.parse_args()
    cores = D._default_workers()
    rows = []

    plan = D.plan_splits(args.data)
    train = plan.files["train"]
    rows.append(("shared data (224 px JPEG), all cores", f"{_rate(train, args.image_size, cores):.0f} img/s",
                 f"{len(train)} images, {cores} processes"))
    sub = train[:600]
    rows.append(("shared data, 1 process", f"{_rate(sub, args.image_size, 1):.0f} img/s", f"{len(sub)} images"))

    import cv2
    with tempfile.TemporaryDirectory() as tmp:
        entries = []
        for i, e in enumerate(train[: args.kaggle_n]):
            gray = cv2.imread(e.path, cv2.IMREAD_GRAYSCALE)
            big = cv2.resize(gray, (1500, 1200), interpolation=cv2.INTER_CUBIC)
            p = os.path.join(tmp, f"IM-{i:04d}-0001.jpeg")
            cv2.imwrite(p, big, [cv2.IMWRITE_JPEG_QUALITY, 95])
            entries.append(D.FileEntry(p, e.label, f"IM-{i:04d}"))
        fast_all = _rate(entries, args.image_size, cores)
        fast_one = _rate(entries, args.image_size, 1)
        orig = D._process_file
        D._process_file = _naive_process
        try:
            naive_all = _rate(entries, args.image_size, cores)
        finally:
            D._process_file = orig
        rows.append(("Kaggle-size 1500x1200 JPEG, all cores", f"{fast_all:.0f} img/s",
                     f"{len(entries)} images; reduced-scale decode"))
        rows.append(("Kaggle-size, 1 process", f"{fast_one:.0f} img/s", f"{fast_all / fast_one:.2f}x from {cores} cores"))
        rows.append(("Kaggle-size, full-size decode, all cores", f"{naive_all:.0f} img/s",
                     f"reduced decode is {fast_all / naive_all:.2f}x faster"))

        import torch
        cache = Path(tmp) / "cache"
        D.ChestXRayDataset(args.data, "train", image_size=args.image_size, cache_dir=cache, progress=False)  # fills the cache
        D._MEMO.clear()
        t0 = time.perf_counter()
        ds2 = D.ChestXRayDataset(args.data, "train", image_size=args.image_size, cache_dir=cache, progress=False)
        load_s = time.perf_counter() - t0
        assert ds2.from_cache
        rows.append(("cache file load (train split)", f"{load_s:.2f} s",
                     f"{len(ds2)} images, {ds2.images.numel() / 1e6:.0f} MB uint8"))
        for workers in (0, 2):
            loader = D.make_dataloader(ds2, 32, train=True, num_workers=workers)
            times = []
            for epoch in range(3):
                ds2.set_epoch(epoch)
                t0 = time.perf_counter()
                n = sum(int(x.shape[0]) for x, _ in loader)
                times.append(time.perf_counter() - t0)
            rows.append((f"one cached epoch, batch 32, num_workers={workers}", f"{np.median(times):.3f} s",
                         f"{n} images, {n / np.median(times):.0f} img/s"))
        per_epoch_decode = len(ds2) / fast_all
        rows.append(("one epoch decoding Kaggle-size originals instead", f"{per_epoch_decode:.1f} s",
                     f"estimated from the all-core rate above ({cores} cores)"))
        del torch

    width = max(len(r[0]) for r in rows)
    print(f"{'measurement':<{width}}  {'result':>12}  notes")
    for name, value, note in rows:
        print(f"{name:<{width}}  {value:>12}  {note}")


if __name__ == "__main__":
    main()
