"""The planner: one pure function from (hardware, model manifest, job spec, prompt sizes) to a Plan.

`make_plan` is the only place placement is decided. It resolves every `auto` of the job with a
reason string, checks every explicit value against the budgets (a value that cannot fit is a
`UserError` before any work starts, saying what fits), and predicts each worker's peak memory and
time. No I/O, no torch: tests describe machines and models with plain numbers.

Read in this order, each module opening with its part of the model:
- plan.py: what comes out (`Plan`, `WorkerPlan`, `ModePrediction`);
- model.py: what a model and its prompts cost (shapes, experts, loads, result bytes);
- memory.py: the memory model (peaks, working bytes, pinned rounding, edges) and the budgets;
- timing.py: the time model (shard costs, rates, reads);
- search.py: one worker's settings (options, candidates, the objective, rounds, expert groups);
- modes.py: data, pipeline and cluster, each planning its seats through `_plan_worker`.
Printing a plan is orchestrator/render.py's.
"""

from flexorch.orchestrator.planner.model import _active_params, _describe_model
from flexorch.orchestrator.planner.modes import make_cluster_plan, make_plan
from flexorch.orchestrator.planner.plan import PIPELINE_CHANNEL_BATCHES, ModePrediction, Plan, WorkerPlan
from flexorch.orchestrator.planner.search import BATCH_TOKENS_CAP
from flexorch.orchestrator.render import render_plan

__all__ = ["BATCH_TOKENS_CAP", "PIPELINE_CHANNEL_BATCHES", "ModePrediction", "Plan", "WorkerPlan",
           "make_cluster_plan", "make_plan", "render_plan"]
