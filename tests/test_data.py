from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, UnidentifiedImageError

from spatialvae import data as D
from spatialvae.config import DataConfig
from spatialvae.data import (
    ChestXRayDataset,
    FileEntry,
    UnreadableImageWarning,
    decode_grayscale,
    make_dataloader,
    make_datasets,
    patient_id,
    plan_splits,
    preprocess,
    resolve_data_root,
    split_by_patient,
)
from spatialvae.errors import DatasetError


def _counts(ds: ChestXRayDataset) -> dict:
    return ds.class_counts()


def _quiet(fn, *a, **k):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnreadableImageWarning)
        return fn(*a, **k)


# ---- finding the dataset ---------------------------------------------------------------------

@pytest.mark.parametrize("which", ["input", "dataset", "root"])
def test_root_found_from_chest_xray_folder_dataset_folder_or_parent(kaggle_tree, which):
    assert resolve_data_root(kaggle_tree[which]) == kaggle_tree["root"].resolve()


def test_root_from_environment_variable(kaggle_tree, monkeypatch):
    monkeypatch.setenv("SPATIALVAE_DATA", str(kaggle_tree["dataset"]))
    assert resolve_data_root() == kaggle_tree["root"].resolve()


def test_missing_dataset_says_where_it_looked_and_how_to_fix(tmp_path, monkeypatch):
    monkeypatch.delenv("SPATIALVAE_DATA", raising=False)
    with pytest.raises(DatasetError) as e:
        resolve_data_root()
    msg = str(e.value)
    assert "/kaggle/input/chest-xray-pneumonia/chest_xray" in msg
    assert "--data" in msg and "SPATIALVAE_DATA" in msg and "Add Input" in msg
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="empty"):
        resolve_data_root(tmp_path / "empty")


def test_nested_duplicate_macosx_and_hidden_files_are_never_counted(kaggle_tree):
    plan = plan_splits(kaggle_tree["input"], val_split="kaggle")
    assert plan.on_disk == kaggle_tree["counts_on_disk"]
    every = [e.path for files in plan.files.values() for e in files]
    assert len(every) == len(set(every)) == 31
    assert not any("__MACOSX" in p or "/chest_xray/chest_xray/" in p or Path(p).name.startswith(".")
                   for p in every)


# ---- decoding and preprocessing --------------------------------------------------------------

def test_exact_counts_and_unreadable_files_are_skipped_with_one_warning(kaggle_tree):
    plan = plan_splits(kaggle_tree["root"], val_split="kaggle")
    got = {}
    skipped = []
    for split in ("train", "val", "test"):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ds = ChestXRayDataset(split, DataConfig(image_size=32), plan, progress=False)
        ours = [w for w in caught if issubclass(w.category, UnreadableImageWarning)]
        assert len(ours) == (1 if ds.skipped else 0)
        for p in ds.skipped:
            assert Path(p).name in str(ours[0].message)
        got[split] = _counts(ds)
        skipped += ds.skipped
    assert got == kaggle_tree["readable"]
    assert sorted(skipped) == kaggle_tree["unreadable"]


@pytest.mark.parametrize("kind", ["16bit", "rgba", "cmyk", "rgb", "palette"])
def test_unusual_formats_decode_to_8bit_grayscale(tmp_path, kind):
    base = np.tile(np.linspace(0, 1, 50), (40, 1))
    path = tmp_path / f"x-{kind}.jpeg"
    if kind == "16bit":
        Image.fromarray((base * 4095).astype(np.uint16)).save(path, format="PNG")  # 12-bit data in 16-bit PNG
    else:
        im = Image.fromarray((base * 255).astype(np.uint8))
        conv = {"rgba": "RGBA", "cmyk": "CMYK", "rgb": "RGB", "palette": "P"}[kind]
        im.convert(conv).save(path, format="JPEG" if conv in ("CMYK", "RGB") else "PNG")
    gray, size, mode = decode_grayscale(str(path))
    assert gray.dtype == np.uint8 and gray.shape == (40, 50) and size == (50, 40)
    # The full range survives (16-bit is stretched, not clipped at 255), left dark, right bright.
    assert gray[:, :3].mean() < 20 and gray[:, -3:].mean() > 235


