"""Section 1: ``mlflow.pyfunc`` ``predict`` against the raw network on the same arrays, and its per-call overhead.

"raw" is ``torch.inference_mode()``, ``network(torch.from_numpy(x).to(device), factor)`` with a prebuilt ones
factor on the device and ``.cpu().numpy()`` of the complex64 result: no validation, no output copy, no MLflow, the
network in torch's default (contiguous) memory layout: the eager forward a user of the bare module gets. "raw,
model's layout" is the same call on the pyfunc model's own module (NHWC on the CPU by default), which separates the
layout's gain from the pyfunc layers' cost.
The overhead of each layer is measured with the network's forward replaced by a stub that returns a cached
output, which isolates the Python/numpy cost from the forward's noise.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from benchmarks.config import Context
from benchmarks.harness import inner_count, profile
from benchmarks.models import eager_copy, inputs
from benchmarks.records import Check, ProfileEntry, Ratio, RecordTable, SectionResult, Stats, Target, column
from benchmarks.report import fmt_target, fmt_time

__all__ = ["KEY", "TITLE", "CPU_THROUGHPUT_TARGET", "THROUGHPUT_TARGET", "OVERHEAD_TARGET", "AGREEMENT_TARGET",
           "PredictComparison", "LayerOverhead", "FixtureAgreement", "LayoutOp", "fixture_bundles", "fixture_inputs",
           "fixture_agreement", "layout_op_profile", "run"]

KEY = "predict"
TITLE = "1. Predict: mlflow.pyfunc predict vs the raw network"
#: pyfunc throughput / raw (contiguous eager) throughput, checked for batch >= 16: on the CPU the default path
#: (NHWC, split into batches of 16) must beat the eager forward by 1.3x; elsewhere (no layout change) keep up with it.
CPU_THROUGHPUT_TARGET = Target(low=1.3)
THROUGHPUT_TARGET = Target(low=0.95)
#: The default (NHWC) output against the contiguous eager output on every fixture bundle: max |difference| over the
#: output's scale, max(1, max |eager|) (issue 17: "within 1e-5 of eager on every fixture").
AGREEMENT_TARGET = Target(high=1e-5, unit="")
#: The repository's fixture bundles: files written by upstream's own code (torch bundles, TensorFlow archives, a
#: checkpoint's bundle), kept with the tests; the demo bundle is the package's own.
FIXTURES = Path(__file__).resolve().parents[2] / "tests" / "data"
#: The batch-1 pyfunc overhead (forward stubbed) as a share of a real batch-1 forward.
OVERHEAD_TARGET = Target(high=0.05, unit="%")


@dataclass(frozen=True)
class PredictComparison:
    """raw and pyfunc predict of one (gridsize, batch), interleaved; ``throughput`` = raw time / pyfunc time."""

    N: int = column("N")
    gridsize: int = column("gridsize")
    batch: int = column("batch")
    raw: Stats = column("raw / call")
    raw_model_layout: Stats = column("raw, model's layout / call")
    pyfunc: Stats = column("pyfunc / call")
    raw_samples_per_s: float = column("raw samples/s", "g")
    pyfunc_samples_per_s: float = column("pyfunc samples/s", "g")
    throughput: Ratio = column("pyfunc/raw throughput [per-repeat range]")
    overhead_seconds: float = column("pyfunc − raw / call", "time")
    layout_gain: Ratio = column("raw / raw in the model's layout [per-repeat range]")
    implied: float = column("implied by layout gain and stubbed overhead", "ratio")
    max_abs_diff: float = column("max abs diff", "g")
    target: Target | None = column("target", "target")
    met: bool | None = column("met", "met")


@dataclass(frozen=True)
class LayerOverhead:
    """Seconds per call of one layer of the predict stack with the forward stubbed."""

    batch: int = column("batch")
    layer: str = column("layer (forward stubbed)")
    seconds: float = column("time / call", "time")
    over_raw: float = column("over raw", "time")
    over_previous: float = column("over previous layer", "time")


@dataclass(frozen=True)
class FixtureAgreement:
    """The CPU default path (NHWC) against the contiguous eager network, and both against float64, on one fixture."""

    fixture: str = column("fixture bundle", "code")
    inputs: str = column("inputs")
    max_abs_eager: float = column("max |eager|", "g")
    default_vs_eager: float = column("max |default − eager| / scale", "g")
    eager_backends: float = column("max |eager without oneDNN − eager| / scale", "g")
    eager_vs_float64: float = column("max |eager − float64| / scale", "g")
    default_vs_float64: float = column("max |default − float64| / scale", "g")
    met: bool = column("default within 1e-5 of eager", "met")


def fixture_bundles(root: Path = FIXTURES) -> list[tuple[str, Path]]:
    """Every fixture bundle by name: upstream's torch bundles (CNN variants, FNO family, a checkpoint's bundle), the
    TensorFlow archives (converted by the benchmark) and the package's demo bundle."""
    import mlflow_ptycho_flavor.sim

    bundles = [("/".join(p.relative_to(root).parts[:-1]), p) for p in sorted(root.rglob("wts.h5.zip"))]
    demo = Path(mlflow_ptycho_flavor.sim.__file__).parent / "demo_bundle" / "wts.h5.zip"
    return bundles + [("demo_bundle", demo)]


