from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import run_cli
from torch.utils.data import Dataset

from spatialvae.config import get_preset
from spatialvae.engine import seed_everything
from spatialvae.errors import CheckpointError, SpatialVAEError
from spatialvae.losses import build_loss
from spatialvae.model import build_model
from spatialvae.runs import atomic_torch_save, create_run_dir, load_checkpoint, read_history_csv
from spatialvae.training import Trainer, TrainingDivergedError, final_beta, get_beta, phase_at

REPO = Path(__file__).resolve().parents[1]


class TinyXRays(Dataset):
    """Deterministic smooth images with a per-epoch flip, like ChestXRayDataset."""

    def __init__(self, n: int = 24, size: int = 32, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        base = torch.rand(n, 1, size // 8, size // 8, generator=g)
        self.x = torch.nn.functional.interpolate(base, size=(size, size), mode="bilinear", align_corners=False)
        self.flips = torch.zeros(n, dtype=torch.bool)

    def set_epoch(self, epoch: int) -> None:
        self.flips = torch.rand(len(self.x), generator=torch.Generator().manual_seed(epoch)) < 0.5

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        x = self.x[i]
        return (x.flip(-1) if self.flips[i] else x), 0


def smoke_cfg(**overrides):
    cfg = get_preset("smoke").with_overrides({"loss.perceptual_weight": 0, **overrides})
    cfg.data.batch_size = 8
    return cfg


def make_trainer(cfg, run_dir=None, train=None, val=None):
    seed_everything(cfg.train.seed)
    model, loss = build_model(cfg), build_loss(cfg)
    return Trainer(model, loss, train or TinyXRays(), val or TinyXRays(8, seed=1), cfg, run_dir=run_dir,
                   device="cpu", progress=False)


# ---- schedules ---------------------------------------------------------------------------------

@pytest.mark.parametrize("epoch,beta", [(0, 0.0), (49, 0.0), (50, 0.0), (51, 2e-5), (75, 5e-4), (99, 9.8e-4),
                                        (100, 1e-3), (149, 1e-3)])
def test_get_beta_at_the_phase_boundaries_of_the_seed(epoch, beta):
    assert get_beta(epoch, get_preset("seed").train) == pytest.approx(beta, abs=1e-12)


def test_phase_at_and_final_beta():
    t = get_preset("seed").train
    assert phase_at(49, t)[:2] == (1, 49) and phase_at(50, t)[:2] == (2, 0) and phase_at(149, t)[:2] == (2, 99)
    assert final_beta(t) == 1e-3
    assert final_beta(get_preset("original").train) == 0.5


def test_one_step_changes_the_weights():
    tr = make_trainer(smoke_cfg())
    before = {k: v.clone() for k, v in tr.raw_model.state_dict().items()}
    tr._enter_phase(1)
    tr.train_epoch()
    after = tr.raw_model.state_dict()
    changed = [k for k in before if before[k].is_floating_point() and not torch.equal(before[k], after[k])]
    assert len(changed) > 0.9 * sum(v.is_floating_point() for v in before.values())


def test_phase_switch_changes_lr_and_scheduler(tmp_path):
    cfg = smoke_cfg()
    tr = make_trainer(cfg, tmp_path / "run")
    tr.fit()
    h = tr.history
    assert [r["phase"] for r in h] == [1, 2, 2]
    assert h[0]["lr"] == cfg.train.phase1.lr and h[1]["lr"] == cfg.train.phase2.lr
    assert [r["beta"] for r in h] == [0.0, 0.0, 1e-3]
    assert type(tr.scheduler).__name__ == "ReduceLROnPlateau"
    tr2 = make_trainer(cfg)
    tr2._enter_phase(1)
    assert type(tr2.scheduler).__name__ == "CosineAnnealingWarmRestarts"


def test_run_folder_contents(tmp_path):
    run = tmp_path / "run"
    make_trainer(smoke_cfg(), run).fit()
    assert (run / "config.json").is_file() and (run / "train.log").is_file()
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["epoch_001.png", "epoch_002.png", "epoch_003.png"]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best.pt", "last.pt"]
    rows = read_history_csv(run / "history.csv")
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    for key in ("phase", "beta", "lr", "train_recon", "train_ssim", "train_kl", "train_total", "val_total",
                "val_select", "seconds", "images_per_s"):
        assert key in rows[0]
    assert "epoch   3/3 phase 2" in (run / "train.log").read_text()


def test_create_run_dir_numbers_runs(tmp_path):
    assert create_run_dir(tmp_path, "seed").name == "000-seed"
    assert create_run_dir(tmp_path, "quick").name == "001-quick"
    (tmp_path / "007-x").mkdir()
    assert create_run_dir(tmp_path, "seed").name == "008-seed"


# ---- checkpoints and resume -------------------------------------------------------------------------

@pytest.mark.parametrize("stop_after", [1, 2, 3])  # mid cosine phase, at the phase boundary, mid plateau phase
def test_resume_gives_the_same_weights_as_never_stopping(tmp_path, stop_after):
    cfg = smoke_cfg(**{"train.phase1.epochs": 2, "train.phase2.epochs": 2, "train.phase1.cosine_t0": 3})
    straight = make_trainer(cfg, tmp_path / "a")
    straight.fit()

    stopped = make_trainer(cfg, tmp_path / "b")
    stopped.fit(until_epoch=stop_after)  # the session dies here; only the run folder survives
    del stopped
    resumed = make_trainer(cfg, tmp_path / "b")
    resumed.load(tmp_path / "b" / "checkpoints" / "last.pt")
    assert resumed.epoch == stop_after
    resumed.fit()
    sa, sb = straight.raw_model.state_dict(), resumed.raw_model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert straight.lr == resumed.lr
    assert straight.optimizer.state_dict()["state"][0]["step"] == resumed.optimizer.state_dict()["state"][0]["step"]
    assert [r["train_total"] for r in straight.history] == [r["train_total"] for r in resumed.history]
    assert (tmp_path / "a" / "history.csv").read_text().count("\n") == (tmp_path / "b" / "history.csv").read_text().count("\n")


def test_checkpoint_round_trip_and_config_inside(tmp_path):
    tr = make_trainer(smoke_cfg())
    tr._enter_phase(1)
    tr.train_epoch()
    tr.epoch = 1
    path = tr.save(tmp_path / "c.pt")
    ckpt = load_checkpoint(path)
    assert ckpt["epoch"] == 1 and ckpt["config"]["preset"] == "smoke"
    assert set(ckpt) >= {"model", "optimizer", "scheduler", "scaler", "rng", "history", "config"}
    assert not any("vgg" in k.lower() or "perceptual" in k for k in ckpt["model"])
    other = make_trainer(smoke_cfg()).load(path)
    assert all(torch.equal(a, b) for a, b in zip(tr.raw_model.state_dict().values(),
                                                 other.raw_model.state_dict().values()))


def test_atomic_write_keeps_the_old_checkpoint_when_writing_fails(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    atomic_torch_save({"a": torch.ones(3)}, path)
    good = path.read_bytes()

    def boom(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(SpatialVAEError, match="cannot write .*last.pt \\(OSError: disk full\\)"):
        atomic_torch_save({"a": torch.zeros(3)}, path)
    assert path.read_bytes() == good
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temp file left behind


def test_incompatible_corrupt_and_malicious_checkpoints_are_refused(tmp_path):
    tr = make_trainer(smoke_cfg())
    path = tr.save(tmp_path / "c.pt")
    wider = smoke_cfg(**{"model.channels": (16, 16, 32)})
    with pytest.raises(CheckpointError, match="model.channels"):
        make_trainer(wider).load(path)
    (tmp_path / "bad.pt").write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(tmp_path / "bad.pt")
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))
    (tmp_path / "evil.pt").write_bytes(pickle.dumps({"model": Evil(), "config": {}}))
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path / "evil.pt")
    assert not marker.exists()
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_checkpoint(tmp_path / "missing.pt")


# ---- NaN guard ---------------------------------------------------------------------------------

def test_nonfinite_loss_skips_steps_then_stops_without_touching_weights(tmp_path):
    cfg = smoke_cfg(**{"train.max_nonfinite_steps": 2})
    tr = make_trainer(cfg, tmp_path / "run")
    before = {k: v.clone() for k, v in tr.raw_model.state_dict().items()}
    real = tr.loss_fn.forward

    def nan_loss(*a, **k):
        total, parts = real(*a, **k)
        return total * float("nan"), parts
    tr.loss_fn.forward = nan_loss
    with pytest.raises(TrainingDivergedError, match="2 steps in a row"):
        tr.fit()
    assert tr.nonfinite_total == 2
    assert all(torch.equal(before[k], v) for k, v in tr.raw_model.state_dict().items())
    assert not (tmp_path / "run" / "checkpoints" / "last.pt").exists()


def test_a_single_nonfinite_step_is_skipped_and_training_goes_on():
    tr = make_trainer(smoke_cfg())
    real = tr.loss_fn.forward
    calls = {"n": 0}

    def flaky(*a, **k):
        calls["n"] += 1
        total, parts = real(*a, **k)
        return (total * float("inf") if calls["n"] == 1 else total), parts
    tr.loss_fn.forward = flaky
    tr._enter_phase(1)
    out = tr.train_epoch()
    assert tr.nonfinite_total == 1 and out["images"] == 16  # 3 batches of 8, the first skipped


def test_save_refuses_nan_weights(tmp_path):
    tr = make_trainer(smoke_cfg())
    with torch.no_grad():
        next(tr.raw_model.parameters()).fill_(float("nan"))
    with pytest.raises(TrainingDivergedError, match="NaN"):
        tr.save(tmp_path / "x.pt")
    assert not (tmp_path / "x.pt").exists()


def test_cpu_training_is_reproducible():
    weights = []
    for _ in range(2):
        tr = make_trainer(smoke_cfg())  # seeds, builds, trains: nothing else touches the RNG
        tr._enter_phase(1)
        tr.train_epoch()
        weights.append([p.detach().clone() for p in tr.raw_model.parameters()])
    a, b = weights
    assert all(torch.equal(x, y) for x, y in zip(a, b))


# ---- command line ------------------------------------------------------------------------------

def _cli(*args, env=None, timeout=300):
    e = {**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})}
    return subprocess.run([sys.executable, "-m", "spatialvae", *args], capture_output=True, text=True, cwd=REPO,
                          env=e, timeout=timeout)


