"""Measure what the planner needs of this machine's devices, in a fresh process started as a worker
is (orchestrator/calibrate.py runs it and caches the result): a worker's fixed RSS once torch and
transformers are imported and a first forward ran, FLOP/s through a Llama decoder layer per device,
dtype and batch size, and on each GPU the pinned host-to-device copy rate, the CUDA context and the
worker's RSS with it. Prints one JSON object on stdout.

    python -m flexorch.workers.calibrate [--devices cpu,cuda:0]
"""

from __future__ import annotations

import argparse
import json
import time

from flexorch.contract.choices import DeviceKind, on_cpu

# Reference layers: Llama's proportions (intermediate 2.75 x hidden, 64-wide heads) at two widths per
# device kind, a narrow one and a wide one: a narrow layer runs far below a wide one's FLOP rate
# (fixed per-call costs, small matrices), and the planner interpolates between them by the model's
# width. Rows of 256 tokens; the smallest batch is a generation step's (one token per suffix). Each
# width is also measured at LONG_ROW: one row as long as the batch, the same weights' FLOPs and more
# attention, which on CPU costs more per FLOP than the matmuls (a 256-wide layer on 512-token rows
# ran ~20% below its 256-token rate): the planner prices attention FLOPs apart with it.
WIDTHS = {"cpu": (256, 1024), "cuda": (1024, 4096)}
ROW_TOKENS = 256
BATCHES = {"cpu": (32, 256, 1024), "cuda": (64, 1024, 4096, 16384)}
LONG_ROW = {"cpu": 1024, "cuda": 4096}
DTYPES = {"cpu": ("float32", "bfloat16"), "cuda": ("float16", "bfloat16", "float32")}
HOST_TO_DEVICE_BYTES = 256 << 20
REPEATS = 2  # host-to-device copies after a warm-up; the best counts (nothing else shares the link)
# A forward's rate: the median of its runs, each on the next of INPUTS distinct batches as a job's
# layers run (the best of a few runs on one batch, its data hot in the caches, was 10-30% faster than
# a job's layers ran on this 2-core VM). Every point is measured in each of ROUNDS rounds for at least
# ROUND_SECONDS, so a slow spell of a shared machine touches every point alike instead of one.
ROUNDS, ROUND_SECONDS, MAX_RUNS, INPUTS = 3, 0.08, 20, 4

def _rss() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmRSS:"))


