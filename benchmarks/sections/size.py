"""Section 4: bytes on disk, and the peak-RSS growth of one load in a fresh interpreter (``probes.rss``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.config import Context
from benchmarks.harness import Background
from benchmarks.models import ModelSet
from benchmarks.probes import run_probe
from benchmarks.records import Check, RecordTable, SectionResult, Target, column
from benchmarks.report import fmt_bytes

__all__ = ["KEY", "TITLE", "SIZE_TARGET", "MEMORY_TARGET", "ArtifactSize", "LoadMemory", "start_early", "run"]

KEY = "size"
TITLE = "4. Size and memory"
#: Our bundle's bytes against the raw ``torch.save(state_dict)`` bytes.
SIZE_TARGET = Target(high=1.05)
#: The peak-RSS growth of each of our loads against the floor's.
MEMORY_TARGET = Target(high=1.5)
OUR_LOADERS = ("load_torch_bundle", "flavor.load_model", "pyfunc.load_model")
RSS_LOADERS = ("floor", *OUR_LOADERS, "mlflow.pytorch.load_model (pt2)")


@dataclass(frozen=True)
class ArtifactSize:
    """Bytes of one saved artifact, against the raw state_dict; only our bundle has a target."""

    N: int = column("N")
    gridsize: int = column("gridsize")
    artifact: str = column("artifact")
    size_bytes: int = column("bytes", "bytes_exact")
    vs_raw: float = column("vs raw state_dict", "ratio")
    target: Target | None = column("target", "target")
    met: bool | None = column("met", "met")


@dataclass(frozen=True)
class LoadMemory:
    """Peak-RSS growth of one load in a forked child of a fresh interpreter; only our loaders have a target."""

    N: int = column("N")
    gridsize: int = column("gridsize")
    loader: str = column("loader")
    peak_growth: int = column("peak RSS growth", "bytes")
    weights: int = column("weights", "bytes")
    vs_weights: float = column("growth / weights", "ratio")
    vs_floor: float = column("growth / floor's", "ratio")
    target: Target | None = column("target", "target")
    met: bool | None = column("met", "met")


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def probe_args(ctx: Context) -> dict[str, Any]:
    """The RSS probe's jobs: every loader of every model set that has the ``mlflow.pytorch`` references."""
    jobs = []
    for gridsize, model_set in ctx.models.items():
        if not model_set.has_references:
            continue
        paths = {"floor": model_set.state_path, "load_torch_bundle": model_set.bundle,
                 "flavor.load_model": model_set.ours_dir, "pyfunc.load_model": model_set.ours_dir,
                 "mlflow.pytorch.load_model (pt2)": model_set.pt2_dir}
        for loader in RSS_LOADERS:
            pt2_on_cpu = loader.endswith("(pt2)") and ctx.cfg.device != "cpu"  # pt2 weights stay on the CPU
            jobs.append({"key": gridsize, "loader": loader, "path": str(paths[loader]),
                         "device": "cpu" if pt2_on_cpu else ctx.cfg.device, "N": model_set.N,
                         "C": model_set.channels, "filters": model_set.filters})
    return {"jobs": jobs, "threads": ctx.threads.requested}


def start_early(ctx: Context) -> Background:
    """Run the RSS probe in the background now (``--quick``: it overlaps the earlier sections)."""
    args = probe_args(ctx)
    return Background(lambda: run_probe("rss", args, timeout=900, env=ctx.threads.subprocess_env()))


def _sizes(model_set: ModelSet) -> list[ArtifactSize]:
    raw = model_set.state_path.stat().st_size
    bundle = model_set.bundle.stat().st_size
    artifacts: list[tuple[str, int, Target | None]] = [
        ("raw state_dict (`torch.save`)", raw, None),
        ("our bundle `wts.h5.zip`", bundle, SIZE_TARGET),
        ("our MLflow model directory (bundle + MLmodel + env files)", _dir_bytes(model_set.ours_dir), None),
    ]
    if model_set.has_references:
        artifacts += [
            ("mlflow.pytorch pt2 `data/model.pt2`", (model_set.pt2_dir / "data" / "model.pt2").stat().st_size, None),
            ("mlflow.pytorch pt2 model directory", _dir_bytes(model_set.pt2_dir), None),
            ("mlflow.pytorch pickle `data/model.pth`", (model_set.pickle_dir / "data" / "model.pth").stat().st_size,
             None),
        ]
    return [ArtifactSize(model_set.N, model_set.gridsize, label, size, size / raw, target,
                         None if target is None else target.holds(size / raw)) for label, size, target in artifacts]


def run(ctx: Context) -> SectionResult:
    sizes: list[ArtifactSize] = []
    checks: list[Check] = []
    for gridsize, model_set in ctx.models.items():
        rows = _sizes(model_set)
        sizes += rows
        bundle = next(r for r in rows if r.target is not None)
        checks.append(Check.of("4 Size", f"bundle / raw state_dict bytes, g{gridsize}", bundle.vs_raw, SIZE_TARGET))

    pending = ctx.take_early(KEY)
    probe = pending.result() if pending is not None else run_probe("rss", probe_args(ctx), timeout=900,
                                                                   env=ctx.threads.subprocess_env())
    failed = [r for r in probe["results"] if "error" in r]
    if failed:
        raise RuntimeError(f"RSS probe failed: {failed}")
    floor = {r["key"]: r["peak_delta"] for r in probe["results"] if r["loader"] == "floor"}
    memory: list[LoadMemory] = []
    for result in probe["results"]:
        model_set = ctx.models[result["key"]]
        weights = model_set.state_path.stat().st_size
        growth = int(result["peak_delta"])
        vs_floor = growth / floor[result["key"]] if floor[result["key"]] > 0 else float("inf")
        ours = result["loader"] in OUR_LOADERS
        memory.append(LoadMemory(model_set.N, model_set.gridsize, result["loader"], growth, weights, growth / weights,
                                 vs_floor, MEMORY_TARGET if ours else None,
                                 MEMORY_TARGET.holds(vs_floor) if ours else None))
        if ours:
            checks.append(Check.of("4 Memory", f"{result['loader']} peak RSS growth / floor's, g{model_set.gridsize}",
                                   vs_floor, MEMORY_TARGET,
                                   detail=f"{fmt_bytes(growth)}; {growth / weights:.3g}x the weights"))
    intro = ("Bytes on disk, and the peak-RSS growth of one load: a fresh interpreter imports torch, numpy, mlflow, "
             "mlflow.pyfunc, mlflow.pytorch, torch.export and this package (so no loader pays for those imports), "
             "then forks one child per load; the child compares `ru_maxrss` before and after its load (anything a "
             "loader imports lazily counts). \"weights\" = bytes of `torch.save(state_dict)`. Targets (ours): "
             "bundle <= 1.05x the raw state_dict bytes; our loads' peak growth <= 1.5x the floor's (growth / weights "
             "is reported too, but at these model sizes the growth is dominated by fixed costs: allocator arenas, "
             "lazily imported modules).")
    return SectionResult(KEY, TITLE, intro, [
        RecordTable(ArtifactSize, sizes, "Size on disk"),
        RecordTable(LoadMemory, memory, "Peak RSS growth of one load (forked child of a fresh interpreter each)"),
    ], checks)
