"""The controller behind `flexorch plan` and `flexorch submit`.

    job file ─► spec ─► prompts ─► model (manifest) ─► tokenize ─► probe ─► plan
             ─► HF dir converted (cached) ─► job_dir (resume state)
             ─► executor: one worker per device ─► parts ─► merge ─► output + report.json

`plan_job` stops after the plan and changes nothing (an HF checkpoint is described, not converted).
`submit` runs the job and returns the exit status: 0 done, 1 a worker failed (one line naming it,
its device and the error), 130 interrupted; bad input raises UserError (the CLI exits 2). The
output file exists only once every prompt is committed.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from rich.console import Console

from flexorch.orchestrator import jobstate
from flexorch.contract.atomic import atomic_write_text
from flexorch.orchestrator.executor import FAILURES, Died, Hung, LocalProcessExecutor
from flexorch.orchestrator.calibrate import calibrated
from flexorch.orchestrator.hardware import Hardware, Node, probe
from flexorch.orchestrator import learned, pace
from flexorch.orchestrator.merge import collect_results, write_output
from flexorch.orchestrator.summary import Summary, summarize
from flexorch.orchestrator.modelstore import default_cache_dir, is_hf_checkpoint, resolve_model
from flexorch.orchestrator.planner import Plan, WorkerPlan, make_cluster_plan, make_plan
from flexorch.orchestrator.progress import WorkerLine, make_progress
from flexorch.orchestrator.generation import eos_ids, with_text
from flexorch.orchestrator.prompts import (Prompt, check_answers, load_tokenizer, model_max_length, model_vocab_size,
                                           read_prompts, token_ids_for, tokenize_prompts, updated_prompts_path,
                                           write_updated_prompts)
from flexorch.orchestrator.spec import JobSpec, load_job
from flexorch.contract.errors import ExitCode, JobFailed, Terminated, UserError
from flexorch.contract.checkpoints import CHECKPOINTS_DIR, fingerprint_key
from flexorch.contract.leftovers import ACTIVATIONS, atomic_temps, remove_dead
from flexorch.contract.manifest import Manifest, is_layerwise_dir, read_json_object, read_manifest
from flexorch.contract.models import check_model_type
from flexorch.contract.choices import Parallel
from flexorch.contract.protocol import PromptResult, ScoreKind, ScoreSpec, TokenizedPrompt
from flexorch.contract.messages import (FAIL_USER, Failed, Finished, PipelineLinks, Progress, Ready, Round,
                                        RoundDone, SteppedDown, WorkerHooks, WorkerTask)
from flexorch.contract.verified import unmarked_bytes

REPORT_NAME = "report.json"
LOGS_DIR = "logs"
# Fault injection for tests that run `flexorch submit` in a subprocess: JSON mapping a worker name
# to WorkerHooks fields, e.g. {"worker1": {"sigkill_after_rounds": 1}}. Never set it in production.
FAULTS_ENV = "FLEXORCH_TEST_FAULTS"


@dataclass(frozen=True)
class PreparedJob:
    """Everything read and decided before a worker starts."""

    spec: JobSpec
    prompts: list[Prompt]
    tokenized: list[TokenizedPrompt]
    score: ScoreSpec
    manifest: Manifest  # what the plan was made from (an HF dir's is described: no checksums)
    tokenizer: object
    plan: Plan
    nodes: tuple[Node, ...] = ()  # executor ray: the cluster the plan was made for
    hardware: Hardware | None = None  # local: what the plan was made for (its figures: learned, measured)


def plan_job(job_path: str | Path) -> tuple[JobSpec, Plan]:
    """Validate the job file and plan it; writes nothing (an HF dir is described, not converted)."""
    spec = load_job(Path(job_path))
    return spec, plan_spec(spec)


def plan_spec(spec: JobSpec) -> Plan:
    model = _identify(spec.model)
    job = prepare_job(spec, model.path, model.manifest)
    if job.nodes and model.layerwise:  # read-only, and the plan is where a user finds out
        _ray_cluster(spec).check_model(_used_nodes(job), model.path)
    return job.plan


@dataclass(frozen=True)
class _Model:
    """The job's model dir, told apart once: a layerwise dir, or a checkpoint converted on first run."""

    path: Path
    manifest: Manifest  # a checkpoint's is described: no layer checksums until it is prepared
    layerwise: bool


