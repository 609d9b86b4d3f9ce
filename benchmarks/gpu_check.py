#!/usr/bin/env python
"""The GPU check (issue 17, "GPU"): CUDA-marked tests, predict/load/serving rows and reduced-precision options on
a CUDA device, in one short run that writes ``benchmarks/RESULTS-gpu.md``. Start it through ``gpu_check.sh``.

    bash benchmarks/gpu_check.sh [--dry-run] [--out FILE.md] [--records FILE.json] [--only tests,predict,...]

Steps, in order: ``device`` (GPU name, capability, memory, torch/CUDA/cuDNN/driver versions, TF32 defaults),
``tests`` (``python -m pytest -m cuda -q`` on the test files holding CUDA-marked tests), ``predict``, ``load``,
``serving`` (the sections of ``benchmarks/sections`` at small sizes on the device), ``precision`` (autocast
float16/bfloat16, TF32 and ``torch.compile`` against strict fp32 on one seeded input). A step that fails is recorded
and the others still run; the report is rewritten atomically after every step, so a run cut off by a time limit
keeps the steps it finished. Exit status 1 when a step failed, a CUDA test failed or an option left its tolerance.

``--dry-run`` (or ``GPU_CHECK_DEVICE=cpu``) runs the same steps on the CPU with tiny sizes and ``torch.compile``'s
``eager`` backend (graph capture without code generation, which would take minutes on a small CPU), and writes to
a temporary folder, never to the committed report.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import importlib.metadata
import os
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable
from xml.etree import ElementTree

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path[:] = [str(REPO)] + [p for p in sys.path if Path(p or ".").resolve() != HERE]  # `benchmarks.*` imports

from benchmarks.config import N_DEFAULT, Config, Context  # noqa: E402
from benchmarks.harness import Threads, Timer  # noqa: E402
from benchmarks.machine import collect, condition_notes, display_command  # noqa: E402
from benchmarks.models import load_pyfunc, make_models  # noqa: E402
from benchmarks.records import Check, RecordTable, SectionResult, Target, column  # noqa: E402
from benchmarks.report import Report, render, to_json  # noqa: E402
from benchmarks.sections import precision, section_module  # noqa: E402
from mlflow_ptycho_flavor._io import atomic_write_bytes  # noqa: E402 - the package's one atomic writer

STEPS = ("tests", "predict", "load", "serving", "precision")
OUT_DEFAULT = HERE / "RESULTS-gpu.md"
WALL_TARGET = {"cuda": Target(high=300.0, unit="s"), "cpu": Target(high=60.0, unit="s")}


@dataclass(frozen=True)
class Plan:
    """Sizes of one check: ``bench`` for the reused sections, the rest for the tests and the precision step."""

    device: str
    dry_run: bool
    bench: Config
    precision_batch: int
    compile_backend: str
    test_timeout: float


def make_plan(device: str) -> Plan:
    dry_run = device == "cpu"
    if dry_run:
        bench = Config(device=device, quick=True, filters=1, repeats=2, gridsizes=(1,), batches=(1, 4),
                       serving_batches=(1,), serving_requests={1: 4}, serving_concurrency=2, serving_rounds=1,
                       compile_batch=None, sample_seconds=0.02, stub_iterations=40, cpu_layout_checks=False)
        return Plan(device, True, bench, precision_batch=2, compile_backend="eager", test_timeout=180.0)
    bench = Config(device=device, filters=2, repeats=5, gridsizes=(1, 2), batches=(1, 16, 128),
                   serving_batches=(1, 16), serving_requests={1: 100, 16: 24}, serving_concurrency=4,
                   serving_rounds=2, compile_batch=None, sample_seconds=0.1, stub_iterations=1000)
    return Plan(device, False, bench, precision_batch=128, compile_backend="inductor", test_timeout=240.0)


# ----------------------------------------------------------------------------------------------------------------
# Records
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DeviceInfo:
    device: str = column("device checked")
    dry_run: bool = column("CPU dry run")
    name: str = column("GPU")
    capability: str = column("compute capability")
    memory: int = column("GPU memory", "bytes")
    driver: str = column("driver (nvidia-smi)")
    torch: str = column("torch")
    cuda: str = column("CUDA (torch.version.cuda)")
    cudnn: str = column("cuDNN")
    triton: str = column("triton")
    cudnn_tf32: bool = column("cuDNN TF32 allowed by default (torch.backends.cudnn.allow_tf32)")
    matmul_precision: str = column("torch.get_float32_matmul_precision()")


@dataclass(frozen=True)
class TestRun:
    command: str = column("command", "code")
    passed: int = column("passed")
    skipped: int = column("skipped")
    failed: int = column("failed")
    errors: int = column("errors")
    returncode: int = column("exit status")
    seconds: float = column("wall time", "time")
    met: bool = column("met", "met")


@dataclass(frozen=True)
class StepOutcome:
    step: str = column("step")
    seconds: float = column("wall time", "time")
    ok: bool = column("ran to the end", "met")
    problem: str = column("problem")


# ----------------------------------------------------------------------------------------------------------------
# Steps
# ----------------------------------------------------------------------------------------------------------------
def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def device_section(plan: Plan) -> SectionResult:
    import torch

    name, capability, memory, driver = "none (CPU dry run)", "", 0, ""
    if not plan.dry_run:
        props = torch.cuda.get_device_properties(torch.device(plan.device))
        name, capability, memory = props.name, f"{props.major}.{props.minor}", int(props.total_memory)
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                    capture_output=True, text=True, timeout=20).stdout.strip()
    info = DeviceInfo(plan.device, plan.dry_run, name, capability, memory, driver, str(torch.__version__),
                      str(torch.version.cuda), str(torch.backends.cudnn.version()), _version("triton"),
                      bool(torch.backends.cudnn.allow_tf32), torch.get_float32_matmul_precision())
    return SectionResult("device", "0. Device", tables=[RecordTable(DeviceInfo, [info])])


def cuda_test_files() -> list[Path]:
    """The test files that hold CUDA-marked tests (``pytest.mark.cuda`` or a module-level ``pytestmark``)."""
    return sorted(p for p in (REPO / "tests").glob("test_*.py") if "mark.cuda" in p.read_text(encoding="utf-8"))


def tests_section(plan: Plan, work: Path) -> SectionResult:
    files = [p.relative_to(REPO).as_posix() for p in cuda_test_files()]
    junit = work / "cuda-tests.xml"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}
    started = time.perf_counter()
    completed = subprocess.run([sys.executable, "-m", "pytest", "-m", "cuda", "-q", f"--junitxml={junit}",
                                f"--basetemp={work / 'pytest'}", *files], cwd=REPO, env=env, capture_output=True,
                               text=True, timeout=plan.test_timeout)
    seconds = time.perf_counter() - started
    if not junit.is_file():
        raise RuntimeError(f"pytest wrote no report (exit {completed.returncode}): {completed.stdout[-1500:]}")
    root = ElementTree.parse(junit).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    total, failed, errors, skipped = (int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped"))
    passed = total - failed - errors - skipped
    # on a GPU every CUDA test must run and pass; in the dry run they are skipped, and must not fail
    ran = total > 0 if plan.dry_run else (passed > 0 and skipped == 0)
    ok = completed.returncode == 0 and failed == errors == 0 and ran
    run = TestRun(" ".join(["python -m pytest -m cuda -q", *files]), passed, skipped, failed, errors,
                  completed.returncode, seconds, ok)
    check = Check.of("T CUDA tests", "failed + errors", failed + errors,
                     Target(high=0, unit="", also="exit 0; on a GPU >= 1 passed and none skipped"), unit="",
                     detail=f"{passed} passed, {skipped} skipped", condition=ok)
    failures = [line[:300] for line in completed.stdout.splitlines() if line.startswith(("FAILED", "ERROR"))]
    return SectionResult("tests", "T. CUDA-marked tests", tables=[RecordTable(TestRun, [run])], checks=[check],
                         notes=failures)


def setup_context(plan: Plan, work: Path, threads: Threads, serving: bool) -> Context:
    """Save the benchmark models (``mlflow.pytorch`` references for gridsize 1 only) and load their pyfuncs.

    The dry run also starts the scoring servers now, in the background (as ``run.py --quick`` does), and freezes
    the heap (``gc.freeze``) so that the load section's ``gc.collect`` between samples (outside the timing) is
    quick; the GPU run keeps ``run.py``'s conditions.
    """
    cfg = plan.bench
    main = min(cfg.gridsizes)
    models = {g: make_models(work, N_DEFAULT, g, cfg.filters, references=g == main) for g in cfg.gridsizes}
    ctx = Context(cfg, Timer(cfg.device), threads, work, models, pyfuncs={})
    if plan.dry_run and serving:
        ctx.early["serving"] = section_module("serving").start_early(ctx)
    ctx.pyfuncs = {g: load_pyfunc(m.ours_dir, cfg.device) for g, m in models.items()}
    if plan.dry_run:
        gc.freeze()
    return ctx


# ----------------------------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------------------------
def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="every step on the CPU, tiny sizes, temporary output")
    parser.add_argument("--out", type=Path, default=None, help="markdown report (default benchmarks/RESULTS-gpu.md; "
                                                               "in a dry run a temporary folder's RESULTS-gpu.md)")
    parser.add_argument("--records", type=Path, default=None, help="also write every record as JSON here")
    parser.add_argument("--only", default=",".join(STEPS), help=f"comma-separated steps of {','.join(STEPS)}")
    args = parser.parse_args(argv)
    unknown = set(args.only.split(",")) - set(STEPS)
    if unknown:
        parser.error(f"--only: unknown step(s) {', '.join(sorted(unknown))}; choose from {', '.join(STEPS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    started, load_start = time.perf_counter(), os.getloadavg()
    import logging

    import torch

    logging.getLogger("mlflow").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    device = "cpu" if args.dry_run else os.environ.get("GPU_CHECK_DEVICE", "cuda")  # e.g. cuda:1
    if device != "cpu" and not torch.cuda.is_available():
        print(f"gpu_check: device {device!r} but CUDA is not available here; use --dry-run for the CPU dry run",
              file=sys.stderr)
        return 2
    plan = make_plan(device)
    work = Path(tempfile.mkdtemp(prefix="ptycho-gpu-check-"))
    dry_out = Path(tempfile.gettempdir()) / "ptycho-gpu-check-dry-run" / "RESULTS-gpu.md"
    out = args.out or (dry_out if plan.dry_run else OUT_DEFAULT)
    threads = Threads.detect(1 if plan.dry_run else None)  # the dry run shares a small CPU
    threads.apply()
    command = display_command(argv).replace("python benchmarks/run.py", "bash benchmarks/gpu_check.sh", 1)
    sections: list[SectionResult] = [device_section(plan)]
    outcomes: list[StepOutcome] = []

    def write() -> None:
        seconds = time.perf_counter() - started
        machine = dataclasses.replace(
            collect(device, threads, plan.bench.repeats, plan.bench.filters, argv, load_start, seconds),
            command=command, network=f"PtychoPINNNetwork N={N_DEFAULT}, n_filters_scale={plan.bench.filters}, "
                                     "default config, seeded random weights")
        wall = Check.of("Steps", "wall time of the whole check", seconds, WALL_TARGET[torch.device(device).type],
                        unit="s")
        steps = SectionResult("steps", "Steps", tables=[RecordTable(StepOutcome, list(outcomes))], checks=[wall])
        header = (f"GPU check generated by `{command}` on {time.strftime('%Y-%m-%d %H:%M %Z')}"
                  + (" — **CPU dry run** (tiny sizes; not GPU figures)." if plan.dry_run else ".")
                  + " Times are medians over repeats with [IQR]; ratios are medians of per-repeat paired ratios.")
        report = Report(header, [*sections, steps], machine, condition_notes(machine))
        atomic_write_bytes(out, render(report).encode("utf-8"))
        if args.records is not None:
            atomic_write_bytes(args.records, to_json(report).encode("utf-8"))

    def step(name: str, run: Callable[[], SectionResult | None]) -> None:
        print(f"[{time.perf_counter() - started:6.1f} s] {name}", file=sys.stderr, flush=True)
        begun, problem = time.perf_counter(), ""
        try:
            result = run()
        except Exception as exc:  # noqa: BLE001 - recorded; the other steps still run
            result, problem = None, f"{type(exc).__name__}: {str(exc)[:400]}"
        if result is not None:
            sections.append(result)
        outcomes.append(StepOutcome(name, time.perf_counter() - begun, not problem, problem))
        write()

    wanted = [s for s in STEPS if s in args.only.split(",")]
    context: list[Context] = []

    def models() -> Context:
        if not context:
            raise RuntimeError("the models were not set up (see the setup step)")
        return context[0]

    try:
        if "tests" in wanted:
            step("tests", lambda: tests_section(plan, work))
        if {"predict", "load", "serving"} & set(wanted):
            step("setup", lambda: context.append(setup_context(plan, work, threads, "serving" in wanted)))
        for key in ("predict", "load", "serving"):
            if key in wanted:
                step(key, lambda key=key: section_module(key).run(models()))
        if "precision" in wanted:
            bare = Context(plan.bench, Timer(device), threads, work, models={}, pyfuncs={})  # needs no saved models
            step("precision", lambda: precision.run(bare, batch=plan.precision_batch,
                                                    compile_backend=plan.compile_backend))
    finally:
        servers = context[0].early.pop("serving", None) if context else None
        if servers is not None:  # started early, never taken: the serving step did not run
            servers.stop()
        shutil.rmtree(work, ignore_errors=True)
    correct = all(c.met is not False for s in sections if s.key in ("tests", "precision") for c in s.checks)
    print(f"gpu_check: wrote {out}", file=sys.stderr)
    return 0 if correct and all(o.ok for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
