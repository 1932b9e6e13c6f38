"""What every benchmark shares: model shapes and their cached checkpoints, the prompts, the machine
description, page-cache eviction, per-method subprocesses, the in-memory reference arithmetic,
results files and the planner's predictions.

Each method runs in a child process of its benchmark script (`script --child JSON`) so that its
peak RSS (ru_maxrss) and disk reads (/proc/self/io) are its own; the child prints one
`BENCH_RESULT {json}` line that the parent reads back.
"""

from __future__ import annotations

import json
import mmap
import os
import platform
import random
import re
import resource
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

ROOT = Path(__file__).resolve().parent
REPO = ROOT.parent
CACHE = ROOT / ".cache"  # random checkpoints, built once (git-ignored)
RESULTS = ROOT / "results"
RESULT_MARKER = "BENCH_RESULT "

if str(REPO) not in sys.path:  # `python benchmarks/bench_x.py` from a checkout without an install
    sys.path.insert(0, str(REPO))

from flexorch.contract.choices import on_cpu  # noqa: E402 (after the path above)


# -- models ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelShape:
    """A random-weight Llama built with orchestrator.demo.build_checkpoint (its 384-token vocab)."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    dtype: str = "float32"

    @property
    def name(self) -> str:
        return f"llama-{self.layers}x{self.hidden}-{self.dtype}"

    def deeper(self, factor: int) -> "ModelShape":
        return replace(self, layers=self.layers * factor)

    @property
    def layer_bytes(self) -> int:
        """One decoder layer's weights (attention, MLP, two norms)."""
        head_dim = self.hidden // self.heads
        attention = 2 * self.hidden * self.hidden + 2 * self.hidden * self.kv_heads * head_dim
        params = attention + 3 * self.hidden * self.intermediate + 2 * self.hidden
        return params * (4 if self.dtype == "float32" else 2)


# 16 x 1024 fp32: ~52 MB a layer, ~840 MB in all ("several hundred MB", issue 7).
DEFAULT_SHAPE = ModelShape(layers=16, hidden=1024, intermediate=2816, heads=16, kv_heads=16)
QUICK_SHAPE = ModelShape(layers=4, hidden=128, intermediate=344, heads=4, kv_heads=4)


def _build_atomically(target: Path, build: Callable[[Path], None]) -> Path:
    """Build into a temporary sibling and rename it in, so a killed build leaves no half dir."""
    if target.exists():
        return target
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    try:
        build(tmp)
        tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def ensure_checkpoint(shape: ModelShape) -> Path:
    """The Hugging Face checkpoint dir of `shape` in the cache (built once, one safetensors file)."""
    from flexorch.orchestrator.demo import build_checkpoint

    def build(path: Path) -> None:
        build_checkpoint(path, "llama", layout="safetensors", dtype=shape.dtype, seed=0,
                         hidden_size=shape.hidden, intermediate_size=shape.intermediate,
                         num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
                         num_key_value_heads=shape.kv_heads, max_position_embeddings=4096)

    return _build_atomically(CACHE / shape.name / "hf", build)


def ensure_layerwise(shape: ModelShape) -> Path:
    """The layerwise dir of `shape` (flexorch prepare of ensure_checkpoint), built once."""
    from flexorch.orchestrator.prepare import prepare_checkpoint

    source = ensure_checkpoint(shape)
    target = CACHE / shape.name / "layerwise"
    if not target.exists():
        prepare_checkpoint(source, target)
    return target


def weight_files(path: Path) -> list[Path]:
    """Every weight file under `path` (safetensors, pytorch bins, accelerate's .dat offloads)."""
    return sorted(p for p in Path(path).rglob("*") if p.is_file() and p.suffix in (".safetensors", ".bin", ".dat"))


# -- prompts ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PromptSet:
    n_prompts: int = 32
    prefix_words: int = 150
    n_suffixes: int = 4


QUICK_PROMPTS = PromptSet(n_prompts=4, prefix_words=30, n_suffixes=4)

