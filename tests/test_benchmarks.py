"""The benchmark cannot rot: ``benchmarks/run.py --quick --fast-paths`` runs end to end and writes a full report.

The quick run is a smoke test (tiny sizes, 2 repeats): only the report's shape and the sanity of its numbers are
checked here (every section and summary row present, every comparison row marked met / NOT met / n/a, medians and
ratios positive and finite), never whether a target is met.
"""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent

SECTIONS = [
    "## Summary",
    "## 1. Predict",
    "## 2. Load",
    "## 3. Serving",
    "## 4. Size and memory",
    "## 5. Scaling",
    "## 6. Optional fast paths",
    "## Machine",
]

SUMMARY_ROWS = [
    "pyfunc/raw throughput, g1 B=16",
    "pyfunc/raw throughput, g2 B=16",
    "pyfunc per-call overhead, batch 1",
    "load_torch_bundle / floor, g1",
    "load_torch_bundle / mlflow.pytorch.load_model (pt2), g1",
    "flavor.load_model / floor, g1",
    "flavor.load_model / mlflow.pytorch.load_model (pt2), g1",
    "pyfunc.load_model (ours) / floor, g1",
    "pyfunc.load_model (ours) / pyfunc.load_model (mlflow.pytorch pt2), g1",
    "load_torch_bundle / mlflow.pytorch.load_model (pickle), g1",
    "pyfunc.load_model (ours) / pyfunc.load_model (mlflow.pytorch pickle), g1",
    "ours/mlflow.pytorch req/s, B=1",
    "JSON encode share of predict+encode, B=1",
    "bundle / raw state_dict bytes, g1",
    "bundle / raw state_dict bytes, g2",
    "load_torch_bundle peak RSS growth, g1",
    "flavor.load_model peak RSS growth, g1",
    "pyfunc.load_model peak RSS growth, g1",
    "batch exponent k (N=64)",
    "time N=128 / N=64",
    "B=16 in chunks of 4 vs one chunk",
    "options worth it",
]

MACHINE_ROWS = ["CPU", "logical cores", "device benchmarked", "torch intra-op / inter-op threads", "torch", "mlflow",
                "numpy", "load average"]

UNITS = {"s": 1.0, "ms": 1e-3, "µs": 1e-6}
TIME = r"(-?[0-9.]+(?:e[-+]?\d+)?) (s|ms|µs)"
STAT = re.compile(rf"^{TIME} \[{TIME}–{TIME}\]$")
RATIO = re.compile(r"^(-?[0-9.]+(?:e[-+]?\d+)?)x$")
MET_CELL = re.compile(r"^(met|NOT met|n/a)( \(.*\))?$")


def _tables(text: str) -> list[tuple[list[str], list[list[str]]]]:
    """Every markdown table as (header, rows), cells stripped (escaped pipes kept inside cells)."""
    tables, lines = [], text.splitlines()
    i = 0
    split = lambda line: [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]  # noqa: E731
    while i < len(lines):
        if lines[i].startswith("|") and i + 1 < len(lines) and lines[i + 1].startswith("|---"):
            header = split(lines[i])
            rows = []
            i += 2
            while i < len(lines) and lines[i].startswith("|"):
                rows.append(split(lines[i]))
                i += 1
            tables.append((header, rows))
        else:
            i += 1
    return tables


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("bench") / "RESULTS.md"
    completed = subprocess.run(
        [sys.executable, "benchmarks/run.py", "--quick", "--fast-paths", "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=900,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    assert out.exists(), completed.stderr[-2000:]
    return out.read_text(encoding="utf-8")


def test_quick_report_has_every_section_and_summary_row(report):
    for heading in SECTIONS:
        assert heading in report, heading
    header, rows = _tables(report.split("## Summary", 1)[1])[0]
    assert header == ["section", "what", "value", "target", "met"]
    labels = [row[1] for row in rows]
    for label in SUMMARY_ROWS:
        assert any(l.startswith(label) for l in labels), (label, labels)
    for row in rows:
        assert MET_CELL.match(row[-1]), row


def test_quick_report_tables_are_well_formed_and_marked(report):
    tables = _tables(report)
    assert len(tables) >= 15
    for header, rows in tables:
        for row in rows:
            assert len(row) == len(header), (header, row)
            for cell in row:
                assert not re.search(r"\b(nan|inf)\b", cell, re.IGNORECASE), (header, row)
        if header and header[-1] == "met":
            assert rows, header
            for row in rows:
                assert MET_CELL.match(row[-1]), (header, row)


def test_quick_report_numbers_are_positive_and_finite(report):
    stats = ratios = 0
    for header, rows in _tables(report):
        for row in rows:
            for column, cell in zip(header, row):
                match = STAT.match(cell)
                if match:
                    values = [float(match.group(i)) * UNITS[match.group(i + 1)] for i in (1, 3, 5)]
                    assert all(math.isfinite(v) and v > 0 for v in values), (column, cell)
                    assert values[1] <= values[0] <= values[2], (column, cell)  # IQR brackets the median
                    stats += 1
                match = RATIO.match(cell)
                if match and "gain" not in column and "−" not in column:
                    value = float(match.group(1))
                    assert math.isfinite(value) and value > 0, (column, cell)
                    ratios += 1
    assert stats >= 40 and ratios >= 20, (stats, ratios)


def test_quick_report_serving_and_machine_rows(report):
    serving = report.split("## 3. Serving", 1)[1].split("## 4.", 1)[0]
    header, rows = _tables(serving)[0]
    for row in rows:
        record = dict(zip(header, row))
        assert float(record["req/s"]) > 0 and record["wrong/5xx"] == "0", row
    machine = dict((row[0], row[1]) for row in _tables(report.split("## Machine", 1)[1])[0][1])
    for key in MACHINE_ROWS:
        assert any(k.startswith(key) and v for k, v in machine.items()), key
    assert machine["device benchmarked"] == "cpu"
