"""Expose the flavor as ``mlflow.ptycho_torch`` without importing MLflow eagerly.

If MLflow is already imported, the alias is set at once. Otherwise a meta-path finder waits for the first
``import mlflow`` and sets the alias right after MLflow's own package finishes executing, so ``import
mlflow_ptycho_flavor; import mlflow; mlflow.ptycho_torch.log_model(...)`` works in either import order, and
processes that never import MLflow (standalone bundle loading) never pay for it.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import threading
from typing import Any

ALIAS = "mlflow.ptycho_torch"
_lock = threading.Lock()


def register() -> None:
    """Bind ``mlflow.ptycho_torch`` to :mod:`mlflow_ptycho_flavor.flavor` (MLflow must be importable)."""
    mlflow = sys.modules.get("mlflow")
    if mlflow is None:
        return
    flavor = importlib.import_module("mlflow_ptycho_flavor.flavor")
    sys.modules.setdefault(ALIAS, flavor)
    if getattr(mlflow, "ptycho_torch", None) is not flavor:
        setattr(mlflow, "ptycho_torch", flavor)


class _LoaderProxy(importlib.abc.Loader):
    """Delegates everything to MLflow's real loader and registers the alias after the package executes."""

    def __init__(self, loader: Any) -> None:
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        self._loader.exec_module(module)
        register()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loader, name)


class _MlflowImportFinder(importlib.abc.MetaPathFinder):
    def __init__(self) -> None:
        self._busy = threading.local()

    def find_spec(self, fullname, path, target=None):
        if fullname != "mlflow" or getattr(self._busy, "active", False):
            return None
        self._busy.active = True
        try:
            spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        finally:
            self._busy.active = False
        if spec is None or spec.loader is None:
            return None
        spec.loader = _LoaderProxy(spec.loader)
        return spec


_finder = _MlflowImportFinder()


def install() -> None:
    """Register now if MLflow is imported, else arm the finder (idempotent)."""
    with _lock:
        if sys.modules.get("mlflow") is not None:
            register()
            return
        if "mlflow" in sys.modules:  # explicitly blocked (sys.modules["mlflow"] = None)
            return
        if _finder not in sys.meta_path:
            sys.meta_path.insert(0, _finder)
