"""flexorch: score prompts with LLMs far larger than your GPU by streaming the model layer by layer.

    import flexorch
    results = flexorch.score("demo/model", [{"prefix": "2 + 2 =", "suffixes": [" 4", " 5"], "answer": 0}],
                             score="suffix_logprob")
    print(results.accuracy, results[0].scores["logprob"])

`flexorch.plan(...)` shows what `score` would run; bad input raises `flexorch.UserError` (a
ValueError, one line naming what is wrong), a failure while running `flexorch.JobFailed`.
Importing flexorch does not import torch: workers do, in their own processes.
"""

from flexorch.api import PromptScores, Results, plan, score
from flexorch.contract.errors import JobFailed, UserError
from flexorch.contract.protocol import ScoreKind

__all__ = ["score", "plan", "Results", "PromptScores", "ScoreKind", "UserError", "JobFailed"]
