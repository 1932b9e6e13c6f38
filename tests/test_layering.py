"""The orchestrator stays light: probing, planning and the CLI never import torch at import time."""

import subprocess
import sys


def test_orchestrator_modules_do_not_import_torch():
    modules = ["flexorch.orchestrator." + m for m in ("cli", "controller", "planner", "hardware", "spec", "prompts",
                                               "merge", "progress", "executor", "jobstate", "modelstore")]
    code = f"import sys; import {', '.join(modules)}; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
