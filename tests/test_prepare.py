"""`flexorch prepare`: a Hugging Face checkpoint dir -> layerwise dir, streamed, atomic, with clear errors."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from flexorch.orchestrator import prepare
from flexorch.orchestrator.cli import main
from flexorch.orchestrator.demo import ARCHITECTURES, build_checkpoint
from flexorch.orchestrator.prepare import describe_checkpoint, prepare_checkpoint
from flexorch.contract.errors import UserError
from flexorch.contract.manifest import read_manifest
from flexorch.contract.models import DENSE_MODEL_TYPES, MOE_MODEL_TYPES

ROUND_TRIP_LAYOUTS = ("safetensors", "safetensors-sharded", "bin-sharded")


def source_tensors(src: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint dir, read without flexorch."""
    tensors = {}
    for path in src.glob("*.safetensors"):
        tensors.update(load_file(path))
    for path in src.glob("*.bin"):
        tensors.update(torch.load(path, weights_only=True))
    return tensors


def layer_names(num_layers: int) -> list[str]:
    return ["embed", *(f"layer.{i}" for i in range(num_layers)), "norm", "lm_head"]


def without_checksums(manifest):
    return dataclasses.replace(manifest, layers=tuple(dataclasses.replace(e, sha256=None) for e in manifest.layers))


# Every layout for the first six architectures; reading a layout does not depend on the architecture,
# so the others are converted from one (keeps the suite fast).
ARCH_LAYOUTS = [(arch, layout) for arch in ARCHITECTURES
                for layout in (ROUND_TRIP_LAYOUTS if arch in DENSE_MODEL_TYPES[:6] else ("safetensors-sharded",))]
# A fused experts tensor's parts, per expert, in order: the checkpoint's projection names for each.
EXPERT_PARTS = {"gate_up_proj": (("w1", "gate_proj"), ("w3", "up_proj")), "down_proj": (("w2", "down_proj"),)}


def expert_sources(entry, fused_name: str, expected: dict) -> list[list[str]]:
    """The checkpoint names of each expert's parts of `fused_name` ("mlp.experts.gate_up_proj")."""
    prefix = entry.source_prefix
    out = []
    for e in range(entry.experts):
        names = []
        for aliases in EXPERT_PARTS[fused_name.rsplit(".", 1)[1]]:
            candidates = [f"{prefix}{block}.experts.{e}.{proj}.weight" for block in ("mlp", "block_sparse_moe")
                          for proj in aliases]
            names.append(next(c for c in candidates if c in expected))
        out.append(names)
    return out


@pytest.mark.parametrize("arch, layout", ARCH_LAYOUTS)
def test_round_trip_every_tensor_once_bit_equal(arch, layout, checkpoint, layerwise):
    src, dst = checkpoint(arch, layout), layerwise(arch, layout)
    manifest = read_manifest(dst)
    expected = source_tensors(src)

    assert [e.name for e in manifest.layers] == layer_names(manifest.num_layers)
    assert manifest.num_layers == json.loads((src / "config.json").read_text())["num_hidden_layers"]
    seen = []
    for position, entry in enumerate(manifest.layers):
        if entry.tied_to:
            assert (entry.file, entry.bytes, entry.sha256, entry.tensors) == (None, 0, None, ())
            continue
        path = dst / entry.file
        assert entry.file == f"layers/{position:03d}_{entry.name}.safetensors"
        assert entry.bytes == path.stat().st_size
        assert entry.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
        stored = load_file(path)
        assert sorted(stored) == sorted(entry.tensors)
        for name, tensor in stored.items():
            if name in entry.expert_tensors:  # experts fused as transformers holds them: (expert, rows, cols)
                parts = expert_sources(entry, name, expected)
                original = torch.stack([torch.cat([expected[n] for n in names]) for names in parts])
                seen += [n for names in parts for n in names]
            else:
                original = expected[entry.source_prefix + name.replace("mlp.gate.", "block_sparse_moe.gate.")
                                    if arch == "mixtral" else entry.source_prefix + name]
                seen.append(entry.source_prefix + name)
            assert tensor.dtype == original.dtype and torch.equal(tensor, original), name
    if arch == "mixtral":  # transformers renames block_sparse_moe to mlp on load; so does prepare
        seen = [n.replace("mlp.gate.", "block_sparse_moe.gate.") for n in seen]
    assert len(seen) == len(set(seen))
    assert sorted(seen) == sorted(expected)  # the tiny tied checkpoints store no lm_head.weight
    tied = manifest.entry("lm_head").tied_to == "embed"
    assert tied == (arch in ("qwen2", "gemma", "gemma2", "gemma3_text", "granite"))
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (dst / name).read_bytes() == (src / name).read_bytes()


