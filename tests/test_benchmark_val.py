"""Validation sets named by benchmark (issue 21): `data.val: {NAME: {benchmark: NAME, path: DIR}}` checked
against the catalogue before any compute, measured by the benchmark's protocol and recorded on the run
(benchmark, protocol, content digest, MLflow dataset input); the resolved dtype and the reported checkpoint
in the record; the protocol line under each report table."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from conftest import TINY_RESTORMER
from orchestrator.cli import main
from orchestrator.report.formats import latex_table, markdown_table, notes, protocol_note
from orchestrator.report.model import MetricColumn, Report
from orchestrator.run.jobs import job_config
from orchestrator.spec.load import parse_spec
from orchestrator.spec.schema import SpecError
from orchestrator.tracking.keys import (DATA_DIGEST_PREFIX, DTYPE_TAG, REPORTED_CHECKPOINT_TAG, REPORTED_ITERATION_TAG,
                                        VAL_BENCHMARK_PREFIX, VAL_PROTOCOL_PREFIX)
from orchestrator.tracking.record import describe_record, protocol_lines
from workloads.benchmarks import check_benchmark
from workloads.synth import write_dataset
from workloads.tasks import get_task
from workloads.train import resolved_precision

BIN = Path(sys.executable).parent


def _spec(data: Path, val: object, task: object = "deraining", **sections: object) -> dict:
    return {"name": "bench-val", "model": dict(TINY_RESTORMER), "task": task,
            "data": {"train": str(data / "train"), "val": val, "patch_size": 16, "batch_size": 2},
            "train": {"iterations": 2, "val_every": 2, "checkpoint_every": 2, "log_every": 1}, **sections}


def test_benchmark_sets_in_the_spec_and_job_config(derain_data: Path, tmp_path: Path) -> None:
    """The three forms of data.val validate; a benchmark set keeps its benchmark through the job config."""
    val = {"Rain100H": {"benchmark": "Rain100H", "path": str(derain_data / "val")}, "mine": str(derain_data / "val")}
    spec = parse_spec(_spec(derain_data, val))
    assert spec.data.val_sets == {"Rain100H": str(derain_data / "val"), "mine": str(derain_data / "val")}
    assert spec.data.val_benchmarks == {"Rain100H": "Rain100H"}
    assert parse_spec(spec.as_written()).data.val_benchmarks == {"Rain100H": "Rain100H"}  # the spec as run reloads
    config = job_config(spec, "job", str(tmp_path))
    assert config.data.val_benchmarks == {"Rain100H": "Rain100H"}
    assert config.data.val_folders == {"Rain100H": str(derain_data / "val"), "mine": str(derain_data / "val")}
    assert parse_spec(_spec(derain_data, str(derain_data / "val"))).data.val_benchmarks == {}


@pytest.mark.parametrize("val, task, message", [
    ({"R": {"benchmark": "Rain100X", "path": "x"}}, "deraining",
     "unknown benchmark 'Rain100X'; known benchmarks: Rain100L, Rain100H, Test100"),
    ({"R": {"benchmark": "Rain100H"}}, "deraining", "a benchmark set is {benchmark: NAME, path: folder}"),
    ({"G": {"benchmark": "GoPro", "path": "x"}}, "deraining",
     "data.val.G: GoPro is a motion_deblurring benchmark but the spec's task is deraining"),
    ({"S": {"benchmark": "SIDD-val", "path": "x"}}, "real_denoising",
     "data.val.S: SIDD-val is released as MATLAB arrays of 256x256 blocks"),
    ({"K": {"benchmark": "Kodak24", "path": "x"}}, {"name": "gaussian_denoising", "sigma": 30},
     "data.val.K: Kodak24's published numbers are at sigma 15/25/50, the spec's task.sigma is 30"),
])
def test_benchmark_sets_refused(tmp_path: Path, val: dict, task: object, message: str) -> None:
    with pytest.raises(SpecError) as error:
        parse_spec(_spec(tmp_path, val, task))
    assert message in str(error.value)


def test_train_refuses_a_folder_that_is_not_the_benchmark(derain_data: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    """`restorch train` checks a benchmark set against the catalogue before Ray starts: four pairs are not
    Rain100H's 100, and nothing is written."""
    spec_file = tmp_path / "spec.yaml"
    storage = tmp_path / "runs"
    spec = _spec(derain_data, {"Rain100H": {"benchmark": "Rain100H", "path": str(derain_data / "val")}},
                 storage={"path": str(storage)})
    spec_file.write_text(yaml.safe_dump(spec))
    assert main(["train", str(spec_file)]) == 2
    err = capsys.readouterr().err
    assert f"data.val.Rain100H: {derain_data / 'val'} does not match the benchmark Rain100H" in err
    assert "holds 4 image(s), Rain100H has 100: add the missing ones" in err
    assert not storage.exists() and not (tmp_path / "mlflow.db").exists()


def test_a_benchmark_set_is_measured_by_the_benchmark_protocol(tmp_path: Path) -> None:
    """RealBlur's published numbers align each result to its target first, the task's protocol does not: the
    same folder as a RealBlur-J set and as a plain set is measured by each protocol."""
    import torch

    from models import build_model
    from workloads.train import benchmark_task, setup_data, validate, validate_sets

    data = tmp_path / "data"
    write_dataset(data, get_task("motion_deblurring"), count=4, size=32, seed=0, val_fraction=0.5)
    val = {"RealBlur-J": {"benchmark": "RealBlur-J", "path": str(data / "val")}, "plain": str(data / "val")}
    config = job_config(parse_spec(_spec(data, val, "motion_deblurring")), "job", str(tmp_path))
    task = get_task("motion_deblurring")
    sets = setup_data(config, task).val_sets
    realblur = benchmark_task(task, "RealBlur-J")
    assert realblur.protocol.name == "rgb-realblur-ecc" != task.protocol.name and sets["RealBlur-J"].task == realblur
    model = build_model(TINY_RESTORMER)
    torch.nn.init.zeros_(model.output.weight)  # Restormer's global residual: the input itself, which aligns to its target
    metrics = validate_sets(model, sets, task, 0, 1, None)
    assert metrics["psnr/RealBlur-J"] == validate(model, sets["plain"], realblur, 0, 1, None)["psnr"]
    assert metrics["psnr/plain"] == validate(model, sets["plain"], task, 0, 1, None)["psnr"] != metrics["psnr/RealBlur-J"]


