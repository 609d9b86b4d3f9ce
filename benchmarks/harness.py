"""Measurement machinery: the interleaved timer, thread control, cProfile summaries, background work.

The timer runs every candidate of a comparison once per repeat, rotating (and every other cycle reversing) the
order, so that machine noise hits them alike; :class:`~benchmarks.records.Stats` and
:class:`~benchmarks.records.Ratio` turn its samples into medians, quartiles and paired ratios.
"""

from __future__ import annotations

import contextlib
import cProfile
import os
import pstats
import sysconfig
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from benchmarks.records import ProfileEntry, Stats

__all__ = ["REPO", "Timer", "inner_count", "Threads", "env_var", "profile", "Background", "display_path"]

REPO = Path(__file__).resolve().parent.parent


class Timer:
    """Wall-clock timing of callables; synchronises the CUDA device around each sample when it runs on one."""

    def __init__(self, device: str) -> None:
        import torch

        self._cuda = device.startswith("cuda")
        self._torch = torch

    def sync(self) -> None:
        if self._cuda:
            self._torch.cuda.synchronize()

    def once(self, fn: Callable[[], Any]) -> float:
        """Seconds of one call of ``fn``."""
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
        contexts: dict[str, Callable[[], contextlib.AbstractContextManager]] | None = None,
    ) -> dict[str, Stats]:
        """Seconds per call of each candidate: one sample (the mean of ``inner`` calls) per repeat.

        The order rotates every repeat and reverses every ``len(candidates)`` repeats. ``between`` runs after
        each sample (e.g. ``gc.collect``), outside the timing. ``contexts[name]()`` is a context manager entered
        around that candidate's warm-up and samples, outside the timed loop (e.g. ``torch.set_num_threads``).
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
        return {name: Stats.of(values) for name, values in samples.items()}


def inner_count(seconds_per_call: float, target_seconds: float, cap: int = 200) -> int:
    """How many calls make one sample last about ``target_seconds`` (so that short calls are measurable)."""
    if seconds_per_call <= 0:
        return cap
    return int(max(1, min(cap, round(target_seconds / seconds_per_call))))


@dataclass
class Threads:
    """The run's torch intra-op thread setting: ``requested`` (``--threads``) or torch's own default.

    On a small machine shared with other processes a preempted OpenMP thread stalls every parallel op, so the
    benchmark can pin the count; the scoring servers and probes get the same setting through the environment.
    """

    requested: int | None
    torch_default: int

    @classmethod
    def detect(cls, requested: int | None) -> "Threads":
        import torch

        return cls(requested, torch.get_num_threads())

    def apply(self) -> None:
        """Set the requested count for this process (no-op without ``--threads``)."""
        if self.requested:
            import torch

            torch.set_num_threads(self.requested)

    def subprocess_env(self) -> dict[str, str]:
        """``OMP_NUM_THREADS``/``MKL_NUM_THREADS`` for child processes (empty without ``--threads``)."""
        if not self.requested:
            return {}
        return {"OMP_NUM_THREADS": str(self.requested), "MKL_NUM_THREADS": str(self.requested)}

    @staticmethod
    @contextlib.contextmanager
    def temporarily(count: int) -> Iterator[None]:
        """``torch.set_num_threads(count)`` for the duration, then back to the current count."""
        import torch

        before = torch.get_num_threads()
        torch.set_num_threads(count)
        try:
            yield
        finally:
            torch.set_num_threads(before)


@contextlib.contextmanager
def env_var(name: str, value: str | None) -> Iterator[None]:
    """Set (or, with None, unset) an environment variable for the duration."""
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


_STDLIB = Path(sysconfig.get_paths()["stdlib"]).resolve()


def display_path(filename: str) -> str:
    """A source file's name without machine-specific prefixes: site-packages-, repo- or stdlib-relative."""
    if not filename or filename.startswith("<") or filename == "~":
        return filename
    text = Path(filename).as_posix()
    if "site-packages/" in text:
        return text.split("site-packages/", 1)[1]
    path = Path(filename).resolve()
    for root in (REPO, _STDLIB):
        if path.is_relative_to(root):
            return path.relative_to(root).as_posix()
    return path.name


def profile(fn: Callable[[], Any], *, calls: int = 1, top: int = 12) -> list[ProfileEntry]:
    """cProfile ``calls`` calls of ``fn``; the ``top`` functions by self time, per call of ``fn``."""
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(calls):
        fn()
    profiler.disable()
    stats = pstats.Stats(profiler)
    total = max(stats.total_tt, 1e-12)  # type: ignore[attr-defined]
    rows = sorted(stats.stats.items(), key=lambda item: item[1][2], reverse=True)  # type: ignore[attr-defined]
    entries = []
    for (filename, line, name), (_primitive, ncalls, self_time, cumulative, _callers) in rows[:top]:
        where = f"{display_path(filename)}:{line}({name})" if line else name
        entries.append(ProfileEntry(where, max(1, ncalls // calls) if ncalls >= calls else ncalls,
                                    self_time / calls, cumulative / calls, self_time / total))
    return entries


class Background:
    """Run ``fn`` in a daemon thread now; :meth:`result` joins it and returns (or re-raises) its outcome."""

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