def test_single_bin_file(checkpoint, layerwise):
    src, dst = checkpoint("llama", "bin"), layerwise("llama", "bin")
    expected = source_tensors(src)
    manifest = read_manifest(dst)
    stored = {e.source_prefix + n: t for e in manifest.layers for n, t in load_file(dst / e.file).items()}
    assert stored.keys() == expected.keys()
    assert all(torch.equal(stored[name], expected[name]) for name in expected)


@pytest.mark.parametrize("arch, layout", ARCH_LAYOUTS)
def test_describe_equals_written_manifest_but_checksums(arch, layout, checkpoint, layerwise):
    written = read_manifest(layerwise(arch, layout))
    assert describe_checkpoint(checkpoint(arch, layout)) == without_checksums(written)


# demo's MoE architectures (test_families.py streams the experts of the other MoE families)
@pytest.mark.parametrize("arch", [t for t in MOE_MODEL_TYPES if t in ARCHITECTURES])
def test_experts_are_described_so_each_can_be_read_alone(arch, layerwise):
    """Expert e of a MoE layer is slice [e] of each fused tensor: `expert_bytes` apart in the file."""
    manifest = read_manifest(layerwise(arch))
    config = manifest.config
    experts = config.get("num_local_experts") or config.get("num_experts")
    for entry in manifest.decoder_layers:
        dense = entry.index in config.get("mlp_only_layers", [])
        assert entry.experts == (0 if dense else experts)
        if dense:
            assert entry.expert_tensors == () and entry.expert_bytes == 0
            continue
        stored = load_file(layerwise(arch) / entry.file)
        assert entry.expert_tensors == ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")
        assert all(stored[name].shape[0] == experts for name in entry.expert_tensors)
        assert entry.expert_bytes * experts == sum(stored[n].numel() * stored[n].element_size()
                                                   for n in entry.expert_tensors)


def test_ignorable_buffers_and_tied_head_copy_are_dropped(checkpoint, tmp_path):
    src = Path(shutil.copytree(checkpoint("qwen2", "safetensors"), tmp_path / "src"))
    tensors = load_file(src / "model.safetensors")
    original = set(tensors)
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    save_file(tensors, src / "model.safetensors")

    manifest = prepare_checkpoint(src, tmp_path / "dst")

    assert manifest.entry("lm_head").tied_to == "embed"
    assert {e.source_prefix + n for e in manifest.layers for n in e.tensors} == original


def test_tied_default_comes_from_the_model_type(checkpoint, tmp_path):
    """Gemma ties its embeddings by default: a config without the key is still tied."""
    src = Path(shutil.copytree(checkpoint("gemma", "safetensors"), tmp_path / "src"))
    config = json.loads((src / "config.json").read_text())
    del config["tie_word_embeddings"]
    (src / "config.json").write_text(json.dumps(config))
    assert describe_checkpoint(src).entry("lm_head").tied_to == "embed"


