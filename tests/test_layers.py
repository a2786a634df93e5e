"""The package's structure: the core (``spatialvae/*.py``: what trains and samples) imports nothing
from the lab (``spatialvae/lab/``: what measures), modules stand in layers, each importing only from
layers below it (so there is no import cycle), and imports sit at module level except the heavy,
optional ones."""

import ast
import io
import json
import re
import subprocess
import sys
import tokenize
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "spatialvae"

# Lowest first. A module imports (at module level) only from earlier layers. The lab's layers sit
# above the core's: the core never imports the lab, the CLI only inside the commands that measure.
LAYERS = (
    ("errors",),  # no package imports
    ("engine", "distributed", "config"),
    ("model",),
    ("losses", "runs"),
    ("data", "viz"),
    ("scores", "sampling"),
    ("prior", "training", "texture"),
    ("prior_run", "texture_run"),
    ("lab.variants", "lab.metrics", "lab.report", "lab.classifier"),
    ("lab.c2st", "lab.features"),
    ("lab.bench", "lab.tstr"),
    ("lab.evaluate", "lab.figures"),
    ("lab.ablation",),
    ("cli",),  # imports config/errors at module level, each command's modules inside it
)
LAYER_OF = {m: i for i, layer in enumerate(LAYERS) for m in layer}
CORE = [m for m in LAYER_OF if not m.startswith("lab.")]
# Imported inside functions on purpose, each with a reason in the code: slow to import (sklearn ~1 s,
# torchmetrics ~2 s, matplotlib, the compiler's config), or only needed by one optional measurement.
LAZY_OK = ("sklearn", "torchmetrics", "matplotlib", "torch.utils.flop_counter", "torch._inductor")


def _path(module: str) -> Path:
    return PKG / (module.replace(".", "/") + ".py")


def _target(module: str, node: ast.ImportFrom) -> set[str]:
    """The package modules a relative ``from`` import in ``module`` names, as LAYERS spells them."""
    base = module.split(".")[:-1][:len(module.split(".")) - node.level]  # the package it is relative to
    if node.module:
        return {".".join(base + node.module.split("."))}
    return {".".join(base + [a.name]) for a in node.names}


def _package_imports(module: str, nodes) -> set[str]:
    deps = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.level >= 1:
            deps |= _target(module, node)
        elif isinstance(node, ast.Import):
            deps |= {a.name.removeprefix("spatialvae.") for a in node.names if a.name.startswith("spatialvae.")}
    return deps - {"__version__", "", "lab"}


def _module_level_package_imports(module: str) -> set[str]:
    return _package_imports(module, ast.parse(_path(module).read_text()).body)


def _local_imports(module: str):
    for fn in ast.walk(ast.parse(_path(module).read_text())):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for node in ast.walk(fn):
                if isinstance(node, ast.Import):
                    yield fn.name, node.names[0].name, 0, node
                elif isinstance(node, ast.ImportFrom):
                    yield fn.name, node.module or "", node.level, node


def test_every_module_has_a_layer():
    modules = {str(p.relative_to(PKG).with_suffix("")).replace("/", ".") for p in PKG.rglob("*.py")}
    modules -= {"__init__", "__main__", "lab.__init__"}
    assert modules == set(LAYER_OF), f"add new modules to LAYERS: {sorted(modules ^ set(LAYER_OF))}"


@pytest.mark.parametrize("module", sorted(LAYER_OF))
def test_module_imports_only_from_lower_layers(module):
    upward = {d: LAYER_OF.get(d) for d in _module_level_package_imports(module)
              if LAYER_OF.get(d, -1) >= LAYER_OF[module]}
    assert not upward, f"{module} (layer {LAYER_OF[module]}) imports {upward}: a cycle risk; move the shared code down"


