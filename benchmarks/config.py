"""The run's settings (full or ``--quick``) and the context every section receives."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from benchmarks.harness import Threads, Timer
    from benchmarks.models import ModelSet

__all__ = ["Config", "Context", "N_DEFAULT"]

#: Pattern size of the benchmark networks (section 5 adds N=128).
N_DEFAULT = 64


@dataclass
class Config:
    """Sizes and repeat counts; :meth:`quick` shrinks every section to a smoke test."""

    device: str = "cpu"
    quick: bool = False
    filters: int = 2  # n_filters_scale of the benchmark networks
    repeats: int = 5
    gridsizes: tuple[int, ...] = (1, 2)
    batches: tuple[int, ...] = (1, 16, 128)
    scaling_batches: tuple[int, ...] = (1, 4, 16, 64, 128)
    scaling_n_batch: int = 16  # batch of the N=64 vs N=128 comparison (one of scaling_batches)
    serving_batches: tuple[int, ...] = (1, 16)
    serving_requests: dict[int, int] = field(default_factory=lambda: {1: 200, 16: 24})
    serving_concurrency: int = 4
    serving_rounds: int = 4
    fast_path_batches: tuple[int, ...] = (1, 16)
    compile_batch: int | None = 16  # None: skip torch.compile (it compiles for minutes on a small CPU)
    compile_timeout: float = 420.0
    spark_patterns: int = 128
    sample_seconds: float = 0.25  # short calls are repeated inside one sample until it lasts about this long
    stub_iterations: int = 3000
    #: Section 1's checks of the CPU default layout (fixture agreement, operator profile) when the device is the
    #: CPU; the GPU check's CPU dry run turns them off to take the steps its GPU run takes.
    cpu_layout_checks: bool = True

    def __post_init__(self) -> None:
        if self.scaling_n_batch not in self.scaling_batches:
            raise ValueError("scaling_n_batch must be one of scaling_batches (the N=64 point it is compared with)")
        if sum(b >= 4 for b in self.scaling_batches) < 2:
            raise ValueError("the batch exponent needs at least two scaling_batches >= 4")

    @classmethod
    def quick_mode(cls, device: str = "cpu") -> "Config":
        """Tiny sizes, 2 repeats: every section runs, its numbers are not headline numbers."""
        return cls(device=device, quick=True, filters=1, repeats=2, batches=(1, 16), scaling_batches=(1, 4, 16),
                   scaling_n_batch=4, serving_batches=(1,), serving_requests={1: 10}, serving_concurrency=2,
                   serving_rounds=2, fast_path_batches=(1,), compile_batch=None, spark_patterns=32,
                   sample_seconds=0.05, stub_iterations=100)


@dataclass
class Context:
    """What the sections share: settings, timer, thread setting, the saved models, their loaded pyfunc models.

    ``models`` and ``pyfuncs`` are keyed by gridsize (N=64); ``work`` is the run's temporary folder. ``early``
    holds work a section started before the sections ran (``--quick`` starts the scoring servers and the RSS
    probe first, in the background), by section key; the section takes it out with :meth:`take_early`.
    """

    cfg: Config
    timer: "Timer"
    threads: "Threads"
    work: Path
    models: dict[int, "ModelSet"]
    pyfuncs: dict[int, Any]
    early: dict[str, Any] = field(default_factory=dict)

    def take_early(self, key: str) -> Any:
        """The work section ``key`` started early (None when it did not), removed from :attr:`early`."""
        return self.early.pop(key, None)

    @property
    def main_gridsize(self) -> int:
        """The gridsize the single-model sections (serving, scaling, fast paths, Spark) use: 1 when present."""
        return 1 if 1 in self.models else min(self.models)
