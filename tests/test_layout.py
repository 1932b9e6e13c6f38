"""The package's shape, checked from the folders rather than a hand-kept list: one installed name,
an orchestrator that never imports torch at import time, workers that never import the
orchestrator, and a torch-free contract both sides share."""

from __future__ import annotations

import ast
import importlib.metadata
import importlib.util
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SIDES = {"flexorch.orchestrator": REPO / "orchestrator", "flexorch.workers": REPO / "workers",
         "flexorch.contract": REPO / "flexorch" / "contract"}


def sources(side: str) -> list[Path]:
    """The side's .py files, its subpackages' (orchestrator/planner/) included."""
    return sorted(SIDES[side].rglob("*.py"))


def modules(side: str) -> list[str]:
    names = (".".join(p.relative_to(SIDES[side]).with_suffix("").parts) for p in sources(side))
    return sorted(f"{side}.{name.removesuffix('.__init__')}" for name in names if name != "__init__")


def imported_names(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def top_level_imports(path: Path) -> set[str]:
    """Imports at module level (not inside functions, where torch may be imported on demand)."""
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_the_sides_are_found():
    assert len(modules("flexorch.orchestrator")) >= 10 and len(modules("flexorch.workers")) >= 8
    assert {"flexorch.contract.shards", "flexorch.contract.messages"} <= set(modules("flexorch.contract"))


# executor: ray's modules: the only ones that import ray (an optional extra, `ray`).
RAY_MODULES = {"flexorch.orchestrator.raycluster", "flexorch.orchestrator.rayexecutor"}
HAVE_RAY = importlib.util.find_spec("ray") is not None


def test_orchestrator_contract_and_api_import_without_torch():
    names = ["flexorch"] + modules("flexorch.orchestrator") + modules("flexorch.contract")
    names = [n for n in names if HAVE_RAY or n not in RAY_MODULES]
    code = f"import sys, {', '.join(names)}; print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch')[:3])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("side", ["flexorch.orchestrator", "flexorch.contract"])
def test_no_module_level_torch_import(side):
    offenders = {p.name for p in sources(side)
                 if any(n.split(".")[0] == "torch" for n in top_level_imports(p))}
    assert not offenders


@pytest.mark.parametrize("side", ["flexorch.workers", "flexorch.contract"])
def test_workers_and_contract_never_import_the_orchestrator(side):
    offenders = {p.name: sorted(n for n in imported_names(p) if n.startswith(("flexorch.orchestrator", "orchestrator")))
                 for p in sources(side)}
    assert not {k: v for k, v in offenders.items() if v}


# The processes the executors start: the only worker modules the orchestrator may import (a worker's
# main and the Ray actor that runs it, with the failure message both report through).
ENTRY_POINTS = {"flexorch.workers.worker", "flexorch.workers.actor"}


def test_the_orchestrator_imports_no_worker_module_but_the_entry_points():
    """What both sides need of torch code (layer files, compression) lives in flexorch/weights/."""
    imported = {f"{p.relative_to(REPO)}: {n}" for p in sources("flexorch.orchestrator") for n in imported_names(p)
                if n.startswith("flexorch.workers") and n not in ENTRY_POINTS}
    assert not imported
    assert ENTRY_POINTS <= set(modules("flexorch.workers"))


def test_no_two_orchestrator_modules_import_each_other_even_for_types():
    """Imports under TYPE_CHECKING count: a type-only cycle is still two modules that need each other.
    A package's __init__ only gathers its modules' public names: its imports are not its own."""
    root = SIDES["flexorch.orchestrator"]
    name_of = {p: ".".join(["flexorch.orchestrator", *p.relative_to(root).with_suffix("").parts]).removesuffix(".__init__")
               for p in sources("flexorch.orchestrator")}
    gathers = {name_of[p]: imported_names(p) for p in name_of if p.name == "__init__.py"}  # a package: what it gathers
    graph = {name_of[p]: {m for n in imported_names(p) if n.startswith("flexorch.orchestrator")
                          for m in gathers.get(n, {n})}
             for p in name_of if p.name != "__init__.py"}
    assert len(graph) >= 10
    cycles = {tuple(sorted((a, b))) for a, deps in graph.items() for b in deps if a in graph.get(b, ())}
    assert not cycles


def test_only_the_ray_modules_import_ray():
    offenders = {f"{side}.{p.stem}" for side in SIDES for p in sources(side)
                 if any(n.split(".")[0] == "ray" for n in imported_names(p))}
    assert offenders == RAY_MODULES


def test_the_local_path_does_not_load_ray():
    local = ["flexorch", "flexorch.orchestrator.cli", "flexorch.orchestrator.controller",
             "flexorch.orchestrator.executor"] + modules("flexorch.workers")
    code = f"import sys, {', '.join(local)}; print('ray' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_contract_imports_nothing_of_either_side():
    for path in SIDES["flexorch.contract"].glob("*.py"):
        assert not [n for n in imported_names(path) if n.startswith(("flexorch.workers", "torch"))], path.name


def test_wheel_installs_one_top_level_name(tmp_path):
    setuptools = tuple(int(x) for x in importlib.metadata.version("setuptools").split(".")[:2])
    # A venv's own setuptools builds it offline; an older one than pyproject asks for: pip fetches one.
    isolation = ["--no-build-isolation"] if setuptools >= (68, 0) else []
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", *isolation, "-w", str(tmp_path),
                    str(REPO)], check=True, capture_output=True, timeout=300)
    (wheel,) = tmp_path.glob("flexorch-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        top = {name.split("/")[0] for name in archive.namelist()}
        assert "flexorch/orchestrator/planner/__init__.py" in archive.namelist()
        assert "flexorch/orchestrator/planner/search.py" in archive.namelist()
        assert "flexorch/workers/engine.py" in archive.namelist()
    assert {t for t in top if not t.endswith(".dist-info")} == {"flexorch"}


def test_every_source_folder_is_a_listed_package():
    """A subpackage missing from pyproject's list would be left out of a regular install."""
    import tomllib
    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join([side, *init.parent.relative_to(root).parts])
             for side, root in {**SIDES, "flexorch": REPO / "flexorch"}.items() for init in root.rglob("__init__.py")}
    assert found == listed


