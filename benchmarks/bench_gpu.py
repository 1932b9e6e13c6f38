"""Benchmark 5 (issue 7): a 13B-shaped model through a 6 GB GPU budget.

A random-weight model with Llama-2-13B's shapes (hidden 5120, intermediate 13824, 40 layers, 40
heads, vocab 32000), fp16, is generated straight into a layerwise dir (one safetensors file per
layer, written layer by layer: the 26 GB model never exists in RAM). Then, each in its own process:
(a) flexorch with the GPU capped at 6 GB (torch's per-process memory fraction; settings from the
    planner given that limit), weights in the page cache;
(f) the same model held fully on the GPU, the same packed arithmetic (bench_limit's (b));
(h) a plain Hugging Face loop over the same whole model on the GPU: one forward per prefix + suffix,
    on a subset of prompts, scaled to the set;
(d) accelerate offloading under the same cap (infer_auto_device_map + dispatch_model with
    max_memory {gpu: 6 GB}: layers beyond the cap wait in RAM and are moved per forward), one
    forward per prefix + suffix as its users run it, on a subset of prompts, scaled to the set.
Reports tokens/s, peak GPU memory, time loading vs computing, the ratios, and the floor
max(weight bytes / host read rate, 2 x params x tokens / measured fp16 matmul rate) with
measured / floor (goal <= 1.3x). Exits 0 with a message on a machine without CUDA.

    python benchmarks/bench_gpu.py [--prompts 300] [--prefix-tokens 300] [--suffixes 4]
    python benchmarks/bench_gpu.py --cpu-smoke   # the same code paths on CPU with a tiny model
"""

from __future__ import annotations

import random
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import common as c

from flexorch.contract.choices import on_cpu

LLAMA_2_13B = dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                   num_key_value_heads=40, vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5)
TINY = dict(hidden_size=128, intermediate_size=344, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=4, vocab_size=512, max_position_embeddings=1024, rms_norm_eps=1e-5)
GPU_CAP = 6_000_000_000  # limits.gpu_memory: 6GB (decimal, as the job file's units)
GOAL = 1.3


