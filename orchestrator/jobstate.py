"""Resume state in job_dir: `job.json` (what the results depend on) and `parts/` (committed rounds).

The fingerprint covers everything the scores depend on — the model's layer checksums and config,
the prompts file's bytes, the token ids they became, the score settings, the dtype and the flexorch
version — and nothing about placement: devices, batch sizes and shards may change between runs,
because results are keyed by prompt index and every part records the indices it holds.

Granularity: one part per round of a worker (one engine call: the model streamed once per
generation step over that round's prompts). A crash loses at most the rounds in flight, one per
worker.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import os
import shutil
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path

from flexorch.contract.choices import KVCompression
from flexorch.contract.atomic import atomic_write_text
from flexorch.orchestrator.prepare import COPIED_FILES
from flexorch.contract.errors import UserError
from flexorch.contract.manifest import Manifest
from flexorch.contract.protocol import ScoreKind, ScoreSpec, TokenizedPrompt
from flexorch.contract.parts import PART_SUFFIX, PartError, read_part, read_part_indices
from flexorch.contract.verified import sha256_file

JOB_FILE = "job.json"
PARTS_DIR = "parts"
LOCK_FILE = ".lock"
DAMAGED_SUFFIX = ".damaged"
STATE_VERSION = 1


def flexorch_version() -> str:
    try:
        return importlib.metadata.version("flexorch")
    except importlib.metadata.PackageNotFoundError:  # running from a source tree that is not installed
        return "unknown"


@dataclass(frozen=True)
class Fingerprint:
    """What a job's results depend on; two runs with equal fingerprints give identical scores."""

    model: str  # sha256 of the manifest (every layer's checksum and size) and the dir's config/tokenizer files
    prompts: str  # sha256 of the prompts file
    token_ids: str  # sha256 of the tokenized prompts (catches a changed tokenizer or max_length effect)
    score: str  # kind, and the token ids for token_probs
    generate_tokens: int
    dtype: str
    flexorch: str

    def changes_from(self, other: "Fingerprint") -> list[str]:
        return [f.name for f in fields(self) if getattr(self, f.name) != getattr(other, f.name)]


def _sha256_json(data) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def model_digest(manifest: Manifest, model_dir: str | Path) -> str:
    """The manifest without where it came from (moving or renaming a model dir keeps its results),
    and the dir's config, generation config and tokenizer files as they are now: the manifest holds
    the config as it was at prepare time, and an edited config.json changes the scores. Layer files
    are covered by their checksums in the manifest, verified as workers read them."""
    data = asdict(manifest)
    data.pop("source", None)
    data["files"] = {name: sha256_file(Path(model_dir) / name) for name in COPIED_FILES
                     if (Path(model_dir) / name).is_file()}
    return _sha256_json(data)


def make_fingerprint(manifest: Manifest, model_dir: str | Path, prompts_path: str | Path,
                     tokenized: Sequence[TokenizedPrompt], score: ScoreSpec, dtype: str,
                     kv_compression: Sequence[KVCompression] = ()) -> Fingerprint:
    """`kv_compression`: the KV cache compressions the plan's workers use (lossy: they change the scores);
    none is left out, so a job that keeps its cache as computed has the fingerprint it had before the option."""
    generate = score.kind == ScoreKind.GENERATE  # its limits, stop strings, sampling and EOS ids count too
    token_ids = _sha256_json([(p.prefix_ids, p.suffix_ids, *((p.max_new_tokens, p.stop) if generate else ()))
                              for p in tokenized])
    generation = f" {score.sampling} eos={list(score.eos_ids)} logprobs={score.logprobs}" if generate else ""
    lossy = sorted(set(kv_compression) - {KVCompression.NONE})
    generation += f" kv_cache_compression={'+'.join(lossy)}" if lossy else ""
    return Fingerprint(
        model=model_digest(manifest, model_dir), prompts=sha256_file(prompts_path), token_ids=token_ids,
        score=f"{score.kind}{list(score.token_ids) if score.token_ids else ''}{generation}",
        generate_tokens=score.generate_tokens, dtype=dtype, flexorch=flexorch_version(),
    )


@dataclass(frozen=True)
class JobState:
    """A job_dir opened for a run: where parts go and which prompts earlier runs completed."""

    job_dir: Path
    parts_dir: Path
    completed: Mapping[int, Path] = field(default_factory=dict)  # prompt index -> part holding it
    unreadable_parts: tuple[Path, ...] = ()  # damaged, renamed to *.damaged; their prompts are computed again
    runs: int = 1  # submits of this job, this one included

    def parts(self) -> list[Path]:
        """Every part in parts/, for the merge (damaged ones were moved aside when the job opened)."""
        return sorted(self.parts_dir.glob(f"*{PART_SUFFIX}"))

    def committed_now(self) -> set[int]:
        """Prompt indices in the parts on disk now, earlier runs' included: what a stopped run keeps,
        counted from the disk, since a part may be written after its worker's last message was read."""
        committed: set[int] = set()
        for part in self.parts():
            try:
                committed.update(read_part_indices(part))
            except PartError:  # damaged since the job opened: not kept
                continue
        return committed


