"""Jobs on autoscaling clusters: sized against the node types the cluster may grow to, not its live nodes.

What is real here: Ray (its GCS holding the published `ClusterConfig`, read back by Ray's own
`get_cluster_config`), the node types of clusters/aws-gpu.yaml and clusters/kuberay.yaml as Ray's
launcher and KubeRay autoscaler parse them, and a Ray Train job that waits for a node. What is
emulated: the autoscaler's launch of that node (the test adds it once the job says it waits).
"""
from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest
import yaml
from ray.autoscaler._private.util import prepare_config

from conftest import TINY_RESTORMER
from orchestrator.run.autoscaler import NodeType, kuberay_node_types, launcher_node_types, main, plan_job, publish
from orchestrator.spec.schema import SpecError
from servers import BIN, stop_process_group

CLUSTERS = Path(__file__).resolve().parents[1] / "clusters"


def aws_types() -> list[NodeType]:
    return launcher_node_types(prepare_config(yaml.safe_load((CLUSTERS / "aws-gpu.yaml").read_text())))


def kuberay_types() -> list[NodeType]:
    return kuberay_node_types(yaml.safe_load((CLUSTERS / "kuberay.yaml").read_text()))


@pytest.mark.parametrize("node_types", [aws_types, kuberay_types], ids=["aws", "kuberay"])
def test_gpu_job_on_a_cluster_with_no_gpu_yet_waits_and_one_no_node_holds_is_refused(node_types):
    types = node_types()
    gpu_type = next(t.name for t in types if t.resources.get("GPU"))
    head_now = {"CPU": 4, "trial_slot": 8}  # the head alone: no GPU worker running
    waiting = plan_job({"CPU": 1, "GPU": 1}, 2, head_now, types)
    assert waiting == f"waiting for the autoscaler: 2 workers x 1 GPU, cluster has 0 GPU now, up to 8 on node type {gpu_type}"
    assert plan_job({"CPU": 1, "GPU": 1}, 2, {**head_now, "CPU": 20, "GPU": 2}, types) is None  # fits now
    with pytest.raises(SpecError, match=rf"one worker needs 1 CPU, 2 GPU, .* the largest node type is {gpu_type} "
                                        r"\(GPU 1, CPU 8.*up to 8 nodes\)"):
        plan_job({"CPU": 1, "GPU": 2}, 1, head_now, types)
    with pytest.raises(SpecError, match=rf"9 workers x \(1 CPU, 1 GPU\) but the cluster holds at most 8 .*{gpu_type}"):
        plan_job({"CPU": 1, "GPU": 1}, 9, head_now, types)


def test_published_node_types_round_trip_through_rays_gcs_and_size_the_check(capsys):
    """A real local Ray: the aws-gpu.yaml node types published into its GCS; a GPU job of a spec is
    then announced as waiting (Ray has 0 GPU) and an oversized one refused, before any compute."""
    import ray

    from orchestrator.run.autoscaler import cluster_node_types
    from orchestrator.run.jobs import check_cluster_resources
    from orchestrator.spec.load import parse_spec

    ray.shutdown()
    ray.init(address="local", num_cpus=1, include_dashboard=False)  # a new Ray, not one running here
    try:
        assert [t.name for t in cluster_node_types()] == [ray.nodes()[0]["NodeManagerAddress"]]  # nothing published
        gcs = ray.get_runtime_context().gcs_address
        main([str(CLUSTERS / "kuberay.yaml"), "--address", gcs])  # what the KubeRay head runs, from the manifest
        assert cluster_node_types() == kuberay_types()
        publish(aws_types(), gcs)  # what the aws-gpu.yaml head runs, from its launcher config
        assert cluster_node_types() == aws_types()
        raw = {"name": "gpu", "model": TINY_RESTORMER, "task": "deraining", "data": {"train": "/d/train", "val": "/d/val"},
               "resources": {"num_workers": 2, "use_gpu": True, "cpus_per_worker": 4}}
        check_cluster_resources(parse_spec(raw))
        assert ("[restorch] waiting for the autoscaler: 2 workers x 1 GPU, cluster has 0 GPU now, up to 8 on node "
                "type gpu_worker") in capsys.readouterr().out
        oversized = {**raw, "resources": {"num_workers": 1, "use_gpu": True, "cpus_per_worker": 16}}
        with pytest.raises(SpecError, match=r"one worker needs 16 CPU, 1 GPU.*largest node type is gpu_worker"):
            check_cluster_resources(parse_spec(oversized))
    finally:
        ray.shutdown()


def test_without_published_node_types_the_live_nodes_bound_the_job():
    one_cpu_nodes = [NodeType("10.0.0.1", {"CPU": 1}, 1), NodeType("10.0.0.2", {"CPU": 1}, 1)]
    assert plan_job({"CPU": 1}, 2, {"CPU": 2}, one_cpu_nodes) is None
    with pytest.raises(SpecError, match="one worker needs 2 CPU"):  # 2 CPUs in all, but on no single node
        plan_job({"CPU": 2}, 1, {"CPU": 2}, one_cpu_nodes)


@pytest.mark.slow
def test_a_job_submitted_to_an_empty_cluster_waits_for_a_node_then_runs(derain_data, tmp_path):
    """A head with no CPU for workers and a published cpu_worker type (max 2): `restorch train
    --address` says it waits for the autoscaler, and runs once a worker node joins."""
    import ray
    from ray.cluster_utils import Cluster

    ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    try:
        publish([NodeType("head", {}, 1), NodeType("cpu_worker", {"CPU": 1}, 2)], cluster.gcs_address)
        spec = {"name": "waits", "model": TINY_RESTORMER, "task": "deraining",
                "data": {"train": str(derain_data / "train"), "val": str(derain_data / "val"),
                         "patch_size": 32, "batch_size": 2},
                "train": {"iterations": 2, "val_every": 2, "checkpoint_every": 2},
                "storage": {"path": str(tmp_path / "runs"), "shared": True}}
        (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
        log = tmp_path / "train.log"
        with open(log, "w") as out:
            job = subprocess.Popen([str(BIN / "restorch"), "train", str(tmp_path / "spec.yaml"), "--address",
                                    cluster.address], stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + 180
            waiting = "waiting for the autoscaler: 1 worker x 1 CPU, cluster has 0 CPU now, up to 2 on node type cpu_worker"
            while waiting not in log.read_text():
                assert job.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
                time.sleep(1)
            cluster.add_node(num_cpus=1)  # what the autoscaler does for the pending demand
            assert job.wait(timeout=600) == 0, log.read_text()[-3000:]
        finally:
            stop_process_group(job)
    finally:
        cluster.shutdown()
    assert (tmp_path / "runs" / "waits" / "checkpoint_0000002" / "model.pt").exists()