def fixture_inputs(model: Any, source: Path) -> tuple[np.ndarray, str]:
    """The fixture's recorded inputs (the ``io.npz`` beside it, or one folder up for a bundle written from a
    checkpoint) when they fit the network, else three seeded ones; and which."""
    for recorded in (source.parent / "io.npz", source.parent.parent / "io.npz"):
        if not recorded.exists():
            continue
        with np.load(recorded) as io_:
            key = "x" if "x" in io_ else "x_nchw" if "x_nchw" in io_ else None
            x = io_[key].astype(np.float32) if key else None
        if x is not None and x.shape[1:] == (model.channels, model.N, model.N):
            return x, f"{x.shape[0]} recorded (`{key}`)"
    return inputs(3, model.channels, model.N, seed=7), "3 seeded"


def float64_copy(network: Any) -> Any:
    """A float64 copy of ``network``: real parameters and buffers in float64, complex ones (the FNO family's spectral
    weights) in complex128. Both families' amplitude/phase heads combine their two outputs in complex64
    (docs/bundle-format.md §8.5.5, §8.6.4), so that last step rounds to ~6e-8 of the output's scale; every step
    before it is float64."""
    import copy

    import torch

    exact = copy.deepcopy(network).double()
    for module in exact.modules():
        for name, parameter in module._parameters.items():
            if parameter is not None and parameter.is_complex():
                module._parameters[name] = torch.nn.Parameter(parameter.detach().to(torch.complex128),
                                                              requires_grad=parameter.requires_grad)
        for name, buffer in module._buffers.items():
            if buffer is not None and buffer.is_complex():
                module._buffers[name] = buffer.to(torch.complex128)
    return exact


