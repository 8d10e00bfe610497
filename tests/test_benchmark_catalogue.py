"""The benchmark catalogue (workloads/benchmarks.py) and `restorch data check --benchmark`."""
from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import scipy.io

from orchestrator.cli import main
from workloads import benchmarks
from workloads.benchmarks import BENCHMARKS, Benchmark, content_digest
from workloads.data import LAYOUTS
from workloads.files import write_image
from workloads.synth import write_dataset
from workloads.tasks import TASKS, get_task

TINY = Benchmark("TinyRain", "deraining", 4, "restormer", "input/ + target/", ("test entry",), size=(32, 32))


def test_catalogue_is_consistent():
    required = {"Rain100L", "Rain100H", "Test100", "Test1200", "Test2800", "SIDD-val", "DND", "CBSD68", "Kodak24",
                "McMaster", "Urban100", "GoPro", "HIDE", "RealBlur-J", "RealBlur-R", "LOL-v1", "SOTS-indoor",
                "SOTS-outdoor", "Snow100K-L", "Snow100K-2000", "LOL-v2-real", "LOL-v2-synthetic", "ARAD-1K-val"}
    assert required <= set(BENCHMARKS)
    for name, entry in BENCHMARKS.items():
        assert entry.name == name
        assert entry.task in TASKS, name
        assert entry.count > 0, name
        assert entry.sources and all(source.strip() for source in entry.sources), name
        assert entry.layout in {*LAYOUTS, "clean", "sidd_blocks", "dnd"}, name
        assert entry.release, name
        # linked to the task's protocol object (or the entry's own), not a copy of its parameters
        assert entry.protocol() is (entry.metric_protocol or TASKS[entry.task].protocol), name
        assert bool(entry.sigmas) == (TASKS[entry.task].noise_sigma is not None), name
        if not entry.count_confirmed:
            assert any("count" in fact for fact in entry.unconfirmed), f"{name}: an unconfirmed count must say so"
    assert BENCHMARKS["CBSD68"].protocol(50).noise_sigma == 50
    assert BENCHMARKS["Rain100H"].protocol().color_space == "y"
    assert BENCHMARKS["ARAD-1K-val"].protocol().metrics == ("mrae", "rmse", "psnr")


@pytest.fixture
def tiny(monkeypatch, tmp_path) -> Path:
    """A folder laid out like the test-only entry TinyRain: 4 synthetic 32x32 pairs in input/ + target/."""
    monkeypatch.setitem(BENCHMARKS, TINY.name, TINY)
    write_dataset(tmp_path / "synth", get_task("deraining"), count=5, size=32, val_fraction=0.2)
    return tmp_path / "synth" / "train"


def _check(folder: Path, capsys, *extra: str) -> tuple[int, str]:
    code = main(["data", "check", str(folder), "--benchmark", TINY.name, *extra])
    return code, capsys.readouterr().out


def _digest(out: str) -> str:
    return re.search(r"content digest: ([0-9a-f]{64})", out).group(1)


def test_matching_folder_passes_and_records_its_digest(tiny, capsys):
    code, out = _check(tiny, capsys, "--json")
    assert code == 0, out
    assert "TinyRain (deraining): 4 of 4 image(s)" in out
    record = json.loads(out.strip().splitlines()[-1])
    assert record["benchmark"] == "TinyRain" and record["digest"] == _digest(out)
    assert record["protocol"]["color_space"] == "y" and record["protocol"]["version"] >= 1


def test_digest_is_stable_and_changes_with_one_byte(tiny, capsys, tmp_path):
    first = _digest(_check(tiny, capsys)[1])
    assert _digest(_check(tiny, capsys)[1]) == first
    copy = tmp_path / "copy"
    shutil.copytree(tiny, copy)  # another place, other modification times: same content, same digest
    assert _digest(_check(copy, capsys)[1]) == first
    target = sorted((copy / "target").iterdir())[0]
    data = bytearray(target.read_bytes())
    data[-5] ^= 1  # inside the PNG's trailer: the image still reads the same
    target.write_bytes(bytes(data))
    assert _digest(_check(copy, capsys)[1]) != first


def test_wrong_count_fails_naming_the_counts(tiny, capsys):
    for side in ("input", "target"):
        (tiny / side / "0000.png").unlink()
    code, out = _check(tiny, capsys)
    assert code == 2
    assert "holds 3 image(s), TinyRain has 4: add the missing ones" in out
    assert "content digest" not in out


def test_unpaired_file_fails_naming_it(tiny, capsys):
    (tiny / "target" / "0001.png").unlink()
    code, out = _check(tiny, capsys)
    assert code == 2
    assert f"{tiny / 'input' / '0001.png'} has no target" in out


