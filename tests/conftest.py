"""Fixtures shared by the training, sweep and registry tests."""
from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from models import build_model
from workloads.node_cache import CACHE_ENV
from workloads.synth import write_dataset
from workloads.tasks import get_task

TINY_RESTORMER = {"name": "restormer", "dim": 8, "num_blocks": [1, 1, 1, 1], "num_refinement_blocks": 1,
                  "heads": [1, 1, 1, 1]}


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--no-skips", action="store_true",
                     help="fail the run if a test skips, except GPU tests on a machine without GPUs (CI)")


NOT_ALLOWED_SKIPS = pytest.StashKey[list[str]]()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """With --no-skips, a skipped test other than a `gpu` one fails the run."""
    if not session.config.getoption("no_skips"):
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = [f"{report.nodeid}: {report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr}"
               for report in (reporter.stats.get("skipped", []) if reporter else []) if "gpu" not in report.keywords]
    session.config.stash[NOT_ALLOWED_SKIPS] = skipped
    if skipped and exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    skipped = config.stash.get(NOT_ALLOWED_SKIPS, [])
    if skipped:
        terminalreporter.write_line(f"--no-skips: {len(skipped)} test(s) skipped; install what they need "
                                    "(make test-all does as root):", red=True)
        for line in skipped:
            terminalreporter.write_line(f"  {line}", red=True)


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


def tiny_spec(name: str, data: Path, search_values: dict[str, Any], **sections: Any) -> dict[str, Any]:
    """A sweep of a 4-channel Restormer with GLMHA on 16-pixel patches; `search_values` are
    dotted keys -> search-space entries, `sections` update the spec's sections."""
    spec: dict[str, Any] = {
        "name": name,
        "model": {"name": "restormer", "dim": 4, "num_blocks": [1, 1, 1, 1], "num_refinement_blocks": 1,
                  "heads": [1, 1, 1, 1], "attention": "glmha", "glmha": {}},
        "task": "deraining",
        "data": {"train": str(data / "train"), "val": str(data / "val"), "patch_size": 16, "batch_size": 2},
        "train": {"iterations": 6, "val_every": 3, "checkpoint_every": 3, "log_every": 3, "lr": 2e-3},
        "search": {"algorithm": "grid", "max_concurrent_trials": 2},
    }
    for section, values in sections.items():
        spec[section] = {**spec.get(section, {}), **values}
    for key, entry in search_values.items():
        node = spec
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = entry
    return spec


def sweep_runs(client: Any, experiment: str) -> tuple[Any, dict[str, Any]]:
    """The sweep's parent run and its child runs by trial id, from an MlflowClient (asserting there is
    exactly one parent and one child run per trial)."""
    from orchestrator.tracking.keys import PARENT_TAG, TRIAL_TAG

    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    runs = client.search_runs([experiment_id])
    parents = [run for run in runs if PARENT_TAG not in run.data.tags]
    assert len(parents) == 1, [run.info.run_name for run in parents]
    children = [run for run in runs if run.data.tags.get(PARENT_TAG) == parents[0].info.run_id]
    assert len(children) == len(runs) - 1
    by_trial = {run.data.tags[TRIAL_TAG]: run for run in children}
    assert len(by_trial) == len(children), "one child run per trial"
    return parents[0], by_trial


@pytest.fixture(scope="session", autouse=True)
def node_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The datasets' node cache of this test session (not ~/.cache/restorch): no test hits an entry
    that an earlier session left. Ray workers started by the tests inherit it."""
    with pytest.MonkeyPatch.context() as patch:
        folder = tmp_path_factory.mktemp("node-cache")
        patch.setenv(CACHE_ENV, str(folder))
        yield folder


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
