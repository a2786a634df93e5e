"""The package's structure: modules stand in layers, each importing only from layers below it
(so there is no import cycle), and imports sit at module level except the heavy, optional ones."""

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "spatialvae"

# Lowest first. A module imports (at module level) only from earlier layers.
LAYERS = (
    ("errors",),  # no package imports
    ("engine", "distributed", "config"),
    ("model", "variants"),
    ("losses", "runs"),
    ("data", "viz"),
    ("metrics", "sampling", "report", "c2st"),
    ("features", "prior", "training", "texture"),
    ("bench", "tstr", "prior_run", "texture_run"),
    ("evaluate",),
    ("ablation",),
    ("cli",),  # imports config/errors/variants at module level, each command's modules inside it
)
LAYER_OF = {m: i for i, layer in enumerate(LAYERS) for m in layer}
# Imported inside functions on purpose, each with a reason in the code: slow to import (sklearn ~1 s,
# torchmetrics ~2 s, matplotlib, the compiler's config), or only needed by one optional measurement.
LAZY_OK = ("sklearn", "torchmetrics", "matplotlib", "torch.utils.flop_counter", "torch._inductor")


def _module_level_package_imports(path: Path) -> set[str]:
    deps = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            deps |= {node.module.split(".")[0]} if node.module else {a.name for a in node.names}
    return deps - {"__version__"}


def _local_imports(path: Path):
    for fn in ast.walk(ast.parse(path.read_text())):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for node in ast.walk(fn):
                if isinstance(node, ast.Import):
                    yield fn.name, node.names[0].name, 0
                elif isinstance(node, ast.ImportFrom):
                    yield fn.name, node.module or "", node.level


def test_every_module_has_a_layer():
    modules = {p.stem for p in PKG.glob("*.py")} - {"__init__", "__main__"}
    assert modules == set(LAYER_OF), f"add new modules to LAYERS: {sorted(modules ^ set(LAYER_OF))}"


@pytest.mark.parametrize("module", sorted(LAYER_OF))
def test_module_imports_only_from_lower_layers(module):
    upward = {d: LAYER_OF.get(d) for d in _module_level_package_imports(PKG / f"{module}.py")
              if LAYER_OF.get(d, -1) >= LAYER_OF[module]}
    assert not upward, f"{module} (layer {LAYER_OF[module]}) imports {upward}: a cycle risk; move the shared code down"


@pytest.mark.parametrize("module", sorted(LAYER_OF))
def test_imports_are_at_module_level_except_the_heavy_ones(module):
    bad = [(fn, mod) for fn, mod, level in _local_imports(PKG / f"{module}.py")
           if not mod.startswith(LAZY_OK) and not (module == "cli" and (level == 1 or mod == "torch"))]
    assert not bad, f"{module}: function-local imports {bad}; import at module level"


def test_importing_in_layer_order_loads_nothing_from_a_higher_layer():
    """In a fresh interpreter, import each module lowest layer first; after each import, no module
    of a higher layer may have been loaded (it would mean an upward import, hidden or not)."""
    code = (
        "import importlib, json, sys\n"
        f"layers = {LAYERS!r}\n"
        "out = []\n"
        "for i, layer in enumerate(layers):\n"
        "    for m in layer:\n"
        "        importlib.import_module('spatialvae.' + m)\n"
        "        higher = {x for lay in layers[i + 1:] for x in lay}\n"
        "        out += [(m, x) for x in higher if 'spatialvae.' + x in sys.modules]\n"
        "print(json.dumps(out))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == []


def test_cli_help_does_not_import_torch():
    code = "import sys; from spatialvae.cli import build_parser; build_parser(); print('torch' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "False"


def test_package_exports_what_users_import():
    import importlib

    import spatialvae
    from spatialvae import SpatialVAE, Trainer, build_trainer, get_preset  # what MONAI / diffusers users try first

    assert SpatialVAE is importlib.import_module("spatialvae.model").SpatialVAE
    assert Trainer is importlib.import_module("spatialvae.training").Trainer
    assert callable(build_trainer) and get_preset("smoke").preset == "smoke"
    for name in spatialvae.__all__:
        assert getattr(spatialvae, name) is not None, name
    assert set(spatialvae.__all__) <= set(dir(spatialvae))
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        spatialvae.Nope  # noqa: B018


def test_import_spatialvae_does_not_import_torch():
    r = subprocess.run([sys.executable, "-c", "import sys, spatialvae; print('torch' in sys.modules)"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "False"


def test_readme_layout_table_matches_the_layers():
    import re

    readme = (PKG.parent / "README.md").read_text()
    section = readme.split("### Package layout", 1)[1].split("\n#", 1)[0]
    rows = re.findall(r"^\| (\d+) \| `(\w+)` \|", section, flags=re.M)
    assert {m: int(i) for i, m in rows} == LAYER_OF
