"""Benchmark plumbing (not speed): ratios to eager from the same run, the safety verdict, the
recommendation, the T4 projection arithmetic, and the bench command end to end at toy size."""

from __future__ import annotations

import json
import math

import pytest

from spatialvae.cli import main
from spatialvae.lab import bench
from spatialvae.lab.bench import (
    _judge,
    _run_in_child,
    measure_step,
    recommend,
    t4_projection,
    time_to_quality,
)
from spatialvae.lab.report import setting_flags


def row(setting, ips, loss=1.0, perceptual=False, finite=True, first=1.0):
    return {"setting": setting, "images_per_s": ips, "first_loss": first, "last_loss": loss, "finite": finite,
            "perceptual": perceptual}


def test_speedup_is_the_ratio_to_eager_and_unsafe_settings_are_never_recommended():
    eager = _judge(row("eager", 10.0), None)
    assert eager["speedup"] is None and eager["safe"] is False  # judged against itself below
    eager = _judge(row("eager", 10.0), row("eager", 10.0))
    rows = [eager,
            _judge(row("channels_last", 13.0), eager),
            _judge(row("compile", 40.0, loss=1.01), eager),  # fast, but after a few updates its loss is 1% off
            _judge(row("compile+channels_last", 50.0, finite=False), eager),  # fastest, NaN
            {"setting": "fp16", "perceptual": False, "error": "no CUDA"}]
    rows[-1] = _judge(rows[-1], eager)
    assert eager["speedup"] == 1.0 and eager["safe"]
    assert rows[1]["speedup"] == 1.3 and rows[1]["safe"]
    assert rows[2]["speedup"] == 4.0 and not rows[2]["safe"]
    assert not rows[3]["safe"] and not rows[4]["safe"]
    assert recommend(rows) == {"perceptual_off": {"setting": "channels_last", "speedup": 1.3}}


def test_eager_stays_recommended_when_nothing_is_faster():
    eager = _judge(row("eager", 10.0, perceptual=True), row("eager", 10.0, perceptual=True))
    slower = _judge(row("channels_last", 2.0, perceptual=True), eager)
    assert recommend([eager, slower]) == {"perceptual_on": {"setting": "eager", "speedup": 1.0}}


def test_a_first_loss_that_differs_is_unsafe_too():
    eager = _judge(row("eager", 10.0), row("eager", 10.0))
    assert not _judge(row("channels_last", 13.0, first=1.01), eager)["safe"]


def test_amp_settings_get_a_looser_loss_tolerance():
    eager = _judge(row("eager", 10.0), row("eager", 10.0))
    assert _judge(row("fp16", 30.0, loss=1.02), eager)["safe"]
    assert not _judge(row("fp16", 30.0, loss=1.2), eager)["safe"]


@pytest.mark.parametrize("name, flags", [
    ("eager", "(the defaults)"), ("fp16", "(the defaults)"),
    ("channels_last", "--set train.channels_last=true"),
    ("compile+channels_last", "--set train.channels_last=true --set train.compile=true"),
])
def test_recommended_setting_is_printed_as_train_flags(name, flags):
    assert setting_flags(name) == flags


def test_t4_projection_arithmetic():
    flops = {"with_perceptual_forward_backward": 2.34e10, "with_perceptual_forward": 7.8e9}
    p = t4_projection(flops, train_images=4000, val_images=500, epochs=100)
    # (4000 x 2.34e10 + 500 x 7.8e9) x 100 = 9.75e15 FLOPs; 30 % of 65 TFLOP/s is 19.5e12 per second
    # (500 s = 0.139 h); fp32's 8.1 TFLOP/s takes 1,204 s (0.334 h).
    assert p["total_pflop"] == 9.75
    assert p["hours"]["30% of fp16 peak"] == 0.14 and p["hours"]["100% of fp32 peak (no AMP)"] == 0.33


def test_measure_step_times_the_requested_steps_and_is_deterministic():
    args = dict(preset="smoke", image_size=32, batch=4, perceptual=False, repeats=2, device="cpu")
    a = measure_step(setting={"name": "eager"}, **args)
    b = measure_step(setting={"name": "channels_last", "channels_last": True}, **args)
    assert len(a["step_seconds"]) == 2 and a["images_per_s"] > 0 and a["finite"]
    assert a["images_per_s"] == pytest.approx(4 / a["median_step_seconds"], rel=1e-2)
    assert math.isfinite(a["first_loss"])
    assert b["first_loss"] == pytest.approx(a["first_loss"], rel=1e-4)  # same weights, same batch
    assert b["last_loss"] == pytest.approx(a["last_loss"], rel=1e-4)  # and the same 4 updates
    assert a["last_loss"] != a["first_loss"]  # the updates happened