def _identify(path: Path) -> _Model:
    if is_layerwise_dir(path):
        return _Model(path, read_manifest(path), layerwise=True)
    if is_hf_checkpoint(path):
        from flexorch.orchestrator.prepare import describe_checkpoint

        return _Model(path, describe_checkpoint(path), layerwise=False)
    raise UserError(f"{path}: neither a layerwise dir (flexorch prepare) nor a Hugging Face checkpoint dir")


def prepare_job(spec: JobSpec, model_dir: Path, manifest: Manifest) -> PreparedJob:
    """Prompts → token ids → score ids → hardware → plan. `model_dir` holds the tokenizer."""
    cluster = _ray_cluster(spec) if spec.executor == "ray" else None  # no Ray, no cluster: say so first
    check_model_type(manifest.model_type, spec.allow_untested_models, str(spec.model))
    generation = spec.score.generate  # score.kind generate, else None
    prompts = read_prompts(spec.prompts, generate=generation is not None)
    tokenizer = load_tokenizer(model_dir, spec.allow_remote_code)
    max_length = spec.max_length or model_max_length(manifest.config)
    tokenized = tokenize_prompts(prompts, tokenizer, max_length, spec.prompts, spec.generate_tokens,
                                 vocab_size=model_vocab_size(manifest.config) or len(tokenizer), generation=generation)
    token_ids = token_ids_for(spec.score.tokens, tokenizer, spec.path) if spec.score.kind is ScoreKind.TOKEN_PROBS else ()
    check_answers(prompts, spec.score.kind, len(token_ids), spec.prompts)
    score = ScoreSpec(kind=spec.score.kind, token_ids=token_ids, generate_tokens=spec.generate_tokens)
    if generation is not None:
        score = replace(score, sampling=generation.sampling, logprobs=generation.logprobs,
                        eos_ids=eos_ids(model_dir, manifest.config))
    # Free disk where activations would go: the planner's disk budget (probe walks up to a parent
    # that exists, so job_dir need not exist yet).
    disk_path = spec.disk_folder or spec.job_dir
    sizes = dict(prompt_tokens=[p.n_tokens for p in tokenized], suffix_counts=[len(p.suffix_ids) for p in tokenized],
                 scored_counts=[len(score.kind.positions(len(p.prefix_ids), tuple(map(len, p.suffix_ids))))
                                for p in tokenized])
    if generation is not None:  # the planner prices each prompt's own steps and KV cache growth
        sizes["new_tokens"] = [p.max_new_tokens for p in tokenized]
    if cluster is not None:
        nodes = cluster.probe_nodes(disk_path)
        plan = make_cluster_plan(nodes, manifest, spec, **sizes)
        return PreparedJob(spec, prompts, tokenized, score, manifest, tokenizer, plan, nodes)
    hardware = calibrated(probe(disk_path=disk_path), default_cache_dir(), console=Console(stderr=True))
    # a checkpoint is prepared (and its files marked) before the workers read it: nothing to hash
    unverified = (unmarked_bytes(model_dir, [(e.file, e.sha256, e.bytes) for e in manifest.layers if e.file])
                  if is_layerwise_dir(model_dir) else 0)
    plan = make_plan(hardware, manifest, spec, **sizes, unverified_bytes=unverified)
    return PreparedJob(spec, prompts, tokenized, score, manifest, tokenizer, plan, hardware=hardware)


def _ray_cluster(spec: JobSpec):
    """orchestrator.raycluster, connected to the job's cluster; or one line saying how to get Ray."""
    try:
        from flexorch.orchestrator import raycluster
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] != "ray":
            raise
        from flexorch.orchestrator.extras import install_hint

        raise UserError(f"{spec.path}: executor: ray needs Ray, which is not installed: "
                        f"{install_hint('ray')}") from None
    raycluster.connect(spec.ray_address)
    return raycluster


@dataclass(frozen=True)
class JobResult:
    """A completed job: its prompts and their results in prompt order, and its report."""

    spec: JobSpec
    prompts: list[Prompt]
    results: list[PromptResult]
    report: dict
    report_path: Path
    notes: tuple[str, ...] = ()  # said after the done line: the predictions this job missed


