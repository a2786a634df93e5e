"""The learned latent prior, class-conditional samplers, label mixes and TSTR."""

from __future__ import annotations

from dataclasses import asdict

import numpy as np
import pytest
import torch
from conftest import copy_run, run_cli

from spatialvae.config import ConfigError, PriorConfig, get_preset
from spatialvae.errors import CheckpointError, SpatialVAEError
from spatialvae.lab.tstr import balanced_subset, class_labels
from spatialvae.prior import N_CLASSES, FlowNet, LearnedPrior, flow_matching_loss
from spatialvae.prior_run import fit_logged
from spatialvae.sampling import GaussianSampler, PerClass, parse_label_mix

SHAPE = (4, 2, 2)  # 16 latent values: tiny, so the prior learns in a second


def two_clusters(n_per_class: int = 200, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Class 0 around -2, class 1 around +2 (spread 0.3), shape (2n, 4, 2, 2)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(2).repeat_interleave(n_per_class)
    centres = torch.where(labels == 0, -2.0, 2.0).view(-1, 1, 1, 1)
    return centres + 0.3 * torch.randn((2 * n_per_class, *SHAPE), generator=g), labels


def tiny_cfg(**kw) -> PriorConfig:
    base = dict(width=32, depth=1, heads=2, steps=300, batch_size=64, lr=3e-3, warmup_steps=10, ema=0.9,
                sample_steps=8, log_every=100, guidance=1.0)
    return PriorConfig(**{**base, **kw})


@pytest.mark.parametrize("shape", [(64, 4, 4), (8, 4, 4), (4, 2, 2)])
def test_flownet_keeps_the_latent_shape_and_starts_at_zero_velocity(shape):
    net = FlowNet(shape, width=32, depth=2, heads=4)
    x = torch.randn(3, *shape)
    v = net(x, torch.rand(3), torch.tensor([0, 1, N_CLASSES]))
    assert v.shape == x.shape
    assert torch.count_nonzero(v) == 0  # zero-initialised output layer and adaLN gates


@pytest.fixture(scope="module")
def fitted() -> LearnedPrior:
    x, y = two_clusters()
    return fit_logged(LearnedPrior(tiny_cfg()), (x, y), (x[:40], y[:40]))


def test_learned_prior_draws_each_class_near_its_own_cluster(fitted):
    labels = torch.tensor([0] * 50 + [1] * 50)
    z = fitted.sample(100, torch.Generator().manual_seed(0), labels=labels)
    assert z.shape == (100, *SHAPE)
    means = z.flatten(1).mean(1)
    assert (means[:50] < -1).all() and (means[50:] > 1).all()
    assert fitted.history[-1]["step"] == 300 and fitted.history[-1]["val_loss"] < fitted.history[0]["val_loss"]


def test_learned_prior_without_labels_follows_the_training_mix_and_is_seeded(fitted):
    a = fitted.sample(200, torch.Generator().manual_seed(3))
    b = fitted.sample(200, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    share_high = float((a.flatten(1).mean(1) > 0).float().mean())
    assert 0.35 < share_high < 0.65  # classes 200 : 200


def test_learned_prior_round_trips_through_its_state_dict(fitted):
    again = LearnedPrior.from_state_dict(fitted.state_dict(), SHAPE)
    for (name, p), (_, q) in zip(fitted.net.state_dict().items(), again.net.state_dict().items()):
        assert torch.equal(p, q), name  # the weights round-trip bit for bit
    assert torch.equal(fitted.mean, again.mean) and torch.equal(fitted.std, again.std)
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    # The same noise through the same weights: equal up to float kernels, whose vectorised reductions
    # can differ with the tensors' memory alignment (2e-7 seen on torch 2.14.1 CPU).
    torch.testing.assert_close(fitted.sample(8, g1, labels=torch.ones(8)), again.sample(8, g2, labels=torch.ones(8)),
                               rtol=0, atol=1e-5)
    with pytest.raises(CheckpointError, match=r"trained for latents of shape \(4, 2, 2\).*\(64, 4, 4\)"):
        LearnedPrior.from_state_dict(fitted.state_dict(), (64, 4, 4))
    with pytest.raises(CheckpointError, match="not a spatialvae latent prior"):
        LearnedPrior.from_state_dict({"kind": "something else"}, SHAPE)


def test_learned_prior_rejects_bad_labels(fitted):
    with pytest.raises(SpatialVAEError, match="labels must be 4 values"):
        fitted.sample(4, labels=torch.tensor([0, 1, 5, 0]))
    with pytest.raises(SpatialVAEError, match="before fit"):
        LearnedPrior().sample(2)


def test_interrupted_prior_training_resumes_to_the_same_weights():
    x, y = two_clusters(50)
    cfg = tiny_cfg(steps=30, log_every=10)
    whole = LearnedPrior(cfg).fit(x, y)

    class Killed(Exception):
        pass

    saved: list[dict] = []

    def save_then_die(state):
        saved.append(state)
        if state["step"] == 10:
            raise Killed  # the session dies right after the save at step 10

    with pytest.raises(Killed):
        fit_logged(LearnedPrior(cfg), (x, y), save=save_then_die)
    assert saved[-1]["step"] == 10 and not saved[-1]["done"]
    resumed = fit_logged(LearnedPrior(cfg), (x, y), state=saved[-1])
    for a, b in zip(whole.net.state_dict().values(), resumed.net.state_dict().values()):
        assert torch.equal(a, b)
    assert [h["step"] for h in resumed.history] == [10, 20, 30]


def test_guidance_zero_is_the_label_free_model_and_one_the_plain_conditional(fitted):
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    ones = torch.ones(16, dtype=torch.long)
    free = fitted.sample(16, g(), labels=torch.full((16,), N_CLASSES))
    assert torch.allclose(fitted.sample(16, g(), labels=ones, guidance=0.0), free, atol=1e-5)
    x, t = torch.randn(4, *SHAPE), torch.rand(4)
    assert torch.equal(fitted.velocity(x, t, ones[:4], 1.0), fitted.net(x, t, ones[:4]))
    v_c, v_u = fitted.net(x, t, ones[:4]), fitted.net(x, t, torch.full((4,), N_CLASSES))
    assert torch.allclose(fitted.velocity(x, t, ones[:4], 3.0), v_u + 3.0 * (v_c - v_u), atol=1e-5)


def test_per_class_sampler_fits_one_model_per_class():
    x, y = two_clusters(100)
    pc = PerClass(GaussianSampler, "gaussian").fit(x, y)
    z = pc.sample(6, torch.Generator().manual_seed(0), labels=torch.tensor([1, 0, 1, 0, 0, 1]))
    assert z.shape == (6, *SHAPE)
    assert (z.flatten(1).mean(1).sign() == torch.tensor([1, -1, 1, -1, -1, 1.0])).all()
    from spatialvae.sampling import fit_sampler

    per_class_gmm = fit_sampler("gmm", x, y)
    assert isinstance(per_class_gmm, PerClass) and set(per_class_gmm.samplers) == {0, 1}
    with pytest.raises(SpatialVAEError, match="choose gaussian or gmm"):
        fit_sampler("vamp", x)
    only_normal = PerClass(GaussianSampler, "g").fit(x[:100], y[:100])
    with pytest.raises(SpatialVAEError, match="PNEUMONIA"):
        only_normal.sample(2, labels=torch.tensor([0, 1]))


@pytest.mark.parametrize("text, n, counts", [("normal", 5, [5, 0]), ("PNEUMONIA", 3, [0, 3]),
                                             ("normal:0.3,pneumonia:0.7", 10, [3, 7]),
                                             ("normal:1,pneumonia:1", 5, [3, 2]), ("pneumonia:2,normal:6", 8, [6, 2])])
def test_label_mix_counts(text, n, counts):
    labels = parse_label_mix(text, n)
    assert len(labels) == n and torch.bincount(labels, minlength=2).tolist() == counts
    assert torch.equal(labels, labels.sort().values)  # NORMAL first


@pytest.mark.parametrize("text, match", [("cat", "unknown label 'cat'"), ("normal:x", "not a number"),
                                         ("normal:0", "add up to 0"), ("normal:-1", "not a number >= 0")])
def test_label_mix_errors(text, match):
    with pytest.raises(SpatialVAEError, match=match):
        parse_label_mix(text, 4)
    assert parse_label_mix(None, 4) is None


def test_prior_config_is_validated():
    with pytest.raises(ConfigError, match="prior.width=100 is invalid: expected a multiple of prior.heads=3"):
        get_preset("quick").with_overrides({"prior.width": 100, "prior.heads": 3})
    with pytest.raises(ConfigError, match="prior.ema"):
        get_preset("quick").with_overrides({"prior.ema": 1.0})
    assert get_preset("original").prior.enabled is False and get_preset("quick").prior.enabled is True
    with pytest.raises(ConfigError, match="prior.time_sampling='cosine' is invalid: expected 'logit_normal' or 'uniform'"):
        get_preset("quick").with_overrides({"prior.time_sampling": "cosine"})
    with pytest.raises(ConfigError, match=r"prior.spread=-1(\.0)? is invalid: expected 0 \(off\)"):
        get_preset("quick").with_overrides({"prior.spread": -1})
    with pytest.raises(ConfigError, match="prior.calibration_samples=1 is invalid: expected at least 2"):
        get_preset("quick").with_overrides({"prior.calibration_samples": 1})


@pytest.mark.parametrize("spread", [1.0, 1.2])
def test_spread_gives_the_calibration_draw_that_rms_and_only_rescales(fitted, spread):
    c = fitted.cfg
    assert c.spread == 1.0 and c.time_sampling == "logit_normal"  # the defaults
    fitted = LearnedPrior.from_state_dict({**fitted.state_dict(), "config": {**asdict(c), "spread": spread}})
    c = fitted.cfg
    # sample() without labels draws labels, then noise, from its generator, as the calibration does:
    # the same seed reproduces the calibration draw, whose standardised RMS the scale sets to 1.
    z = fitted.sample(c.calibration_samples, torch.Generator().manual_seed(c.seed + 2))
    rms = ((z - fitted.mean) / fitted.std).pow(2).mean().sqrt()
    assert abs(float(rms) - spread) < 1e-5
    scale = fitted.spread_scale(c.guidance, c.sample_steps)
    assert scale != 1.0
    plain = LearnedPrior.from_state_dict({**fitted.state_dict(), "config": {**asdict(c), "spread": 0.0}})
    assert plain.spread_scale(c.guidance, c.sample_steps) == 1.0
    labels = torch.tensor([0, 1] * 8)
    a = fitted.sample(16, torch.Generator().manual_seed(4), labels=labels)
    b = plain.sample(16, torch.Generator().manual_seed(4), labels=labels)
    torch.testing.assert_close((a - fitted.mean) / fitted.std, scale * (b - plain.mean) / plain.std,
                               rtol=1e-5, atol=1e-5)
    # A spread given when sampling overrides the config's: 0 is the flow as it draws.
    torch.testing.assert_close(fitted.sample(16, torch.Generator().manual_seed(4), labels=labels, spread=0), b)
    again = plain.sample(16, torch.Generator().manual_seed(4), labels=labels, spread=spread)
    torch.testing.assert_close(again, a)


def test_a_prior_saved_before_the_spread_and_time_settings_samples_as_it_did(fitted):
    blob = fitted.state_dict()
    old_cfg = {k: v for k, v in blob["config"].items() if k not in ("time_sampling", "spread")}
    old = LearnedPrior.from_state_dict({**blob, "config": old_cfg})
    assert old.cfg.time_sampling == "uniform" and old.cfg.spread == 0.0 and old.spread_scale(2.0, 8) == 1.0


@pytest.mark.parametrize("time_sampling", ["uniform", "logit_normal"])
def test_flow_matching_draws_its_times_as_configured(time_sampling):
    seen = []

    def net(xt, t, y):  # records the times it is asked about
        seen.append(t)
        return torch.zeros_like(xt)

    x1 = torch.randn(512, *SHAPE)
    flow_matching_loss(net, x1, torch.zeros(512, dtype=torch.long), torch.Generator().manual_seed(0), time_sampling)
    g = torch.Generator().manual_seed(0)
    torch.randn(x1.shape, generator=g)  # the noise comes first
    expected = torch.sigmoid(torch.randn(512, generator=g)) if time_sampling == "logit_normal" else torch.rand(512, generator=g)
    assert torch.equal(seen[0], expected)


def test_tstr_helpers_balance_the_classes():
    labels = torch.tensor([0] * 3 + [1] * 10)
    pick = balanced_subset(labels, 5, seed=0)
    assert torch.bincount(labels[pick]).tolist() == [3, 5]
    assert class_labels(2).tolist() == [0, 0, 1, 1]


# ---- the run folder and the command line ----------------------------------------------------------

@pytest.fixture
def prior_run(fake_smoke_run):
    """The session's smoke run on the tiny Kaggle-shaped tree (conftest): both phases, then the prior."""
    return fake_smoke_run


def _cli(args, capsys):
    return run_cli(capsys, *args)


def test_train_ends_with_a_finished_prior_that_resume_keeps(prior_run, capsys):
    from spatialvae.prior_run import load_prior, prior_path

    run, tree = prior_run
    blob = torch.load(prior_path(run), weights_only=True)
    assert blob["done"] and blob["step"] == get_preset("smoke").prior.steps and blob["vae_epoch"] == 3
    assert load_prior(run, (8, 4, 4)).latent_shape == (8, 4, 4)
    before = prior_path(run).stat().st_mtime_ns
    code, _, _ = _cli(["train", "--resume", run, "--data", tree["root"], "--quiet"], capsys)
    assert code == 0 and prior_path(run).stat().st_mtime_ns == before
    assert "already trained (20 steps); kept" in (run / "train.log").read_text()


def test_sample_learned_per_class_writes_a_grid(prior_run, tmp_path, capsys):
    run, tree = prior_run
    out = tmp_path / "learned.png"
    code, text, _ = _cli(["sample", "--run", run, "--sampler", "learned", "--label", "pneumonia", "--n", 4,
                          "--out", out], capsys)
    assert code == 0 and out.is_file() and "learned-prior samples (--sampler learned) (pneumonia)" in text
    code, _, err = _cli(["sample", "--run", run, "--sampler", "learned", "--checkpoint", "last", "--n", 2,
                         "--out", tmp_path / "last.png"], capsys)
    assert code == 0 and err == ""  # last.pt is best.pt's epoch here (3), so no warning
    other = copy_run(run, tmp_path)  # a last.pt from another epoch than the prior's best.pt
    blob = torch.load(other / "checkpoints" / "last.pt", weights_only=True)
    torch.save({**blob, "epoch": 2}, other / "checkpoints" / "last.pt")
    code, _, err = _cli(["sample", "--run", other, "--sampler", "learned", "--checkpoint", "last", "--n", 2,
                         "--out", tmp_path / "last2.png"], capsys)
    assert code == 0 and "warning: the learned prior was fitted to the latents of the epoch-3" in err
    code, _, _ = _cli(["sample", "--run", run, "--sampler", "gmm", "--label", "normal:1,pneumonia:1", "--n", 4,
                       "--data", tree["root"], "--out", tmp_path / "gmm.png"], capsys)
    assert code == 0 and (tmp_path / "gmm.png").is_file()


def test_sample_uses_the_learned_prior_by_default_and_says_so(prior_run, tmp_path, capsys):
    from PIL import Image

    from spatialvae.prior_run import prior_path

    run, tree = prior_run
    code, text, _ = _cli(["sample", "--run", run, "--n", 4, "--out", tmp_path / "default.png"], capsys)
    assert code == 0 and "learned-prior samples (--sampler learned)" in text
    code, _, _ = _cli(["sample", "--run", run, "--sampler", "learned", "--n", 4, "--out", tmp_path / "l.png"], capsys)
    same = [np.asarray(Image.open(tmp_path / f)) for f in ("default.png", "l.png")]
    assert code == 0 and np.array_equal(*same)
    without = copy_run(run, tmp_path)
    prior_path(without).unlink()
    code, text, _ = _cli(["sample", "--run", without, "--n", 4, "--data", tree["root"], "--out", tmp_path / "g.png"],
                         capsys)
    assert code == 0 and "GMM samples (--sampler gmm)" in text  # no prior.pt: the GMM, named


def test_n01_samples_are_standard_normal_and_the_old_name_is_refused(prior_run, tmp_path, capsys):
    run, _ = prior_run
    code, text, _ = _cli(["sample", "--run", run, "--sampler", "standard_normal", "--n", 4, "--out", tmp_path / "n.png"],
                         capsys)
    assert code == 0 and "N(0, I) samples" in text
    with pytest.raises(SystemExit) as e:  # argparse: one usage line and the choices
        _cli(["sample", "--run", run, "--sampler", "prior", "--n", 4, "--out", tmp_path / "old.png"], capsys)
    assert e.value.code == 2 and "invalid choice: 'prior'" in capsys.readouterr().err


def test_sample_into_a_folder_that_cannot_be_made_is_one_error_line(prior_run, capsys):
    from pathlib import Path

    run, _ = prior_run
    target = Path("/proc/spatialvae-test/s.png")  # a folder nobody can make, not even root
    code, _, err = _cli(["sample", "--run", run, "--n", 2, "--out", target], capsys)
    assert code == 2 and err.count("\n") == 1 and err.startswith(f"error: cannot write {target}")
    assert not target.parent.exists()


def test_a_dataset_with_one_class_trains_with_a_warning_and_refuses_the_missing_class(kaggle_tree, tmp_path, capsys):
    root = kaggle_tree["root"]
    for split in ("train", "val"):
        for f in (root / split / "PNEUMONIA").iterdir():
            f.unlink()  # the folder stays, empty
    code, _, err = _cli(["train", "--preset", "smoke", "--data", root, "--out", tmp_path / "runs", "--quiet",
                         "--set", "data.max_per_class=null"], capsys)
    assert code == 0 and err.count("warning: the training split has no PNEUMONIA images") == 1
    run = tmp_path / "runs" / "000-smoke"
    code, _, err = _cli(["sample", "--run", run, "--label", "pneumonia", "--n", 2, "--out", tmp_path / "p.png"], capsys)
    assert code == 2 and "the learned prior saw no PNEUMONIA training images" in err and err.count("\n") == 1
    assert not (tmp_path / "p.png").exists()
    code, text, _ = _cli(["sample", "--run", run, "--label", "normal", "--n", 2, "--out", tmp_path / "n.png"], capsys)
    assert code == 0 and (tmp_path / "n.png").is_file()


@pytest.mark.parametrize("case", ["unknown label", "no prior", "other latent shape", "unfinished prior",
                                  "label with N(0, I)", "guidance without the learned prior",
                                  "spread without the learned prior"])
def test_sample_bad_input_is_one_line_and_writes_nothing(case, prior_run, tmp_path, capsys):
    from spatialvae.prior_run import prior_path
    from spatialvae.runs import atomic_torch_save

    run = copy_run(prior_run[0], tmp_path)
    args = ["sample", "--run", run, "--sampler", "learned", "--n", 4, "--out", tmp_path / "out.png"]
    expected = {"unknown label": "unknown label 'cat'", "no prior": "has no learned prior",
                "other latent shape": "trained for latents of shape (4, 2, 2)",
                "unfinished prior": "stopped at step 10 of 20", "label with N(0, I)": "--label needs a sampler",
                "guidance without the learned prior": "--guidance applies to --sampler learned only",
                "spread without the learned prior": "--spread applies to --sampler learned only"}[case]
    if case == "unknown label":
        args += ["--label", "cat"]
    elif case == "no prior":
        prior_path(run).unlink()
    elif case == "other latent shape":
        x, y = two_clusters(20)
        atomic_torch_save({**LearnedPrior(tiny_cfg(steps=5)).fit(x, y).state_dict(), "done": True}, prior_path(run))
    elif case == "unfinished prior":
        blob = torch.load(prior_path(run), weights_only=True)
        atomic_torch_save({**blob, "done": False, "step": 10}, prior_path(run))
    elif case == "label with N(0, I)":
        args = ["sample", "--run", run, "--sampler", "standard_normal", "--label", "normal", "--out", tmp_path / "out.png"]
    else:
        flag = "--guidance" if case.startswith("guidance") else "--spread"
        args = ["sample", "--run", run, "--sampler", "gmm", flag, "2", "--out", tmp_path / "out.png"]
    code, _, err = _cli(args, capsys)
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: ") and expected in err
    assert "Traceback" not in err and not (tmp_path / "out.png").exists()


def test_a_run_prior_killed_mid_training_resumes_to_the_weights_of_one_never_stopped(prior_run, tmp_path,
                                                                                      monkeypatch):
    import warnings

    from spatialvae import prior_run as pr

    run = copy_run(prior_run[0], tmp_path)
    whole = torch.load(pr.prior_path(run), weights_only=True)  # `train` fitted it without stopping
    save = pr.atomic_torch_save

    class Killed(Exception):
        pass

    def save_then_die(blob, path):
        save(blob, path)
        if blob["step"] == 10:
            raise Killed  # the session dies right after the save at step 10 of 20

    monkeypatch.setattr(pr, "atomic_torch_save", save_then_die)
    with warnings.catch_warnings(), pytest.raises(Killed):
        warnings.simplefilter("ignore")
        pr.fit_run_prior(run, progress=False, log=lambda s: None, if_done="replace")
    monkeypatch.undo()
    stopped = torch.load(pr.prior_path(run), weights_only=True)
    assert stopped["step"] == 10 and not stopped["done"]
    logs: list[str] = []
    saved_steps: list[int] = []
    monkeypatch.setattr(pr, "atomic_torch_save",
                        lambda blob, path: (saved_steps.append(blob["step"]), save(blob, path)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pr.fit_run_prior(run, progress=False, log=logs.append)
    assert f"latent prior: resuming {pr.prior_path(run)} at step 10 of 20" in logs
    assert saved_steps == [20] and "prior step 10/20" not in " ".join(logs)  # steps 11 to 20 only, not a restart
    resumed = torch.load(pr.prior_path(run), weights_only=True)
    assert resumed["done"] and [h["step"] for h in resumed["history"]] == [10, 20]
    for key in ("net", "online"):
        for name, value in whole[key].items():
            assert torch.equal(value, resumed[key][name]), (key, name)


def test_prior_command_refuses_to_overwrite_and_retrains_with_force(prior_run, tmp_path, capsys):
    from spatialvae.prior_run import load_prior

    run = copy_run(prior_run[0], tmp_path)
    data = prior_run[1]["root"]
    code, _, err = _cli(["prior", "--run", run, "--data", data, "--quiet"], capsys)
    assert code == 2 and "already holds a trained prior; add --force" in err
    code, _, err = _cli(["prior", "--run", run, "--set", "train.seed=3"], capsys)
    assert code == 2 and "only prior.* settings" in err
    code, out, _ = _cli(["prior", "--run", run, "--data", data, "--force", "--quiet", "--set", "prior.steps=30"],
                        capsys)
    assert code == 0 and "30 steps" in out
    assert load_prior(run).cfg.steps == 30
    code, _, err = _cli(["prior", "--run", tmp_path / "nowhere"], capsys)
    assert code == 2 and "not a run folder" in err
    torch.save(torch.zeros(3), run / "checkpoints" / "prior.pt")  # a file that is no prior
    code, _, err = _cli(["prior", "--run", run, "--data", data, "--quiet"], capsys)
    assert code == 2 and "is not a spatialvae latent prior" in err and "--force" in err
    (run / "checkpoints" / "prior.pt").write_bytes(b"junk")
    code, _, err = _cli(["sample", "--run", run, "--sampler", "learned", "--out", tmp_path / "x.png"], capsys)
    assert code == 2 and "cannot read the latent prior" in err and not (tmp_path / "x.png").exists()


def test_evaluate_has_learned_and_conditional_rows_and_tstr(prior_run, offline):
    import warnings

    from spatialvae.lab.evaluate import SAMPLERS, evaluate_run
    from spatialvae.lab.report import metrics_table

    run, tree = prior_run
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = evaluate_run(run, data_root=tree["root"], device="cpu", batch_size=8, progress=False, inception="off",
                         tstr_per_class=3)
    assert list(m["samplers"]) == list(SAMPLERS)
    assert m["samplers"]["learned"]["conditional"] and not m["samplers"]["gmm"]["conditional"]
    t = m["tstr"]
    assert set(t) >= {"real", "gaussian_per_class", "gmm_per_class", "learned"}
    assert t["per_class"] == 3
    assert t["learned"]["n_train"] == 6 and t["learned"]["n"] == m["data"]["n_test"]
    assert t["learned"]["ratio_to_real"] == pytest.approx(t["learned"]["balanced_accuracy"]
                                                          / t["real"]["balanced_accuracy"])
    table = metrics_table(m)
    assert "| learned |" in table and "TSTR" in table
    for key in ("learned_normal", "learned_pneumonia", "gmm_per_class_normal", "gaussian_per_class_pneumonia"):
        assert (run / m["images"][key]).is_file()
    assert "learned_label_free_normal" not in m["images"]


def test_evaluate_skips_an_unfinished_prior_with_a_note(prior_run, tmp_path, offline):
    import warnings

    from spatialvae.lab.evaluate import evaluate_run
    from spatialvae.prior_run import prior_path
    from spatialvae.runs import atomic_torch_save

    run = copy_run(prior_run[0], tmp_path)
    blob = torch.load(prior_path(run), weights_only=True)
    atomic_torch_save({**blob, "done": False, "step": 10}, prior_path(run))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = evaluate_run(run, data_root=prior_run[1]["root"], device="cpu", batch_size=8, progress=False,
                         inception="off", tstr_per_class=0)
        assert "learned" not in m["samplers"] and m["tstr"] is None
        assert "stopped at step 10 of 20" in m["learned_prior_unavailable"]
        with pytest.raises(SpatialVAEError, match="stopped at step 10"):
            evaluate_run(run, data_root=prior_run[1]["root"], device="cpu", progress=False, inception="off",
                         samplers=("learned",))


def test_tstr_classifier_is_the_same_whatever_ran_before():
    from spatialvae.lab.features import FeatureNetConfig
    from spatialvae.lab.tstr import LabelledImages, train_and_test

    g = torch.Generator().manual_seed(0)
    labels = torch.arange(2).repeat_interleave(12)
    images = (torch.rand(24, 1, 16, 16, generator=g) + labels.view(-1, 1, 1, 1)) / 2
    data = LabelledImages(images, labels)
    cfg = FeatureNetConfig(image_size=16, widths=(4, 8), epochs=2, batch_size=8)
    first = train_and_test(data, data, data, cfg)
    torch.rand(1000)  # somebody else used the global RNG in between
    again = train_and_test(data, data, data, cfg)
    assert {k: v for k, v in first.items() if k != "seconds"} == {k: v for k, v in again.items() if k != "seconds"}


def test_tstr_repeats_average_classifiers_with_different_seeds():
    from spatialvae.lab.features import FeatureNetConfig
    from spatialvae.lab.tstr import LabelledImages, repeated

    g = torch.Generator().manual_seed(0)
    labels = torch.arange(2).repeat_interleave(12)
    data = LabelledImages((torch.rand(24, 1, 16, 16, generator=g) + labels.view(-1, 1, 1, 1)) / 2, labels)
    r = repeated(data, data, data, FeatureNetConfig(image_size=16, widths=(4, 8), epochs=2, batch_size=8), repeats=3)
    bal = [x["balanced_accuracy"] for x in r["runs"]]
    assert r["repeats"] == 3 and r["balanced_accuracy"] == pytest.approx(sum(bal) / 3)
    assert r["balanced_accuracy_std"] == pytest.approx(float(torch.tensor(bal, dtype=torch.float64).std()))
    assert len({x["final_train_loss"] for x in r["runs"]}) == 3  # three different classifier seeds


def test_encode_originals_ignores_training_flips_and_restores_them(prior_run):
    import warnings

    from spatialvae.config import Config
    from spatialvae.data import as_float_images, make_datasets
    from spatialvae.runs import load_model
    from spatialvae.sampling import encode_dataset, encode_originals

    run, tree = prior_run
    model, _, _ = load_model(run / "checkpoints" / "best.pt")
    cfg = Config.from_json(run / "config.json")
    cfg.data.root = str(tree["root"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train = make_datasets(cfg.data, seed=cfg.train.seed, progress=False).train
    train.set_epoch(5)
    flips_before = train._flip.clone()
    assert train.hflip and flips_before.any()  # some images are served mirrored this epoch
    mu = encode_originals(model, train, batch_size=8)
    assert torch.allclose(mu, encode_dataset(model, as_float_images(train.images), batch_size=8), atol=1e-6)
    assert train.hflip and train.epoch == 5 and torch.equal(train._flip, flips_before)
