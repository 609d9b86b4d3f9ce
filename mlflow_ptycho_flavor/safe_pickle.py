"""A restricted unpickler for the ``.dill`` members of a bundle.

Upstream writes ``manifest.dill`` and ``params.dill`` with ``dill.dump``. For PyTorch bundles they hold plain
data only, so they are read here with an unpickler that resolves no global except a short allow-list of data
constructors (sets, complex numbers, numpy scalars and arrays, ``OrderedDict``). A pickle that names anything
else - ``os.system``, ``builtins.eval``, a class with ``__reduce__`` - raises :class:`UnsafeBundleError`
naming the offending global *before* that global is imported or called.

Opting out (``allow_unsafe=True`` or MLflow's ``MLFLOW_ALLOW_PICKLE_DESERIALIZATION=true``) falls back to
``dill``/``pickle`` and therefore runs whatever code the file carries: only for files you trust.
"""

from __future__ import annotations

import io
import os
import pickle
from typing import Any

from .errors import CorruptBundleError, UnsafeBundleError

__all__ = ["safe_loads", "unsafe_loading_allowed", "ALLOW_PICKLE_ENV"]

ALLOW_PICKLE_ENV = "MLFLOW_ALLOW_PICKLE_DESERIALIZATION"


def _np_core_reconstruct() -> Any:
    try:
        from numpy._core.multiarray import _reconstruct  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core.multiarray import _reconstruct
    return _reconstruct


def _numpy_scalar(*args: Any) -> Any:
    try:
        from numpy._core.multiarray import scalar
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core.multiarray import scalar
    return scalar(*args)


def _numpy_class(name: str) -> Any:
    import numpy as np

    return getattr(np, name)


def _dill_create_array(f: Any, args: Any, state: Any, npdict: Any = None) -> Any:
    """Safe stand-in for ``dill._dill._create_array``: only numpy's own reconstructor, no instance dict."""
    if f is not _np_core_reconstruct():
        raise UnsafeBundleError("dill array record names a constructor other than numpy's _reconstruct")
    if npdict:
        raise UnsafeBundleError("dill array record carries an instance __dict__ (ndarray subclass); refused")
    array = f(*args)
    array.__setstate__(state)
    return array


_ALLOWED_CALLABLES: dict[tuple[str, str], Any] = {}


def _allowed_globals() -> dict[tuple[str, str], Any]:
    if _ALLOWED_CALLABLES:
        return _ALLOWED_CALLABLES
    import collections

    reconstruct = _np_core_reconstruct()
    table: dict[tuple[str, str], Any] = {
        ("builtins", "set"): set,
        ("builtins", "frozenset"): frozenset,
        ("builtins", "complex"): complex,
        ("builtins", "bytearray"): bytearray,
        ("builtins", "slice"): slice,
        ("builtins", "range"): range,
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("numpy", "dtype"): _numpy_class("dtype"),
        ("numpy", "ndarray"): _numpy_class("ndarray"),
        ("numpy._core.multiarray", "_reconstruct"): reconstruct,
        ("numpy.core.multiarray", "_reconstruct"): reconstruct,
        ("numpy._core.multiarray", "scalar"): _numpy_scalar,
        ("numpy.core.multiarray", "scalar"): _numpy_scalar,
        ("dill._dill", "_create_array"): _dill_create_array,
    }
    _ALLOWED_CALLABLES.update(table)
    return _ALLOWED_CALLABLES


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file: io.BytesIO, member: str) -> None:
        super().__init__(file)
        self._member = member

    def find_class(self, module: str, name: str) -> Any:
        allowed = _allowed_globals().get((module, name))
        if allowed is None:
            raise UnsafeBundleError(
                f"{self._member} references the global {module}.{name}, which the safe loader refuses "
                "(only plain data is allowed: dict, list, tuple, set, str, bytes, numbers, bool, None, numpy "
                "scalars and arrays). If you trust this file, load with allow_unsafe=True or set "
                f"{ALLOW_PICKLE_ENV}=true"
            )
        return allowed

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafeBundleError(f"{self._member} uses persistent ids ({pid!r}), which plain data never needs")


def unsafe_loading_allowed(allow_unsafe: bool | None = None) -> bool:
    """Whether full (code-running) unpickling was opted into, by argument or by MLflow's environment variable."""
    if allow_unsafe is not None:
        return bool(allow_unsafe)
    return os.environ.get(ALLOW_PICKLE_ENV, "").strip().lower() in ("1", "true", "yes")


def safe_loads(data: bytes, *, member: str, allow_unsafe: bool | None = None) -> Any:
    """Decode a pickle/dill member holding plain data.

    Args:
        data: the member's bytes.
        member: the member name, used in error messages.
        allow_unsafe: ``True`` unpickles with dill (runs code from the file!); ``None`` consults
            ``MLFLOW_ALLOW_PICKLE_DESERIALIZATION``.

    Raises:
        UnsafeBundleError: the pickle references a global outside the allow-list.
        CorruptBundleError: the bytes are not a valid pickle.
    """
    if unsafe_loading_allowed(allow_unsafe):
        try:
            import dill

            return dill.loads(data)
        except ImportError:
            return pickle.loads(data)  # noqa: S301 - explicit opt-in
    try:
        return _RestrictedUnpickler(io.BytesIO(data), member).load()
    except UnsafeBundleError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError,
            KeyError, OverflowError, MemoryError, RecursionError, UnicodeDecodeError) as exc:
        raise CorruptBundleError(f"{member} is not a valid pickle of plain data: {exc}") from exc
