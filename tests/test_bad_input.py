"""Every command's arguments walked through bad values: each gives exit status 2, no traceback,
one message that names the argument and what it expects, and writes nothing."""

from __future__ import annotations

import pytest

from spatialvae.cli import main
from spatialvae.errors import SpatialVAEError
from spatialvae.runs import atomic_write_bytes

# (command line, what the error must say). RUN and OUT are filled in per test; every one of these
# fails before a run is read, so RUN need not be a real run.
CASES = [
    ("sample --run RUN --n 0 --out OUT/s.png", "argument --n: 0 is out of range: expected between 1 and 4096"),
    ("sample --run RUN --n -3 --out OUT/s.png", "argument --n: -3 is out of range"),
    ("sample --run RUN --n 100000000 --out OUT/s.png", "argument --n: 100000000 is out of range"),
    ("sample --run RUN --n many --out OUT/s.png", "argument --n: 'many' is not a whole number"),
    ("sample --run RUN --guidance -1 --out OUT/s.png", "argument --guidance: -1 is out of range"),
    ("sample --run RUN --guidance nan --out OUT/s.png", "argument --guidance: nan is out of range"),
    ("sample --run RUN --guidance inf --out OUT/s.png", "argument --guidance: inf is out of range"),
    ("sample --run RUN --spread -1 --out OUT/s.png", "argument --spread: -1 is out of range"),
    ("sample --run RUN --spread nan --out OUT/s.png", "argument --spread: nan is out of range"),
    ("figures --run RUN --out OUT --guidance -1", "argument --guidance: -1 is out of range"),
    ("sample --run RUN --out OUT", "argument --out: OUT is a folder"),
    ("sample --run RUN --out OUT/afile/s.png", "afile is a file, not a folder"),
    ("sample --run RUN --sampler vae --out OUT/s.png", "argument --sampler: invalid choice: 'vae'"),
    ("sample --run RUN --checkpoint first --out OUT/s.png", "argument --checkpoint: invalid choice"),
    ("evaluate --run RUN --n 1", "argument --n: 1 is out of range: expected at least 2"),
    ("evaluate --run RUN --tstr -5", "argument --tstr: -5 is out of range: expected at least 0"),
    ("evaluate --run RUN --seed x", "argument --seed: invalid int value"),
    ("features --out OUT/afile/f.pt", "afile is a file, not a folder"),
    ("features --out OUT", "argument --out: OUT is a folder"),
    ("features --out OUT/f.pt --epochs 0", "argument --epochs: 0 is out of range: expected at least 1"),
    ("features --out OUT/f.pt --max-per-class 0", "argument --max-per-class: 0 is out of range"),
    ("features --out OUT/f.pt --image-size 96", "argument --image-size: invalid choice: 96"),
    ("ablate --n 0 --out OUT/ab", "argument --n: 0 is out of range: expected at least 2"),
    ("ablate --epochs 1 --out OUT/ab", "argument --epochs: expected 2 arguments"),
    ("ablate --perceptual vgg --out OUT/ab", "argument --perceptual: invalid choice"),
    ("bench --out OUT/afile/b.json", "afile is a file, not a folder"),
    ("bench --kaggle-n 0 --out OUT/b.json", "argument --kaggle-n: 0 is out of range"),
    ("bench --preset huge", "argument --preset: invalid choice"),
    ("bench --batch 0 --out OUT/b.json", "argument --batch: 0 is out of range: expected at least 1"),
    ("bench --repeats 0 --out OUT/b.json", "argument --repeats: 0 is out of range: expected at least 1"),
    ("train --preset huge", "argument --preset: invalid choice"),
    ("prior", "the following arguments are required: --run"),
    ("data --image-size big", "argument --image-size: invalid int value"),
    # checked after parsing, still before any data or model is touched
    ("train --preset smoke --data OUT/none --out OUT/runs --set data.batch_size=0", "data.batch_size=0 is invalid"),
    ("train --preset smoke --data OUT/none --out OUT/runs --set train.phase1.epochs=-1", "train.phase1.epochs=-1"),
    ("train --preset smoke --data OUT/none --out OUT/runs --set model.widths=8", "model.widths"),
    ("train --preset smoke --data OUT/none --out OUT/runs --set loss.ssim_window=4", "loss.ssim_window=4"),
    ("train --config OUT/missing.json --out OUT/runs", "missing.json"),
    ("train --resume OUT/none", "is not a run folder"),
    ("prior --run OUT/none", "OUT/none"),
    ("evaluate --run OUT/none", "OUT/none"),
    ("sample --run OUT/none --out OUT/s.png", "OUT/none"),
    ("sample --run RUN --label normal:-1 --out OUT/s.png", "label share '-1' for normal is not a number >= 0"),
    ("sample --run RUN --label lungs --out OUT/s.png", "lungs"),
    ("data --data OUT/none", "chest X-ray dataset not found"),
]


@pytest.mark.parametrize("line,expected", CASES, ids=[c[0] for c in CASES])
def test_a_bad_argument_is_one_clear_error_and_writes_nothing(line, expected, tmp_path, capsys):
    (tmp_path / "afile").write_text("in the way")
    before = sorted(p.name for p in tmp_path.iterdir())
    argv = [a.replace("RUN", str(tmp_path / "run")).replace("OUT", str(tmp_path)) for a in line.split()]
    try:
        code = main(argv)  # a checked value: one `error:` line
    except SystemExit as e:  # an argparse type or choice: the usage line and one `error:` line
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and err.count("error: ") == 1
    assert expected.replace("OUT", str(tmp_path)) in err
    assert sorted(p.name for p in tmp_path.iterdir()) == before and (tmp_path / "afile").read_text() == "in the way"


def test_atomic_write_refuses_a_folder_or_a_file_in_the_way_and_leaves_them(tmp_path):
    folder = tmp_path / "d"
    folder.mkdir()
    (folder / "keep.txt").write_text("kept")
    with pytest.raises(SpatialVAEError, match="cannot write .* pass a path in a folder you can write to"):
        atomic_write_bytes(folder, b"new")
    (tmp_path / "f").write_text("old")
    with pytest.raises(SpatialVAEError, match="cannot write"):
        atomic_write_bytes(tmp_path / "f" / "x.bin", b"new")
    assert (folder / "keep.txt").read_text() == "kept" and (tmp_path / "f").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d", "f"]  # no temp file left behind
