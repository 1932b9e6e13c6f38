"""Compressed weights (flexorch/weights/compression.py): the scheme's round trip within its stated bound,
`flexorch prepare --compress`, scores of a compressed model near the uncompressed one's, the
manifest refusing mixed schemes, and the report naming the scheme."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from flexorch.contract.manifest import MANIFEST_NAME, ManifestError, read_manifest
from flexorch.contract.protocol import EngineSettings, ScoreSpec
from flexorch.orchestrator.cli import main
from flexorch.orchestrator.prepare import prepare_checkpoint
from flexorch.weights.compression import GROUP, QMAX, compress_layer, decompress_layer, dequantize, quantize
from flexorch.workers.engine import score_prompts

from test_controller import submit, write_job
from test_engine import tokenize

# Measured on the tiny random models (max |d log p| over the full vocabulary, every architecture
# tried): int8 0.012, int4 0.22; the tolerances leave 4x and 2x of room.
MAX_LOGPROB_DEVIATION = {"int8": 0.05, "int4": 0.5}


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_round_trip_is_within_half_a_step_of_each_groups_absmax(scheme):
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(48, 4 * GROUP, generator=gen) * torch.logspace(-4, 1, 48)[:, None]  # rows of any scale
    weight[3, :GROUP] = 0.0  # an all-zero group
    weight[5, 7] = -50.0  # an outlier: its group's step grows, the others' do not
    q, scale = quantize(weight, scheme)
    assert q.dtype == (torch.int8 if scheme == "int8" else torch.uint8)
    assert q.shape == (48, 4 * GROUP if scheme == "int8" else 2 * GROUP) and scale.shape == (48, 4)
    restored = dequantize(q, scale, scheme, torch.float32)
    absmax = weight.reshape(48, 4, GROUP).abs().amax(-1)
    bound = (absmax / (2 * QMAX[scheme]) * (1 + 1e-5) + 1e-12).repeat_interleave(GROUP, dim=1)
    assert (restored - weight).abs().le(bound).all()
    assert restored[3, :GROUP].eq(0).all()
    assert restored[5, 7] == -50.0  # a group's absmax is exact: it sets the scale
    assert dequantize(q, scale, scheme, torch.bfloat16).dtype == torch.bfloat16


def test_a_layer_keeps_its_names_and_what_is_not_a_projection():
    layer = {"mlp.up_proj.weight": torch.randn(128, 64), "input_layernorm.weight": torch.ones(64),
             "self_attn.q_proj.bias": torch.zeros(64), "odd.weight": torch.randn(8, 10), "gate.scale": torch.ones(3)}
    stored = compress_layer(layer, "int4")
    assert set(stored) == {"mlp.up_proj.weight.int4", "mlp.up_proj.weight.scale", "input_layernorm.weight",
                           "self_attn.q_proj.bias", "odd.weight", "gate.scale"}
    restored = decompress_layer(stored, torch.float32)
    assert set(restored) == set(layer)
    for name in ("input_layernorm.weight", "self_attn.q_proj.bias", "odd.weight", "gate.scale"):
        assert restored[name] is layer[name]


@pytest.fixture(scope="module")
def compressed(checkpoint, tmp_path_factory):
    """compressed(arch, scheme) -> a layerwise dir prepared with --compress (cached)."""
    cache = {}

    def get(arch: str, scheme: str):
        if (arch, scheme) not in cache:
            dst = tmp_path_factory.mktemp(f"{arch}-{scheme}") / "model.layers"
            assert main(["prepare", str(checkpoint(arch)), str(dst), "--compress", scheme]) == 0
            cache[arch, scheme] = dst
        return cache[arch, scheme]

    return get


@pytest.mark.parametrize("scheme", ["int8", "int4"])
@pytest.mark.parametrize("arch", ["llama", "qwen3", "phi3"])
def test_a_compressed_model_scores_near_the_uncompressed_one_and_reads_fewer_bytes(arch, scheme, layerwise,
                                                                                    compressed):
    plain, packed = read_manifest(layerwise(arch)), read_manifest(compressed(arch, scheme))
    assert packed.compression == scheme and plain.compression is None
    for a, b in zip(plain.layers, packed.layers):
        assert b.compression == (scheme if b.kind == "decoder" else None)
        assert (b.bytes < a.bytes) if b.kind == "decoder" else (b.bytes == a.bytes)
    prompts = tokenize(layerwise(arch))
    settings = EngineSettings("cpu", "float32", 2, "cpu", 4096)
    # one step: near-tied argmaxes of a random model would send greedy extensions apart
    want, plain_run = score_prompts(layerwise(arch), prompts, ScoreSpec(), settings)
    got, packed_run = score_prompts(compressed(arch, scheme), prompts, ScoreSpec(), settings)
    deviation = max(float(np.abs(np.log(a.scores) - np.log(b.scores)).max()) for a, b in zip(want, got))
    assert 0 < deviation < MAX_LOGPROB_DEVIATION[scheme]
    assert packed_run.bytes_read < plain_run.bytes_read


def test_the_manifest_refuses_a_dir_that_mixes_schemes(compressed, tmp_path):
    mixed = tmp_path / "mixed"
    shutil.copytree(compressed("llama", "int8"), mixed)
    manifest = json.loads((mixed / MANIFEST_NAME).read_text())
    manifest["layers"][2]["compression"] = "int4"  # as if its file came from an int4 dir
    (mixed / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(ManifestError, match="layer layer.1 is stored compressed int4 but the manifest says "
                                            "compressed int8: one dir holds one scheme"):
        read_manifest(mixed)
    manifest["layers"][2]["compression"], manifest["compression"] = "int8", None
    (mixed / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(ManifestError, match="is stored compressed int8 but the manifest says uncompressed"):
        read_manifest(mixed)


def test_an_unknown_scheme_is_refused(checkpoint, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["prepare", str(checkpoint("llama")), str(tmp_path / "x"), "--compress", "int3"])
    assert "invalid choice: 'int3'" in capsys.readouterr().err
    with pytest.raises(Exception, match="expected one of int8, int4"):
        prepare_checkpoint(checkpoint("llama"), tmp_path / "y", compress="fp8")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_the_report_names_the_scheme(compressed, layerwise, tmp_path):
    job = write_job(tmp_path, compressed("llama", "int8"))
    assert submit(job) == 0
    report = json.loads((tmp_path / "job.job" / "report.json").read_text())
    assert report["compression"] == "int8" and report["status"] == "completed"
    plain = write_job(tmp_path, layerwise("llama"), "plain")
    assert submit(plain) == 0
    assert json.loads((tmp_path / "plain.job" / "report.json").read_text())["compression"] is None


def test_the_planner_counts_the_dequantised_copy(compressed):
    from test_planner import Spec, machine

    from flexorch.orchestrator.planner import _describe_model, make_plan

    manifest = read_manifest(compressed("llama", "int4"))
    model = _describe_model(manifest, "float32")
    # a shard slot holds the int4 file; beside it, the layer dequantised to float32
    assert model.converted and model.layer == max(e.params for e in manifest.decoder_layers) * 4
    assert model.stored_layer < model.layer / 4
    plan = make_plan(machine(), manifest, Spec(), [40])
    assert "weights int4 (flexorch prepare --compress): decoder projections dequantised per shard into " \
           "float32; scores are approximate" in plan.reasons


def _rewrite_layer(model, name: str, edit) -> None:
    """Edit a layer file's tensors and give the manifest its new checksum, as a hand-made dir would."""
    import hashlib

    from safetensors.torch import load_file, save_file

    manifest = json.loads((model / MANIFEST_NAME).read_text())
    entry = next(layer for layer in manifest["layers"] if layer["name"] == name)
    tensors = load_file(model / entry["file"])
    edit(tensors)
    save_file(tensors, model / entry["file"])
    entry["sha256"] = hashlib.sha256((model / entry["file"]).read_bytes()).hexdigest()
    entry["bytes"] = (model / entry["file"]).stat().st_size
    (model / MANIFEST_NAME).write_text(json.dumps(manifest))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_scales_that_are_not_finite_are_refused_when_read(compressed, tmp_path, capsys, bad):
    model = tmp_path / "model.layers"
    shutil.copytree(compressed("llama", "int8"), model)
    _rewrite_layer(model, "layer.2", lambda t: t["mlp.down_proj.weight.scale"].view(-1).__setitem__(5, bad))
    assert submit(write_job(tmp_path, model)) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: worker worker0 (cpu): ") and "Traceback" not in err
    assert f"{model}/layers/" in last and "layer 'layer.2': mlp.down_proj.weight.scale holds NaN or infinite " \
                                          "scales" in last
    assert not (tmp_path / "job.pkl").exists()


def test_a_manifest_claiming_another_scheme_than_its_files_hold_is_refused(compressed, tmp_path):
    model = tmp_path / "model.layers"
    shutil.copytree(compressed("llama", "int8"), model)
    manifest = json.loads((model / MANIFEST_NAME).read_text())
    for layer in manifest["layers"]:
        if layer["kind"] == "decoder":
            layer["compression"] = "int4"  # the files hold int8
    (model / MANIFEST_NAME).write_text(json.dumps({**manifest, "compression": "int4"}))
    with pytest.raises(ManifestError, match="layer layer.0 holds int8 tensors but the manifest says compressed int4"):
        read_manifest(model)
    for layer in manifest["layers"]:
        layer["compression"] = None
    (model / MANIFEST_NAME).write_text(json.dumps({**manifest, "compression": None}))
    with pytest.raises(ManifestError, match="layer layer.0 holds int8 tensors but the manifest says uncompressed"):
        read_manifest(model)
    (model / MANIFEST_NAME).write_text(json.dumps({**manifest, "compression": "fp16"}))
    with pytest.raises(ManifestError, match="compression 'fp16' is not a scheme"):
        read_manifest(model)
