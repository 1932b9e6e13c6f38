"""A Ray cluster as the planner sees it (executor: ray): connect, probe every node with a small Ray
task, and check on every node that the model dir is the one the controller planned from.

Only the ray path imports this module (it imports ray: the `ray` extra).

Data: the model dir must be readable at the same path on every node (a shared filesystem, or the
same copy made on each). `check_model` compares each node's manifest with the controller's and
each layer file's size with the manifest; every worker then checks each layer file's sha256 against
the manifest the first time it reads it, as on one machine, so a node holding other bytes stops
the job (exit 2) naming the file.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import ray
from ray.exceptions import RayError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from flexorch.contract.errors import UserError
from flexorch.contract.manifest import MANIFEST_NAME, read_manifest
from flexorch.orchestrator.hardware import Hardware, Node, probe

# Ray gives a GPU actor its GPU by setting CUDA_VISIBLE_DEVICES to it; flexorch runs each worker on
# the GPU the plan chose (cuda:N as the node's NVML numbers them), so Ray only counts GPUs. Set for
# the Ray job and again on each probe and actor (a driver that was connected before may lack it), so
# the probe sees a node's GPUs as its workers will.
RUNTIME_ENV = {"env_vars": {"RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES": "1", "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}}
_HEAD_RESOURCE = "node:__internal_head__"


def connect(address: str) -> None:
    """Join the cluster at `address` ("auto": RAY_ADDRESS, else a cluster started on this machine).
    Worker output stays in the job's logs (log_to_driver off): it would break the live display."""
    if ray.is_initialized():  # a driver already connected (the Python API in a Ray session, tests) keeps it
        return
    try:
        ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING, runtime_env=RUNTIME_ENV)
    except (ConnectionError, TimeoutError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"executor ray: cannot connect to a Ray cluster at ray_address {address} ({first}); "
                        "start one with `ray start --head` or set ray_address") from None


def probe_nodes(disk_path: Path) -> tuple[Node, ...]:
    """Every live node, probed where it runs (GPUs by NVML, RAM, cores, free disk at `disk_path`),
    named node0 (the head), node1, ... by address."""
    alive = sorted((n for n in ray.nodes() if n["Alive"]),
                   key=lambda n: (_HEAD_RESOURCE not in n["Resources"], n["NodeManagerAddress"], n["NodeID"]))
    probes = _get([_on(n["NodeID"], probe).remote(disk_path) for n in alive], "probing the nodes")
    return tuple(Node(f"node{i}", n["NodeManagerAddress"], n["NodeID"], schedulable(hw, n["Resources"]))
                 for i, (n, hw) in enumerate(zip(alive, probes)))


def schedulable(hardware: Hardware, resources: dict) -> Hardware:
    """What Ray may schedule on the node: `ray start --num-gpus/--num-cpus` can offer less than the
    machine has, and the planner must not split more cores or GPUs than that."""
    gpus = hardware.gpus[: int(resources.get("GPU", 0))]
    cores = max(1, min(hardware.cpu_count, int(resources.get("CPU", hardware.cpu_count))))
    return replace(hardware, gpus=gpus, cpu_count=cores)


def check_model(nodes: Sequence[Node], model_dir: Path) -> None:
    """Raise UserError naming each node where `model_dir` is not the controller's model."""
    manifest = (Path(model_dir) / MANIFEST_NAME).read_bytes()
    digest = hashlib.sha256(manifest).hexdigest()
    checks = _get([_on(node.node_id, model_problem).remote(str(model_dir), digest) for node in nodes],
                  "checking the model on the nodes")
    problems = [f"{node.name} ({node.address}): {problem}"
                for node, problem in zip(nodes, checks) if problem is not None]
    if problems:
        raise UserError("executor ray: the model dir must be readable at the same path on every node "
                        "(a shared filesystem): " + "; ".join(problems))


def model_problem(model_dir: str, manifest_sha256: str) -> str | None:
    """Run on a node: None when `model_dir` there holds the manifest with that digest and a dir that
    agrees with it (read_manifest checks every layer file's presence, place and size), else what is
    wrong."""
    path = Path(model_dir) / MANIFEST_NAME
    try:
        data = path.read_bytes()
    except OSError as exc:
        return f"cannot read {path} ({exc.strerror})"
    if hashlib.sha256(data).hexdigest() != manifest_sha256:
        return f"{path} differs from the controller's (another model, or another `flexorch prepare` of it)"
    try:
        read_manifest(model_dir)
    except UserError as exc:
        return str(exc)
    return None


def _get(refs: list, doing: str) -> list:
    """ray.get, with a node lost meanwhile (the tasks are pinned to it) as one line, before any work."""
    try:
        return ray.get(refs)
    except RayError as exc:
        first = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        raise UserError(f"executor ray: {doing} failed (did a node leave the cluster?): {first}") from None


def _on(node_id: str, function):
    """`function` as a Ray task pinned to one node; num_cpus 0 so that it runs beside busy workers."""
    strategy = NodeAffinitySchedulingStrategy(node_id, soft=False)
    return ray.remote(function).options(num_cpus=0, scheduling_strategy=strategy, runtime_env=RUNTIME_ENV)