def test_size_mismatches_fail(tiny, capsys):
    rng = np.random.default_rng(0)
    write_image(tiny / "target" / "0002.png", rng.random((40, 32, 3)))
    code, out = _check(tiny, capsys)
    assert code == 2 and "is 32x32 but" in out and "is 40x32" in out
    for side in ("input", "target"):  # a pair of equal sizes, but not the set's fixed size
        write_image(tiny / side / "0002.png", rng.random((48, 48, 3)))
    code, out = _check(tiny, capsys)
    assert code == 2 and "TinyRain images are 32x32 (HxW) but" in out and "48x48" in out


def test_unknown_benchmark_lists_the_known_ones(tmp_path, capsys):
    assert main(["data", "check", str(tmp_path), "--benchmark", "Rain200X"]) == 2
    err = capsys.readouterr().err
    assert "unknown benchmark 'Rain200X'" in err and "Rain100H" in err and "ARAD-1K-val" in err


def test_sidd_blocks_are_checked_by_their_shape(monkeypatch, tmp_path):
    blocks = (2, 3, 16, 16, 3)
    monkeypatch.setattr(benchmarks, "SIDD_BLOCKS", blocks)
    monkeypatch.setitem(BENCHMARKS, "SIDD-val", dataclasses.replace(BENCHMARKS["SIDD-val"], count=6, size=(16, 16)))
    for file_name, variable in benchmarks.SIDD_FILES.items():
        scipy.io.savemat(tmp_path / file_name, {variable: np.zeros(blocks, dtype=np.uint8)})
    check = benchmarks.check_benchmark(tmp_path, "SIDD-val")
    assert not check.problems and check.count == 6 and check.digest
    scipy.io.savemat(tmp_path / "ValidationGtBlocksSrgb.mat", {"ValidationGtBlocksSrgb": np.zeros((2, 3, 16, 8, 3), np.uint8)})
    problems = benchmarks.check_benchmark(tmp_path, "SIDD-val").problems
    assert any("should hold ValidationGtBlocksSrgb of shape 2x3x16x16x3" in problem for problem in problems)


def test_dnd_names_missing_and_extra_files(tmp_path):
    (tmp_path / "images_srgb").mkdir()
    (tmp_path / "info.mat").write_bytes(b"boxes")
    for i in range(1, 51):
        (tmp_path / "images_srgb" / f"{i:04d}.mat").write_bytes(bytes([i]))
    check = benchmarks.check_benchmark(tmp_path, "DND")
    assert not check.problems and check.count == 50 and check.digest == content_digest(tmp_path, check.files)
    (tmp_path / "images_srgb" / "0007.mat").unlink()
    (tmp_path / "images_srgb" / "0051.mat").write_bytes(b"x")
    problems = benchmarks.check_benchmark(tmp_path, "DND").problems
    assert any("lacks 0007.mat" in problem for problem in problems)
    assert any("DND does not have: 0051.mat" in problem for problem in problems)


def test_other_layout_fails_naming_what_the_folder_holds(tiny, capsys):
    (tiny / "input").rename(tiny / "lq")
    (tiny / "target").rename(tiny / "gt")
    code, out = _check(tiny, capsys)
    assert code == 2 and "should hold one TinyRain set laid out as input/ + target/" in out and "basicsr layout" in out


def test_unconfirmed_count_only_warns(tiny, monkeypatch, capsys):
    monkeypatch.setitem(BENCHMARKS, TINY.name, dataclasses.replace(TINY, count=5, count_confirmed=False))
    code, out = _check(tiny, capsys)
    assert code == 0, out
    assert "warning:" in out and "holds 4 image(s), TinyRain has 5" in out and "not confirmed" in out
    assert _digest(out)


def test_sots_hazy_images_share_their_clean_image(monkeypatch, tmp_path):
    monkeypatch.setitem(BENCHMARKS, "SOTS-indoor", dataclasses.replace(BENCHMARKS["SOTS-indoor"], count=3))
    rng = np.random.default_rng(0)
    for name in ("1400_1.png", "1400_2.png", "1401_1.png"):
        (tmp_path / "hazy").mkdir(exist_ok=True)
        write_image(tmp_path / "hazy" / name, rng.random((24, 20, 3)))
    for name in ("1400.png", "1401.png"):
        (tmp_path / "gt").mkdir(exist_ok=True)
        write_image(tmp_path / "gt" / name, rng.random((24, 20, 3)))
    check = benchmarks.check_benchmark(tmp_path, "SOTS-indoor")
    assert not check.problems and check.count == 3
    assert check.digest == content_digest(tmp_path, sorted((tmp_path / "hazy").iterdir()) + sorted((tmp_path / "gt").iterdir()))