# Words of the demo tokenizer's training text, so a word costs one to a few tokens, as with a real
# tokenizer on English (a word outside its 384-token vocabulary would cost one token per byte).
_WORDS = ("the quick brown fox jumps over lazy dog a journey of thousand miles begins with single step "
          "question what is capital france answer paris which planet known as red mars multiple choice "
          "questions have one prefix and several suffixes model scores each streaming large language layer "
          "by lets small graphics card run far larger than its memory load pass every prompt through it free "
          "next science history geography mathematics literature music art physics chemistry biology yes no "
          "true false maybe").split()
_SUFFIXES = (" yes", " no", " maybe", " Paris", " Mars", " the red planet", " A", " B", " C", " D",
             " true", " false", " a single step", " music and art")


def make_texts(prompts: PromptSet, seed: int = 0) -> list[tuple[str, list[str]]]:
    """Deterministic (prefix, suffixes) texts: a `prefix_words`-word question and short answers."""
    rng = random.Random(seed)
    texts = []
    for i in range(prompts.n_prompts):
        body = " ".join(rng.choice(_WORDS) for _ in range(prompts.prefix_words))
        suffixes = rng.sample(_SUFFIXES, prompts.n_suffixes)
        texts.append((f"Question {i}: {body}? Answer:", suffixes))
    return texts


def tokenize(model_dir: Path, texts: Sequence[tuple[str, Sequence[str]]]):
    """TokenizedPrompt per text: the prefix with the tokenizer's special tokens, suffixes without."""
    from transformers import AutoTokenizer

    from flexorch.contract.protocol import TokenizedPrompt

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return [
        TokenizedPrompt(i, tuple(tokenizer(prefix).input_ids),
                        tuple(tuple(tokenizer(s, add_special_tokens=False).input_ids) for s in suffixes))
        for i, (prefix, suffixes) in enumerate(texts)
    ]


def prompts_from_json(data: list) -> list:
    from flexorch.contract.protocol import TokenizedPrompt

    return [TokenizedPrompt(i, tuple(prefix), tuple(tuple(s) for s in suffixes))
            for i, (prefix, suffixes) in enumerate(data)]


def prompts_to_json(prompts) -> list:
    """TokenizedPrompts as plain lists, to hand them to a child process."""
    return [[list(p.prefix_ids), [list(s) for s in p.suffix_ids]] for p in prompts]


# -- the machine -----------------------------------------------------------------------------------
def machine_info(device: str = "cpu") -> dict:
    import psutil
    import torch
    import transformers

    cpu = platform.processor() or "unknown"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info = {
        "cpu": cpu,
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "ram_bytes": psutil.virtual_memory().total,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "device": device,
        "load_average": os.getloadavg(),  # others' work on a shared machine skews the numbers
    }
    if not on_cpu(device) and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.device(device))
        info |= {"gpu": props.name, "gpu_memory_bytes": props.total_memory}
    return info


def machine_slug(info: dict) -> str:
    """A short file-name form of the machine: the GPU's name, else the CPU model and core count."""
    if "gpu" in info:
        name = info["gpu"]
    else:
        name = re.sub(r"\((r|tm)\)|\b(intel|amd|cpu|processor)\b", "", info["cpu"].lower())
        name = f"{name}-{info['cores']}c"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


# -- measuring -------------------------------------------------------------------------------------
def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def disk_read_bytes() -> int:
    """Bytes this process (all its threads) has had read from the block device: page-cache hits
    do not count, so this is what really came off the disk."""
    try:
        for line in Path("/proc/self/io").read_text().splitlines():
            if line.startswith("read_bytes:"):
                return int(line.split()[1])
    except OSError:
        pass
    return -1


