"""One module per report section; each has ``KEY``, ``TITLE`` and ``run(ctx) -> SectionResult``.

:data:`ORDER` is the report's section order; :data:`DEFAULT` the sections a plain ``run.py`` runs (``fast`` and
``spark`` run with ``--fast-paths`` / ``--spark`` or when ``--only`` names them).
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["ORDER", "DEFAULT", "section_module"]

ORDER = ("predict", "load", "serving", "size", "scaling", "architectures", "fast", "spark")
DEFAULT = ("predict", "load", "serving", "size", "scaling", "architectures")

_MODULES = {"predict": "predict", "load": "load", "serving": "serving", "size": "size", "scaling": "scaling",
            "architectures": "architectures",
            "fast": "fast_paths", "spark": "spark"}


def section_module(key: str) -> ModuleType:
    """The module of section ``key`` (imported on first use: ``spark`` needs pyspark only when it runs)."""
    return importlib.import_module(f"benchmarks.sections.{_MODULES[key]}")
