"""executor: ray end to end, on a two-node Ray cluster on this machine (one CPU each), against the
local executor: the same outputs bit for bit (scores, and a generation job's text), each worker
reported on its node, a killed actor failing the job at once naming it, and resume.

Hermetic: the cluster is started inside a private network namespace (`unshare -n`, then `ip link
set lo up`), so every Ray process binds to 127.0.0.1 and nothing is reachable from outside. The one
test run in the ordinary suite re-runs this module's `ray_cluster` tests in such a namespace;
it skips, saying why, where Ray, unshare or namespaces are not available. One cluster is shared by
the module's tests: Ray takes seconds to start.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from rich.console import Console

from flexorch.orchestrator import controller, planner
from flexorch.contract.messages import WorkerHooks
from flexorch.contract.parts import read_part_indices

from test_controller import PROMPTS, write_job, write_prompts

NETNS_ENV = "FLEXORCH_TEST_IN_NETNS"
IN_NETNS = os.environ.get(NETNS_ENV) == "1"


def inside(test):
    """A test of the cluster: selected by its marker in the namespace, skipped in the ordinary run."""
    skip = pytest.mark.skipif(not IN_NETNS, reason="runs in a private network namespace, started by "
                                                   "test_ray_cluster_tests_pass_in_a_private_network_namespace")
    return pytest.mark.ray_cluster(skip(test))


BATCH_TOKENS = 256  # the same batches under both executors
# A generation job (score kind generate): per-prompt limits, and a stop string the tiny llama's greedy
# text reaches (" A", its 6th token after "0 1 2 3"), so sequences end both ways.
GENERATE_PROMPTS = [{"prefix": "The quick brown fox", "max_new_tokens": 6},
                    {"prefix": "Question: What is the capital of France? Answer:", "max_new_tokens": 3},
                    {"prefix": "0 1 2 3", "stop": [" A"]},
                    {"prefix": "Once upon a time"}]
GENERATE = {"kind": "generate", "max_new_tokens": 8, "logprobs": True}


def _namespace_unavailable() -> str | None:
    """Why this machine cannot run the cluster tests, or None."""
    if importlib.util.find_spec("ray") is None:  # not imported here: the local tests run without ray loaded
        return "ray is not installed (pip install -e '.[ray]')"
    missing = [tool for tool in ("unshare", "ip") if shutil.which(tool) is None]
    if missing:
        return f"{' and '.join(missing)} not found (util-linux, iproute2)"
    probe = subprocess.run(["unshare", "-n", "ip", "link", "set", "lo", "up"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"network namespaces are not permitted here: {probe.stderr.strip()}"
    return None


@pytest.mark.skipif(IN_NETNS, reason="this is the run inside the namespace")
def test_ray_cluster_tests_pass_in_a_private_network_namespace():
    why = _namespace_unavailable()
    if why:
        pytest.skip(why)
    command = ["unshare", "-n", "sh", "-c", 'ip link set lo up && exec "$@"', "sh",
               sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "ray_cluster", __file__]
    result = subprocess.run(command, env={**os.environ, NETNS_ENV: "1"}, capture_output=True, text=True,
                            timeout=540, cwd=Path(__file__).parent.parent)
    assert result.returncode == 0, result.stdout[-8000:] + result.stderr[-4000:]
    assert " passed" in result.stdout and "skipped" not in result.stdout, result.stdout[-2000:]


def test_ray_not_installed_is_exit_2_saying_how_to_install(tmp_path, layerwise):
    job = write_job(tmp_path, layerwise("llama"), executor="ray", devices="auto")
    hide_ray = ("import sys; sys.modules['ray'] = None; from flexorch.orchestrator.cli import main; "
                f"sys.exit(main(['submit', {str(job)!r}]))")
    result = subprocess.run([sys.executable, "-c", hide_ray], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: {job}: executor: ray needs Ray, which is not installed: pip install 'ray[default]>=2.9'"]
    assert not (tmp_path / "job.pkl").exists()


@pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="ray is not installed")
def test_no_cluster_to_join_is_exit_2_in_one_line(tmp_path, layerwise):
    job = write_job(tmp_path, layerwise("llama"), executor="ray", devices="auto")
    # An empty Ray temp dir: no cluster started on this machine to find (and nothing is started).
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"RAY_TMPDIR": str(tmp_path / "ray")}
    result = subprocess.run([sys.executable, "-m", "flexorch.orchestrator.cli", "plan", str(job)], env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert line.startswith("error: executor ray: cannot connect to a Ray cluster at ray_address auto (")
    assert line.endswith("start one with `ray start --head` or set ray_address")


# -- inside the namespace ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cluster():
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    yield cluster
    import ray

    ray.shutdown()
    cluster.shutdown()


@pytest.fixture(scope="module")
def rounds_of_one_prompt():
    """One prompt per round, so a worker can be killed between rounds (as in test_resume)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(planner.search, "ROUND_TARGET_SECONDS", 0.0)
        mp.setattr(planner.search, "ROUND_MIN_COMPUTE_OVER_READ", 0.0)
        yield