def fixture_agreement(work: Path) -> tuple[list[FixtureAgreement], Check]:
    """The default CPU layout against the eager forward on every fixture bundle (a few seconds in all).

    Both are float32 and differ by kernel order only; the float64 forward of the same weights (:func:`float64_copy`)
    shows how far each lies from the exact result, i.e. which of the two a disagreement comes from. The
    eager forward again with torch's oneDNN (mkldnn) kernels switched off (its other contiguous float32 kernels) shows
    how far the reference itself moves when only torch's choice of kernel changes: the float32 noise floor that any
    other kernel order meets on that fixture.
    """
    import torch

    from mlflow_ptycho_flavor.convert import convert_any
    from mlflow_ptycho_flavor.model.inference import PtychoTorchModel

    rows = []
    for name, source in fixture_bundles():
        bundle = source
        if source.parent.parent.name == "tensorflow":
            bundle = work / "fixtures" / source.parent.name / "wts.h5.zip"
            bundle.parent.mkdir(parents=True, exist_ok=True)
            convert_any(source, bundle)
        default = PtychoTorchModel.from_bundle(bundle, device="cpu")
        eager_model = PtychoTorchModel.from_bundle(bundle, device="cpu", channels_last=False)
        x, origin = fixture_inputs(default, source)
        ones = np.ones(x.shape[0], np.float32)
        batch, factor = torch.from_numpy(x), torch.from_numpy(ones.reshape(-1, 1, 1, 1))
        with torch.inference_mode():
            eager = eager_model.network(batch, factor).numpy()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the flags' note on TF32 for Intel GPUs, on entry and exit
                with torch.backends.mkldnn.flags(enabled=False):
                    eager_other = eager_model.network(batch, factor).numpy()
            exact = float64_copy(eager_model.network)(batch.double(), factor.double()).numpy()
        got = default.predict(x, ones)
        max_abs_eager = float(np.abs(eager).max())
        scale = max(1.0, max_abs_eager)

        def apart(a: np.ndarray, b: np.ndarray) -> float:
            return float(np.abs(a - b).max()) / scale

        relative = apart(got, eager)
        rows.append(FixtureAgreement(name, origin, max_abs_eager, relative, apart(eager_other, eager),
                                     apart(eager, exact), apart(got, exact), AGREEMENT_TARGET.holds(relative)))
    worst = max(rows, key=lambda row: row.default_vs_eager)
    within = sum(row.met for row in rows)
    known = f": from float64, default {worst.default_vs_float64:.2g}, eager {worst.eager_vs_float64:.2g}"
    known += f"; eager without oneDNN is {worst.eager_backends:.2g} from eager there"
    check = Check.of("1 Predict", f"default CPU layout vs eager on every fixture bundle ({len(rows)}), max |diff| / "
                     "scale", worst.default_vs_eager, AGREEMENT_TARGET, unit="",
                     detail=f"{within} of {len(rows)} within; worst {worst.fixture}{known}")
    return rows, check


@dataclass(frozen=True)
class LayoutOp:
    """One aten operator's self CPU time per forward, contiguous (eager) against NHWC (torch.profiler)."""

    op: str = column("operator", "code")
    eager_seconds: float = column("eager (NCHW) / forward", "time")
    nhwc_seconds: float = column("NHWC / forward", "time")
    share_of_gain: float = column("share of the time NHWC saves", "percent")


def layout_op_profile(network: Any, x: np.ndarray, *, forwards: int = 2, top: int = 8) -> list[LayoutOp]:
    """Where the NHWC layout gains: self CPU time per aten operator of the contiguous and the NHWC forward of the
    same weights on ``x`` (torch.profiler), the ``top`` operators by eager time, then all operators together."""
    import copy

    import torch
    from torch.profiler import ProfilerActivity, profile as torch_profile

    from mlflow_ptycho_flavor.network import use_channels_last

    factor = torch.ones(x.shape[0], 1, 1, 1)
    layouts = {
        "eager": (eager_copy(network), torch.from_numpy(x)),
        "nhwc": (use_channels_last(copy.deepcopy(network).to(memory_format=torch.channels_last)),
                 torch.from_numpy(x).contiguous(memory_format=torch.channels_last)),
    }
    seconds: dict[str, dict[str, float]] = {}
    for name, (module, batch) in layouts.items():
        with torch.inference_mode():
            module(batch, factor)  # warm-up
            with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(forwards):
                    module(batch, factor)
        seconds[name] = {e.key: e.self_cpu_time_total / 1e6 / forwards for e in prof.key_averages()}
    eager, nhwc = seconds["eager"], seconds["nhwc"]
    saved = sum(eager.values()) - sum(nhwc.values())
    ops = sorted(eager, key=lambda op: -eager[op])[:top]
    rows = [LayoutOp(op, eager[op], nhwc.get(op, 0.0), (eager[op] - nhwc.get(op, 0.0)) / saved if saved else 0.0)
            for op in ops]
    rows.append(LayoutOp("all operators", sum(eager.values()), sum(nhwc.values()), 1.0 if saved else 0.0))
    return rows


