"""How large a Ray cluster can grow: its autoscaler's node types, and whether a job fits them.

An autoscaling cluster (clusters/aws-gpu.yaml, clusters/kuberay.yaml) starts with no GPU worker: a
job asking for GPUs must be submitted and wait while the autoscaler adds nodes, and only a request no
node type could ever hold is refused. Ray keeps an autoscaling cluster's node types in its GCS as a
`ClusterConfig` (node groups: resources per node, max count), read with
`ray._private.state.state.get_cluster_config()` (Ray Data sizes itself from it too). Ray 2.60's own
autoscalers do not write it, so the cluster files publish it when the head starts:

    python -m orchestrator.run.autoscaler ~/ray_bootstrap_config.yaml   # cluster launcher (ray up)
    python -m orchestrator.run.autoscaler --kuberay                      # KubeRay: the pod's RayCluster

A cluster without one (a fixed set of `ray start` nodes) is as large as its live nodes.
"""
from __future__ import annotations

import argparse
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from orchestrator.spec.schema import SpecError

UNLIMITED = -1  # a node group's max_count without a bound
# The order resources are compared in when naming "the largest" node type.
MAIN_RESOURCES = ("GPU", "CPU", "memory")
KUBE_NAMESPACE_FILE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
GCS_WAIT_S = 300


@dataclass(frozen=True)
class NodeType:
    name: str
    resources: dict[str, float]  # of one node
    max_count: int  # nodes of this type at most; UNLIMITED: no bound

    def describe(self) -> str:
        shown = ", ".join(f"{key} {self.resources[key]:g}" for key in MAIN_RESOURCES if key in self.resources)
        count = "no limit" if self.max_count == UNLIMITED else f"up to {self.max_count}"
        return f"{self.name} ({shown}; {count} node{'s' if self.max_count != 1 else ''})"

    def workers(self, worker: dict[str, float]) -> float:
        """How many workers of `worker`'s shape all nodes of this type hold together (inf: no limit)."""
        per_node = min((math.floor(self.resources.get(key, 0) / amount) for key, amount in worker.items() if amount),
                       default=0)
        if per_node == 0:
            return 0
        return math.inf if self.max_count == UNLIMITED else per_node * self.max_count


def largest(node_types: list[NodeType]) -> NodeType:
    return max(node_types, key=lambda t: tuple(t.resources.get(key, 0) for key in MAIN_RESOURCES))


def plan_job(worker: dict[str, float], num_workers: int, now: dict[str, float],
             node_types: list[NodeType]) -> str | None:
    """Whether a job of `num_workers` workers of shape `worker` ({"CPU": 8, "GPU": 1}) can run on a
    cluster whose live resources are `now` and which can grow to `node_types`: None if it fits now, a
    line saying what it waits for if the autoscaler can make room; SpecError if no size of the
    cluster could ever hold it."""
    worker = {key: amount for key, amount in worker.items() if amount}
    shape = ", ".join(f"{amount:g} {key}" for key, amount in worker.items())
    holders = [t for t in node_types if t.workers(worker) > 0]
    if not holders:
        raise SpecError(f"resources: one worker needs {shape}, more than any node of the cluster can have; the largest "
                        f"node type is {largest(node_types).describe() if node_types else 'none'}; lower "
                        "resources.cpus_per_worker / gpus_per_worker or add a larger node type to the cluster")
    reach = sum(t.workers(worker) for t in holders)
    if reach < num_workers:
        raise SpecError(f"resources: {num_workers} workers x ({shape}) but the cluster holds at most {reach:g} such "
                        f"workers ({'; '.join(t.describe() for t in holders)}); lower resources.num_workers or raise "
                        "the node types' max_workers")
    short = [key for key, amount in worker.items() if amount * num_workers > now.get(key, 0)]
    if not short:
        return None
    key = "GPU" if "GPU" in short else short[0]
    growth = ", ".join(f"up to {t.resources[key] * t.max_count:g} on node type {t.name}" if t.max_count != UNLIMITED
                       else f"no limit on node type {t.name}" for t in holders)
    return (f"waiting for the autoscaler: {num_workers} worker{'s' if num_workers > 1 else ''} x {worker[key]:g} "
            f"{key}, cluster has {now.get(key, 0):g} {key} now, {growth}")


# ------------------------------------------------------------------------------------------------
# the cluster's node types (driver side, connected to Ray)


