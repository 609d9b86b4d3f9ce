#!/usr/bin/env python
"""One-command benchmark of the ``ptycho_torch`` flavor against the raw network, the floor and ``mlflow.pytorch``.

    python benchmarks/run.py [--quick] [--device cpu|cuda] [--out benchmarks/RESULTS.md] [--spark]
                             [--fast-paths] [--threads N] [--repeats R]

Everything runs in one process (plus the scoring servers and a few fresh-interpreter probes) on one machine, and
within each repeat the candidates are interleaved (rotating order), so machine noise hits them alike; tables give
medians with spreads (IQR over repeats, or min-max of per-repeat ratios) and ratios. Sections:

1. Predict: ``mlflow.pyfunc`` ``predict`` vs the raw network on the same arrays (N=64, gridsize 1 and 2).
   "raw" = ``torch.inference_mode()``, ``network(torch.from_numpy(x).to(device), factor)`` with a prebuilt
   ``(B, 1, 1, 1)`` ones factor on the device, and ``.cpu().numpy()`` of the complex64 result: no input
   validation, no output copy, no MLflow. Plus the per-call overhead at batch 1 (paired difference, and
   isolated with the network's forward stubbed out), where it goes (cProfile), and monkeypatched experiments.
2. Load: ``load_torch_bundle``, ``mlflow_ptycho_flavor.load_model`` and ``mlflow.pyfunc.load_model`` (local
   paths) vs the floor (``torch.load`` of the bare state_dict + constructing the module + ``load_state_dict``)
   and vs the same network saved by ``mlflow.pytorch.save_model`` in ``pt2`` format (``torch.export`` of a
   wrapper whose ``forward(x)`` returns ``torch.view_as_real(network(x, None))``) and in ``pickle`` format
   (loaded with ``MLFLOW_ALLOW_PICKLE_DESERIALIZATION=true``).
3. Serving: ``mlflow models serve`` of both on loopback, the same ``{"inputs": (B, 1, 64, 64)}`` payloads, bounded
   concurrent load in interleaved rounds; and, in-process, the scoring server's own request parsing
   (``_parse_json_data``), ``predict`` and response encoding (``predictions_to_json``) timed apart.
4. Size and memory: bundle vs raw state_dict bytes; peak RSS growth of each load in a fresh interpreter.
5. Scaling: pyfunc ``predict`` time vs batch (fitted exponent) and vs N (against the FLOP ratio).
6. Fast paths (``--fast-paths``): channels_last, thread count, TorchScript trace+freeze, ``torch.compile``.

``--quick`` runs a tiny version of every section (``n_filters_scale=1``, 2 repeats, batches 1 and 16, 10 serving
requests, one intra-op thread unless ``--threads`` says otherwise, servers and the RSS probe started in the
background, no ``torch.compile``) as a smoke test; its numbers are not the headline. ``--spark`` appends the rows of
``benchmarks/bench_spark.py`` when that module and pyspark are importable. ``--threads N`` pins
``torch.set_num_threads(N)`` for the run and ``OMP_NUM_THREADS``/``MKL_NUM_THREADS`` for the scoring servers.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import cProfile
import gc
import io
import json
import logging
import math
import os
import platform
import pstats
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

SERVING_ENV = "_MLFLOW_IS_IN_SERVING_ENVIRONMENT"
PICKLE_ENV = "MLFLOW_ALLOW_PICKLE_DESERIALIZATION"
N_DEFAULT = 64

MET, NOT_MET, NA = "met", "NOT met", "n/a"


# ================================================================================================================
# Configuration
# ================================================================================================================
@dataclass
class Config:
    quick: bool
    device: str
    out: Path
    spark: bool
    fast_paths: bool
    threads: int | None
    filters: int
    repeats: int
    gridsizes: tuple[int, ...] = (1, 2)
    batches: tuple[int, ...] = (1, 16, 128)
    scaling_batches: tuple[int, ...] = (1, 4, 16, 64, 128)
    scaling_n_batch: int = 16
    serving_batches: tuple[int, ...] = (1, 16)
    serving_requests: dict[int, int] = field(default_factory=lambda: {1: 200, 16: 24})
    serving_concurrency: int = 4
    serving_rounds: int = 4
    compile_timeout: float = 420.0
    sample_seconds: float = 0.25  # small calls are repeated inside one sample until about this long
    stub_iterations: int = 3000
    keep: bool = False
    argv: list[str] = field(default_factory=list)
    default_threads: int = 0  # torch's own default on this machine, recorded before --threads applies

    @classmethod
    def from_args(cls, args: argparse.Namespace, argv: list[str]) -> "Config":
        quick = bool(args.quick)
        cfg = cls(
            quick=quick,
            device=args.device,
            out=Path(args.out),
            spark=bool(args.spark),
            fast_paths=bool(args.fast_paths),
            threads=args.threads if args.threads or not quick else 1,
            filters=args.filters or (1 if quick else 2),
            repeats=args.repeats or (2 if quick else 5),
            keep=bool(args.keep),
            argv=argv,
        )
        if quick:
            cfg.batches = (1, 16)
            cfg.scaling_batches = (1, 4, 16)
            cfg.scaling_n_batch = 4
            cfg.serving_batches = (1,)
            cfg.serving_requests = {1: 10}
            cfg.serving_concurrency = 2
            cfg.serving_rounds = 2
            cfg.sample_seconds = 0.05
            cfg.stub_iterations = 100
        return cfg


# ================================================================================================================
# Measurement helpers
# ================================================================================================================
class Timer:
    """Interleaved timing of several candidates; device-synchronised when on CUDA."""

    def __init__(self, device: str) -> None:
        import torch

        self.cuda = device.startswith("cuda")
        self._torch = torch

    def sync(self) -> None:
        if self.cuda:
            self._torch.cuda.synchronize()

    def once(self, fn: Callable[[], Any]) -> float:
        self.sync()
        started = time.perf_counter()
        fn()
        self.sync()
        return time.perf_counter() - started

    def interleave(
        self,
        candidates: dict[str, Callable[[], Any]],
        repeats: int,
        *,
        inner: int | dict[str, int] = 1,
        warmup: int = 1,
        between: Callable[[], Any] | None = None,
        contexts: dict[str, Callable[[], Any]] | None = None,
    ) -> dict[str, list[float]]:
        """Seconds per call for each candidate, one sample per repeat; the order rotates every repeat.

        ``contexts[name]()`` returns a context manager entered around that candidate's sample (and its warm-up),
        outside the timed loop: for monkeypatched variants.
        """
        contexts = contexts or {}
        names = list(candidates)
        for name in names:
            with contexts.get(name, contextlib.nullcontext)():
                for _ in range(warmup):
                    candidates[name]()
        samples: dict[str, list[float]] = {name: [] for name in names}
        for repeat in range(repeats):
            shift = repeat % len(names)
            order = names[shift:] + names[:shift]
            if (repeat // len(names)) % 2:
                order.reverse()
            for name in order:
                count = inner[name] if isinstance(inner, dict) else inner
                fn = candidates[name]
                with contexts.get(name, contextlib.nullcontext)():
                    self.sync()
                    started = time.perf_counter()
                    for _ in range(count):
                        fn()
                    self.sync()
                    samples[name].append((time.perf_counter() - started) / count)
                if between is not None:
                    between()
        return samples


def inner_count(seconds_per_call: float, target: float, cap: int = 200) -> int:
    if seconds_per_call <= 0:
        return cap
    return int(max(1, min(cap, round(target / seconds_per_call))))


def median(values: Sequence[float]) -> float:
    return float(np.median(np.asarray(values, dtype=np.float64)))


def iqr(values: Sequence[float]) -> tuple[float, float]:
    arr = np.asarray(values, dtype=np.float64)
    return float(np.percentile(arr, 25)), float(np.percentile(arr, 75))


def paired_ratios(numerator: Sequence[float], denominator: Sequence[float]) -> list[float]:
    return [a / b for a, b in zip(numerator, denominator) if b > 0]


def fmt_time(seconds: float) -> str:
    if not math.isfinite(seconds):
        return str(seconds)
    magnitude = abs(seconds)
    if magnitude >= 1:
        return f"{seconds:.3g} s" if magnitude < 100 else f"{seconds:.0f} s"
    if magnitude >= 1e-3:
        return f"{seconds * 1e3:.3g} ms"
    return f"{seconds * 1e6:.3g} µs"


def fmt_us(seconds: float) -> str:
    return f"{seconds * 1e6:.0f} µs"


def fmt_stat(values: Sequence[float]) -> str:
    lo, hi = iqr(values)
    return f"{fmt_time(median(values))} [{fmt_time(lo)}–{fmt_time(hi)}]"


def fmt_ratio(value: float) -> str:
    return f"{value:.3g}x"


def fmt_range(values: Sequence[float], suffix: str = "x") -> str:
    return f"{min(values):.3g}–{max(values):.3g}{suffix}"


def fmt_bytes(count: float) -> str:
    count = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(count) < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.2f} {unit}"
        count /= 1024
    return f"{count:.2f} GiB"


def mark(ok: bool | None) -> str:
    if ok is None:
        return NA
    return MET if ok else NOT_MET


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


@contextlib.contextmanager
def env_var(name: str, value: str | None):
    old = os.environ.get(name)
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def profile_rows(fn: Callable[[], Any], *, calls: int = 1, top: int = 10, sort: str = "tottime") -> tuple[list[list[str]], float]:
    """cProfile ``fn`` ``calls`` times; rows (function, calls, tottime/call, cumtime/call, share of total)."""
    profiler = cProfile.Profile()
    started = time.perf_counter()
    profiler.enable()
    for _ in range(calls):
        fn()
    profiler.disable()
    wall = time.perf_counter() - started
    stats = pstats.Stats(profiler)
    total = max(stats.total_tt, 1e-12)
    entries = []
    for (filename, line, name), (cc, nc, tt, ct, _callers) in stats.stats.items():  # type: ignore[attr-defined]
        entries.append((tt if sort == "tottime" else ct, filename, line, name, nc, tt, ct))
    entries.sort(reverse=True)
    rows = []
    for _key, filename, line, name, nc, tt, ct in entries[:top]:
        short = filename
        for marker in ("site-packages/", "/work/main/", "lib/python3"):
            if marker in short:
                short = short.split(marker, 1)[1]
        where = f"{short}:{line}({name})" if line else name
        rows.append([f"`{where}`", str(nc // max(calls, 1) if nc >= calls else nc), fmt_time(tt / calls),
                     fmt_time(ct / calls), f"{100 * tt / total:.1f}%"])
    return rows, wall / calls


PROFILE_HEADER = ["function", "calls/op", "self time/op", "cumulative/op", "share of self time"]


# ================================================================================================================
# Report
# ================================================================================================================
@dataclass
class Table:
    header: list[str]
    rows: list[list[str]] = field(default_factory=list)
    title: str | None = None
    note: str | None = None

    def render(self) -> str:
        lines = []
        if self.title:
            lines.append(f"**{self.title}**")
            lines.append("")
        lines.append("| " + " | ".join(self.header) + " |")
        lines.append("|" + "|".join("---" for _ in self.header) + "|")
        for row in self.rows:
            cells = [str(c).replace("|", "\\|").replace("\n", " ") for c in row]
            lines.append("| " + " | ".join(cells) + " |")
        if self.note:
            lines.append("")
            lines.append(self.note)
        return "\n".join(lines)


@dataclass
class Section:
    key: str
    title: str
    intro: str = ""
    tables: list[Table] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def render(self) -> str:
        parts = [f"## {self.title}"]
        if self.intro:
            parts.append(self.intro)
        parts.extend(t.render() for t in self.tables)
        if self.notes:
            parts.append("\n".join(f"- {n}" for n in self.notes))
        return "\n\n".join(parts)


@dataclass
class Summary:
    rows: list[list[str]] = field(default_factory=list)

    def add(self, section: str, what: str, value: str, target: str, ok: bool | None) -> None:
        self.rows.append([section, what, value, target, mark(ok)])


# ================================================================================================================
# Setup: models on disk
# ================================================================================================================
@dataclass
class ModelSet:
    N: int
    gridsize: int
    network: Any  # CPU network that was saved
    ours_dir: Path
    state_path: Path
    pt2_dir: Path | None = None
    pickle_dir: Path | None = None
    pt2_save_seconds: float = float("nan")

    @property
    def channels(self) -> int:
        return self.gridsize * self.gridsize

    @property
    def bundle(self) -> Path:
        return self.ours_dir / "wts.h5.zip"


def make_models(cfg: Config, work: Path, N: int, gridsize: int, *, reference: bool = True) -> ModelSet:
    import mlflow.pytorch
    import torch
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    import mlflow_ptycho_flavor
    from benchmarks._support import RealImagWrapper, build_network

    network = build_network(N, gridsize, cfg.filters, seed=gridsize)
    tag = f"n{N}_g{gridsize}"
    models = ModelSet(N, gridsize, network, work / f"ours_{tag}", work / f"state_dict_{tag}.pt")
    mlflow_ptycho_flavor.save_model(network, models.ours_dir)
    torch.save(network.state_dict(), models.state_path)
    if not reference:
        return models
    C = gridsize * gridsize
    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, C, N, N))]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, C, N, N, 2))]),
    )
    example = np.random.default_rng(0).uniform(0, 2, (2, C, N, N)).astype(np.float32)
    requirements = [f"torch=={torch.__version__.split('+')[0]}", f"mlflow=={mlflow.__version__}"]
    started = time.perf_counter()
    models.pt2_dir = work / f"pytorch_pt2_{tag}"
    mlflow.pytorch.save_model(RealImagWrapper(network).eval(), models.pt2_dir, serialization_format="pt2",
                              input_example=example, signature=signature, pip_requirements=requirements)
    models.pt2_save_seconds = time.perf_counter() - started
    models.pickle_dir = work / f"pytorch_pickle_{tag}"
    mlflow.pytorch.save_model(RealImagWrapper(network).eval(), models.pickle_dir, serialization_format="pickle",
                              signature=signature, pip_requirements=requirements)
    return models


def inputs(batch: int, channels: int, N: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 2, (batch, channels, N, N)).astype(np.float32)


def load_pyfunc(path: Path, device: str):
    import mlflow.pyfunc

    return mlflow.pyfunc.load_model(str(path), model_config={"device": device})


# ================================================================================================================
# 1. Predict
# ================================================================================================================
def raw_callable(network, x: np.ndarray, device: str):
    import torch

    factor = torch.ones(x.shape[0], 1, 1, 1, device=device)

    def raw():
        with torch.inference_mode():
            return network(torch.from_numpy(x).to(device), factor).cpu().numpy()

    return raw


def bench_predict(cfg: Config, timer: Timer, models: dict[int, ModelSet], pyfuncs: dict[int, Any],
                  summary: Summary) -> Section:
    section = Section("predict", "1. Predict: mlflow.pyfunc predict vs the raw network",
                      intro=("Same arrays, same network object (the pyfunc model's own module), "
                             f"device `{cfg.device}`. **raw** = `torch.inference_mode()`, "
                             "`network(torch.from_numpy(x).to(device), factor)` with a prebuilt ones factor, "
                             "`.cpu().numpy()` of the complex64 result (no validation, no output copy, no MLflow). "
                             "**pyfunc** = `mlflow.pyfunc.load_model(dir).predict(x)` (complex64 out). "
                             "Medians over repeats with [IQR]; the throughput ratio is the median of per-repeat "
                             "paired ratios raw_time/pyfunc_time, with their min–max. \"implied\" = raw / (raw + "
                             "the pyfunc overhead measured with the forward stubbed out, below): the same ratio "
                             "without the machine's noise. Target: >= 0.95x for batch >= 16 (also shown for "
                             "batch 1)."))
    table = Table(["N", "gridsize", "batch", "raw / call", "pyfunc / call", "raw samples/s", "pyfunc samples/s",
                   "pyfunc/raw throughput", "per-repeat range", "pyfunc − raw / call", "implied by stubbed overhead",
                   "max abs diff", "target", "met"])
    missed: list[tuple[int, int]] = []
    raw_medians: dict[tuple[int, int], float] = {}
    summary_rows: list[tuple[int, int, float, bool]] = []
    for gridsize, model_set in models.items():
        pm = pyfuncs[gridsize]
        network = pm.get_raw_model()
        for batch in cfg.batches:
            x = inputs(batch, model_set.channels, model_set.N, seed=batch)
            raw = raw_callable(network, x, cfg.device)
            pyf = lambda x=x, pm=pm: pm.predict(x)  # noqa: E731
            started = time.perf_counter()
            raw_out = raw()  # first calls: warm-up, calibration and the equality check
            per_call = time.perf_counter() - started
            diff = float(np.max(np.abs(raw_out - pyf())))
            inner = inner_count(per_call, cfg.sample_seconds)
            samples = timer.interleave({"raw": raw, "pyfunc": pyf}, cfg.repeats, inner=inner, warmup=0)
            ratios = paired_ratios(samples["raw"], samples["pyfunc"])
            ratio = median(ratios)
            overhead = median([p - r for p, r in zip(samples["pyfunc"], samples["raw"])])
            ok = ratio >= 0.95
            if not ok and batch >= 16:
                missed.append((gridsize, batch))
            raw_medians[(gridsize, batch)] = median(samples["raw"])
            table.rows.append([
                str(model_set.N), str(gridsize), str(batch), fmt_stat(samples["raw"]), fmt_stat(samples["pyfunc"]),
                f"{batch / median(samples['raw']):.3g}", f"{batch / median(samples['pyfunc']):.3g}",
                fmt_ratio(ratio), fmt_range(ratios), fmt_time(overhead), "{implied}", f"{diff:.3g}", ">= 0.95x",
                mark(ok),
            ])
            summary_rows.append((gridsize, batch, ratio, ok))
    section.tables.append(table)
    gridsize = min(models)
    forward_b1 = raw_medians[(gridsize, min(cfg.batches))]
    overhead_tables, overheads = bench_overhead(cfg, timer, models, pyfuncs, forward_b1)
    implied = {key: value / (value + overheads[key[1]]) for key, value in raw_medians.items()}
    for row in table.rows:
        row[10] = fmt_ratio(implied[(int(row[1]), int(row[2]))])
    for gridsize_, batch, ratio, ok in summary_rows:
        if batch >= 16:
            summary.add("1 Predict", f"pyfunc/raw throughput, g{gridsize_} B={batch}",
                        f"{fmt_ratio(ratio)} measured; {fmt_ratio(implied[(gridsize_, batch)])} implied by the "
                        "stubbed overhead", ">= 0.95x (measured)", ok)
    section.tables.extend(overhead_tables)
    share = overheads[min(cfg.batches)] / forward_b1
    summary.add("1 Predict", "pyfunc per-call overhead, batch 1 (forward stubbed)",
                f"{fmt_us(overheads[min(cfg.batches)])} ({100 * share:.2g}% of a B=1 forward)",
                "reported; <= 5% of a B=1 forward", share <= 0.05)
    if missed:
        gridsize, batch = missed[0]
        pm = pyfuncs[gridsize]
        x = inputs(batch, models[gridsize].channels, models[gridsize].N, seed=batch)
        rows, _ = profile_rows(lambda: pm.predict(x), calls=2, top=12)
        section.tables.append(Table(PROFILE_HEADER, rows, title=f"Target missed: cProfile of pyfunc predict, g{gridsize} "
                                                            f"B={batch} (sorted by self time)"))
    return section


def bench_overhead(cfg: Config, timer: Timer, models: dict[int, ModelSet], pyfuncs: dict[int, Any],
                   forward_b1: float) -> tuple[list[Table], dict[int, float]]:
    """Per-call cost of each layer with the network's forward replaced by a stub returning a cached output.

    Returns the tables and the total pyfunc overhead (``PyFuncModel.predict`` over raw) per batch size.
    """
    import torch

    import mlflow_ptycho_flavor.model.inference as inference_module
    from mlflow_ptycho_flavor.model.inference import PtychoTorchModel

    gridsize = min(models)
    pm = pyfuncs[gridsize]
    wrapper = pm._model_impl  # PtychoTorchPyfuncModel (what our _load_pyfunc returned)
    native: PtychoTorchModel = wrapper.model
    network = native.network
    tables: list[Table] = []

    x1 = inputs(1, models[gridsize].channels, models[gridsize].N, seed=1)

    def stubbed(batch: int):
        x = inputs(batch, models[gridsize].channels, models[gridsize].N, seed=batch)
        with torch.inference_mode():
            cached = network(torch.from_numpy(x).to(cfg.device), None)
        return x, cached

    iterations = cfg.stub_iterations
    layer_rows = []
    experiment_rows = []
    overheads: dict[int, float] = {}
    experiment_batches = (1,) if cfg.quick else (1, max(cfg.batches))
    for batch in cfg.batches:
        x, cached = stubbed(batch)
        network.forward = lambda *a, _c=cached, **k: _c  # instance attribute shadows the method
        try:
            raw = raw_callable(network, x, cfg.device)
            layers = {
                "raw (module call + .numpy())": raw,
                "PtychoTorchModel.predict": lambda x=x: native.predict(x),
                "PtychoTorchPyfuncModel.predict": lambda x=x: wrapper.predict(x),
                "mlflow PyFuncModel.predict": lambda x=x: pm.predict(x),
            }
            inner = max(20, iterations // max(1, batch // 8))
            samples = timer.interleave(layers, max(cfg.repeats, 3), inner=inner, warmup=3)
            base = median(samples["raw (module call + .numpy())"])
            previous = base
            for name, values in samples.items():
                value = median(values)
                layer_rows.append([str(batch), name, fmt_us(value), fmt_us(value - base), fmt_us(value - previous)])
                previous = value
            overheads[batch] = median(samples["mlflow PyFuncModel.predict"]) - base
            if batch in experiment_batches:
                experiment_rows.extend(overhead_experiments(cfg, timer, pm, native, x, batch, inner, inference_module))
        finally:
            del network.forward
    tables.append(Table(["batch", "layer (forward stubbed)", "time / call", "over raw", "over previous layer"],
                        layer_rows, title="Per-call overhead, forward stubbed out (pure Python/numpy cost of each layer)",
                        note=(f"A real batch-1 forward (gridsize {gridsize}) takes {fmt_time(forward_b1)} here; the "
                              "overhead row of the summary is `mlflow PyFuncModel.predict` over raw at batch 1.")))
    network.forward = lambda *a, _c=stubbed(1)[1], **k: _c
    try:
        rows, _ = profile_rows(lambda: pm.predict(x1), calls=max(200, iterations // 5), top=12)
    finally:
        del network.forward
    tables.append(Table(PROFILE_HEADER, rows, title="Where the batch-1 pyfunc overhead goes (cProfile, forward stubbed, "
                                                   "sorted by self time)"))
    tables.append(Table(["batch", "experiment (monkeypatched here, library unchanged)", "pyfunc / call before",
                         "after", "gain / call", "gain vs a real forward"], experiment_rows,
                        title="Proposed pyfunc/inference changes, measured with the forward stubbed"))
    return tables, overheads


def overhead_experiments(cfg: Config, timer: Timer, pm, native, x: np.ndarray, batch: int, inner: int,
                         inference_module) -> list[list[str]]:
    """Monkeypatch candidate library changes and measure pyfunc predict before/after (forward stubbed)."""
    import torch

    from mlflow_ptycho_flavor.model.inference import PtychoTorchModel

    original_device = PtychoTorchModel.__dict__["device"]
    original_predict_prepared = PtychoTorchModel.predict_prepared
    cached_device = native.device

    def cached_device_property(self):
        # proposal 1: resolve the device once (at construction / .to()) instead of per call
        return self.__dict__.get("_cached_device") or next(self.network.parameters()).device

    def predict_prepared_no_copy(self, amplitudes, factors, *, batch_size=None, progress=False):
        # proposal 2: a single batch returns the network's output directly (no np.empty + copy)
        if batch_size is None:  # the library's device-dependent default
            batch_size = inference_module.default_batch_size(self.device)
        total = amplitudes.shape[0]
        if 0 < total <= batch_size and not progress:
            device = self.device
            with torch.inference_mode():
                result = self.network(torch.from_numpy(amplitudes).to(device, non_blocking=True),
                                      torch.from_numpy(factors).to(device, non_blocking=True))
                return result.cpu().numpy() if result.device.type != "cpu" else result.numpy()
        return original_predict_prepared(self, amplitudes, factors, batch_size=batch_size, progress=progress)

    def apply(name: str, on: bool) -> None:
        if name in ("cache device", "both"):
            if on:
                native.__dict__["_cached_device"] = cached_device
                PtychoTorchModel.device = property(cached_device_property)
            else:
                native.__dict__.pop("_cached_device", None)
                PtychoTorchModel.device = original_device
        if name in ("no output copy", "both"):
            PtychoTorchModel.predict_prepared = predict_prepared_no_copy if on else original_predict_prepared

    experiments = {
        "cache device": "1: cache `PtychoTorchModel.device` (no `next(network.parameters())` per call)",
        "no output copy": "2: single-batch `predict_prepared` returns `result.numpy()` (no `np.empty` + copy)",
        "both": "1 + 2",
    }

    @contextlib.contextmanager
    def patched(name: str):
        apply(name, True)
        try:
            yield
        finally:
            apply(name, False)

    rows = []
    predict = lambda: pm.predict(x)  # noqa: E731
    for name, label in experiments.items():
        expected = predict()
        with patched(name):
            np.testing.assert_array_equal(predict(), expected)
        samples = timer.interleave({"before": predict, "after": predict}, max(cfg.repeats, 3), inner=inner, warmup=2,
                                   contexts={"after": lambda name=name: patched(name)})
        before, after = median(samples["before"]), median(samples["after"])
        rows.append([str(batch), label, fmt_us(before), fmt_us(after), fmt_us(before - after), "{share}"])
    # relative to a real forward of this batch size (measured once, outside the stub)
    return rows


def fill_gain_shares(rows: list[list[str]], forward_by_batch: dict[int, float]) -> None:
    for row in rows:
        if row[-1] == "{share}":
            batch = int(row[0])
            gain_us = float(row[4].split()[0]) * 1e-6
            forward = forward_by_batch.get(batch)
            row[-1] = f"{100 * gain_us / forward:.2g}% of {fmt_time(forward)}" if forward else NA


# ================================================================================================================
# 2. Load
# ================================================================================================================
def floor_load(model_set: ModelSet, cfg: Config):
    import torch

    from mlflow_ptycho_flavor.network import NetworkConfig, PtychoPINNNetwork

    state = torch.load(model_set.state_path, map_location="cpu", weights_only=True)
    network = PtychoPINNNetwork(NetworkConfig(N=model_set.N, C_model=model_set.channels, n_filters_scale=cfg.filters))
    network.load_state_dict(state, strict=True)
    return network.to(cfg.device).eval()


def load_candidates(cfg: Config, model_set: ModelSet) -> dict[str, Callable[[], Any]]:
    import mlflow.pyfunc
    import mlflow.pytorch

    from mlflow_ptycho_flavor import load_model, load_torch_bundle

    device = cfg.device
    pt2_device = device if device == "cpu" else None  # pt2 weights stay on the export device (CPU)

    def pickle_load():
        with env_var(PICKLE_ENV, "true"):
            return mlflow.pytorch.load_model(str(model_set.pickle_dir), device=device)

    def pickle_pyfunc_load():
        with env_var(PICKLE_ENV, "true"):
            return mlflow.pyfunc.load_model(str(model_set.pickle_dir), model_config={"device": device})

    return {
        "floor": lambda: floor_load(model_set, cfg),
        "load_torch_bundle": lambda: load_torch_bundle(model_set.bundle, device=device),
        "flavor.load_model": lambda: load_model(str(model_set.ours_dir), device=device),
        "pyfunc.load_model (ours)": lambda: mlflow.pyfunc.load_model(str(model_set.ours_dir),
                                                                   model_config={"device": device}),
        "mlflow.pytorch.load_model (pt2)": lambda: mlflow.pytorch.load_model(str(model_set.pt2_dir), device=pt2_device),
        "mlflow.pytorch.load_model (pickle)": pickle_load,
        "pyfunc.load_model (mlflow.pytorch pt2)": lambda: mlflow.pyfunc.load_model(
            str(model_set.pt2_dir), model_config={"device": pt2_device or "cpu"}),
        "pyfunc.load_model (mlflow.pytorch pickle)": pickle_pyfunc_load,
    }


def bench_load(cfg: Config, timer: Timer, models: dict[int, ModelSet], summary: Summary) -> Section:
    section = Section("load", "2. Load: our loaders vs the floor and mlflow.pytorch",
                      intro=("Local paths, warm file cache, interleaved. **floor** = `torch.load` of the bare "
                             "state_dict file (`weights_only=True`) + constructing `PtychoPINNNetwork` + "
                             "`load_state_dict(strict=True)` + eval. **mlflow.pytorch** = the same network saved by "
                             "`mlflow.pytorch.save_model` as a wrapper module whose `forward(x)` returns "
                             "`torch.view_as_real(network(x, None))`: `serialization_format=\"pt2\"` (torch.export, "
                             "the default; loaded without the pickle opt-in, so MLflow's pickle-free check of the "
                             "archive runs) and `\"pickle\"` (loaded with `MLFLOW_ALLOW_PICKLE_DESERIALIZATION=true`). "
                             "Target: each of our loads <= 1.2x the floor and faster than the matching "
                             "mlflow.pytorch load (native vs `mlflow.pytorch.load_model`, pyfunc vs pyfunc; each "
                             "serialization format is a row of its own)."))
    reference = Table(["N", "gridsize", "loader", "median [IQR]", "vs floor"],
                      title="All loads (reference timings)")
    comparison = Table(["N", "gridsize", "our loader", "ours", "floor", "ours/floor", "per-repeat range",
                        "mlflow.pytorch counterpart", "counterpart", "ours/counterpart", "target", "met"],
                       title="Comparisons")
    repeats = cfg.repeats * (1 if cfg.quick else 2)
    counterparts = {
        "load_torch_bundle": ("mlflow.pytorch.load_model (pt2)", "mlflow.pytorch.load_model (pickle)"),
        "flavor.load_model": ("mlflow.pytorch.load_model (pt2)", "mlflow.pytorch.load_model (pickle)"),
        "pyfunc.load_model (ours)": ("pyfunc.load_model (mlflow.pytorch pt2)", "pyfunc.load_model (mlflow.pytorch pickle)"),
    }
    for gridsize, model_set in models.items():
        if model_set.pt2_dir is None:  # --quick saves the mlflow.pytorch references for gridsize 1 only
            continue
        candidates = load_candidates(cfg, model_set)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            samples = timer.interleave(candidates, repeats, between=gc.collect, warmup=0 if cfg.quick else 1)
        floor = samples["floor"]
        for name, values in samples.items():
            reference.rows.append([str(model_set.N), str(gridsize), name, fmt_stat(values),
                                   fmt_ratio(median(paired_ratios(values, floor)))])
        for ours, refs in counterparts.items():
            vs_floor = paired_ratios(samples[ours], floor)
            ok_floor = median(vs_floor) <= 1.2
            summary.add("2 Load", f"{ours} / floor, g{gridsize}", fmt_ratio(median(vs_floor)), "<= 1.2x", ok_floor)
            for counterpart in refs:
                vs_ref = paired_ratios(samples[ours], samples[counterpart])
                ok_ref = median(vs_ref) < 1.0
                comparison.rows.append([
                    str(model_set.N), str(gridsize), ours, fmt_time(median(samples[ours])), fmt_time(median(floor)),
                    fmt_ratio(median(vs_floor)), fmt_range(vs_floor), counterpart,
                    fmt_time(median(samples[counterpart])), fmt_ratio(median(vs_ref)),
                    "<= 1.2x floor; < 1x counterpart", mark(ok_floor and ok_ref),
                ])
                summary.add("2 Load", f"{ours} / {counterpart}, g{gridsize}", fmt_ratio(median(vs_ref)), "< 1x",
                            ok_ref)
    section.tables.extend([comparison, reference])
    section.tables.extend(load_profile(cfg, timer, models))
    return section


def load_profile(cfg: Config, timer: Timer, models: dict[int, ModelSet]) -> list[Table]:
    """Where ``load_torch_bundle`` spends its time, and a monkeypatched experiment on the biggest cost."""
    from mlflow_ptycho_flavor import load_torch_bundle

    model_set = models[min(models)]
    rows, _ = profile_rows(lambda: load_torch_bundle(model_set.bundle, device=cfg.device), calls=3, top=12)
    tables = [Table(PROFILE_HEADER, rows, title=f"Where `load_torch_bundle` spends its time (cProfile, g{model_set.gridsize}, "
                                               "sorted by self time)")]
    tables.append(load_experiments(cfg, timer, model_set))
    return tables


@contextlib.contextmanager
def skip_parameter_init():
    """Make ``reset_parameters`` of conv/linear layers a no-op (the strict load overwrites every parameter)."""
    from torch import nn

    classes = [nn.Conv1d, nn.Conv2d, nn.Linear]
    saved = {cls: cls.reset_parameters for cls in classes}
    for cls in classes:
        cls.reset_parameters = lambda self: None
    try:
        yield
    finally:
        for cls, method in saved.items():
            cls.reset_parameters = method


def load_experiments(cfg: Config, timer: Timer, model_set: ModelSet) -> Table:
    """Candidate bundle-loader changes, measured by monkeypatching (library unchanged)."""
    import zipfile

    import torch

    from mlflow_ptycho_flavor import load_torch_bundle

    # (a) a bundle whose members are stored (no deflate): same bytes inside, larger file
    stored = model_set.bundle.parent.parent / f"stored_{model_set.ours_dir.name}.wts.h5.zip"
    with zipfile.ZipFile(model_set.bundle) as zin, zipfile.ZipFile(stored, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            zout.writestr(info.filename, zin.read(info.filename), compress_type=zipfile.ZIP_STORED)

    def no_init():
        with skip_parameter_init():
            return load_torch_bundle(model_set.bundle, device=cfg.device)

    def a_and_b():
        with skip_parameter_init():
            return load_torch_bundle(stored, device=cfg.device)

    def floor_no_init():
        with skip_parameter_init():
            return floor_load(model_set, cfg)

    from mlflow_ptycho_flavor import read_bundle
    from mlflow_ptycho_flavor.network import NetworkConfig, PtychoPINNNetwork

    contents = read_bundle(model_set.bundle)
    state = torch.load(model_set.state_path, map_location="cpu", weights_only=True)

    def floor_construct():
        network = PtychoPINNNetwork(NetworkConfig(N=model_set.N, C_model=model_set.channels, n_filters_scale=cfg.filters))
        network.load_state_dict(state, strict=True)
        return network.to(cfg.device).eval()

    candidates = {
        "floor": lambda: floor_load(model_set, cfg),
        "load_torch_bundle (as is)": lambda: load_torch_bundle(model_set.bundle, device=cfg.device),
        "phase: read_bundle (unzip, hashes, unpickle, checks)": lambda: read_bundle(model_set.bundle),
        "phase: BundleContents.build_network": lambda: contents.build_network(cfg.device),
        "floor phase: torch.load of the state_dict file": lambda: torch.load(model_set.state_path, map_location="cpu",
                                                                             weights_only=True),
        "floor phase: construct + load_state_dict": floor_construct,
        "A: members stored, not deflated": lambda: load_torch_bundle(stored, device=cfg.device),
        "B: skip random init before the strict load": no_init,
        "A + B": a_and_b,
        "floor, also skipping init": floor_no_init,
    }

    reference, _ = load_torch_bundle(model_set.bundle, device="cpu")
    for name in ("A: members stored, not deflated", "B: skip random init before the strict load", "A + B"):
        network, _ = candidates[name]()
        for (k1, v1), (k2, v2) in zip(reference.state_dict().items(), network.state_dict().items()):
            assert k1 == k2 and torch.equal(v1.cpu(), v2.cpu()), f"{name} changed {k1}"
    samples = timer.interleave(candidates, cfg.repeats * (1 if cfg.quick else 2), between=gc.collect)
    floor = samples["floor"]
    baseline = samples["load_torch_bundle (as is)"]
    table = Table(["variant (monkeypatched / re-zipped here)", "median [IQR]", "vs floor", "vs as-is", "bundle bytes"],
                  title=f"Load experiments (g{model_set.gridsize}); the floor constructs the module with random init, "
                        "as specified")
    for name, values in samples.items():
        size = stored.stat().st_size if name.startswith("A") else (
            model_set.bundle.stat().st_size if name.startswith(("load", "B", "phase")) else model_set.state_path.stat().st_size)
        table.rows.append([name, fmt_stat(values), fmt_ratio(median(paired_ratios(values, floor))),
                           fmt_ratio(median(paired_ratios(values, baseline))), fmt_bytes(size)])
    return table


# ================================================================================================================
# 3. Serving
# ================================================================================================================
class ServerPair:
    """Both scoring servers, started side by side in background threads (``wait`` joins them)."""

    def __init__(self, cfg: Config, model_set: ModelSet, work: Path) -> None:
        from serving_tools import ModelServer

        ref_dir = model_set.pt2_dir if cfg.device == "cpu" else model_set.pickle_dir
        env = {"MLFLOW_DEFAULT_PREDICTION_DEVICE": cfg.device}
        if cfg.threads:
            env.update({"OMP_NUM_THREADS": str(cfg.threads), "MKL_NUM_THREADS": str(cfg.threads)})
        if cfg.device != "cpu":
            env[PICKLE_ENV] = "true"
        self.servers = {
            "ours": ModelServer(str(model_set.ours_dir), env=dict(env), log_path=work / "serve_ours.log"),
            "mlflow.pytorch": ModelServer(str(ref_dir), env=dict(env), log_path=work / "serve_pytorch.log"),
        }
        self.errors: dict[str, BaseException] = {}
        self._threads: list[threading.Thread] = []
        self._started = 0.0
        self.startup = float("nan")

    def _start(self, name: str) -> None:
        try:
            self.servers[name].start()
        except BaseException as exc:  # noqa: BLE001 - raised by wait()
            self.errors[name] = exc

    def start_async(self) -> "ServerPair":
        self._started = time.perf_counter()
        self._threads = [threading.Thread(target=self._start, args=(name,), daemon=True) for name in self.servers]
        for thread in self._threads:
            thread.start()
        return self

    def wait(self) -> float:
        for thread in self._threads:
            thread.join()
        if self.startup != self.startup:  # nan: first wait
            self.startup = time.perf_counter() - self._started
        if self.errors:
            self.stop()
            raise RuntimeError(f"server start-up failed: {self.errors}")
        return self.startup

    def stop(self) -> None:
        for server in self.servers.values():
            server.stop()


def serving_model_set(models: dict[int, ModelSet]) -> ModelSet:
    return models[1] if 1 in models else models[min(models)]


def bench_serving(cfg: Config, timer: Timer, models: dict[int, ModelSet], pyfuncs: dict[int, Any], work: Path,
                  summary: Summary, pair: ServerPair | None = None) -> Section:
    from serving_tools import run_load

    model_set = serving_model_set(models)
    C, N = model_set.channels, model_set.N
    ref_dir = model_set.pt2_dir if cfg.device == "cpu" else model_set.pickle_dir
    ref_format = "pt2" if cfg.device == "cpu" else "pickle"
    section = Section("serving", "3. Serving: mlflow models serve, ours vs mlflow.pytorch",
                      intro=(f"`mlflow models serve --env-manager local -w 1` on loopback for both, started side by "
                             f"side; the same pre-encoded `{{\"inputs\": (B, {C}, {N}, {N}) list}}` bodies. Ours answers "
                             "`{\"predictions\": {\"real\": ..., \"imag\": ...}}`; mlflow.pytorch "
                             f"({ref_format}, wrapper returning `view_as_real`) answers `{{\"predictions\": (B, {C}, "
                             f"{N}, {N}, 2)}}`. Load runs in {cfg.serving_rounds} interleaved rounds per batch size "
                             f"(order alternating), concurrency {cfg.serving_concurrency}; req/s = all requests / all "
                             "round seconds; percentiles over all requests. Target: ours >= mlflow.pytorch "
                             "throughput."))
    pair = pair or ServerPair(cfg, model_set, work).start_async()
    servers = pair.servers
    try:
        startup = pair.wait()
        x = inputs(2, C, N, seed=5)
        body = json.dumps({"inputs": x.tolist()}).encode()
        s1, ours_payload = servers["ours"].invoke(body)
        s2, ref_payload = servers["mlflow.pytorch"].invoke(body)
        assert s1 == 200 and s2 == 200, (s1, str(ours_payload)[:300], s2, str(ref_payload)[:300])
        ours_c = np.asarray(ours_payload["predictions"]["real"]) + 1j * np.asarray(ours_payload["predictions"]["imag"])
        ref_arr = np.asarray(ref_payload["predictions"])
        served_diff = float(np.max(np.abs(ours_c - (ref_arr[..., 0] + 1j * ref_arr[..., 1]))))
        table = Table(["batch", "server", "requests", "req/s", "samples/s", "p50", "p99", "wrong/5xx",
                       "ours/mlflow.pytorch req/s", "per-round range", "target", "met"])
        for batch in cfg.serving_batches:
            xb = inputs(batch, C, N, seed=batch)
            body = json.dumps({"inputs": xb.tolist()}).encode()

            def check_ours(status, payload, batch=batch):
                return status == 200 and len(payload["predictions"]["real"]) == batch

            def check_ref(status, payload, batch=batch):
                return status == 200 and len(payload["predictions"]) == batch

            checks = {"ours": check_ours, "mlflow.pytorch": check_ref}
            total = cfg.serving_requests.get(batch, 10)
            per_round = max(1, total // cfg.serving_rounds)
            reports: dict[str, list[Any]] = {name: [] for name in servers}
            for name in servers:  # one uncounted request each: first call at this shape
                status, payload = servers[name].invoke(body, timeout=600)
                assert checks[name](status, payload), (name, status, str(payload)[:300])
            for round_index in range(cfg.serving_rounds):
                order = list(servers) if round_index % 2 == 0 else list(servers)[::-1]
                for name in order:
                    reports[name].append(run_load(servers[name], [(body, checks[name])], requests=per_round,
                                                  concurrency=cfg.serving_concurrency, timeout=600))
            throughput = {}
            for name, rounds in reports.items():
                requests = sum(r.requests for r in rounds)
                seconds = sum(r.seconds for r in rounds)
                latencies = sorted(l for r in rounds for l in r.latencies_ms)
                bad = sum(r.wrong_answers for r in rounds) + sum(r.unexpected_status for r in rounds)
                throughput[name] = requests / seconds
                pct = lambda q: latencies[min(len(latencies) - 1, max(0, int(round(q / 100 * (len(latencies) - 1)))))]  # noqa: E731
                row = [str(batch), name, str(requests), f"{throughput[name]:.3g}", f"{batch * throughput[name]:.3g}",
                       fmt_time(pct(50) / 1e3), fmt_time(pct(99) / 1e3), str(bad)]
                table.rows.append(row)
            round_ratios = [o.throughput / r.throughput for o, r in zip(reports["ours"], reports["mlflow.pytorch"])]
            ratio = throughput["ours"] / throughput["mlflow.pytorch"]
            ok = ratio >= 1.0
            table.rows[-2].extend([fmt_ratio(ratio), fmt_range(round_ratios), ">= 1x", mark(ok)])
            table.rows[-1].extend(["(reference)", "", "", NA])
            summary.add("3 Serving", f"ours/mlflow.pytorch req/s, B={batch}", fmt_ratio(ratio), ">= 1x", ok)
        table.note = (f"Both servers started in {startup:.1f} s (side by side"
                      + (", in the background while the earlier sections ran" if cfg.quick else "")
                      + f"). Served outputs agree: max |ours − "
                      f"mlflow.pytorch| = {served_diff:.3g} (complex, B=2).")
        section.tables.append(table)
    finally:
        pair.stop()
    section.tables.extend(bench_json_fraction(cfg, timer, model_set, pyfuncs, ref_dir, ref_format, summary))
    return section


@contextlib.contextmanager
def base64_output():
    """Proposal: a ``real_imag_b64`` serving form - each float32 part as one base64 string of its raw bytes
    (``{"real": str, "imag": str, "shape": [...], "dtype": "float32"}``), lossless, decoded by
    ``np.frombuffer(base64.b64decode(s), "<f4").reshape(shape)``. Here it replaces ``real_imag``."""
    import base64

    import mlflow_ptycho_flavor.flavor.pyfunc_model as pyfunc_module

    original = pyfunc_module.encode_output

    def encode(result, output_format):
        if output_format != "real_imag":
            return original(result, output_format)
        return {
            "real": base64.b64encode(np.ascontiguousarray(result.real, dtype="<f4").tobytes()).decode("ascii"),
            "imag": base64.b64encode(np.ascontiguousarray(result.imag, dtype="<f4").tobytes()).decode("ascii"),
            "shape": list(result.shape),
            "dtype": "float32",
        }

    pyfunc_module.encode_output = encode
    try:
        yield
    finally:
        pyfunc_module.encode_output = original


def check_base64_response(response: str, expected: dict[str, np.ndarray]) -> None:
    """The proposed base64 form decodes to exactly the ``real_imag`` arrays."""
    import base64

    predictions = json.loads(response)["predictions"]
    for part in ("real", "imag"):
        decoded = np.frombuffer(base64.b64decode(predictions[part]), "<f4").reshape(predictions["shape"])
        np.testing.assert_array_equal(decoded, expected[part])


def bench_json_fraction(cfg: Config, timer: Timer, model_set: ModelSet, pyfuncs: dict[int, Any], ref_dir: Path,
                        ref_format: str, summary: Summary) -> list[Table]:
    """In-process: the scoring server's parse, predict and encode steps timed apart, for both flavors."""
    import mlflow.pyfunc
    from mlflow.pyfunc.scoring_server import _parse_json_data, invocations, predictions_to_json

    C, N = model_set.channels, model_set.N
    ours = pyfuncs[model_set.gridsize]
    with env_var(PICKLE_ENV, "true" if ref_format == "pickle" else None):
        ref = mlflow.pyfunc.load_model(str(ref_dir), model_config={"device": cfg.device if ref_format == "pickle" else "cpu"})
    table = Table(["batch", "flavor", "parse request", "predict", "encode response", "whole `invocations`",
                   "encode / (predict + encode)", "encode / whole", "response bytes", "target", "met"],
                  title=("In-process scoring-server steps: `_parse_json_data` (JSON -> arrays), `model.predict`, "
                         "`predictions_to_json` (the server's own `_get_jsonable_obj` + `json.dump(cls=NumpyEncoder)`), "
                         "and the whole `scoring_server.invocations`"))
    profile_tables = []
    variants = [("ours", ours, contextlib.nullcontext),
                (f"mlflow.pytorch ({ref_format})", ref, contextlib.nullcontext),
                ("ours, proposed `output_format=\"real_imag_b64\"` (monkeypatched)", ours, base64_output)]
    steps = ("parse", "predict", "encode", "whole")
    with env_var(SERVING_ENV, "true"):
        for batch in cfg.serving_batches:
            x = inputs(batch, C, N, seed=batch)
            body = json.dumps({"inputs": x.tolist()}).encode()
            expected = ours.predict(x, params={"output_format": "real_imag"})
            candidates: dict[str, Callable[[], Any]] = {}
            contexts: dict[str, Callable[[], Any]] = {}
            responses: dict[str, str] = {}
            for index, (name, model, patch) in enumerate(variants):
                with patch():
                    schema = model.metadata.get_input_schema()
                    parsed = _parse_json_data(body, model.metadata, schema)
                    prediction = model.predict(parsed.data, params=parsed.params)
                    encoded = io.StringIO()
                    predictions_to_json(prediction, encoded)
                    responses[name] = encoded.getvalue()
                    if patch is base64_output:
                        check_base64_response(responses[name], expected)

                def parse(model=model, schema=schema):
                    return _parse_json_data(body, model.metadata, schema)

                def predict(model=model, parsed=parsed):
                    return model.predict(parsed.data, params=parsed.params)

                def encode(prediction=prediction):
                    predictions_to_json(prediction, io.StringIO())

                def whole(model=model, schema=schema):
                    result = invocations(body, "application/json", model, schema)
                    assert result.status == 200, result.response[:300]

                for step, fn in zip(steps, (parse, predict, encode, whole)):
                    candidates[f"{index}:{step}"] = fn
                    contexts[f"{index}:{step}"] = patch
                if index == 0 and batch == cfg.serving_batches[0]:
                    rows, _ = profile_rows(whole, calls=3, top=14)
                    profile_tables.append(Table(PROFILE_HEADER, rows, title=(
                        f"Where an in-process request goes for ours (cProfile of `invocations`, B={batch}, "
                        "sorted by self time)")))
            inner = inner_count(timer.once(candidates["0:whole"]), cfg.sample_seconds)
            samples = timer.interleave(candidates, max(cfg.repeats, 3), inner=inner, contexts=contexts)
            for index, (name, _model, patch) in enumerate(variants):
                got = {step: samples[f"{index}:{step}"] for step in steps}
                p, e, w = median(got["predict"]), median(got["encode"]), median(got["whole"])
                fraction = e / (p + e)
                ok = fraction <= 0.20
                table.rows.append([str(batch), name, fmt_stat(got["parse"]), fmt_stat(got["predict"]),
                                   fmt_stat(got["encode"]), fmt_stat(got["whole"]), f"{100 * fraction:.3g}%",
                                   f"{100 * e / w:.3g}%", fmt_bytes(len(responses[name].encode())), "<= 20%", mark(ok)])
                if index == 0:
                    summary.add("3 Serving", f"JSON encode share of predict+encode, B={batch}",
                                f"{100 * fraction:.3g}%", "<= 20%", ok)
                elif patch is base64_output:
                    summary.add("3 Serving", f"same, with the proposed real_imag_b64 form, B={batch}",
                                f"{100 * fraction:.3g}%", "<= 20%", ok)
    return [table] + profile_tables