# -- submit ------------------------------------------------------------------------------------------
@dataclass
class WorkerRecord:
    """One worker's line of report.json, filled in from its messages."""

    name: str
    device: str
    prompts: int  # in its slice
    prompts_reused: int  # of those, committed by an earlier run
    node: str | None = None  # executor ray: its node, "node1 (10.0.0.2)"
    rounds: int = 0  # rounds committed in this run
    pid: int | None = None
    seconds: float = 0.0  # from process start to Finished
    wall_seconds: float = 0.0  # from its spawn to Finished, as the controller saw it
    engine_seconds: float = 0.0  # inside the engine (the rest is start-up: imports, device set-up)
    bytes_read: int = 0
    peak_device_memory: int = 0
    peak_rss: int = 0
    load_seconds: float = 0.0  # compute waited for weights
    read_seconds: float = 0.0
    compute_seconds: float = 0.0
    tokens: int = 0
    status: str = "waiting"  # waiting | running | finished | failed | stopped | reused
    error: str | None = None
    step_downs: list[dict] = field(default_factory=list)  # out-of-memory errors survived, in order
    prompts_committed: int = 0  # by this run
    shards_resumed: int = 0  # shard steps its rounds' checkpoints spared (workers/checkpoint.py)
    checkpoints: int = 0  # checkpoints its rounds wrote, and what writing them cost
    checkpoint_seconds: float = 0.0
    checkpoint_bytes: int = 0
    # the round under way ({"round", "prompts", "engine_seconds", "saved_seconds"}); a run stopped now
    # loses its work but what its newest checkpoint keeps (saved_seconds of its engine_seconds)
    in_flight: dict | None = None

    def update(self, message) -> None:
        if isinstance(message, Ready):
            self.pid, self.status = message.pid, "running"
        elif isinstance(message, Progress):
            self.in_flight = {"round": message.round_id, "prompts": message.event.prompts,
                              "engine_seconds": round(message.event.seconds, 3),
                              "saved_seconds": round(message.event.saved_seconds, 3)}
        elif isinstance(message, RoundDone):
            s = message.summary
            self.in_flight = None
            self.prompts_committed += len(message.indices)
            self.rounds += 1
            self.engine_seconds += s.seconds
            self.bytes_read += s.bytes_read
            self.peak_device_memory = max(self.peak_device_memory, s.peak_device_memory)
            self.peak_rss = max(self.peak_rss, s.peak_rss)
            self.load_seconds += s.load_seconds
            self.read_seconds += s.read_seconds
            self.compute_seconds += s.compute_seconds
            self.tokens += s.tokens
            self.shards_resumed += s.shards_resumed
            self.checkpoints += s.checkpoints
            self.checkpoint_seconds += s.checkpoint_seconds
            self.checkpoint_bytes += s.checkpoint_bytes
        elif isinstance(message, SteppedDown):
            self.step_downs.append({"round": message.round_id, "change": message.change, "error": message.error})
        elif isinstance(message, Finished):
            self.seconds, self.status = message.seconds, "finished"


@dataclass
class _Run:
    """What one submit did, for report.json."""

    job: PreparedJob
    model_dir: Path
    state: jobstate.JobState
    records: dict[str, WorkerRecord] = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)
    status: str = "running"
    error: str | None = None
    summary: Summary | None = None  # once the output is written
    committed: set[int] = field(default_factory=set)  # prompts committed by this run
    checkpoint_key: str = ""  # the job's fingerprint, which its checkpoints carry
    missed: list[pace.Missed] = field(default_factory=list)  # predictions the measured figures missed

    def update(self, message) -> None:
        self.records[message.worker].update(message)
        if isinstance(message, RoundDone):  # a pipeline's stages report the same prompts: counted once
            self.committed.update(message.indices)

    def lost(self) -> dict:
        """The work of the rounds under way when the run stopped: computed, never committed, and not
        kept in a checkpoint (as of each worker's last progress report); `saved_seconds`: the work
        those checkpoints keep, which a resubmit resumes after."""
        flights = [r.in_flight for r in self.records.values() if r.in_flight and r.status != "finished"]
        saved = sum(f["saved_seconds"] for f in flights)
        return {"rounds": len(flights), "prompts": sum(f["prompts"] for f in flights),
                "engine_seconds": round(sum(f["engine_seconds"] for f in flights) - saved, 3),
                "saved_seconds": round(saved, 3)}

    def report(self) -> dict:
        spec, n = self.job.spec, len(self.job.prompts)
        reused = len([i for i in self.state.completed if i < n])
        computed = len(self.committed)
        return {
            "status": self.status, "error": self.error, "job": str(spec.path.resolve()),
            "model": str(self.model_dir), "output": str(spec.output.resolve()),
            # scores of compressed weights are approximate: the report says so
            "compression": self.job.manifest.compression,
            # what is committed (reused from earlier runs, or computed by this one) is kept for a resubmit;
            # prompts_left still have to be computed, and `lost` is what this run computed for nothing
            "prompts": n, "prompts_reused": reused, "prompts_computed": computed,
            "prompts_left": n - reused - computed,
            "rounds_committed": len(set(self.state.parts()) - set(self.state.completed.values())),  # parts written
            "lost": self.lost() if self.status != "completed" else None, "runs": self.state.runs,
            "seconds": round(time.monotonic() - self.started, 3),
            "workers": [vars(r) for r in self.records.values()], "plan": self.job.plan.to_dict(),
            "summary": self.summary.to_dict() if self.summary else None,
            "prediction_missed": [m.to_dict() for m in self.missed],
        }

    def finish(self, status: str, error: str | None = None) -> Path:
        """Record how the run ended (workers still running were stopped) and write report.json."""
        self.status, self.error = status, error
        if status != "completed":  # the disk is what a resubmit will find
            self.committed |= self.state.committed_now() - set(self.state.completed)
        for record in self.records.values():
            if record.status == "running":
                record.status = "stopped"
        path = self.state.job_dir / REPORT_NAME
        atomic_write_text(path, json.dumps(self.report(), indent=1, default=str) + "\n")
        return path