# -- generating the model --------------------------------------------------------------------------
def generate_layerwise(target: Path, shape: dict, dtype: str, device: str) -> Path:
    """Write a random-weight Llama layerwise dir (format: flexorch/contract/manifest.py, as flexorch prepare
    writes it) one layer at a time; random numbers are drawn on `device` (fast on a GPU)."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, LlamaConfig

    from flexorch.workers.layerfile import sha256_file
    from flexorch.contract.manifest import DECODER, EMBED, FORMAT_VERSION, LM_HEAD, MANIFEST_NAME, NORM, LayerEntry, Manifest

    def build(out: Path) -> None:
        config = LlamaConfig(**shape, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, dtype=dtype)
        config.save_pretrained(out)
        with torch.device("meta"):  # names and shapes only
            skeleton = AutoModelForCausalLM.from_config(config)
        base = skeleton.model
        parts = [("embed", EMBED, "model.embed_tokens.", base.embed_tokens)]
        parts += [(f"layer.{i}", DECODER, f"model.layers.{i}.", layer) for i, layer in enumerate(base.layers)]
        parts += [("norm", NORM, "model.norm.", base.norm), ("lm_head", LM_HEAD, "lm_head.", skeleton.lm_head)]
        (out / "layers").mkdir()
        generator = torch.Generator(device=device).manual_seed(0)
        hashes, entries = {}, []
        with ThreadPoolExecutor(max_workers=8) as pool:  # hashing (GIL released) overlaps generating
            for position, (name, kind, prefix, module) in enumerate(parts):
                tensors = {}
                for key, param in sorted(module.state_dict().items()):
                    values = torch.randn(param.shape, generator=generator, device=device, dtype=torch.float32) * 0.02
                    if key.endswith("norm.weight") or kind == NORM:
                        values += 1.0  # RMSNorm scales near one keep activations finite through 40 layers
                    tensors[key] = values.to(getattr(torch, dtype)).cpu()
                file = f"layers/{position:03d}_{name}.safetensors"
                save_file(tensors, out / file)
                hashes[name] = pool.submit(sha256_file, out / file)
                params = sum(t.numel() for t in tensors.values())
                entries.append((name, kind, file, prefix, params, tuple(tensors)))
                print(f"generated {file} ({c.fmt_bytes((out / file).stat().st_size)})", flush=True)
            layers = tuple(LayerEntry(name=name, kind=kind, file=file, bytes=(out / file).stat().st_size,
                                      sha256=hashes[name].result(), dtype=dtype, params=params, source_prefix=prefix,
                                      tensors=keys)
                           for name, kind, file, prefix, params, keys in entries)
        manifest = Manifest(version=FORMAT_VERSION, model_type="llama", architectures=("LlamaForCausalLM",),
                            dtype=dtype, num_layers=shape["num_hidden_layers"], hidden_size=shape["hidden_size"],
                            vocab_size=shape["vocab_size"], layers=layers, config=config.to_dict(),
                            source="benchmarks/bench_gpu.py (random weights)")
        (out / MANIFEST_NAME).write_text(manifest.to_json())  # last: a dir with a manifest is complete

    return c._build_atomically(target, build)


def make_token_prompts(n_prompts: int, prefix_tokens: int, n_suffixes: int, vocab: int, seed: int = 0):
    """Random token ids (no tokenizer needed): a prefix and `n_suffixes` 2-8-token suffixes each."""
    from flexorch.contract.protocol import TokenizedPrompt

    rng = random.Random(seed)
    ids = lambda n: tuple(rng.randrange(3, vocab) for _ in range(n))  # noqa: E731  (0-2: special tokens)
    return [TokenizedPrompt(i, (1,) + ids(prefix_tokens - 1), tuple(ids(rng.randint(2, 8)) for _ in range(n_suffixes)))
            for i in range(n_prompts)]


# -- loading the whole model (for (f) and (d)) -----------------------------------------------------
def load_whole_model(layerwise: Path, device: str):
    """The layerwise dir as one *ForCausalLM with every weight on `device`."""
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from flexorch.workers.layerfile import LayerwiseModel

    config = AutoConfig.from_pretrained(layerwise)
    config._attn_implementation = "sdpa"
    files = LayerwiseModel(layerwise)
    with init_empty_weights(include_buffers=False):  # parameters on meta, rotary buffers real
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, files.manifest.dtype))
    for entry in files.manifest.layers:
        tensors = files.load(entry.name)  # views of a fresh buffer each: no aliasing between layers
        model.load_state_dict({entry.source_prefix + k: v.to(device) for k, v in tensors.items()},
                              strict=False, assign=True)
    return model.to(device).eval()


def _cap_gpu(device: str, cap: int) -> None:
    import torch

    if not on_cpu(device):
        total = torch.cuda.get_device_properties(torch.device(device)).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap / total), torch.device(device))


def _fixed_device_bytes(device: str) -> int:
    """The CUDA context, measured as the engine does (its peaks include it): 0 on CPU."""
    import torch

    from flexorch.workers.devicememory import fixed_bytes

    return fixed_bytes(torch.device(device))


def _peak(device: str, fixed: int) -> int:
    import torch

    return fixed + torch.cuda.max_memory_allocated() if not on_cpu(device) else 0


# -- the children ----------------------------------------------------------------------------------
def child_generate(params: dict) -> dict:
    """In a child, so that the parent never holds GPU memory: calibration and the other children
    measure the GPU as a worker finds it."""
    path = generate_layerwise(Path(params["target"]), params["shape"], params["dtype"], params["device"])
    return {"path": str(path)}


def child_flexorch(params: dict) -> dict:
    _cap_gpu(params["device"], params["cap"])
    s = params["settings"]
    prompts = c.prompts_from_json(params["prompts"])
    run = c.flexorch_run(Path(params["layerwise"]), prompts, verify=False, batch_tokens=s["batch_tokens"],
                         layers_per_shard=s["layers_per_shard"], storage=s["storage"], device=params["device"],
                         dtype=s["dtype"])
    return run


def child_full(params: dict) -> dict:
    fixed = _fixed_device_bytes(params["device"])
    start = time.perf_counter()
    model = load_whole_model(Path(params["layerwise"]), params["device"])
    load_seconds = time.perf_counter() - start
    prompts = c.prompts_from_json(params["prompts"])
    c.score_in_memory(model, prompts[:2], params["batch_tokens"])  # warm-up: cuBLAS handles, allocator
    seconds = c.score_in_memory(model, prompts, params["batch_tokens"])
    peak = _peak(params["device"], fixed)
    # (h) how users score with the whole model on the GPU: one forward per prefix + suffix
    subset = prompts[: params["loop_prompts"]]
    loop_seconds = c.score_one_by_one(model, subset, params["device"])
    return {"seconds": seconds, "load_seconds": load_seconds, "peak_device_memory": peak,
            "loop_seconds_scaled": loop_seconds * len(prompts) / len(subset), "loop_prompts": len(subset)}


def child_accelerate(params: dict) -> dict:
    import torch
    from accelerate import dispatch_model, infer_auto_device_map

    device = params["device"]
    _cap_gpu(device, params["cap"])
    fixed = _fixed_device_bytes(device)
    start = time.perf_counter()
    model = load_whole_model(Path(params["layerwise"]), "cpu")
    if not on_cpu(device):
        index = torch.device(device).index or 0
        device_map = infer_auto_device_map(model, max_memory={index: params["cap"], "cpu": 10**13},
                                           no_split_module_classes=["LlamaDecoderLayer"])
        model = dispatch_model(model, device_map=device_map)
    else:
        device_map = {"": "cpu"}
    load_seconds = time.perf_counter() - start
    prompts = c.prompts_from_json(params["prompts"])
    seconds = c.score_one_by_one(model, prompts, device)
    peak = _peak(device, fixed)
    on_gpu = sum(1 for v in device_map.values() if isinstance(v, int))  # a GPU is its index; else "cpu"/"disk"
    return {"seconds": seconds, "load_seconds": load_seconds, "peak_device_memory": peak,
            "prompts_run": len(prompts), "modules_on_gpu": on_gpu, "modules": len(device_map)}


def child_rates(params: dict) -> dict:
    """The floor's rates: fp16 matmul FLOP/s, page cache -> pinned host buffer, pinned -> GPU."""
    import torch

    device = params["device"]
    cuda = not on_cpu(device)
    dtype = torch.float16 if cuda else torch.float32
    n = 8192 if cuda else 512
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    sync()
    iterations = 20 if cuda else 3
    start = time.perf_counter()
    for _ in range(iterations):
        a @ b
    sync()
    matmul = 2 * n**3 * iterations / (time.perf_counter() - start)
    files = [Path(p) for p in params["files"]]
    buffer = torch.empty(max(f.stat().st_size for f in files), dtype=torch.uint8, pin_memory=cuda)
    view, total = memoryview(buffer.numpy()), 0
    start = time.perf_counter()
    for path in files:  # warm: from the page cache, as in the flexorch run
        with open(path, "rb", buffering=0) as f:
            total += f.readinto(view)
    page_cache = total / (time.perf_counter() - start)
    host_to_device = None
    if cuda:
        target = torch.empty_like(buffer, device=device)
        target.copy_(buffer, non_blocking=True)
        sync()
        start = time.perf_counter()
        for _ in range(5):
            target.copy_(buffer, non_blocking=True)
        sync()
        host_to_device = 5 * buffer.numel() / (time.perf_counter() - start)
    gpu = {}
    if cuda:
        props = torch.cuda.get_device_properties(torch.device(device))
        gpu = {"gpu": props.name, "gpu_memory_bytes": props.total_memory}
    return {"matmul_flops": matmul, "matmul_dtype": str(dtype), "page_cache_bytes_per_s": page_cache,
            "host_to_device_bytes_per_s": host_to_device, "machine": gpu}


