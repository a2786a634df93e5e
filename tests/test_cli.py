from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import warnings
from collections import Counter
from pathlib import Path

import pytest

from spatialvae.cli import main
from spatialvae.config import DataConfig
from spatialvae.data import make_datasets, plan_splits

REPO = Path(__file__).resolve().parents[1]


def _run(*args: str, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "spatialvae", *args], capture_output=True, text=True,
                          cwd=REPO, env=env, timeout=300)


def test_data_json_reports_exact_counts_and_unreadable_files(kaggle_tree, tmp_path):
    r = _run("data", "--data", str(kaggle_tree["input"]), "--json", "--image-size", "32",
             "--val-split", "kaggle", "--cache-dir", str(tmp_path / "c"))
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["counts"] == kaggle_tree["readable"]
    assert report["on_disk"] == kaggle_tree["counts_on_disk"]
    assert sorted(report["skipped"]) == kaggle_tree["unreadable"]
    assert set(report["skip_reasons"]) == set(report["skipped"])
    assert report["val_split"]["method"] == "kaggle"
    assert report["image_sizes"]["train"]["width"]["max"] == 400
    assert report["image_sizes"]["train"]["modes"]["RGBA"] == 1
    assert "Traceback" not in r.stderr


# Kaggle file names -> patient, written out here rather than taken from spatialvae.data.patient_id,
# so a wrong id there cannot hide a leak: personN_{bacteria,virus}_M, IM-XXXX-YYYY(-ZZZZ), NORMAL2-IM-XXXX-YYYY.
_KAGGLE_PATIENT = re.compile(r"^(?:(person\d+)_(?:bacteria|virus)_\d+|((?:NORMAL2-)?IM-\d{4})(?:-\d{4})+)\.jpeg$")


def _patient(path: str) -> str:
    m = _KAGGLE_PATIENT.match(Path(path).name)
    assert m, f"not a Kaggle file name: {path}"
    return m.group(1) or m.group(2)


def test_data_default_is_patient_split_with_no_shared_patients(kaggle_tree, tmp_path, capsys):
    code = main(["data", "--data", str(kaggle_tree["root"]), "--json", "--image-size", "32",
                 "--cache-dir", str(tmp_path / "c")])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["val_split"]["method"] == "patient" and "val/ has 4 images (< 100)" in report["val_split"]["reason"]
    # train/ and val/ are pooled and re-split by patient (nothing lost, nothing doubled); test/ is untouched.
    readable, counts = kaggle_tree["readable"], report["counts"]
    for cls in ("NORMAL", "PNEUMONIA"):
        assert counts["train"][cls] + counts["val"][cls] == readable["train"][cls] + readable["val"][cls]
    # Exactly: 10% of 10 NORMAL / 14 PNEUMONIA files is one whole patient per class (split_seed 0).
    assert counts == {"train": {"NORMAL": 9, "PNEUMONIA": 11}, "val": {"NORMAL": 1, "PNEUMONIA": 1},
                      "test": readable["test"]}
    # Readable patients: NORMAL 9 (IM-0429 has two images), PNEUMONIA 10 (person1 and person5 have two;
    # person9 and person10 are unreadable), test 6. With no patient on two sides train + val is all 19.
    p = report["patients"]
    assert p["train"] + p["val"] == 19 and p["test"] == 6 and p["val"] >= 2
    assert p["train_val_shared"] == 0 and p["train_test_shared"] == 0

    # The same check from the file names of the split the command built (make_datasets, as `data` does).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        splits = make_datasets(DataConfig(root=str(kaggle_tree["root"]), image_size=32,
                                          cache_dir=str(tmp_path / "c")), progress=False)
    ids = {s: [_patient(path) for path in getattr(splits, s).paths] for s in ("train", "val", "test")}
    assert {s: len(set(v)) for s, v in ids.items()} == {s: p[s] for s in ("train", "val", "test")}
    assert not set(ids["train"]) & set(ids["val"]) and not set(ids["train"]) & set(ids["test"])
    pooled = Counter(ids["train"] + ids["val"])
    multi = {pid for pid, n in pooled.items() if n > 1}
    assert multi == {"IM-0429", "person1", "person5"}  # patients a per-image split could cut in two

    # Those patients do move to val under other split seeds and a bigger share, and stay whole there.
    moved = set()
    for seed in range(5):
        plan = plan_splits(kaggle_tree["root"], val_split="patient", val_fraction=0.5, split_seed=seed)
        tr, va = ({_patient(e.path) for e in plan.files[s]} for s in ("train", "val"))
        assert not tr & va, (seed, tr & va)
        assert tr | va == set(pooled) | {"person9", "person10"}  # every patient kept, unreadable ones too
        moved |= multi & va
    assert moved == multi


def test_data_table_names_split_and_skipped(kaggle_tree, tmp_path, capsys):
    assert main(["data", "--data", str(kaggle_tree["dataset"]), "--image-size", "32",
                 "--cache-dir", str(tmp_path / "c")]) == 0
    out = capsys.readouterr().out
    assert "validation  patient" in out and "shared by train and val: 0" in out
    assert "skipped 3 unreadable file(s)" in out and "person9_bacteria_11.jpeg" in out


@pytest.mark.parametrize("args", [["data", "--data", "/definitely/not/here"], ["data"]])
def test_missing_dataset_exits_nonzero_with_one_clear_line(args, tmp_path):
    r = _run(*args, env_extra={"SPATIALVAE_DATA": ""})
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: chest X-ray dataset not found")
    assert "--data" in lines[0]


def test_bad_config_value_exits_nonzero(kaggle_tree, capsys):
    assert main(["data", "--data", str(kaggle_tree["root"]), "--image-size", "30"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: data.image_size=30 is invalid")


@pytest.mark.parametrize("bad", ["data.image_size=48", "model.attention_resolutions=7"])
def test_an_impossible_model_fails_before_any_data_is_decoded(kaggle_tree, tmp_path, monkeypatch, capsys, bad):
    monkeypatch.setenv("SPATIALVAE_CACHE", str(tmp_path / "cache"))
    code = main(["train", "--preset", "smoke", "--data", str(kaggle_tree["root"]), "--out", str(tmp_path / "runs"),
                 "--set", bad, "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and bad.split("=")[0] in err
    assert not (tmp_path / "cache").exists() and not (tmp_path / "runs").exists()  # nothing decoded, nothing made