def submit(job_path: str | Path, console: Console, restart: bool = False,
           faults: dict[str, WorkerHooks] | None = None) -> int:
    """Run the job file; returns the exit status (bad input raises UserError: the CLI exits 2)."""
    try:
        console.out(done_line(run_job(load_job(Path(job_path)), console, restart=restart, faults=faults)),
                    highlight=False)
    except JobFailed as exc:
        print(f"error: {exc}", file=sys.stderr)
        return ExitCode.FAILED
    except KeyboardInterrupt as exc:
        return ExitCode.stopped_by(exc)
    return ExitCode.OK


def run_job(spec: JobSpec, console: Console, restart: bool = False,
            faults: dict[str, WorkerHooks] | None = None,
            on_accepted: Callable[[], None] | None = None) -> JobResult:
    """Run a validated job to its output. Raises UserError (bad input),
    JobFailed (a worker failed: the others were stopped) or KeyboardInterrupt, each after writing
    the report. `faults`: test hooks per worker name (default: from FLEXORCH_TEST_FAULTS);
    `on_accepted`: called once the job holds job_dir and output and job_dir's state took it (the
    API writes its job files there then, and not for a job that is refused)."""
    # Everything is validated and planned before an HF checkpoint is converted (which can take an
    # hour for a 70B model): a typo in the prompts must not cost that.
    model = _identify(spec.model)
    job = prepare_job(spec, model.path, model.manifest)
    model_dir, manifest = model.path, model.manifest
    if not model.layerwise:  # converted now (once; then from the cache), with the checksums the fingerprint needs
        model_dir = resolve_model(model.path, console=console)
        manifest = read_manifest(model_dir)
    if job.nodes:
        _ray_cluster(spec).check_model(_used_nodes(job), model_dir)
    fingerprint = jobstate.make_fingerprint(manifest, model_dir, spec.prompts, job.tokenized, job.score,
                                            job.plan.dtype, [w.settings.kv_cache_compression for w in job.plan.workers])
    with jobstate.locked(spec.job_dir), jobstate.locked_output(spec.output):
        state = jobstate.open_job(spec.job_dir, fingerprint, len(job.prompts), restart=restart)
        if restart:  # its checkpoints would resume what --restart discards
            shutil.rmtree(spec.job_dir / CHECKPOINTS_DIR, ignore_errors=True)
        if on_accepted is not None:
            on_accepted()
        _remove_leftovers(job)
        run = _Run(job, model_dir, state, checkpoint_key=fingerprint_key(asdict(fingerprint)))
        tasks = _make_tasks(run, faults if faults is not None else _faults_from_env())
        console.out(_plan_line(run, tasks), highlight=False)
        return _execute(run, tasks, console)


