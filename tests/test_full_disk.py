"""A full disk: every writer says so in one line (the file, what was kept, the fix), exits non-zero
with no traceback, and leaves no half-written file or stray temp file; a preprocessing cache that
does not fit is one warning, and training goes on. After a checkpoint the disk had no room for,
`train --resume` ends bit-identical to a run that never stopped.

The disk fills the way a real one does, without a mount: `full_disk` hands the atomic writer a file
descriptor on /dev/full for the files it names, so the kernel itself answers ENOSPC, through
Python's buffered file and torch's serializer alike, while the writer's real temp file stays for
it to clean up.
"""

from __future__ import annotations

import errno
import fnmatch
import os
import re
import subprocess
import sys
import tempfile
import warnings
from collections import Counter
from pathlib import Path

import pytest
import torch
from conftest import copy_run, run_cli

from spatialvae import runs
from spatialvae.cli import main
from spatialvae.errors import DiskFullError, SpatialVAEError, on_disk_full, write_error
from spatialvae.runs import atomic_torch_save, atomic_write_bytes, load_checkpoint, read_history_csv

pytestmark = pytest.mark.skipif(not os.path.exists("/dev/full"), reason="fills the disk through /dev/full")

REPO = Path(__file__).resolve().parents[1]
ENOSPC = "OSError: [Errno 28] No space left on device"


class FullDisk:
    """``fill(pattern, at=n)``: from the n-th atomic write of a file whose name matches on, the disk
    is full for it. ``temps``: the temp files handed out to writes that failed."""

    def __init__(self, monkeypatch):
        self.rules: dict[str, int] = {}
        self.seen: Counter = Counter()
        self.temps: list[str] = []
        real = tempfile.mkstemp

        def mkstemp(*args, **kwargs):
            fd, tmp = real(*args, **kwargs)
            name = (kwargs.get("prefix") or ".")[1:-1]  # atomic_write's prefix: ".<name>."
            for pattern, at in self.rules.items():
                if fnmatch.fnmatch(name, pattern):
                    self.seen[pattern] += 1
                    if self.seen[pattern] >= at:
                        os.close(fd)
                        fd = os.open("/dev/full", os.O_WRONLY)
                        self.temps.append(tmp)
            return fd, tmp

        monkeypatch.setattr(tempfile, "mkstemp", mkstemp)

    def fill(self, pattern: str, at: int = 1) -> "FullDisk":
        self.rules[pattern] = at
        return self

    def no_temp_left(self) -> bool:
        return bool(self.temps) and not any(os.path.exists(t) for t in self.temps)


@pytest.fixture
def full_disk(monkeypatch) -> FullDisk:
    return FullDisk(monkeypatch)


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err and len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def _stray_temps(folder: Path) -> list[str]:
    return [str(p) for p in folder.rglob("*.tmp")]


def _smoke_train(root, out, *extra) -> list:
    """The arguments `fake_smoke_run` was trained with, into ``out``."""
    return ["train", "--preset", "smoke", "--data", root, "--out", out, "--set", "data.preprocess_workers=1",
            "--set", f"data.cache_dir={out / 'cache'}", "--quiet", *extra]


# ---- the central helper and the atomic writer ----------------------------------------------------

@pytest.mark.parametrize("code,said", [(errno.ENOSPC, "the disk is full"), (errno.EDQUOT, "the disk quota is exceeded"),
                                       (errno.EIO, "the disk reported an I/O error")])
def test_full_disk_quota_and_io_errors_are_one_line_naming_the_file_what_was_kept_and_the_fix(code, said):
    e = write_error("runs/x/last.pt", OSError(code, os.strerror(code)))
    assert isinstance(e, DiskFullError)
    assert str(e) == (f"cannot write runs/x/last.pt: {said} (OSError: [Errno {code}] {os.strerror(code)}); "
                      "runs/x/last.pt is as it was before this write (files are replaced whole or not at all); "
                      "free space (or raise the quota), then run the command again")
    with pytest.raises(DiskFullError) as caught, on_disk_full("kept: outer", "fix: outer"):
        with on_disk_full("kept: inner", "fix: inner"):
            raise e
    assert str(caught.value).endswith("; kept: inner; fix: inner")  # the innermost knows its write best
    other = write_error("x.pt", PermissionError(errno.EACCES, "Permission denied"))
    assert not isinstance(other, DiskFullError) and "pass a path in a folder you can write to" in str(other)


def test_torch_save_on_a_full_disk_keeps_the_old_file_and_leaves_no_temp(tmp_path, full_disk):
    path = tmp_path / "last.pt"
    atomic_torch_save({"a": torch.ones(3)}, path)
    good = path.read_bytes()
    full_disk.fill("last.pt")
    # torch's serializer raises "RuntimeError: [enforce fail at inline_container.cc] . unexpected pos"
    # on top of the OSError: atomic_torch_save reports the OSError.
    with pytest.raises(DiskFullError, match=re.escape(f"cannot write {path}: the disk is full ({ENOSPC});")):
        atomic_torch_save({"a": torch.zeros(10_000)}, path)
    assert path.read_bytes() == good and full_disk.no_temp_left()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


