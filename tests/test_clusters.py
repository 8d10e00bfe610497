"""The cluster definitions in clusters/: each parses, carries what Ray needs, installs restorch with the
project's pinned versions (one software image), publishes its node types and sets shared tracking."""
from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from ray.autoscaler._private.util import prepare_config, validate_config

from orchestrator.run.sweep import TRIAL_RESOURCE

ROOT = Path(__file__).resolve().parents[1]
CLUSTERS = ROOT / "clusters"
RAY_VERSION = re.compile(r"rayproject/ray:(\d+\.\d+\.\d+)-py\d+-gpu")
INSTALL = re.compile(r"^sh ~/restorch/clusters/install.sh ~/restorch$")


def load(name: str) -> dict:
    return yaml.safe_load((CLUSTERS / name).read_text())


def installs_restorch(commands: list[str]) -> bool:
    """The node runs clusters/install.sh on the synced project (what the image runs at build time)."""
    return any(INSTALL.match(command) for command in commands)


def pins() -> dict[str, str]:
    """constraints.txt: package -> pinned version."""
    lines = [line.split("#")[0].strip() for line in (ROOT / "constraints.txt").read_text().splitlines()]
    return dict(line.split("==") for line in lines if line)


def pyproject_requirement(name: str) -> Requirement:
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return next(Requirement(d) for d in map(str, dependencies) if Requirement(d).name == name)


@pytest.mark.parametrize("name", ["aws-gpu.yaml", "local.yaml"])
def test_launcher_configs_pass_rays_schema_and_install_restorch_on_workers(name):
    config = load(name)
    prepared = prepare_config(config)  # what `ray up` does first: defaults merged, node types filled in
    validate_config(prepared)
    assert prepared["head_node_type"] in prepared["available_node_types"]
    assert any("ray start --head" in command for command in prepared["head_start_ray_commands"])
    assert any("ray start --address=$RAY_HEAD_IP" in command for command in prepared["worker_start_ray_commands"])
    assert prepared["file_mounts"]["~/restorch"] == "."
    assert installs_restorch(prepared["setup_commands"] + prepared["worker_setup_commands"])
    # Sweeps reserve a trial slot per trial driver: the head must offer some.
    head = prepared["available_node_types"][prepared["head_node_type"]]["resources"]
    head_start = " ".join(prepared["head_start_ray_commands"])
    assert head.get(TRIAL_RESOURCE, 0) >= 1 or f'"{TRIAL_RESOURCE}":' in head_start


def test_aws_has_a_cpu_head_autoscaling_gpu_workers_and_s3_by_instance_profile():
    config = load("aws-gpu.yaml")
    assert config["provider"]["type"] == "aws"
    head = config["available_node_types"][config["head_node_type"]]
    workers = config["available_node_types"]["gpu_worker"]
    assert not head["node_config"]["InstanceType"].startswith(("g", "p"))  # a CPU instance
    assert workers["node_config"]["InstanceType"].startswith(("g", "p"))
    assert workers["resources"]["GPU"] >= 1
    assert workers["min_workers"] == 0 < workers["max_workers"] <= config["max_workers"]
    # Ray creates ray-autoscaler-v1 (with S3 access) for the head; the workers use it by name.
    assert "IamInstanceProfile" not in head["node_config"]
    assert workers["node_config"]["IamInstanceProfile"] == {"Name": "ray-autoscaler-v1"}
    assert RAY_VERSION.fullmatch(config["docker"]["image"])
    assert installs_restorch(config["setup_commands"])
    # The head publishes the node types (a GPU job is then submitted and waits for the workers) and
    # runs the tracking server every node's MLFLOW_TRACKING_URI names.
    head = config["head_start_ray_commands"]
    assert "python -m orchestrator.run.autoscaler ~/ray_bootstrap_config.yaml" in head
    assert any(re.search(r"restorch tracking up .*--host 0\.0\.0\.0 --port 5000", command) for command in head)
    assert any("MLFLOW_TRACKING_URI=http://" in c and "ray start --head" in c for c in head)
    assert any("MLFLOW_TRACKING_URI=http://$RAY_HEAD_IP:5000" in c for c in config["worker_start_ray_commands"])