def _execute(run: _Run, tasks: list[WorkerTask], console: Console) -> JobResult:
    spec = run.job.spec
    try:
        failure = _run_workers(run, tasks, spec.worker_timeout, console)
    except KeyboardInterrupt as exc:
        how = "terminated (SIGTERM)" if isinstance(exc, Terminated) else "interrupted"
        run.finish("interrupted", how)
        print(f"{how}: every worker stopped; {_kept(run)}", file=sys.stderr)
        raise
    if failure is not None:
        run.finish("failed", failure)
        raise JobFailed(failure)
    try:
        results = _write_outputs(run)
    except OSError as exc:  # a disk that fills or a folder made read-only while the job ran
        error = f"cannot write the output {spec.output}: {exc.strerror or exc} (committed results are kept in " \
                f"{spec.job_dir}; free space and submit again)"
        run.finish("failed", error)
        raise JobFailed(error) from None
    learned_now = _learn(run, console)
    report = run.finish("completed")
    notes = tuple(m.describe() + ("; the next plan uses what this job measured" if learned_now else "")
                  for m in run.missed)
    return JobResult(spec, run.job.prompts, results, run.report(), report, notes)


def done_line(result: JobResult, paths: bool = True) -> str:
    """What a completed job says last: the done line, then the predictions it missed; without `paths`
    where they lie in a folder that is about to go (the API's temporary job)."""
    report = result.report
    where = f" -> {result.spec.output.resolve()}; report {result.report_path.resolve()}" if paths else ""
    return "\n".join([f"done: {report['prompts']} prompts ({report['prompts_reused']} reused) in "
                      f"{report['seconds']:.1f} s{where}", *result.notes])


def _kept(run: _Run) -> str:
    """What an interrupted run leaves: the committed prompts, kept, and the rounds in progress, lost."""
    report, lost = run.report(), run.lost()
    kept = report["prompts_reused"] + report["prompts_computed"]
    saved = f", {lost['saved_seconds']:.0f} s more kept in checkpoints" if lost["saved_seconds"] else ""
    lost_text = (f"; lost: {lost['prompts']} prompts of {lost['rounds']} round(s) in progress "
                 f"({lost['engine_seconds']:.0f} s of compute{saved})" if lost["rounds"] else "")
    return (f"{kept} of {report['prompts']} prompts committed ({report['prompts_computed']} by this run), kept in "
            f"{run.job.spec.job_dir} (submit again to resume){lost_text}")


def _learn(run: _Run, console: Console) -> bool:
    """Each worker's measured pace against its plan: the predictions it missed (run.missed), and the
    figures the machine learns (orchestrator/learned.py). Whether anything was learned."""
    paces = pace.worker_paces(run.job.plan, run.records.values(), [p.n_tokens for p in run.job.tokenized])
    run.missed = pace.missed_predictions(paces)
    used = run.job.hardware.learned if run.job.hardware else None
    if used is None or not paces:  # no calibration (FLEXORCH_CALIBRATE=0, a cluster): nothing to correct
        return False
    try:
        learned.record(default_cache_dir(), used,
                       pace.observations(paces, run.job.hardware, run.job.plan.dtype, run.job.manifest.hidden_size))
    except OSError as exc:  # a read-only cache loses the lesson, not the job
        console.out(f"could not record this job's pace in {default_cache_dir()}: {exc}", highlight=False)
        return False
    return True


def _faults_from_env() -> dict[str, WorkerHooks]:
    raw = os.environ.get(FAULTS_ENV)
    if not raw:
        return {}
    return {name: WorkerHooks.from_dict(hooks) for name, hooks in json.loads(raw).items()}


def _remove_leftovers(job: PreparedJob) -> None:
    """What killed runs of this job left: hidden temp outputs and `storage: disk` activation dirs.
    A finished output stays: the new one replaces it atomically once this run completes, so an
    interrupted --restart keeps the last complete output."""
    spec = job.spec
    for path in (spec.output, updated_prompts_path(spec.output, spec.prompts_format)):
        remove_dead(path.parent, atomic_temps(path.name))
    remove_dead(spec.job_dir, atomic_temps())
    for worker in job.plan.workers:
        if worker.settings.disk_folder:
            remove_dead(worker.settings.disk_folder, ACTIVATIONS)


def _previous_figures(job_dir: Path) -> dict[str, dict]:
    """Per worker, its line of the last report.json (none if there is no readable one)."""
    try:
        report = read_json_object(job_dir / REPORT_NAME) if (job_dir / REPORT_NAME).is_file() else {}
    except UserError:  # a damaged report is only lost figures
        return {}
    workers = report.get("workers")
    if not isinstance(workers, list):
        return {}
    return {w["name"]: w for w in workers if isinstance(w, dict) and isinstance(w.get("name"), str)}