# ---- training: checkpoints, config.json, history.csv, sample grids, train.log --------------------

def test_a_checkpoint_that_fills_the_disk_is_one_line_and_resume_ends_bit_identical(fake_smoke_run, tmp_path,
                                                                                  full_disk, capsys):
    whole, tree = fake_smoke_run
    out = tmp_path / "runs"
    full_disk.fill("last.pt", at=3)  # the third checkpoint, as on the 1.4 MB tmpfs
    code, _, err = run_cli(capsys, *_smoke_train(tree["root"], out))
    run = out / "000-smoke"
    assert code == 2 and _one_error_line(err) == (
        f"error: cannot write {run}/checkpoints/last.pt: the disk is full ({ENOSPC}); the last good checkpoint "
        f"is epoch 2 ({run}/checkpoints/last.pt); free space, then `python -m spatialvae train --resume {run}`")
    assert load_checkpoint(run / "checkpoints" / "last.pt")["epoch"] == 2
    assert full_disk.no_temp_left() and not _stray_temps(out)
    assert not (run / "checkpoints" / "prior.pt").exists()  # the run stopped at the failed write

    full_disk.rules.clear()  # space freed
    code, _, err = run_cli(capsys, "train", "--resume", run, "--quiet")
    assert code == 0, err
    for name in ("last.pt", "best.pt"):
        a, b = load_checkpoint(whole / "checkpoints" / name), load_checkpoint(run / "checkpoints" / name)
        assert a["epoch"] == b["epoch"] == 3
        assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    a, b = load_checkpoint(whole / "checkpoints" / "last.pt"), load_checkpoint(run / "checkpoints" / "last.pt")
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert all(torch.equal(sa[i]["exp_avg"], sb[i]["exp_avg"]) for i in sa)
    pa, pb = (torch.load(r / "checkpoints" / "prior.pt", weights_only=True) for r in (whole, run))
    assert all(torch.equal(pa["net"][k], pb["net"][k]) for k in pa["net"])
    assert ([r["train_total"] for r in read_history_csv(whole / "history.csv")]
            == [r["train_total"] for r in read_history_csv(run / "history.csv")])


@pytest.mark.parametrize("name,at,kept", [
    ("config.json", 1, "no checkpoint was written yet; free space, then start the run again"),
    ("history.csv", 2, "the last good checkpoint is epoch 1"),
    ("epoch_002.png", 1, "the last good checkpoint is epoch 1"),
    ("best.pt", 1, "no checkpoint was written yet"),
])
def test_every_training_file_on_a_full_disk_is_one_line(kaggle_tree, tmp_path, full_disk, capsys, name, at, kept):
    out = tmp_path / "runs"
    full_disk.fill(name, at=at)
    code, _, err = run_cli(capsys, *_smoke_train(kaggle_tree["root"], out, "--set", "prior.enabled=false"))
    line = _one_error_line(err)
    assert code == 2 and f"cannot write {out / '000-smoke'}" in line and f"{name}: the disk is full ({ENOSPC}); " in line
    assert kept in line and full_disk.no_temp_left() and not _stray_temps(out)


def test_train_log_on_a_full_disk_is_one_line_not_logging_s_traceback(kaggle_tree, tmp_path, monkeypatch, capsys):
    class FillsAfter:
        """train.log's stream: ``room`` lines fit, the next write finds the disk full."""

        def __init__(self, real, room: int):
            self.real, self.room = real, room

        def write(self, text: str) -> int:
            if self.room == 0:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            self.room -= 1
            return self.real.write(text)

        def flush(self):
            self.real.flush()

        def close(self):
            self.real.close()

    real_open = runs._LogFile._open
    monkeypatch.setattr(runs._LogFile, "_open", lambda self: FillsAfter(real_open(self), room=3))
    out = tmp_path / "runs"
    code, stdout, err = run_cli(capsys, *_smoke_train(kaggle_tree["root"], out, "--set", "prior.enabled=false"))
    run = out / "000-smoke"
    assert code == 2 and _one_error_line(err) == (
        f"error: cannot write {run}/train.log: the disk is full ({ENOSPC}); the last good checkpoint is epoch 2 "
        f"({run}/checkpoints/last.pt); free space, then `python -m spatialvae train --resume {run}`")
    assert "epoch   3/3" in stdout and (run / "train.log").read_text().count("\n") == 3  # run line, epochs 1-2
    assert load_checkpoint(run / "checkpoints" / "last.pt")["epoch"] == 2


