"""The machine and conditions of a run: hardware, versions, thread settings, load average, commit, command."""

from __future__ import annotations

import os
import platform
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from benchmarks.harness import REPO, Threads
from benchmarks.records import column

__all__ = ["MachineInfo", "collect", "condition_notes", "display_command"]


@dataclass(frozen=True)
class MachineInfo:
    """Where and how the run happened (shown as the report's last table)."""

    cpu: str = column("CPU")
    logical_cores: int = column("logical cores (os.cpu_count)")
    usable_cores: int = column("usable cores (CPU affinity)")
    gpu: str = column("GPU")
    device: str = column("device benchmarked")
    torch_threads: int = column("torch intra-op threads")
    torch_interop_threads: int = column("torch inter-op threads")
    torch_default_threads: int = column("torch's default intra-op threads here")
    threads_pinned: bool = column("intra-op threads pinned (--threads; --quick pins 1)")
    python: str = column("python")
    torch: str = column("torch")
    mlflow: str = column("mlflow")
    numpy: str = column("numpy")
    platform: str = column("platform")
    load_start: tuple[float, ...] = column("load average (1/5/15 min) at start", "floats")
    load_end: tuple[float, ...] = column("load average (1/5/15 min) at end", "floats")
    network: str = column("network")
    repeats: int = column("repeats")
    commit: str = column("git commit (HEAD when run)")
    uncommitted: tuple[str, ...] = column("uncommitted changes in the package (measured as they were)", "list")
    wall_seconds: float = column("wall time of this run", "time")
    command: str = column("command", "code")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def display_command(argv: list[str]) -> str:
    """``python benchmarks/run.py ARGS`` with absolute paths made repo-relative (or cut to ``.../name``)."""

    def shown(arg: str) -> str:
        option, sep, value = arg.partition("=") if arg.startswith("--") else ("", "", arg)
        if not os.path.isabs(value):
            return arg
        path = Path(value).resolve()
        text = path.relative_to(REPO).as_posix() if path.is_relative_to(REPO) else f".../{path.name}"
        return f"{option}{sep}{text}"

    return " ".join(["python", "benchmarks/run.py", *map(shown, argv)])


def collect(device: str, threads: Threads, repeats: int, filters: int, argv: list[str],
            load_start: tuple[float, ...], wall_seconds: float) -> MachineInfo:
    import mlflow
    import torch

    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count() or 0
    status = _git("status", "--porcelain", "--", "mlflow_ptycho_flavor").splitlines()
    return MachineInfo(
        cpu=_cpu_model(), logical_cores=os.cpu_count() or 0, usable_cores=usable,
        gpu=torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none", device=device,
        torch_threads=torch.get_num_threads(), torch_interop_threads=torch.get_num_interop_threads(),
        torch_default_threads=threads.torch_default, threads_pinned=bool(threads.requested),
        python=platform.python_version(), torch=str(torch.__version__), mlflow=mlflow.__version__,
        numpy=np.__version__, platform=platform.platform(), load_start=tuple(load_start),
        load_end=tuple(os.getloadavg()),
        network=f"PtychoPINNNetwork N=64 (and 128 for scaling), n_filters_scale={filters}, default config, "
                "seeded random weights",
        repeats=repeats, commit=_git("rev-parse", "--short", "HEAD").strip() or "?",
        uncommitted=tuple(line[3:] for line in status if line.strip()), wall_seconds=wall_seconds,
        command=display_command(argv))


def condition_notes(machine: MachineInfo) -> list[str]:
    """Warnings the reader needs before the numbers: a busy machine, pinned threads."""
    notes = []
    busy = max(machine.load_start[0], machine.load_end[0], machine.load_start[1], machine.load_end[1])
    if busy > 0.5 * machine.usable_cores:
        notes.append(f"**The machine was shared and noisy**: load average up to {busy:.1f} on {machine.usable_cores} "
                     "usable cores while this ran. Absolute times are inflated and vary; compare the ratios, which "
                     "come from candidates interleaved within each repeat.")
    if machine.threads_pinned and machine.torch_threads != machine.torch_default_threads:
        notes.append(f"Torch intra-op threads were pinned to {machine.torch_threads} (`--threads`, or --quick's "
                     f"default; torch's default here is {machine.torch_default_threads}): on a small machine shared with other processes, a "
                     "preempted OpenMP thread stalls every parallel op; section 7 (`torch.set_num_threads`) measures "
                     "the effect when it runs.")
    return notes
