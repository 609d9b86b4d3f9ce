"""Section 7 (``--fast-paths``): ways to run the raw forward faster, each against eager on the same tensors.

Eager is the network in torch's default contiguous layout. channels_last is the CPU default of the package's
predict paths since performance round 2 (section 1 measures it end to end); the others are opt-in.

channels_last (module and input), other intra-op thread counts, TorchScript trace + freeze, and ``torch.compile``
(in a fresh process with a timeout: ``probes.compile``). An option is "worth it" when it is >= 1.10x faster and
within 1e-4 of eager.
"""

from __future__ import annotations

import contextlib
import copy
import os
import subprocess
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from benchmarks.config import Context
from benchmarks.harness import Threads, inner_count
from benchmarks.models import eager_copy, inputs
from benchmarks.probes import run_probe
from benchmarks.records import Check, Ratio, RecordTable, SectionResult, Stats, Target, column

__all__ = ["KEY", "TITLE", "SPEED_TARGET", "MAX_DIFF", "FastPath", "run"]

KEY = "fast"
TITLE = "7. Optional fast paths (--fast-paths)"
#: eager time / option time; the option's output must also be within MAX_DIFF of eager's.
MAX_DIFF = 1e-4
SPEED_TARGET = Target(low=1.10, also="max |diff| <= 1e-4")


@dataclass(frozen=True)
class FastPath:
    """One option at one batch size; the timings are None when it failed (``problem`` says how)."""

    option: str = column("option")
    batch: int = column("batch")
    eager: Stats | None = column("eager / call")
    timed: Stats | None = column("option / call")
    speed: Ratio | None = column("speed vs eager [per-repeat range]")
    max_abs_diff: float | None = column("max abs diff", "g")
    problem: str = column("problem")
    target: Target = column("target", "target")
    met: bool | None = column("met", "met")


def _run(module: Any, x: Any, factor: Any) -> np.ndarray:
    import torch

    with torch.inference_mode():
        return module(x, factor).cpu().numpy()