def test_dtype_from_config_else_from_tensors(tmp_path):
    src = build_checkpoint(tmp_path / "src", "llama", dtype="bfloat16", num_hidden_layers=1)
    assert describe_checkpoint(src).dtype == "bfloat16"
    config = json.loads((src / "config.json").read_text())
    config.pop("dtype", None)
    config.pop("torch_dtype", None)
    (src / "config.json").write_text(json.dumps(config))
    manifest = describe_checkpoint(src)
    assert manifest.dtype == "bfloat16"
    assert {e.dtype for e in manifest.layers} == {"bfloat16"}


def test_cli_prepares_and_prints_a_summary(checkpoint, tmp_path, capsys):
    dst = tmp_path / "out" / "model.layers"
    assert main(["prepare", str(checkpoint("llama", "safetensors")), str(dst)]) == 0
    assert "largest layer" in capsys.readouterr().err
    assert read_manifest(dst).num_layers == 4


def test_existing_dst_refused_without_force_replaced_with_it(checkpoint, tmp_path, capsys):
    dst = tmp_path / "model.layers"
    prepare_checkpoint(checkpoint("llama", "safetensors"), dst)
    other = str(checkpoint("qwen2", "safetensors"))
    capsys.readouterr()  # building the fixture checkpoints may have printed progress

    assert main(["prepare", other, str(dst)]) == 2
    assert capsys.readouterr().err.strip() == f"error: {dst}: already exists (use --force to replace it)"
    assert read_manifest(dst).model_type == "llama"

    assert main(["prepare", other, str(dst), "--force"]) == 0
    assert read_manifest(dst).model_type == "qwen2"
    assert not (dst / "layers" / "006_lm_head.safetensors").exists()  # nothing left of the old dir
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.layers"]


@pytest.mark.parametrize("existing", [False, True], ids=["new", "force-over-existing"])
@pytest.mark.parametrize("failure", [RuntimeError("disk on fire"), KeyboardInterrupt()], ids=["error", "interrupt"])
def test_failure_mid_way_leaves_no_half_made_dir(failure, existing, checkpoint, tmp_path, monkeypatch):
    src, dst = checkpoint("llama", "safetensors-sharded"), tmp_path / "model.layers"
    if existing:
        prepare_checkpoint(checkpoint("qwen2", "safetensors"), dst)
    write_layer, written = prepare._write_layer, []

    def fail_on_third_layer(layer, out, *args):
        if len(written) == 2:
            raise failure
        written.append(write_layer(layer, out, *args))
        return written[-1]

    monkeypatch.setattr(prepare, "_write_layer", fail_on_third_layer)
    with pytest.raises(type(failure)):
        prepare_checkpoint(src, dst, force=True)

    assert len(written) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == (["model.layers"] if existing else [])
    if existing:
        assert read_manifest(dst).model_type == "qwen2"


# -- errors: exit 2, one line naming the file, nothing written -------------------------------------
def _edit_config(src: Path, **changes) -> None:
    config = json.loads((src / "config.json").read_text())
    config.update(changes)
    (src / "config.json").write_text(json.dumps({k: v for k, v in config.items() if v is not None}))


def _edit_weights(src: Path, edit) -> None:
    tensors = load_file(src / "model.safetensors")
    edit(tensors)
    save_file(tensors, src / "model.safetensors")


def _replace_weights(src: Path, name: str, content: bytes) -> None:
    (src / "model.safetensors").unlink()
    (src / name).write_bytes(content)


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-100])


