"""A sweep on a 2-node Ray cluster on this machine (`ray.cluster_utils.Cluster`: head + worker node,
one CPU each): its trials train on both nodes, and when the worker node goes away mid-trial, that
trial is retried on the head from its last checkpoint and the sweep completes. Both nodes are this
machine: the storage folder is declared shared; tracking goes to an MLflow server, as on any cluster
(tests/test_unshared_nodes.py runs nodes that share no disk)."""
from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from conftest import TINY_RESTORMER
from orchestrator.run.sweep import TRIAL_RESOURCE
from orchestrator.tracking.keys import PARENT_TAG
from servers import BIN, stop_process_group, tracking_server

ITERATIONS = 30


@pytest.fixture
def cluster():
    """Head (1 CPU, the sweep's trial slots) + one worker node (1 CPU); this process connected to it."""
    import ray
    from ray.cluster_utils import Cluster

    ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "resources": {TRIAL_RESOURCE: 2}})
    try:
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address)
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


def training_nodes(trial_mode: str) -> dict[str, str]:
    """Node id of each live actor that trains (actor id -> node id): Ray Train's workers, or the Tune trial actors
    of inline trials (the class Tune wraps a function trainable in)."""
    from ray.util.state import list_actors

    actors = list_actors(filters=[("state", "=", "ALIVE")])
    trains = "RayTrainWorker" if trial_mode == "job" else "ImplicitFunc"
    return {actor.actor_id: actor.node_id for actor in actors if trains in actor.class_name}


def committed_checkpoints(jobs: Path, trial_mode: str) -> int:
    """Checkpoints a trial resumes from: named in Ray Train's snapshot once its controller took the report (a job),
    or holding their report file, written last (inline)."""
    if trial_mode == "job":
        return sum("checkpoint_" in snapshot.read_text() for snapshot in jobs.glob("*/checkpoint_manager_snapshot.json"))
    return len({path.parent.parent for path in jobs.glob("*/checkpoint_*/report.json")})


@pytest.mark.slow
@pytest.mark.parametrize("trial_mode", ["job", "inline"])
def test_trials_use_both_nodes_and_survive_losing_the_worker_node(cluster, derain_data, tmp_path, trial_mode):
    """An inline trial trains in its Tune trial actor: it needs no trial_slot (the head's), so it trains on either node."""
    spec = {
        "name": "two-nodes", "model": TINY_RESTORMER, "task": "deraining",
        "data": {"train": str(derain_data / "train"), "val": str(derain_data / "val"), "patch_size": 32, "batch_size": 2},
        "train": {"iterations": ITERATIONS, "val_every": 2, "checkpoint_every": 2, "log_every": 2,
                  "lr": {"grid": [1.0e-3, 2.0e-3]}, "max_failures": 2},
        "resources": {"trial_mode": trial_mode},
        "search": {"algorithm": "grid", "max_concurrent_trials": 2},
        "storage": {"path": str(tmp_path / "runs"), "shared": True},
    }
    log = tmp_path / "sweep.log"
    with tracking_server(tmp_path, f"sqlite:///{tmp_path / 'mlflow.db'}", str(tmp_path / "artifacts"), None) as url:
        spec["tracking"] = {"uri": url}
        (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
        with open(log, "w") as out:
            sweep = subprocess.Popen([str(BIN / "restorch"), "sweep", str(tmp_path / "spec.yaml"), "--address",
                                      cluster.address], cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        sweep_with_node_loss(sweep, cluster, tmp_path, log, trial_mode)
        client = MlflowClient(url)
        runs = client.search_runs([client.get_experiment_by_name("two-nodes").experiment_id])
    trials = [run for run in runs if PARENT_TAG in run.data.tags]
    assert len(trials) == 2 and all(run.info.status == "FINISHED" for run in trials)
    assert all(run.data.metrics["iteration"] == ITERATIONS for run in trials)
    # The trial that lost its node went on from a checkpoint (the other one never restarted).
    resumed = sorted(run.data.metrics["resumed_from"] for run in trials)
    assert resumed[0] == 0 and 2 <= resumed[1] < ITERATIONS
    assert Path(tmp_path / "runs" / "two-nodes" / "results.csv").exists()


def sweep_with_node_loss(sweep: subprocess.Popen, cluster, tmp_path: Path, log: Path, trial_mode: str) -> None:
    """Wait until both trials train at once, one on each node, each with a committed checkpoint (a checkpoint
    only partly written to storage is not yet one to resume from); take the worker node away; the sweep must
    still succeed."""
    head_id = cluster.head_node.node_id
    (worker,) = cluster.worker_nodes
    try:
        jobs = tmp_path / "runs" / "two-nodes" / "jobs"
        deadline = time.monotonic() + 600
        while not (set(training_nodes(trial_mode).values()) == {head_id, worker.node_id}
                   and committed_checkpoints(jobs, trial_mode) == 2):
            assert sweep.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "the two trials never trained on both nodes at once"
            time.sleep(1)
        cluster.remove_node(worker)
        assert sweep.wait(timeout=600) == 0, log.read_text()[-3000:]
    finally:
        stop_process_group(sweep)
