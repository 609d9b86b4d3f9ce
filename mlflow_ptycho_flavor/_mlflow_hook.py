"""Expose the flavor as ``mlflow.ptycho_torch`` without importing MLflow eagerly.

If MLflow is already imported, the alias is set at once. Otherwise a meta-path finder waits for the first
``import mlflow`` and sets the alias right after MLflow's own package finishes executing, so ``import
mlflow_ptycho_flavor; import mlflow; mlflow.ptycho_torch.log_model(...)`` works in either import order, and
processes that never import MLflow (standalone bundle loading) never pay for it.

The hook never makes MLflow's own import fail: where the flavor cannot be imported (``mlflow-skinny`` without
pandas, as in ptychodus' environment) ``mlflow.ptycho_torch`` becomes a placeholder whose every attribute raises
:class:`~mlflow_ptycho_flavor.errors.FlavorUnavailableError` naming the failed import and the fix.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import threading
import types
from typing import Any

from mlflow_ptycho_flavor.errors import FlavorUnavailableError

ALIAS = "mlflow.ptycho_torch"
_lock = threading.Lock()


class UnavailableFlavor(types.ModuleType):
    """What ``mlflow.ptycho_torch`` is when the flavor cannot load: every attribute explains why."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(ALIAS, "placeholder: the ptycho_torch flavor could not be imported")
        missing = _missing_dependencies()
        fix = (
            f"{', '.join(missing)} is not installed (mlflow-skinny alone lacks it): pip install {' '.join(missing)}"
            if missing
            else "reinstall the full package: pip install mlflow"
        )
        self.__dict__["_message"] = (
            f"mlflow.ptycho_torch is unavailable: importing mlflow_ptycho_flavor.flavor failed with "
            f"{type(cause).__name__}: {str(cause)[:200]}. {fix}. MLflow itself and the standalone loader "
            "(mlflow_ptycho_flavor.load_torch_bundle) keep working."
        )

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        raise FlavorUnavailableError(self.__dict__["_message"])


#: What the flavor needs beyond ``mlflow-skinny`` (``mlflow.models`` defines ``ModelInputExample`` only with pandas).
_FLAVOR_DEPENDENCIES = ("pandas",)


def _missing_dependencies() -> list[str]:
    missing = []
    for name in _FLAVOR_DEPENDENCIES:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            missing.append(name)
    return missing


def register() -> None:
    """Bind ``mlflow.ptycho_torch`` to :mod:`mlflow_ptycho_flavor.flavor`, or to an :class:`UnavailableFlavor`
    placeholder when the flavor cannot be imported. Never raises: it runs inside MLflow's own import."""
    mlflow = sys.modules.get("mlflow")
    if mlflow is None:
        return
    try:
        flavor = importlib.import_module("mlflow_ptycho_flavor.flavor")
    except Exception as exc:  # noqa: BLE001 - whatever broke, MLflow's import must not
        if not isinstance(getattr(mlflow, "ptycho_torch", None), types.ModuleType):
            setattr(mlflow, "ptycho_torch", UnavailableFlavor(exc))
        return
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