# ================================================================================================================
# 4. Size and memory
# ================================================================================================================
def run_probe(probe: str, args: dict[str, Any], *, timeout: float, env: dict[str, str] | None = None) -> dict[str, Any]:
    command = [sys.executable, "-m", "benchmarks._support", probe, json.dumps(args)]
    full_env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
                **(env or {})}
    completed = subprocess.run(command, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout)
    if completed.returncode != 0:
        raise RuntimeError(f"probe {probe} failed ({completed.returncode}): {completed.stderr[-2000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


RSS_LOADERS = ("floor", "load_torch_bundle", "flavor.load_model", "pyfunc.load_model", "mlflow.pytorch.load_model (pt2)")


def rss_probe_args(cfg: Config, models: dict[int, ModelSet]) -> dict[str, Any]:
    jobs = []
    for gridsize, model_set in models.items():
        if cfg.quick and gridsize != min(models):
            continue
        for loader in RSS_LOADERS:
            path = {
                "floor": model_set.state_path,
                "load_torch_bundle": model_set.bundle,
                "flavor.load_model": model_set.ours_dir,
                "pyfunc.load_model": model_set.ours_dir,
                "mlflow.pytorch.load_model (pt2)": model_set.pt2_dir,
            }[loader]
            pt2 = loader.endswith("(pt2)")
            jobs.append({"key": gridsize, "loader": loader, "path": str(path),
                         "device": "cpu" if pt2 and cfg.device != "cpu" else cfg.device,
                         "N": model_set.N, "C": model_set.channels, "filters": cfg.filters})
    return {"jobs": jobs, "threads": cfg.threads}


class Background:
    """Run ``fn`` in a thread; ``result()`` joins and returns (or raises) its outcome."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        self._value: Any = None
        self._error: BaseException | None = None

        def target() -> None:
            try:
                self._value = fn()
            except BaseException as exc:  # noqa: BLE001 - re-raised by result()
                self._error = exc

        self._thread = threading.Thread(target=target, daemon=True)
        self._thread.start()

    def result(self) -> Any:
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._value


def bench_size_memory(cfg: Config, models: dict[int, ModelSet], summary: Summary,
                      probe: dict[str, Any] | None = None) -> Section:
    section = Section("size", "4. Size and memory",
                      intro=("Bytes on disk, and the peak-RSS growth of one load: a fresh interpreter imports "
                             "torch, numpy, mlflow, mlflow.pyfunc, mlflow.pytorch, torch.export and this package (so "
                             "no loader pays for those imports), then forks one child per load; the child compares "
                             "`ru_maxrss` before and after its load (anything a loader imports lazily counts). "
                             "\"weights\" = bytes of `torch.save(state_dict)`. Targets (ours, not from the brief): "
                             "bundle <= 1.05x the raw state_dict bytes; our loads' peak growth <= 1.5x the floor's "
                             "(growth / weights is reported too, but at these model sizes the growth is dominated by "
                             "fixed costs: allocator arenas, lazily imported modules)."))
    sizes = Table(["N", "gridsize", "artifact", "bytes", "vs raw state_dict", "target", "met"], title="Size on disk")
    for gridsize, model_set in models.items():
        raw = model_set.state_path.stat().st_size
        bundle = model_set.bundle.stat().st_size
        ok = bundle <= 1.05 * raw
        rows = [
            ("raw state_dict (`torch.save`)", raw, "(baseline)", None),
            ("our bundle `wts.h5.zip`", bundle, "<= 1.05x", ok),
            ("our MLflow model directory (bundle + MLmodel + env files)", dir_bytes(model_set.ours_dir), "(reference)", None),
        ]
        if model_set.pt2_dir is not None and model_set.pickle_dir is not None:
            rows += [
                ("mlflow.pytorch pt2 `data/model.pt2`", (model_set.pt2_dir / "data" / "model.pt2").stat().st_size,
                 "(reference)", None),
                ("mlflow.pytorch pt2 model directory", dir_bytes(model_set.pt2_dir), "(reference)", None),
                ("mlflow.pytorch pickle `data/model.pth`", (model_set.pickle_dir / "data" / "model.pth").stat().st_size,
                 "(reference)", None),
            ]
        for label, size, target, met in rows:
            sizes.rows.append([str(model_set.N), str(gridsize), label, f"{size} ({fmt_bytes(size)})",
                               fmt_ratio(size / raw), target, mark(met)])
        summary.add("4 Size", f"bundle / raw state_dict bytes, g{gridsize}", fmt_ratio(bundle / raw), "<= 1.05x", ok)
    section.tables.append(sizes)

    probe = probe if probe is not None else run_probe("rss", rss_probe_args(cfg, models), timeout=900)
    failed = [r for r in probe["results"] if "error" in r]
    if failed:
        raise RuntimeError(f"RSS probe failed: {failed}")
    results = [(r["key"], r["loader"], r) for r in probe["results"]]
    memory = Table(["N", "gridsize", "loader", "peak RSS growth", "weights", "growth / weights", "growth / floor's",
                    "target", "met"], title="Peak RSS growth of one load (forked child of a fresh interpreter each)")
    floor_delta = {g: r["peak_delta"] for g, loader, r in results if loader == "floor"}
    for gridsize, loader, result in results:
        model_set = models[gridsize]
        weights = model_set.state_path.stat().st_size
        delta = result["peak_delta"]
        vs_weights = delta / weights
        vs_floor = delta / floor_delta[gridsize] if floor_delta[gridsize] > 0 else float("inf")
        ours = loader in ("load_torch_bundle", "flavor.load_model", "pyfunc.load_model")
        ok = vs_floor <= 1.5 if ours else None
        memory.rows.append([str(model_set.N), str(gridsize), loader, fmt_bytes(delta), fmt_bytes(weights),
                            fmt_ratio(vs_weights), fmt_ratio(vs_floor),
                            "<= 1.5x floor's" if ours else "(reference)", mark(ok)])
        if ours:
            summary.add("4 Memory", f"{loader} peak RSS growth, g{gridsize}",
                        f"{fmt_ratio(vs_floor)} floor's ({fmt_bytes(delta)}; {fmt_ratio(vs_weights)} the weights)",
                        "<= 1.5x floor's", ok)
    section.tables.append(memory)
    return section


# ================================================================================================================
# 5. Scaling
# ================================================================================================================
def flops_per_sample(network, channels: int, N: int) -> float:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        network(torch.rand(1, channels, N, N), None)
    return float(counter.get_total_flops())


def bench_scaling(cfg: Config, timer: Timer, models: dict[int, ModelSet], pyfuncs: dict[int, Any], work: Path,
                  summary: Summary) -> Section:
    gridsize = 1 if 1 in models else min(models)
    model_64 = models[gridsize]
    big = make_models(cfg, work, 128, gridsize, reference=False)
    pm64 = pyfuncs[gridsize]
    pm128 = load_pyfunc(big.ours_dir, cfg.device)
    candidates: dict[str, Callable[[], Any]] = {}
    inner: dict[str, int] = {}
    for batch in cfg.scaling_batches:
        x = inputs(batch, model_64.channels, 64, seed=batch)
        candidates[f"N=64 B={batch}"] = lambda x=x: pm64.predict(x)
    xb = inputs(cfg.scaling_n_batch, big.channels, 128, seed=7)
    candidates[f"N=128 B={cfg.scaling_n_batch}"] = lambda: pm128.predict(xb)
    # Proposal check: the largest batch run through predict in internal chunks (params batch_size) instead of one
    largest, chunk = max(cfg.scaling_batches), cfg.scaling_n_batch
    x_large = inputs(largest, model_64.channels, 64, seed=largest)
    chunked = f"N=64 B={largest} in chunks of {chunk}"
    candidates[chunked] = lambda: pm64.predict(x_large, params={"batch_size": chunk})
    for name, fn in candidates.items():
        inner[name] = inner_count(timer.once(fn), cfg.sample_seconds)
    samples = timer.interleave(candidates, cfg.repeats, inner=inner, warmup=0)
    section = Section("scaling", "5. Scaling",
                      intro=(f"pyfunc `predict`, gridsize {gridsize}, all sizes interleaved in each repeat. The batch "
                             "exponent k is the least-squares slope of log(time) on log(batch) over batch >= 4 "
                             "(target 0.8 <= k <= 1.1: about linear, nothing super-linear). The N comparison is "
                             f"at batch {cfg.scaling_n_batch}; target: time grows no faster than the pixel count "
                             "(<= 4x for N 64 -> 128); the FLOP ratio (`torch.utils.flop_counter`) is shown too."))
    data = Table(["N", "batch", "time / call", "time / sample", "samples/s"], title="Data")
    for name, values in samples.items():
        n = int(name.split()[0][2:])
        batch_text = name.split("B=")[1]
        batch = int(batch_text.split()[0])
        data.rows.append([str(n), batch_text, fmt_stat(values), fmt_time(median(values) / batch),
                          f"{batch / median(values):.3g}"])
    fits = Table(["fit", "value", "detail", "target", "met"], title="Fits")
    points = [(b, median(samples[f"N=64 B={b}"])) for b in cfg.scaling_batches if b >= 4]
    logb = np.log([p[0] for p in points])
    logt = np.log([p[1] for p in points])
    k, intercept = np.polyfit(logb, logt, 1)
    per_repeat_k = [float(np.polyfit(logb, np.log([samples[f"N=64 B={b}"][r] for b, _ in points]), 1)[0])
                    for r in range(cfg.repeats)]
    ok_k = 0.8 <= k <= 1.1
    fits.rows.append([f"time ~ batch^k (N=64, batch {', '.join(str(b) for b, _ in points)})", f"k = {k:.3f}",
                      f"per-repeat k {fmt_range(per_repeat_k, '')}", "0.8 <= k <= 1.1", mark(ok_k)])
    summary.add("5 Scaling", "batch exponent k (N=64)", f"{k:.3f}", "0.8–1.1", ok_k)
    f64 = flops_per_sample(pm64.get_raw_model(), model_64.channels, 64)
    f128 = flops_per_sample(pm128.get_raw_model(), big.channels, 128)
    t64 = samples.get(f"N=64 B={cfg.scaling_n_batch}")
    t128 = samples[f"N=128 B={cfg.scaling_n_batch}"]
    if t64 is None:
        raise RuntimeError("scaling_n_batch must be one of scaling_batches")
    ratios = paired_ratios(t128, t64)
    time_ratio = median(ratios)
    flop_ratio = f128 / f64
    ok_n = time_ratio <= 4.0
    fits.rows.append([f"time(N=128) / time(N=64), batch {cfg.scaling_n_batch}", fmt_ratio(time_ratio),
                      f"per-repeat {fmt_range(ratios)}; time ~ N^{math.log2(time_ratio):.2f}; FLOPs/sample "
                      f"{f64 / 1e9:.3g} G -> {f128 / 1e9:.3g} G (ratio {flop_ratio:.3g}, time/FLOP ratio "
                      f"{time_ratio / flop_ratio:.3g}); pixels 4x",
                      "<= 4x (linear in pixels, N^2)", mark(ok_n)])
    summary.add("5 Scaling", "time N=128 / N=64", f"{time_ratio:.3g}x (N^{math.log2(time_ratio):.2f}; FLOPs "
                f"{flop_ratio:.3g}x)", "<= 4x (N^2)", ok_n)
    chunk_ratios = paired_ratios(samples[f"N=64 B={largest}"], samples[chunked])
    chunk_speed = median(chunk_ratios)
    ok_chunk = chunk_speed >= 1.10
    fits.rows.append([f"B={largest} through predict in internal chunks of {chunk} (`params={{\"batch_size\": {chunk}}}`) "
                      f"vs one chunk (default batch_size {_default_batch_size()})", fmt_ratio(chunk_speed) + " faster",
                      f"per-repeat {fmt_range(chunk_ratios)}",
                      ">= 1.10x: worth a smaller CPU default", mark(ok_chunk)])
    summary.add("5 Scaling", f"B={largest} in chunks of {chunk} vs one chunk", fmt_ratio(chunk_speed),
                ">= 1.10x: smaller CPU default worth it", ok_chunk)
    section.tables.extend([fits, data])
    return section


def _default_batch_size() -> int:
    """The library's default chunk on CPU (what an unconfigured predict uses there)."""
    import torch as _torch

    from mlflow_ptycho_flavor.model.inference import default_batch_size

    return default_batch_size(_torch.device("cpu"))


# ================================================================================================================
# 6. Fast paths
# ================================================================================================================
def bench_fast_paths(cfg: Config, timer: Timer, models: dict[int, ModelSet], pyfuncs: dict[int, Any],
                     summary: Summary) -> Section:
    import torch

    gridsize = 1 if 1 in models else min(models)
    model_set = models[gridsize]
    network = pyfuncs[gridsize].get_raw_model()
    default_threads = torch.get_num_threads()
    section = Section("fast", "6. Optional fast paths (--fast-paths)",
                      intro=(f"Raw forward (`inference_mode`, gridsize {gridsize}, N={model_set.N}) eager vs each "
                             "option, interleaved; speed = eager time / option time (median of per-repeat ratios). "
                             "\"Worth it\" target: >= 1.10x faster with max |diff| <= 1e-4 against eager. Default "
                             f"intra-op threads here: {default_threads}."))
    table = Table(["option", "batch", "eager / call", "option / call", "speed vs eager", "per-repeat range",
                   "max abs diff", "target", "met"])
    worth: list[str] = []
    for batch in (1,) if cfg.quick else (1, 16):
        x = inputs(batch, model_set.channels, model_set.N, seed=batch)
        xt = torch.from_numpy(x).to(cfg.device)
        factor = torch.ones(batch, 1, 1, 1, device=cfg.device)

        def eager(net=network, xt=xt, factor=factor):
            with torch.inference_mode():
                return net(xt, factor).cpu().numpy()

        reference = eager()
        options: dict[str, Callable[[], Any]] = {}
        problems: dict[str, str] = {}
        cl_net = copy.deepcopy(network).to(memory_format=torch.channels_last)
        x_cl = xt.contiguous(memory_format=torch.channels_last)
        options["channels_last (module + input)"] = lambda: _run(cl_net, x_cl, factor)
        for count in sorted({1, os.cpu_count() or 1, max(1, default_threads // 2)} - {default_threads}):
            def with_threads(count=count, xt=xt, factor=factor):
                torch.set_num_threads(count)
                try:
                    return _run(network, xt, factor)
                finally:
                    torch.set_num_threads(default_threads)
            options[f"torch.set_num_threads({count})"] = with_threads
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                with torch.inference_mode():
                    traced = torch.jit.freeze(torch.jit.trace(copy.deepcopy(network).eval(), (xt, factor)))
            options["TorchScript trace + freeze"] = lambda traced=traced: _run(traced, xt, factor)
        except Exception as exc:  # noqa: BLE001 - reported in the table
            problems["TorchScript trace + freeze"] = f"{type(exc).__name__}: {str(exc)[:120]}"
        diffs = {}
        for name, fn in list(options.items()):
            try:
                diffs[name] = float(np.max(np.abs(fn() - reference)))
            except Exception as exc:  # noqa: BLE001
                problems[name] = f"{type(exc).__name__}: {str(exc)[:120]}"
                options.pop(name)
        inner = inner_count(timer.once(eager), cfg.sample_seconds)
        samples = timer.interleave({"eager": eager, **options}, cfg.repeats, inner=inner)
        for name in options:
            ratios = paired_ratios(samples["eager"], samples[name])
            speed = median(ratios)
            ok = speed >= 1.10 and diffs[name] <= 1e-4
            if ok:
                worth.append(f"{name} (batch {batch}: {speed:.2f}x)")
            table.rows.append([name, str(batch), fmt_stat(samples["eager"]), fmt_stat(samples[name]), fmt_ratio(speed),
                               fmt_range(ratios), f"{diffs[name]:.3g}", ">= 1.10x; diff <= 1e-4", mark(ok)])
        for name, problem in problems.items():
            table.rows.append([name, str(batch), "", "", "", "", "", ">= 1.10x; diff <= 1e-4", f"{NA} (failed: {problem})"])
    table.rows.extend(compile_rows(cfg, model_set, worth))
    section.tables.append(table)
    summary.add("6 Fast paths", "options worth it (>= 1.10x, exact to 1e-4)", "; ".join(worth) or "none",
                ">= 1.10x", bool(worth) if worth else None)
    return section


def _run(module, xt, factor):
    import torch

    with torch.inference_mode():
        return module(xt, factor).cpu().numpy()


def compile_rows(cfg: Config, model_set: ModelSet, worth: list[str]) -> list[list[str]]:
    target = ">= 1.10x; diff <= 1e-4"
    if cfg.quick:
        return [["torch.compile (default mode)", "16", "", "", "", "", "", target, f"{NA} (skipped in --quick)"]]
    batch = 16
    args = {"N": model_set.N, "gridsize": model_set.gridsize, "filters": cfg.filters, "seed": model_set.gridsize,
            "batch": batch, "repeats": cfg.repeats, "device": cfg.device, "threads": cfg.threads}
    started = time.perf_counter()
    try:
        result = run_probe("compile", args, timeout=cfg.compile_timeout)
    except subprocess.TimeoutExpired:
        return [["torch.compile (default mode)", str(batch), "", "", "", "", "", target,
                 f"{NOT_MET} (did not compile + run within {cfg.compile_timeout:.0f} s: not worth it here)"]]
    except Exception as exc:  # noqa: BLE001
        return [["torch.compile (default mode)", str(batch), "", "", "", "", "", target,
                 f"{NA} (failed: {str(exc)[-160:]})"]]
    eager, compiled = result["times"]["eager"], result["times"]["compiled"]
    ratios = paired_ratios(eager, compiled)
    speed = median(ratios)
    ok = speed >= 1.10 and result["max_abs_diff"] <= 1e-4
    if ok:
        worth.append(f"torch.compile (batch {batch}: {speed:.2f}x)")
    return [[f"torch.compile (default mode; first call {result['compile_seconds']:.0f} s, probe "
             f"{time.perf_counter() - started:.0f} s, fresh process)", str(batch), fmt_stat(eager), fmt_stat(compiled),
             fmt_ratio(speed), fmt_range(ratios), f"{result['max_abs_diff']:.3g}", target, mark(ok)]]


# ================================================================================================================
# Spark (optional, from benchmarks/bench_spark.py)
# ================================================================================================================
def bench_spark(cfg: Config, models: dict[int, ModelSet]) -> Section:
    """Rows of ``benchmarks.bench_spark.benchmark_spark`` on our saved gridsize-1 model (when importable)."""
    import importlib
    import importlib.util

    section = Section("spark", "7. Spark (benchmarks/bench_spark.py)")
    if importlib.util.find_spec("pyspark") is None:
        section.notes.append("pyspark is not installed: skipped.")
        return section
    try:
        module = importlib.import_module("benchmarks.bench_spark")
    except Exception as exc:  # noqa: BLE001
        section.notes.append(f"benchmarks/bench_spark.py is not importable ({type(exc).__name__}: {exc}): skipped.")
        return section
    function = getattr(module, "benchmark_spark", None)
    if not callable(function):
        section.notes.append("benchmarks/bench_spark.py has no `benchmark_spark` function: skipped.")
        return section
    model_set = serving_model_set(models)
    n_patterns = 32 if cfg.quick else 128
    rows = list(function(str(model_set.ours_dir), n_patterns))
    header: list[str] = []
    for row in rows:
        for key in row:
            if str(key) not in header:
                header.append(str(key))
    section.intro = (f"`benchmark_spark(<our N=64 gridsize-{model_set.gridsize} model>, n_patterns={n_patterns})` "
                     "from `benchmarks/bench_spark.py`, run in this process after the other sections; rows as it "
                     "returns them (no target was set for Spark).")
    if rows:
        section.tables.append(Table(header, [[str(row.get(key, "")) for key in header] for row in rows]))
    else:
        section.notes.append("`benchmark_spark` returned no rows.")
    return section


# ================================================================================================================
# Machine
# ================================================================================================================
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(cfg: Config, load_start: tuple[float, ...], load_end: tuple[float, ...], wall: float) -> tuple[Table, str | None]:
    import mlflow
    import torch

    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = os.cpu_count() or 0
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                                timeout=10).stdout.strip()
    except Exception:  # noqa: BLE001
        commit = ""
    try:
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "mlflow_ptycho_flavor"], cwd=REPO,
                               capture_output=True, text=True, timeout=10).stdout.split("\n")
        dirty = [line[3:] for line in dirty if line.strip()]
    except Exception:  # noqa: BLE001
        dirty = []
    if dirty:
        commit += f" + uncommitted changes in {', '.join(dirty)} (measured as they were)"
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    rows = [
        ["CPU", cpu_model()],
        ["logical cores (os.cpu_count / usable)", f"{os.cpu_count()} / {affinity}"],
        ["GPU", gpu],
        ["device benchmarked", cfg.device],
        ["torch intra-op / inter-op threads", f"{torch.get_num_threads()} / {torch.get_num_interop_threads()}"
         + (f" (set by --threads; torch's default here: {cfg.default_threads})" if cfg.threads else " (torch default)")],
        ["python", platform.python_version()],
        ["torch", str(torch.__version__)],
        ["mlflow", mlflow.__version__],
        ["numpy", np.__version__],
        ["platform", platform.platform()],
        ["load average (1/5/15 min) at start", " / ".join(f"{v:.2f}" for v in load_start)],
        ["load average (1/5/15 min) at end", " / ".join(f"{v:.2f}" for v in load_end)],
        ["network", f"PtychoPINNNetwork N=64 (and 128 for scaling), n_filters_scale={cfg.filters}, default config, "
                    "seeded random weights"],
        ["repeats", str(cfg.repeats)],
        ["git commit (HEAD when run)", commit or "?"],
        ["wall time of this run", f"{wall:.0f} s"],
        ["command", "`" + " ".join(["python", "benchmarks/run.py", *cfg.argv]) + "`"],
    ]
    busy = max(load_start[0], load_end[0], load_start[1], load_end[1])
    note = None
    if busy > 0.5 * affinity:
        note = (f"**The machine was shared and noisy**: load average up to {busy:.1f} on {affinity} usable cores "
                "while this ran (other engineers' test runs). Absolute times are inflated and vary; compare the "
                "ratios, which come from candidates interleaved within each repeat.")
    if cfg.threads and cfg.threads != cfg.default_threads:
        note = (note + " " if note else "") + (
            f"Torch intra-op threads were pinned to {cfg.threads} (`--threads {cfg.threads}`; torch's default here is "
            f"{cfg.default_threads}): on a small machine shared with other processes, a preempted OpenMP thread "
            "stalls every parallel op; section 6 (`torch.set_num_threads`) measures the effect when --fast-paths runs.")
    return Table(["", ""], rows), note


# ================================================================================================================
# Main
# ================================================================================================================
def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny version of every section (smoke test)")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda / cuda:N")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "RESULTS.md"), help="markdown report path")
    parser.add_argument("--spark", action="store_true", help="append benchmarks/bench_spark.py rows (needs pyspark)")
    parser.add_argument("--fast-paths", action="store_true", help="section 6: channels_last, threads, jit, compile")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads for the whole run")
    parser.add_argument("--repeats", type=int, default=None, help="repeats per comparison (default 5; 2 with --quick)")
    parser.add_argument("--filters", type=int, default=None, help="n_filters_scale (default 2; 1 with --quick)")
    parser.add_argument("--only", default=None, help="comma-separated subset of sections: predict,load,serving,size,"
                                                     "scaling,fast,spark (for development)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary model directories")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    cfg = Config.from_args(args, argv)
    started = time.perf_counter()
    load_start = os.getloadavg()
    logging.getLogger("mlflow").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    os.environ.setdefault("MLFLOW_DISABLE_ENV_MANAGER_CONDA_WARNING", "true")

    import torch

    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        print("--device cuda: CUDA is not available on this machine", file=sys.stderr)
        return 2
    cfg.default_threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    import mlflow  # noqa: F401

    import mlflow_ptycho_flavor  # noqa: F401

    only = set(args.only.split(",")) if args.only else None
    wanted = lambda key: only is None or key in only  # noqa: E731
    timer = Timer(cfg.device)
    summary = Summary()
    sections: list[Section] = []
    work = Path(tempfile.mkdtemp(prefix="ptycho-bench-"))
    pair: ServerPair | None = None

    def progress(message: str) -> None:
        print(f"[{time.perf_counter() - started:7.1f} s] {message}", file=sys.stderr, flush=True)

    try:
        progress(f"saving models in {work}")
        models = {g: make_models(cfg, work, N_DEFAULT, g, reference=not cfg.quick or g == min(cfg.gridsizes))
                  for g in cfg.gridsizes}
        rss = None
        if cfg.quick:
            # Smoke run: start the servers and the RSS probe now, in the background (their own timings are not
            # affected by sharing the CPU; the other quick numbers are not headline numbers anyway).
            if wanted("serving"):
                pair = ServerPair(cfg, serving_model_set(models), work).start_async()
            if wanted("size"):
                rss = Background(lambda: run_probe("rss", rss_probe_args(cfg, models), timeout=900))
        pyfuncs = {g: load_pyfunc(m.ours_dir, cfg.device) for g, m in models.items()}
        steps = [
            ("predict", lambda: bench_predict(cfg, timer, models, pyfuncs, summary)),
            ("load", lambda: bench_load(cfg, timer, models, summary)),
            ("serving", lambda: bench_serving(cfg, timer, models, pyfuncs, work, summary, pair)),
            ("size", lambda: bench_size_memory(cfg, models, summary, rss.result() if rss else None)),
            ("scaling", lambda: bench_scaling(cfg, timer, models, pyfuncs, work, summary)),
        ]
        if cfg.fast_paths:
            steps.append(("fast", lambda: bench_fast_paths(cfg, timer, models, pyfuncs, summary)))
        if cfg.spark:
            steps.append(("spark", lambda: bench_spark(cfg, models)))
        forward_by_batch: dict[int, float] = {}
        for key, step in steps:
            if not wanted(key):
                continue
            progress(f"section {key}")
            section = step()
            sections.append(section)
            if key == "predict":
                for table in section.tables[:1]:
                    for row in table.rows:
                        if row[1] == str(min(models)):
                            forward_by_batch[int(row[2])] = _parse_time(row[3].split(" [")[0])
                for table in section.tables:
                    if table.title and table.title.startswith("Proposed"):
                        fill_gain_shares(table.rows, forward_by_batch)
    finally:
        if pair is not None:
            pair.stop()
        if cfg.keep:
            print(f"kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    wall = time.perf_counter() - started
    machine, noise = machine_info(cfg, load_start, os.getloadavg(), wall)
    write_report(cfg, sections, summary, machine, noise)
    progress(f"wrote {cfg.out}")
    return 0


def _parse_time(text: str) -> float:
    value, unit = text.split()
    return float(value) * {"s": 1.0, "ms": 1e-3, "µs": 1e-6}[unit]


def write_report(cfg: Config, sections: list[Section], summary: Summary, machine: Table, noise: str | None) -> None:
    parts = ["# ptycho_torch flavor benchmarks", ""]
    parts.append(("Generated by `python benchmarks/run.py" + (" " + " ".join(cfg.argv) if cfg.argv else "") + "` "
                  f"on {time.strftime('%Y-%m-%d %H:%M %Z')}. "
                  + ("**--quick smoke run** (n_filters_scale=1, 2 repeats, tiny sizes): not headline numbers. "
                     if cfg.quick else "")
                  + "Times are medians over repeats with [IQR]; ratio spreads are min–max over repeats. Every "
                    "comparison row says whether its target is met."))
    if noise:
        parts += ["", noise]
    parts += ["", "## Summary", "", Table(["section", "what", "value", "target", "met"], summary.rows).render()]
    for section in sections:
        parts += ["", section.render()]
    parts += ["", "## Machine", "", machine.render(), ""]
    cfg.out.parent.mkdir(parents=True, exist_ok=True)
    cfg.out.write_text("\n".join(parts), encoding="utf-8")


if __name__ == "__main__":
    sys.exit(main())
