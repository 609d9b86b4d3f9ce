"""The benchmark's result types: plain dataclasses that hold numbers, never rendered text.

Every section returns a :class:`SectionResult`: tables of records (one dataclass per kind of row) and the
:class:`Check` rows (a measured value against its target) that make up the report's summary. A record field shown
in the markdown report carries its column header and its number format in the field's metadata
(:func:`column`); :mod:`benchmarks.report` renders records from that, and ``dataclasses.asdict`` gives the JSON
form that ``run.py --records`` writes and ``tests/test_benchmarks.py`` reads.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

__all__ = ["column", "Stats", "Ratio", "Target", "Check", "ProfileEntry", "RecordTable", "SectionResult"]

#: Number formats a :func:`column` may name (see :func:`benchmarks.report.render_cell`).
FORMATS = ("text", "code", "time", "bytes", "bytes_exact", "ratio", "percent", "g", "met", "target", "floats",
           "list")


def column(header: str, fmt: str = "text") -> Any:
    """A dataclass field shown in the report as column ``header``, its value rendered as ``fmt``.

    ``fmt`` is one of :data:`FORMATS`; :class:`Stats` and :class:`Ratio` values render themselves whatever it is.
    Fields declared without ``column`` are kept in the records (and the JSON) but not shown.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown column format {fmt!r}; use one of {FORMATS}")
    return field(metadata={"header": header, "fmt": fmt})


def _as_samples(values: Sequence[float]) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.size == 0:
        raise ValueError("no samples to summarise")
    return array


@dataclass(frozen=True)
class Stats:
    """Repeated measurements of one candidate (seconds per call): median and interquartile range.

    The quartiles come from ``numpy.percentile`` (linear interpolation); ``samples`` keeps the per-repeat values
    in the order they were taken, so that two candidates timed in the same repeats can be paired (:class:`Ratio`).
    """

    samples: tuple[float, ...]
    median: float
    q25: float
    q75: float

    @classmethod
    def of(cls, samples: Sequence[float]) -> "Stats":
        array = _as_samples(samples)
        q25, median, q75 = np.percentile(array, [25, 50, 75])
        return cls(tuple(float(v) for v in array), float(median), float(q25), float(q75))


@dataclass(frozen=True)
class Ratio:
    """The median of per-repeat ratios with their min-max, e.g. ``time(raw) / time(pyfunc)`` repeat by repeat.

    Pairing the repeats cancels most machine noise: both candidates of a repeat ran back to back.
    """

    median: float
    low: float
    high: float

    @classmethod
    def of(cls, values: Sequence[float]) -> "Ratio":
        array = _as_samples(values)
        return cls(float(np.median(array)), float(array.min()), float(array.max()))

    @classmethod
    def paired(cls, numerator: Stats, denominator: Stats) -> "Ratio":
        """``numerator / denominator`` repeat by repeat (both timed in the same interleaved repeats)."""
        if len(numerator.samples) != len(denominator.samples):
            raise ValueError("paired ratios need candidates timed in the same repeats")
        return cls.of([a / b for a, b in zip(numerator.samples, denominator.samples) if b > 0])


@dataclass(frozen=True)
class Target:
    """A bound on a measured value: ``low <= value``, ``value <= high`` (``value < high`` when ``strict_high``).

    ``also`` names a further condition that the section checks itself (e.g. "outputs within 1e-4 of eager").
    """

    low: float | None = None
    high: float | None = None
    strict_high: bool = False
    unit: str = "x"
    also: str = ""

    def holds(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        if self.low is not None and value < self.low:
            return False
        if self.high is not None and (value >= self.high if self.strict_high else value > self.high):
            return False
        return True


@dataclass(frozen=True)
class Check:
    """One summary row: ``what`` measured ``value`` (in ``unit``) against ``target``; ``met`` is None without one.

    ``unit`` is ``"x"`` (a ratio), ``"%"`` (a fraction shown as a percentage), ``"s"`` (seconds), ``"B"`` (bytes)
    or ``""`` (a plain number). ``detail`` is context computed with the value (spreads, counts), shown after it.
    """

    section: str
    what: str
    value: float
    unit: str
    target: Target | None
    met: bool | None
    detail: str = ""

    @classmethod
    def of(cls, section: str, what: str, value: float, target: Target | None, *, unit: str = "x",
           detail: str = "", condition: bool = True) -> "Check":
        """A check whose ``met`` is ``target.holds(value) and condition`` (``condition``: ``target.also``)."""
        met = None if target is None else (target.holds(value) and condition)
        return cls(section, what, float(value), unit, target, met, detail)


@dataclass(frozen=True)
class ProfileEntry:
    """One function of a cProfile run, per operation profiled (sorted by self time in the tables)."""

    function: str = column("function", "code")
    calls: int = column("calls/op")
    self_seconds: float = column("self time/op", "time")
    cumulative_seconds: float = column("cumulative/op", "time")
    share: float = column("share of self time", "percent")


@dataclass
class RecordTable:
    """Records of one kind (``kind``, a dataclass) shown as one table, with an optional title and note."""

    kind: type
    records: list[Any]
    title: str = ""
    note: str = ""

    def __post_init__(self) -> None:
        strays = [type(r).__name__ for r in self.records if not isinstance(r, self.kind)]
        if strays:
            raise TypeError(f"a {self.kind.__name__} table got {strays}")


@dataclass
class SectionResult:
    """What a section returns: its tables, its summary checks and notes, all computed from measured numbers."""

    key: str
    title: str
    intro: str = ""
    tables: list[RecordTable] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
