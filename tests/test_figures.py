"""`python -m spatialvae figures`: README's pictures of a run, from the run alone."""

from __future__ import annotations

import pytest
from conftest import copy_run, run_cli
from PIL import Image

from spatialvae.cli import main


def test_figures_draw_samples_per_class_beside_real_images_and_reconstructions(fake_smoke_run, tmp_path, capsys):
    run, _ = fake_smoke_run
    code, out, _ = run_cli(capsys, "figures", "--run", run, "--out", tmp_path / "img", "--n", 4)
    assert code == 0
    side = 32 + 2  # the smoke preset's 32 px tiles and the grid's 2 px padding
    samples = Image.open(tmp_path / "img" / "samples.png")
    assert samples.mode == "L" and samples.size == (4 * side + 2, 4 * side + 2)  # real / drawn, per class
    recons = Image.open(tmp_path / "img" / "reconstructions.png")
    assert recons.size == (4 * side + 2, 2 * side + 2)  # originals / smooth: the smoke run has no texture stage
    assert out.count("wrote ") == 2


def test_figures_of_a_run_without_a_learned_prior_is_one_line(fake_smoke_run, tmp_path, capsys):
    run = copy_run(fake_smoke_run[0], tmp_path)
    (run / "checkpoints" / "prior.pt").unlink()
    code, _, err = run_cli(capsys, "figures", "--run", run, "--out", tmp_path / "img")
    assert code != 0
    err = err.strip()
    assert len(err.splitlines()) == 1 and "has no learned prior" in err and "prior --run" in err
    assert not (tmp_path / "img").exists()


@pytest.mark.parametrize("bad", [["--n", "1"], ["--run"]])
def test_figures_refuses_bad_arguments(bad, capsys):
    with pytest.raises(SystemExit) as e:
        main(["figures", "--run", "x", *bad] if bad[0] != "--run" else ["figures", *bad])
    assert e.value.code == 2
