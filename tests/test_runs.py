"""Run folders: resuming with the command the run was started with, checkpoint versions, and the
single-process defaults of `spatialvae.distributed`."""

from __future__ import annotations

import pytest
import torch

from spatialvae import distributed
from spatialvae.cli import build_parser, main
from spatialvae.config import get_preset
from spatialvae.errors import CheckpointError, ConfigError
from spatialvae.model import build_model
from spatialvae.runs import CHECKPOINT_VERSION, RunDir, atomic_torch_save, load_checkpoint, load_model


def _run_folder(tmp_path, preset="smoke", overrides=()):
    cfg = get_preset(preset).with_overrides(list(overrides))
    cfg.data.root = str(tmp_path / "data")
    run = tmp_path / "runs" / f"000-{preset}"
    run.mkdir(parents=True)
    cfg.to_json(run / "config.json")
    return run, cfg


def _train_config(argv):
    from spatialvae.cli import _load_train_config

    return _load_train_config(build_parser().parse_args(argv))


def test_resume_accepts_the_preset_the_run_was_started_with(tmp_path):
    run, cfg = _run_folder(tmp_path, overrides=["train.phase2.epochs=3"])
    got = _train_config(["train", "--resume", str(run), "--preset", "smoke", "--set", "train.phase2.epochs=3",
                         "--data", cfg.data.root])
    assert got.to_dict() == cfg.to_dict()
    # --set on top changes the run (here: more epochs), with or without the preset repeated
    longer = _train_config(["train", "--resume", str(run), "--preset", "smoke", "--set", "train.phase2.epochs=5"])
    assert longer.train.phase2.epochs == 5 and longer.data.root == cfg.data.root


def test_resume_with_a_different_preset_names_the_keys_that_differ(tmp_path, capsys):
    run, _ = _run_folder(tmp_path)
    before = (run / "config.json").read_bytes()
    code = main(["train", "--resume", str(run), "--preset", "quick"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and err.startswith("error: --resume")
    smoke, quick = get_preset("smoke"), get_preset("quick")
    assert f"data.image_size: run {smoke.data.image_size} vs given {quick.data.image_size}" in err
    assert "drop --preset" in err and "Traceback" not in err
    assert (run / "config.json").read_bytes() == before and sorted(p.name for p in run.iterdir()) == ["config.json"]


def test_checkpoint_from_a_newer_version_is_refused_clearly(tmp_path):
    cfg = get_preset("smoke")
    blob = {"version": CHECKPOINT_VERSION + 1, "model": build_model(cfg).state_dict(), "config": cfg.to_dict()}
    atomic_torch_save(blob, tmp_path / "new.pt")
    for load in (load_checkpoint, load_model):
        try:
            load(tmp_path / "new.pt")
        except CheckpointError as e:
            assert f"version {CHECKPOINT_VERSION + 1}" in str(e) and "upgrade spatialvae" in str(e)
        else:
            raise AssertionError("a newer checkpoint loaded")
    atomic_torch_save({**blob, "version": CHECKPOINT_VERSION}, tmp_path / "ok.pt")
    assert load_checkpoint(tmp_path / "ok.pt")["version"] == CHECKPOINT_VERSION


def test_distributed_helpers_are_single_process_no_ops():
    assert distributed.dist_info() == (0, 1) and distributed.is_main()
    assert distributed.init_distributed() == (0, 1, None)
    assert distributed.broadcast({"a": 1}) == {"a": 1}
    assert distributed.all_true(torch.tensor(True)) and not distributed.all_true(torch.tensor(False))
    model = torch.nn.Linear(2, 2)
    assert distributed.wrap_model(model, torch.device("cpu")) is model
    order = []
    with distributed.main_first():
        order.append("body")
    distributed.barrier()
    distributed.shutdown()
    assert order == ["body"]


def test_run_dir_spells_every_path_of_a_run_folder(tmp_path):

    run = RunDir(tmp_path / "007-quick")
    assert run.best == tmp_path / "007-quick" / "checkpoints" / "best.pt"
    assert run.checkpoint("prior") == tmp_path / "007-quick" / "checkpoints" / "prior.pt"
    assert run.epoch_grid(3) == tmp_path / "007-quick" / "samples" / "epoch_003.png"
    assert (run.config_json.name, run.history.name, run.metrics.name, run.log_file.name) == (
        "config.json", "history.csv", "metrics.json", "train.log")
    with pytest.raises(ConfigError, match=r"007-quick is not a run folder \(no config.json\)"):
        run.config()
    run.root.mkdir()
    run.config_json.write_text(get_preset("smoke").to_json())
    assert run.is_run() and run.config().preset == "smoke"


def test_with_data_root_copies_and_none_keeps_the_config():
    cfg = get_preset("smoke")
    assert cfg.with_data_root(None) is cfg
    moved = cfg.with_data_root("/elsewhere")
    assert moved.data.root == "/elsewhere" and cfg.data.root != "/elsewhere"
