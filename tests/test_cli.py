from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from spatialvae.cli import main

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


def test_data_default_is_patient_split_with_no_shared_patients(kaggle_tree, tmp_path):
    code = main(["data", "--data", str(kaggle_tree["root"]), "--json", "--image-size", "32",
                 "--cache-dir", str(tmp_path / "c")])
    assert code == 0


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