def reference_shape(hidden: int) -> dict:
    return dict(hidden_size=hidden, intermediate_size=hidden * 11 // 4, num_attention_heads=max(1, hidden // 64),
                num_key_value_heads=max(1, hidden // 64))


def layer_flops(params: int, hidden: int, tokens: int, row: int) -> float:
    """FLOPs of one decoder layer's forward: 2 per weight per token, and attention's scores and
    weighted sum, 4 x row x hidden per token (the planner counts the same)."""
    return 2.0 * params * tokens + 4.0 * row * hidden * tokens


def _layer(shape: dict, device, dtype):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    config = LlamaConfig(**shape, num_hidden_layers=1)
    config._attn_implementation = "sdpa"  # as workers/adapter.py
    layer = LlamaDecoderLayer(config, 0).to(device=device, dtype=dtype).eval()
    return layer, LlamaRotaryEmbedding(config).to(device), sum(p.numel() for p in layer.parameters())


class _Point:
    """One reference layer at one batch: its inputs (made once) and the seconds of its runs."""

    def __init__(self, layer, rotary, params: int, hidden: int, batch: int, row: int, device, dtype):
        import torch

        self.layer, self.params, self.hidden = layer, params, hidden
        self.rows, self.length = max(1, batch // row), min(batch, row)
        self.positions = torch.arange(self.length, device=device).expand(self.rows, self.length)
        causal = torch.full((self.length, self.length), float("-inf"), device=device, dtype=dtype).triu(1)
        self.inputs = [(torch.randn(self.rows, self.length, hidden, device=device, dtype=dtype),
                        causal.expand(self.rows, 1, self.length, self.length).contiguous()) for _ in range(INPUTS)]
        with torch.inference_mode():
            self.embeddings = rotary(self.inputs[0][0], self.positions)
        self.device, self.times, self.round_starts = device, [], []
        self._run()  # a warm-up, not counted: kernel selection and allocation

    def measure(self) -> None:
        start = len(self.times)
        self.round_starts.append(start)
        while len(self.times) == start or sum(self.times[start:]) < ROUND_SECONDS and len(self.times) - start < MAX_RUNS:
            self.times.append(self._run())

    @property
    def forward_flops(self) -> float:
        return layer_flops(self.params, self.hidden, self.rows * self.length, self.length)

    @property
    def attention_flops(self) -> float:
        return self.forward_flops - layer_flops(self.params, self.hidden, self.rows * self.length, 0)

    def rate(self) -> float:
        import statistics

        return self.forward_flops / statistics.median(self.times)

    def round_rates(self) -> list[float]:
        """The rate of each round alone: how far they differ says whether the machine was quiet."""
        import statistics

        ends = self.round_starts[1:] + [len(self.times)]
        return [self.forward_flops / statistics.median(self.times[a:b]) for a, b in zip(self.round_starts, ends)]

    def _run(self) -> float:
        import torch

        hidden, mask = self.inputs[len(self.times) % INPUTS]
        with torch.inference_mode():
            _sync(self.device)
            start = time.perf_counter()
            self.layer(hidden, attention_mask=mask, position_ids=self.positions, position_embeddings=self.embeddings)
            _sync(self.device)
        return time.perf_counter() - start


def _flops(shapes: list[tuple[int, str]], device: str, batches: tuple[int, ...], long_row: int | None = None) -> list[dict]:
    """FLOP/s (layer_flops) of one decoder layer's forward per (width, dtype) in `shapes` and batch, on
    rows of ROW_TOKENS, and with `long_row` also on one row of that many tokens: the median of its runs
    over ROUNDS interleaved rounds (and each round's own rate, "round_rates"). A point the device has no memory for (a small GPU, the wide layer's
    largest batch) is left out: the planner interpolates over the others."""
    import torch

    dev = torch.device(device)
    points = {}
    for hidden, dtype in shapes:
        rows = [(batch, ROW_TOKENS) for batch in batches] + ([(long_row, long_row)] if long_row else [])
        try:
            layer, rotary, params = _layer(reference_shape(hidden), dev, getattr(torch, dtype))
        except torch.OutOfMemoryError:
            _release(dev)
            continue
        for batch, row in rows:
            try:
                points[hidden, dtype, batch, row] = _Point(layer, rotary, params, hidden, batch, row, dev,
                                                           getattr(torch, dtype))
            except torch.OutOfMemoryError:
                _release(dev)
    for _ in range(ROUNDS):
        for key, point in list(points.items()):
            try:
                point.measure()
            except torch.OutOfMemoryError:
                del points[key]
                _release(dev)
    return [{"device": device, "dtype": dtype, "batch_tokens": batch, "hidden": hidden, "flops_per_s": point.rate(),
             "forward_flops": point.forward_flops, "attention_flops": point.attention_flops,
             "row_tokens": point.length, "round_rates": point.round_rates()}
            for (hidden, dtype, batch, _), point in points.items()]


def _release(device) -> None:
    import gc

    import torch

    gc.collect()  # the failed allocation's frame held its tensors
    if not on_cpu(device):
        torch.cuda.empty_cache()


def _skeleton(shape: dict) -> None:
    """What a worker builds before its first weight (workers/adapter.py): the model class's skeleton
    on the meta device, which imports the auto classes and generation code, and its loader thread."""
    import threading

    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    with torch.device("meta"):
        AutoModelForCausalLM.from_config(LlamaConfig(**shape, num_hidden_layers=1))
    loader = threading.Thread(target=lambda: torch.empty(1 << 20).sum())  # its malloc arena, as the loader's
    loader.start()
    loader.join()


def _sync(device) -> None:
    import torch

    if not on_cpu(device):
        torch.cuda.synchronize(device)


def _host_to_device(device: str) -> float:
    import torch

    host = torch.empty(HOST_TO_DEVICE_BYTES, dtype=torch.uint8, pin_memory=True)
    target = torch.empty(HOST_TO_DEVICE_BYTES, dtype=torch.uint8, device=device)
    best = float("inf")
    for _ in range(REPEATS + 1):
        torch.cuda.synchronize(device)
        start = time.perf_counter()
        target.copy_(host, non_blocking=True)
        torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return HOST_TO_DEVICE_BYTES / best


def _gpu_figures(device: str) -> dict:
    import torch

    from flexorch.workers.devicememory import fixed_bytes

    torch.cuda.set_device(device)
    torch.empty(1, device=device)  # creates the context
    context = fixed_bytes(torch.device(device))
    # From its first matmul cuBLAS keeps a workspace per handle and stream, allocated through torch's
    # allocator: fixed device memory of every worker, beside the context.
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        operand = torch.ones(256, 256, device=device, dtype=dtype)
        operand @ operand
    del operand
    torch.cuda.synchronize(device)
    workspace = torch.cuda.memory_allocated(device)
    return {"cuda_context_bytes": context + workspace, "cuda_workspace_bytes": workspace,
            "cuda_worker_base_ram": _rss(),
            "host_to_device": [device, _host_to_device(device)]}


def measure(devices: list[str]) -> dict:
    start = time.perf_counter()
    import torch  # noqa: F401  what a worker imports, in the order it does
    import flexorch.workers.engine  # noqa: F401
    from flexorch.workers.heap import Heap

    Heap().configure()  # the engine's malloc policy: its layers' intermediates reuse their memory

    _skeleton(reference_shape(64))
    _flops([(64, "float32")], "cpu", (64,))  # a first forward: thread pools, kernels
    result = {"import_seconds": time.perf_counter() - start, "worker_base_ram": _rss(), "throughput": []}
    for device in devices:
        kind = DeviceKind.of(device)
        if not kind.is_cpu:
            gpu = _gpu_figures(device)
            result.setdefault("host_to_device_bytes_per_s", []).append(gpu.pop("host_to_device"))
            result.update(gpu)  # the first GPU's context and RSS stand for all (one model of card per box)
        shapes = [(hidden, dtype) for hidden in WIDTHS[kind] for dtype in DTYPES[kind]]
        result["throughput"] += _flops(shapes, device, BATCHES[kind], LONG_ROW[kind])
    # each point's rate per round, apart from its figure: the spread between them is the disturbance
    result["round_rates"] = [point.pop("round_rates") for point in result["throughput"]]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", default="cpu", help="comma-separated: cpu,cuda:0,...")
    args = parser.parse_args()
    print(json.dumps(measure(args.devices.split(","))), flush=True)


if __name__ == "__main__":
    main()
