"""Hostile input through the real entry point (`cli.main`): job files, prompts, model dirs, paths
and filesystems a careless user or an attacker would hand over.

Every case must end with its exit status (2 bad input, 1 a failure while running), one line on
stderr naming the culprit (one per problem where a file has several, at most a dozen), no traceback, no output file, and every file the user had
byte-identical afterwards. Filesystem cases mount a small tmpfs (root only; skipped otherwise).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pickle
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from flexorch.orchestrator import cli

from test_controller import PROMPTS, write_job


@dataclass
class Ctx:
    tmp: Path
    shared_model: Path

    def model(self) -> Path:
        """A private copy of the tiny model, for cases that damage it."""
        copy = self.tmp / "model.layers"
        if not copy.exists():
            shutil.copytree(self.shared_model, copy)
        return copy

    def job(self, **keys) -> Path:
        keys.setdefault("model", str(self.shared_model))
        model = keys.pop("model")
        return write_job(self.tmp, model, **keys)

    def prompts_pkl(self, data: bytes) -> str:
        (self.tmp / "prompts.pkl").write_bytes(data)
        return str(self.tmp / "prompts.pkl")

    def prompts_line(self, line: str) -> None:
        (self.tmp / "prompts.jsonl").write_text(json.dumps(PROMPTS[0]) + "\n" + line + "\n")

    def manifest(self, edit: Callable[[dict], None]) -> Path:
        path = self.model() / "flexorch_manifest.json"
        data = json.loads(path.read_text())
        edit(data)
        path.write_text(json.dumps(data))
        return self.model()


def _yaml_job(ctx: Ctx, text: str) -> Path:
    job = ctx.job()
    job.write_text(job.read_text() + text)
    return job


def _pickle_build_on_string() -> bytes:
    return b"\x80\x04" + pickle.dumps("abc", protocol=4)[2:-1] + b"}b."


def _pickle_shared_huge_string() -> bytes:
    # One 1.6 MB string referenced 2,000 times: 3.2 GB of text for a tokenizer, 1.6 MB of pickle.
    big = "x " * 800_000
    return pickle.dumps([(big, (" a",))] * 2000, protocol=4)


def _recursive_list_pickle() -> bytes:
    loop: list = []
    loop.append(loop)
    return pickle.dumps([("p", loop)], protocol=4)


def _drop_decoder(data: dict) -> None:
    del data["layers"][2]


def _file_of(index: int, value) -> Callable[[dict], None]:
    def edit(data: dict) -> None:
        data["layers"][index]["file"] = value
    return edit


def _symlink_out(ctx: Ctx) -> Path:
    model = ctx.model()
    entry = json.loads((model / "flexorch_manifest.json").read_text())["layers"][1]
    outside = ctx.tmp / "elsewhere.safetensors"
    shutil.copy(model / entry["file"], outside)
    (model / entry["file"]).unlink()
    (model / entry["file"]).symlink_to(outside)
    return ctx.job(model=str(model))


def _config_edit(ctx: Ctx, **changes) -> Path:
    path = ctx.model() / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
    return ctx.job(model=str(ctx.model()))


def _hard_link_output(ctx: Ctx) -> Path:
    job = ctx.job()
    os.link(ctx.tmp / "prompts.jsonl", ctx.tmp / "linked.jsonl")
    return ctx.job(output=str(ctx.tmp / "linked.jsonl"))


def _updated_is_prompts(ctx: Ctx) -> Path:
    ctx.job()
    (ctx.tmp / "prompts.jsonl").rename(ctx.tmp / "x_updated.jsonl")
    return ctx.job(prompts=str(ctx.tmp / "x_updated.jsonl"), output=str(ctx.tmp / "x.pkl"), generate_tokens=2)


@dataclass(frozen=True)
class Case:
    name: str
    make: Callable[[Ctx], Path]  # returns the job file
    needles: tuple[str, ...]


CASES = [
    # -- the job file ------------------------------------------------------------------------------
    Case("yaml nested 5000 deep", lambda c: _yaml_job(c, "limits: " + "[" * 5000 + "]" * 5000 + "\n"),
         ("job.yaml", ("nested too deeply", "nesting depth"))),  # PyYAML's own check, or libyaml's
    Case("yaml nested 100 deep", lambda c: _yaml_job(c, "limits: " + "[" * 100 + "]" * 100 + "\n"),
         ("job.yaml", "nested more than 64")),
    Case("yaml int of 5000 digits", lambda c: _yaml_job(c, "batch_tokens: " + "9" * 5000 + "\n"), ("job.yaml",)),
    Case("yaml int of 70 bits", lambda c: c.job(batch_tokens=2**70), ("job.yaml", "71 bits")),
    Case("count too large for C", lambda c: c.job(layers_per_shard=2**40), ("layers_per_shard", "at most")),
    Case("timeout of 1e300 s", lambda c: c.job(worker_timeout=1e300), ("worker_timeout", "at most")),
    Case("size of 10^20 TB", lambda c: c.job(limits={"ram": "100000000000000000000TB"}), ("limits.ram",)),
    Case("yaml lone surrogate", lambda c: _yaml_job(c, 'disk_folder: "\\ud800"\n'),
         ("job.yaml", ("surrogate", "invalid Unicode character escape"))),
    Case("devices: a list of 20,000 bad items", lambda c: c.job(devices=["x"] * 20_000),
         ("job.yaml", "devices: 'x' is not a device", "and 19988 more problems")),
    Case("yaml aliases 10^9 strings deep", lambda c: _yaml_job(c, "".join(
        f"x{i}: &a{i} [" + ", ".join([f"*a{i - 1}" if i else '"lol"'] * 10) + "]\n" for i in range(9))
        + "limits: *a8\n"), ("job.yaml", "limits: expected a mapping")),
    Case("job file of 2 MB", lambda c: _yaml_job(c, "#" + "x" * (2 << 20) + "\n"), ("job.yaml", "bytes")),
    # -- prompts -----------------------------------------------------------------------------------
    Case("json line nested 100000 deep", lambda c: (c.prompts_line("[" * 100_000 + "]" * 100_000), c.job())[1],
         ("prompts.jsonl", "line 2", "nested")),
    Case("json int of 5000 digits", lambda c: (c.prompts_line('{"prefix": "a", "suffixes": [" b"], "id": '
                                                            + "7" * 5000 + "}"), c.job())[1],
         ("prompts.jsonl", "line 2")),
    Case("json lone surrogate", lambda c: (c.prompts_line('{"prefix": "\\ud800", "suffixes": [" b"]}'), c.job())[1],
         ("prompts.jsonl", "line 2", "surrogate")),
    Case("pickle BUILD on a string", lambda c: c.job(prompts=c.prompts_pkl(_pickle_build_on_string())),
         ("prompts.pkl", "refused the pickle opcode BUILD")),
    Case("pickle memo index of 500 million", lambda c: c.job(prompts=c.prompts_pkl(
        b"\x80\x04]\x94(\x8c\x01a\x94r" + (544825888).to_bytes(4, "little") + b"e.")), ("prompts.pkl", "memo index")),
    Case("pickle shared 1.6 MB string x2000", lambda c: c.job(prompts=c.prompts_pkl(_pickle_shared_huge_string())),
         ("prompts.pkl", "prompt index 0", "characters")),
    Case("pickle int of 200 bits", lambda c: c.job(prompts=c.prompts_pkl(pickle.dumps(
        [{"prefix": "a", "suffixes": [" b"], "id": 2**200}]))), ("prompts.pkl", "201 bits")),
    Case("pickle holding itself", lambda c: c.job(prompts=c.prompts_pkl(_recursive_list_pickle())),
         ("prompts.pkl", "suffixes[0]")),
    # -- paths ---------------------------------------------------------------------------------------
    Case("output is prompts via ..", lambda c: (c.tmp.joinpath("sub").mkdir(), c.job(
        output=str(c.tmp / "sub" / ".." / "prompts.jsonl")))[1], ("output", "is the prompts file")),
    Case("output is prompts via symlink", lambda c: (c.job(), c.tmp.joinpath("link.jsonl").symlink_to(
        c.tmp / "prompts.jsonl"), c.job(output=str(c.tmp / "link.jsonl")))[2], ("output", "is the prompts file")),
    Case("output is prompts via hard link", _hard_link_output, ("output", "is the prompts file")),
    Case("_updated output is the prompts", _updated_is_prompts, ("_updated", "is the prompts file")),
    Case("job_dir inside the model", lambda c: c.job(model=str(c.model()), job_dir=str(c.model() / "run")),
         ("job_dir", "inside the model dir")),
    Case("job_dir is the model", lambda c: c.job(model=str(c.model()), job_dir=str(c.model())),
         ("job_dir", "inside the model dir")),
    Case("output inside the model", lambda c: c.job(model=str(c.model()), output=str(c.model() / "s.pkl")),
         ("inside the model dir", "output:", "job_dir:")),  # job_dir defaults next to the output
    # -- the model dir -------------------------------------------------------------------------------
    Case("manifest lost a decoder", lambda c: c.job(model=str(c.manifest(_drop_decoder))),
         ("flexorch_manifest.json", "layer")),
    Case("manifest with no layers", lambda c: c.job(model=str(c.manifest(lambda d: d.update(layers=[])))),
         ("flexorch_manifest.json", "non-empty list")),
    Case("manifest layers not objects", lambda c: c.job(model=str(c.manifest(lambda d: d.update(layers=["x"])))),
         ("flexorch_manifest.json", "non-empty list of objects")),
    Case("manifest count as string", lambda c: c.job(model=str(c.manifest(lambda d: d.update(hidden_size="64")))),
         ("flexorch_manifest.json", "hidden_size")),
    Case("manifest file ../", lambda c: c.job(model=str(c.manifest(_file_of(1, "../prompts.jsonl")))),
         ("flexorch_manifest.json", "inside the model dir")),
    Case("manifest file absolute", lambda c: c.job(model=str(c.manifest(_file_of(1, "/etc/passwd")))),
         ("flexorch_manifest.json", "inside the model dir")),
    Case("manifest file a symlink out", _symlink_out, ("flexorch_manifest.json", "leads out of the model dir")),
    Case("manifest nested 900 deep", lambda c: c.job(model=str(c.manifest(
        lambda d: d.update(config=json.loads("[" * 900 + "]" * 900))))), ("flexorch_manifest.json", "nested")),
    Case("config.json changed layer count", lambda c: _config_edit(c, num_hidden_layers=99),
         ("config.json", "num_hidden_layers 99")),
    Case("config.json declares 10^9 layers", lambda c: (c.manifest(lambda d: d.update(num_layers=10**9)),
                                                         _config_edit(c, num_hidden_layers=10**9))[1],
         ("flexorch_manifest.json", "1000000003")),
    Case("config.json changed vocab", lambda c: _config_edit(c, vocab_size=7), ("config.json", "vocab_size 7")),
]


def _snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and not p.is_symlink()}


def _one_line_error(status: int, expected: int, err: str, needles) -> None:
    """One line naming the culprit (needles[0]); several problems of one file give one line each, at
    most a dozen and a count, as every reader lists them."""
    assert status == expected, err
    lines = err.strip().splitlines()
    assert lines[0].startswith("error: ") and len(lines) <= 13, err
    assert all(needles[0] in line for line in lines), err
    assert "Traceback" not in err
    for needle in needles:  # a tuple: any of its words (libyaml and PyYAML word some errors apart)
        assert any(word in err for word in (needle if isinstance(needle, tuple) else (needle,))), err


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_hostile_input_is_one_line_exit_2_and_changes_nothing(case, tmp_path, layerwise, capsys):
    ctx = Ctx(tmp_path, layerwise("llama"))
    job = case.make(ctx)
    before = _snapshot(tmp_path)
    status = cli.main(["submit", str(job)])
    _one_line_error(status, 2, capsys.readouterr().err, case.needles)
    assert _snapshot(tmp_path) == before  # byte-identical, and nothing written (no output, no job_dir)


@contextlib.contextmanager
def _tmpfs(where: Path, size: str, read_only: bool = False):
    where.mkdir()
    options = f"size={size}" + (",ro" if read_only else "")
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)],
                                           capture_output=True).returncode != 0:
        pytest.skip("needs root and mount to make a small filesystem")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def test_read_only_output_folder_is_refused_before_work(tmp_path, layerwise, capsys):
    with _tmpfs(tmp_path / "ro", "1m", read_only=True) as ro:
        job = write_job(tmp_path, layerwise("llama"), output=str(ro / "out" / "s.pkl"),
                        job_dir=str(tmp_path / "s.job"))
        before = _snapshot(tmp_path)
        status = cli.main(["submit", str(job)])
        _one_line_error(status, 2, capsys.readouterr().err, ("output", str(ro), "read-only"))
        assert _snapshot(tmp_path) == before


def test_disk_filling_while_the_output_is_written_is_one_line_exit_1(tmp_path, layerwise, capsys):
    with _tmpfs(tmp_path / "small", "16k") as small:
        job = write_job(tmp_path, layerwise("llama"), output=str(small / "s.pkl"), job_dir=str(tmp_path / "s.job"))
        status = cli.main(["submit", str(job)])
        err = capsys.readouterr().err
        errors = [line for line in err.splitlines() if line.startswith("error")]
        assert status == 1 and len(errors) == 1 and "Traceback" not in err, err
        assert "No space left" in errors[0] and str(small) in errors[0]
        assert not list(small.iterdir())  # neither the output nor its temp file


def test_disk_filling_while_a_checkpoint_is_prepared_is_one_line_exit_1(tmp_path, checkpoint, capsys):
    with _tmpfs(tmp_path / "small", "200k") as small:
        status = cli.main(["prepare", str(checkpoint("llama")), str(small / "m.layers")])
        err = capsys.readouterr().err.strip()  # the progress bar leaves a blank line
        assert status == 1 and err.startswith("error: No space left on device (") and len(err.splitlines()) == 1, err
        assert not list(small.iterdir())  # the half-written dir is gone


def _moe_layer(edit: Callable[[dict], None]) -> Callable[[dict], None]:
    """Edit the first MoE decoder entry of a manifest."""
    def apply(data: dict) -> None:
        edit(next(layer for layer in data["layers"] if layer.get("experts")))
    return apply


# The tiny Mixtral's layers hold 4 experts.
MOE_LIES = {
    "twice the experts": _moe_layer(lambda layer: layer.update(experts=8)),
    "half the experts": _moe_layer(lambda layer: layer.update(experts=2, expert_bytes=2 * layer["expert_bytes"])),
    "no expert tensors": _moe_layer(lambda layer: layer.update(expert_tensors=[])),
    "no experts, expert tensors kept": _moe_layer(lambda layer: layer.update(experts=0)),
    "an expert tensor not in the file": _moe_layer(lambda layer: layer.update(
        expert_tensors=layer["expert_tensors"][:1] + ["mlp.experts.up_proj"])),
    "experts of 0 bytes": _moe_layer(lambda layer: layer.update(expert_bytes=0)),
    "experts larger than the file": _moe_layer(lambda layer: layer.update(expert_bytes=layer["bytes"])),
}


@pytest.mark.parametrize("lie", MOE_LIES)
def test_a_moe_manifest_whose_expert_fields_lie_is_refused_by_plan(lie, tmp_path, layerwise, capsys):
    ctx = Ctx(tmp_path, layerwise("mixtral"))
    job = ctx.job(model=str(ctx.manifest(MOE_LIES[lie])))
    status = cli.main(["plan", str(job)])
    _one_line_error(status, 2, capsys.readouterr().err, ("flexorch_manifest.json", "layer 'layer.0'"))


def test_the_tiny_moe_manifest_passes_the_expert_checks(tmp_path, layerwise, capsys):
    ctx = Ctx(tmp_path, layerwise("mixtral"))
    assert cli.main(["plan", str(ctx.job(model=str(ctx.model())))]) == 0
