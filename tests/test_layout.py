"""The package's shape, checked from the folders rather than a hand-kept list: one installed name,
an orchestrator that never imports torch at import time, workers that never import the
orchestrator, and a torch-free contract both sides share."""

from __future__ import annotations

import ast
import importlib.metadata
import importlib.util
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SIDES = {"flexorch.orchestrator": REPO / "orchestrator", "flexorch.workers": REPO / "workers",
         "flexorch.contract": REPO / "flexorch" / "contract"}


def modules(side: str) -> list[str]:
    return sorted(f"{side}.{p.stem}" for p in SIDES[side].glob("*.py") if p.stem != "__init__")


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
    offenders = {p.name for p in SIDES[side].glob("*.py")
                 if any(n.split(".")[0] == "torch" for n in top_level_imports(p))}
    assert not offenders


@pytest.mark.parametrize("side", ["flexorch.workers", "flexorch.contract"])
def test_workers_and_contract_never_import_the_orchestrator(side):
    offenders = {p.name: sorted(n for n in imported_names(p) if n.startswith(("flexorch.orchestrator", "orchestrator")))
                 for p in SIDES[side].glob("*.py")}
    assert not {k: v for k, v in offenders.items() if v}


def test_only_the_ray_modules_import_ray():
    offenders = {f"{side}.{p.stem}" for side in SIDES for p in SIDES[side].glob("*.py")
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
        assert "flexorch/orchestrator/planner.py" in archive.namelist()
        assert "flexorch/workers/engine.py" in archive.namelist()
    assert {t for t in top if not t.endswith(".dist-info")} == {"flexorch"}
