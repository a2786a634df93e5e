"""Evaluation: metric helpers on known inputs, FID/KID plumbing on synthetic features, and
`evaluate_run` end to end on a smoke run. No test downloads anything: TORCH_HOME points at an
empty folder and every download raises."""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch
from conftest import copy_run, make_kaggle_tree, save_jpeg

from spatialvae import scores as S
from spatialvae.config import get_preset
from spatialvae.data import plan_for, unused_train_files
from spatialvae.errors import SpatialVAEError, WeightsError
from spatialvae.lab import evaluate as ev
from spatialvae.lab import metrics as M

torch.set_num_threads(2)


# ---- metric helpers ------------------------------------------------------------------------------

def images(n=4, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return 0.1 + 0.8 * torch.rand(n, 1, size, size, generator=g)  # room for a +0.1 offset inside [0, 1]


def test_identical_images_score_perfectly():
    x = images()
    assert torch.allclose(S.ssim_score(x, x), torch.ones(4))
    assert torch.equal(S.l1(x, x), torch.zeros(4))
    assert torch.equal(S.psnr(x, x), torch.full((4,), S.PSNR_CAP_DB))  # inf, capped for means and JSON


def test_psnr_and_l1_of_a_constant_offset():
    x = images()
    # MSE = 0.01 with data range 1 -> 10 * log10(1 / 0.01) = 20 dB exactly.
    assert torch.allclose(S.psnr(x + 0.1, x), torch.full((4,), 20.0), atol=1e-4)
    assert torch.allclose(S.l1(x + 0.1, x), torch.full((4,), 0.1), atol=1e-6)
    assert (S.ssim_score(x + 0.1, x) < 1).all()


@pytest.mark.parametrize("size,win", [(128, 7), (64, 3), (32, 3), (16, 3)])
def test_pairwise_ms_ssim_works_at_small_sizes(size, win):
    same = images(1, size).repeat(6, 1, 1, 1)
    r = M.pairwise_ms_ssim(same)
    assert r["n_pairs"] == 15 and r["mean"] == pytest.approx(1.0, abs=1e-5)
    assert r["win_size"] == win and M.ms_ssim_window(max(33, size)) == win
    noise = M.pairwise_ms_ssim(images(6, size, seed=1))
    assert noise["mean"] < 0.9


def test_pairwise_ms_ssim_uses_a_seeded_subset_of_at_most_50():
    x = images(60, 16)
    a = M.pairwise_ms_ssim(x, seed=3)
    assert a["n_images"] == 50 and a["n_pairs"] == 50 * 49 // 2
    assert a == M.pairwise_ms_ssim(x, seed=3)


def test_nearest_neighbour_is_zero_for_training_images_in_either_orientation():
    train = (torch.rand(40, 16, 16, generator=torch.Generator().manual_seed(0)) * 255).round().byte()
    as_float = train.unsqueeze(1).float() / 255
    queries = torch.cat([as_float[[3, 17]], as_float[[25]].flip(-1), images(2, 16, seed=5)])
    d, i = M.nearest_neighbour(queries, train, query_chunk=2, ref_chunk=7)  # chunks that do not divide evenly
    assert d[:3].tolist() == [0.0, 0.0, 0.0] and i[:3].tolist() == [3, 17, 25]
    assert (d[3:] > 0.1).all()
    d_noflip, _ = M.nearest_neighbour(queries, train, flips=False)
    assert d_noflip[2] > 0.1  # the mirrored copy only matches when flips are compared
    expected = (queries[3:].flatten(1)[:, None] - as_float.flatten(1)[None]).pow(2).mean(-1).sqrt().min(1).values
    assert torch.allclose(d_noflip[3:], expected, atol=1e-6)


def test_fid_and_kid_on_known_features():
    g = torch.Generator().manual_seed(0)
    real = torch.randn(400, 16, generator=g, dtype=torch.float64)
    same_dist = torch.randn(400, 16, generator=g, dtype=torch.float64)
    same = M.fid_kid(real, same_dist)
    assert same["fid"] < 1.0 and abs(same["kid_mean"]) < 0.05
    # A shift of 1 in each of 16 dims with equal covariances: FID = |mu1 - mu2|^2 = 16.
    shifted = M.fid_kid(real, real + 1.0)
    assert shifted["fid"] == pytest.approx(16.0, abs=1e-3) and shifted["kid_mean"] > 1.0
    assert M.fid_kid(real, same_dist, seed=1) == M.fid_kid(real, same_dist, seed=1)  # KID subsets seeded


def test_inception_features_feed_uint8_rgb():
    seen = {}

    class FakeNet(torch.nn.Module):
        def forward(self, x):
            seen["dtype"], seen["shape"] = x.dtype, tuple(x.shape)
            return x.float().mean((2, 3))

    x = torch.full((5, 1, 8, 8), 0.5)
    f = M.inception_features(FakeNet(), x, batch_size=2)
    assert seen == {"dtype": torch.uint8, "shape": (1, 3, 8, 8)}  # the last batch of 5 in 2s
    assert f.shape == (5, 3) and torch.allclose(f, torch.full((5, 3), 127.0, dtype=torch.float64))


# ---- no downloads (the `offline` fixture is in conftest.py) ---------------------------------------

def test_load_inception_reports_missing_weights_without_raising(offline):
    net, path, reason = M.load_inception("auto")
    assert net is None and path is None
    assert M.INCEPTION_FILE in reason and "download failed" in reason and "\n" not in reason
    assert offline == [M.INCEPTION_URL]
    assert M.load_inception("off") == (None, None, "skipped (inception='off')")
    assert len(offline) == 1


def test_explicit_inception_path_must_be_usable(offline, tmp_path):
    with pytest.raises(WeightsError, match="not a file"):
        M.load_inception(str(tmp_path / "missing.pth"))
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="cannot use Inception weights"):
        M.load_inception(str(bad))
    assert offline == []


