"""``benchmarks/gpu_check.sh`` cannot rot while no GPU is lent: its CPU dry run runs end to end in the suite.

The dry run (``GPU_CHECK_DEVICE=cpu``) takes the same steps as the GPU run — CUDA-marked tests, predict/load/serving
sections, precision options — at tiny sizes. The checks are on the JSON records it writes (every step present and
finished, the CUDA tests collected and skipped rather than failed, errors against fp32 finite and within their
tolerances, outputs computed twice in this run equal where the arithmetic is the same), never on markdown labels
and never on whether a speed target is met.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "benchmarks" / "gpu_check.sh"
COMMITTED = REPO / "benchmarks" / "RESULTS-gpu.md"
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.sections.precision import CPU_ROW, TOLERANCES, options  # noqa: E402

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="gpu_check.sh is a bash script")


def _run(tmp: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, "PYTHON": sys.executable, "TMPDIR": str(tmp), **env}
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=tmp, env=environment, capture_output=True, text=True,
                          timeout=300)


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory) -> tuple[dict[str, Any], Path, subprocess.CompletedProcess]:
    tmp = tmp_path_factory.mktemp("gpu-check")
    committed_before = COMMITTED.read_bytes() if COMMITTED.exists() else None
    completed = _run(tmp, "--records", str(tmp / "records.json"), GPU_CHECK_DEVICE="cpu")
    assert completed.returncode == 0, completed.stderr[-4000:]
    assert (COMMITTED.read_bytes() if COMMITTED.exists() else None) == committed_before  # never the committed file
    return json.loads((tmp / "records.json").read_text(encoding="utf-8")), tmp, completed


def _records(data: dict[str, Any], key: str, kind: str) -> list[dict[str, Any]]:
    section = next(s for s in data["sections"] if s["key"] == key)
    return [r for t in section["tables"] if t["kind"] == kind for r in t["records"]]


def _positive(value: float) -> bool:
    return math.isfinite(value) and value > 0


@pytest.mark.slow
def test_dry_run_takes_every_step_and_writes_to_a_temporary_folder(dry_run):
    data, tmp, completed = dry_run
    assert [s["key"] for s in data["sections"]] == ["device", "tests", "predict", "load", "serving", "precision",
                                                    "steps"]
    steps = _records(data, "steps", "StepOutcome")
    assert [s["step"] for s in steps] == ["tests", "setup", "predict", "load", "serving", "precision"]
    assert all(s["ok"] and s["problem"] == "" and _positive(s["seconds"]) for s in steps), steps
    (device,) = _records(data, "device", "DeviceInfo")
    assert device["device"] == "cpu" and device["dry_run"] is True and device["torch"] == str(torch.__version__)
    machine = data["machine"]
    assert machine["device"] == "cpu" and machine["command"].startswith("bash benchmarks/gpu_check.sh --dry-run")
    assert str(tmp) not in machine["command"]  # absolute paths are shown cut to their name
    report = tmp / "ptycho-gpu-check-dry-run" / "RESULTS-gpu.md"
    assert report.is_file() and str(report) in completed.stderr


def test_dry_run_collects_the_cuda_tests_and_skips_them_without_a_gpu(dry_run):
    data, _, _ = dry_run
    (run,) = _records(data, "tests", "TestRun")
    assert "-m cuda" in run["command"] and "tests/test_flavor.py" in run["command"]
    assert run["returncode"] == 0 and run["failed"] == run["errors"] == 0 and run["met"] is True, run
    assert run["skipped"] >= 2 and run["passed"] == 0, run  # test_cuda_load_matches_cpu_output, gridsizes 1 and 2


def test_dry_run_benchmark_rows(dry_run):
    data, _, _ = dry_run
    predict = _records(data, "predict", "PredictComparison")
    assert sorted((r["gridsize"], r["batch"]) for r in predict) == [(1, 1), (1, 4)]
    assert all(r["max_abs_diff"] <= 1e-5 and _positive(r["raw"]["median"]) for r in predict), predict
    # the GPU run's steps: the CPU default layout's own checks (section 1 of benchmarks/run.py) are not among them
    assert not _records(data, "predict", "FixtureAgreement") and not _records(data, "predict", "LayoutOp")
    loads = _records(data, "load", "LoadTiming")
    assert len(loads) == 8 and all(_positive(r["time"]["median"]) for r in loads)
    served = _records(data, "serving", "ServedLoad")
    assert {r["server"] for r in served} == {"ours", "mlflow.pytorch"}
    assert all(r["requests"] > 0 and r["bad"] == 0 and _positive(r["requests_per_s"]) for r in served), served


def test_dry_run_precision_options_against_fp32(dry_run):
    data, _, _ = dry_run
    rows = {r["option"]: r for r in _records(data, "precision", "PrecisionCheck")}
    measured = {o.name: o for o in options("eager")}
    assert set(rows) == {CPU_ROW, *measured}
    # the "device" is the CPU here: a copy of the same network on the same input in this process, one thread
    same = rows[CPU_ROW]
    assert same["max_abs_error"] == 0.0 and same["met"] is True
    for name, option in measured.items():
        row = rows[name]
        if option.cuda_only:
            assert row["problem"] == "CUDA only" and row["met"] is None and row["max_abs_error"] is None, row
            continue
        rel_tol, abs_tol = TOLERANCES[option.arithmetic]
        assert (row["rel_tolerance"], row["max_abs_tolerance"]) == (rel_tol, abs_tol)
        assert row["problem"] == "" and row["met"] is True, row
        assert 0 <= row["max_abs_error"] <= abs_tol and 0 <= row["rel_error"] <= rel_tol, row
        if option.autocast is not None:  # half precision really ran: its rounding shows
            assert row["rel_error"] > 1e-6, row
        assert _positive(row["speed"]["median"]) and _positive(row["first_call_seconds"]), row
    checks = [c for s in data["sections"] if s["key"] == "precision" for c in s["checks"]]
    assert checks and all(c["met"] in (True, None) for c in checks)


def test_refusals_name_their_cause(tmp_path):
    missing = _run(tmp_path, "--dry-run", PYTHON=str(tmp_path / "no-such-python"))
    assert missing.returncode == 2 and "is not an executable" in missing.stderr
    unknown = _run(tmp_path, "--dry-run", "--only", "tests,nonsense")
    assert unknown.returncode == 2 and "nonsense" in unknown.stderr
    if not torch.cuda.is_available():
        no_gpu = _run(tmp_path, GPU_CHECK_DEVICE="cuda")
        assert no_gpu.returncode == 2 and "CUDA is not available" in no_gpu.stderr