def wheel_installed(tmp_path: Path) -> Path:
    """The wheel installed into a folder of its own, as a plain (non-editable) `pip install .` does."""
    setuptools = tuple(int(x) for x in importlib.metadata.version("setuptools").split(".")[:2])
    isolation = ["--no-build-isolation"] if setuptools >= (68, 0) else []
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", *isolation, "-w", str(tmp_path / "dist"),
                    str(REPO)], check=True, capture_output=True, timeout=300)
    (wheel,) = (tmp_path / "dist").glob("flexorch-*.whl")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(tmp_path / "site"),
                    str(wheel)], check=True, capture_output=True, timeout=300)
    return tmp_path / "site"


@pytest.mark.parametrize("where", ["repo root", "elsewhere"])
def test_a_wheel_install_runs_from_any_folder(tmp_path, where):
    """Python started in the checkout imports its partial flexorch/ (api, contract) ahead of the
    installed package; the rest must still resolve. `-S` keeps this venv's editable finder out."""
    import sysconfig
    site = wheel_installed(tmp_path)
    env = {"PYTHONPATH": os.pathsep.join([str(site), sysconfig.get_paths()["purelib"]]), "PATH": os.environ["PATH"]}
    code = "import flexorch.orchestrator.cli, flexorch.workers.engine, flexorch; print(flexorch.orchestrator.cli.__file__)"
    cwd = REPO if where == "repo root" else tmp_path
    out = subprocess.run([sys.executable, "-S", "-c", code], cwd=cwd, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert Path(out.stdout.strip()).is_relative_to(REPO if where == "repo root" else site)


# -- choices are asked of their types (contract/choices.py, ScoreKind), never compared by name -----

def _choice_names() -> set[str]:
    from flexorch.contract.choices import DeviceKind, Parallel, Storage
    from flexorch.contract.protocol import ScoreKind
    # "auto" also means devices: auto, dtype auto...: a comparison with it is no proof of a choice
    return {str(m) for kind in (Storage, Parallel, DeviceKind, ScoreKind) for m in kind} - {"auto"}


def named_choice_comparisons(path: Path, names: set[str]) -> list[int]:
    """Lines of `path` comparing against a choice's literal name: ==, !=, in (...), startswith/endswith."""
    def named(node) -> bool:
        return isinstance(node, ast.Constant) and node.value in names

    lines = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Compare):
            sides = [node.left, *node.comparators]
            for op, a, b in zip(node.ops, sides, sides[1:]):
                if isinstance(op, (ast.Eq, ast.NotEq)) and (named(a) or named(b)):
                    lines.append(node.lineno)
                elif (isinstance(op, (ast.In, ast.NotIn)) and isinstance(b, (ast.Tuple, ast.List, ast.Set))
                      and any(map(named, b.elts))):
                    lines.append(node.lineno)
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr in ("startswith", "endswith")):
            if any(named(a) or (isinstance(a, ast.Tuple) and any(map(named, a.elts))) for a in node.args):
                lines.append(node.lineno)
    return lines


def test_the_choice_comparison_finder_finds_each_form(tmp_path):
    """The check below can only pass by finding nothing: here it must find each form it looks for."""
    sample = tmp_path / "sample.py"
    sample.write_text('a = s == "disk"\nb = "pipeline" != p\nc = d in (None, "cpu")\nd = x.startswith("cuda")\n'
                      'e = k == "suffix_logprob"\nf = s is Storage.DISK\ng = d == "auto"\n')
    assert named_choice_comparisons(sample, _choice_names()) == [1, 2, 3, 4, 5]


def test_no_choice_is_compared_by_its_name():
    names = _choice_names()
    assert {"gpu", "cpu", "disk", "data", "pipeline", "cuda", "suffix_logprob", "token_probs"} <= names
    files = ([p for side in SIDES for p in sources(side)] + sorted((REPO / "flexorch").rglob("*.py"))
             + sorted((REPO / "benchmarks").glob("*.py")))  # the benchmarks ask the types too
    offenders = {f"{p.relative_to(REPO)}:{line}" for p in files for line in named_choice_comparisons(p, names)}
    assert not offenders, "ask the type (contract/choices.py, ScoreKind) instead: " + ", ".join(sorted(offenders))
