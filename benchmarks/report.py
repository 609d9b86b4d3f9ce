"""Records -> the markdown report and its JSON twin (``run.py`` writes both with the package's atomic writer).

Rendering is one way: numbers in records become text here and nothing reads text back. A record's shown fields
and their formats come from :func:`benchmarks.records.column` metadata; the summary table is every section's
:class:`~benchmarks.records.Check` rows in section order.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any

from benchmarks.records import Check, Ratio, RecordTable, SectionResult, Stats, Target

__all__ = ["Report", "render", "render_table", "render_cell", "to_json", "fmt_time",
           "fmt_bytes", "fmt_ratio", "fmt_percent", "mark"]

MET, NOT_MET, NA = "met", "NOT met", "n/a"


# ----------------------------------------------------------------------------------------------------------------
# Number formats
# ----------------------------------------------------------------------------------------------------------------
def fmt_time(seconds: float) -> str:
    """3 significant digits in s, ms or µs."""
    if not math.isfinite(seconds):
        return str(seconds)
    magnitude = abs(seconds)
    if magnitude >= 1:
        return f"{seconds:.3g} s" if magnitude < 100 else f"{seconds:.0f} s"
    if magnitude >= 1e-3:
        return f"{seconds * 1e3:.3g} ms"
    return f"{seconds * 1e6:.3g} µs"


def fmt_bytes(count: float) -> str:
    value = float(count)
    for unit in ("B", "KiB", "MiB"):
        if abs(value) < 1024:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.2f} {unit}"
        value /= 1024
    return f"{value:.2f} GiB"


def fmt_ratio(value: float) -> str:
    return f"{value:.3g}x"


def fmt_percent(fraction: float) -> str:
    return f"{100 * fraction:.3g}%"


def mark(met: bool | None) -> str:
    return NA if met is None else (MET if met else NOT_MET)


def fmt_stats(stats: Stats) -> str:
    """Median [interquartile range]."""
    return f"{fmt_time(stats.median)} [{fmt_time(stats.q25)}–{fmt_time(stats.q75)}]"


def fmt_ratio_range(ratio: Ratio) -> str:
    """Median of the per-repeat ratios [their min–max]."""
    return f"{fmt_ratio(ratio.median)} [{ratio.low:.3g}–{ratio.high:.3g}]"


def render_cell(value: Any, fmt: str) -> str:
    """One table cell; ``fmt`` is a :data:`benchmarks.records.FORMATS` name. None renders as an empty cell (as
    "n/a" in a ``met`` column)."""
    if fmt == "met":
        return mark(value)
    if value is None:
        return ""
    if isinstance(value, Stats):
        return fmt_stats(value)
    if isinstance(value, Ratio):
        return fmt_ratio_range(value)
    formats = {
        "code": lambda v: f"`{v}`",
        "time": fmt_time,
        "bytes": fmt_bytes,
        "bytes_exact": lambda v: f"{int(v)} ({fmt_bytes(v)})",
        "ratio": fmt_ratio,
        "percent": fmt_percent,
        "g": lambda v: f"{v:.3g}",
        "target": fmt_target,
        "floats": lambda v: " / ".join(f"{x:.2f}" for x in v),
        "list": lambda v: ", ".join(map(str, v)) or "none",
    }
    return formats[fmt](value) if fmt in formats else str(value)


def fmt_target(target: Target | None) -> str:
    if target is None:
        return "(reported)"
    unit = {"x": "x", "%": "%", "": ""}.get(target.unit, f" {target.unit}")
    scale = 100.0 if target.unit == "%" else 1.0
    low = None if target.low is None else f"{target.low * scale:.3g}{unit}"
    high = None if target.high is None else f"{target.high * scale:.3g}{unit}"
    if low and high:
        text = f"{low}–{high}"
    else:
        text = f">= {low}" if low else (f"{'<' if target.strict_high else '<='} {high}")
    return f"{text}; {target.also}" if target.also else text


def fmt_value(value: float, unit: str) -> str:
    """A check's value in its unit (see :class:`benchmarks.records.Check`)."""
    return {"x": fmt_ratio, "%": fmt_percent, "s": fmt_time, "B": fmt_bytes}.get(unit, lambda v: f"{v:.3g}")(value)


# ----------------------------------------------------------------------------------------------------------------
# Tables and the report
# ----------------------------------------------------------------------------------------------------------------
def _shown_fields(kind: type) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(kind) if "header" in f.metadata]


def _markdown(header: list[str], rows: list[list[str]]) -> str:
    escape = lambda cell: cell.replace("|", "\\|").replace("\n", " ")  # noqa: E731
    lines = ["| " + " | ".join(escape(h) for h in header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(escape(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def render_table(table: RecordTable) -> str:
    """A :class:`RecordTable` as markdown: bold title, the table, the note."""
    fields = _shown_fields(table.kind)
    rows = [[render_cell(getattr(r, f.name), f.metadata["fmt"]) for f in fields] for r in table.records]
    parts = [f"**{table.title}**"] if table.title else []
    parts.append(_markdown([f.metadata["header"] for f in fields], rows))
    if table.note:
        parts.append(table.note)
    return "\n\n".join(parts)


def render_checks(checks: list[Check]) -> str:
    rows = [[c.section, c.what, fmt_value(c.value, c.unit) + (f" ({c.detail})" if c.detail else ""),
             fmt_target(c.target), mark(c.met)] for c in checks]
    return _markdown(["section", "what", "value", "target", "met"], rows)


def render_section(section: SectionResult) -> str:
    parts = [f"## {section.title}"]
    if section.intro:
        parts.append(section.intro)
    parts += [render_table(t) for t in section.tables]
    if section.notes:
        parts.append("\n".join(f"- {n}" for n in section.notes))
    return "\n\n".join(parts)


def render_key_values(record: Any) -> str:
    """A single record (e.g. the machine) as a two-column table of its shown fields."""
    fields = _shown_fields(type(record))
    rows = [[f.metadata["header"], render_cell(getattr(record, f.name), f.metadata["fmt"])] for f in fields]
    return _markdown(["", ""], rows)


@dataclass
class Report:
    """Everything one run produced: the header line, notes on the conditions, the sections, the machine."""

    header: str
    sections: list[SectionResult]
    machine: Any
    notes: list[str] = field(default_factory=list)

    @property
    def checks(self) -> list[Check]:
        return [c for s in self.sections for c in s.checks]


def render(report: Report) -> str:
    parts = ["# ptycho_torch flavor benchmarks", report.header, *report.notes, "## Summary", render_checks(report.checks)]
    parts += [render_section(s) for s in report.sections]
    parts += ["## Machine", render_key_values(report.machine)]
    return "\n\n".join(parts) + "\n"


def _jsonable(value: Any) -> Any:
    if isinstance(value, type):
        return value.__name__
    if dataclasses.is_dataclass(value):
        return {f.name: _jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return value


def to_json(report: Report) -> str:
    """The records as JSON: ``sections[i].tables[j]`` has ``kind`` (the record class name) and ``records``."""
    return json.dumps(_jsonable(report), indent=1, ensure_ascii=False)