def test_cli_smoke_run_leaves_the_full_run_folder_and_resumes(kaggle_tree, tmp_path, capsys):
    # The real data's CLI run is conftest's session-wide `real_smoke_run` (test_evaluate, test_features).
    code, out, err = run_cli(capsys, "train", "--preset", "smoke", "--data", kaggle_tree["root"], "--out",
                           tmp_path / "runs", "--set", "loss.perceptual_weight=0.1", "--set", "loss.vgg_weights=random",
                           "--quiet")
    assert code == 0, err
    run = tmp_path / "runs" / "000-smoke"
    assert "RANDOM VGG16 features" in out  # the opt-in is said, not hidden
    assert "32 px, 20 train / 2 val images" in out  # every readable image of the tree, patient-split
    for f in ("config.json", "history.csv", "train.log", "checkpoints/last.pt", "checkpoints/best.pt",
              "samples/epoch_003.png"):
        assert (run / f).is_file(), f
    assert len(read_history_csv(run / "history.csv")) == 3
    # Extend the finished run by one epoch with --resume: it continues at epoch 4.
    code, out, err = run_cli(capsys, "train", "--resume", run, "--set", "train.phase2.epochs=3", "--quiet")
    assert code == 0, err
    assert "resumed" in out and [h["epoch"] for h in read_history_csv(run / "history.csv")] == [1, 2, 3, 4]
    code, _, err = run_cli(capsys, "sample", "--run", run, "--n", "9", "--out", tmp_path / "s.png")
    assert code == 0, err
    from PIL import Image
    assert Image.open(tmp_path / "s.png").size == (3 * 32 + 4 * 2, 3 * 32 + 4 * 2)
    code, _, err = run_cli(capsys, "train", "--resume", run, "--set", "model.channels=8,16,16", "--quiet")
    assert code == 2 and "incompatible config" in err and "Traceback" not in err


