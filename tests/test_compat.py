"""The transformers versions flexorch is tested on (README, "Supported models"): the suite passes under
5.17 (what the GPU machines have) and 5.25 (the newest when written), so pyproject's ranges must keep
admitting both, and the huggingface_hub each of them requires. A whole second suite run per version is
not part of CI: this catches a range narrowed past them."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
# transformers version -> the huggingface_hub it was tested with (5.17 requires huggingface_hub < 2)
TESTED = {"5.17.0": "1.33.0", "5.25.0": "2.4.0"}


def _requirements() -> dict[str, Requirement]:
    listed = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return {r.name.lower().replace("_", "-"): r for r in map(Requirement, listed)}


def test_pyproject_admits_every_tested_transformers_and_its_hub():
    requirements = _requirements()
    for transformers, hub in TESTED.items():
        assert requirements["transformers"].specifier.contains(transformers), transformers
        assert requirements["huggingface-hub"].specifier.contains(hub), hub


def test_the_readme_names_the_tested_versions():
    line = next(line for line in (ROOT / "README.md").read_text().splitlines() if "Tested on transformers" in line)
    named = set(re.findall(r"\b5\.\d+\b", line))
    assert named == {v.rsplit(".", 1)[0] for v in TESTED}, line