def test_bench_command_writes_json_and_table(kaggle_tree, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(bench, "FLOP_TABLE", (("smoke", 32),))  # the table's 128 px models take ~10 s to count
    out = tmp_path / "bench.json"
    code = main(["bench", "--data", str(kaggle_tree["root"]), "--preset", "smoke", "--image-size", "32", "--batch", "4",
                 "--repeats", "1", "--settings", "eager,channels_last", "--perceptual", "off", "--kaggle-n", "4",
                 "--out", str(out), "--quiet"])
    assert code == 0
    res = json.loads(out.read_text())
    steps = {r["setting"]: r for r in res["steps"]}
    assert set(steps) == {"eager", "channels_last"} and steps["eager"]["speedup"] == 1.0
    cl = steps["channels_last"]
    assert cl["speedup"] == round(cl["images_per_s"] / steps["eager"]["images_per_s"], 3)
    d = res["data"]
    assert d["kaggle_size_preprocess"]["images"] == 4 and d["cached_epoch"]["images"] == d["cache_images"] // 4 * 4
    assert 0 < d["data_share_of_epoch"] < 1
    assert res["flops"]["with_perceptual_forward_backward"] > res["flops"]["model_forward_backward"] > 0
    assert "| eager | off |" in capsys.readouterr().out


def test_bench_step_child_process_measures_without_data():
    """Each setting runs `python -m spatialvae.lab.bench` in a child: it must import and measure."""
    row = _run_in_child({"preset": "smoke", "image_size": 32, "batch": 2, "perceptual": False,
                         "setting": {"name": "eager"}, "repeats": 1}, timeout=300)
    assert "error" not in row, row.get("error")
    assert row["finite"] and len(row["step_seconds"]) == 1 and row["images_per_s"] > 0


def test_bench_rejects_unknown_settings(capsys):
    assert main(["bench", "--skip-data", "--settings", "eager,turbo", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "turbo" in err and "channels_last" in err


def test_peak_memory_sees_a_transient_allocation():
    import numpy as np

    from spatialvae.lab.bench import _PeakRss, _rss_mb

    if _rss_mb() == 0:
        pytest.skip("no /proc/self/statm on this platform")
    with _PeakRss() as rss:
        before = _rss_mb()
        block = np.ones(200 * 2**20 // 8)  # 200 MB, touched, then freed inside the block
        import time
        time.sleep(0.05)
        del block
    assert rss.peak - before >= 190


def _history(run, psnrs, seconds=30.0, phase1=2, monitor=True):
    from spatialvae.runs import write_history_csv

    run.mkdir(parents=True)
    rows = []
    for i, p in enumerate(psnrs):
        r = {"phase": 1 if i < phase1 else 2, "epoch": i + 1, "seconds": seconds}
        if monitor:
            r.update({"monitor_psnr": p, "monitor_ssim": p / 40, "monitor_seconds": 5.0})
        rows.append(r)
    write_history_csv(rows, run / "history.csv")
    return run


def test_time_to_quality_counts_training_minutes_only(tmp_path, capsys):
    a = _history(tmp_path / "000-a", [18.0, 21.0, 25.0, 27.5])
    b = _history(tmp_path / "001-b", [15.0, 16.0, 17.0], seconds=60.0, phase1=3)
    res = time_to_quality([a, b], thresholds=(20.0, 27.1))
    ra, rb = res["table"]
    assert ra["minutes"] == 2.0 and rb["minutes"] == 3.0  # 4 x 30 s and 3 x 60 s; monitor time left out
    assert ra["minutes_to_db"] == {"20": 1.0, "27.1": 2.0}
    assert rb["minutes_to_db"] == {"20": None, "27.1": None}
    assert ra["end_of_phase1_psnr"] == 21.0 and rb["end_of_phase1_psnr"] is None
    assert res["curves"]["000-a"]["boundary"] == 1.0
    assert main(["bench", "--curve", str(a), str(b), "--out", str(tmp_path / "ttq.json")]) == 0
    assert "| 000-a | 4 | 2.0 | 21.00 | 27.50 |" in capsys.readouterr().out
    assert (tmp_path / "ttq.png").stat().st_size > 0 and (tmp_path / "ttq.md").is_file()


def test_time_to_quality_bars_follow_the_runs_pca_floor(tmp_path):
    import json

    a = _history(tmp_path / "000-a", [25.0, 26.5, 27.3, 28.0])
    assert list(time_to_quality([a])["table"][0]["minutes_to_db"]) == ["20", "24", "27.1", "28.7"]  # no floors yet
    floors = {"pca": {"components": 1024, "psnr_db": 26.18, "ssim": 0.78}, "mean_image": {"psnr_db": 15.2, "ssim": 0.3}}
    (a / "metrics.json").write_text(json.dumps({"floors": floors}))
    res = time_to_quality([a])
    assert res["table"][0]["minutes_to_db"] == {"20": 0.5, "24": 0.5, "26.18": 1.0, "27.18": 1.5, "28.18": None}
    assert res["floors"]["PCA, 1024 components"]["psnr_db"] == 26.18


def test_time_to_quality_refuses_runs_without_a_test_curve(tmp_path, capsys):
    run = _history(tmp_path / "000-x", [18.0], monitor=False)
    assert main(["bench", "--curve", str(run)]) == 2
    err = capsys.readouterr().err
    assert "--monitor-test" in err and "Traceback" not in err and err.count("\n") == 1
