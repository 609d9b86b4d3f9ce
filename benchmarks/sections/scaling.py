"""Section 5: pyfunc ``predict`` time against the batch size (a fitted exponent) and against N (64 -> 128)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from benchmarks.config import Context
from benchmarks.harness import inner_count
from benchmarks.models import inputs, load_pyfunc, make_models
from benchmarks.records import Check, Ratio, RecordTable, SectionResult, Stats, Target, column

__all__ = ["KEY", "TITLE", "EXPONENT_TARGET", "N_TARGET", "ScalingPoint", "ScalingFit", "run"]

KEY = "scaling"
TITLE = "5. Scaling"
#: The least-squares exponent k of time ~ batch^k over batch >= 4: linear (the CPU default splits inputs into
#: batches of 16, so large batches cost no more per pattern than small ones).
EXPONENT_TARGET = Target(low=0.8, high=1.05, unit="")
#: time(N=128) / time(N=64) at the same batch: no faster than the pixel count (4x).
N_TARGET = Target(high=4.0)


@dataclass(frozen=True)
class ScalingPoint:
    """pyfunc predict of one (N, batch), all points interleaved in each repeat."""

    N: int = column("N")
    batch: int = column("batch")
    time: Stats = column("time / call")
    per_sample: float = column("time / sample", "time")
    samples_per_s: float = column("samples/s", "g")


@dataclass(frozen=True)
class ScalingFit:
    """A fitted or compared quantity, with its spread over the repeats and context computed with it."""

    fit: str = column("fit")
    value: float = column("value", "g")
    per_repeat_low: float = column("per-repeat min", "g")
    per_repeat_high: float = column("per-repeat max", "g")
    detail: str = column("detail")
    target: Target = column("target", "target")
    met: bool = column("met", "met")


def flops_per_sample(network: Any, channels: int, N: int) -> float:
    """FLOPs of one pattern's forward (``torch.utils.flop_counter``)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    parameter = next(network.parameters())
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        network(torch.rand(1, channels, N, N, device=parameter.device), None)
    return float(counter.get_total_flops())


def _slope(batches: list[int], seconds: list[float]) -> float:
    return float(np.polyfit(np.log(batches), np.log(seconds), 1)[0])


def run(ctx: Context) -> SectionResult:
    import torch

    from mlflow_ptycho_flavor.model.inference import default_batch_size

    cfg = ctx.cfg
    gridsize = ctx.main_gridsize
    small = ctx.models[gridsize]
    big = make_models(ctx.work, 128, gridsize, small.filters, references=False)
    pyfunc_small, pyfunc_big = ctx.pyfuncs[gridsize], load_pyfunc(big.ours_dir, cfg.device)
    points: dict[tuple[int, int], Callable[[], Any]] = {}
    for batch in cfg.scaling_batches:
        x = inputs(batch, small.channels, small.N, seed=batch)
        points[(small.N, batch)] = lambda x=x: pyfunc_small.predict(x)
    x_big = inputs(cfg.scaling_n_batch, big.channels, big.N, seed=7)
    points[(big.N, cfg.scaling_n_batch)] = lambda: pyfunc_big.predict(x_big)
    names = {key: f"N={key[0]} B={key[1]}" for key in points}
    inner = {names[key]: inner_count(ctx.timer.once(fn), cfg.sample_seconds) for key, fn in points.items()}
    samples = ctx.timer.interleave({names[key]: fn for key, fn in points.items()}, cfg.repeats, inner=inner,
                                   warmup=0)
    stats = {key: samples[names[key]] for key in points}
    data = [ScalingPoint(n, batch, s, s.median / batch, batch / s.median) for (n, batch), s in stats.items()]

    fitted = [b for b in cfg.scaling_batches if b >= 4]
    k = _slope(fitted, [stats[(small.N, b)].median for b in fitted])
    per_repeat_k = [_slope(fitted, [stats[(small.N, b)].samples[r] for b in fitted]) for r in range(cfg.repeats)]
    by_n = Ratio.paired(stats[(big.N, cfg.scaling_n_batch)], stats[(small.N, cfg.scaling_n_batch)])
    flops_small = flops_per_sample(pyfunc_small.get_raw_model(), small.channels, small.N)
    flops_big = flops_per_sample(pyfunc_big.get_raw_model(), big.channels, big.N)
    flop_ratio = flops_big / flops_small
    exponent = math.log2(by_n.median)
    fits = [
        ScalingFit(f"time ~ batch^k (N={small.N}, batch {', '.join(map(str, fitted))})", k, min(per_repeat_k),
                   max(per_repeat_k), "least-squares slope of log(time) on log(batch)", EXPONENT_TARGET,
                   EXPONENT_TARGET.holds(k)),
        ScalingFit(f"time(N={big.N}) / time(N={small.N}), batch {cfg.scaling_n_batch}", by_n.median, by_n.low,
                   by_n.high, f"time ~ N^{exponent:.2f}; FLOPs/sample {flops_small / 1e9:.3g} G -> "
                   f"{flops_big / 1e9:.3g} G (ratio {flop_ratio:.3g}, time/FLOP ratio {by_n.median / flop_ratio:.3g});"
                   " pixels 4x", N_TARGET, N_TARGET.holds(by_n.median)),
    ]
    checks = [
        Check.of("5 Scaling", f"batch exponent k (N={small.N})", k, EXPONENT_TARGET, unit="",
                 detail=f"per-repeat {min(per_repeat_k):.3g}–{max(per_repeat_k):.3g}"),
        Check.of("5 Scaling", f"time N={big.N} / N={small.N}", by_n.median, N_TARGET,
                 detail=f"N^{exponent:.2f}; FLOPs {flop_ratio:.3g}x"),
    ]
    chunk = default_batch_size(torch.device(cfg.device))
    intro = (f"pyfunc `predict`, gridsize {gridsize}, all sizes interleaved in each repeat; predict runs the "
             f"network in chunks of {chunk} patterns (the library's default on `{cfg.device}`). The batch exponent k "
             "is the least-squares slope of log(time) on log(batch) over batch >= 4 (target 0.8 <= k <= 1.1: about "
             f"linear, nothing super-linear). The N comparison is at batch {cfg.scaling_n_batch}; target: time grows "
             "no faster than the pixel count (<= 4x for N 64 -> 128); the FLOP ratio (`torch.utils.flop_counter`) is "
             "shown too.")
    return SectionResult(KEY, TITLE, intro, [RecordTable(ScalingFit, fits, "Fits"),
                                             RecordTable(ScalingPoint, data, "Data")], checks)