# ---- the preprocessing cache: a warning, and training goes on --------------------------------------

def test_a_cache_that_does_not_fit_is_one_warning_and_training_goes_on(kaggle_tree, tmp_path, full_disk, capsys):
    from spatialvae.cli import _one_line_warnings

    out = tmp_path / "runs"
    full_disk.fill("*.npz")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code = main([str(a) for a in _smoke_train(kaggle_tree["root"], out, "--set", "prior.enabled=false")])
    err = capsys.readouterr().err
    assert code == 0 and "Traceback" not in err and "error:" not in err, err
    warned = [str(w.message) for w in caught if "preprocessing cache" in str(w.message)]
    assert len(warned) == 1 and warned[0].startswith(f"could not write the preprocessing cache {out / 'cache'}")
    assert f"(the disk is full ({ENOSPC})); this run goes on from memory" in warned[0]
    assert not list((out / "cache").glob("*")) and full_disk.no_temp_left()  # no cache file, no temp file
    assert load_checkpoint(out / "000-smoke" / "checkpoints" / "last.pt")["epoch"] == 3
    with _one_line_warnings():  # how the command line prints it
        assert warnings.formatwarning(warned[0], UserWarning, "data.py", 1) == f"warning: {warned[0]}\n"


# ---- after training: prior.pt, metrics.json, eval_images.pt, grids, features, sample, bench ---------

def test_prior_pt_on_a_full_disk_is_one_line(fake_smoke_run, tmp_path, full_disk, capsys):
    run = copy_run(fake_smoke_run[0], tmp_path)
    before = (run / "checkpoints" / "prior.pt").read_bytes()
    full_disk.fill("prior.pt")
    code, _, err = run_cli(capsys, "prior", "--run", run, "--force", "--quiet")
    assert code == 2 and _one_error_line(err) == (
        f"error: cannot write {run}/checkpoints/prior.pt: the disk is full ({ENOSPC}); {run}/checkpoints/best.pt "
        "and the rest of the run are kept, and prior.pt holds the prior's last save, if any; free space, then "
        f"`python -m spatialvae prior --run {run}` continues it")
    assert (run / "checkpoints" / "prior.pt").read_bytes() == before and full_disk.no_temp_left()


def test_the_texture_stage_s_sharp_pt_on_a_full_disk_is_one_line(fake_smoke_run, tmp_path, full_disk):
    from spatialvae.config import Config
    from spatialvae.texture_run import fit_run_texture

    run = copy_run(fake_smoke_run[0], tmp_path)
    cfg = Config.from_json(run / "config.json").with_overrides(
        {"texture.enabled": True, "texture.steps": 2, "texture.log_every": 2, "data.root": str(fake_smoke_run[1]["root"])})
    full_disk.fill("sharp.pt")
    with pytest.raises(DiskFullError) as caught:
        fit_run_texture(run, cfg, progress=False, log=lambda s: None)
    assert str(caught.value) == (
        f"cannot write {run}/checkpoints/sharp.pt: the disk is full ({ENOSPC}); {run}/checkpoints/best.pt and the "
        "rest of the run are kept, and texture.pt holds the stage's last save, if any; free space, then "
        f"`python -m spatialvae train --resume {run}` continues it")
    assert not (run / "checkpoints" / "sharp.pt").exists() and full_disk.no_temp_left() and not _stray_temps(run)


def test_metrics_json_on_a_full_disk_is_one_line(fake_smoke_run, tmp_path, full_disk, capsys):
    run = copy_run(fake_smoke_run[0], tmp_path)
    full_disk.fill("metrics.json")
    code, _, err = run_cli(capsys, "evaluate", "--run", run, "--data", fake_smoke_run[1]["root"], "--inception", "off",
                         "--tstr", "0", "--no-c2st", "--n", "8", "--quiet")
    assert code == 2 and _one_error_line(err) == (
        f"error: cannot write {run}/metrics.json: the disk is full ({ENOSPC}); the run's checkpoints are untouched "
        f"and {run}/metrics.json is as before; free space, then `python -m spatialvae evaluate --run {run}` again")
    assert not (run / "metrics.json").exists() and full_disk.no_temp_left() and not _stray_temps(run)


@pytest.mark.parametrize("name", ["eval_reconstructions.png", "eval_images.pt"])
def test_evaluation_pictures_on_a_full_disk_are_one_line(tmp_path, full_disk, name):
    from spatialvae.lab.evaluate import _write_results

    full_disk.fill(name)
    grids = {"samples/eval_reconstructions.png": torch.rand(1, 10, 10)}
    with pytest.raises(DiskFullError) as caught:
        _write_results(tmp_path, grids, {"reconstructions": torch.rand(2, 1, 4, 4)}, {"seconds": 1.0})
    assert str(caught.value) == (
        f"cannot write {tmp_path}/samples/{name}: the disk is full ({ENOSPC}); the run's checkpoints are untouched "
        f"and {tmp_path}/metrics.json is as before; free space, then `python -m spatialvae evaluate --run "
        f"{tmp_path}` again")
    assert not (tmp_path / "metrics.json").exists() and full_disk.no_temp_left() and not _stray_temps(tmp_path)