def _accuracy_note(rows: list[FixtureAgreement]) -> str:
    """How far the default layout lands from float64 compared with eager, over the fixtures (and where it misses,
    how far torch's other contiguous kernels move eager)."""
    ratios = [row.default_vs_float64 / row.eager_vs_float64 for row in rows if row.eager_vs_float64]
    if not ratios:
        return ""
    note = (f"Against float64, the default's error is {min(ratios):.2g}–{max(ratios):.2g}x eager's (median "
            f"{float(np.median(ratios)):.2g}x) over the {len(ratios)} fixtures: the NHWC kernels accumulate in "
            "another order, not always as well.")
    missed = [row for row in rows if not row.met]
    if missed:
        note += " Where the default misses 1e-5, eager without oneDNN lies " + ", ".join(
            f"{row.eager_backends:.2g} from eager ({row.fixture})" for row in missed) + "."
        if all(not AGREEMENT_TARGET.holds(row.eager_backends) for row in missed):
            note += (" Eager with torch's other contiguous kernels misses 1e-5 of eager there too: the goal lies below "
                     "that input's float32 noise floor, whichever kernel order computes it.")
    return note


def raw_callable(network: Any, x: np.ndarray, device: str) -> Callable[[], np.ndarray]:
    """The raw forward of ``x`` as defined in the module docstring."""
    import torch

    factor = torch.ones(x.shape[0], 1, 1, 1, device=device)

    def raw() -> np.ndarray:
        with torch.inference_mode():
            return network(torch.from_numpy(x).to(device), factor).cpu().numpy()

    return raw


class _StubbedForward:
    """Context manager: ``network.forward`` returns ``cached`` cut to the call's batch (an instance attribute
    shadowing the method; the predict paths split large inputs into batches)."""

    def __init__(self, network: Any, cached: Any) -> None:
        self.network, self.cached = network, cached

    def __enter__(self) -> None:
        self.network.forward = lambda x, *args, **kwargs: self.cached[: x.shape[0]]

    def __exit__(self, *exc: Any) -> None:
        del self.network.forward


def _stub_output(ctx: Context, network: Any, x: np.ndarray) -> Any:
    import torch

    with torch.inference_mode():
        return network(torch.from_numpy(x).to(ctx.cfg.device), None)