# WorkerRecord's measurements: what a worker with nothing left to compute carries over.
_FIGURES = ("rounds", "seconds", "engine_seconds", "bytes_read", "peak_device_memory", "peak_rss", "load_seconds",
            "read_seconds", "compute_seconds", "tokens", "shards_resumed", "checkpoints",
            "checkpoint_seconds", "checkpoint_bytes")


def _keep_figures(record: WorkerRecord, previous: dict | None) -> None:
    """A worker with nothing left to compute keeps the figures of the run that computed its prompts."""
    if not previous or previous.get("prompts") != record.prompts:
        return
    for name in _FIGURES:
        value = previous.get(name)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            setattr(record, name, value)


def _make_tasks(run: _Run, faults: dict[str, WorkerHooks]) -> list[WorkerTask]:
    """One task per planned worker with prompts left: committed prompts are dropped from its rounds
    (keeping round ids), and a worker with nothing left is not started."""
    tasks = []
    completed = run.state.completed
    previous = _previous_figures(run.state.job_dir)
    nodes = {node.name: node for node in run.job.nodes}
    for wp in run.job.plan.workers:
        reused = sum(1 for i in wp.prompt_indices if i in completed)
        node = f"{wp.node} ({nodes[wp.node].address})" if wp.node else None
        record = WorkerRecord(wp.name, wp.device, len(wp.prompt_indices), reused, node)
        run.records[wp.name] = record
        rounds = _rounds_left(wp, run.job.tokenized, completed)
        if not rounds:
            record.status = "reused"
            _keep_figures(record, previous.get(wp.name))
            continue
        tasks.append(WorkerTask(
            name=wp.name, model_dir=str(run.model_dir), settings=_checkpointed(wp, run), score=run.job.score,
            rounds=rounds, parts_dir=str(run.state.parts_dir), planned_rounds=len(wp.rounds),
            log_path=str(run.state.job_dir / LOGS_DIR / f"{wp.name}.log"),
            hooks=faults.get(wp.name, WorkerHooks()), return_results=bool(wp.node),
        ))
    return tasks


def _checkpointed(wp: WorkerPlan, run: _Run):
    """The worker's settings with where its rounds' checkpoints go (job_dir/checkpoints) and the key
    they carry; none for a worker on another node, which may not see job_dir."""
    if wp.node:
        return wp.settings
    return replace(wp.settings, checkpoint_dir=str(run.state.job_dir / CHECKPOINTS_DIR),
                               checkpoint_key=run.checkpoint_key)


def _rounds_left(wp: WorkerPlan, tokenized: list[TokenizedPrompt], completed) -> tuple[Round, ...]:
    rounds = []
    for round_id, indices in enumerate(wp.rounds):
        left = tuple(tokenized[i] for i in indices if i not in completed)
        if left:
            rounds.append(Round(round_id, left))
    return tuple(rounds)


def _plan_line(run: _Run, tasks: list[WorkerTask]) -> str:
    workers = ", ".join(f"{w.name} on {w.device}" for w in run.job.plan.workers)
    reused = len(run.state.completed)
    resumed = f"; resuming: {reused} prompts reused from earlier runs" if reused else ""
    damaged = run.state.unreadable_parts
    if damaged:  # their prompts are not in `completed`, so this run computes them again
        resumed += f"; {len(damaged)} damaged part(s) moved aside (*.damaged), their prompts computed again: " + \
            ", ".join(p.name for p in damaged[:3]) + (" ..." if len(damaged) > 3 else "")
    return (f"job {run.job.spec.path}: {len(run.job.prompts)} prompts, dtype {run.job.plan.dtype}, "
            f"{len(tasks)} of {len(run.job.plan.workers)} workers to run ({workers}){resumed}")


