"""The cluster definitions in clusters/: each parses, carries what Ray needs, and installs restorch."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from orchestrator.sweep import TRIAL_RESOURCE

CLUSTERS = Path(__file__).resolve().parents[1] / "clusters"
RAY_VERSION = re.compile(r"rayproject/ray:(\d+\.\d+\.\d+)-py\d+-gpu")


def load(name: str) -> dict:
    return yaml.safe_load((CLUSTERS / name).read_text())


def installs_restorch(commands: list[str]) -> bool:
    return any(re.search(r"pip install .*~/restorch\b", command) for command in commands)


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
    setup = " ".join(config["setup_commands"])
    assert "torch" in setup and "deepspeed" in setup


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
    assert re.search(r"pip install .*torch.*deepspeed", dockerfile)
    assert re.search(r"pip install .*/home/ray/restorch\s*$", dockerfile, re.MULTILINE)


def test_all_definitions_run_the_same_ray_version():
    aws = RAY_VERSION.fullmatch(load("aws-gpu.yaml")["docker"]["image"]).group(1)
    assert aws == load("kuberay.yaml")["spec"]["rayVersion"]