def measure_overhead(ctx: Context, gridsize: int) -> tuple[list[LayerOverhead], list[ProfileEntry]]:
    """Per-call cost of each layer (raw, ``PtychoTorchModel``, our pyfunc wrapper, MLflow's ``PyFuncModel``) per
    batch with the forward stubbed, and a cProfile of the batch-1 pyfunc call."""
    cfg, model_set = ctx.cfg, ctx.models[gridsize]
    pyfunc = ctx.pyfuncs[gridsize]
    wrapper = pyfunc._model_impl  # what our loader module returned (MLflow keeps it in this attribute)
    native = wrapper.model  # the PtychoTorchModel
    network = native.network
    rows: list[LayerOverhead] = []
    for batch in cfg.batches:
        x = inputs(batch, model_set.channels, model_set.N, seed=batch)
        with _StubbedForward(network, _stub_output(ctx, network, x)):
            layers = {
                "raw (module call + .numpy())": raw_callable(network, x, cfg.device),
                "PtychoTorchModel.predict": lambda x=x: native.predict(x),
                "PtychoTorchPyfuncModel.predict": lambda x=x: wrapper.predict(x),
                "mlflow PyFuncModel.predict": lambda x=x: pyfunc.predict(x),
            }
            inner = max(20, cfg.stub_iterations // max(1, batch // 8))
            samples = ctx.timer.interleave(layers, max(cfg.repeats, 3), inner=inner, warmup=3)
        base = previous = samples["raw (module call + .numpy())"].median
        for name, stats in samples.items():
            rows.append(LayerOverhead(batch, name, stats.median, stats.median - base, stats.median - previous))
            previous = stats.median
    x1 = inputs(1, model_set.channels, model_set.N, seed=1)
    with _StubbedForward(network, _stub_output(ctx, network, x1)):
        entries = profile(lambda: pyfunc.predict(x1), calls=max(200, cfg.stub_iterations // 5))
    return rows, entries


def throughput_target(device: str) -> Target:
    """What the default path must reach against the contiguous eager forward on ``device``."""
    return CPU_THROUGHPUT_TARGET if device == "cpu" else THROUGHPUT_TARGET


def run(ctx: Context) -> SectionResult:
    cfg = ctx.cfg
    target = throughput_target(cfg.device)
    measured: list[tuple[int, int, Stats, Stats, Stats, float]] = []
    for gridsize, model_set in ctx.models.items():
        pyfunc = ctx.pyfuncs[gridsize]
        network = pyfunc.get_raw_model()
        eager = eager_copy(network)
        for batch in cfg.batches:
            x = inputs(batch, model_set.channels, model_set.N, seed=batch)
            raw = raw_callable(eager, x, cfg.device)
            raw_model_layout = raw_callable(network, x, cfg.device)
            predict = lambda x=x, pyfunc=pyfunc: pyfunc.predict(x)  # noqa: E731
            seconds = ctx.timer.once(raw)  # the first calls warm up, calibrate and check equality
            diff = float(np.max(np.abs(raw() - predict())))
            samples = ctx.timer.interleave(
                {"raw": raw, "raw_model_layout": raw_model_layout, "pyfunc": predict}, cfg.repeats,
                inner=inner_count(seconds, cfg.sample_seconds), warmup=0,
            )
            measured.append((gridsize, batch, samples["raw"], samples["raw_model_layout"], samples["pyfunc"], diff))

    main = min(ctx.models)
    layers, overhead_profile = measure_overhead(ctx, main)
    overhead = {r.batch: r.over_raw for r in layers if r.layer == "mlflow PyFuncModel.predict"}
    comparisons = []
    for gridsize, batch, raw_stats, layout_stats, pyfunc_stats, diff in measured:
        throughput = Ratio.paired(raw_stats, pyfunc_stats)
        layout_gain = Ratio.paired(raw_stats, layout_stats)
        paired_overhead = float(np.median(np.subtract(pyfunc_stats.samples, raw_stats.samples)))
        implied = raw_stats.median / (layout_stats.median + overhead[batch])
        comparisons.append(PredictComparison(
            ctx.models[gridsize].N, gridsize, batch, raw_stats, layout_stats, pyfunc_stats, batch / raw_stats.median,
            batch / pyfunc_stats.median, throughput, paired_overhead, layout_gain, implied, diff,
            target if batch >= 16 else None, target.holds(throughput.median) if batch >= 16 else None))

    checks = [Check.of("1 Predict", f"default pyfunc predict / raw eager forward throughput, g{c.gridsize} "
                       f"B={c.batch}", c.throughput.median, target,
                       detail=f"layout {c.layout_gain.median:.3g}x; {c.implied:.3g}x implied by it and the stubbed "
                              f"overhead; max |diff| {c.max_abs_diff:.2g}")
              for c in comparisons if c.batch >= 16]
    batch1 = min(cfg.batches)
    forward_b1 = next(c.raw.median for c in comparisons if c.gridsize == main and c.batch == batch1)
    checks.append(Check.of("1 Predict", f"pyfunc per-call overhead at batch {batch1} (forward stubbed), share of a "
                           "real forward", overhead[batch1] / forward_b1, OVERHEAD_TARGET, unit="%",
                           detail=f"{fmt_time(overhead[batch1])} per call"))

    tables = [
        RecordTable(PredictComparison, comparisons),
        RecordTable(LayerOverhead, layers, "Per-call overhead, forward stubbed out (the Python/numpy cost of each "
                    "layer)", f"A real batch-{batch1} forward (gridsize {main}) takes {fmt_time(forward_b1)} here."),
        RecordTable(ProfileEntry, overhead_profile, f"Where the batch-1 pyfunc overhead goes (cProfile, forward "
                    f"stubbed, g{main}, sorted by self time)"),
    ]
    if cfg.device == "cpu" and cfg.cpu_layout_checks:  # the NHWC default is the CPU's; elsewhere: eager layout
        agreement, agreement_check = fixture_agreement(ctx.work)
        checks.append(agreement_check)
        tables.append(RecordTable(
            FixtureAgreement, agreement, "The CPU default layout against the eager forward on every fixture bundle",
            "Each fixture's recorded inputs (its `io.npz`) where they fit, else three seeded ones; unit input "
            "factors; the TensorFlow archives converted first (`convert_any`); "
            "differences are relative to max(1, max |eager|). Both float32 paths differ in kernel order only "
            "(NHWC vs NCHW kernels); the float64 forward of the same weights (complex128 spectral weights for the "
            "FNO family; both families' heads combine amplitude and phase in complex64, a last rounding of ~6e-8) "
            "shows which of the two errs, and by how much; eager without oneDNN "
            "(torch's other contiguous float32 kernels) shows how far the reference moves with torch's choice of "
            "kernel alone. "
            f"{_accuracy_note(agreement)}"))
        layout_x = inputs(16, ctx.models[main].channels, ctx.models[main].N, seed=16)
        layout_ops = layout_op_profile(ctx.pyfuncs[main].get_raw_model(), layout_x)
        gains = sorted(layout_ops[:-1], key=lambda row: -row.share_of_gain)[:4]
        tables.append(RecordTable(
            LayoutOp, layout_ops, f"Where the NHWC layout gains (torch.profiler self CPU time per forward, g{main} B=16)",
            "The same weights and input in both layouts. Most of what NHWC saves here: "
            + ", ".join(f"`{row.op}` {row.share_of_gain:.0%}" for row in gains)
            + " (`aten::copy_` is the copying inside `upsample_nearest2d` on contiguous data). A profile of one "
              "run: the shares move from run to run on a noisy machine."))
    missed = next((c for c in comparisons if c.batch >= 16 and not c.met), None)
    if missed is not None:
        model_set, pyfunc = ctx.models[missed.gridsize], ctx.pyfuncs[missed.gridsize]
        x = inputs(missed.batch, model_set.channels, model_set.N, seed=missed.batch)
        tables.append(RecordTable(ProfileEntry, profile(lambda: pyfunc.predict(x), calls=2),
                                  f"Target missed: cProfile of pyfunc predict, g{missed.gridsize} B={missed.batch} "
                                  "(sorted by self time)"))
    intro = (f"Same arrays, the same weights, device `{cfg.device}`. **raw** = `torch.inference_mode()`, "
             "`network(torch.from_numpy(x).to(device), factor)` with a prebuilt ones factor, `.cpu().numpy()` of the "
             "complex64 result (no validation, no output copy, no MLflow), the network in torch's default contiguous "
             "layout: the eager forward. **raw, model's layout** = the same call on the pyfunc model's own module "
             "(NHWC on the CPU: `channels_last=None`). **pyfunc** = `mlflow.pyfunc.load_model(dir).predict(x)` "
             "(complex64 out; inputs split into batches of 16 on the CPU). Medians over repeats with [IQR]; ratios are "
             "medians of per-repeat paired ratios [their min–max]. \"implied\" = raw / (raw in the model's layout + "
             "the pyfunc overhead measured with the forward stubbed out, below): the same ratio without the machine's "
             f"noise. Target for batch >= 16: {fmt_target(target)}. \"max abs diff\" is pyfunc against the eager forward (two "
             "layouts: float rounding).")
    return SectionResult(KEY, TITLE, intro, tables, checks)