def _half_a_jpeg() -> bytes:
    import io
    buf = io.BytesIO()
    Image.fromarray(np.tile(np.arange(200, dtype=np.uint8), (160, 1))).save(buf, format="JPEG", quality=90)
    return buf.getvalue()[: len(buf.getvalue()) // 2]


# What Pillow raises, passed through unchanged (decode_grayscale promises OSError / ValueError and
# `_unreadable_reason` relies on UnidentifiedImageError for "not an image"). The exact class is
# checked: an UnidentifiedImageError is an OSError, so `raises(OSError)` alone could not tell them apart.
@pytest.mark.parametrize("content,error,match", [
    (b"", UnidentifiedImageError, "cannot identify image file"),  # zero bytes: no format recognises it
    (b"not an image", UnidentifiedImageError, "cannot identify image file"),
    (b"\xff\xd8\xff\xe0\x00\x10JFIF\x00", OSError, "Truncated File Read"),  # a JPEG header cut inside APP0
    (_half_a_jpeg(), OSError, "image file is truncated"),  # opens fine, fails in load()
], ids=["empty", "text", "jpeg-header-only", "half-a-jpeg"])
@pytest.mark.parametrize("min_side", [0, 64])
def test_broken_files_raise_in_decode(tmp_path, content, error, match, min_side):
    p = tmp_path / "bad.jpeg"
    p.write_bytes(content)
    with pytest.raises(OSError, match=match) as e:
        decode_grayscale(str(p), min_side=min_side)
    assert e.type is error, f"{e.type.__name__}: {e.value}"


def test_jpeg_reduced_decode_keeps_requested_side(tmp_path):
    p = tmp_path / "big.jpeg"
    Image.fromarray(np.full((1200, 1500), 128, np.uint8)).save(p, format="JPEG")
    gray, size, _ = decode_grayscale(str(p), min_side=256)
    assert size == (1500, 1200)
    assert gray.shape == (300, 375)  # 1/4 scale: the largest reduction keeping both sides >= 256


def test_dataset_items_are_float_in_unit_range_with_shape_1hw(kaggle_tree):
    ds = _quiet(ChestXRayDataset, "train", DataConfig(root=str(kaggle_tree["root"]), image_size=48), progress=False)
    x, y = ds[0]
    assert x.shape == (1, 48, 48) and x.dtype == torch.float32
    stacked = torch.stack([ds[i][0] for i in range(len(ds))])
    assert 0.0 <= float(stacked.min()) and float(stacked.max()) <= 1.0
    assert float(stacked.max()) > 0.9  # CLAHE + [0, 1]: the range is actually used
    assert {ds[i][1] for i in range(len(ds))} == {0, 1}


def _local_contrast(img: np.ndarray, tile: int = 8) -> float:
    h, w = img.shape
    blocks = img[: h // tile * tile, : w // tile * tile].reshape(h // tile, tile, w // tile, tile)
    return float(blocks.astype(np.float64).std(axis=(1, 3)).mean())


def test_clahe_raises_local_contrast_of_a_low_contrast_image():
    yy, xx = np.mgrid[0:256, 0:256]
    pattern = np.sin(xx / 9.0) * np.cos(yy / 13.0)  # ribs-like local structure
    low = np.round(125 + 5 * pattern).astype(np.uint8)  # values 120..130 only
    out = preprocess(low, 128, clahe_clip=2.0, clahe_tiles=8)
    plain = preprocess(low, 128, clahe=False)  # the same resize without CLAHE
    assert out.shape == (128, 128) and out.dtype == np.uint8
    assert _local_contrast(out) > 2 * _local_contrast(plain)
    assert out.std() > 2 * plain.std()


# ---- patients and validation split -------------------------------------------------------------

@pytest.mark.parametrize("name,pid", [
    ("person1000_bacteria_2931.jpeg", "person1000"),
    ("person1_virus_6.jpeg", "person1"),
    ("person1630_virus_2826_1.jpeg", "person1630"),
    ("IM-0115-0001.jpeg", "IM-0115"),
    ("IM-0429-0001-0002.jpeg", "IM-0429"),
    ("NORMAL2-IM-0588-0001.jpeg", "NORMAL2-IM-0588"),
    ("scan_42.png", "NORMAL/scan_42"),
])
def test_patient_id_from_file_name(name, pid):
    assert patient_id(name, "NORMAL") == pid


def _synthetic_entries(n_patients: int = 200) -> list[FileEntry]:
    rng = np.random.default_rng(1)
    entries = []
    for p in range(n_patients):
        label = int(p % 3 != 0)
        for k in range(int(rng.integers(1, 4))):
            entries.append(FileEntry(f"/x/person{p}_bacteria_{k}.jpeg", label, f"person{p}"))
    return entries


def test_patient_split_has_no_overlap_keeps_classes_and_is_seeded():
    entries = _synthetic_entries()
    train, val = split_by_patient(entries, 0.1, seed=0)
    assert len(train) + len(val) == len(entries)
    assert not {e.patient for e in train} & {e.patient for e in val}
    for label in (0, 1):
        n = sum(e.label == label for e in entries)
        n_val = sum(e.label == label for e in val)
        assert abs(n_val - 0.1 * n) <= 3  # whole patients of up to 3 images each
    again = split_by_patient(entries, 0.1, seed=0)[1]
    other = split_by_patient(entries, 0.1, seed=1)[1]
    assert [e.path for e in again] == [e.path for e in val]
    assert [e.path for e in other] != [e.path for e in val]


def test_auto_uses_patient_split_when_kaggle_val_is_tiny(kaggle_tree):
    plan = plan_splits(kaggle_tree["root"])  # val/ has 4 files < 100
    assert plan.val_method == "patient" and "4 images" in plan.val_reason
    tr, va = plan.files["train"], plan.files["val"]
    assert len(tr) + len(va) == 20 + 4  # train/ and val/ pooled, nothing lost
    assert not {e.patient for e in tr} & {e.patient for e in va}
    assert len(va) >= 2
    kaggle = plan_splits(kaggle_tree["root"], min_kaggle_val=4)
    assert kaggle.val_method == "kaggle" and len(kaggle.files["val"]) == 4


def test_kaggle_val_requested_without_val_folder_is_a_clear_error(kaggle_tree):
    import shutil
    shutil.rmtree(kaggle_tree["root"] / "val")
    with pytest.raises(DatasetError, match="val_split=patient"):
        plan_splits(kaggle_tree["root"], val_split="kaggle")


def test_max_per_class_is_a_seeded_balanced_subset(kaggle_tree):
    plan = plan_splits(kaggle_tree["root"], val_split="kaggle", max_per_class=3)
    for split in ("train", "val", "test"):
        labels = [e.label for e in plan.files[split]]
        assert labels.count(0) == min(3, kaggle_tree["counts_on_disk"][split]["NORMAL"])
        assert labels.count(1) == min(3, kaggle_tree["counts_on_disk"][split]["PNEUMONIA"])
    again = plan_splits(kaggle_tree["root"], val_split="kaggle", max_per_class=3)
    assert [e.path for e in again.files["train"]] == [e.path for e in plan.files["train"]]


# ---- augmentation ------------------------------------------------------------------------------

def test_flip_is_seeded_per_epoch_and_only_flips(kaggle_tree):
    plan = plan_splits(kaggle_tree["root"], val_split="kaggle")
    a = _quiet(ChestXRayDataset, "train", DataConfig(image_size=32), plan, seed=7, progress=False)
    b = _quiet(ChestXRayDataset, "train", DataConfig(image_size=32), plan, seed=7, progress=False)
    plain = _quiet(ChestXRayDataset, "train", DataConfig(image_size=32), plan, hflip=False, progress=False)
    for epoch in (0, 1):
        a.set_epoch(epoch)
        b.set_epoch(epoch)
        xa = torch.stack([a[i][0] for i in range(len(a))])
        xb = torch.stack([b[i][0] for i in range(len(b))])
        assert torch.equal(xa, xb)
        ref = torch.stack([plain[i][0] for i in range(len(plain))])
        flipped = [not torch.equal(xa[i], ref[i]) for i in range(len(a))]
        for i, f in enumerate(flipped):
            assert torch.equal(xa[i], ref[i].flip(-1) if f else ref[i])
        assert 0 < sum(flipped) < len(a)
    a.set_epoch(0)
    e0 = a._flip.clone()
    a.set_epoch(1)
    assert not torch.equal(e0, a._flip)
    val = _quiet(ChestXRayDataset, "val", DataConfig(image_size=32), plan, progress=False)
    assert not val.hflip and not val._flip.any()


def test_flip_rate_is_one_half():
    ds = ChestXRayDataset.__new__(ChestXRayDataset)
    ds.images, ds.hflip, ds.seed = torch.zeros(20000, 1, 1, dtype=torch.uint8), True, 0
    ds.set_epoch(3)
    assert abs(float(ds._flip.float().mean()) - 0.5) < 0.02


# ---- cache -----------------------------------------------------------------------------------

def test_second_load_comes_from_cache_without_decoding(kaggle_tree, monkeypatch, tmp_path):
    cache = tmp_path / "c"
    first = _quiet(ChestXRayDataset, "test", DataConfig(root=str(kaggle_tree["root"]), image_size=32, cache_dir=str(cache)), progress=False)
    assert not first.from_cache and len(list(cache.glob("*.npz"))) == 1
    monkeypatch.setattr(D, "_MEMO", {})
    monkeypatch.setattr(D, "process_file", lambda *_: pytest.fail("decoded although cached"))
    second = _quiet(ChestXRayDataset, "test", DataConfig(root=str(kaggle_tree["root"]), image_size=32, cache_dir=str(cache)), progress=False)
    assert second.from_cache
    assert torch.equal(first.images, second.images) and torch.equal(first.labels, second.labels)
    assert second.skipped == first.skipped == [str(kaggle_tree["root"] / "test" / "NORMAL" / "IM-0007-0001.jpeg")]


def test_cache_key_changes_with_parameters_and_files(kaggle_tree):
    files = plan_splits(kaggle_tree["root"]).files["test"]
    k = D.cache_key(files, 64, 2.0, 8)
    assert k == D.cache_key(files, 64, 2.0, 8)
    assert len({k, D.cache_key(files, 32, 2.0, 8), D.cache_key(files, 64, 3.0, 8), D.cache_key(files, 64, 2.0, 4),
                D.cache_key(files[1:], 64, 2.0, 8)}) == 5
    Path(files[0].path).write_bytes(Path(files[1].path).read_bytes())  # content (size) changed
    assert D.cache_key(files, 64, 2.0, 8) != k


def test_corrupt_cache_file_is_rebuilt(kaggle_tree, tmp_path, monkeypatch):
    cache = tmp_path / "c"
    cfg = DataConfig(root=str(kaggle_tree["root"]), image_size=32, val_split="kaggle", cache_dir=str(cache))
    _quiet(ChestXRayDataset, "val", cfg, progress=False)
    (npz,) = cache.glob("*.npz")
    npz.write_bytes(b"garbage")
    D.clear_memo()
    ds = _quiet(ChestXRayDataset, "val", cfg, progress=False)
    assert not ds.from_cache and len(ds) == 4
    assert np.load(npz, allow_pickle=False)["images"].shape == (4, 32, 32)


def test_one_time_pass_uses_a_process_pool(kaggle_tree, tmp_path):
    files = plan_splits(kaggle_tree["root"], val_split="kaggle").files["train"] * 4  # >= 64 jobs
    serial = D.load_split(files, 32, workers=1, use_cache=False, progress=False)
    pooled = D.load_split(files, 32, workers=2, use_cache=False, progress=False)
    assert np.array_equal(serial.images, pooled.images) and serial.skipped == pooled.skipped


# ---- loaders -------------------------------------------------------------------------------

def test_make_datasets_and_dataloader_batches(kaggle_tree):
    cfg = DataConfig(root=str(kaggle_tree["root"]), image_size=32, batch_size=4, val_split="kaggle")
    splits = _quiet(make_datasets, cfg, seed=0, progress=False)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (18, 4, 6)
    before = torch.get_rng_state()
    batches = list(make_dataloader(splits.train, cfg.batch_size, train=True))
    assert torch.equal(torch.get_rng_state(), before)  # a pass draws nothing from the global RNG (posterior noise)
    assert len(batches) == 18 // 4  # drop_last in training: every step sees a full batch
    x, y = batches[0]
    assert x.shape == (4, 1, 32, 32) and y.shape == (4,) and x.dtype == torch.float32
    loader = make_dataloader(splits.train, 4, train=True)
    again = [b[0] for b in loader]
    assert all(torch.equal(a, b[0]) for a, b in zip(again, batches))  # seeded shuffling
    other = torch.cat([b[0] for b in loader])
    assert not torch.equal(other, torch.cat([b[0] for b in batches]))  # and a new order on the next pass
    val_batches = list(make_dataloader(splits.val, 3, train=False))
    assert sum(len(b[1]) for b in val_batches) == 4


# ---- the real data ------------------------------------------------------------------------------

def test_real_data_counts_and_patient_split(real_data_root):
    plan = plan_splits(real_data_root)
    assert plan.on_disk["train"] == {"NORMAL": 1341, "PNEUMONIA": 3875}
    assert plan.on_disk["test"] == {"NORMAL": 234, "PNEUMONIA": 390}
    assert plan.val_method == "patient"
    tr, va = plan.files["train"], plan.files["val"]
    assert len(tr) + len(va) == 5216
    assert not {e.patient for e in tr} & {e.patient for e in va}
    assert 0.08 < len(va) / 5216 < 0.12


def test_real_data_subset_loads(real_data_root):
    cfg = DataConfig(root=str(real_data_root), image_size=64, max_per_class=24)
    splits = make_datasets(cfg, progress=False)
    for ds in (splits.train, splits.val, splits.test):
        assert ds.class_counts() == {"NORMAL": 24, "PNEUMONIA": 24} and ds.skipped == []
        x, _ = ds[0]
        assert x.shape == (1, 64, 64) and 0 <= float(x.min()) and float(x.max()) <= 1
    assert set(np.unique(splits.train.orig_sizes)) == {224}


def test_parallel_preprocessing_after_opencv_was_used_in_this_process_does_not_hang(tmp_path):
    """Regression: forking workers while OpenCV's thread pool was running hung them for ever
    (the bench command and a notebook's histogram cell both use cv2 before decoding)."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(f"""
        import numpy as np, cv2
        from PIL import Image
        from spatialvae import data as D
        entries = []
        for i in range(80):  # more than the 64 files below which decoding stays in-process
            p = "{tmp_path}/IM-%04d-0001.jpeg" % i
            Image.fromarray((np.random.default_rng(i).random((96, 96)) * 255).astype(np.uint8)).save(p)
            entries.append(D.FileEntry(p, 0, "IM-%04d" % i))
        threads = cv2.getNumThreads()
        for _ in range(3):
            cv2.resize(np.random.rand(1500, 1500).astype(np.float32), (1200, 1200))  # starts cv2's pool
        out = D.load_split(entries, 32, workers=2, use_cache=False, progress=False)
        assert cv2.getNumThreads() == threads  # the caller's OpenCV setting is given back
        print("decoded", len(out.images))
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "decoded 80"