def evict_page_cache(paths: Sequence[Path], settle: bool = False) -> int:
    """Drop every file under `paths` from the page cache; returns the bytes of files evicted.
    fsync first: POSIX_FADV_DONTNEED drops only clean pages (a freshly written file is dirty).
    settle: then wait until the memory the eviction freed has gone back to the host where the VM takes
    it (orchestrator/calibrate.FREED_MEMORY_SETTLE_S): read sooner, a cold read lands in those pages,
    still backed, and runs up to 2-4x faster than a cold job's (each cold read compared is taken so)."""
    total = 0
    for root in paths:
        root = Path(root)
        files = [root] if root.is_file() else [p for p in root.rglob("*") if p.is_file()] if root.exists() else []
        for path in files:
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                total += os.fstat(fd).st_size
            finally:
                os.close(fd)
    if settle:
        from flexorch.orchestrator.calibrate import FREED_MEMORY_SETTLE_S, returns_freed_memory

        if returns_freed_memory():
            time.sleep(FREED_MEMORY_SETTLE_S)
    return total


def warm_page_cache(paths: Sequence[Path]) -> None:
    """Read every file under `paths` once so later reads come from the page cache."""
    for root in paths:
        for path in ([Path(root)] if Path(root).is_file() else weight_files(Path(root))):
            with open(path, "rb", buffering=0) as f:
                while f.read(16 << 20):
                    pass


def sequential_read_rate(path: Path, size: int, advise: bool = True) -> dict:
    """Cold sequential read rate of the disk holding `path`: a `size`-byte file of random bytes
    (kept in the cache dir), evicted from the page cache, then read in 16 MiB chunks — told
    POSIX_FADV_SEQUENTIAL, as flexorch reads layer files (advise=False: the kernel's default window)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists() or path.stat().st_size != size:
        tmp = path.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            chunk = os.urandom(16 << 20)  # incompressible, in case the device compresses
            for start in range(0, size, len(chunk)):
                f.write(chunk[: min(len(chunk), size - start)])
        tmp.rename(path)
    evict_page_cache([path], settle=True)
    return _timed_read(path, advise=advise)


def sendfile_read_rate(path: Path) -> dict:
    """Cold rate of `path` pulled through the page cache by sendfile() to /dev/null: the kernel's
    default read-ahead with no copy to user space, so no thread's CPU in the way (measured up to 1.6x
    sequential_read_rate's on a virtio VM whose copy from fresh pages was slow). A reader that needs
    the bytes in its own buffer cannot beat this; it is the disk's own streaming rate."""
    evict_page_cache([path], settle=True)
    return _timed_read(path, advise=False, copy=False)


def direct_read_rate(path: Path) -> dict:
    """Cold rate of `path` read around the page cache (O_DIRECT) into one reused page-aligned 16 MiB
    buffer, as flexorch's direct reads go (workers/fileread.py): what the disk delivers with no page
    cache pages to allocate and nothing copied. No settling needed: nothing lands in the cache."""
    evict_page_cache([path])
    return _timed_read(path, direct=True)


def page_cache_read_rate(path: Path) -> dict:
    """What one thread copies from the page cache: `path` read once to cache it, then timed like
    sequential_read_rate. Near the cold rate, a one-thread "disk rate" is the CPU's, not the disk's."""
    warm_page_cache([path])
    return _timed_read(path)


def files_read_rate(paths: Sequence[Path]) -> dict:
    """Cold read rate of `paths` read back to back by a bare loop, as sequential_read_rate reads its one
    file: what the kernel gives a reader of many files (each starts its read-ahead afresh)."""
    evict_page_cache(paths, settle=True)
    return _timed_read(*paths)


def _timed_read(*paths: Path, advise: bool = True, copy: bool = True, direct: bool = False) -> dict:
    """`paths` read front to back in 16 MiB steps: into a buffer, or (copy=False) sent to /dev/null;
    direct: with O_DIRECT into a page-aligned buffer (an anonymous mapping)."""
    before = disk_read_bytes()
    start = time.perf_counter()
    buffer, sink = mmap.mmap(-1, 16 << 20) if direct else bytearray(16 << 20), None if copy else os.open(os.devnull, os.O_WRONLY)
    try:
        for path in paths:
            if direct:
                from flexorch.orchestrator.calibrate import read_direct

                read_direct(path, buffer)
                continue
            with open(path, "rb", buffering=0) as f:
                if advise and hasattr(os, "posix_fadvise"):
                    os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
                if copy:
                    while f.readinto(buffer):
                        pass
                else:
                    done = 0
                    while sent := os.sendfile(sink, f.fileno(), done, len(buffer)):
                        done += sent
    finally:
        if sink is not None:
            os.close(sink)
    seconds = time.perf_counter() - start
    size = sum(path.stat().st_size for path in paths)
    return {"bytes": size, "seconds": seconds, "bytes_per_s": size / seconds,
            "disk_read_bytes": disk_read_bytes() - before}