def test_kuberay_has_a_gpu_worker_group_with_resource_requests():
    cluster = load("kuberay.yaml")
    assert (cluster["apiVersion"], cluster["kind"]) == ("ray.io/v1", "RayCluster")
    spec = cluster["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["dashboard-host"] == "0.0.0.0"
    head_container = head["template"]["spec"]["containers"][0]
    assert {port["containerPort"] for port in head_container["ports"]} >= {6379, 8265}
    assert "nvidia.com/gpu" not in head_container["resources"]["requests"]
    assert json.loads(json.loads(head["rayStartParams"]["resources"]))[TRIAL_RESOURCE] >= 1  # KubeRay's quoted JSON

    (gpu,) = spec["workerGroupSpecs"]
    assert gpu["minReplicas"] <= gpu["replicas"] <= gpu["maxReplicas"] and gpu["maxReplicas"] >= 1
    container = gpu["template"]["spec"]["containers"][0]
    for kind in ("requests", "limits"):
        assert int(container["resources"][kind]["nvidia.com/gpu"]) >= 1
        assert {"cpu", "memory"} <= set(container["resources"][kind])
    # Every pod runs the image that clusters/Dockerfile builds: Ray of the same version + restorch.
    images = {head_container["image"], container["image"]}
    assert len(images) == 1
    dockerfile = (CLUSTERS / "Dockerfile").read_text()
    assert f"-t {images.pop()} ." in dockerfile
    base = re.search(r"^FROM (\S+)", dockerfile, re.MULTILINE).group(1)
    assert RAY_VERSION.fullmatch(base).group(1) == spec["rayVersion"]
    # Tracking on a server every pod reaches; the head publishes the worker groups when it starts.
    for pod in (head_container, container):
        assert {"name": "MLFLOW_TRACKING_URI", "value": "http://restorch-mlflow:5000"} in pod["env"]
    assert "python -m orchestrator.run.autoscaler --kuberay" in " ".join(head_container["lifecycle"]["postStart"]["exec"]["command"])


def test_the_image_is_built_from_the_project_with_its_pins_and_the_deepspeed_op():
    """Read, not built (no Docker daemon here): the Dockerfile copies the project with constraints.txt
    and runs clusters/install.sh, which installs under the constraints and compiles DeepSpeed's op."""
    dockerfile = (CLUSTERS / "Dockerfile").read_text()
    copied = {path for line in re.findall(r"^COPY (?:--\S+ )*(.+)$", dockerfile, re.MULTILINE) for path in line.split()[:-1]}
    assert {"pyproject.toml", "constraints.txt", "clusters/install.sh", "models", "workloads", "orchestrator"} <= copied
    assert re.search(r"^RUN sh clusters/install.sh /home/ray/restorch$", dockerfile, re.MULTILINE)
    assert re.search(r"^ENV TORCH_EXTENSIONS_DIR=\S+$", dockerfile, re.MULTILINE)  # the op, where every process finds it
    ignore = (CLUSTERS / "Dockerfile.dockerignore").read_text().split()
    assert {f"!{path}" for path in copied} <= set(ignore)
    install = (CLUSTERS / "install.sh").read_text()
    assert re.search(r'^pip install .*-c "\$project/constraints.txt" "\$project"$', install, re.MULTILINE)
    assert re.search(r"DS_ACCELERATOR=cpu python -m workloads.deepspeed_ops$", install, re.MULTILINE)
    assert (ROOT / "workloads" / "deepspeed_ops.py").exists()


def test_pyproject_and_the_cluster_files_agree_on_torch_and_ray():
    """Every node installs torch, Ray, DeepSpeed and MLflow at the versions constraints.txt pins; these
    satisfy pyproject's bounds; no cluster file names a version bound of its own; the images' Ray tag is
    the pinned Ray."""
    pinned = pins()
    for name in ("torch", "ray", "deepspeed", "mlflow"):
        assert pyproject_requirement(name).specifier.contains(pinned[name]), (name, pinned[name])
    for path in [*CLUSTERS.glob("*.yaml"), CLUSTERS / "Dockerfile", CLUSTERS / "install.sh"]:
        assert not re.search(r"\b(torch|deepspeed|ray|mlflow)\s*(>=|<=|==|~=|<|>)", path.read_text()), path.name
    tags = {RAY_VERSION.search((CLUSTERS / name).read_text()).group(1) for name in ("Dockerfile", "aws-gpu.yaml")}
    assert tags == {pinned["ray"]} == {load("kuberay.yaml")["spec"]["rayVersion"]}
