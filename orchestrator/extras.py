"""How to install an optional extra (`ray`, `lm-eval`), as a command that works however flexorch
was installed: `pip install 'flexorch[ray]'` fails when flexorch came from a checkout (it is not on
PyPI), and `pip install -e '.[ray]'` only works from the checkout's folder; the extra's own
requirements, read from the installed package's metadata (pyproject.toml), install anywhere.
"""

from __future__ import annotations

import importlib.metadata
import re
import shlex


def extra_requirements(extra: str) -> list[str]:
    """The requirements of flexorch's `extra`, as pyproject.toml lists them (without their marker)."""
    try:
        requires = importlib.metadata.requires("flexorch") or []
    except importlib.metadata.PackageNotFoundError:  # a source tree that is not installed
        return []
    # pyproject's extras come out as `req; extra == "name"`, and nothing else marks them
    marker = re.compile(r"\s*extra\s*==\s*[\"']" + re.escape(extra) + r"[\"']\s*")
    out = []
    for line in requires:
        requirement, _, condition = line.partition(";")
        if marker.fullmatch(condition):
            out.append(requirement.strip())
    return out


def install_hint(extra: str) -> str:
    """`pip install 'req' ...` for `extra`; from a checkout's folder `pip install -e '.[extra]'` does the same."""
    requirements = extra_requirements(extra)
    if not requirements:
        return f"pip install -e '.[{extra}]' in the flexorch checkout"
    return "pip install " + " ".join(shlex.quote(r) for r in requirements)