def test_auto_precision_resolves_on_this_device() -> None:
    import torch

    expected = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"
    assert resolved_precision("auto") == expected and resolved_precision("fp32") == "fp32"


def test_protocol_line_under_each_table(derain_data: Path) -> None:
    """The report prints its runs' protocol under the Markdown and LaTeX tables (and in the HTML notes)."""
    spec = parse_spec({**_spec(derain_data, str(derain_data / "val")),
                       "ablation": {"factors": {"ffn": [{"label": "x2", "set": {"model.ffn_expansion_factor": 2.0}}]}}})
    line = "PSNR/SSIM on Y — protocol v1; Rain100H: benchmark Rain100H, protocol y v1: ..., digest abc"
    report = Report(spec, "run", ["psnr"], [MetricColumn("psnr", "psnr", None)],
                    [{"variant": "base", "factor": "", "baseline": True, "runs": 1, "psnr": 30.0}], [], {},
                    protocol=[line])
    assert protocol_note(report.protocol) == f"Protocol: {line}."
    assert f"Protocol: {line}." in "\n".join(notes(report)) and f"Protocol: {line}." in markdown_table(report)
    assert r"\end{tabular}" + "\n" + r"\par\smallskip{\footnotesize Protocol: PSNR/SSIM on Y" in latex_table(report)
    assert protocol_note([]) == "Protocol: not recorded (no finished run)."


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_train_on_a_benchmark_set_records_it(tmp_path: Path) -> None:
    """`restorch train` with a McMaster validation set (its catalogued count is unconfirmed: a warning, so a
    two-image folder passes): the run holds psnr/McMaster, the benchmark, its protocol and content digest (tags
    and an MLflow dataset input), the dtype it trained in (not `auto`) and which checkpoint its metrics are of;
    the registry card and the report's protocol line show them."""
    data = tmp_path / "data"
    write_dataset(data, get_task("gaussian_denoising"), count=6, size=32, seed=0)
    mcmaster = tmp_path / "McMaster"
    mcmaster.mkdir()
    for path in sorted((data / "val" / "target").iterdir()):
        shutil.copy(path, mcmaster / path.name)
    check = check_benchmark(mcmaster, "McMaster")
    assert not check.problems and check.warnings and check.digest
    spec = _spec(data, {"McMaster": {"benchmark": "McMaster", "path": str(mcmaster)}, "val": str(data / "val")},
                 {"name": "gaussian_denoising", "sigma": 15}, storage={"path": str(tmp_path / "runs")})
    spec["train"] = {"iterations": 2, "val_every": 2, "checkpoint_every": 2, "log_every": 1}
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(spec))
    done = subprocess.run([str(BIN / "restorch"), "train", str(spec_file)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=800)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run, = client.search_runs([client.get_experiment_by_name("bench-val").experiment_id])
    tags = run.data.tags
    assert "psnr/McMaster" in run.data.metrics and "psnr/val" in run.data.metrics
    assert tags[f"{VAL_BENCHMARK_PREFIX}McMaster"] == "McMaster"
    protocol = get_task("gaussian_denoising", sigma=15).protocol
    assert tags[f"{VAL_PROTOCOL_PREFIX}McMaster"] == f"rgb-sigma15 v{protocol.as_dict()['version']}: {protocol.describe()}"
    assert tags[f"{DATA_DIGEST_PREFIX}McMaster"] == check.digest
    inputs = {item.dataset.name: item for item in run.inputs.dataset_inputs}
    assert inputs["McMaster"].dataset.digest == check.digest[:36]
    assert {tag.key: tag.value for tag in inputs["McMaster"].tags}["mlflow.data.context"] == "validation"
    assert tags[DTYPE_TAG] == resolved_precision("auto") != "auto"
    assert (tags[REPORTED_CHECKPOINT_TAG], tags[REPORTED_ITERATION_TAG]) == ("last", "2")
    record = describe_record(run)
    assert "metrics from checkpoint: last, iteration 2" in record and f"dtype {tags[DTYPE_TAG]}" in "".join(record)
    line, = protocol_lines([run])
    assert line.startswith(f"{protocol.describe()} — protocol v{protocol.as_dict()['version']}; McMaster: benchmark "
                           "McMaster") and line.endswith(f"digest {check.digest}")

    card = subprocess.run([str(BIN / "restorch"), "register", run.info.run_id, "--name", "bench-val-model"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert card.returncode == 0, card.stderr[-3000:]
    shown = subprocess.run([str(BIN / "restorch"), "registry", "show", "bench-val-model/1"], cwd=tmp_path,
                           capture_output=True, text=True, timeout=300)
    assert shown.returncode == 0, shown.stderr[-3000:]
    assert "metrics from checkpoint: last, iteration 2" in shown.stdout and f"dtype {tags[DTYPE_TAG]}" in shown.stdout
    assert f"McMaster {check.digest}" in shown.stdout
    assert "- catalogued benchmark set McMaster: benchmark McMaster, protocol rgb-sigma15 v" in shown.stdout
