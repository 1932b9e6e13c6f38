"""Which model types flexorch runs: the ones whose stage-wise scores are tested against the un-split
model. Torch-free, so the controller refuses an untested model before any work starts and the worker
applies the same rule."""

from __future__ import annotations

from flexorch.contract.errors import UserError

# Each runs through the general adapter (workers/adapter.py) and is tested, every score kind, against
# the un-split AutoModelForCausalLM (tests/test_engine.py). MoE types are marked: their experts can
# be streamed in groups (docs/design.md).
DENSE_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "phi3", "gemma2", "gemma3_text", "olmo2",
                     "granite")
MOE_MODEL_TYPES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")
TESTED_MODEL_TYPES = DENSE_MODEL_TYPES + MOE_MODEL_TYPES


def check_model_type(model_type: str, allow_untested: bool, where: str) -> None:
    """Refuse a model type outside TESTED_MODEL_TYPES unless the job says allow_untested_models."""
    if model_type in TESTED_MODEL_TYPES or allow_untested:
        return
    raise UserError(
        f"{where}: model type {model_type!r} is not tested with flexorch (tested: {', '.join(TESTED_MODEL_TYPES)}); "
        "set allow_untested_models: true in the job to run it anyway (scores are then unchecked)"
    )