@pytest.mark.parametrize("module", sorted(CORE))
def test_the_core_imports_nothing_from_the_lab(module):
    """Training and sampling need no measurement code; only the CLI's measuring commands load it."""
    tree = ast.parse(_path(module).read_text())
    local = [n for _, _, _, n in _local_imports(module)] if module != "cli" else []
    lab = {d for d in _package_imports(module, [*tree.body, *local]) if d.startswith("lab.")}
    assert not lab, f"the core module {module} imports {sorted(lab)} from the lab; move what it needs into the core"


@pytest.mark.parametrize("module", sorted(LAYER_OF))
def test_imports_are_at_module_level_except_the_heavy_ones(module):
    bad = [(fn, mod) for fn, mod, level, _ in _local_imports(module)
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


def test_the_layout_table_in_docs_matches_the_layers():
    import re

    page = (PKG.parent / "docs" / "development.md").read_text()
    section = page.split("## Package layout", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| (\d+) \| `([\w.]+)` \|", section, flags=re.M)
    assert {m: int(i) for i, m in rows} == LAYER_OF


# Code comments give reasons; measured figures drift with every run and live in docs/results/.
# Settings the code itself fixes (a poll interval, a threshold) are not measurements.
FIGURE = re.compile(r"(?<![\w.])\d[\d,]*(\.\d+)?\s?(dB|ms|s|sec|seconds|min|minutes|hours?)\b(?![\w/])"
                    r"|\b\d+(\.\d+)?x (faster|slower)|\bFD \d")
SETTINGS = {("lab/bench.py", "2 ms"), ("lab/bench.py", "24 dB"), ("lab/bench.py", "2 dB"), ("lab/metrics.py", "60 dB")}


def _comments_and_docstrings(path: Path):
    src = path.read_text()
    for tok in tokenize.generate_tokens(io.StringIO(src).readline):
        if tok.type == tokenize.COMMENT:
            yield tok.string
    for node in ast.walk(ast.parse(src)):
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            yield ast.get_docstring(node, clean=False) or ""


@pytest.mark.parametrize("module", sorted(LAYER_OF))
def test_no_measured_figures_in_comments_or_docstrings(module):
    rel = module.replace(".", "/") + ".py"
    found = {m.group(0) for text in _comments_and_docstrings(_path(module)) for m in FIGURE.finditer(text)}
    found = {f for f in found if (rel, f) not in SETTINGS and not re.fullmatch(r"\d, s", f)}
    assert not found, f"{module}: measured figures {sorted(found)} in comments; give the reason, put the figure in docs/results/"


# Constructors whose many arguments mirror the recipe's knobs, and the lab's command entry points
# (one keyword per command-line flag). The list may shrink, never grow.
MANY_PARAMETERS = {"data.load_split", "lab.ablation.run_ablation", "lab.bench.measure_step", "lab.bench.run_bench",
                   "lab.features.build_features_file", "lab.tstr.run_tstr", "model.Encoder.__init__",
                   "model.Decoder.__init__", "training.build_trainer", "training.Trainer.__init__"}


def _definitions(module: str):
    """(qualified name, node) of every function and class in a module."""
    def walk(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = f"{prefix}.{child.name}"
                yield name, child
                yield from walk(child, name)
    yield from walk(ast.parse(_path(module).read_text()), module)


@pytest.mark.parametrize("module", sorted(LAYER_OF))
def test_functions_and_classes_stay_readable_at_once(module):
    """Functions of at most 60 lines and 7 parameters (self aside), classes of at most 250 lines."""
    bad = []
    for name, node in _definitions(module):
        lines = node.end_lineno - node.lineno + 1
        if isinstance(node, ast.ClassDef):
            bad += [f"class {name}: {lines} lines"] if lines > 250 else []
            continue
        a = node.args
        n = len(a.posonlyargs) + len(a.args) + len(a.kwonlyargs) - (1 if a.args and a.args[0].arg in ("self", "cls") else 0)
        bad += [f"{name}: {lines} lines"] if lines > 60 else []
        bad += [f"{name}: {n} parameters"] if n > 7 and name not in MANY_PARAMETERS else []
    assert not bad, f"split these: {bad}"
