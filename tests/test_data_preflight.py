"""Bad data is refused before compute: `train`, `sweep`, `ablate` and `submit` run the dataset check on
every dataset of the spec (each ablation variant's too) before Ray starts, exit 2 with the check's
message and write nothing; a folder checked before is not decoded again until it changes; a failure
that still happens in a worker shows its cause in the sweep's results table."""
from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import workloads.data
from conftest import TINY_RESTORMER
from orchestrator.run.data_preflight import DataCheckFailed, check_record, check_spec_data
from orchestrator.spec.load import parse_spec
from workloads.node_cache import cache_root
from workloads.synth import write_dataset
from workloads.tasks import get_task

DERAIN = get_task("deraining")


def _spec(name: str, train: Path, val: Path, tmp_path: Path, **extra) -> dict:
    return {"name": name, "model": TINY_RESTORMER, "task": "deraining",
            "data": {"train": str(train), "val": str(val), "patch_size": 32, "batch_size": 2},
            "train": {"iterations": 2, "val_every": 2, "checkpoint_every": 2, "log_every": 1, "max_failures": 0},
            "resources": {"num_workers": 1, "cpus_per_worker": 1},
            "storage": {"path": "runs"}, **extra}


@pytest.fixture(scope="module")
def rain(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("preflight") / "rain"
    write_dataset(root, DERAIN, count=8, size=48, seed=0)
    return root


def _decodes(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """The files the dataset check decodes from now on."""
    decoded: list[Path] = []
    shape = workloads.data.array_shape
    monkeypatch.setattr(workloads.data, "array_shape", lambda path: decoded.append(path) or shape(path))
    return decoded


def test_a_checked_folder_is_not_decoded_again_until_it_changes(rain: Path, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    data = tmp_path / "rain"
    shutil.copytree(rain, data)
    spec = parse_spec(_spec("cached", data / "train", data / "val", tmp_path))
    decoded = _decodes(monkeypatch)
    check_spec_data(spec, cluster=False)
    assert len(decoded) == 16  # 6 train + 2 val pairs
    record = check_record(data / "train", DERAIN, patch_size=32, cache=cache_root())
    assert json.loads(record.read_text()) == {"folder": str(data / "train"), "task": "deraining", "patch_size": 32,
                                              "pairs": 6}

    decoded.clear()
    check_spec_data(spec, cluster=False)
    assert decoded == []  # both folders' records hit

    changed = data / "val" / "input" / "0006.png"
    os.utime(changed, ns=(changed.stat().st_atime_ns, changed.stat().st_mtime_ns + 1))
    check_spec_data(spec, cluster=False)
    assert sorted(decoded) == sorted((data / "val").rglob("*.png"))  # only the changed folder, again

    decoded.clear()  # a larger patch is another check, whose problems are recorded too
    too_large = parse_spec({**_spec("cached", data / "train", data / "val", tmp_path),
                            "data": {"train": str(data / "train"), "val": str(data / "val"), "patch_size": 64}})
    with pytest.raises(DataCheckFailed, match="target/0000.png is 48x48, smaller than the patch size 64") as first:
        check_spec_data(too_large, cluster=False)
    assert len(decoded) == 12
    decoded.clear()
    with pytest.raises(DataCheckFailed) as again:
        check_spec_data(too_large, cluster=False)
    assert decoded == [] and str(again.value) == str(first.value)


def test_the_datasets_of_every_variant_and_searched_value_are_checked(rain: Path, tmp_path: Path) -> None:
    from orchestrator.run.data_preflight import dataset_uses

    spec = _spec("uses", rain / "train", rain / "val", tmp_path,
                 ablation={"factors": {"data": [{"label": "other", "set": {"data.train": str(tmp_path / "other"),
                                                                          "data.patch_size": 40}}]}})
    assert dataset_uses(parse_spec(spec)) == {str(rain / "train"): ("data.train", 32),
                                              str(rain / "val"): ("data.val", None),
                                              str(tmp_path / "other"): ("data.train", 40)}
    searched = _spec("uses", rain / "train", rain / "val", tmp_path)
    searched["data"]["patch_size"] = {"grid": [16, 40]}
    assert dataset_uses(parse_spec(searched))[str(rain / "train")] == ("data.train", 40)


# Every command x bad-data case in one process (the imports once): each must refuse before Ray is
# imported, let alone started.
REFUSALS = """
import contextlib, io, json, sys
from orchestrator.cli import main
results = []
for command in json.loads(sys.argv[1]):
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
        code = main(command)
    results.append({"command": command, "code": code, "stderr": stderr.getvalue()})
print(json.dumps({"results": results, "ray_imported": "ray" in sys.modules}))
"""


def test_bad_data_is_refused_before_compute_by_every_command(rain: Path, tmp_path: Path) -> None:
    cases = {}
    unpaired = tmp_path / "unpaired"
    shutil.copytree(rain, unpaired)
    (unpaired / "train" / "target" / "0005.png").rename(unpaired / "train" / "target" / "0005_gt.png")
    cases["unpaired"] = (unpaired, 32, r"0005.png has no target in \S+ \(expected a file named 0005.\*\)")
    truncated = tmp_path / "truncated"
    shutil.copytree(rain, truncated)
    png = truncated / "train" / "input" / "0003.png"
    png.write_bytes(png.read_bytes()[: png.stat().st_size // 2])
    cases["truncated"] = (truncated, 32, r"cannot read \S+0003.png \(OSError: image file is truncated")
    cases["small"] = (rain, 64, r"target/0000.png is 48x48, smaller than the patch size 64")

    work = tmp_path / "work"
    work.mkdir()
    commands = []
    for case, (data, patch, _) in cases.items():
        spec = _spec(f"bad-{case}", data / "train", rain / "val", tmp_path)
        spec["data"]["patch_size"] = patch
        ablation = {**spec, "ablation": {"factors": {"ffn": [{"label": "x2", "set": {"model.ffn_expansion_factor": 2.0}}]}}}
        for kind, written in (("train", spec), ("sweep", spec), ("ablate", ablation), ("submit", spec)):
            (work / f"{case}-{kind}.yaml").write_text(yaml.safe_dump(written))
            commands.append([kind, f"{case}-{kind}.yaml", *(["--address", "http://127.0.0.1:9"] if kind == "submit" else [])])
    before = set(work.iterdir())
    environment = {key: value for key, value in os.environ.items() if key not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    done = subprocess.run([sys.executable, "-c", REFUSALS, json.dumps(commands)], cwd=work, env=environment,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    outcome = json.loads(done.stdout.splitlines()[-1])
    assert not outcome["ray_imported"]
    for result in outcome["results"]:
        kind, case = result["command"][0], result["command"][1].split("-")[0]
        assert result["code"] == 2, result
        assert result["stderr"].startswith(f"restorch {kind}: error: data.train: dataset {cases[case][0] / 'train'} has "), result
        assert re.search(cases[case][2], result["stderr"]), result
        assert f"restorch data check {cases[case][0] / 'train'} --task deraining" in result["stderr"]
    assert set(work.iterdir()) == before  # no storage folder, no mlruns/ or mlflow.db, no report


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_failure_inside_a_worker_shows_its_cause_in_the_results_table(rain: Path, tmp_path: Path) -> None:
    """The workers meet a problem the check passed (recorded as passed before the folder changed in a
    way its listing does not show): the results table and results.csv carry the exception's line."""
    data = tmp_path / "rain"
    shutil.copytree(rain, data)
    spec = _spec("worker-failure", data / "train", data / "val", tmp_path, tracking={"uri": f"sqlite:///{tmp_path / 'mlflow.db'}"})
    spec["data"]["patch_size"] = 64
    record = check_record(data / "train", DERAIN, patch_size=64, cache=cache_root())
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text("{}")
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    environment = {key: value for key, value in os.environ.items() if key not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    done = subprocess.run([str(Path(sys.executable).parent / "restorch"), "sweep", "spec.yaml"], cwd=tmp_path,
                          env=environment, capture_output=True, text=True, timeout=800)
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
    cause = (f"DatasetError: dataset {data / 'train'} has 6 problem(s): - {data / 'train' / 'target' / '0000.png'} is "
             "48x48, smaller than the patch size 64")
    table = done.stdout[done.stdout.index("sweep worker-failure: 1 trials"):]
    assert cause in table.splitlines()[3], table
    with open(tmp_path / "runs" / "worker-failure" / "results.csv") as results:
        row, = csv.DictReader(results)
    assert row["status"] == "error" and row["error"].startswith(cause)
