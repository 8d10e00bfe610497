"""Fixtures shared by the training, sweep and registry tests."""
from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import yaml

from models import build_model
from workloads.synth import write_dataset
from workloads.tasks import get_task

TINY_RESTORMER = {"name": "restormer", "dim": 8, "num_blocks": [1, 1, 1, 1], "num_refinement_blocks": 1,
                  "heads": [1, 1, 1, 1]}


def two_factor_ablation(**settings: object) -> dict:
    """A fresh `ablation:` section: CSA baseline; attention (GLMHA, Performer) x FFN width (x2, x1.5)."""
    return {
        "baseline": {"label": "CSA", "set": {"model.attention": "csa"}},
        "factors": {
            "attention": [{"label": "GLMHA", "set": {"model.attention": "glmha"}},
                          {"label": "Performer", "set": {"model.attention": "performer"}}],
            "ffn": [{"label": "FFN x2", "set": {"model.ffn_expansion_factor": 2.0}},
                    {"label": "FFN x1.5", "set": {"model.ffn_expansion_factor": 1.5}}],
        },
        **settings,
    }


@pytest.fixture(scope="session")
def derain_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic deraining set (Restormer layout, train/ and val/ splits), made once per session."""
    root = tmp_path_factory.mktemp("rain")
    write_dataset(root, get_task("deraining"), count=20, size=48, seed=0)
    return root


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[tuple[str, dict[str, str]]]:
    """A Ray head for one test module (`ray start --head`, dashboard on 127.0.0.1, a token of its
    own, tests/servers.py): its dashboard URL and the environment its clients need."""
    from servers import ray_env, ray_head

    with tempfile.TemporaryDirectory(prefix="rt-", dir="/tmp") as root, ray_head(Path(root)) as url:
        yield url, ray_env(Path(root))


def build_from_yaml_file(tmp_path: Path, config: dict, seed: int) -> torch.nn.Module:
    """The model a YAML file of `config` builds, after checking it has the very weights the dict builds."""
    path = tmp_path / "model.yaml"
    path.write_text(yaml.safe_dump(config))
    torch.manual_seed(seed)
    from_yaml = build_model(path)
    torch.manual_seed(seed)
    yaml_state, dict_state = from_yaml.state_dict(), build_model(config).state_dict()
    assert yaml_state.keys() == dict_state.keys()
    assert all(torch.equal(yaml_state[k], dict_state[k]) for k in yaml_state)
    return from_yaml