@pytest.fixture(scope="module")
def local_run(tmp_path_factory, layerwise, rounds_of_one_prompt):
    """The local executor's output bytes and report: two CPU workers on this machine."""
    tmp = tmp_path_factory.mktemp("local")
    job = write_job(tmp, layerwise("llama"), devices=["cpu", "cpu"], batch_tokens=BATCH_TOKENS)
    assert controller.submit(job, Console(stderr=True)) == 0
    return (tmp / "job.pkl").read_bytes(), json.loads((tmp / "job.job" / "report.json").read_text())


@pytest.fixture(scope="module")
def local_generation(tmp_path_factory, layerwise, rounds_of_one_prompt):
    """The local executor's .jsonl of the generation job: two CPU workers on this machine."""
    tmp = tmp_path_factory.mktemp("local-generate")
    write_prompts(tmp / "prompts.jsonl", GENERATE_PROMPTS)
    job = write_job(tmp, layerwise("llama"), devices=["cpu", "cpu"], batch_tokens=BATCH_TOKENS,
                    output=str(tmp / "job.jsonl"), score=GENERATE)
    assert controller.submit(job, Console(stderr=True)) == 0
    return (tmp / "job.jsonl").read_bytes()


def _ray_job(tmp_path, cluster, layerwise):
    return write_job(tmp_path, layerwise("llama"), devices=["node0:cpu", "node1:cpu"], batch_tokens=BATCH_TOKENS,
                     executor="ray", ray_address=cluster.address)


def _report(tmp_path) -> dict:
    return json.loads((tmp_path / "job.job" / "report.json").read_text())


@inside
def test_workers_on_two_nodes_give_the_local_executors_output_bit_for_bit(tmp_path, cluster, layerwise, local_run):
    local_output, local_report = local_run
    assert controller.submit(_ray_job(tmp_path, cluster, layerwise), Console(stderr=True)) == 0
    assert (tmp_path / "job.pkl").read_bytes() == local_output
    report = _report(tmp_path)
    assert [(w["device"], w["node"], w["status"]) for w in report["workers"]] == [
        ("node0:cpu", "node0 (127.0.0.1)", "finished"), ("node1:cpu", "node1 (127.0.0.1)", "finished")]
    # Where Ray itself says each worker's actor ran: worker0 on the head, worker1 on the other node.
    import ray
    from ray.util.state import list_actors

    node_of_pid = {a.pid: a.node_id for a in list_actors(filters=[("class_name", "=", "WorkerActor")], detail=True)}
    head = {n["NodeID"]: "node:__internal_head__" in n["Resources"] for n in ray.nodes()}
    assert [head[node_of_pid[w["pid"]]] for w in report["workers"]] == [True, False]
    # The same batches: each worker's slice, rounds and settings (but its device's name) are the local run's.
    for ray_worker, local_worker in zip(report["plan"]["workers"], local_report["plan"]["workers"]):
        assert ray_worker["rounds"] == local_worker["rounds"]
        assert {**ray_worker["settings"], "device": "cpu"} == local_worker["settings"]


