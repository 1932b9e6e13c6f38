"""A round's checkpoint on disk: where it lies and what its `checkpoint.json` says. Torch-free, so the
controller (which removes a restarted job's checkpoints) and the worker (which writes and reads
them: workers/checkpoint.py) share one definition.

    job_dir/checkpoints/<round>/ckpt-000003/   one complete checkpoint: checkpoint.json + tensor files
    job_dir/checkpoints/<round>/.tmp-*/        one being written (a killed writer's: removed on resume)

A checkpoint is a directory written whole under a temporary name and renamed into place, so a
`ckpt-*` directory is complete or absent. `<round>` names the round by its prompt indices; the
job's fingerprint and the engine layout the state depends on are in checkpoint.json, so a
checkpoint of another job, or of a round batched differently, is ignored rather than resumed.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

CHECKPOINTS_DIR = "checkpoints"
META_NAME = "checkpoint.json"
CHECKPOINT_PREFIX = "ckpt-"
FORMAT = 1


def round_folder(root: str | Path, indices: Sequence[int]) -> Path:
    """The folder of the round holding prompts `indices` (as parts name rounds: by their indices)."""
    digest = hashlib.sha256(",".join(map(str, indices)).encode()).hexdigest()[:12]
    return Path(root) / f"round-{indices[0] if indices else 0}-{digest}"


def fingerprint_key(fingerprint: dict) -> str:
    """A job fingerprint (orchestrator/jobstate.py, as a dict) as the key its checkpoints carry."""
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True, default=str).encode()).hexdigest()[:32]


@dataclass(frozen=True)
class CheckpointMeta:
    """What checkpoint.json holds: whose state it is and where the round resumes."""

    key: str  # the job's fingerprint_key
    layout: str  # the engine settings the batches and shard positions follow (batch_tokens, ...)
    step: int  # the generation step to resume at
    position: int  # the shard position (in the worker's pass) to resume at
    generated: list  # per prompt, per suffix: the ids generated so far (`step` of them)
    files: dict  # every tensor file of the checkpoint: name -> bytes (a truncated one is refused)
    format: int = FORMAT

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "CheckpointMeta":
        """Raises ValueError (or KeyError, TypeError) for what is not a checkpoint of this format."""
        data = json.loads(text)
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError("not a checkpoint of this format")
        meta = cls(**data)
        if not (isinstance(meta.step, int) and isinstance(meta.position, int) and isinstance(meta.files, dict)):
            raise ValueError("malformed checkpoint")
        return meta