# -- child processes -------------------------------------------------------------------------------
def run_child(script: Path, params: dict, timeout: float | None = None, env: dict | None = None) -> dict:
    """Run `script --child -` with `params` as JSON on its stdin (a job's prompts outgrow the argument
    list) and return the dict its child printed; on failure the dict has "error" (the child's exit
    status and the tail of its stderr) so the table can say why."""
    command = [sys.executable, str(script), "--child", "-"]
    try:
        done = subprocess.run(command, input=json.dumps(params), capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, **(env or {})})
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    for line in reversed(done.stdout.splitlines()):
        if line.startswith(RESULT_MARKER):
            return json.loads(line[len(RESULT_MARKER):])
    return _failure(done.returncode, done.stderr or done.stdout)


def _failure(returncode: int, output: str) -> dict:
    """A failed child: its last line (the exception) first, for the table; the tail for the JSON."""
    lines = output.strip().splitlines() or ["(no output)"]
    return {"error": f"exit {returncode}: {lines[-1]}", "stderr_tail": "\n".join(lines[-30:])}


def finish_child(process: subprocess.Popen) -> dict:
    stdout, stderr = process.communicate()
    for line in reversed(stdout.splitlines()):
        if line.startswith(RESULT_MARKER):
            return json.loads(line[len(RESULT_MARKER):])
    return _failure(process.returncode, stderr)


def child_main(methods: dict[str, Callable[[dict], dict]]) -> None:
    """In a child: run methods[params["method"]](params) and print its result with the process's
    peak RSS. Exceptions propagate (the parent shows the traceback's tail)."""
    given = sys.argv[sys.argv.index("--child") + 1]
    params = json.loads(sys.stdin.read() if given == "-" else given)
    result = methods[params["method"]](params)
    result.setdefault("peak_rss", peak_rss())
    print(RESULT_MARKER + json.dumps(result), flush=True)


def is_child() -> bool:
    return "--child" in sys.argv


# -- the methods -----------------------------------------------------------------------------------
def flexorch_run(layerwise: Path, prompts, *, verify: bool, batch_tokens: int = 1024, layers_per_shard: int = 1,
                 storage: str = "cpu", device: str = "cpu", dtype: str = "float32", threads: int = 0,
                 direct_reads: bool = False) -> dict:
    """score_prompts over `prompts`; the summary's numbers plus the disk bytes read."""
    from flexorch.workers.engine import score_prompts
    from flexorch.contract.protocol import EngineSettings, ScoreSpec

    settings = EngineSettings(device=device, dtype=dtype, layers_per_shard=layers_per_shard, storage=storage,
                              batch_tokens=batch_tokens, verify_checksums=verify, threads=threads,
                              direct_reads=direct_reads)
    before = disk_read_bytes()
    _, summary = score_prompts(layerwise, prompts, ScoreSpec(), settings)
    return {**asdict(summary), "settings": asdict(settings), "disk_read_bytes": disk_read_bytes() - before}


def load_hf_model(checkpoint: Path, dtype: str = "float32", **kwargs):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(checkpoint, dtype=getattr(torch, dtype), attn_implementation="sdpa",
                                                **kwargs).eval()


