"""Checkpoints as they ship (orchestrator/shipped.py, workers/quantized.py): FP8 with 128 x 128 block
scales and MXFP4, kept quantised by `flexorch prepare` and dequantised by the workers after each read,
score as transformers' own dequantised model; and GGUF files, read through transformers' GGUF loader.

The tiny quantised checkpoints are made here as the releases are: a float model's decoder projections
quantised by the published formulas, the `quantization_config` the releases carry written into its
config.json. The references load those same dirs with transformers, which dequantises them on a CPU.
"""

from __future__ import annotations

import inspect
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from flexorch.contract.manifest import ManifestError, read_manifest
from flexorch.contract.protocol import ScoreSpec
from flexorch.orchestrator.cli import main
from flexorch.orchestrator.demo import build_checkpoint, build_tokenizer
from flexorch.orchestrator.prepare import describe_checkpoint, prepare_checkpoint
from flexorch.workers.engine import score_prompts
from flexorch.workers.quantized import dequantize_fp8, dequantize_mxfp4, quantize_fp8, quantize_mxfp4

from test_engine import reference_scores, settings

FP8_CONFIG = {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3", "weight_block_size": [128, 128]}
MXFP4_CONFIG = {"quant_method": "mxfp4", "modules_to_not_convert": [
    "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}


# -- making quantised checkpoints, by the published formulas ---------------------------------------
def _write_quantized(src: Path, dst: Path, quantize_tensors, quantization_config: dict) -> Path:
    shutil.copytree(src, dst)
    tensors = load_file(dst / "model.safetensors")
    save_file(quantize_tensors(tensors), dst / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((dst / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**config, "quantization_config": quantization_config}, indent=1))
    return dst


def _fp8_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every decoder projection in FP8, as DeepSeek-V3 ships (embedding, norms and head stay)."""
    out = {}
    for name, tensor in tensors.items():
        if name.startswith("model.layers.") and name.endswith("proj.weight"):
            out[name], out[name.removesuffix("weight") + "weight_scale_inv"] = quantize_fp8(tensor)
        else:
            out[name] = tensor
    return out


def _mxfp4_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The experts' gate_up_proj and down_proj in MXFP4, as gpt-oss ships (their biases stay)."""
    out = {}
    for name, tensor in tensors.items():
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            out[name + "_blocks"], out[name + "_scales"] = quantize_mxfp4(tensor)
        else:
            out[name] = tensor
    return out


@pytest.fixture(scope="module")
def fp8(tmp_path_factory) -> Path:
    """A tiny llama in FP8 blocks: hidden 128, MLP 256, whole blocks (transformers' loader derives the block
    from the scale grid, so it misreads ragged ones; test_fp8_ragged_blocks_... checks those)."""
    root = tmp_path_factory.mktemp("fp8")
    src = build_checkpoint(root / "float", "llama", layout="safetensors", hidden_size=128, intermediate_size=256,
                           num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=3)
    return _write_quantized(src, root / "fp8", _fp8_tensors, FP8_CONFIG)


@pytest.fixture(scope="module")
def fp8_moe(tmp_path_factory) -> Path:
    """A tiny Qwen3-MoE in FP8 blocks, its experts per expert with their scales as Qwen3-FP8 ships them."""
    root = tmp_path_factory.mktemp("fp8-moe")
    src = build_checkpoint(root / "float", "qwen3_moe", layout="safetensors", hidden_size=128, head_dim=32,
                           num_attention_heads=4, num_key_value_heads=4, moe_intermediate_size=128,
                           intermediate_size=256, num_hidden_layers=3)
    return _write_quantized(src, root / "fp8", _fp8_tensors, FP8_CONFIG)


def build_gpt_oss(path: Path) -> Path:
    """A tiny random gpt-oss (sliding and full attention layers) with a tokenizer, shaped as the release
    is where bytes go: its experts (32, 2 per token) hold ~95% of the weights, stored in bf16 as the
    release stores what it does not quantise."""
    from transformers import AutoConfig, AutoModelForCausalLM

    tokenizer = build_tokenizer()
    config = AutoConfig.for_model(
        "gpt_oss", hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, num_local_experts=32, num_experts_per_tok=2, vocab_size=len(tokenizer),
        sliding_window=8, layer_types=["sliding_attention", "full_attention"], bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def mxfp4(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("mxfp4")
    return _write_quantized(build_gpt_oss(root / "float"), root / "mxfp4", _mxfp4_tensors, MXFP4_CONFIG)


@pytest.fixture(scope="module")
def mxfp4_reference(mxfp4, tmp_path_factory):
    return reference_scores(_float32_reference(mxfp4, tmp_path_factory.mktemp("mxfp4-reference")), steps=1)


# -- the dequantisation against transformers' own ---------------------------------------------------
def _quantized_fp8(rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(weight, its FP8 blocks, their scales, our dequantisation) of a weight whose rows span 4 decades."""
    weight = torch.randn(rows, cols) * torch.logspace(-3, 1, rows)[:, None]
    q, scale_inv = quantize_fp8(weight)
    ours = dequantize_fp8(q, scale_inv, torch.float32)
    # e4m3 keeps 3 mantissa bits: each weight within 1/16 of itself (or of the block's smallest step)
    assert ((ours - weight).abs() <= weight.abs() / 16 + scale_inv.max() * 2**-9).all()
    return weight, q, scale_inv, ours


def test_fp8_dequantises_as_transformers_loader_does():
    """Whole blocks against the loader's own step (`Fp8Dequantize`, in transformers 5.17 and 5.25 alike)."""
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize

    _, q, scale_inv, ours = _quantized_fp8(256, 384)
    assert scale_inv.shape == (2, 3)
    assert torch.equal(ours, Fp8Dequantize(None)._dequantize_one(q, scale_inv, torch.float32))


def test_fp8_ragged_blocks_dequantise_as_transformers_does():
    """Edge blocks cut short (200 x 320 in 128 x 128 blocks) against `_dequantize_fp8_weight`, which
    transformers 5.17 lacks (its loader refuses a weight the scale grid does not divide)."""
    import transformers
    from transformers.integrations import finegrained_fp8

    _, q, scale_inv, ours = _quantized_fp8(200, 320)
    assert scale_inv.shape == (2, 3)
    if not hasattr(finegrained_fp8, "_dequantize_fp8_weight"):
        pytest.skip(f"transformers {transformers.__version__} has no _dequantize_fp8_weight (5.25 has)")
    assert torch.equal(ours, finegrained_fp8._dequantize_fp8_weight(q, scale_inv, [128, 128], torch.float32))


def test_mxfp4_dequantises_as_transformers_does():
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    weight = torch.randn(3, 64, 96)  # (experts, in, out)
    blocks, scales = quantize_mxfp4(weight)
    assert blocks.shape == (3, 96, 2, 16) and scales.shape == (3, 96, 2)
    ours = dequantize_mxfp4(blocks, scales, torch.float32)
    assert ours.shape == weight.shape
    assert torch.equal(ours, convert_moe_packed_tensors(blocks, scales, dtype=torch.float32))
    assert (ours - weight).abs().max() < weight.abs().max() / 4  # E2M1: 1 mantissa bit, 6 = the group's top


# -- prepare keeps the shipped bytes; workers score as the dequantised model -----------------------
def _float32_reference(src: Path, tmp_path: Path) -> Path:
    """`src`, or where transformers' loader dequantises MXFP4 into bfloat16 whatever dtype is asked
    (5.17: its dequantize_convertops takes no dtype; 5.25's takes the parameter's) a plain copy with
    the experts dequantised into float32 by its own convert_moe_packed_tensors."""
    from transformers.integrations import mxfp4

    if "dtype" in inspect.signature(mxfp4.dequantize_convertops).parameters:
        return src
    dst = tmp_path / f"{src.name}-float32"
    shutil.copytree(src, dst)
    tensors = load_file(src / "model.safetensors")
    for name in [n for n in tensors if n.endswith("_blocks")]:
        stem = name.removesuffix("_blocks")
        tensors[stem] = mxfp4.convert_moe_packed_tensors(tensors.pop(name), tensors.pop(stem + "_scales"),
                                                          dtype=torch.float32)
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((dst / "config.json").read_text())
    del config["quantization_config"]
    (dst / "config.json").write_text(json.dumps(config, indent=1))
    return dst


def _scores_match(model_dir: Path, src: Path, layers_per_shard: int, ref=None) -> None:
    ref = ref or reference_scores(src, steps=1)
    # gpt_oss joins the tested list with issue 27 item 1; the format, not the family, is tested here
    run = settings(layers_per_shard=layers_per_shard, allow_untested_models=True)
    results, _ = score_prompts(model_dir, ref.prompts, ScoreSpec("suffix_logprob"), run)
    for got, want in zip(results, ref.logprob):
        np.testing.assert_allclose(got.scores["logprob"], want, atol=1e-4, rtol=0)
    results, _ = score_prompts(model_dir, ref.prompts, ScoreSpec(), run)
    for got, want in zip(results, ref.probs):
        np.testing.assert_allclose(got.scores[:, 0], want[:, 0], atol=2e-6, rtol=0)


@pytest.mark.parametrize("layers_per_shard", [1, 2])
def test_an_fp8_checkpoint_is_kept_in_fp8_and_scores_as_transformers_dequantised_model(fp8, tmp_path,
                                                                                       layers_per_shard):
    dst = tmp_path / "fp8.layers"
    assert main(["prepare", str(fp8), str(dst)]) == 0
    manifest = read_manifest(dst)
    assert manifest.compression == "fp8" and manifest.dtype == "float32"
    layer = manifest.entry("layer.0")
    assert layer.compression == "fp8" and layer.dtype == "float32"
    assert "mlp.down_proj.weight.fp8" in layer.tensors and "mlp.down_proj.weight.scale" in layer.tensors
    assert "input_layernorm.weight" in layer.tensors
    assert manifest.entry("embed").compression is None and manifest.entry("embed").tensors == ("weight",)
    # params count the dequantised weights, as the float model has them
    float_manifest = describe_checkpoint(fp8.parent / "float")
    assert [e.params for e in manifest.layers] == [e.params for e in float_manifest.layers]
    stored = load_file(dst / layer.file)
    assert stored["mlp.down_proj.weight.fp8"].dtype == torch.float8_e4m3fn
    assert torch.equal(stored["mlp.down_proj.weight.fp8"].view(torch.uint8),
                       load_file(fp8 / "model.safetensors")["model.layers.0.mlp.down_proj.weight"].view(torch.uint8))
    _scores_match(dst, fp8, layers_per_shard)


def test_fp8_experts_are_fused_with_their_scales_and_stream_exactly(fp8_moe, tmp_path):
    dst = tmp_path / "fp8-moe.layers"
    manifest = prepare_checkpoint(fp8_moe, dst)
    layer = manifest.entry("layer.1")
    assert layer.experts == 6 and set(layer.expert_tensors) == {
        "mlp.experts.gate_up_proj.fp8", "mlp.experts.gate_up_proj.scale", "mlp.experts.down_proj.fp8",
        "mlp.experts.down_proj.scale"}
    assert "self_attn.q_proj.weight.scale" in layer.tensors and "mlp.gate.weight" in layer.tensors
    stored = load_file(dst / layer.file)
    assert stored["mlp.experts.gate_up_proj.fp8"].shape == (6, 256, 128)
    assert stored["mlp.experts.gate_up_proj.scale"].shape == (6, 2, 1)
    assert layer.params == describe_checkpoint(fp8_moe.parent / "float").entry("layer.1").params
    ref = reference_scores(fp8_moe, steps=1)
    for group in (0, 1, 4):  # whole layers, then experts streamed in groups
        run = settings(layers_per_shard=1, experts_per_group=group)
        results, _ = score_prompts(dst, ref.prompts, ScoreSpec("suffix_logprob"), run)
        for got, want in zip(results, ref.logprob):
            np.testing.assert_allclose(got.scores["logprob"], want, atol=1e-4, rtol=0)


def test_an_mxfp4_checkpoint_is_kept_in_mxfp4_and_scores_as_transformers_dequantised_model(mxfp4, mxfp4_reference,
                                                                                           tmp_path):
    dst = tmp_path / "mxfp4.layers"
    assert main(["prepare", str(mxfp4), str(dst)]) == 0
    manifest = read_manifest(dst)
    layer = manifest.entry("layer.1")
    assert manifest.compression == layer.compression == "mxfp4"
    assert {"mlp.experts.gate_up_proj.mxfp4", "mlp.experts.gate_up_proj.scale", "mlp.experts.down_proj.mxfp4",
            "mlp.experts.down_proj.scale", "mlp.experts.gate_up_proj_bias"} <= set(layer.tensors)
    assert [e.params for e in manifest.layers] == [e.params for e in describe_checkpoint(mxfp4.parent / "float").layers]
    _scores_match(dst, mxfp4, 1, mxfp4_reference)


def test_mxfp4_experts_stream_in_groups_as_shipped_reading_under_0_3_of_the_bf16_conversion(mxfp4, mxfp4_reference,
                                                                                            tmp_path):
    """gpt-oss's experts come fused, expert first, as blocks and scales: prepare keeps them so and marks
    them streamable; each group's slices are dequantised after the read and the groups sum to the layer."""
    dst = tmp_path / "mxfp4.layers"
    manifest = prepare_checkpoint(mxfp4, dst)
    layer = manifest.entry("layer.1")
    assert layer.experts == 32 and set(layer.expert_tensors) == {
        "mlp.experts.gate_up_proj.mxfp4", "mlp.experts.gate_up_proj.scale", "mlp.experts.gate_up_proj_bias",
        "mlp.experts.down_proj.mxfp4", "mlp.experts.down_proj.scale", "mlp.experts.down_proj_bias"}
    stored, shipped = load_file(dst / layer.file), load_file(mxfp4 / "model.safetensors")
    for name in ("gate_up_proj", "down_proj"):  # the shipped bytes, renamed
        assert torch.equal(stored[f"mlp.experts.{name}.mxfp4"], shipped[f"model.layers.1.mlp.experts.{name}_blocks"])
        assert torch.equal(stored[f"mlp.experts.{name}.scale"], shipped[f"model.layers.1.mlp.experts.{name}_scales"])
    assert layer.expert_bytes * 32 == sum(t.nbytes for name, t in stored.items() if name in layer.expert_tensors)
    bf16 = tmp_path / "bf16.layers"
    prepare_checkpoint(mxfp4.parent / "float", bf16)
    ref = mxfp4_reference
    _, plain = score_prompts(bf16, ref.prompts, ScoreSpec("suffix_logprob"), settings(allow_untested_models=True))
    for group in (1, 2, 32):
        run = settings(experts_per_group=group, allow_untested_models=True)
        results, streamed = score_prompts(dst, ref.prompts, ScoreSpec("suffix_logprob"), run)
        for got, want in zip(results, ref.logprob):
            np.testing.assert_allclose(got.scores["logprob"], want, atol=1e-4, rtol=0)
        print(f"{group} experts per group: {streamed.bytes_read} bytes read, bf16 {plain.bytes_read}")
        assert streamed.bytes_read <= 0.3 * plain.bytes_read


def test_mxfp4_blocks_without_their_scales_are_refused_in_one_line(mxfp4, tmp_path, capsys):
    src = tmp_path / "odd"
    shutil.copytree(mxfp4, src)
    tensors = load_file(src / "model.safetensors")
    del tensors["model.layers.0.mlp.experts.down_proj_scales"]
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    assert main(["prepare", str(src), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "MXFP4 model.layers.0.mlp.experts.down_proj_blocks has no _scales" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


def test_describe_plans_the_bytes_prepare_writes(fp8, mxfp4, tmp_path):
    for src in (fp8, mxfp4):
        described = describe_checkpoint(src)
        written = prepare_checkpoint(src, tmp_path / src.name)
        assert [(e.bytes, e.tensors, e.compression, e.dtype) for e in described.layers] == \
               [(e.bytes, e.tensors, e.compression, e.dtype) for e in written.layers]


def test_shipped_bytes_are_what_a_pass_reads(fp8, tmp_path):
    from flexorch.orchestrator.planner import _describe_model

    dst = tmp_path / "fp8.layers"
    manifest = prepare_checkpoint(fp8, dst)
    plain = prepare_checkpoint(fp8.parent / "float", tmp_path / "float.layers")
    model = _describe_model(manifest, "float32")
    assert model.bytes_per_pass == sum((dst / e.file).stat().st_size for e in manifest.layers if e.file)
    assert model.bytes_per_pass < _describe_model(plain, "float32").bytes_per_pass
    # a shard slot holds the FP8 file; beside it, the layer dequantised to float32
    assert model.layer == max(e.params for e in manifest.decoder_layers) * 4
    from test_planner import Spec, machine

    from flexorch.orchestrator.planner import make_plan

    plan = make_plan(machine(), manifest, Spec(), [40])
    assert f"weights fp8 as the checkpoint ships them: dequantised per shard into {plan.dtype}; scores are the " \
           "dequantised model's" in plan.reasons


@pytest.mark.parametrize("config, message", [
    ({"quant_method": "gptq", "bits": 4}, "quant_method 'gptq' is not read by flexorch"),
    ({"quant_method": "fp8", "activation_scheme": "dynamic"}, "fp8 without weight_block_size"),
])
def test_a_quantisation_flexorch_does_not_read_is_refused_in_one_line(fp8, tmp_path, capsys, config, message):
    src = tmp_path / "other"
    shutil.copytree(fp8, src)
    raw = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**raw, "quantization_config": config}))
    assert main(["prepare", str(src), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


def test_compress_is_refused_for_a_checkpoint_that_ships_quantised(fp8, tmp_path, capsys):
    assert main(["prepare", str(fp8), str(tmp_path / "out"), "--compress", "int8"]) == 2
    assert "ships quantised (fp8), kept as it is; leave out --compress" in capsys.readouterr().err


def test_a_non_decoder_layer_holding_fp8_is_refused(fp8, tmp_path):
    src = tmp_path / "odd"
    shutil.copytree(fp8, src)
    tensors = load_file(src / "model.safetensors")
    weight = tensors.pop("lm_head.weight")
    tensors["lm_head.weight"], tensors["lm_head.weight_scale_inv"] = quantize_fp8(weight)
    save_file(tensors, src / "model.safetensors")
    with pytest.raises(Exception, match="lm_head.weight is quantised \\(fp8\\) but only decoder layers"):
        prepare_checkpoint(src, tmp_path / "out")


def test_a_manifest_naming_fp8_over_int8_files_is_refused(fp8, tmp_path):
    dst = tmp_path / "fp8.layers"
    prepare_checkpoint(fp8, dst)
    manifest = json.loads((dst / "flexorch_manifest.json").read_text())
    for layer in manifest["layers"]:
        layer["compression"] = "int8" if layer["kind"] == "decoder" else None
    (dst / "flexorch_manifest.json").write_text(json.dumps({**manifest, "compression": "int8"}))
    with pytest.raises(ManifestError, match="holds fp8 tensors but the manifest says compressed int8"):
        read_manifest(dst)


# -- GGUF, through transformers' GGUF loader --------------------------------------------------------
def write_tiny_gguf(path: Path) -> Path:
    """A tiny llama GGUF as llama.cpp writes one (gguf.GGUFWriter): the tokenizer's BPE vocabulary and
    merges in its metadata, F32 embedding, norms and head, Q8_0 decoder projections."""
    import gguf

    tokenizer = build_tokenizer()
    spec = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    tokens = sorted(tokenizer.get_vocab(), key=tokenizer.get_vocab().get)
    hidden, inter, layers, heads, kv_heads = 64, 128, 2, 4, 2
    kv = kv_heads * hidden // heads
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(256), writer.add_embedding_length(hidden), writer.add_block_count(layers)
    writer.add_feed_forward_length(inter), writer.add_head_count(heads), writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(1e-5), writer.add_rope_dimension_count(hidden // heads)
    writer.add_rope_freq_base(10000.0), writer.add_vocab_size(len(tokens)), writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens), writer.add_token_types([1] * len(tokens))
    writer.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in spec["merges"]])
    writer.add_bos_token_id(tokenizer.bos_token_id), writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id)
    rng = np.random.default_rng(0)

    def tensor(name, shape, kind=gguf.GGMLQuantizationType.F32):
        values = (rng.standard_normal(shape) * 0.1).astype(np.float32)
        if kind == gguf.GGMLQuantizationType.F32:
            writer.add_tensor(name, values)
        else:
            writer.add_tensor(name, gguf.quants.quantize(values, kind), raw_dtype=kind)

    q8 = gguf.GGMLQuantizationType.Q8_0
    tensor("token_embd.weight", (len(tokens), hidden)), tensor("output_norm.weight", (hidden,))
    tensor("output.weight", (len(tokens), hidden))
    for i in range(layers):
        tensor(f"blk.{i}.attn_norm.weight", (hidden,)), tensor(f"blk.{i}.ffn_norm.weight", (hidden,))
        tensor(f"blk.{i}.attn_q.weight", (hidden, hidden), q8), tensor(f"blk.{i}.attn_k.weight", (kv, hidden), q8)
        tensor(f"blk.{i}.attn_v.weight", (kv, hidden), q8), tensor(f"blk.{i}.attn_output.weight", (hidden, hidden), q8)
        tensor(f"blk.{i}.ffn_gate.weight", (inter, hidden), q8), tensor(f"blk.{i}.ffn_up.weight", (inter, hidden), q8)
        tensor(f"blk.{i}.ffn_down.weight", (hidden, inter), q8)
    writer.write_header_to_file(), writer.write_kv_data_to_file(), writer.write_tensors_to_file()
    writer.close()
    return path


def test_a_gguf_file_scores_as_transformers_loading_it(tmp_path, capsys):
    pytest.importorskip("gguf")
    from transformers import AutoModelForCausalLM

    src = write_tiny_gguf(tmp_path / "gguf" / "tiny-q8_0.gguf")
    dst = tmp_path / "tiny.layers"
    assert main(["prepare", str(src), str(dst), "--dtype", "float32"]) == 0
    assert "GGUF, dequantised into float32 by transformers' GGUF loader" in capsys.readouterr().err
    manifest = read_manifest(dst)
    assert manifest.model_type == "llama" and manifest.compression is None and manifest.dtype == "float32"
    assert not list(tmp_path.glob(".tiny.layers.gguf-*"))  # the float checkpoint made on the way is gone
    assert manifest.source == str(src)
    # the reference: transformers loading the same GGUF, float32, and the tokenizer it reads from it
    # the reference: transformers' model of the same GGUF, float32, saved losslessly to be reloaded
    model = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
    model.hf_quantizer = None
    del model.config.quantization_config
    model.save_pretrained(tmp_path / "reference")
    shutil.copy(dst / "tokenizer.json", tmp_path / "reference"), shutil.copy(dst / "tokenizer_config.json",
                                                                              tmp_path / "reference")
    _scores_match(dst, tmp_path / "reference", 2)


def test_gguf_dtype_is_for_gguf_files_only(fp8, tmp_path, capsys):
    assert main(["prepare", str(fp8), str(tmp_path / "out"), "--dtype", "float16"]) == 2
    assert "only a GGUF file is converted to a dtype" in capsys.readouterr().err
    (tmp_path / "dir").mkdir()
    shutil.copy(fp8.parent / "float" / "config.json", tmp_path / "dir")
    (tmp_path / "dir" / "model-q4.gguf").write_bytes(b"GGUF")
    assert main(["prepare", str(tmp_path / "dir"), str(tmp_path / "out")]) == 2
    assert "holds GGUF files (model-q4.gguf); give the .gguf file itself" in capsys.readouterr().err


# -- manifests described at full size (benchmarks/manifests.py) -------------------------------------
def _described(release_config: dict, model_type: str, scheme: str | None, dtype: str):
    import sys

    sys.path.insert(0, str(Path(__file__).parent.parent / "benchmarks"))
    from manifests import Release, described_manifest

    return described_manifest(Release("tiny", model_type, release_config, scheme), dtype)


@pytest.mark.parametrize("which", ["fp8", "fp8_moe", "mxfp4"])
def test_a_described_manifest_is_what_prepare_writes_but_the_headers(which, request, tmp_path):
    src = request.getfixturevalue(which)
    raw = json.loads((src / "config.json").read_text())
    config = {k: v for k, v in raw.items() if k not in ("quantization_config", "architectures", "model_type",
                                                        "transformers_version", "dtype", "torch_dtype")}
    scheme = raw["quantization_config"]["quant_method"]
    described = _described(config, raw["model_type"], scheme, raw["dtype"])
    written = prepare_checkpoint(src, tmp_path / "out")
    assert described.compression == written.compression == scheme
    for want, got in zip(written.layers, described.layers):
        assert (got.name, got.params, got.compression) == (want.name, want.params, want.compression)
        assert (got.experts, got.expert_bytes) == (want.experts, want.expert_bytes)
        assert sorted(got.tensors) == sorted(want.tensors)
        assert sorted(got.expert_tensors) == sorted(want.expert_tensors)
        header = 64 + 160 * len(want.tensors)  # safetensors' JSON header: name, dtype, shape, offsets per tensor
        assert want.bytes - header <= got.bytes <= want.bytes


def test_a_job_on_an_fp8_checkpoint_plans_from_its_shipped_bytes(fp8, tmp_path, capsys):
    from test_controller import write_job

    assert main(["plan", str(write_job(tmp_path, fp8)), "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert any("weights fp8 as the checkpoint ships them" in reason for reason in plan["reasons"])


def test_gpt_oss_120b_described_at_full_size_plans_on_a_6_gb_gpu_streaming_its_experts():
    import sys

    sys.path.insert(0, str(Path(__file__).parent.parent / "benchmarks"))
    from manifests import GPT_OSS_120B, described_manifest
    from plans_real import CASES, hardware
    from test_planner import Spec

    from flexorch.orchestrator.planner import make_plan

    manifest = described_manifest(GPT_OSS_120B)
    # 36 layers of 128 experts in MXFP4 and bf16 attention: the release's 65 GB, not bf16's 234
    assert 64e9 < manifest.total_bytes < 66e9 and 116e9 < sum(e.params for e in manifest.layers) < 118e9
    machine = next(machine for release, machine in CASES if release is GPT_OSS_120B)
    plan = make_plan(hardware(machine), manifest, Spec(allow_untested_models=True), [262] * 100)
    worker = plan.workers[0]
    assert 0 < worker.settings.experts_per_group < 128  # a layer (1.75 GB, 6.5 GB dequantised) does not fit twice
    assert worker.predicted_peak_device_memory < machine.gpu_gb[0] * 1e9
