"""Ablation: each variant changes exactly what it says, on the same images and epochs; the command
trains, evaluates, tabulates, resumes without retraining, and fails fast on missing VGG weights."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from spatialvae.cli import main
from spatialvae.config import flatten as flat
from spatialvae.errors import ConfigError
from spatialvae.lab.report import ablation_table
from spatialvae.lab.variants import VARIANT_NAMES, ablation_base, variant_configs
from spatialvae.training import get_beta, total_epochs


def changed(a, b) -> set:
    fa, fb = flat(a.to_dict()), flat(b.to_dict())
    return {k for k in fa if fa[k] != fb[k]}


@pytest.fixture(scope="module")
def configs():
    base = ablation_base("quick", (8, 10), perceptual="random")
    return base, variant_configs(base)


@pytest.mark.parametrize("name, expected", [
    ("recipe", set()),
    ("no_perceptual", {"loss.perceptual_weight"}),
    ("no_ssim", {"loss.ssim_weight"}),
    ("mse", {"loss.recon"}),
    ("no_attention", {"model.attention_resolutions"}),
    ("transposed", {"model.upsample"}),
    ("conv_skips", {"model.shortcut", "model.logvar_init"}),
    ("kl_sum", {"loss.kl_reduction"}),
    ("literal", {"model.shortcut", "model.logvar_init", "loss.kl_reduction"}),
])
def test_single_change_variants_change_one_field(configs, name, expected):
    base, cfgs = configs
    assert changed(cfgs[name], base) == expected


def test_every_variant_sees_the_same_images_for_the_same_number_of_epochs(configs):
    base, cfgs = configs
    assert list(cfgs) == list(VARIANT_NAMES)
    for name, cfg in cfgs.items():
        assert cfg.data == base.data, name
        assert total_epochs(cfg.train) == 18, name
        assert cfg.train.seed == base.train.seed


def test_single_phase_has_kl_from_the_first_epoch(configs):
    base, cfgs = configs
    t = cfgs["single_phase"].train
    assert t.phase1.epochs == 0 and t.phase2.epochs == 18
    assert [get_beta(e, t) for e in (0, 9, 17)] == [1e-3, 1e-3, 1e-3]
    assert get_beta(0, base.train) == 0.0 and get_beta(17, base.train) == 1e-3  # the recipe anneals
    assert changed(cfgs["single_phase"], base) <= {k for k in flat(base.to_dict()) if k.startswith("train.phase")}


def test_original_is_the_original_baseline_on_the_recipe_widths(configs):
    base, cfgs = configs
    o = cfgs["original"]
    assert o.model.architecture == "original" and o.model.channels == base.model.channels
    assert (o.loss.recon, o.loss.pixel_reduction, o.loss.kl_reduction) == ("mse", "sum", "sum")
    assert o.loss.perceptual_weight == 0 and o.loss.ssim_weight == 0
    assert [get_beta(e, o.train) for e in (0, 17)] == [0.5, 0.5]
    assert not {k for k in changed(o, base) if k.startswith("data.")}


def test_perceptual_off_drops_the_no_perceptual_variant():
    base = ablation_base("smoke", (1, 1), perceptual="off")
    assert base.loss.perceptual_weight == 0
    assert "no_perceptual" not in variant_configs(base)
    random = ablation_base("smoke", (1, 1), perceptual="random")
    assert random.loss.perceptual_weight == 0.1 and random.loss.vgg_weights == "random"  # smoke had it off


@pytest.mark.parametrize("call, match", [
    (lambda: variant_configs(ablation_base("smoke", (1, 1), "off"), ["recipe", "dropout"]), "dropout"),
    (lambda: ablation_base("smoke", (0, 3), "off"), "at least 1 epoch"),
    (lambda: ablation_base("smoke", (1, 1), "pretrained"), "perceptual"),
    (lambda: ablation_base("smoke", (1, 1), "off", ["model.upsample=nearest"]), "model.upsample"),
])
def test_impossible_ablations_raise_config_error(call, match):
    with pytest.raises(ConfigError, match=match):
        call()


def test_table_has_one_row_per_variant_and_na_for_missing_metrics():
    sampler = {"fid": None, "domain_fd_vs_train": 12.345, "ms_ssim_diversity": 0.5, "nn_train_rmse": 0.1}
    rows = [{"variant": v, "change": "c", "parameters": 2_000_000, "train_seconds": 61.0, "test_ssim": 0.5,
             "test_psnr_db": 18.0, "test_identity": 0.99, "standard_normal": sampler, "gmm": sampler} for v in ("recipe", "mse")]
    rows[1].pop("gmm"), rows[1].pop("test_identity")  # a row from before GMM and identity were reported
    lines = ablation_table(rows).splitlines()
    assert len(lines) == 4 and lines[2].startswith("| recipe |") and lines[3].startswith("| mse |")
    assert "| 2.00 M | 61 | 0.500 | 18.00 | 99.0 % | 12.3 | 12.3 | n/a | n/a | 0.500 | 0.500 |" in lines[2]
    assert "| 2.00 M | 61 | 0.500 | 18.00 | n/a | 12.3 | n/a | n/a | n/a | 0.500 | n/a |" in lines[3]


def test_ablate_command_trains_evaluates_and_resumes(real_data_root, tmp_path, capsys):
    out = tmp_path / "abl"
    args = ["ablate", "--data", str(real_data_root), "--preset", "smoke", "--epochs", "1", "1",
            "--variants", "recipe,no_attention", "--perceptual", "off", "--features", "none",
            "--inception", "off", "--n", "16", "--set", "data.max_per_class=8", "--out", str(out), "--quiet"]
    assert main(args) == 0
    res = json.loads((out / "ablation.json").read_text())["rows"]
    assert [r["variant"] for r in res] == ["recipe", "no_attention"]
    for r in res:
        assert r["epochs"] == 2 and r["train_images_seen"] == 2 * 16  # 8 + 8 train images, two full batches
        assert 0 <= r["test_ssim"] <= 1 and r["standard_normal"]["ms_ssim_diversity"] is not None
        assert (out / r["variant"] / "metrics.json").is_file()
    assert res[1]["parameters"] < res[0]["parameters"]  # attention blocks removed
    table = (out / "ablation.md").read_text()
    assert table.count("\n| recipe |") == 1 and "perceptual term OFF" in table
    assert (out / "ablation.png").stat().st_size > 10_000
    history = (out / "recipe" / "history.csv").read_text()
    mtime = (out / "recipe" / "history.csv").stat().st_mtime_ns

    assert main(args) == 0  # a second run finds everything done: nothing is trained again
    assert (out / "recipe" / "history.csv").stat().st_mtime_ns == mtime
    assert (out / "recipe" / "history.csv").read_text() == history
    assert "(already trained)" in (out / "train.log").read_text()

    # The same folder with another budget would mix incomparable rows: refused, nothing touched.
    assert main(args[:6] + ["2", "1"] + args[8:]) == 2  # --epochs 2 1
    err = capsys.readouterr().err
    assert "different base config" in err and "train.phase1.epochs" in err
    assert (out / "recipe" / "history.csv").read_text() == history


def test_ablate_without_vgg_weights_fails_before_training(real_data_root, tmp_path, offline, capsys):
    out = tmp_path / "abl"
    code = main(["ablate", "--data", str(real_data_root), "--preset", "smoke", "--epochs", "1", "1",
                 "--features", "none", "--out", str(out), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and "Traceback" not in err
    assert "random" in err and offline  # names the way out; a download was tried and refused
    assert not (out / "recipe").exists()


def test_resuming_accepts_speed_switches_but_not_a_different_budget(tmp_path):
    from spatialvae.lab.ablation import _check_same_base

    base = ablation_base("smoke", (1, 1), "off")
    (tmp_path / "base_config.json").write_text(base.to_json())
    _check_same_base(tmp_path, base.with_overrides(["train.channels_last=false", "train.compile=true",
                                                    "data.root=/elsewhere"]))
    with pytest.raises(ConfigError, match="train.phase2.epochs"):
        _check_same_base(tmp_path, ablation_base("smoke", (1, 2), "off"))


def test_interleave_rows_puts_each_original_above_its_reconstruction():
    from spatialvae.viz import interleave_rows

    orig = torch.arange(10.0).view(10, 1, 1, 1)
    rec = 100 + orig
    got = interleave_rows(orig, rec, nrow=4).flatten().tolist()
    assert got == [0, 1, 2, 3, 100, 101, 102, 103, 4, 5, 6, 7, 104, 105, 106, 107, 8, 9, 108, 109]


def test_ablation_figure_is_drawn_from_tensors(tmp_path):
    from spatialvae.viz import ablation_figure, close_figure, image_grid

    g = torch.Generator().manual_seed(0)
    images = {"recipe": {"reconstructions": torch.rand(8, 1, 16, 16, generator=g),
                         "standard_normal": torch.rand(4, 1, 16, 16, generator=g), "gmm": torch.rand(4, 1, 16, 16, generator=g)}}
    rows = [{"variant": "recipe"}, {"variant": "original"}]  # no tensors for `original`: "missing"
    fig = ablation_figure(rows, images, tmp_path / "a.png")
    axes = fig.axes
    assert len(axes) == 6 and (tmp_path / "a.png").is_file()
    shown = axes[1].images[0].get_array()  # the recipe's prior samples: one row of 4 tiles
    assert np.allclose(np.asarray(shown), image_grid(images["recipe"]["standard_normal"], nrow=4)[0].numpy())
    assert np.asarray(axes[0].images[0].get_array()).shape == image_grid(images["recipe"]["reconstructions"], 4)[0].shape
    assert not axes[3].images and axes[3].texts[0].get_text() == "missing"
    close_figure(fig)


def test_a_variant_evaluated_before_the_sampler_rename_keeps_its_n01_row(tmp_path):
    import json

    from spatialvae.lab.ablation import _row
    from spatialvae.lab.evaluate import read_metrics

    old = {"fid": None, "domain_fd_vs_train": 12.5, "ms_ssim_diversity": {"mean": 0.01},
           "nn_train_rmse": {"mean": 0.4}}
    metrics = {"samplers": {"prior": old, "gmm": old},  # N(0, I)'s key before the rename
               "reconstruction": {"overall": {"ssim": 0.9, "psnr_db": 29.0, "l1": 0.02}, "identity": 1.0},
               "checkpoint": {"epoch": 2}, "perceptual_mode": "off", "seconds": 1.0}
    (tmp_path / "metrics.json").write_text(json.dumps(metrics))
    metrics = read_metrics(tmp_path / "metrics.json")  # old names are read as today's at the file, nowhere else
    row = _row("recipe", ablation_base("smoke", (1, 1), "off"), tmp_path, metrics, [{"seconds": 1.0}] * 2, 16)
    assert row["standard_normal"] == {"fid": None, "domain_fd_vs_train": 12.5, "ms_ssim_diversity": 0.01,
                                      "nn_train_rmse": 0.4}
    assert "| 12.5" in ablation_table([row])
