"""Shared fixtures: a tiny Kaggle-shaped tree with every quirk of the real archive."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def _xray_like(w: int, h: int, seed: int) -> np.ndarray:
    """A smooth grayscale image with structure (two dark 'lungs'), deterministic per seed."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / np.array([h, w]).reshape(2, 1, 1)
    img = 180 - 90 * np.exp(-(((xx - 0.3) / 0.12) ** 2 + ((yy - 0.5) / 0.25) ** 2))
    img -= 90 * np.exp(-(((xx - 0.7) / 0.12) ** 2 + ((yy - 0.5) / 0.25) ** 2))
    img += rng.normal(0, 6, size=img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def save_jpeg(path: Path, w: int = 96, h: int = 80, seed: int = 0, mode: str = "L") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(_xray_like(w, h, seed))
    if mode != "L":
        im = im.convert(mode)
    im.save(path, format="JPEG", quality=90)


# name -> (class, expected readable?) for the main copy of the tree
TRAIN_NORMAL = ["IM-0115-0001.jpeg", "IM-0117-0001.jpeg", "IM-0119-0001.jpeg", "IM-0429-0001-0001.jpeg",
                "IM-0429-0001-0002.jpeg", "NORMAL2-IM-0588-0001.jpeg", "NORMAL2-IM-0590-0001.jpeg",
                "IM-0120-0001.jpeg"]
TRAIN_PNEUMONIA = ["person1_bacteria_1.jpeg", "person1_bacteria_2.jpeg", "person2_virus_3.jpeg",
                   "person3_bacteria_4.jpeg", "person4_virus_5.jpeg", "person5_bacteria_6.jpeg",
                   "person5_virus_7.jpeg", "person6_bacteria_8.jpeg", "person7_virus_9.jpeg",
                   "person8_bacteria_10.jpeg"]


@pytest.fixture
def kaggle_tree(tmp_path: Path) -> dict:
    return make_kaggle_tree(tmp_path)


def make_kaggle_tree(tmp_path: Path) -> dict:
    """``tmp/input/chest-xray-pneumonia/chest_xray/...`` laid out like the Kaggle archive.

    Readable: train 8 NORMAL (incl. 16-bit PNG, RGBA PNG, CMYK JPEG, an RGB JPEG, a 400x300 and a
    tall image) + 10 PNEUMONIA; val 2 + 2; test 3 + 3. Unreadable (named .jpeg): a zero-byte
    file, a truncated JPEG, a text file. Noise: nested chest_xray/chest_xray duplicate,
    __MACOSX AppleDouble files, .DS_Store files.
    """
    dataset = tmp_path / "input" / "chest-xray-pneumonia"
    root = dataset / "chest_xray"
    seed = 0
    for split, normal, pneu in (("train", TRAIN_NORMAL, TRAIN_PNEUMONIA),
                                ("val", ["NORMAL2-IM-1427-0001.jpeg", "NORMAL2-IM-1430-0001.jpeg"],
                                 ["person1946_bacteria_4874.jpeg", "person1952_bacteria_4883.jpeg"]),
                                ("test", ["IM-0001-0001.jpeg", "IM-0003-0001.jpeg", "IM-0005-0001.jpeg"],
                                 ["person100_bacteria_475.jpeg", "person101_bacteria_484.jpeg",
                                  "person102_virus_485.jpeg"])):
        for cls, names in (("NORMAL", normal), ("PNEUMONIA", pneu)):
            for name in names:
                seed += 1
                save_jpeg(root / split / cls / name, w=96 + seed % 7 * 8, h=80 + seed % 5 * 8, seed=seed)
    tn = root / "train" / "NORMAL"
    # Odd but valid formats (replace three of the plain JPEGs' content).
    Image.fromarray((_xray_like(120, 90, 100).astype(np.uint16) * 16)).save(tn / "IM-0115-0001.jpeg", format="PNG")
    rgba = Image.fromarray(_xray_like(90, 90, 101)).convert("RGBA")
    rgba.save(tn / "IM-0117-0001.jpeg", format="PNG")
    Image.fromarray(_xray_like(64, 64, 102)).convert("CMYK").save(tn / "IM-0119-0001.jpeg", format="JPEG")
    save_jpeg(tn / "IM-0120-0001.jpeg", w=400, h=300, seed=103, mode="RGB")
    save_jpeg(tn / "NORMAL2-IM-0590-0001.jpeg", w=60, h=140, seed=104)
    # Unreadable files named like images.
    tp = root / "train" / "PNEUMONIA"
    (tp / "person9_bacteria_11.jpeg").write_bytes(b"")
    buf = io.BytesIO()
    Image.fromarray(_xray_like(200, 160, 105)).save(buf, format="JPEG", quality=90)
    (tp / "person10_bacteria_12.jpeg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (root / "test" / "NORMAL" / "IM-0007-0001.jpeg").write_text("this is not an image\n")
    # Noise the archive carries.
    for d in (tn, tp, root, root / "train"):
        (d / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    mac = dataset / "__MACOSX" / "chest_xray" / "train" / "NORMAL"
    mac.mkdir(parents=True)
    (mac / "._IM-0115-0001.jpeg").write_bytes(b"\x00\x05\x16\x07junk")
    (tn / "._IM-0119-0001.jpeg").write_bytes(b"\x00\x05\x16\x07junk")
    nested = root / "chest_xray"
    for split in ("train", "test", "val"):
        for cls in ("NORMAL", "PNEUMONIA"):
            src = root / split / cls
            dst = nested / split / cls
            dst.mkdir(parents=True)
            for p in sorted(src.iterdir())[:2]:
                dst.joinpath(p.name).write_bytes(p.read_bytes())
    return {
        "input": tmp_path / "input",
        "dataset": dataset,
        "root": root,
        "counts_on_disk": {"train": {"NORMAL": 8, "PNEUMONIA": 12}, "val": {"NORMAL": 2, "PNEUMONIA": 2},
                           "test": {"NORMAL": 4, "PNEUMONIA": 3}},
        "readable": {"train": {"NORMAL": 8, "PNEUMONIA": 10}, "val": {"NORMAL": 2, "PNEUMONIA": 2},
                     "test": {"NORMAL": 3, "PNEUMONIA": 3}},
        "unreadable": sorted([str(tp / "person9_bacteria_11.jpeg"), str(tp / "person10_bacteria_12.jpeg"),
                              str(root / "test" / "NORMAL" / "IM-0007-0001.jpeg")]),
    }


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Each test gets its own preprocessing cache, an empty in-process memo and no cache folder
    remembered as unwritable."""
    from spatialvae import data

    monkeypatch.setenv("SPATIALVAE_CACHE", str(tmp_path_factory.mktemp("cache")))
    monkeypatch.setattr(data, "_MEMO", {})
    monkeypatch.setattr(data, "_UNWRITABLE", set())


@pytest.fixture
def offline(tmp_path, monkeypatch) -> list:
    """An empty torch hub and downloads that fail at once (no test ever downloads weights);
    returns the list of URLs that were attempted."""
    import urllib.error

    import torch

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    attempts: list = []

    def refuse(url, *args, **kwargs):
        attempts.append(url if isinstance(url, str) else getattr(url, "full_url", str(url)))
        raise urllib.error.URLError("downloads are blocked in tests")

    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    monkeypatch.setattr("urllib.request.urlopen", refuse)
    return attempts


@pytest.fixture(scope="session")
def real_data_root() -> Path:
    root = os.environ.get("SPATIALVAE_DATA")
    if not root:
        pytest.skip("SPATIALVAE_DATA is not set: point it at the chest_xray folder to run real-data tests")
    return Path(root)


@pytest.fixture(scope="session")
def fake_smoke_run(tmp_path_factory) -> tuple[Path, dict]:
    """`train --preset smoke` on the tiny Kaggle-shaped tree, once per session: both phases, then the
    learned prior -> (run folder, the tree). Tests that write into a run folder take a `copy_run`."""
    import warnings

    from spatialvae.cli import main

    tmp = tmp_path_factory.mktemp("fake_smoke")
    tree = make_kaggle_tree(tmp)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tree's unreadable files
        code = main(["train", "--preset", "smoke", "--data", str(tree["root"]), "--out", str(tmp / "runs"),
                     "--set", "data.preprocess_workers=1", "--set", f"data.cache_dir={tmp / 'cache'}", "--quiet"])
    assert code == 0
    return tmp / "runs" / "000-smoke", tree


@pytest.fixture(scope="session")
def real_smoke_run(real_data_root, tmp_path_factory) -> Path:
    """`train --preset smoke` on the real data, once per session: both phases and the learned prior,
    perceptual term off. Tests that write into a run folder take a `copy_run` of it."""
    tmp = tmp_path_factory.mktemp("real_smoke")
    env = {**os.environ, "SPATIALVAE_CACHE": str(tmp / "cache")}
    r = subprocess.run([sys.executable, "-m", "spatialvae", "train", "--preset", "smoke", "--data", str(real_data_root),
                        "--out", str(tmp / "runs"), "--set", "loss.perceptual_weight=0", "--quiet"],
                       capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1], env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    return tmp / "runs" / "000-smoke"


def copy_run(run: Path, dest: Path) -> Path:
    """A copy of a run folder under ``dest`` (same folder name)."""
    return Path(shutil.copytree(run, dest / run.name))


def run_cli(capsys, *args) -> tuple[int, str, str]:
    """The CLI in this process (no interpreter start-up) -> (exit code, stdout, stderr)."""
    import warnings

    from spatialvae.cli import main

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the fake tree's unreadable files
        code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err