def test_the_features_file_on_a_full_disk_is_one_line(kaggle_tree, tmp_path, full_disk, capsys):
    out = tmp_path / "f.pt"
    full_disk.fill("f.pt")
    code, _, err = run_cli(capsys, "features", "--data", kaggle_tree["root"], "--out", out, "--image-size", "32",
                         "--epochs", "1", "--quiet")
    assert code == 2 and _one_error_line(err) == (
        f"error: cannot write {out}: the disk is full ({ENOSPC}); nothing was written to {out} (a file there before "
        "is as it was); free space (or pass --out on a disk with room), then run `python -m spatialvae features` "
        "again")
    assert not out.exists() and full_disk.no_temp_left() and not _stray_temps(tmp_path)


def test_a_sample_grid_on_a_full_disk_is_one_line(fake_smoke_run, tmp_path, full_disk, capsys):
    out = tmp_path / "s.png"
    full_disk.fill("s.png")
    code, _, err = run_cli(capsys, "sample", "--run", fake_smoke_run[0], "--n", "4", "--out", out)
    assert code == 2 and _one_error_line(err) == (
        f"error: cannot write {out}: the disk is full ({ENOSPC}); {out} is as it was before this write (files are "
        "replaced whole or not at all); free space (or raise the quota), then run the command again")
    assert not out.exists() and full_disk.no_temp_left()


def test_bench_output_on_a_full_disk_is_one_line_after_the_table(tmp_path, full_disk, monkeypatch, capsys):
    import spatialvae.lab.bench
    import spatialvae.lab.report

    monkeypatch.setattr(spatialvae.lab.bench, "run_bench", lambda *a, **k: {"rows": [1, 2]})  # the figures, not timed
    monkeypatch.setattr(spatialvae.lab.report, "bench_table", lambda res: "| the table |")
    out = tmp_path / "b.json"
    full_disk.fill("b.json")
    code, stdout, err = run_cli(capsys, "bench", "--out", out, "--quiet")
    assert code == 2 and "| the table |" in stdout and _one_error_line(err) == (
        f"error: cannot write {out}: the disk is full ({ENOSPC}); the figures are in the table above; free space "
        "(or pass --out on a disk with room), then run bench again")
    assert not out.exists() and full_disk.no_temp_left()


def test_atomic_writes_of_json_on_a_full_disk_name_the_file(tmp_path, full_disk):
    full_disk.fill("ablation.json")
    with pytest.raises(SpatialVAEError, match=f"cannot write {tmp_path}/ablation.json: the disk is full"):
        atomic_write_bytes(tmp_path / "ablation.json", b"{}")
    assert not list(tmp_path.iterdir())


# ---- torchrun: rank 0's full disk stops every rank at once -----------------------------------------

_RANK0_DISK_FILLS = '''
import os, tempfile
if os.environ.get("RANK") == "0":  # rank 0's second checkpoint finds the disk full
    _real, _seen = tempfile.mkstemp, []
    def _mkstemp(*args, **kwargs):
        fd, tmp = _real(*args, **kwargs)
        if kwargs.get("prefix") == ".last.pt.":
            _seen.append(tmp)
            if len(_seen) >= 2:
                os.close(fd)
                fd = os.open("/dev/full", os.O_WRONLY)
        return fd, tmp
    tempfile.mkstemp = _mkstemp
'''


def test_under_torchrun_rank_0_s_full_disk_stops_every_rank_at_once_in_one_line(kaggle_tree, tmp_path):
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(_RANK0_DISK_FILLS)
    out = tmp_path / "runs"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "spatialvae",
           "train", "--preset", "smoke", "--data", str(kaggle_tree["root"]), "--out", str(out), "--quiet",
           "--set", "prior.enabled=false"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",
           "PYTHONPATH": os.pathsep.join([str(tmp_path / "site"), str(REPO)])}
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=120)
    run = out / "000-smoke"
    assert r.returncode != 0
    assert "[rank1]" not in r.stderr and "[rank0]" not in r.stderr  # no worker traceback
    assert r.stderr.count(f"error: cannot write {run}/checkpoints/last.pt: the disk is full") == 1
    assert "the last good checkpoint is epoch 1" in r.stderr
    assert r.stderr.count("error: rank 1 stops: rank 0 failed first (DiskFullError: cannot write") == 1
    assert r.stderr.count("error: ") == 2
    assert load_checkpoint(run / "checkpoints" / "last.pt")["epoch"] == 1 and not _stray_temps(out)