# id: (layout copied, how to break it, what the message must name)
BROKEN = {
    "src-missing": (
        "safetensors", lambda src: shutil.rmtree(src), ["{src}", "no such"]),
    "no-config": (
        "safetensors", lambda src: (src / "config.json").unlink(), ["{src}/config.json", "missing"]),
    "no-num-layers": (
        "safetensors", lambda src: _edit_config(src, num_hidden_layers=None),
        ["{src}/config.json", "num_hidden_layers"]),
    "no-weights": (
        "safetensors", lambda src: (src / "model.safetensors").unlink(), ["{src}", "no weight files"]),
    "index-names-missing-file": (
        "safetensors-sharded", lambda src: (src / "model-00002-of-00004.safetensors").unlink(),
        ["{src}/model.safetensors.index.json", "model-00002-of-00004.safetensors"]),
    "unmapped-tensor": (
        "safetensors", lambda src: _edit_weights(src, lambda t: t.update(extra=torch.ones(2))),
        ["{src}/model.safetensors", "'extra'"]),
    "layer-beyond-config": (
        "safetensors", lambda src: _edit_config(src, num_hidden_layers=3),
        ["{src}/model.safetensors", "'model.layers.3."]),
    "missing-decoder-layer": (
        "safetensors", lambda src: _edit_config(src, num_hidden_layers=5), ["{src}", "'layer.4'"]),
    "untied-without-head": (
        "safetensors", lambda src: _edit_weights(src, lambda t: t.pop("lm_head.weight")),
        ["{src}", "'lm_head'", "tie"]),
    "unknown-layout-pth": (
        "safetensors", lambda src: _replace_weights(src, "consolidated.00.pth", b"x"),
        ["{src}", "consolidated.00.pth"]),
    "unknown-layout-gguf": (
        "safetensors", lambda src: _replace_weights(src, "model.gguf", b"GGUF"), ["{src}", "model.gguf"]),
    "truncated-safetensors": (
        "safetensors", lambda src: _truncate(src / "model.safetensors"), ["{src}/model.safetensors"]),
    "garbage-safetensors": (
        "safetensors", lambda src: (src / "model.safetensors").write_bytes(b"\xff" * 64),
        ["{src}/model.safetensors", "not a readable safetensors file"]),
    "corrupt-bin": (
        "bin", lambda src: _truncate(src / "pytorch_model.bin"), ["{src}/pytorch_model.bin"]),
}


@pytest.mark.parametrize("case", BROKEN)
def test_bad_checkpoint_exits_2_with_one_line_naming_the_file(case, checkpoint, tmp_path, capsys):
    layout, breaks, expected = BROKEN[case]
    src = Path(shutil.copytree(checkpoint("llama", layout), tmp_path / "src"))
    dst = tmp_path / "dst"
    breaks(src)
    capsys.readouterr()  # building the fixture checkpoint may have printed progress

    assert main(["prepare", str(src), str(dst)]) == 2

    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    for part in expected:
        assert part.format(src=src) in err, err
    assert not dst.exists()


def test_half_written_dirs_of_dead_conversions_are_removed(checkpoint, tmp_path):
    import os

    dead = 2**22 + 12345  # above pid_max on common systems: never a live process
    leftovers = [tmp_path / f".m.layers.tmp-{dead}", tmp_path / f".m.layers.old-{dead}"]
    alive = tmp_path / f".m.layers.tmp-{os.getppid()}"  # a conversion still running: left alone
    other = tmp_path / f".other.tmp-{dead}"  # not ours to judge
    for path in (*leftovers, alive, other):
        (path / "layers").mkdir(parents=True)
    prepare_checkpoint(checkpoint("llama"), tmp_path / "m.layers")
    assert not any(p.exists() for p in leftovers) and alive.exists() and other.exists()


def test_a_config_declaring_more_layers_than_tensors_is_refused_before_any_loop(checkpoint, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(checkpoint("llama"), src)
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 10**9}))
    with pytest.raises(UserError, match="num_hidden_layers 1000000000 but the checkpoint holds only"):
        describe_checkpoint(src)


