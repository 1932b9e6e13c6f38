"""flexorch: score prompts with LLMs far larger than your GPU by streaming the model layer by layer.

    import flexorch
    results = flexorch.score("demo/model", [{"prefix": "2 + 2 =", "suffixes": [" 4", " 5"], "answer": 0}],
                             score="suffix_logprob")
    print(results.accuracy, results[0].scores["logprob"])

`flexorch.plan(...)` shows what `score` would run; bad input raises `flexorch.UserError` (a
ValueError, one line naming what is wrong), a failure while running `flexorch.JobFailed`.
Importing flexorch does not import torch: workers do, in their own processes.
"""

from pathlib import Path as _Path

# In a checkout this folder holds only the API and the contract; `orchestrator/` and `workers/` sit
# beside it and pyproject maps them under this name. Python run from the checkout's root imports
# this folder ahead of any installed flexorch, so it must find its two siblings itself, or
# `import flexorch.orchestrator` fails whenever the install is not the editable one.
_checkout = _Path(__file__).resolve().parent.parent
if not (_Path(__file__).parent / "orchestrator").is_dir() and (_checkout / "orchestrator" / "__init__.py").is_file():
    __path__.append(str(_checkout))
del _checkout

from flexorch.api import PromptScores, Results, generate, plan, score
from flexorch.contract.errors import JobFailed, UserError
from flexorch.contract.protocol import ScoreKind

__all__ = ["score", "generate", "plan", "Results", "PromptScores", "ScoreKind", "UserError", "JobFailed"]