def score_in_memory(model, prompts, batch_tokens: int = 1024) -> float:
    """The engine's arithmetic with the whole model resident: the same batches of packed rows
    (prefix once, suffixes after it), the same masks, every layer in turn, the head on the scored
    positions only. Returns seconds. model: a loaded *ForCausalLM."""
    import torch

    from flexorch.workers.adapter import additive_mask, attention_allowed, pack_rows
    from flexorch.workers.engine import make_batches
    from flexorch.contract.protocol import ScoreSpec
    from flexorch.workers.scoring import compute_scores, score_targets

    base = model.model
    device, dtype = model.lm_head.weight.device, model.lm_head.weight.dtype
    rows = [(p.prefix_ids, p.suffix_ids) for p in prompts]
    logits = lambda hidden: model.lm_head(base.norm(hidden)).float()  # noqa: E731
    start = time.perf_counter()
    with torch.inference_mode():
        for batch in make_batches(rows, batch_tokens):
            packed = pack_rows([rows[i] for i in batch])
            targets = score_targets([rows[i] for i in batch], "next_token_probs")
            mask = additive_mask(attention_allowed(packed, None), dtype).to(device)  # Llama: no sliding window
            position_ids = packed.position_ids.to(device)
            hidden = base.embed_tokens(packed.input_ids.to(device))  # (rows, L, d_model)
            position_embeddings = base.rotary_emb(hidden, position_ids)
            for layer in base.layers:
                out = layer(hidden, attention_mask=mask, position_ids=position_ids,
                            position_embeddings=position_embeddings)
                hidden = out[0] if isinstance(out, tuple) else out
            compute_scores(hidden, targets, logits, ScoreSpec(), model.config.vocab_size)
        if not on_cpu(device):
            torch.cuda.synchronize(device)
    return time.perf_counter() - start


def score_one_by_one(model, prompts, device: str = "cpu") -> float:
    """How users score with a plain forward: one batch-1 forward per prefix + suffix, the next-token
    probabilities read from the last position. Returns seconds."""
    import torch

    start = time.perf_counter()
    with torch.no_grad():
        for prompt in prompts:
            for suffix in prompt.suffix_ids:
                ids = torch.tensor([list(prompt.prefix_ids) + list(suffix)], device=device)
                torch.softmax(model(ids).logits[0, -1].float(), dim=-1).cpu()
    return time.perf_counter() - start


