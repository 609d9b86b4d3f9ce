"""Section P (``benchmarks/gpu_check.py``): reduced-precision and compiled forwards against strict fp32.

The raw forward of the gridsize-1 benchmark network on one seeded input, under ``inference_mode``: the device's
fp32 against the CPU's, then each :class:`Option` (autocast float16/bfloat16, torch's default cuDNN TF32
convolutions, ``torch.compile`` with and without autocast) against fp32 on the device with cuDNN TF32 off. Each
option gets its max abs and relative L2 error against its :data:`TOLERANCES` and its speed, timed interleaved
with the fp32 forward. Not one of ``run.py``'s sections (``torch.compile``'s inductor backend compiles for
minutes on a small CPU); ``gpu_check.py`` runs it.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np

from benchmarks.config import N_DEFAULT, Context
from benchmarks.harness import inner_count
from benchmarks.models import build_network, inputs
from benchmarks.records import Check, Ratio, RecordTable, SectionResult, Stats, Target, column

__all__ = ["KEY", "TITLE", "TOLERANCES", "CPU_ROW", "PrecisionCheck", "Option", "options", "cudnn_tf32", "run"]

KEY = "precision"
TITLE = "P. Half precision, TF32 and torch.compile against strict fp32"
#: The first row: the device's fp32 forward (cuDNN TF32 off) against the CPU's on the same weights and input.
CPU_ROW = "fp32 on the device (cuDNN TF32 off) vs fp32 on the CPU"
#: (relative L2 error, max abs error) tolerated against strict fp32, by arithmetic. The outputs are complex with
#: |value| < ~1 (sigmoid amplitude times a unit phase), so absolute and relative scales agree. fp32 options only
#: reorder float32 sums (1e-4 abs, as the CUDA test); TF32 and float16 round operands to 10 mantissa bits
#: (u = 4.9e-4) and bfloat16 to 7 (u = 3.9e-3), through ~20 layers with fp32 accumulation: a few u in relative L2
#: (CPU autocast measured 2.8e-4 for float16 and 3.0e-3 for bfloat16 on this network).
TOLERANCES = {"fp32": (1e-5, 1e-4), "tf32": (5e-3, 1e-2), "float16": (5e-3, 1e-2), "bfloat16": (2e-2, 5e-2)}


@dataclass(frozen=True)
class PrecisionCheck:
    """One option against strict fp32 on the same input; ``problem`` says why the numbers are missing."""

    option: str = column("option")
    batch: int = column("batch")
    max_abs_error: float | None = column("max abs error", "g")
    rel_error: float | None = column("relative L2 error", "g")
    max_abs_tolerance: float = column("max abs tolerance", "g")
    rel_tolerance: float = column("relative tolerance", "g")
    first_call_seconds: float | None = column("first call", "time")
    fp32: Stats | None = column("fp32 eager / call")
    timed: Stats | None = column("option / call")
    speed: Ratio | None = column("speed vs fp32 eager [per-repeat range]")
    problem: str = column("problem")
    met: bool | None = column("met", "met")


@dataclass(frozen=True)
class Option:
    """A way of running the forward: ``arithmetic`` names its :data:`TOLERANCES`, ``autocast`` a torch dtype,
    ``tf32`` the cuDNN setting it runs under (see :func:`cudnn_tf32`)."""

    name: str
    arithmetic: str
    autocast: str | None = None
    tf32: bool | None = False
    compiled: bool = False
    cuda_only: bool = False


def options(compile_backend: str) -> list[Option]:
    """The options measured, ``torch.compile`` with ``compile_backend`` ("inductor" on a GPU)."""
    compiled = f"torch.compile (backend={compile_backend})"
    return [Option("fp32, torch's default cuDNN flags (TF32 convolutions where allowed)", "tf32", tf32=None,
                   cuda_only=True),
            Option("autocast float16", "float16", "float16"),
            Option("autocast bfloat16", "bfloat16", "bfloat16"),
            Option(f"{compiled} fp32", "fp32", compiled=True),
            Option(f"{compiled} + autocast bfloat16", "bfloat16", "bfloat16", compiled=True)]


@contextlib.contextmanager
def cudnn_tf32(allowed: bool | None) -> Iterator[None]:
    """cuDNN convolutions in TF32 (True) or true fp32 (False) for the duration; None leaves the process's setting.

    The legacy ``allow_tf32`` flag on purpose: it sets the per-operator ``fp32_precision`` flags consistently,
    while setting those directly makes torch refuse later reads of the legacy flag.
    """
    import torch

    if allowed is None:
        yield
        return
    before = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = allowed
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = before


def _errors(output: np.ndarray, reference: np.ndarray) -> tuple[float, float]:
    """Max abs error and relative L2 error of ``output`` against ``reference``."""
    return (float(np.max(np.abs(output - reference))),
            float(np.linalg.norm(output - reference) / np.linalg.norm(reference)))


def _checks(rows: list[PrecisionCheck]) -> list[Check]:
    checks = []
    for row in rows:
        if row.met is None:
            continue
        detail = row.problem or f"max abs {row.max_abs_error:.3g}, tolerance {row.max_abs_tolerance:g}"
        checks.append(Check.of("P Precision", f"{row.option}: relative L2 error vs strict fp32",
                               float("nan") if row.rel_error is None else row.rel_error,
                               Target(high=row.rel_tolerance, unit="", also="max abs error within its tolerance"),
                               unit="", detail=detail, condition=bool(row.met)))
        if row.speed is not None:
            checks.append(Check.of("P Precision", f"{row.option}: speed vs fp32 eager", row.speed.median, None))
    return checks


def run(ctx: Context, *, batch: int = 128, compile_backend: str = "inductor") -> SectionResult:
    """Every option and the device's fp32 against strict fp32 (cuDNN TF32 off), batch ``batch``."""
    import torch

    cfg, timer, device = ctx.cfg, ctx.timer, torch.device(ctx.cfg.device)
    cpu_network = build_network(N_DEFAULT, 1, cfg.filters, seed=1)
    network = copy.deepcopy(cpu_network).to(device)
    x_cpu = torch.from_numpy(inputs(batch, 1, N_DEFAULT, seed=7))
    x, factor = x_cpu.to(device), torch.ones(batch, 1, 1, 1, device=device)

    def forward(module: Any, autocast: str | None) -> Callable[[], Any]:
        def call() -> Any:
            with torch.inference_mode(), (torch.autocast(device.type, dtype=getattr(torch, autocast)) if autocast
                                          else contextlib.nullcontext()):
                return module(x, factor)
        return call

    def as_numpy(output: Any) -> np.ndarray:
        return output.to(torch.complex64).cpu().numpy().astype(np.complex128)

    strict = forward(network, None)
    with cudnn_tf32(False):
        reference = as_numpy(strict())
    with torch.inference_mode():
        cpu_reference = cpu_network(x_cpu, torch.ones(batch, 1, 1, 1)).numpy().astype(np.complex128)
    rel_tol, abs_tol = TOLERANCES["fp32"]
    max_abs, rel = _errors(reference, cpu_reference)
    rows = [PrecisionCheck(CPU_ROW, batch, max_abs, rel, abs_tol, rel_tol, None, None, None, None, "",
                           max_abs <= abs_tol and rel <= rel_tol)]
    measured: dict[str, tuple[Option, float, float, float]] = {}
    candidates: dict[str, Callable[[], Any]] = {"fp32 eager": strict}
    contexts: dict[str, Callable[[], Any]] = {"fp32 eager": lambda: cudnn_tf32(False)}
    for option in options(compile_backend):
        rel_tol, abs_tol = TOLERANCES[option.arithmetic]
        if option.cuda_only and device.type != "cuda":
            rows.append(PrecisionCheck(option.name, batch, None, None, abs_tol, rel_tol, None, None, None, None,
                                       "CUDA only", None))
            continue
        try:
            module = torch.compile(network, backend=compile_backend) if option.compiled else network
            call = forward(module, option.autocast)
            with cudnn_tf32(option.tf32):
                first = timer.once(call)  # compiles, for the compiled options
                max_abs, rel = _errors(as_numpy(call()), reference)
        except Exception as exc:  # noqa: BLE001 - recorded as this option's problem
            rows.append(PrecisionCheck(option.name, batch, None, None, abs_tol, rel_tol, None, None, None, None,
                                       f"{type(exc).__name__}: {str(exc)[:200]}", False))
            continue
        measured[option.name] = (option, first, max_abs, rel)
        candidates[option.name] = call
        contexts[option.name] = lambda tf32=option.tf32: cudnn_tf32(tf32)
    with cudnn_tf32(False):
        inner = inner_count(timer.once(strict), cfg.sample_seconds)
    samples = timer.interleave(candidates, cfg.repeats, inner=inner, contexts=contexts)
    for name, (option, first, max_abs, rel) in measured.items():
        rel_tol, abs_tol = TOLERANCES[option.arithmetic]
        rows.append(PrecisionCheck(name, batch, max_abs, rel, abs_tol, rel_tol, first, samples["fp32 eager"],
                                   samples[name], Ratio.paired(samples["fp32 eager"], samples[name]), "",
                                   max_abs <= abs_tol and rel <= rel_tol))
    intro = (f"Raw forward of the benchmark network (gridsize 1, N={N_DEFAULT}, n_filters_scale={cfg.filters}, "
             f"seeded weights) on one seeded input of batch {batch}, `inference_mode`, device `{cfg.device}`. "
             "Reference: fp32 with cuDNN TF32 off (`torch.backends.cudnn.allow_tf32 = False`); every option is "
             "compared with it (max abs error and relative L2 error of the complex output) and timed interleaved "
             "with it; \"first call\" includes compilation. Tolerances (relative L2 / max abs): fp32 1e-5 / 1e-4, "
             "TF32 and float16 5e-3 / 1e-2, bfloat16 2e-2 / 5e-2 (`TOLERANCES` in "
             "`benchmarks/sections/precision.py` says why).")
    return SectionResult(KEY, TITLE, intro, [RecordTable(PrecisionCheck, rows)], _checks(rows))