@pytest.mark.parametrize("dtypes", [("float32",), ("bfloat16", "float16", "int8", "bool", "float32")])
def test_layer_files_are_safetensors_save_file_byte_for_byte(tmp_path, dtypes):
    """prepare writes its own safetensors bytes (so it can allocate the file whole first): they must be
    save_file's, for every dtype, a scalar, an empty tensor and names in any order."""
    from safetensors.torch import save_file

    from flexorch.orchestrator.prepare import _save_contiguous

    g = torch.Generator().manual_seed(0)
    tensors = {}
    for i, dtype in enumerate(dtypes):
        t = torch.randn(3 + i, 5, generator=g) * 10
        tensors[f"z.{i}.weight"] = t.to(getattr(torch, dtype)) if dtype != "bool" else t > 0
    tensors |= {"a.scale": torch.tensor(2.5), "m.empty": torch.empty(0, 4), "b.t": torch.arange(6).view(2, 3).t()}
    save_file({k: v.contiguous() for k, v in tensors.items()}, tmp_path / "theirs.safetensors")
    _save_contiguous(tensors, tmp_path / "ours.safetensors")
    assert (tmp_path / "ours.safetensors").read_bytes() == (tmp_path / "theirs.safetensors").read_bytes()


# Configs as their checkpoints on the hub write them (the fields that decide), over a tiny llama's
# weights: the refusal comes from config.json alone, before any tensor is looked at.
NOT_STREAMABLE = {
    "gpt2": dict(model_type="gpt2", n_layer=4, n_embd=64, n_head=4, num_hidden_layers=None),
    "t5": dict(model_type="t5", num_layers=4, is_encoder_decoder=True, num_hidden_layers=None),
    "bart": dict(model_type="bart", encoder_layers=4, decoder_layers=4, is_encoder_decoder=True),
    "qwen3_next": dict(model_type="qwen3_next", layer_types=["linear_attention"] * 3 + ["full_attention"]),
    "falcon_h1": dict(model_type="falcon_h1"),
    "mamba": dict(model_type="mamba", state_size=16),
    "hybrid-layer-types": dict(layer_types=["full_attention", "mamba", "full_attention", "mamba"]),
}


@pytest.mark.parametrize("case", NOT_STREAMABLE)
def test_a_model_that_is_no_attention_decoder_is_refused_even_when_untested_models_are_allowed(
        case, checkpoint, tmp_path, capsys):
    src = Path(shutil.copytree(checkpoint("llama", "safetensors"), tmp_path / "src"))
    _edit_config(src, **NOT_STREAMABLE[case])
    model_type = NOT_STREAMABLE[case].get("model_type", "llama")
    job = tmp_path / "job.yaml"
    (tmp_path / "prompts.jsonl").write_text('{"prefix": "Hi", "suffixes": [" a"]}\n')
    job.write_text(json.dumps({"model": str(src), "prompts": str(tmp_path / "prompts.jsonl"),
                               "output": str(tmp_path / "out.pkl"), "devices": "cpu", "allow_untested_models": True}))
    capsys.readouterr()
    for command in (["prepare", str(src), str(tmp_path / "dst")], ["plan", str(job)], ["submit", str(job)]):
        assert main(command) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err, err
        assert f"{src}/config.json: model type {model_type!r} cannot run in flexorch" in err
        assert "(tested: llama, mistral," in err and "allow_untested_models does not change that" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["job.yaml", "prompts.jsonl", "src"]


def test_a_hub_id_absent_offline_is_told_how_to_download_it(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))  # empty (tests/test_hub.py: one laid out by hand)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "prompts.jsonl").write_text('{"prefix": "Hi", "suffixes": [" a"]}\n')
    (tmp_path / "job.yaml").write_text(json.dumps({"model": "meta-llama/Llama-2-7b-hf", "prompts": "prompts.jsonl",
                                                    "output": "out.pkl"}))
    for command in (["prepare", "meta-llama/Llama-2-7b-hf", "dst"], ["plan", "job.yaml"]):
        assert main(command) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1, err
        assert (f"model 'meta-llama/Llama-2-7b-hf' is not in the local Hugging Face cache ({tmp_path / 'hub'}) and "
                "HF_HUB_OFFLINE is set: download it with `hf download meta-llama/Llama-2-7b-hf") in err
    assert main(["prepare", "no/such/dir/below", "dst"]) == 2  # a path of several folders: no hub lookup
    assert "Hugging Face" not in capsys.readouterr().err