def test_cli_errors_are_one_line_from_python_m_spatialvae():
    # The process as users start it (exit status, stderr); every command's bad input is walked
    # through in-process by tests/test_bad_input.py.
    r = _cli("train", "--resume", "/no/such/run")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "is not a run folder" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_cli_missing_vgg_weights_is_a_clear_error(kaggle_tree, tmp_path, offline, capsys):
    from spatialvae.cli import main
    code = main(["train", "--preset", "smoke", "--data", str(kaggle_tree["root"]), "--out", str(tmp_path / "r"),
                 "--set", "loss.perceptual_weight=0.1", "--quiet"])  # the ImageNet weights, as a real run
    err = capsys.readouterr().err
    assert code == 2 and "perceptual_weight=0" in err and "vgg_weights" in err
    assert offline and offline[0].endswith("vgg16-397923af.pth")  # it tried torchvision's download
    assert not (tmp_path / "r").exists() or not list((tmp_path / "r").iterdir())  # no run folder was made


def _torchrun_train(root: Path, out: Path, *extra: str) -> subprocess.Popen:
    """A 2-process gloo `train` of the smoke preset, 2 + 28 epochs (a few seconds), on the fake Kaggle tree."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "spatialvae",
           "train", "--preset", "smoke", "--data", str(root), "--out", str(out), "--name", "ddp", "--quiet",
           "--set", "train.phase1.epochs=2", "--set", "train.phase2.epochs=28", "--set", "prior.enabled=false", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _rank_pid(parent: int, rank: int) -> int | None:
    """The pid of torchrun worker ``rank`` (a child of ``parent``), read from /proc."""
    for env in Path("/proc").glob("[0-9]*/environ"):
        try:
            stat = (env.parent / "stat").read_text().rsplit(")", 1)[1].split()
            if int(stat[1]) == parent and f"RANK={rank}".encode() in env.read_bytes().split(b"\0"):
                return int(env.parent.name)
        except (OSError, ValueError, IndexError):
            continue
    return None


def _checkpoint_epoch(path: Path) -> int:
    try:
        return int(load_checkpoint(path)["epoch"]) if path.is_file() else 0
    except CheckpointError:  # mid-replace on another filesystem: try again
        return 0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the worker to kill through /proc")
def test_a_killed_torchrun_run_resumes_to_the_weights_of_an_unbroken_one(kaggle_tree, tmp_path):
    import signal
    import time

    root = kaggle_tree["root"]
    whole = _torchrun_train(root, tmp_path / "whole")
    assert whole.wait(timeout=300) == 0, whole.stderr.read()[-3000:]
    runs = list((tmp_path / "whole").iterdir())
    assert [p.name for p in runs] == ["000-ddp"]  # rank 0 alone created and wrote the run folder
    assert [row["epoch"] for row in read_history_csv(runs[0] / "history.csv")] == list(range(1, 31))
    assert whole.stdout.read().count("epoch  30/30") == 1  # one summary line per epoch, from rank 0
    broken = _torchrun_train(root, tmp_path / "broken")
    last = tmp_path / "broken" / "000-ddp" / "checkpoints" / "last.pt"
    deadline = time.time() + 240
    while _checkpoint_epoch(last) < 2 and broken.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    victim = _rank_pid(broken.pid, 1)
    assert victim is not None and broken.poll() is None, "the run ended before rank 1 could be killed"
    os.kill(victim, signal.SIGKILL)  # at any moment of epochs 3..30
    assert broken.wait(timeout=60) != 0
    assert "[rank0]: Traceback" not in broken.stderr.read()  # rank 0 stops in one line (or by torchrun's signal)
    stopped_at = _checkpoint_epoch(last)
    assert 2 <= stopped_at < 30
    resumed = _torchrun_train(root, tmp_path / "unused", "--resume", str(tmp_path / "broken" / "000-ddp"))
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()[-3000:]
    a = load_checkpoint(tmp_path / "whole" / "000-ddp" / "checkpoints" / "last.pt")
    b = load_checkpoint(last)
    assert a["epoch"] == b["epoch"] == 30
    assert not any(k.startswith("module.") for k in a["model"])  # the unwrapped model is saved
    diff = max(float((a["model"][k].float() - b["model"][k].float()).abs().max()) for k in a["model"])
    assert diff == 0.0, f"resumed after epoch {stopped_at}: weights differ by up to {diff:.2e}"


def test_a_resume_with_another_number_of_processes_is_refused_before_anything_changes(tmp_path):
    cfg = smoke_cfg(**{"train.phase1.epochs": 1, "train.phase2.epochs": 0})
    tr = make_trainer(cfg, run_dir=tmp_path)
    tr.fit()
    ckpt = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    ckpt["rng"] = {"world_size": 2, "ranks": [ckpt["rng"]["ranks"][0]] * 2}  # as a 2-process run writes it
    atomic_torch_save(ckpt, tmp_path / "two.pt")
    fresh = make_trainer(cfg)
    before = {k: v.clone() for k, v in fresh.raw_model.state_dict().items()}
    with pytest.raises(CheckpointError, match="written by 2 process.*torchrun --nproc-per-node 2"):
        fresh.load(tmp_path / "two.pt")
    assert fresh.epoch == 0 and all(torch.equal(before[k], v) for k, v in fresh.raw_model.state_dict().items())


@pytest.mark.parametrize("case", ["no dataset", "run folder cannot be made"])
def test_when_rank_0_fails_first_every_rank_stops_at_once_in_one_line(kaggle_tree, tmp_path, case):
    import time

    data, out = str(kaggle_tree["root"]), tmp_path / "runs"
    if case == "no dataset":
        data = str(tmp_path / "nowhere")  # rank 0 fails inside main_first, where the others wait
    else:
        out.write_text("a file where the runs folder should be")  # rank 0 fails making the run folder
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "spatialvae",
           "train", "--preset", "smoke", "--data", data, "--out", str(out), "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    t0 = time.time()
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=120)
    assert r.returncode != 0 and time.time() - t0 < 60
    assert "[rank1]" not in r.stderr and "[rank0]" not in r.stderr  # no worker traceback
    assert r.stderr.count("error: rank 1 stops: rank 0 failed first") == 1
    assert r.stderr.count("error: ") == 2  # rank 0's own message and rank 1's line


def test_how_often_the_sample_grid_is_drawn_does_not_change_the_weights(tmp_path):
    """The grid encodes and decodes through loaders that draw from torch's global stream; the
    posterior noise has its own, so drawing the grid every epoch or never leaves training alone."""
    runs = {}
    for every in (1, 100):
        cfg = smoke_cfg(**{"train.phase1.epochs": 2, "train.phase2.epochs": 1, "train.sample_every": every})
        tr = make_trainer(cfg, tmp_path / str(every))
        tr.fit()
        runs[every] = tr.raw_model.state_dict()
    assert len(list((tmp_path / "1" / "samples").glob("*.png"))) == 3
    assert len(list((tmp_path / "100" / "samples").glob("*.png"))) == 1  # the last epoch's only
    assert all(torch.equal(runs[1][k], runs[100][k]) for k in runs[1])


def test_the_posterior_noise_comes_from_the_trainers_own_stream():
    cfg = smoke_cfg(**{"train.phase1.epochs": 1, "train.phase2.epochs": 0})
    a, b = make_trainer(cfg), make_trainer(cfg)
    torch.randn(1000)  # another loop draws from the global stream between the two runs' construction and fit
    a.fit()
    b.fit()
    assert all(torch.equal(v, b.raw_model.state_dict()[k]) for k, v in a.raw_model.state_dict().items())
    fresh = [make_trainer(smoke_cfg(**{"train.seed": seed})).noise.get_state() for seed in (0, 0, 1)]
    assert torch.equal(fresh[0], fresh[1]) and not torch.equal(fresh[0], fresh[2])  # the seed sets the stream


def test_a_trainer_is_freed_without_the_cycle_collector():
    """Under torchrun a trainer kept alive by a reference cycle is destroyed at interpreter exit,
    after the process group, and gloo then aborts the rank; reference counting frees it in time."""
    import gc
    import weakref

    trainer = make_trainer(smoke_cfg())
    ref = weakref.ref(trainer)
    gc.disable()
    try:
        del trainer
        assert ref() is None
    finally:
        gc.enable()


def test_monitor_logs_test_psnr_and_ssim_of_the_posterior_mean(tmp_path):
    from spatialvae.scores import psnr, ssim_score

    cfg = smoke_cfg(**{"train.phase1.epochs": 2, "train.phase2.epochs": 0})
    seed_everything(0)
    watched = TinyXRays(6, seed=2)
    tr = Trainer(build_model(cfg), build_loss(cfg), TinyXRays(), TinyXRays(8, seed=1), cfg, device="cpu",
                 progress=False, monitor_data=watched)
    row = tr.fit()[-1]
    x = torch.stack([watched[i][0] for i in range(len(watched))])
    with torch.no_grad():
        tr.raw_model.eval()
        recon = tr.raw_model(x, sample_posterior=False)[0].clamp(0, 1)
    assert row["monitor_psnr"] == pytest.approx(float(psnr(recon, x).mean()), rel=1e-5)
    assert row["monitor_ssim"] == pytest.approx(float(ssim_score(recon, x).mean()), rel=1e-5)
    unwatched = make_trainer(cfg)  # seeded as above
    assert row["monitor_seconds"] > 0 and "monitor_psnr" not in unwatched.fit()[-1]
    for k, v in unwatched.raw_model.state_dict().items():  # watching draws nothing from the training noise
        assert torch.equal(v, tr.raw_model.state_dict()[k]), k


def test_a_version_1_checkpoint_loads_as_the_literal_model_it_was(tmp_path):
    from spatialvae.runs import load_model

    cfg = smoke_cfg(**{"model.shortcut": "conv", "model.logvar_init": None, "loss.kl_reduction": "sum"})
    model = build_model(cfg)
    d = cfg.to_dict()
    del d["model"]["shortcut"], d["model"]["logvar_init"]  # what version 1 wrote
    atomic_torch_save({"version": 1, "model": model.state_dict(), "config": d}, tmp_path / "old.pt")
    loaded, got, _ = load_model(tmp_path / "old.pt")
    assert (got.model.shortcut, got.model.logvar_init, got.loss.kl_reduction) == ("conv", None, "sum")
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v)


def test_a_version_2_checkpoint_keeps_the_decoder_skip_it_was_trained_with(tmp_path):
    from spatialvae.runs import load_model

    cfg = smoke_cfg()
    d = cfg.to_dict()
    del d["model"]["decoder_skip"]  # what version 2 wrote: its decoder started the skip at the last map
    atomic_torch_save({"version": 2, "model": build_model(cfg).state_dict(), "config": d}, tmp_path / "v2.pt")
    assert load_model(tmp_path / "v2.pt")[1].model.decoder_skip == "last"
    d["model"]["decoder_skip"] = "latent"
    atomic_torch_save({"version": 3, "model": build_model(cfg).state_dict(), "config": d}, tmp_path / "v3.pt")
    assert load_model(tmp_path / "v3.pt")[1].model.decoder_skip == "latent"