def _run_workers(run: _Run, tasks: list[WorkerTask], worker_timeout: float | None, console: Console) -> str | None:
    """Run `tasks` to the end; returns None, or the one-line failure of the first worker to fail
    (the others are stopped). Every worker is stopped on the way out, whatever happens."""
    if not tasks:
        return None
    # start-up apart: a worker's ETA counts it down from the spawn, then follows the measured compute
    lines = [WorkerLine(wp.name, wp.device, r.prompts, r.prompts_reused, len(wp.rounds),
                        wp.predicted_seconds - wp.predicted_start_seconds, wp.predicted_pass_shares,
                        wp.predicted_start_seconds)
             for wp in run.job.plan.workers for r in (run.records[wp.name],)]
    with make_progress(console, lines) as progress, _executor(run.job, worker_timeout) as executor:
        if run.job.plan.parallel is Parallel.PIPELINE:
            tasks = _link_stages(tasks, executor, run.job.plan.channel_batches)
        progress.starting()
        launched = time.monotonic()
        executor.start(tasks)
        for task in tasks:
            run.records[task.name].pid = executor.pid(task.name)
        for message in executor.messages():
            run.update(message)  # the report's figures first: a Ctrl-C between the two loses only a line
            progress.handle(message)
            record = run.records[message.worker]
            if isinstance(message, Finished):  # the worker's whole time, start-up included (learned.py)
                record.wall_seconds = round(time.monotonic() - launched, 3)
            if isinstance(message, FAILURES):
                return _failure(run, record, message)
    return None


def _executor(job: PreparedJob, worker_timeout: float | None):
    start_seconds = max(wp.predicted_start_seconds for wp in job.plan.workers)
    if not job.nodes:
        return LocalProcessExecutor(worker_timeout=worker_timeout, start_seconds=start_seconds)
    from flexorch.orchestrator.rayexecutor import RayExecutor

    nodes = {node.name: node for node in job.nodes}
    return RayExecutor({wp.name: nodes[wp.node] for wp in job.plan.workers}, worker_timeout=worker_timeout,
                       start_seconds=start_seconds)


def _used_nodes(job: PreparedJob) -> list[Node]:
    used = {wp.node for wp in job.plan.workers}
    return [node for node in job.nodes if node.name in used]


def _link_stages(tasks: list[WorkerTask], executor, capacity: int) -> list[WorkerTask]:
    """Pipeline: stage i (the plan's i-th worker) reads channel i and writes channel i+1, a ring of
    channels of `capacity` batches (the plan's). Every stage runs the same rounds, so either all of
    them have work left or none does."""
    if len(tasks) < 2:
        raise RuntimeError(f"a pipeline needs every stage, got {len(tasks)} task(s)")
    channels = [executor.channel(capacity) for _ in tasks]
    n = len(tasks)
    return [replace(task, pipeline=PipelineLinks(i, n, channels[i], channels[(i + 1) % n]))
            for i, task in enumerate(tasks)]


def _failure(run: _Run, record: WorkerRecord, message) -> str:
    """Mark the failed worker; the one line saying what went wrong."""
    record.status = "failed"
    log = run.state.job_dir / LOGS_DIR / f"{record.name}.log"
    if isinstance(message, Failed):
        if message.kind == FAIL_USER:  # bad input found while running (a corrupt layer file): exit 2
            record.error = message.error
            run.finish("failed", message.error)
            raise UserError(f"worker {record.name} ({record.device}): {message.error}")
        what = message.error + (f" (traceback in {log})" if message.traceback else "")
    elif isinstance(message, (Died, Hung)):
        on_node = f" on {record.node}" if record.node else ""  # executor ray: the log is on the worker's machine
        what = message.describe() + (f"; its log: {log}{on_node}" if isinstance(message, Died) else "")
    else:
        what = str(message)
    record.error = what
    pid = f", pid {record.pid}" if record.pid else ""
    return f"worker {record.name} ({record.device}{pid}) failed: {what}"


def _write_outputs(run: _Run) -> list[PromptResult]:
    """Merge every committed part (earlier runs' and this one's) in prompt order into the output,
    and the _updated prompts."""
    spec, job = run.job.spec, run.job
    results = collect_results(run.state.parts(), len(job.prompts))
    if job.score.kind == ScoreKind.GENERATE:
        results = with_text(results, job.tokenizer, [p.stop for p in job.tokenized])
    write_output(spec.output, job.score.kind, results, prompts=job.prompts, token_labels=spec.score.tokens)
    run.summary = summarize(job.score.kind, [r.scores for r in results], job.prompts,
                            token_labels=spec.score.tokens)
    if spec.generate_tokens > 1:
        texts = [[job.tokenizer.decode(list(ids)) for ids in r.generated] for r in results]
        write_updated_prompts(spec.output, job.prompts, texts, spec.prompts_format, [r.generated for r in results])
    return results