# -- results ---------------------------------------------------------------------------------------
def write_results(name: str, payload: dict, machine: dict, slug: str | None = None) -> Path:
    """benchmarks/results/<name>-<machine>.json; a --quick smoke run writes <name>-quick-<machine>.json
    so it never overwrites a real result."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = f"{name}-quick" if payload.get("quick") else name
    path = RESULTS / f"{name}-{slug or machine_slug(machine)}.json"
    path.write_text(json.dumps({"benchmark": name, "machine": machine,
                                "date": time.strftime("%Y-%m-%d %H:%M:%S"), **payload}, indent=1, default=str))
    return path


def print_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[object]], caption: str | None = None):
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, caption=caption)
    console = Console(width=None if sys.stdout.isatty() else 160)  # a log file gets the full table
    for i, column in enumerate(columns):
        table.add_column(column, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*(str(cell) for cell in row))
    console.print(table)


def fmt_bytes(n: float | None) -> str:
    if n is None or n < 0:
        return "-"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


def fmt_seconds(s: float | None) -> str:
    return "-" if s is None else f"{s:.2f}"


def fmt_ratio(x: float | None, goal: str = "") -> str:
    return "-" if x is None else f"{x:.2f}x" + (f" (goal {goal})" if goal else "")


def base_parser(description: str):
    import argparse

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="tiny model and 4 prompts: checks the script runs")
    parser.add_argument("--machine", help="name for the results file (default: from the CPU or GPU model)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    return parser


# -- predictions (issue 7, benchmark 6) ------------------------------------------------------------
def planner_prediction(layerwise: Path, prompts, settings: dict | None, *, ram_limit: int | None = None,
                       gpu_memory: int | None = None, disk_read_bytes_per_s: float | None = None,
                       devices: Sequence[str] = ("cpu",), calibrate: bool = False) -> dict:
    """The planner's prediction for a run of `prompts` with these engine settings (EngineSettings
    as a dict: the planner is asked for exactly what was run; None: every choice left to it, and
    "planned_settings" says what it chose), or {"unavailable": why}. `calibrate`: with this
    machine's figures measured now (as `flexorch probe --calibrate`), else the assumed ones.

    Compare with `compare_prediction(prediction, measured)`."""
    try:
        from flexorch.orchestrator.hardware import probe
        from flexorch.orchestrator.planner import make_plan
        from flexorch.orchestrator.spec import JobSpec, Limits
    except ImportError as exc:
        return {"unavailable": f"planner not importable ({exc})"}
    from flexorch.contract.manifest import read_manifest

    hardware = probe(Path(layerwise))
    if calibrate:
        from flexorch.orchestrator.calibrate import calibrated
        from flexorch.orchestrator.modelstore import default_cache_dir

        hardware = calibrated(hardware, default_cache_dir(), force=True)
    if disk_read_bytes_per_s:
        hardware = replace(hardware, disk_read_bytes_per_s=disk_read_bytes_per_s)
    job_dir = CACHE / "plan-job"
    spec = JobSpec(path=job_dir / "job.yaml", model=Path(layerwise), prompts=job_dir / "prompts.jsonl",
                   output=job_dir / "out.pkl", job_dir=job_dir, devices=tuple(devices), parallel="data",
                   layers_per_shard=(settings or {}).get("layers_per_shard"),
                   storage=(settings or {}).get("storage"), dtype=(settings or {}).get("dtype"),
                   batch_tokens=(settings or {}).get("batch_tokens"),
                   limits=Limits(gpu_memory=gpu_memory, ram=ram_limit))
    try:
        plan = make_plan(hardware, read_manifest(layerwise), spec, [p.n_tokens for p in prompts],
                         suffix_counts=[len(p.suffix_ids) for p in prompts])
    except Exception as exc:  # a planner refusal is a result to report, not a benchmark crash
        return {"unavailable": f"make_plan failed: {type(exc).__name__}: {exc}"}
    worker = plan.workers[0]
    return {"read_seconds": worker.predicted_read_seconds, "compute_seconds": worker.predicted_compute_seconds,
            "seconds": max(worker.predicted_read_seconds, worker.predicted_compute_seconds),
            "peak_ram": worker.predicted_peak_ram, "peak_device_memory": worker.predicted_peak_device_memory,
            "rounds": len(worker.rounds), "planned_settings": asdict(worker.settings),
            "calibration": asdict(hardware.calibration) if hardware.calibration else None}


def compare_prediction(prediction: dict, measured: dict) -> dict:
    """predicted / measured for time and peak memory (goal: within 25%, issue 7).
    measured: a flexorch_run result (an EngineSummary dict)."""
    if "unavailable" in prediction:
        return prediction
    pairs = {"seconds": measured["seconds"], "read_seconds": measured["read_seconds"],
             "compute_seconds": measured["compute_seconds"], "peak_ram": measured["peak_rss"]}
    if measured.get("peak_device_memory"):
        pairs["peak_device_memory"] = measured["peak_device_memory"]
    return {key: {"predicted": prediction[key], "measured": value,
                  "ratio": prediction[key] / value if value else None}
            for key, value in pairs.items()}


def prediction_rows(label: str, comparison: dict) -> list[list[str]]:
    if "unavailable" in comparison:
        return [[label, "-", "-", "-", comparison["unavailable"][:80]]]
    rows = []
    for key, c in comparison.items():
        as_text = fmt_bytes if key.startswith("peak") else fmt_seconds
        ratio = c["ratio"]
        ok = "" if ratio is None else ("ok" if 0.75 <= ratio <= 1.25 else "off by >25%")
        rows.append([f"{label}: {key}", as_text(c["predicted"]), as_text(c["measured"]),
                     fmt_ratio(ratio), ok])
    return rows


PREDICTION_COLUMNS = ("run: quantity", "predicted", "measured", "predicted/measured", "goal ±25%")