# ---- evaluate_run ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def smoke_run(fake_smoke_run, tmp_path_factory):
    """A copy of the session's smoke run on the tiny fake Kaggle tree (conftest), without its learned
    prior and without a sharp decoder (should the smoke preset ever train one)."""
    run = copy_run(fake_smoke_run[0], tmp_path_factory.mktemp("smoke"))
    (run / "checkpoints" / "prior.pt").unlink()
    (run / "checkpoints" / "sharp.pt").unlink(missing_ok=True)
    return run, fake_smoke_run[1]


SHARPNESS_KEYS = {"power_0.25-0.5", "power_0.5-0.75", "power_0.75-1", "laplacian"}


def _assert_ratios(r):
    assert set(r) == SHARPNESS_KEYS and all(isinstance(v, float) and math.isfinite(v) and v > 0 for v in r.values()), r


def _evaluate(run, tree, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ev.evaluate_run(run, data_root=tree["root"], device="cpu", batch_size=8, progress=False, **kw)


def test_evaluate_run_offline_writes_metrics_with_null_fid(smoke_run, offline):
    run, tree = smoke_run
    m = _evaluate(run, tree)
    assert json.loads((run / "metrics.json").read_text()) == m
    assert not list(run.glob(".*.tmp"))

    assert "download failed" in m["inception_unavailable"] and M.INCEPTION_FILE in m["inception_unavailable"]
    assert len(offline) == 1  # one quick attempt, no retries
    assert m["reference"]["train_vs_test"]["fid"] is None
    # No checkpoints/prior.pt in this run: every sampler but the learned ones.
    assert list(m["samplers"]) == [n for n in ev.SAMPLERS if n not in ev.LEARNED]
    assert m["tstr"]["real"]["n"] == 6 and "learned" not in m["tstr"]
    # The cap (16 a class) leaves no training file out of this tree: the C2ST falls back to val, too small here.
    assert "real images the VAE never trained on (val)" in m["c2st"]["skipped"]
    for name, s in m["samplers"].items():
        assert s["fid"] is None and s["kid_mean"] is None and s["kid_std"] is None
        assert 0 < s["ms_ssim_diversity"]["mean"] <= 1
        nn = s["nn_train_rmse"]
        assert 0 <= nn["min"] <= nn["median"] <= nn["max"] and nn["min"] <= nn["mean"] <= nn["max"]
        assert (run / m["images"][name]).is_file()

    test_counts = tree["readable"]["test"]
    assert m["data"]["n_test"] == 6 and m["n_generated"] == 6 and "default" in m["n_generated_note"]
    r = m["reconstruction"]
    assert r["overall"]["n"] == 6 and r["NORMAL"]["n"] == test_counts["NORMAL"]
    assert r["PNEUMONIA"]["n"] == test_counts["PNEUMONIA"]
    floor = m["floors"]["mean_image"]  # the smoke model (an area-down, bicubic-up start) beats the mean image
    assert r["overall"]["psnr_db"] > floor["psnr_db"] and floor["ssim"] < r["overall"]["ssim"] <= 1
    assert 0 < r["overall"]["l1"] < 1
    assert m["reference"]["test_nn_train_rmse"]["min"] >= 0
    for key in ("reconstructions", "interpolation"):
        assert (run / m["images"][key]).is_file()
    assert m["checkpoint"]["path"].endswith("best.pt") and m["checkpoint"]["epoch"] >= 1
    # Sharpness of the (smooth) decoder: no learned prior here, so no learned row; no sharp decoder, no comparison.
    sh = m["sharpness"]
    assert sh["decoder"] == m["decoder"] == "smooth" and sh["learned"] is None and "smooth_decoder" not in m
    for key in ("reconstructions", "reference_real", "blur_sigma_0.5", "blur_sigma_1"):
        _assert_ratios(sh[key])
    assert sh["blur_sigma_1"]["laplacian"] < sh["blur_sigma_0.5"]["laplacian"] < 1
    assert not any(k.startswith("texture") for k in m["images"]) and not list(run.glob("samples/eval_texture*"))
    assert m["preset"] == "smoke" and m["image_size"] == 32
    assert m["perceptual_mode"].startswith("perceptual term OFF") and m["seconds"] > 0

    # The grids' first tiles as tensors, for figures drawn from tensors (the ablation figure).
    tiles = ev.load_eval_images(run)
    assert set(tiles) == {"reconstructions", *m["samplers"]}
    assert tiles["reconstructions"].shape == (12, 1, 32, 32)  # 6 test images: 6 originals above 6 reconstructions
    test = torch.stack([torch.from_numpy(im).float() / 255 for im in _test_images_in_sheet_order(m, tree)])
    assert torch.allclose(tiles["reconstructions"][:6, 0], test, atol=1 / 255)
    assert all(tiles[n].shape == (6, 1, 32, 32) and 0 <= tiles[n].min() <= tiles[n].max() <= 1 for n in m["samplers"])


def _test_images_in_sheet_order(m, tree):
    """The test images in the order the reconstruction sheet shows them (class-balanced seeded pick)."""
    from spatialvae.config import get_preset
    from spatialvae.data import make_datasets

    cfg = get_preset("smoke")
    cfg.data.root = str(tree["root"])
    test = make_datasets(cfg.data, progress=False).test
    pick = ev._class_balanced_indices(test.labels, 16, 0)
    return [test.images[i].numpy() for i in pick]


def test_evaluate_run_with_a_feature_network_fills_fid_and_kid(smoke_run, offline, monkeypatch):
    """The FID/KID path with a tiny stand-in for Inception (the real one needs its weights)."""
    class PooledPixels(torch.nn.Module):
        def forward(self, x):  # (B, 3, H, W) uint8 -> (B, 12)
            return torch.nn.functional.adaptive_avg_pool2d(x.float() / 255, 2).flatten(1)

    monkeypatch.setattr(ev, "load_inception", lambda spec: (PooledPixels(), "stand-in", None))
    run, tree = smoke_run
    m = _evaluate(run, tree, samplers=("standard_normal", "gaussian"))
    assert "inception_unavailable" not in m and m["inception"]["weights"] == "stand-in"
    floor = m["reference"]["train_vs_test"]
    assert floor["n_train"] == 6 and floor["fid"] >= 0 and floor["kid_std"] >= 0
    for s in m["samplers"].values():
        assert s["fid"] >= 0 and isinstance(s["kid_mean"], float)


def test_evaluate_run_options(smoke_run, offline, monkeypatch):
    run, tree = smoke_run
    with monkeypatch.context() as mp:  # N(0, I) alone needs no training latents: none are encoded
        mp.setattr(ev, "encode_originals", lambda *a, **k: pytest.fail("encoded the training split for nothing"))
        m = _evaluate(run, tree, inception="off", checkpoint="last", n_samples=4, samplers=("standard_normal",), c2st=False)
    assert offline == [] and m["c2st"] is None  # "off" never tries to download
    assert m["inception_unavailable"] == "skipped (inception='off')"
    assert m["n_generated"] == 4 and "n_samples" in m["n_generated_note"]
    assert list(m["samplers"]) == ["standard_normal"] and m["checkpoint"]["path"].endswith("last.pt")
    with pytest.raises(SpatialVAEError, match="no features file"):
        _evaluate(run, tree, features_path="features.pt")
    with pytest.raises(SpatialVAEError, match="unknown sampler"):
        _evaluate(run, tree, samplers=("vamp",))
    with pytest.raises(SpatialVAEError, match="has no sharp decoder"):
        _evaluate(run, tree, checkpoint="sharp")


def test_evaluate_run_on_real_data_smoke_run(real_smoke_run, tmp_path, offline):
    """The session's `train --preset smoke` on the real data, then the evaluation."""
    run = copy_run(real_smoke_run, tmp_path)
    m = ev.evaluate_run(run, device="cpu", progress=False, samplers=("standard_normal", "gaussian"))
    assert m["inception_unavailable"] and m["samplers"]["standard_normal"]["fid"] is None
    assert m["n_generated"] == m["data"]["n_test"] == sum(m["data"]["test_counts"].values())
    assert m["reconstruction"]["NORMAL"]["n"] > 0 and m["reconstruction"]["PNEUMONIA"]["n"] > 0
    assert (run / "metrics.json").is_file() and (run / "samples" / "eval_gaussian.png").is_file()


def test_load_eval_images_missing_or_damaged_file(tmp_path):
    assert ev.load_eval_images(tmp_path) == {}
    ev.eval_images_path(tmp_path).parent.mkdir(parents=True)
    ev.eval_images_path(tmp_path).write_bytes(b"not a tensor file")
    with pytest.warns(UserWarning, match="run `evaluate` again"):
        assert ev.load_eval_images(tmp_path) == {}


def test_eval_images_written_before_the_sampler_rename_load_under_the_new_name(tmp_path):
    tiles = torch.full((2, 1, 4, 4), 51, dtype=torch.uint8)
    ev.eval_images_path(tmp_path).parent.mkdir(parents=True)
    torch.save({"prior": tiles, "gmm": tiles}, ev.eval_images_path(tmp_path))  # N(0, I)'s key before the rename
    got = ev.load_eval_images(tmp_path)
    assert set(got) == {"standard_normal", "gmm"} and torch.equal(got["standard_normal"], torch.full((2, 1, 4, 4), 0.2))


# ---- the classifier two-sample test (spatialvae.lab.c2st) -----------------------------------------------

def _tree_with_more_training_images(tmp_path, per_class=24):
    """The fake tree plus ``per_class`` more training images a class, so the smoke cap (16 a class)
    leaves training files out."""
    tree = make_kaggle_tree(tmp_path)
    for i in range(per_class):
        save_jpeg(tree["root"] / "train" / "NORMAL" / f"IM-{2000 + i}-0001.jpeg", seed=500 + i)
        save_jpeg(tree["root"] / "train" / "PNEUMONIA" / f"person{3000 + i}_bacteria_{9000 + i}.jpeg", seed=600 + i)
    return tree


def test_unused_training_files_share_no_patient_with_the_capped_split(tmp_path):
    tree = _tree_with_more_training_images(tmp_path)
    cfg = get_preset("smoke").data
    cfg.root = str(tree["root"])
    used = plan_for(cfg).files["train"]
    unused = unused_train_files(cfg)
    assert len(unused) >= 24 and not {e.patient for e in used} & {e.patient for e in unused}
    cfg.max_per_class = None
    assert unused_train_files(cfg) == []


def test_c2st_reference_picks_the_class_mix_and_halves_share_no_image():
    labels = torch.tensor([0] * 3 + [1] * 20)
    pick = ev._pick_in_mix(labels, 10, torch.tensor([0.5, 0.5]), seed=0)  # 5 NORMAL asked, 3 exist: 7 PNEUMONIA
    assert len(pick.unique()) == 10 and torch.bincount(labels[pick]).tolist() == [3, 7]
    assert torch.equal(pick, ev._pick_in_mix(labels, 10, torch.tensor([0.5, 0.5]), seed=0))
    a, b = ev._halves_by_class(torch.tensor([0] * 5 + [1] * 8), seed=0)
    assert not set(a.tolist()) & set(b.tolist())
    assert torch.bincount(torch.tensor([0] * 5 + [1] * 8)[a]).tolist() == [2, 4]
    assert torch.bincount(torch.tensor([0] * 5 + [1] * 8)[b]).tolist() == [2, 4]


def test_evaluate_run_c2st_of_learned_samples_and_reconstructions(smoke_run, tmp_path, offline):
    """metrics.json's c2st section, against training files the run left out (a tiny stand-in prior)."""

    from spatialvae.config import PriorConfig
    from spatialvae.lab.report import metrics_table
    from spatialvae.prior import LearnedPrior
    from spatialvae.prior_run import prior_path
    from spatialvae.runs import atomic_torch_save

    run = copy_run(smoke_run[0], tmp_path)
    tiny = PriorConfig(width=32, depth=1, heads=2, steps=5, batch_size=16, warmup_steps=1, sample_steps=2, log_every=5)
    latents, labels = torch.randn(40, 8, 4, 4), torch.arange(2).repeat_interleave(20)
    atomic_torch_save({**LearnedPrior(tiny).fit(latents, labels).state_dict(), "done": True}, prior_path(run))
    tree = _tree_with_more_training_images(tmp_path / "data")
    m = _evaluate(run, tree, inception="off", samplers=("standard_normal", "learned"), n_samples=16, tstr_per_class=0)
    c = m["c2st"]
    assert c["reference"]["source"] == "train_unused" and c["reference"]["n"] >= 8
    for name in ("learned", "reconstructions"):
        r = c[name]
        assert 0 <= r["accuracy"] <= 1 and 0 <= r["p_value"] <= 1 and r["reference"] == "train_unused"
        assert r["n_fake"] == r["n_real"] == c["reference"]["n"] and r["n_heldout"] >= 8 and r["seconds"] >= 0
    assert "| C2ST vs" in metrics_table(m) and "| reconstructions |" in metrics_table(m)


# ---- the sharp decoder (texture stage) beside the smooth one -------------------------------------------

@pytest.fixture(scope="module")
def sharp_run(fake_smoke_run, tmp_path_factory):
    """A copy of the session's smoke run (with its learned prior) after a 4-step texture stage: sharp.pt
    beside best.pt."""
    from spatialvae.config import Config
    from spatialvae.texture_run import fit_run_texture

    run = copy_run(fake_smoke_run[0], tmp_path_factory.mktemp("sharp"))
    cfg = Config.from_json(run / "config.json").with_overrides(["texture.steps=4", "texture.log_every=2",
                                                                 "texture.batch_size=2"])
    fit_run_texture(run, cfg, device="cpu", progress=False, log=lambda msg: None)
    return run, fake_smoke_run[1]


def _untrained_features_file(path):
    """A features file around an untrained tiny extractor: enough for the domain FD's plumbing."""
    from dataclasses import asdict

    from spatialvae.lab.features import FeatureNetConfig, XRayFeatureNet, save_feature_net

    cfg = FeatureNetConfig(image_size=32, widths=(4, 8))
    torch.manual_seed(0)
    return save_feature_net(path, XRayFeatureNet(cfg.widths, cfg.dropout), {"config": asdict(cfg),
                                                                            "test": {"accuracy": 0.5}})


def test_evaluate_sharp_decoder_beside_the_smooth_one(sharp_run, tmp_path, offline, monkeypatch):
    """The default on a run with sharp.pt: it is evaluated, and best.pt's figures come beside it; then
    the smooth decoder alone (best.pt) gives those very figures."""
    from PIL import Image

    from spatialvae.lab.report import metrics_table

    monkeypatch.setattr(ev, "_class_grids", lambda *a, **k: {})  # the per-class sampler grids: tested elsewhere
    run = sharp_run[0]
    tree = _tree_with_more_training_images(tmp_path / "data")  # the plain tree's 2 validation images are too few for KID
    features = _untrained_features_file(tmp_path / "features.pt")
    kw = dict(inception="off", samplers=("learned",), tstr_per_class=0, c2st=False, features_path=features)
    m = _evaluate(run, tree, **kw)
    assert m["decoder"] == m["sharpness"]["decoder"] == "sharp" and m["checkpoint"]["path"].endswith("sharp.pt")
    sh, sm = m["sharpness"], m["smooth_decoder"]
    for key in ("reconstructions", "learned", "reference_real", "blur_sigma_0.5", "blur_sigma_1"):
        _assert_ratios(sh[key])
    _assert_ratios(sm["sharpness"]["reconstructions"])
    _assert_ratios(sm["sharpness"]["learned"])
    assert sm["sharpness"]["reconstructions"] != sh["reconstructions"]  # the head moved
    assert sm["checkpoint"].endswith("best.pt") and 0 < sm["ssim"] <= 1 and math.isfinite(sm["psnr_db"])
    assert set(sm["decoder_floor"]) == set(m["domain"]["decoder_floor"])
    # Full size: 6 test images (the fake tree's) in 3 rows, 8 latents a class in 2 rows, 32 px tiles, 2 px padding.
    for key, (cols, rows) in (("texture_reconstructions", (6, 3)), ("texture_learned_NORMAL", (8, 2)),
                              ("texture_learned_PNEUMONIA", (8, 2))):
        path = run / m["images"][key]
        assert path.name == f"eval_{key}.png" and Image.open(path).size == (cols * 34 + 2, rows * 34 + 2)
    table = metrics_table(m)
    assert "| smooth (best.pt, before it) |" in table and "| sharpness" in table
    assert "| smooth decoder: learned-prior samples / validation images |" in table

    smooth = _evaluate(run, tree, checkpoint="smooth", **kw)
    assert smooth["decoder"] == "smooth" and smooth["checkpoint"]["path"].endswith("best.pt")
    assert "smooth_decoder" not in smooth and not any(k.startswith("texture") for k in smooth["images"])
    rec = smooth["reconstruction"]["overall"]
    assert (rec["psnr_db"], rec["ssim"], rec["l1"]) == (sm["psnr_db"], sm["ssim"], sm["l1"])
    assert smooth["sharpness"]["reconstructions"] == sm["sharpness"]["reconstructions"]
    assert smooth["sharpness"]["learned"] == sm["sharpness"]["learned"]  # the same latents, decoded smooth
    assert smooth["domain"]["decoder_floor"] == sm["decoder_floor"]


@pytest.mark.parametrize("flags, checkpoint", [([], "auto"), (["--decoder", "smooth"], "smooth"),
                                               (["--decoder", "sharp"], "sharp"), (["--checkpoint", "last"], "last")])
def test_evaluate_command_picks_the_decoder(flags, checkpoint, monkeypatch, capsys):
    """`evaluate --decoder` / `--checkpoint` reach evaluate_run as its checkpoint (default: sharp.pt when present)."""
    from spatialvae.cli import main

    seen = {}

    def fake_evaluate_run(run, checkpoint, **kw):
        seen["checkpoint"] = checkpoint
        raise SpatialVAEError("stop here")

    monkeypatch.setattr(ev, "evaluate_run", fake_evaluate_run)
    assert main(["evaluate", "--run", "RUN", *flags]) == 2 and seen == {"checkpoint": checkpoint}
    assert main(["evaluate", "--run", "RUN", "--decoder", "smooth", "--checkpoint", "last"]) == 2
    assert "not both" in capsys.readouterr().err


def test_one_name_per_sampler_and_old_files_read_with_todays(tmp_path):
    from spatialvae.sampling import OLD_SAMPLER_NAMES, SAMPLER_NAMES, GaussianSampler

    assert ev.SAMPLERS == SAMPLER_NAMES and GaussianSampler.name == "gaussian"
    assert set(ev.TSTR_SOURCES) <= set(SAMPLER_NAMES) and not set(OLD_SAMPLER_NAMES) & set(SAMPLER_NAMES)
    old = {"samplers": {"aggregate_posterior": {"fd": 1.0}, "gmm": {"fd": 2.0}},
           "tstr": {"aggregate_posterior_per_class": {"acc": 0.5}}, "floors": {"mean image": {}}}
    (tmp_path / "metrics.json").write_text(json.dumps(old))
    m = ev.read_metrics(tmp_path / "metrics.json")
    assert m["samplers"] == {"gaussian": {"fd": 1.0}, "gmm": {"fd": 2.0}}
    assert m["tstr"] == {"gaussian_per_class": {"acc": 0.5}} and m["floors"] == old["floors"]