def _options(network: Any, x: Any, factor: Any) -> tuple[dict[str, Callable[[], np.ndarray]], dict[str, Any],
                                                         dict[str, str]]:
    """The in-process options (callables), the contexts they run in, and the ones that failed to build."""
    import torch

    options: dict[str, Callable[[], np.ndarray]] = {}
    contexts: dict[str, Any] = {}
    problems: dict[str, str] = {}
    channels_last = copy.deepcopy(network).to(memory_format=torch.channels_last)
    x_channels_last = x.contiguous(memory_format=torch.channels_last)
    options["channels_last (module + input)"] = lambda: _run(channels_last, x_channels_last, factor)
    current = torch.get_num_threads()
    for count in sorted({1, os.cpu_count() or 1, max(1, current // 2)} - {current}):
        name = f"torch.set_num_threads({count})"
        options[name] = lambda: _run(network, x, factor)
        contexts[name] = lambda count=count: Threads.temporarily(count)
    try:
        with warnings.catch_warnings(), torch.inference_mode():
            warnings.simplefilter("ignore")
            traced = torch.jit.freeze(torch.jit.trace(copy.deepcopy(network).eval(), (x, factor)))
        options["TorchScript trace + freeze"] = lambda: _run(traced, x, factor)
    except Exception as exc:  # noqa: BLE001 - reported in the table
        problems["TorchScript trace + freeze"] = f"{type(exc).__name__}: {str(exc)[:120]}"
    return options, contexts, problems


def measure_batch(ctx: Context, network: Any, batch: int) -> list[FastPath]:
    """Every in-process option at ``batch``, interleaved with eager."""
    import torch

    model_set = ctx.models[ctx.main_gridsize]
    x = torch.from_numpy(inputs(batch, model_set.channels, model_set.N, seed=batch)).to(ctx.cfg.device)
    factor = torch.ones(batch, 1, 1, 1, device=ctx.cfg.device)
    eager = lambda: _run(network, x, factor)  # noqa: E731
    reference = eager()
    options, contexts, problems = _options(network, x, factor)
    diffs = {}
    for name, fn in list(options.items()):
        try:
            with contexts.get(name, contextlib.nullcontext)():
                diffs[name] = float(np.max(np.abs(fn() - reference)))
        except Exception as exc:  # noqa: BLE001 - reported in the table
            problems[name] = f"{type(exc).__name__}: {str(exc)[:120]}"
            del options[name]
    inner = inner_count(ctx.timer.once(eager), ctx.cfg.sample_seconds)
    samples = ctx.timer.interleave({"eager": eager, **options}, ctx.cfg.repeats, inner=inner, contexts=contexts)
    rows = []
    for name in options:
        speed = Ratio.paired(samples["eager"], samples[name])
        rows.append(FastPath(name, batch, samples["eager"], samples[name], speed, diffs[name], "", SPEED_TARGET,
                             SPEED_TARGET.holds(speed.median) and diffs[name] <= MAX_DIFF))
    rows += [FastPath(name, batch, None, None, None, None, problem, SPEED_TARGET, None)
             for name, problem in problems.items()]
    return rows


def measure_compile(ctx: Context) -> FastPath | None:
    """``torch.compile`` (default mode) in a fresh process; None when the run skips it (``--quick``)."""
    cfg, model_set = ctx.cfg, ctx.models[ctx.main_gridsize]
    if cfg.compile_batch is None:
        return None
    name = "torch.compile (default mode, fresh process)"
    args = {"N": model_set.N, "gridsize": model_set.gridsize, "filters": model_set.filters,
            "seed": model_set.gridsize, "batch": cfg.compile_batch, "repeats": cfg.repeats, "device": cfg.device,
            "threads": ctx.threads.requested}
    started = time.perf_counter()
    try:
        result = run_probe("compile", args, timeout=cfg.compile_timeout, env=ctx.threads.subprocess_env())
    except subprocess.TimeoutExpired:
        return FastPath(name, cfg.compile_batch, None, None, None, None, f"did not compile and run within "
                        f"{cfg.compile_timeout:.0f} s", SPEED_TARGET, False)
    except RuntimeError as exc:
        return FastPath(name, cfg.compile_batch, None, None, None, None, str(exc)[-160:], SPEED_TARGET, None)
    eager, compiled = Stats.of(result["eager"]), Stats.of(result["compiled"])
    speed = Ratio.paired(eager, compiled)
    return FastPath(f"{name}; first call {result['compile_seconds']:.0f} s, probe {time.perf_counter() - started:.0f} s",
                    cfg.compile_batch, eager, compiled, speed, result["max_abs_diff"], "", SPEED_TARGET,
                    SPEED_TARGET.holds(speed.median) and result["max_abs_diff"] <= MAX_DIFF)


def run(ctx: Context) -> SectionResult:
    import torch

    model_set = ctx.models[ctx.main_gridsize]
    # eager = torch's default contiguous layout (the pyfunc model's own module is NHWC on the CPU by default, which
    # is what the channels_last row measures)
    network = eager_copy(ctx.pyfuncs[ctx.main_gridsize].get_raw_model())
    rows = [row for batch in ctx.cfg.fast_path_batches for row in measure_batch(ctx, network, batch)]
    compiled = measure_compile(ctx)
    rows += [compiled] if compiled is not None else []
    checks = []
    for option in dict.fromkeys(r.option for r in rows if r.speed is not None):
        best = max((r for r in rows if r.option == option and r.speed is not None), key=lambda r: r.speed.median)
        checks.append(Check.of("7 Fast paths", f"{option}, speed vs eager (best: batch {best.batch})",
                               best.speed.median, SPEED_TARGET, detail=f"max |diff| {best.max_abs_diff:.3g}",
                               condition=best.max_abs_diff <= MAX_DIFF))
    intro = (f"Raw forward (`inference_mode`, gridsize {model_set.gridsize}, N={model_set.N}) eager (contiguous "
             "layout) vs each option; channels_last is the CPU default of the package's predict paths (section 1), "
             "the others are opt-in. "
             "Interleaved; speed = eager time / option time (median of per-repeat ratios). \"Worth it\" target: "
             ">= 1.10x faster with max |diff| <= 1e-4 against eager. Intra-op threads here: "
             f"{torch.get_num_threads()}" + ("; torch.compile is skipped in --quick." if ctx.cfg.compile_batch is None
                                            else "."))
    return SectionResult(KEY, TITLE, intro, [RecordTable(FastPath, rows)], checks)
