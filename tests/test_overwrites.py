"""Nothing overwrites a user's files: `restore`, `evaluate --json`, `ablate`/`report` folders and
`data synth` refuse an existing file, the input itself and an output folder in the input folder, before
any compute (exit 2, clear message), unless --overwrite says so where it is offered."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from conftest import TINY_RESTORMER
from orchestrator.cli import main
from workloads.synth import write_dataset
from workloads.tasks import get_task


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("overwrites") / "rain"
    write_dataset(root, get_task("deraining"), count=3, size=32, seed=0)
    return root / "train"


def _restore(tmp_path: Path, source: Path, output: Path, *extra: str) -> int:
    """`restorch restore` with a model that does not exist: the outputs are checked before it is loaded."""
    return main(["restore", "--model", "models:/no-such-model/1", "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
                 "--input", str(source), "--output", str(output), *extra])


def _contents(folder: Path) -> dict[Path, bytes]:
    return {path: path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def test_restore_never_writes_over_a_file_or_into_its_input_folder(photos: Path, tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture) -> None:
    photo, unrelated, kept = photos / "input" / "0000.png", tmp_path / "notes.png", tmp_path / "kept"
    unrelated.write_bytes(b"mine")
    (kept / "inside").mkdir(parents=True)
    (kept / "0001.png").write_bytes(b"earlier result")
    before = _contents(photos)
    cases = [
        ((photo, photo), "--output {photo} is the input itself: write the result to another file, or add --overwrite"),
        ((photo, unrelated), "--output {unrelated} exists: choose another path, or add --overwrite to replace it"),
        ((photo, tmp_path), "--output {tmp_path} is a folder: give a file path"),
        ((photos / "input", photos / "input"), "--output {input} is the input folder {input}: write the results to a "
                                               "folder outside it"),
        ((photos / "input", photos / "input" / "restored"), "--output {input}/restored is inside the input folder"),
        ((photos / "input", kept), "--output {kept} already holds 0001.png: choose another folder, or add --overwrite"),
    ]
    for (source, output), message in cases:
        assert _restore(tmp_path, source, output) == 2
        expected = message.format(photo=photo, unrelated=unrelated, tmp_path=tmp_path, input=photos / "input", kept=kept)
        assert capsys.readouterr().err.startswith(f"restorch restore: error: {expected}")
    assert _contents(photos) == before and unrelated.read_bytes() == b"mine"
    assert (kept / "0001.png").read_bytes() == b"earlier result" and not (photos / "input" / "restored").exists()
    assert not (tmp_path / "mlflow.db").exists()  # refused before the model was looked up


def test_evaluate_json_is_not_overwritten_without_overwrite(photos: Path, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture) -> None:
    record = tmp_path / "result.json"
    record.write_text("earlier")
    command = ["evaluate", "--pred", str(photos / "input"), "--target", str(photos / "target"), "--task", "deraining",
               "--json", str(record)]
    assert main(command) == 2
    assert capsys.readouterr().err == (f"restorch evaluate: error: --json {record} exists: choose another path, or add "
                                       "--overwrite to replace it\n")
    assert record.read_text() == "earlier"
    assert main([*command, "--overwrite"]) == 0
    assert json.loads(record.read_text())["count"] == 2


def test_data_synth_refuses_a_file_as_its_folder(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    existing = tmp_path / "data"
    existing.write_text("mine")
    assert main(["data", "synth", "--task", "deraining", "--out", str(existing), "--count", "2", "--size", "16"]) == 2
    assert capsys.readouterr().err == f"restorch data: error: --out {existing} is a file, not a folder: choose a folder\n"
    assert existing.read_text() == "mine"


def test_ablate_refuses_a_report_folder_that_is_not_empty_before_it_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                        capsys: pytest.CaptureFixture) -> None:
    """(`restorch report --out` over a report: tests/test_ablation.py, on the runs of its profile-only ablation.)"""
    monkeypatch.chdir(tmp_path)
    spec = {"name": "sizes", "model": TINY_RESTORMER, "task": "deraining",
            "data": {"train": "none", "val": "none", "patch_size": 16, "batch_size": 2},
            "ablation": {"profile_only": True, "factors": {"dim": [{"label": "dim 16", "set": {"model.dim": 16}}]}}}
    (tmp_path / "sizes.yaml").write_text(yaml.safe_dump(spec))
    (tmp_path / "report").mkdir()
    (tmp_path / "report" / "table.csv").write_text("my own table")
    assert main(["ablate", "sizes.yaml", "--out", "report"]) == 2
    assert capsys.readouterr().err == ("restorch ablate: error: --out report is not empty: choose another folder, or "
                                       "empty it first, or add --overwrite to replace the files of the same names in it\n")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["report", "sizes.yaml"]  # no MLflow store, no storage
    assert (tmp_path / "report" / "table.csv").read_text() == "my own table"