def open_job(job_dir: str | Path, fingerprint: Fingerprint, n_prompts: int, restart: bool = False) -> JobState:
    """Check (or create) job_dir's job.json against `fingerprint` and find the committed prompts.

    Raises UserError when job_dir holds a different job's results (unless `restart`, which discards
    them). Call with the job_dir lock held (`locked`).
    """
    job_dir = Path(job_dir)
    parts_dir = job_dir / PARTS_DIR
    job_file = job_dir / JOB_FILE
    previous = None if restart else _read_job_file(job_file)
    if restart:
        shutil.rmtree(parts_dir, ignore_errors=True)
    elif previous is None and any(parts_dir.glob(f"*{PART_SUFFIX}")):
        raise UserError(f"job_dir {job_dir}: holds parts but no {JOB_FILE}, so nothing says which job they "
                        "belong to; use a new job_dir or --restart")
    elif previous is not None:
        changed = fingerprint.changes_from(previous[0])
        if changed:
            raise UserError(f"job_dir {job_dir} holds results of a different job (changed: {', '.join(changed)}); "
                            "use a new job_dir or --restart")
    parts_dir.mkdir(parents=True, exist_ok=True)
    _remove_temp_files(parts_dir)
    completed, unreadable = _scan_parts(parts_dir, n_prompts)
    runs = (previous[1] if previous else 0) + 1
    _write_job_file(job_file, fingerprint, n_prompts, runs)
    return JobState(job_dir, parts_dir, completed, unreadable, runs)


def _read_job_file(path: Path) -> tuple[Fingerprint, int] | None:
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
        return Fingerprint(**data["fingerprint"]), int(data.get("runs", 0))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{path}: unreadable ({type(exc).__name__}: {exc}); use --restart to start this job "
                        "afresh") from None


def _write_job_file(path: Path, fingerprint: Fingerprint, n_prompts: int, runs: int) -> None:
    data = {"version": STATE_VERSION, "fingerprint": asdict(fingerprint), "prompts": n_prompts, "runs": runs,
            "updated": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    atomic_write_text(path, json.dumps(data, indent=1) + "\n")


def _remove_temp_files(parts_dir: Path) -> None:
    """Temp files of writes a killed worker never finished (atomic_writer names them .<name>.*.tmp)."""
    for tmp in parts_dir.glob(".*.tmp"):
        tmp.unlink(missing_ok=True)


def _scan_parts(parts_dir: Path, n_prompts: int) -> tuple[dict[int, Path], tuple[Path, ...]]:
    completed: dict[int, Path] = {}
    unreadable = []
    for part in sorted(parts_dir.glob(f"*{PART_SUFFIX}")):
        # Read whole (every member's CRC checked), not just its indices: a part is renamed into place
        # only when complete, so damage comes from outside (a failing disk, a hand edit, a copy cut
        # short) and may sit in any member. Skipped here, its prompts are computed again; found only
        # at the merge, it would cost the whole run.
        try:
            indices = tuple(result.index for result in read_part(part))
        except PartError:
            # Moved aside (kept for a look, out of the merge): its round writes a part of the same name.
            part.replace(part.with_name(part.name + DAMAGED_SUFFIX))
            unreadable.append(part)
            continue
        if all(0 <= i < n_prompts for i in indices):
            for i in indices:
                completed.setdefault(i, part)
    return completed, tuple(unreadable)


@contextlib.contextmanager
def locked(job_dir: str | Path) -> Iterator[None]:
    """Hold job_dir for one submit: two controllers on one job_dir would write the same parts."""
    job_dir = Path(job_dir)
    job_dir.mkdir(parents=True, exist_ok=True)
    if os.name != "posix":  # no fcntl; the lock is a safety net, not needed for correctness of one run
        yield
        return
    import fcntl

    with open(job_dir / LOCK_FILE, "a+") as handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"job_dir {job_dir} is in use by another `flexorch submit`") from None
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def output_lock_path(output: str | Path) -> Path:
    output = Path(output)
    return output.with_name(f".{output.name}.lock")


@contextlib.contextmanager
def locked_output(output: str | Path) -> Iterator[None]:
    """Hold `output` for one job: two jobs (each in its own job_dir) writing one output would each
    replace the other's. The lock file beside it names the owner's pid and is removed on the way
    out; one left by a killed job is stale (flock ends with its process) and taken over."""
    path = output_lock_path(output)
    path.parent.mkdir(parents=True, exist_ok=True)  # the output's folder, which the merge makes anyway
    if os.name != "posix":
        yield
        return
    import fcntl

    while True:
        handle = open(path, "a+")
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            owner = handle.read().strip() or "?"
            handle.close()
            raise UserError(f"output {output} is being written by another job (pid {owner}); wait for it to "
                            "end or choose another output") from None
        try:
            if os.fstat(handle.fileno()).st_ino == os.stat(path).st_ino:
                break
        except FileNotFoundError:
            pass
        handle.close()  # its owner removed it between our open and our lock: lock the one now there
    try:
        handle.truncate(0)
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        yield
    finally:
        path.unlink(missing_ok=True)
        fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
        handle.close()