def cluster_node_types() -> list[NodeType]:
    """The node types the cluster's GCS publishes, else each live node as a type of its own."""
    import ray
    from ray._private.state import state

    config = state.get_cluster_config()
    if config is not None and config.node_group_configs:
        return [NodeType(group.name, {key: float(value) for key, value in group.resources.items()}, group.max_count)
                for group in config.node_group_configs]
    return [NodeType(node["NodeManagerAddress"], dict(node["Resources"]), 1) for node in ray.nodes() if node["Alive"]]


# ------------------------------------------------------------------------------------------------
# publishing the node types (on the head, when the cluster starts)


def launcher_node_types(config: dict[str, Any]) -> list[NodeType]:
    """The node types of an autoscaling config (the cluster launcher's YAML, or the one KubeRay's
    autoscaler builds): the head once, each worker type up to its max_workers."""
    head = config.get("head_node_type")
    types = []
    for name, node_type in config["available_node_types"].items():
        count = 1 if name == head else node_type.get("max_workers", config.get("max_workers", 0))
        types.append(NodeType(name, {key: float(value) for key, value in node_type.get("resources", {}).items()},
                              int(count)))
    return types


def kuberay_node_types(manifest: dict[str, Any]) -> list[NodeType]:
    """The node types of a KubeRay `RayCluster` manifest, converted as Ray's KubeRay autoscaler does."""
    from ray.autoscaler._private.kuberay.autoscaling_config import (_HEAD_GROUP_NAME,
                                                                    _generate_available_node_types_from_ray_cr_spec)

    return launcher_node_types({"available_node_types": _generate_available_node_types_from_ray_cr_spec(manifest["spec"]),
                                "head_node_type": _HEAD_GROUP_NAME})


def cluster_config(node_types: list[NodeType]) -> Any:
    """Ray's `ClusterConfig` message of these node types (integer resource amounts, as Ray keeps them)."""
    from ray.core.generated.autoscaler_pb2 import ClusterConfig, NodeGroupConfig

    groups = [NodeGroupConfig(name=t.name, resources={key: int(value) for key, value in t.resources.items()},
                              max_count=t.max_count) for t in node_types]
    return ClusterConfig(node_group_configs=groups)


def publish(node_types: list[NodeType], gcs_address: str, *, wait_s: float = GCS_WAIT_S) -> None:
    """Write the node types into the cluster's GCS (where `cluster_node_types` reads them); waits up to
    `wait_s` for the GCS to answer (the head may still be starting)."""
    from ray._raylet import GcsClient

    serialized = cluster_config(node_types).SerializeToString()
    deadline = time.monotonic() + wait_s
    while True:
        try:
            GcsClient(address=gcs_address).report_cluster_config(serialized)
            return
        except Exception:  # not up yet (Ray raises several kinds here)
            if time.monotonic() > deadline:
                raise
            time.sleep(2)


def _kuberay_config() -> dict[str, Any]:
    """The autoscaling config of the RayCluster this pod belongs to, read from the Kubernetes API as
    KubeRay's autoscaler reads it (the pod's service account must be allowed to get rayclusters)."""
    from ray.autoscaler._private.kuberay.autoscaling_config import AutoscalingConfigProducer

    return AutoscalingConfigProducer(os.environ["RAY_CLUSTER_NAME"], KUBE_NAMESPACE_FILE.read_text().strip())()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m orchestrator.run.autoscaler",
                                     description="publish the cluster's node types in its GCS (run on the head)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("config", nargs="?", type=Path,
                        help="the cluster launcher's config (~/ray_bootstrap_config.yaml) or a RayCluster manifest")
    source.add_argument("--kuberay", action="store_true", help="read this pod's RayCluster from the Kubernetes API")
    parser.add_argument("--address", default="127.0.0.1:6379", help="the GCS (default 127.0.0.1:6379)")
    args = parser.parse_args(argv)
    if args.kuberay:
        node_types = launcher_node_types(_kuberay_config())
    else:
        config = yaml.safe_load(args.config.expanduser().read_text())
        node_types = kuberay_node_types(config) if config.get("kind") == "RayCluster" else launcher_node_types(config)
    publish(node_types, args.address)
    print("published node types: " + "; ".join(t.describe() for t in node_types), flush=True)


if __name__ == "__main__":
    main()