# -- the parent ------------------------------------------------------------------------------------
def main() -> None:
    parser = c.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny model on CPU: exercises the code paths")
    parser.add_argument("--prompts", type=int, default=300)
    parser.add_argument("--prefix-tokens", type=int, default=300)
    parser.add_argument("--suffixes", type=int, default=4)
    parser.add_argument("--accelerate-prompts", type=int, default=8,
                        help="prompts (d) runs (one forward each per suffix); its time is scaled to the set")
    parser.add_argument("--layers", type=int, default=LLAMA_2_13B["num_hidden_layers"],
                        help="decoder layers of the 13B shape (fewer: a shorter run, the same per-layer costs)")
    parser.add_argument("--loop-prompts", type=int, default=40,
                        help="prompts (h) runs (one forward each per suffix); its time is scaled to the set")
    parser.add_argument("--batch-tokens", type=int, default=16384, help="for (f) and when the planner is absent")
    parser.add_argument("--grid-batch-tokens", default="",
                        help="comma-separated batch_tokens to run flexorch with beside the planner's choice")
    args = parser.parse_args()
    import torch

    if not args.cpu_smoke and not torch.cuda.is_available():
        print("bench_gpu: skipped: no CUDA device here (torch.cuda.is_available() is False); "
              "run it on a GPU machine, or --cpu-smoke to check the script")
        return
    smoke = args.cpu_smoke
    device, dtype = ("cpu", "float32") if smoke else ("cuda:0", "float16")
    shape = TINY if smoke else {**LLAMA_2_13B, "num_hidden_layers": args.layers}
    n_prompts, prefix_tokens = (6, 40) if smoke else (args.prompts, args.prefix_tokens)
    # The parent stays off the GPU (its children and the calibration measure it as a worker finds it).
    machine, script = c.machine_info("cpu") | {"device": device}, Path(__file__)
    name = "tiny" if smoke else "llama2-13b-shape" + ("" if args.layers == LLAMA_2_13B["num_hidden_layers"]
                                                        else f"-{args.layers}-layers")
    made = c.run_child(script, {"method": "generate", "target": str(c.CACHE / f"{name}-{dtype}-layerwise"),
                                "shape": shape, "dtype": dtype, "device": device})
    if "error" in made:
        sys.exit(f"bench_gpu: generating the model failed: {made['error']}\n{made.get('stderr_tail', '')}")
    layerwise = Path(made["path"])
    prompts = make_token_prompts(n_prompts, prefix_tokens, args.suffixes, shape["vocab_size"])
    prompts_json = c.prompts_to_json(prompts)
    tokens = sum(p.n_tokens for p in prompts)
    c.warm_page_cache([layerwise])
    from flexorch.contract.manifest import DECODER, LM_HEAD, read_manifest

    manifest = read_manifest(layerwise)
    weight_bytes = manifest.total_bytes

    cap = GPU_CAP
    base = {"device": device, "layerwise": str(layerwise), "cap": cap}
    rates = c.run_child(script, {**base, "method": "rates", "files": [str(layerwise / e.file)
                                                                       for e in manifest.layers if e.file]})
    machine |= rates.pop("machine", {})
    # Every run reads the weights from the page cache (warmed above): so is the plan told.
    prediction = c.planner_prediction(layerwise, prompts, {"dtype": dtype}, gpu_memory=None if smoke else cap,
                                      devices=(device,), calibrate=not smoke,
                                      disk_read_bytes_per_s=rates.get("page_cache_bytes_per_s"))
    calibration = prediction.pop("calibration", None)
    if "planned_settings" in prediction:
        settings, source = prediction["planned_settings"], "planner"
    else:
        settings = {"dtype": dtype, "layers_per_shard": 1, "storage": "gpu" if not smoke else "cpu",
                    "batch_tokens": args.batch_tokens}
        source = f"fixed ({prediction.get('unavailable', '')})"
    print(f"flexorch settings ({source}): {settings}", flush=True)
    ours = c.run_child(script, {**base, "method": "flexorch", "prompts": prompts_json, "settings": settings})
    full = c.run_child(script, {**base, "method": "full", "prompts": prompts_json, "batch_tokens": args.batch_tokens,
                                "loop_prompts": args.loop_prompts})
    subset = prompts_json[: args.accelerate_prompts]
    offload = c.run_child(script, {**base, "method": "accelerate", "prompts": subset})
    if "seconds" in offload:
        offload["seconds_scaled"] = offload["seconds"] * len(prompts) / len(subset)
    grid = []  # auto against hand-set batch sizes, the rest of the plan kept
    for batch_tokens in [int(b) for b in args.grid_batch_tokens.split(",") if b]:
        run = c.run_child(script, {**base, "method": "flexorch", "prompts": prompts_json,
                                   "settings": {**settings, "batch_tokens": batch_tokens}})
        grid.append({"batch_tokens": batch_tokens, **{k: run.get(k) for k in ("seconds", "peak_device_memory",
                                                                              "device_fixed_bytes", "error")}})

    floor = {}
    if "matmul_flops" in rates:
        read_rate = min(r for r in (rates["page_cache_bytes_per_s"], rates["host_to_device_bytes_per_s"]) if r)
        decoder_params = sum(e.params for e in manifest.layers if e.kind == DECODER)
        head_params = manifest.entry(LM_HEAD).params
        flops = 2 * decoder_params * tokens + 2 * head_params * sum(len(p.suffix_ids) for p in prompts)
        floor = {"read_seconds": weight_bytes / read_rate, "compute_seconds": flops / rates["matmul_flops"],
                 "read_rate": read_rate, "flops": flops}
        floor["seconds"] = max(floor["read_seconds"], floor["compute_seconds"])
    ours_s = ours.get("seconds")
    rows = [
        ["(a) flexorch, GPU capped at 6 GB", ours_s, ours.get("load_seconds"), ours.get("compute_seconds"),
         ours.get("peak_device_memory"), "1.00x", ours.get("error", "")],
        ["(f) whole model on the GPU", full.get("seconds"), None, full.get("seconds"), full.get("peak_device_memory"),
         c.fmt_ratio(ours_s / full["seconds"] if ours_s and full.get("seconds") else None) + " (ours / it)",
         f"+ {c.fmt_seconds(full.get('load_seconds'))} s to load" if "load_seconds" in full else full.get("error", "")],
        [f"(h) plain HF loop, whole model on the GPU ({full.get('loop_prompts')} prompts, scaled)",
         full.get("loop_seconds_scaled"), None, None, full.get("peak_device_memory"),
         c.fmt_ratio(full["loop_seconds_scaled"] / ours_s if ours_s and "loop_seconds_scaled" in full else None)
         + " (it / ours)", "one forward per prefix + suffix"],
        [f"(d) accelerate offload, 6 GB ({len(subset)} prompts, scaled)", offload.get("seconds_scaled"), None, None,
         offload.get("peak_device_memory"),
         c.fmt_ratio(offload["seconds_scaled"] / ours_s if ours_s and "seconds_scaled" in offload else None)
         + " (it / ours)", offload.get("error", f"{offload.get('modules_on_gpu')} of {offload.get('modules')} "
                                                "modules on the GPU")],
        ["floor: max(read, compute)", floor.get("seconds"), floor.get("read_seconds"), floor.get("compute_seconds"),
         None, c.fmt_ratio(ours_s / floor["seconds"] if ours_s and floor else None, f"<= {GOAL}x") + " (ours / it)",
         rates.get("error", "")],
    ]
    table = [[label, c.fmt_seconds(s), c.fmt_seconds(load), c.fmt_seconds(compute), c.fmt_bytes(peak), ratio,
              str(note)[:70]] for label, s, load, compute, peak, ratio, note in rows]
    tokens_per_s = tokens / ours_s if ours_s else None
    caption = (f"{name} {dtype} ({c.fmt_bytes(weight_bytes)}), {len(prompts)} prompts x {args.suffixes} suffixes, "
               f"{tokens} tokens; flexorch {tokens_per_s or 0:,.0f} tokens/s; settings from {source}; "
               f"(a) load s = compute waiting for weights")
    c.print_table("13B-shaped model through a 6 GB GPU budget" if not smoke else "bench_gpu CPU smoke run",
                  ("method", "seconds", "load s", "compute s", "peak GPU memory", "ratio", "note"), table, caption)
    comparison = c.compare_prediction(prediction, ours) if "seconds" in ours else prediction
    c.print_table("planner predictions vs measured", c.PREDICTION_COLUMNS, c.prediction_rows(name, comparison))
    if grid:
        c.print_table("auto against hand-set batch sizes", ("batch_tokens", "seconds", "peak GPU memory", "note"),
                      [[f"{settings['batch_tokens']} (auto)", c.fmt_seconds(ours_s),
                        c.fmt_bytes(ours.get("peak_device_memory")), ""]]
                      + [[str(g["batch_tokens"]), c.fmt_seconds(g["seconds"]), c.fmt_bytes(g["peak_device_memory"]),
                          str(g["error"] or "")[:60]] for g in grid])
    path = c.write_results("gpu", {
        "quick": smoke, "model": name, "dtype": dtype, "weight_bytes": weight_bytes, "gpu_cap": cap, "prompts": len(prompts),
        "tokens": tokens, "tokens_per_s": tokens_per_s, "settings": settings, "settings_source": source,
        "flexorch": ours, "full_gpu": full, "accelerate": offload, "rates": rates, "floor": floor,
        "measured_over_floor": ours_s / floor["seconds"] if ours_s and floor else None, "goal": GOAL,
        "prediction": comparison, "calibration": calibration, "grid": grid}, machine, args.machine)
    print(f"results: {path}")


if __name__ == "__main__":
    if c.is_child():
        c.child_main({"generate": child_generate, "flexorch": child_flexorch, "full": child_full,
                      "accelerate": child_accelerate, "rates": child_rates})
    else:
        sys.exit(main())
