"""The chest X-ray data pipeline: find the dataset, decode once, cache, serve tensors.

Kaggle's "Chest X-Ray Images (Pneumonia)" archive (Kermany et al. 2018, CC BY 4.0) has quirks,
all handled here:

* a nested duplicate ``chest_xray/chest_xray/`` and a ``__MACOSX/`` tree of ``._*`` AppleDouble
  files: only the shallowest folder holding ``train/NORMAL`` is read, hidden files are ignored,
  so no image is counted twice;
* a ``val/`` split of only 16 images: by default a patient-grouped validation split is carved
  from train instead (see `patient_id`, `split_by_patient`);
* originals from ~400 to ~2,900 px of any aspect, mostly 8-bit grayscale but some RGB; 16-bit,
  RGBA, CMYK, palette images load too; zero-byte, truncated and non-image files named ``.jpeg``
  are skipped with one warning per split that names them, and listed in ``dataset.skipped``.

Preprocessing happens once per file and split, in a process pool using all cores, into an
in-memory ``uint8`` array that is also saved to a cache file (``.npz``, loaded with
``allow_pickle=False``) keyed by the file list and the preprocessing parameters, so a second run
skips decoding entirely. Per-epoch work is then only indexing, ``/255`` and the flip.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import warnings
import zipfile
from collections import Counter, defaultdict
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

import cv2
import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset
from tqdm.std import tqdm

from .config import DataConfig
from .errors import DatasetError, WriteError, short_reason
from .runs import atomic_write

CLASSES = ("NORMAL", "PNEUMONIA")  # label 0, label 1
SPLITS = ("train", "val", "test")
IMAGE_SUFFIXES = {".jpeg", ".jpg", ".png", ".bmp", ".tif", ".tiff"}
KAGGLE_MOUNTS = (
    "/kaggle/input/chest-xray-pneumonia/chest_xray",
    "/kaggle/input/datasets/paultimothymooney/chest-xray-pneumonia/chest_xray",
)
CACHE_VERSION = 1  # bump when preprocessing changes, so old cache files are not reused


class UnreadableImageWarning(UserWarning):
    """Some files in a split could not be decoded and were skipped."""


# ---------------------------------------------------------------------------------------------
# Finding the dataset
# ---------------------------------------------------------------------------------------------

def _has_split_layout(folder: Path) -> bool:
    train = folder / "train"
    return train.is_dir() and any((train / c).is_dir() for c in CLASSES)


def _find_layout(start: Path, max_depth: int = 3) -> Optional[Path]:
    """Breadth-first search for the shallowest folder holding ``train/NORMAL``.

    Shallowest wins, so the archive's nested duplicate ``chest_xray/chest_xray`` is never read
    when its parent also has the layout; ``__MACOSX`` and hidden folders are never entered.
    """
    level = [start]
    for _ in range(max_depth + 1):
        hits = [d for d in level if _has_split_layout(d)]
        if hits:
            return sorted(hits)[0]
        nxt = []
        for d in level:
            try:
                children = sorted(p for p in d.iterdir() if p.is_dir())
            except OSError:
                continue
            nxt += [c for c in children if not c.name.startswith((".", "__MACOSX"))
                    and c.name not in SPLITS and c.name not in CLASSES]
        level = nxt
    return None


def resolve_data_root(root: str | os.PathLike | None = None) -> Path:
    """The folder holding ``train/{NORMAL,PNEUMONIA}`` (and ``test/``, maybe ``val/``).

    Looks at, in order: ``root`` if given, else ``$SPATIALVAE_DATA``, else the Kaggle mounts.
    Any of the ``chest_xray`` folder, the dataset folder (``chest-xray-pneumonia``) or its parent
    (``/kaggle/input``) works. Raises `DatasetError` saying where it looked and how to fix it.
    """
    if root is not None:
        candidates = [("--data / data.root", Path(root).expanduser())]
    elif os.environ.get("SPATIALVAE_DATA"):
        candidates = [("$SPATIALVAE_DATA", Path(os.environ["SPATIALVAE_DATA"]).expanduser())]
    else:
        candidates = [("Kaggle mount", Path(p)) for p in KAGGLE_MOUNTS] + [("Kaggle inputs", Path("/kaggle/input"))]
    for _, cand in candidates:
        if cand.is_dir():
            found = _find_layout(cand)
            if found is not None:
                return found.resolve()
    looked = "; ".join(f"{p} ({how}{'' if p.exists() else ', does not exist'})" for how, p in candidates)
    raise DatasetError(
        "chest X-ray dataset not found: no folder with train/NORMAL and train/PNEUMONIA under "
        f"{looked}. Fix: pass --data PATH (or set SPATIALVAE_DATA) to the folder that holds train/ and "
        "test/, or on Kaggle add the dataset 'paultimothymooney/chest-xray-pneumonia' "
        "(Add Input > Datasets) so it appears under /kaggle/input."
    )


@dataclass
class FileEntry:
    path: str  # absolute path
    label: int  # 0 NORMAL, 1 PNEUMONIA
    patient: str  # patient id parsed from the file name


def list_split_files(data_root: Path, split: str) -> list[FileEntry]:
    """Image files of one on-disk split (train, val or test), sorted, hidden files ignored.

    Only the class folders directly under ``data_root/split`` are read (no recursion), so nested
    duplicates never double-count. Returns [] when the split folder does not exist.
    """
    split_dir = data_root / split
    if not split_dir.is_dir():
        return []
    by_upper = {p.name.upper(): p for p in split_dir.iterdir() if p.is_dir()}
    entries = []
    for label, cls in enumerate(CLASSES):
        cls_dir = by_upper.get(cls)
        if cls_dir is None:
            continue
        for p in sorted(cls_dir.iterdir()):
            if p.name.startswith(".") or p.suffix.lower() not in IMAGE_SUFFIXES or not p.is_file():
                continue  # .DS_Store, ._AppleDouble, Thumbs.db, README files
            entries.append(FileEntry(str(p), label, patient_id(p.name, CLASSES[label])))
    return entries


# ---------------------------------------------------------------------------------------------
# Patients and the validation split
# ---------------------------------------------------------------------------------------------

_PATIENT_PATTERNS = (
    re.compile(r"^(person\d+)_", re.IGNORECASE),  # person1000_bacteria_2931.jpeg
    re.compile(r"^((?:NORMAL2-)?IM-\d+)-", re.IGNORECASE),  # IM-0115-0001.jpeg, NORMAL2-IM-0588-0001.jpeg
)


def patient_id(filename: str, class_name: str = "") -> str:
    """Patient id from a Kermany file name; unknown patterns count as their own patient.

    ``IM-0429-0001-0002.jpeg`` -> ``IM-0429``; ``NORMAL2-IM-0588-0001.jpeg`` -> ``NORMAL2-IM-0588``
    (a different series from ``IM-0588``); ``person19_virus_50.jpeg`` -> ``person19``.
    """
    name = Path(filename).name
    for pat in _PATIENT_PATTERNS:
        m = pat.match(name)
        if m:
            return m.group(1).upper().replace("PERSON", "person")
    return f"{class_name}/{Path(name).stem}" if class_name else Path(name).stem


def split_by_patient(entries: Sequence[FileEntry], val_fraction: float, seed: int) -> tuple[list, list]:
    """Split entries into (train, val) with no patient on both sides.

    Per class (by each patient's majority label), patients are shuffled with ``seed`` and moved
    to val until val holds ``round(val_fraction * n_class)`` images, so class balance is kept.
    """
    by_patient: dict[str, list[FileEntry]] = defaultdict(list)
    for e in entries:
        by_patient[e.patient].append(e)
    patients_by_class: dict[int, list[str]] = defaultdict(list)
    for pid, items in sorted(by_patient.items()):
        majority = Counter(e.label for e in items).most_common(1)[0][0]
        patients_by_class[majority].append(pid)
    rng = random.Random(seed)
    val_patients: set[str] = set()
    for label in sorted(patients_by_class):
        pids = patients_by_class[label]
        rng.shuffle(pids)
        n_class = sum(len(by_patient[p]) for p in pids)
        target = round(val_fraction * n_class)
        taken = 0
        for pid in pids:
            if taken >= target:
                break
            val_patients.add(pid)
            taken += len(by_patient[pid])
    train = [e for e in entries if e.patient not in val_patients]
    val = [e for e in entries if e.patient in val_patients]
    return train, val


def cap_per_class(entries: Sequence[FileEntry], max_per_class: Optional[int], seed: int) -> list[FileEntry]:
    """A seeded, class-balanced subset (at most ``max_per_class`` per class), in original order."""
    if max_per_class is None:
        return list(entries)
    keep = set()
    rng = random.Random(seed)
    for label in range(len(CLASSES)):
        idx = [i for i, e in enumerate(entries) if e.label == label]
        keep.update(idx if len(idx) <= max_per_class else rng.sample(idx, max_per_class))
    return [e for i, e in enumerate(entries) if i in keep]


@dataclass
class SplitPlan:
    """Which files make up train / val / test, and why (no decoding happens here)."""

    root: Path
    files: dict[str, list[FileEntry]]
    on_disk: dict[str, dict[str, int]]  # files per on-disk folder and class, before any split or cap
    val_method: str  # "kaggle" or "patient"
    val_reason: str


def plan_splits(root: str | os.PathLike | None = None, val_split: str = "auto", val_fraction: float = 0.1,
                min_kaggle_val: int = 100, split_seed: int = 0, max_per_class: Optional[int] = None) -> SplitPlan:
    """Find the dataset and decide the three splits from file names alone."""
    data_root = resolve_data_root(root)
    disk = {s: list_split_files(data_root, s) for s in SPLITS}
    on_disk = {s: {c: sum(e.label == i for e in disk[s]) for i, c in enumerate(CLASSES)} for s in SPLITS}
    if not disk["train"]:
        raise DatasetError(f"{data_root / 'train'} has no images in NORMAL/ or PNEUMONIA/; "
                           "point --data at the chest_xray folder of the Kaggle dataset")
    n_val = len(disk["val"])
    if val_split == "kaggle":
        if n_val == 0:
            raise DatasetError(f"data.val_split=kaggle but {data_root / 'val'} has no images; "
                               "use data.val_split=patient (or auto)")
        method, reason = "kaggle", f"Kaggle's val/ folder ({n_val} images), as requested"
    elif val_split == "patient" or n_val < min_kaggle_val:
        method = "patient"
        why = "as requested" if val_split == "patient" else (
            f"Kaggle's val/ has {n_val} images (< {min_kaggle_val}), too few to select checkpoints")
        reason = (f"patient-grouped {val_fraction:.0%} of train (+ val/ pooled in), seed {split_seed}, {why}")
    else:
        method, reason = "kaggle", f"Kaggle's val/ folder ({n_val} images >= {min_kaggle_val})"
    if method == "patient":
        train, val = split_by_patient(disk["train"] + disk["val"], val_fraction, split_seed)
    else:
        train, val = disk["train"], disk["val"]
    files = {"train": train, "val": val, "test": disk["test"]}
    files = {s: cap_per_class(f, max_per_class, split_seed) for s, f in files.items()}
    return SplitPlan(data_root, files, on_disk, method, reason)


# ---------------------------------------------------------------------------------------------
# Decoding and preprocessing (once per file)
# ---------------------------------------------------------------------------------------------

def decode_grayscale(path: str, min_side: int = 0) -> tuple[np.ndarray, tuple[int, int], str]:
    """Decode any image file to 8-bit grayscale.

    Returns ``(gray uint8 (H, W), (orig_width, orig_height), orig_mode)``. For JPEGs, ``min_side``
    lets libjpeg decode at a reduced scale in the DCT domain (never below ``min_side`` on the
    short side), which is several times faster for Kaggle's ~1500x1200 originals. 16-bit and
    float images are stretched from their own min..max to 0..255; RGB(A), CMYK and palette
    images are converted with the ITU-R 601 luma weights, alpha is dropped.
    Raises ``OSError`` / ``ValueError`` for anything that is not a complete image.
    """

    with Image.open(path) as im:
        size, mode = im.size, im.mode
        if min_side and im.format == "JPEG":
            # draft() picks the largest 1/2, 1/4, 1/8 DCT reduction that keeps both sides >= min_side.
            im.draft("L", (min_side, min_side))
        im.load()  # raises on truncated data
        if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
            arr = np.asarray(im, dtype=np.float64)
            lo, hi = float(arr.min()), float(arr.max())
            gray = np.zeros(arr.shape, np.uint8) if hi <= lo else np.round((arr - lo) * (255.0 / (hi - lo))).astype(np.uint8)
        else:
            if im.mode not in ("L", "RGB"):
                im = im.convert("RGB")  # RGBA, LA, P, CMYK, 1, YCbCr -> RGB first
            gray = np.asarray(im.convert("L"), dtype=np.uint8)
    if gray.ndim != 2 or gray.size == 0:
        raise ValueError(f"decoded to an empty or odd array of shape {gray.shape}")
    return np.ascontiguousarray(gray), size, mode


def preprocess(gray: np.ndarray, image_size: int, clahe_clip: float = 2.0, clahe_tiles: int = 8,
               clahe: bool = True) -> np.ndarray:
    """Grayscale uint8 (H, W) -> CLAHE -> area-resize to (image_size, image_size) uint8.

    Order: CLAHE first, then resize (the recipe's order). CLAHE's 8x8 grid is relative to the
    image, so the tiles cover the same anatomy at any resolution, and equalising before the
    downsample gives each tile's histogram thousands of pixels instead of 64-256, so the clip
    limit behaves as intended; the area resize then averages away the noise CLAHE amplified.
    The image is squashed to a square (not cropped) so both lung fields stay in view.
    ``clahe=False`` gives the resize alone (for before/after comparisons).
    """

    eq = gray
    if clahe:
        eq = cv2.createCLAHE(clipLimit=float(clahe_clip), tileGridSize=(int(clahe_tiles), int(clahe_tiles))).apply(gray)
    interp = cv2.INTER_AREA if min(eq.shape) >= image_size else cv2.INTER_CUBIC
    return cv2.resize(eq, (image_size, image_size), interpolation=interp)


def _work_size(image_size: int) -> int:
    # Decode JPEGs at >= 4x the target (512 px for 128): CLAHE statistics are still rich there,
    # and libjpeg's DCT-domain reduction makes decoding a 1500x1200 original several times faster.
    return 4 * image_size


def process_file(args: tuple[str, int, float, int]):
    """The default decode of `load_split`: (path, image_size, clip, tiles) -> (image uint8 (S, S) or
    None, original (width, height), original mode, None or why the file is unreadable). A replacement
    (``load_split(decode=...)``, e.g. `bench`'s naive full-size decode) returns the same and must be
    a module-level function, so worker processes can run it."""
    path, image_size, clip, tiles = args
    try:
        cv2.setNumThreads(1)  # one process per core already
        gray, size, mode = decode_grayscale(path, _work_size(image_size))
        return preprocess(gray, image_size, clip, tiles), size, mode, None
    except Exception as e:  # noqa: BLE001 - any failure means "unreadable", reported per file
        return None, (0, 0), "", _unreadable_reason(path, e)


def _unreadable_reason(path: str, e: Exception) -> str:

    try:
        if os.path.getsize(path) == 0:
            return "empty file (0 bytes)"
    except OSError:
        return "file disappeared or cannot be read"
    if isinstance(e, UnidentifiedImageError):
        return "not an image (content is no known image format)"
    return short_reason(e).replace(path, "<file>")


def default_workers() -> int:
    """The cores this process may use (its CPU affinity where the OS reports it)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS / Windows
        return max(1, os.cpu_count() or 1)


@dataclass
class PreprocessedSplit:
    """Decoded images of one split, plus what was skipped and the originals' sizes."""

    images: np.ndarray  # (N, S, S) uint8
    labels: np.ndarray  # (N,) int64
    paths: list[str]
    patients: list[str]
    orig_sizes: np.ndarray  # (N, 2) int32 width, height of the original files
    orig_modes: list[str]
    skipped: dict[str, str] = field(default_factory=dict)  # path -> reason
    from_cache: bool = False


def default_cache_dir() -> Path:
    if os.environ.get("SPATIALVAE_CACHE"):
        return Path(os.environ["SPATIALVAE_CACHE"]).expanduser()
    if Path("/kaggle/working").is_dir():
        return Path("/kaggle/working/.cache/spatialvae")
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "spatialvae"


def cache_key(entries: Sequence[FileEntry], image_size: int, clahe_clip: float, clahe_tiles: int) -> str:
    """Hash of the file list (path, size, mtime) and every preprocessing parameter."""
    h = hashlib.sha256()
    h.update(json.dumps({"v": CACHE_VERSION, "size": image_size, "clip": clahe_clip, "tiles": clahe_tiles,
                         "work": _work_size(image_size)}).encode())
    for e in entries:
        try:
            st = os.stat(e.path)
            sig = f"{e.path}|{st.st_size}|{st.st_mtime_ns}|{e.label}\n"
        except OSError:
            sig = f"{e.path}|missing|{e.label}\n"
        h.update(sig.encode())
    return h.hexdigest()[:24]


def _load_cache(path: Path, entries: Sequence[FileEntry]) -> Optional[PreprocessedSplit]:
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            images, orig = z["images"], z["orig_sizes"]
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, json.JSONDecodeError):
        return None  # missing, partial or foreign file: rebuild it
    by_path = {e.path: e for e in entries}
    paths = meta["paths"]
    if len(paths) != len(images) or any(p not in by_path for p in paths):
        return None
    return PreprocessedSplit(
        images=images, labels=np.array([by_path[p].label for p in paths], dtype=np.int64), paths=paths,
        patients=[by_path[p].patient for p in paths], orig_sizes=orig, orig_modes=meta["modes"],
        skipped=meta["skipped"], from_cache=True)


def _save_cache(path: Path, split: PreprocessedSplit) -> None:
    """Atomic write (see `runs.atomic_write`): a crash leaves no half-written cache file."""

    meta = json.dumps({"paths": split.paths, "modes": split.orig_modes, "skipped": split.skipped})
    atomic_write(path, lambda f: np.savez(f, images=split.images, orig_sizes=split.orig_sizes, meta=np.array(meta)))


_MEMO: dict[str, PreprocessedSplit] = {}  # in-process: train and val datasets share one decode
_UNWRITABLE: set[Path] = set()  # cache folders a write failed in, this process: not tried again


def clear_memo() -> None:
    """Forget the in-process decodes (the next `load_split` reads the cache file or decodes) and which
    cache folders could not be written."""
    _MEMO.clear()
    _UNWRITABLE.clear()


def load_split(entries: Sequence[FileEntry], image_size: int, clahe_clip: float = 2.0, clahe_tiles: int = 8,
               cache_dir: str | os.PathLike | None = None, use_cache: bool = True, workers: Optional[int] = None,
               progress: bool = True, desc: str = "preprocess", decode: Optional[Callable] = None) -> PreprocessedSplit:
    """Decode + CLAHE + resize every file once (all cores), or load the result from the cache.
    ``decode``: default `process_file` (use_cache=False when replacing it: the cache key does not know it)."""

    key = cache_key(entries, image_size, clahe_clip, clahe_tiles)
    if use_cache and key in _MEMO:
        return _MEMO[key]
    cache_path = Path(cache_dir or default_cache_dir()) / f"{desc}-{image_size}px-{key}.npz"
    if use_cache:
        cached = _load_cache(cache_path, entries)
        if cached is not None:
            _MEMO[key] = cached
            return cached
    jobs = [(e.path, image_size, clahe_clip, clahe_tiles) for e in entries]
    workers = workers or default_workers()
    results = _map_with_progress(decode or process_file, jobs, workers, progress, desc)
    ok = [(e, r) for e, r in zip(entries, results) if r[3] is None]
    skipped = {e.path: r[3] for e, r in zip(entries, results) if r[3] is not None}
    images = np.stack([r[0] for _, r in ok]) if ok else np.zeros((0, image_size, image_size), np.uint8)
    split = PreprocessedSplit(
        images=images, labels=np.array([e.label for e, _ in ok], dtype=np.int64), paths=[e.path for e, _ in ok],
        patients=[e.patient for e, _ in ok], orig_sizes=np.array([r[1] for _, r in ok], dtype=np.int32).reshape(-1, 2),
        orig_modes=[r[2] for _, r in ok], skipped=skipped)
    if use_cache:
        _try_save_cache(cache_path, split)
        _MEMO[key] = split
    return split


def _try_save_cache(path: Path, split: PreprocessedSplit) -> None:
    """A cache that cannot be written (read-only or full disk) is one warning, not an error: the run
    works from memory, only the next one decodes again. The other splits then do not try that folder,
    so the warning comes once, and no time goes into files that would not fit."""
    if path.parent in _UNWRITABLE:
        return
    try:
        _save_cache(path, split)
    except WriteError as e:
        _UNWRITABLE.add(path.parent)
        warnings.warn(f"could not write the preprocessing cache {path} ({e.reason}); this run goes on from "
                      "memory and the next one decodes again; free space, or set data.cache_dir or "
                      "$SPATIALVAE_CACHE to a writable folder with room")


class _OpenCVForkSafe:
    """Stop OpenCV's worker threads in this process while worker processes are forked.

    A fork copies OpenCV's thread pool in whatever state it is in, and the child's first
    ``cv2.setNumThreads`` then waits forever for threads that do not exist there. That happened as
    soon as the caller had used cv2 itself first (a notebook's histogram cell, the bench command).
    ``setNumThreads(1)`` here joins the pool before the fork; the caller's setting comes back after.
    (Fork is kept, rather than spawn/forkserver, so scripts need no ``if __name__ == "__main__"``.)
    """

    def __enter__(self):

        self.previous = cv2.getNumThreads()
        cv2.setNumThreads(1)
        return self

    def __exit__(self, *exc):

        cv2.setNumThreads(self.previous)


def _map_with_progress(fn, jobs: list, workers: int, progress: bool, desc: str) -> list:

    bar = tqdm(total=len(jobs), desc=desc, unit="img", disable=not progress or len(jobs) == 0,
               mininterval=1.0, dynamic_ncols=True)
    out = []
    try:
        if workers <= 1 or len(jobs) < 64:
            for j in jobs:
                out.append(fn(j))
                bar.update()
        else:
            chunk = max(1, min(64, len(jobs) // (workers * 8)))
            with _OpenCVForkSafe(), ProcessPoolExecutor(max_workers=workers) as pool:
                for r in pool.map(fn, jobs, chunksize=chunk):
                    out.append(r)
                    bar.update()
    finally:
        bar.close()
    return out


# ---------------------------------------------------------------------------------------------
# The Dataset
# ---------------------------------------------------------------------------------------------

def as_float_images(x: torch.Tensor) -> torch.Tensor:
    """Cached uint8 images (N, H, W) or (N, 1, H, W), or float ones -> float32 (N, 1, H, W) in [0, 1]."""
    if x.dim() == 3:
        x = x.unsqueeze(1)  # (N, 1, H, W)
    return x.float().div(255.0) if x.dtype == torch.uint8 else x.float()


class ChestXRayDataset(Dataset):
    """One split of the chest X-ray data as ``(image, label)``.

    ``image`` is a float32 tensor ``(1, H, W)`` in [0, 1] (no normalisation: the decoder ends in a
    Sigmoid); ``label`` is 0 for NORMAL, 1 for PNEUMONIA. Images are decoded, CLAHE'd and resized
    once (see `load_split`); the horizontal flip (p = 0.5, train split only by default) is drawn
    per epoch from ``seed`` and ``set_epoch``, so it is reproducible and independent of workers.
    """

    def __init__(self, split: str = "train", data_cfg: Optional[DataConfig] = None, plan: Optional[SplitPlan] = None,
                 *, seed: int = 0, hflip: Optional[bool] = None, use_cache: bool = True, progress: bool = True):
        """``data_cfg`` (default `DataConfig()`) sets the folder, preprocessing, cache and split;
        ``plan`` (from `plan_splits`) is shared by the three splits of one `make_datasets` call.
        ``hflip`` defaults to the config's for the train split and off for the others."""
        if split not in SPLITS:
            raise ValueError(f"split={split!r}: choose one of {', '.join(SPLITS)}")
        d = data_cfg or DataConfig()
        self.plan = plan or plan_for(d)
        self.split = split
        self.image_size = d.image_size
        self.hflip = (split == "train" and d.hflip) if hflip is None else hflip
        self.seed = seed
        entries = self.plan.files[split]
        if not entries:
            raise DatasetError(f"the {split} split is empty under {self.plan.root} "
                               f"(validation: {self.plan.val_reason}); check the dataset folder")
        data = load_split(entries, d.image_size, d.clahe_clip, d.clahe_tiles, d.cache_dir, use_cache,
                          d.preprocess_workers, progress, desc=split)
        if data.skipped:
            names = ", ".join(data.skipped)
            warnings.warn(f"{split}: skipped {len(data.skipped)} unreadable file(s): {names}",
                          UnreadableImageWarning, stacklevel=2)
        if len(data.paths) == 0:
            raise DatasetError(f"none of the {len(entries)} files in the {split} split could be decoded; "
                               "the dataset looks corrupt: download it again")
        self.images = torch.from_numpy(data.images)  # (N, S, S) uint8, shared, never copied per epoch
        self.labels = torch.from_numpy(data.labels)  # (N,)
        self.paths = data.paths
        self.patients = data.patients
        self.orig_sizes = data.orig_sizes
        self.orig_modes = data.orig_modes
        self.skipped = list(data.skipped)
        self.skip_reasons = dict(data.skipped)
        self.from_cache = data.from_cache
        self.val_method, self.val_reason = self.plan.val_method, self.plan.val_reason
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        """Draw this epoch's flips: the same (seed, epoch) always gives the same flips."""
        self.epoch = epoch
        if self.hflip:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._flip = torch.rand(len(self.images), generator=g) < 0.5
        else:
            self._flip = torch.zeros(len(self.images), dtype=torch.bool)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        img = self.images[i]
        if self._flip[i]:
            img = img.flip(-1)
        return img.unsqueeze(0).float().div_(255.0), int(self.labels[i])  # (1, S, S) in [0, 1]

    def class_counts(self) -> dict[str, int]:
        return {c: int((self.labels == i).sum()) for i, c in enumerate(CLASSES)}


@dataclass
class DataSplits:
    train: ChestXRayDataset
    val: ChestXRayDataset
    test: ChestXRayDataset


def make_datasets(data_cfg: DataConfig, seed: int = 0, progress: bool = True, use_cache: bool = True) -> DataSplits:
    """The three splits from a `DataConfig`, sharing one split plan (and one decode per file)."""
    plan = plan_for(data_cfg)
    common = dict(seed=seed, use_cache=use_cache, progress=progress)
    return DataSplits(*(ChestXRayDataset(split, data_cfg, plan, **common) for split in ("train", "val", "test")))


def plan_for(d: DataConfig) -> SplitPlan:
    """The split plan (which files are train / val / test) a `DataConfig` asks for."""
    return plan_splits(d.root, d.val_split, d.val_fraction, d.min_kaggle_val, d.split_seed, d.max_per_class)


def unused_train_files(d: DataConfig, plan: Optional[SplitPlan] = None) -> list[FileEntry]:
    """Training-split files a run capped by ``max_per_class`` never saw: those `cap_per_class` left
    out, less every patient with an image in the capped split. [] when nothing was capped."""
    if d.max_per_class is None:
        return []
    used = (plan or plan_for(d)).files["train"]
    full = plan_for(replace(d, max_per_class=None)).files["train"]
    seen = {e.patient for e in used}
    return [e for e in full if e.patient not in seen]


def make_dataloader(dataset: ChestXRayDataset, batch_size: int, train: bool, num_workers: int = 0,
                    device: str | torch.device = "cpu", sampler=None) -> DataLoader:
    """A DataLoader over cached tensors: pinned memory on CUDA, full batches in training, shuffled
    in training unless a ``sampler`` decides the order (the trainer passes one seeded per epoch).

    The loader has its own generator (seed 0): each pass over a DataLoader draws a seed from its
    generator, or from torch's global RNG when it has none, so its order never depends on what else
    drew from the global stream (the posterior noise has its own, see `engine.noise_generator`). ``num_workers=0``
    is the default because items are slices of an in-memory tensor: worker processes would only
    add inter-process copies (see `python -m spatialvae bench`).
    """
    cuda = torch.device(device).type == "cuda"
    return DataLoader(dataset, batch_size=batch_size, shuffle=(train and sampler is None), sampler=sampler,
                      drop_last=train, num_workers=num_workers, pin_memory=cuda,
                      generator=torch.Generator().manual_seed(0))


def summarize(datasets: Iterable[ChestXRayDataset]) -> dict:
    """Counts, original image sizes and skipped files, as printed by ``python -m spatialvae data``."""
    out = {"counts": {}, "image_sizes": {}, "skipped": [], "skip_reasons": {}}
    for ds in datasets:
        out["counts"][ds.split] = ds.class_counts()
        w, h = ds.orig_sizes[:, 0], ds.orig_sizes[:, 1]
        out["image_sizes"][ds.split] = {
            "width": {"min": int(w.min()), "median": float(np.median(w)), "max": int(w.max())},
            "height": {"min": int(h.min()), "median": float(np.median(h)), "max": int(h.max())},
            "modes": dict(sorted(Counter(ds.orig_modes).items())),
        }
        for p in ds.skipped:
            if p not in out["skip_reasons"]:
                out["skipped"].append(p)
                out["skip_reasons"][p] = ds.skip_reasons[p]
    return out


def seeded_subset(n_total: int, k: int, seed: int) -> torch.Tensor:
    """k distinct indices of range(n_total) (all of them when k >= n_total), sorted, reproducible."""
    if k >= n_total:
        return torch.arange(n_total)
    return torch.randperm(n_total, generator=torch.Generator().manual_seed(seed))[:k].sort().values


def seeded_per_class(labels: torch.Tensor, k: int, seed: int, classes) -> list[torch.Tensor]:
    """For each class in ``classes``, in that order, up to k seeded indices of its images (one
    generator for all, so the picks depend on the class order) -> one index tensor per class."""
    g = torch.Generator().manual_seed(seed)
    picks = []
    for c in classes:
        idx = (labels == c).nonzero().flatten()
        picks.append(idx[torch.randperm(len(idx), generator=g)[:k]])
    return picks