@inside
def test_a_generation_job_on_two_nodes_gives_the_local_executors_text(tmp_path, cluster, layerwise, local_generation):
    """Each round's ids, stop reasons and log-probs travel back in RoundResults; the controller
    writes the parts and decodes the text, as for a local worker."""
    write_prompts(tmp_path / "prompts.jsonl", GENERATE_PROMPTS)
    job = write_job(tmp_path, layerwise("llama"), devices=["node0:cpu", "node1:cpu"], batch_tokens=BATCH_TOKENS,
                    executor="ray", ray_address=cluster.address, output=str(tmp_path / "job.jsonl"), score=GENERATE)
    assert controller.submit(job, Console(stderr=True)) == 0
    assert (tmp_path / "job.jsonl").read_bytes() == local_generation
    lines = [json.loads(line) for line in local_generation.decode().splitlines()]
    assert [line["stop_reason"] for line in lines] == [["length"], ["length"], ["stop"], ["length"]]
    assert [(len(line["generated_ids"][0]), len(line["logprobs"][0])) for line in lines] == [(6, 6), (3, 3), (6, 6), (8, 8)]
    assert [w["status"] for w in _report(tmp_path)["workers"]] == ["finished", "finished"]


@inside
def test_killed_actor_fails_the_job_naming_it_and_resubmit_resumes(tmp_path, cluster, layerwise, local_run, capsys):
    job = _ray_job(tmp_path, cluster, layerwise)
    # worker1's process dies (SIGKILL, as from the OOM killer) after one committed round; worker0
    # would wait for ever after one round, so the job ends only because the death was noticed and
    # every actor stopped.
    faults = {"worker0": WorkerHooks(hang_after_rounds=1), "worker1": WorkerHooks(sigkill_after_rounds=1)}
    assert controller.submit(job, Console(stderr=True), faults=faults) == 1
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("error: worker worker1 (node1:cpu, pid ") and "Ray actor died on node1 (127.0.0.1)" in error
    assert not (tmp_path / "job.pkl").exists()
    assert [w["status"] for w in _report(tmp_path)["workers"]] == ["stopped", "failed"]
    parts = tmp_path / "job.job" / "parts"
    # worker1's one round was committed before it went on (and died): the actor waits for that.
    assert [len(read_part_indices(p)) for p in parts.glob("part-worker1-*.npz")] == [1]
    committed = sum(len(read_part_indices(p)) for p in parts.glob("*.npz"))
    assert committed in (1, 2)  # worker0 may not have finished its first round when worker1 died

    assert controller.submit(job, Console(stderr=True)) == 0
    report = _report(tmp_path)
    assert report["prompts_reused"] == committed and report["prompts_computed"] == len(PROMPTS) - committed
    assert (tmp_path / "job.pkl").read_bytes() == local_run[0]


@inside
def test_hung_actor_is_stopped_after_worker_timeout_naming_it(tmp_path, cluster, layerwise, capsys):
    job = write_job(tmp_path, layerwise("llama"), devices=["node0:cpu", "node1:cpu"], batch_tokens=BATCH_TOKENS,
                    executor="ray", ray_address=cluster.address, worker_timeout=5)
    faults = {"worker1": WorkerHooks(hang_after_rounds=1)}
    assert controller.submit(job, Console(stderr=True), faults=faults) == 1
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("error: worker worker1 (node1:cpu, pid ")
    assert error.endswith("made no progress for 5 s (worker_timeout); stopped")
    assert not (tmp_path / "job.pkl").exists()


@inside
def test_a_lost_node_fails_the_job_at_once_naming_it(tmp_path, cluster, layerwise, capsys):
    """Last in the module: it takes node1 out of the shared cluster."""
    job = _ray_job(tmp_path, cluster, layerwise)
    # Both workers stop after a round and wait for ever: only the lost node can end the job.
    faults = {name: WorkerHooks(hang_after_rounds=1) for name in ("worker0", "worker1")}
    node1 = next(n for n in cluster.list_all_nodes() if n is not cluster.head_node)
    lost_at = []

    def remove_node1_once_it_committed_a_round():
        parts, deadline = tmp_path / "job.job" / "parts", time.monotonic() + 300
        while not list(parts.glob("part-worker1-*.npz")) and time.monotonic() < deadline:
            time.sleep(0.1)  # the test watching the disk; the controller itself never polls
        lost_at.append(time.monotonic())
        cluster.remove_node(node1, allow_graceful=False)

    threading.Thread(target=remove_node1_once_it_committed_a_round, daemon=True).start()
    assert controller.submit(job, Console(stderr=True), faults=faults) == 1
    assert time.monotonic() - lost_at[0] < 30  # Ray's word on the lost actor, then every actor stopped
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("error: worker worker1 (node1:cpu, pid ") and "Ray actor died on node1 (127.0.0.1)" in error
    assert not (tmp_path / "job.pkl").exists()
