"""The chest X-ray feature space: a tiny extractor trained for seconds, its file, and the domain FD."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import copy_run

from spatialvae.errors import CheckpointError, SpatialVAEError
from spatialvae.lab.features import (
    FeatureNetConfig,
    XRayFeatureNet,
    build_features_file,
    classification_report,
    degraded_versions,
    domain_fd_kid,
    extract_features,
    load_feature_net,
    save_feature_net,
)

REPO = Path(__file__).resolve().parents[1]
TINY = dict(image_size=32, epochs=3, max_per_class=48, widths=(8, 16, 16))


@pytest.mark.parametrize("size,widths", [(32, (8, 16)), (64, (8, 16, 32, 32))])
def test_feature_net_shapes(size, widths):
    net = XRayFeatureNet(widths).eval()
    x = torch.rand(3, 1, size, size)
    assert net(x).shape == (3, 2) and net.features(x).shape == (3, widths[-1]) == (3, net.num_features)


def test_extract_features_resizes_and_accepts_uint8():
    net = XRayFeatureNet((4, 8))
    f_float = extract_features(net, torch.rand(5, 1, 64, 64), image_size=32)
    f_u8 = extract_features(net, torch.randint(0, 256, (5, 48, 48), dtype=torch.uint8), image_size=32)
    assert f_float.shape == f_u8.shape == (5, 8) and f_float.dtype == torch.float64


def test_classification_report_counts():
    probs = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]])
    labels = torch.tensor([0, 1, 1, 0])
    r = classification_report(probs, labels)
    assert (r["accuracy"], r["sensitivity"], r["specificity"], r["n"]) == (0.5, 0.5, 0.5, 4)


def test_domain_fd_is_zero_for_identical_sets_and_grows_with_a_shift():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(400, 6, generator=g, dtype=torch.float64)
    assert domain_fd_kid(a, a)["fd"] == pytest.approx(0, abs=1e-6)
    assert domain_fd_kid(a, a + 1.0)["fd"] == pytest.approx(6.0, rel=1e-3)  # ||mu1 - mu2||^2, same covariance


def test_degraded_versions_are_worse_copies():
    x = torch.rand(4, 1, 32, 32)
    d = degraded_versions(x)
    assert set(d) == {"blurred", "noised", "random_noise"}
    assert all(v.shape == x.shape and 0 <= float(v.min()) and float(v.max()) <= 1 for v in d.values())
    assert d["blurred"].std() < x.std()


@pytest.fixture(scope="module")
def tiny_features(real_data_root, tmp_path_factory):
    folder = tmp_path_factory.mktemp("features")
    info = build_features_file(real_data_root, folder / "xray_features.pt", progress=False, log=lambda *_: None,
                               cache_dir=folder / "cache", **TINY)
    out = folder / "xray_features.pt"
    return out, info


def test_tiny_extractor_file_round_trip_and_sanity_ranking(tiny_features):
    path, info = tiny_features
    net, loaded = load_feature_net(path)
    assert isinstance(loaded["config"], FeatureNetConfig) and loaded["config"].widths == (8, 16, 16)
    assert loaded["test"]["n"] == 96 and 0 <= loaded["test"]["accuracy"] <= 1
    assert len(loaded["history"]) == 3 and loaded["floor"]["n_test"] == 96
    sanity = loaded["sanity"]
    # Obviously worse images rank as worse: clean test images are closest, random noise is farthest.
    assert sanity["ranked"][0] == "clean" and sanity["ranked"][-1] == "random_noise"
    assert sanity["clean"] < sanity["blurred"] and sanity["clean"] < sanity["noised"]
    assert loaded["floor"]["fd"] == pytest.approx(sanity["clean"], rel=1e-6)  # the same two sets


def test_features_file_errors(tmp_path):
    with pytest.raises(SpatialVAEError, match="no features file"):
        load_feature_net(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(CheckpointError, match="cannot read"):
        load_feature_net(tmp_path / "junk.pt")
    torch.save({"model": {}}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a spatialvae features file"):
        load_feature_net(tmp_path / "other.pt")
    save_feature_net(tmp_path / "ok.pt", XRayFeatureNet((4, 8)),
                     {"config": {**FeatureNetConfig(widths=(4, 8)).__dict__}, "test": {}})
    assert load_feature_net(tmp_path / "ok.pt")[0].num_features == 8


def test_features_cli_and_evaluate_with_features(tiny_features, real_smoke_run, tmp_path, capsys):
    from spatialvae.cli import main

    path, _ = tiny_features
    run = copy_run(real_smoke_run, tmp_path)
    # the C2ST is tested in test_evaluate; TSTR here (its classifiers on real images)
    assert main(["evaluate", "--run", str(run), "--features", str(path), "--inception", "off", "--no-c2st",
                 "--quiet"]) == 0
    stdout = capsys.readouterr().out
    assert "FD vs train" in stdout and "real train images (floor)" in stdout
    m = json.loads((run / "metrics.json").read_text())
    dom = m["domain"]
    assert dom["feature_dim"] == 16 and dom["n_test"] == m["n_generated"] == 32
    assert dom["floor_train_vs_test"]["fd"] >= 0
    assert dom["floor_train_vs_train"]["n"] == dom["n_train_reference"] == 16  # two disjoint halves of 32
    # the validation row and every sampler's FD vs train at the validation row's n (FD grows as n shrinks)
    assert 1 <= dom["val_vs_train"]["n"] <= dom["n_train_reference"] and dom["val_vs_train"]["fd"] >= 0
    normal, pneumonia = dom["val_vs_train"]["class_counts"].values()  # in train's 16 : 16 mix, not val's own
    assert abs(normal - pneumonia) <= 1 and normal + pneumonia == dom["val_vs_train"]["n"]
    assert "real validation images (held-out patients: the bar)" in stdout
    for name in ("standard_normal", "gaussian", "learned", "gmm_per_class"):
        s = m["samplers"][name]
        assert s["domain_fd"] >= 0 and s["domain_kid_std"] > 0 and s["domain_fd_vs_train"] >= 0
        assert s["domain_fd_vs_train_at_val_n"] >= 0
    floor = dom["decoder_floor"]  # the smoke run trains its learned prior; evaluate prints the decoder's floor
    assert floor["n"] == 16 and floor["fd_vs_train"] >= 0 and floor["test_reconstructions_fd_vs_train"] >= 0
    assert "decoder floor" in stdout and "TSTR" in stdout and m["tstr"]["real"]["n"] == 32
    assert main(["evaluate", "--run", str(run), "--features", str(tmp_path / "nope.pt"), "--inception", "off"]) == 2
    err = capsys.readouterr().err
    assert "no features file" in err and "Traceback" not in err
