"""The benchmark cannot rot: ``benchmarks/run.py --quick --fast-paths`` runs end to end and writes its records.

The quick run is a smoke test (tiny sizes, 2 repeats): the checks are on the JSON records it writes (every
section present, the fields each record kind must have, timings positive and finite, quartiles and ranges ordered,
ratios finite, served answers all right), never on whether a target is met and never on markdown labels. The pure
parts of the harness (statistics, targets, cell formats) are tested directly.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.records import Check, Ratio, Stats, Target  # noqa: E402
from benchmarks.report import render_cell  # noqa: E402

QUICK_SECTIONS = ["predict", "load", "serving", "size", "scaling", "architectures", "fast"]
REPEATS = 2  # --quick


# ----------------------------------------------------------------------------------------------------------------
# Pure parts
# ----------------------------------------------------------------------------------------------------------------
def test_stats_are_numpy_percentiles_and_keep_the_samples_in_order():
    samples = [0.5, 0.1, 0.4, 0.2, 0.3, 0.9]
    stats = Stats.of(samples)
    assert stats.samples == tuple(samples)
    assert (stats.q25, stats.median, stats.q75) == tuple(np.percentile(samples, [25, 50, 75]))
    with pytest.raises(ValueError):
        Stats.of([])


def test_paired_ratio_pairs_repeat_by_repeat():
    numerator, denominator = Stats.of([2.0, 6.0, 3.0]), Stats.of([1.0, 2.0, 3.0])
    ratio = Ratio.paired(numerator, denominator)  # per repeat: 2, 3, 1
    assert (ratio.median, ratio.low, ratio.high) == (2.0, 1.0, 3.0)
    with pytest.raises(ValueError):
        Ratio.paired(numerator, Stats.of([1.0, 2.0]))


@pytest.mark.parametrize(
    ("target", "value", "holds"),
    [
        (Target(low=0.95), 0.95, True),
        (Target(low=0.95), 0.9499, False),
        (Target(high=1.2), 1.2, True),
        (Target(high=1.0, strict_high=True), 1.0, False),
        (Target(high=1.0, strict_high=True), 0.999, True),
        (Target(low=0.8, high=1.1, unit=""), 1.11, False),
        (Target(low=0.8), math.nan, False),
        (Target(high=4.0), math.inf, False),
    ],
)
def test_target_bounds(target, value, holds):
    assert target.holds(value) is holds


def test_check_met_needs_the_extra_condition_and_is_none_without_a_target():
    target = Target(low=1.10, also="max |diff| <= 1e-4")
    assert Check.of("s", "fast", 1.5, target).met is True
    assert Check.of("s", "fast", 1.5, target, condition=False).met is False
    assert Check.of("s", "reported", 1.5, None).met is None


def test_cells_render_numbers_in_their_format():
    assert render_cell(None, "time") == ""
    assert render_cell(None, "met") == "n/a"
    assert render_cell(False, "met") == "NOT met"
    assert render_cell(0.0123, "time") == "12.3 ms"
    assert render_cell(0.222, "percent") == "22.2%"
    assert render_cell(3 * 1024 * 1024, "bytes") == "3.00 MiB"
    assert render_cell(Target(high=1.0, strict_high=True), "target") == "< 1x"
    assert render_cell(Target(high=0.2, unit="%"), "target") == "<= 20%"
    assert render_cell(Ratio(1.5, 1.25, 2.0), "text") == "1.5x [1.25–2]"


# ----------------------------------------------------------------------------------------------------------------
# The quick run, end to end
# ----------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def quick_run(tmp_path_factory) -> tuple[dict[str, Any], str, Path]:
    folder = tmp_path_factory.mktemp("bench")
    out, records = folder / "RESULTS.md", folder / "records.json"
    completed = subprocess.run(
        [sys.executable, "benchmarks/run.py", "--quick", "--fast-paths", "--out", str(out), "--records", str(records)],
        cwd=REPO, capture_output=True, text=True, timeout=900,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    return json.loads(records.read_text(encoding="utf-8")), out.read_text(encoding="utf-8"), folder


def _records(data: dict[str, Any], key: str, kind: str) -> list[dict[str, Any]]:
    section = next(s for s in data["sections"] if s["key"] == key)
    return [r for t in section["tables"] if t["kind"] == kind for r in t["records"]]


def _walk(value: Any) -> Iterator[dict[str, Any]]:
    """Every JSON object nested in ``value``."""
    if isinstance(value, dict):
        yield value
        for item in value.values():
            yield from _walk(item)
    elif isinstance(value, list):
        for item in value:
            yield from _walk(item)


def _positive(value: float) -> bool:
    return math.isfinite(value) and value > 0


@pytest.mark.slow
def test_quick_run_has_every_section_and_well_formed_checks(quick_run):
    data, _, _ = quick_run
    assert [s["key"] for s in data["sections"]] == QUICK_SECTIONS
    checks = [c for s in data["sections"] for c in s["checks"]]
    # section 6 (architectures) is informational, without checks; 7 is the fast paths
    assert {c["section"].split()[0] for c in checks} == {"1", "2", "3", "4", "5", "7"}
    for check in checks:
        assert math.isfinite(check["value"]), check
        assert check["unit"] in ("x", "%", "s", "B", ""), check
        assert (check["met"] is None) == (check["target"] is None), check
        assert check["met"] in (True, False, None), check


@pytest.mark.slow
def test_quick_run_statistics_are_positive_finite_and_ordered(quick_run):
    data, _, _ = quick_run
    stats = ratios = 0
    for obj in _walk(data["sections"]):
        if set(obj) == {"samples", "median", "q25", "q75"}:
            assert len(obj["samples"]) >= REPEATS and all(_positive(v) for v in obj["samples"]), obj
            assert min(obj["samples"]) <= obj["q25"] <= obj["median"] <= obj["q75"] <= max(obj["samples"]), obj
            stats += 1
        elif set(obj) == {"median", "low", "high"}:
            assert all(_positive(obj[k]) for k in obj) and obj["low"] <= obj["median"] <= obj["high"], obj
            ratios += 1
    assert stats >= 30 and ratios >= 20, (stats, ratios)  # the quick run has 39 and 33


@pytest.mark.slow
def test_quick_run_section_records(quick_run):
    data, _, _ = quick_run
    predict = _records(data, "predict", "PredictComparison")
    assert sorted((r["gridsize"], r["batch"]) for r in predict) == [(1, 1), (1, 16), (2, 1), (2, 16)]
    for row in predict:  # the same weights on the same input: eager (contiguous) vs the default (NHWC on the CPU)
        assert row["max_abs_diff"] <= 1e-5 and row["implied"] > 0 and row["layout_gain"]["median"] > 0, row
        assert _positive(row["raw_model_layout"]["median"]), row
        assert (row["target"] is None) == (row["batch"] < 16), row
    # the eager reference really runs the other layout (NCHW rounds sums differently from NHWC somewhere)
    assert any(row["max_abs_diff"] > 0 for row in predict), predict
    layers = _records(data, "predict", "LayerOverhead")
    assert {r["batch"] for r in layers} == {1, 16} and all(_positive(r["seconds"]) for r in layers)

    loads = _records(data, "load", "LoadTiming")
    assert len(loads) == 8 and len(_records(data, "load", "LoadComparison")) == 6
    assert all(_positive(r["time"]["median"]) for r in loads)
    assert _records(data, "load", "ProfileEntry") and _records(data, "load", "LoadPhase")
    # the checks' costs: the four pickles the load scans (manifest, one params.dill - the second has the same bytes -
    # and the data.pkl of model.pth and of the metadata), the digests, the finite check, beside both whole loads
    costs = {r["part"].split(" (")[0].split(":")[0]: r for r in _records(data, "load", "CheckCost")}
    assert set(costs) == {"mlflow.pytorch.load_model", "load_torch_bundle", "pickle structure scans of its 4 pickles",
                          "sha256 + CRC-32 of model.pth", "finite check of its 63 weights"}, sorted(costs)
    assert all(_positive(r["time"]["median"]) for r in costs.values())
    whole, pickle_load = costs["load_torch_bundle"]["time"]["samples"], costs["mlflow.pytorch.load_model"]["time"]
    scans, finite = costs["pickle structure scans of its 4 pickles"], costs["finite check of its 63 weights"]
    assert scans["time"]["median"] + finite["time"]["median"] < float(np.median(whole))
    load_checks = {c["what"].split(",")[0]: c for s in data["sections"] if s["key"] == "load" for c in s["checks"]}
    less = load_checks["load_torch_bundle less its main-thread checks (scans"]
    expected = np.median([(w - s - f) / p for w, s, f, p in zip(whole, scans["time"]["samples"],
                                                                finite["time"]["samples"], pickle_load["samples"])])
    assert less["met"] is None and less["value"] > 0 and less["value"] == pytest.approx(expected, rel=1e-12), less

    # the CPU default layout against eager on every fixture bundle, each family present, met exactly when within 1e-5
    agreement = _records(data, "predict", "FixtureAgreement")
    families = {r["fixture"].split("/")[0] for r in agreement}
    assert families == {"checkpoints", "tensorflow", "upstream", "upstream_fno", "demo_bundle"}, families
    for row in agreement:
        assert math.isfinite(row["default_vs_eager"]) and row["met"] == (row["default_vs_eager"] <= 1e-5), row
        assert math.isfinite(row["eager_backends"]) and row["eager_backends"] >= 0, row
        assert 0 <= row["eager_vs_float64"] < 1e-4 and 0 <= row["default_vs_float64"] < 1e-4, row  # every family
    summary = next(c for s in data["sections"] if s["key"] == "predict" for c in s["checks"]
                   if c["what"].startswith("default CPU layout vs eager on every fixture bundle"))
    assert summary["value"] == max(r["default_vs_eager"] for r in agreement)
    assert summary["met"] == all(r["met"] for r in agreement), summary

    served = _records(data, "serving", "ServedLoad")
    assert {r["server"] for r in served} == {"ours", "mlflow.pytorch"}
    for row in served:
        assert row["requests"] > 0 and row["bad"] == 0 and _positive(row["requests_per_s"]), row
        assert 0 < row["p50_seconds"] <= row["p99_seconds"], row
    for row in _records(data, "serving", "ScoringSteps"):
        assert 0 < row["encode_share"] < 1 and row["response_bytes"] > 0, row

    sizes = _records(data, "size", "ArtifactSize")
    bundles = [r for r in sizes if r["target"] is not None]
    assert len(bundles) == 2 and all(0.5 < r["vs_raw"] < 1.5 for r in bundles), bundles
    memory = _records(data, "size", "LoadMemory")
    assert len(memory) == 5 and all(r["peak_growth"] > 0 and math.isfinite(r["vs_floor"]) for r in memory)

    fits = _records(data, "scaling", "ScalingFit")
    assert len(fits) == 2 and all(math.isfinite(r["value"]) and r["value"] > 0 for r in fits)
    assert {(r["N"], r["batch"]) for r in _records(data, "scaling", "ScalingPoint")} == {(64, 1), (64, 4), (64, 16),
                                                                                         (128, 4)}

    fast = _records(data, "fast", "FastPath")
    timed = [r for r in fast if r["speed"] is not None]
    assert any(r["option"].startswith("channels_last") for r in timed), fast
    assert all(r["max_abs_diff"] <= 1e-4 for r in timed), timed  # same network; layouts/threads reorder sums only


def test_eager_copy_runs_the_contiguous_layout_of_an_nhwc_model():
    """The benchmarks' eager reference: a copy of the model's NHWC module that runs contiguous activations (the
    model keeps its NHWC flag), bit for bit the eager network's output."""
    import copy

    import torch

    from benchmarks.models import build_network, eager_copy
    from mlflow_ptycho_flavor.network import use_channels_last

    reference = build_network(N=64, gridsize=1, n_filters_scale=1, seed=3).eval()
    model_network = use_channels_last(copy.deepcopy(reference))
    eager = eager_copy(model_network)
    assert model_network.channels_last and not eager.channels_last
    x, factor = torch.rand(2, 1, 64, 64), torch.ones(2, 1, 1, 1)
    with torch.inference_mode():
        assert torch.equal(eager(x, factor), reference(x, factor))


@pytest.mark.slow
def test_quick_run_machine_and_no_absolute_paths(quick_run):
    data, markdown, folder = quick_run
    machine = data["machine"]
    assert machine["device"] == "cpu" and machine["repeats"] == REPEATS and machine["usable_cores"] >= 1
    assert machine["threads_pinned"] is True and machine["torch_threads"] == 1  # --quick pins one thread
    assert machine["command"].startswith("python benchmarks/run.py --quick")
    text = json.dumps(data)
    for path in {str(REPO), str(folder), str(folder.resolve())}:
        assert path not in markdown and path not in text, path
    tables = sum(len(s["tables"]) for s in data["sections"]) + 2  # + the summary and the machine
    assert sum(line.startswith("|---") for line in markdown.splitlines()) == tables
