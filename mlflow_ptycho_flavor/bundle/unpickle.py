"""Decoding untrusted pickles: a restricted unpickler for ``.dill`` members, and a scan of torch members.

Upstream writes ``manifest.dill`` and ``params.dill`` with ``dill.dump``. For PyTorch bundles they hold plain
data only, so they are read here with an unpickler that resolves no global except a short allow-list of data
constructors (sets, complex numbers, numpy scalars and numeric arrays, ``OrderedDict``). A pickle that names
anything else - ``os.system``, ``builtins.eval``, a class with ``__reduce__`` - raises
:class:`UnsafeBundleError` naming the offending global *before* that global is imported or called.

Nothing numpy-specific is ever handed to numpy's own pickle hooks: ``numpy.dtype``, ``_reconstruct`` and the
array ``BUILD`` state resolve to inert records here, and arrays/scalars are rebuilt with ``numpy.frombuffer`` from
validated numeric dtypes only (numpy's ``ndarray.__setstate__`` crashes the interpreter on some crafted
dtypes). The allowed constructors are wrapped so that a few bytes cannot ask for gigabytes
(``bytearray(10**10)``, ``set(range(10**9))``). Before any unpickler runs, the opcodes are followed on an abstract
stack (:func:`~.budget.scan_pickle_structure`: tuple keys nested or shared so that hashing them would crash or
never finish); afterwards the decoded value is walked once (:func:`~.budget.check_plain_data`): nesting deeper
than :data:`MAX_DEPTH`, cycles, containers carrying instance attributes, or an expanded size far beyond the
file's ("billion laughs", which would make ``repr`` or ``==`` explode later) are refused. Any other failure while
decoding is a :class:`CorruptBundleError`.

Opting out (``allow_unsafe=True`` or MLflow's ``MLFLOW_ALLOW_PICKLE_DESERIALIZATION=true``) falls back to
``dill``/``pickle`` and therefore runs whatever code the file carries: only for files you trust.

Torch members (``model.pth``, ``torch_scaling_metadata.pt``) are decoded by :func:`torch_load` after it has
checked the nested torch zip's real record sizes and that their pickle names only the globals a state_dict or a
metadata dict needs (torch's own allow-list is wider and includes allocation bombs): the C unpickler resolving
that allow-list, with the storages read in place from the archive.
"""

from __future__ import annotations

import _compat_pickle
import collections
import functools
import io
import math
import os
import pickle
import re
import sys
import types
import warnings
from typing import Any

import torch

from mlflow_ptycho_flavor.bundle.archive import MemberView, RecordSpan, check_nested_zip
from mlflow_ptycho_flavor.bundle.budget import MAX_DEPTH, check_plain_data, scan_pickle_structure
from mlflow_ptycho_flavor.errors import CorruptBundleError, UnsafeBundleError, short_error, short_message, short_repr

__all__ = [
    "check_plain_data",  # lives in .budget; re-exported for the readers that decode with this module
    "safe_loads",
    "unsafe_loading_allowed",
    "torch_load",
    "MAX_TORCH_RECORDS",
    "ALLOW_PICKLE_ENV",
    "MAX_DEPTH",
    "MAX_RANGE_LENGTH",
    "StorageMarker",
    "STORAGE_MARKERS",
]

ALLOW_PICKLE_ENV = "MLFLOW_ALLOW_PICKLE_DESERIALIZATION"

#: Largest ``range`` a pickle may construct (a range is lazy, but whatever consumes it is not).
MAX_RANGE_LENGTH = 1 << 16

_NUMERIC_DTYPE = re.compile(r"^[biufc][0-9]{1,2}$")  # 'f8', 'i4', 'b1', 'c16' - what numpy's dtype reduce names
_BYTE_ORDERS = ("<", ">", "|", "=")


def _refuse_amplification(what: str) -> UnsafeBundleError:
    return UnsafeBundleError(
        f"the pickle asks for {what}, which plain data never needs and which would let a few bytes allocate "
        "gigabytes; refused"
    )


# ----------------------------------------------------------------------------------------------------------------
# numpy: inert records, rebuilt with numpy.frombuffer from validated numeric dtypes
# ----------------------------------------------------------------------------------------------------------------
class _DtypeRecord:
    """What ``numpy.dtype(...)`` resolves to while unpickling: the arguments and BUILD state, nothing built yet."""

    def __init__(self, *args: Any) -> None:
        self.args = args
        self.state: Any = None

    def __setstate__(self, state: Any) -> None:  # the pickle's BUILD opcode lands here, not in numpy
        self.state = state

    def to_dtype(self) -> Any:
        import numpy as np

        code = self.args[0] if self.args else None
        if not isinstance(code, str) or not _NUMERIC_DTYPE.match(code):
            raise UnsafeBundleError(
                f"the pickle describes the numpy dtype {short_repr(code)}; only plain numeric dtypes (bool, int, "
                "uint, float, complex) are accepted"
            )
        try:
            dtype = np.dtype(code)
        except TypeError as exc:
            raise CorruptBundleError(f"invalid numpy dtype {short_repr(code)} in the pickle") from exc
        state = self.state
        if state is not None:
            if (
                not isinstance(state, tuple)
                or len(state) < 5
                or state[1] not in _BYTE_ORDERS
                or any(part is not None for part in state[2:5])
            ):
                raise UnsafeBundleError(
                    "the pickle gives a numpy dtype a sub-array, field or unusual state; only plain numeric dtypes "
                    "are accepted"
                )
            if state[1] in ("<", ">") and dtype.itemsize > 1:
                dtype = dtype.newbyteorder(state[1])
        return dtype

    def __repr__(self) -> str:
        return f"numpy.dtype{short_repr(self.args)}"


def _array_from_bytes(raw: Any, dtype_record: Any, shape: Any, fortran: bool) -> Any:
    import numpy as np

    if not isinstance(dtype_record, _DtypeRecord):
        raise UnsafeBundleError("a numpy array record names something other than a dtype; refused")
    dtype = dtype_record.to_dtype()
    if isinstance(raw, (bytes, bytearray)):
        data = bytes(raw)
    elif isinstance(raw, pickle.PickleBuffer):
        data = bytes(raw.raw())
    else:
        raise UnsafeBundleError(
            f"a numpy array record carries {type(raw).__name__} instead of raw bytes; only numeric arrays are accepted"
        )
    valid_dims = all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape) if isinstance(
        shape, tuple) else False
    if not valid_dims:
        raise CorruptBundleError(f"a numpy array record has the invalid shape {short_repr(shape)}")
    count = math.prod(shape)
    if count * dtype.itemsize != len(data):
        raise CorruptBundleError(
            f"a numpy array record of shape {short_repr(shape)} and dtype {dtype} needs {count * dtype.itemsize} "
            f"bytes, holds {len(data)}"
        )
    return np.frombuffer(data, dtype=dtype).reshape(shape, order="F" if fortran else "C").copy(order="K")


class _ArrayRecord:
    """What ``numpy._reconstruct(ndarray, (0,), b'b')`` resolves to; its BUILD state holds dtype, shape and bytes."""

    def __init__(self) -> None:
        self.array: Any = None

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, tuple) or len(state) != 5 or state[0] != 1:
            raise CorruptBundleError("a numpy array record has an unknown state layout")
        _, shape, dtype_record, fortran, raw = state
        self.array = _array_from_bytes(raw, dtype_record, shape, bool(fortran))

    @property
    def nbytes(self) -> int:
        """The rebuilt array's size: what the structure walk charges for every reference to this record."""
        return 0 if self.array is None else int(self.array.nbytes)

    def result(self) -> Any:
        if self.array is None:
            raise CorruptBundleError("a numpy array record was never filled (no BUILD state)")
        return self.array


class _NdarrayClassRef:
    """What ``numpy.ndarray`` resolves to: pickles only pass the class to ``_reconstruct``; calling it is refused.

    Handing out the real class would let a pickle call ``ndarray((10**9,), object)`` and fill gigabytes.
    """

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise _refuse_amplification("numpy.ndarray(...) to be called directly")

    def __repr__(self) -> str:
        return "numpy.ndarray"


_NDARRAY_REF = _NdarrayClassRef()


def _safe_reconstruct(subtype: Any, shape: Any, dtype: Any) -> _ArrayRecord:
    """``numpy._reconstruct`` as ``ndarray.__reduce__`` uses it: always an empty placeholder, filled by BUILD."""
    if subtype is not _NDARRAY_REF or not isinstance(shape, tuple) or shape != (0,):
        raise _refuse_amplification(f"numpy _reconstruct({short_repr(subtype)}, {short_repr(shape)})")
    return _ArrayRecord()


def _safe_frombuffer(buf: Any, dtype: Any, shape: Any, order: Any) -> Any:
    """``numpy._frombuffer`` (how protocol-5 pickles carry arrays): bytes the pickle itself holds."""
    return _array_from_bytes(buf, dtype, shape, order == "F")


def _safe_scalar(dtype: Any, data: Any = None) -> Any:
    """``numpy...multiarray.scalar(dtype, bytes)``: one numeric value."""
    import numpy as np

    if not isinstance(dtype, _DtypeRecord):
        raise UnsafeBundleError("a numpy scalar record names something other than a dtype; refused")
    real = dtype.to_dtype()
    if not isinstance(data, (bytes, bytearray)) or len(data) != real.itemsize:
        raise CorruptBundleError(f"a numpy {real} scalar record does not hold {real.itemsize} raw bytes")
    return np.frombuffer(bytes(data), dtype=real)[0]


def _dill_create_array(f: Any, args: Any, state: Any, npdict: Any = None) -> Any:
    """Safe stand-in for ``dill._dill._create_array``: only numpy's own reconstructor, no instance dict."""
    if f is not _safe_reconstruct:
        raise UnsafeBundleError("dill array record names a constructor other than numpy's _reconstruct")
    if npdict:
        raise UnsafeBundleError("dill array record carries an instance __dict__ (ndarray subclass); refused")
    record = f(*args)
    record.__setstate__(state)
    return record.result()


# ----------------------------------------------------------------------------------------------------------------
# builtins that cannot be turned into allocation bombs
# ----------------------------------------------------------------------------------------------------------------
def _materialized(value: Any, what: str) -> Any:
    # Containers decoded from the pickle are bounded by its size; lazy iterables (range) are not.
    if not isinstance(value, (list, tuple, set, frozenset, dict, str, bytes, bytearray)):
        raise _refuse_amplification(f"{what} of a {type(value).__name__}")
    return value


def _safe_set(*args: Any) -> set:
    return set(*(_materialized(a, "set()") for a in args))


def _safe_frozenset(*args: Any) -> frozenset:
    return frozenset(*(_materialized(a, "frozenset()") for a in args))


def _safe_bytearray(*args: Any) -> bytearray:
    if args and not isinstance(args[0], (bytes, bytearray, str, list, tuple)):
        raise _refuse_amplification(f"bytearray({type(args[0]).__name__})")
    return bytearray(*args)


def _safe_range(*args: Any) -> range:
    value = range(*args)
    if len(value) > MAX_RANGE_LENGTH:
        raise _refuse_amplification(f"a range of {len(value)} items")
    return value


def _safe_ordered_dict(*args: Any) -> collections.OrderedDict:
    return collections.OrderedDict(*(_materialized(a, "OrderedDict()") for a in args))


def _tf_tensor_to_numpy(*args: Any, **kwargs: Any) -> Any:
    """Stand-in for ``tensorflow.python.framework.ops.convert_to_tensor``: the numeric array it was given.

    TensorFlow training runs leave the probe in ``params.dill`` as an ``EagerTensor``, which dill pickles as
    ``convert_to_tensor(<numpy array>)`` (docs/bundle-format.md §9.2). Only that form is accepted: one positional
    numpy array (already rebuilt from validated numeric bytes), no dtype or other arguments. Nothing from
    TensorFlow is imported or run.
    """
    import numpy as np

    if kwargs or len(args) != 1:
        raise UnsafeBundleError(
            f"the pickle calls tensorflow convert_to_tensor with {len(args)} argument(s) and keywords "
            f"{short_repr(sorted(map(str, kwargs))[:5])}; only convert_to_tensor(<numeric array>) is accepted"
        )
    (value,) = args
    if isinstance(value, _ArrayRecord):
        value = value.result()
    if not isinstance(value, np.ndarray):
        raise UnsafeBundleError(
            f"the pickle calls tensorflow convert_to_tensor on a {type(value).__name__}; only a numeric numpy "
            "array (how dill stores an EagerTensor) is accepted"
        )
    return value


#: The one TensorFlow global :func:`safe_loads` resolves when ``allow_tensorflow_tensors=True``.
_TENSORFLOW_CALLABLES: dict[tuple[str, str], Any] = {
    ("tensorflow.python.framework.ops", "convert_to_tensor"): _tf_tensor_to_numpy,
}


_ALLOWED_CALLABLES: dict[tuple[str, str], Any] = {
    ("builtins", "set"): _safe_set,
    ("builtins", "frozenset"): _safe_frozenset,
    ("builtins", "complex"): complex,
    ("builtins", "bytearray"): _safe_bytearray,
    ("builtins", "slice"): slice,
    ("builtins", "range"): _safe_range,
    ("collections", "OrderedDict"): _safe_ordered_dict,
    ("numpy", "dtype"): _DtypeRecord,
    ("numpy", "ndarray"): _NDARRAY_REF,
    ("numpy._core.multiarray", "_reconstruct"): _safe_reconstruct,
    ("numpy.core.multiarray", "_reconstruct"): _safe_reconstruct,
    ("numpy._core.multiarray", "scalar"): _safe_scalar,
    ("numpy.core.multiarray", "scalar"): _safe_scalar,
    ("numpy._core.numeric", "_frombuffer"): _safe_frombuffer,
    ("numpy.core.numeric", "_frombuffer"): _safe_frombuffer,
    ("dill._dill", "_create_array"): _dill_create_array,
}


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file: io.BytesIO, member: str, *, tensorflow_tensors: bool = False) -> None:
        super().__init__(file)
        self._member = member
        self._tensorflow_tensors = tensorflow_tensors

    def find_class(self, module: str, name: str) -> Any:
        allowed = _ALLOWED_CALLABLES.get((module, name))
        if allowed is None and self._tensorflow_tensors:
            allowed = _TENSORFLOW_CALLABLES.get((module, name))
            if allowed is None:  # no allow_unsafe escape hatch is offered in this mode
                raise UnsafeBundleError(
                    f"{self._member} references the global {str(module)[:100]}.{str(name)[:100]}, "
                    "which the safe loader refuses: only plain data, numpy numeric arrays and "
                    "tensorflow.python.framework.ops.convert_to_tensor of a numeric array (a pickled EagerTensor) "
                    "are accepted. Nothing was imported or called"
                )
        if allowed is None:
            raise UnsafeBundleError(
                f"{self._member} references the global {str(module)[:100]}.{str(name)[:100]}, which the safe loader "
                "refuses (only plain data is allowed: dict, list, tuple, set, str, bytes, numbers, bool, None, numpy "
                "scalars and numeric arrays). If you trust this file, load with allow_unsafe=True or set "
                f"{ALLOW_PICKLE_ENV}=true"
            )
        return allowed

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafeBundleError(f"{self._member} uses persistent ids ({short_repr(pid)}), which plain data never needs")


def unsafe_loading_allowed(allow_unsafe: bool | None = None) -> bool:
    """Whether full (code-running) unpickling was opted into, by argument or by MLflow's environment variable."""
    if allow_unsafe is not None:
        return bool(allow_unsafe)
    return os.environ.get(ALLOW_PICKLE_ENV, "").strip().lower() in ("1", "true", "yes")


def _resolve_records(value: Any, member: str) -> Any:
    """Replace the inert numpy records left in the decoded tree by real arrays and dtypes (tree already checked)."""
    memo: dict[int, Any] = {}

    def resolve(item: Any) -> Any:
        key = id(item)
        if key in memo:
            return memo[key]
        if isinstance(item, _ArrayRecord):
            result = item.result()
        elif isinstance(item, _DtypeRecord):
            result = item.to_dtype()
        elif isinstance(item, _NdarrayClassRef):
            raise UnsafeBundleError(f"{member} holds the numpy.ndarray class itself; refused")
        elif isinstance(item, dict):
            memo[key] = item
            for k in list(item):
                if isinstance(k, (_ArrayRecord, _DtypeRecord, _NdarrayClassRef)):
                    raise CorruptBundleError(f"{member} uses a numpy object as a dict key")
                item[k] = resolve(item[k])
            return item
        elif isinstance(item, list):
            memo[key] = item
            item[:] = [resolve(child) for child in item]
            return item
        elif isinstance(item, tuple):
            children = [resolve(child) for child in item]
            result = item if all(a is b for a, b in zip(children, item)) else tuple(children)
        elif isinstance(item, (set, frozenset)):
            if any(isinstance(c, (_ArrayRecord, _DtypeRecord, _NdarrayClassRef)) for c in item):
                raise CorruptBundleError(f"{member} puts a numpy object in a set")
            result = item
        else:
            result = item
        memo[key] = result
        return result

    return resolve(value)


def safe_loads(
    data: bytes, *, member: str, allow_unsafe: bool | None = None, allow_tensorflow_tensors: bool = False
) -> Any:
    """Decode a pickle/dill member holding plain data.

    Args:
        data: the member's bytes.
        member: the member name, used in error messages.
        allow_unsafe: ``True`` unpickles with dill (runs code from the file!); ``None`` consults
            ``MLFLOW_ALLOW_PICKLE_DESERIALIZATION``.
        allow_tensorflow_tensors: also accept ``tensorflow.python.framework.ops.convert_to_tensor(<numeric
            array>)`` - how a TensorFlow ``params.dill`` stores its probe - decoding it to the numpy array; every
            other TensorFlow global stays refused. Only the TensorFlow archive reader sets it.

    Raises:
        UnsafeBundleError: the pickle references a global outside the allow-list, or asks for a structure that
            would exhaust memory (see :func:`check_plain_data`).
        CorruptBundleError: the bytes are not a valid pickle (any other failure while decoding).
    """
    if unsafe_loading_allowed(allow_unsafe):
        try:
            try:
                import dill
            except ImportError:  # pragma: no cover - dill is a dependency
                return pickle.loads(data)  # noqa: S301 - explicit opt-in
            return dill.loads(data)
        except Exception as exc:  # explicit opt-in: the file's own code may raise anything
            raise CorruptBundleError(
                f"{member} could not be unpickled even with unsafe loading allowed: {short_error(exc)}"
            ) from exc
    try:
        # An abstract run first (nothing built): refuses what would hang or crash the C unpickler itself - tuple
        # keys nested too deep or shared too often to hash, counted arguments (BINBYTES8, ...) whose declared
        # size the C unpickler would allocate before finding the data is not there.
        scan_pickle_structure(data, member)
        value = _RestrictedUnpickler(
            io.BytesIO(data), member, tensorflow_tensors=allow_tensorflow_tensors
        ).load()
        check_plain_data(value, member=member, size=len(data))
        return _resolve_records(value, member)
    except (UnsafeBundleError, CorruptBundleError) as exc:
        if str(exc).startswith(member):
            raise
        raise type(exc)(f"{member}: {exc}") from exc  # name the member in errors raised by the wrapped constructors
    except Exception as exc:  # noqa: BLE001 - nothing but the wrapped constructors ran: any failure is bad data
        raise CorruptBundleError(
            f"{member} is not a valid pickle of plain data: {short_error(exc)}"
        ) from exc


# --------------------------------------------------------------------------------------------------------------
# torch members (.pth / .pt): a scan of the pickle before torch.load(weights_only=True) runs
# --------------------------------------------------------------------------------------------------------------

#: Globals a torch-saved state_dict or metadata dict needs; checked in the member's pickle before torch.load runs.
#: torch's own weights_only list is wider and includes allocation bombs (``bytearray(10**10)``, nested
#: ``_codecs.encode(..., 'hex')``, ``torch.Tensor(10**6, 10**6)``) and whatever other code in the process added
#: with ``torch.serialization.add_safe_globals``.
_TORCH_ALLOWED_GLOBALS = frozenset(
    {
        "collections.OrderedDict",
        "torch._utils._rebuild_tensor_v2",
        "torch._utils._rebuild_parameter",
        "torch._utils._rebuild_parameter_with_state",
        "builtins.set",
        "builtins.complex",
        "torch.Size",
        "torch.device",
    }
)


def _torch_global_allowed(module: str, name: str) -> bool:
    if f"{module}.{name}" in _TORCH_ALLOWED_GLOBALS:
        return True
    if module != "torch":
        return False
    value = vars(torch).get(name)  # not getattr: torch's module __getattr__ imports submodules lazily
    if isinstance(value, torch.dtype):
        return True
    # FloatStorage, LongStorage, ...: markers torch maps to a dtype, never called with data
    return name.endswith("Storage") and name not in ("UntypedStorage", "TypedStorage") and isinstance(value, type)


def _torch_file(data: bytes | MemberView) -> Any:
    """A fresh file object over a torch member given as bytes or as a :class:`~.archive.MemberView`."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        return io.BytesIO(data)
    data.seek(0)
    return data


def _torch_pickle_record(data: bytes | MemberView, member: str) -> bytes:
    """The ``data.pkl`` record of a torch zip file, read through torch's own zip reader (the bytes torch.load would
    unpickle); a TorchScript archive, which ``torch.load`` hands to ``torch.jit.load`` (code), is refused."""
    try:
        reader = torch._C.PyTorchFileReader(_torch_file(data))
        records = reader.get_all_records()
        scripted = [name for name in records if name == "constants.pkl" or name.startswith("code/")]
        if scripted:
            raise UnsafeBundleError(
                f"{member} is a TorchScript archive (records {short_repr(scripted[:3])}), which carries code; a "
                "bundle's torch members hold a state_dict or a metadata dict only"
            )
        return reader.get_record("data.pkl")
    except UnsafeBundleError:
        raise
    except Exception as exc:  # noqa: BLE001 - torch's zip reader on untrusted bytes
        raise CorruptBundleError(f"{member} is not a valid torch file: {short_error(exc)}") from exc


def _scan_torch_pickle(pickled: bytes, member: str) -> None:
    """Refuse a torch file whose ``data.pkl`` names a global outside :data:`_TORCH_ALLOWED_GLOBALS`, uses an opcode
    that fetches code some other way, or has a structure that would hang or crash the unpickler
    (:func:`~.budget.scan_pickle_structure`). One walk over the opcodes; nothing is called.
    """
    try:
        scan_pickle_structure(pickled, f"{member} (data.pkl)", screen=functools.partial(_screen_torch_reference, member))
    except CorruptBundleError as exc:
        raise CorruptBundleError(f"{member} holds a malformed pickle: {short_message(exc)}") from exc


def _screen_torch_reference(member: str, opcode: str, arg: Any) -> None:
    """The global check of :func:`_scan_torch_pickle`, shown each opcode that names code during the structure scan."""
    if opcode != "GLOBAL":
        raise UnsafeBundleError(f"{member} uses the pickle opcode {opcode}, which torch.save never writes")
    module, _, name = str(arg).partition(" ")
    # torch.save writes protocol 2 with Python-2 names (__builtin__.set); torch maps them back like this
    if (module, name) in _compat_pickle.NAME_MAPPING:
        module, name = _compat_pickle.NAME_MAPPING[(module, name)]
    elif module in _compat_pickle.IMPORT_MAPPING:
        module = _compat_pickle.IMPORT_MAPPING[module]
    if not _torch_global_allowed(module, name):
        _refuse_torch_global(member, f"{module[:100]}.{name[:100]}")


def _torch_default_allows(full_name: str) -> bool:
    try:
        from torch._weights_only_unpickler import _get_allowed_globals

        return full_name in _get_allowed_globals()
    except Exception:  # noqa: BLE001 - private torch API; only used to word the message
        return False


def _refuse_torch_global(member: str, full_name: str) -> None:
    if _torch_default_allows(full_name):
        raise UnsafeBundleError(
            f"{member} references the global {full_name}, which torch.load(weights_only=True) would call but a "
            "state_dict or metadata dict never needs (a few bytes can make it allocate gigabytes); refused before "
            "loading"
        )
    raise UnsafeBundleError(
        f"{member} needs arbitrary Python objects to unpickle (the global {full_name}) and was refused by "
        "torch.load(weights_only=True) rules, checked before loading: nothing was imported or called"
    )


#: Most records a torch file may list (a state_dict has one per tensor plus six; the largest CNN has ~300 tensors).
MAX_TORCH_RECORDS = 4096


class _AllowListUnpickler(pickle.Unpickler):
    """The C unpickler resolving only :data:`_TORCH_ALLOWED_GLOBALS` (what torch.load runs for a scanned member).

    The scan refused any other global before this runs; resolving the same list again here means no global outside
    it can be reached even through an opcode the scan did not expect.
    """

    member = "a torch member"

    def find_class(self, module: str, name: str) -> Any:
        mapped_module, mapped_name = module, name
        if (module, name) in _compat_pickle.NAME_MAPPING:
            mapped_module, mapped_name = _compat_pickle.NAME_MAPPING[(module, name)]
        elif module in _compat_pickle.IMPORT_MAPPING:
            mapped_module = _compat_pickle.IMPORT_MAPPING[module]
        if not _torch_global_allowed(mapped_module, mapped_name):
            _refuse_torch_global(self.member, f"{str(mapped_module)[:100]}.{str(mapped_name)[:100]}")
        marker = STORAGE_MARKERS.get(mapped_name) if mapped_module == "torch" else None
        if marker is not None:
            return marker.named_in(self.member)
        return super().find_class(module, name)


def _allow_list_pickle_module(member: str) -> Any:
    """What ``torch.load(pickle_module=...)`` needs: a namespace whose ``Unpickler`` is :class:`_AllowListUnpickler`
    naming ``member`` in its errors."""
    unpickler = type("_AllowListUnpickler", (_AllowListUnpickler,), {"member": member})
    return types.SimpleNamespace(__name__=__name__, Unpickler=unpickler)


class StorageMarker:
    """What ``torch.FloatStorage``, ``torch.LongStorage``, ... resolve to while a torch pickle is unpickled (a
    bundle's members here, a Lightning checkpoint in :mod:`~mlflow_ptycho_flavor.convert.checkpoint_pickle`): the
    dtype its persistent ids name (the one thing ``torch.save`` uses the class for, and all ``torch.load``'s own
    ``persistent_load`` reads of it), never the class.

    The real class would also be reachable as a callable: ``REDUCE`` on ``torch.FloatStorage`` with a count of
    ``2**31`` makes the unpickler allocate 8 GiB from a pickle of a few bytes. Calling a marker, or applying state
    to it (``BUILD``), raises ``refusal`` instead; it has no instance dict, so one marker can be shared by every
    unpickler without a hostile pickle altering it.
    """

    __slots__ = ("name", "dtype", "member", "refusal")

    def __init__(
        self, name: str, dtype: torch.dtype, member: str = "a torch member",
        refusal: type[UnsafeBundleError] = UnsafeBundleError,
    ) -> None:
        self.name = name
        self.dtype = dtype
        self.member = member
        self.refusal = refusal

    def named_in(self, member: str, refusal: type[UnsafeBundleError] = UnsafeBundleError) -> "StorageMarker":
        """This marker, naming ``member`` in its refusals and raising ``refusal`` (a subclass of
        :class:`~mlflow_ptycho_flavor.errors.UnsafeBundleError`)."""
        if member == self.member and refusal is self.refusal:
            return self
        return StorageMarker(self.name, self.dtype, member, refusal)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise self.refusal(
            f"{self.member} calls torch.{self.name} to build a storage of a size the pickle chooses (a few bytes can "
            "allocate gigabytes); torch.save only names storage classes in persistent ids, so the file was written "
            "by something else and is refused"
        )

    def __setstate__(self, state: Any) -> None:
        raise self.refusal(
            f"{self.member} applies state (BUILD) to torch.{self.name}, which torch.save never does; refused"
        )

    def __reduce__(self) -> Any:
        raise TypeError("storage markers stand in for torch's storage classes while unpickling and cannot be pickled")

    def __repr__(self) -> str:
        return f"torch.{self.name}"


def _legacy_storage_markers() -> dict[str, StorageMarker]:
    """``"FloatStorage"`` -> a marker of ``torch.float32``, ...: the storage classes ``torch.save`` names in
    persistent ids (``torch.UntypedStorage`` is not among them, and the allow-list refuses it)."""
    table = {}
    with warnings.catch_warnings():  # reading ``.dtype`` of the legacy classes warns that TypedStorage is deprecated
        warnings.simplefilter("ignore")
        for name, value in vars(torch).items():
            if name.endswith("Storage") and _torch_global_allowed("torch", name):
                dtype = getattr(value, "dtype", None)
                if isinstance(dtype, torch.dtype):
                    table[name] = StorageMarker(name, dtype)
    return table


#: Storage class name (``"FloatStorage"``) -> its :class:`StorageMarker`: the only form in which any of this
#: package's unpicklers hands out a storage class.
STORAGE_MARKERS = _legacy_storage_markers()


class _StorageFile:
    """The storage records of a torch zip as tensors (what ``torch.load`` does record by record through the Python
    file object, with a few calls each): for a :class:`~.archive.MemberView` already in memory, a tensor over each
    record's bytes there (no copy: :meth:`_shared_record`); otherwise one ``preadv`` per storage from the archive
    file, or one copy out of the buffer for bytes (docs/bundle-format.md §1.3)."""

    def __init__(
        self, data: bytes | MemberView, prefix: str, spans: dict[str, RecordSpan], member: str, *,
        defer_reads: bool = False,
    ) -> None:
        self._data = data
        self._prefix = prefix
        self._spans = spans
        self._member = member
        self._storages: dict[str, torch.storage.TypedStorage] = {}
        self._swap = self._byteorder() != sys.byteorder
        #: With ``defer_reads``, storages are allocated while unpickling and filled by :meth:`fill` afterwards
        #: (memory is mostly touched only when written, so a storage replaced by its NHWC copy costs next to nothing).
        self._pending: dict[str, tuple[RecordSpan, torch.Tensor, torch.dtype]] | None = {} if defer_reads else None
        #: How often the pickle asked for each storage: once per tensor (or bare storage) built on it.
        self._references: dict[str, int] = {}

    def _byteorder(self) -> str:
        """The order the storages were written in: the ``byteorder`` record (``"little"`` or ``"big"``), or
        ``"little"`` when the file has none, as ``torch.load`` assumes."""
        name = f"{self._prefix}byteorder"
        span = self._spans.get(name)
        if span is None:
            return "little"
        if span.size > 16:
            raise CorruptBundleError(f"{self._member}: the record {short_repr(name)} holds {span.size} bytes, not a word")
        text = bytes(self._read(span, span.size)).decode("ascii", "replace").strip()
        if text not in ("little", "big"):
            raise CorruptBundleError(f"{self._member}: the byteorder record says {short_repr(text)}, not little or big")
        return text

    def _read(self, span: RecordSpan, count: int, target: Any = None, *, skip: int = 0) -> Any:
        """``count`` bytes of the record ``span`` from its byte ``skip`` on, into ``target`` (a new bytearray when
        None); a short read is damage."""
        buffer = bytearray(count) if target is None else target
        offset = span.start + skip
        if isinstance(self._data, MemberView):
            received = self._data.readinto_at(buffer, offset)
        else:
            chunk = memoryview(self._data)[offset : offset + count]
            memoryview(buffer).cast("B")[: len(chunk)] = chunk
            received = len(chunk)
        if received != count:
            raise CorruptBundleError(f"{self._member} is cut short inside a storage record")
        return buffer

    def storage(self, saved_id: Any) -> torch.storage.TypedStorage:
        """``persistent_load`` of ``('storage', <storage class>, key, location, numel)``: the storage on the CPU
        (``map_location="cpu"``), each key read once and shared by every tensor viewing it."""
        if not (isinstance(saved_id, tuple) and len(saved_id) == 5 and saved_id[0] == "storage"):
            raise CorruptBundleError(f"{self._member} holds the persistent id {short_repr(saved_id)}, not a storage")
        _, storage_class, key, location, numel = saved_id
        dtype = storage_class.dtype if isinstance(storage_class, StorageMarker) else None
        if dtype is None or not isinstance(key, str) or not isinstance(location, str) or type(numel) is not int:
            raise CorruptBundleError(f"{self._member} holds the malformed storage id {short_repr(saved_id)}")
        self._references[key] = self._references.get(key, 0) + 1
        known = self._storages.get(key)
        if known is not None:
            if known.dtype != dtype or known.size() != numel:
                raise CorruptBundleError(f"{self._member} describes its storage {short_repr(key)} twice, differently")
            return known
        name = f"{self._prefix}data/{key}"
        span = self._spans.get(name)
        nbytes = numel * dtype.itemsize if numel >= 0 else -1
        if span is None or not span.stored_intact or span.size != nbytes:
            found = "no such record" if span is None else f"a record of {span.size} bytes"
            raise CorruptBundleError(
                f"{self._member}: the storage {short_repr(key)} needs {nbytes} bytes ({numel} {dtype}) but the file "
                f"has {found}; the file is damaged"
            )
        flat = self._shared_record(span, dtype)
        if flat is None:
            flat = torch.empty(nbytes, dtype=torch.uint8)
            if self._pending is not None:
                self._pending[key] = (span, flat, dtype)
            else:
                self._fill_in_place(span, flat, dtype)
        typed = torch.storage.TypedStorage(wrap_storage=flat.untyped_storage(), dtype=dtype, _internal=True)
        self._storages[key] = typed
        return typed

    def _shared_record(self, span: RecordSpan, dtype: torch.dtype) -> torch.Tensor | None:
        """The record's bytes as a tensor over the member already in memory (:meth:`~.archive.MemberView.load`), no
        copy, or None where they must be read into a storage of their own: nothing loaded, storages read later
        (``defer_reads``), a byte order to swap (done on a copy: the loaded bytes are being hashed meanwhile), an
        empty record, or an address not aligned for the element type (``torch.save`` aligns records to 64 bytes;
        a crafted file need not). Each storage is its own tensor of exactly the record's size, as ``torch.load``
        gives it; together they keep the loaded buffer alive."""
        memory = self._data.memory if isinstance(self._data, MemberView) else None
        if memory is None or self._pending is not None or self._swap or span.size == 0:
            return None
        flat = torch.frombuffer(memory, dtype=torch.uint8, count=span.size, offset=span.start)
        return flat if flat.data_ptr() % dtype.itemsize == 0 else None

    def _fill_in_place(self, span: RecordSpan, flat: torch.Tensor, dtype: torch.dtype) -> None:
        self._read(span, span.size, flat.numpy())
        if self._swap:
            flat.untyped_storage().byteswap(dtype)

    def fill(self, decoded: Any, *, channels_last: bool) -> Any:
        """Read the storages deferred while unpickling (``defer_reads``) and return ``decoded``; with
        ``channels_last``, the 4-D tensors of a state_dict come back as ``tensor.to(memory_format=
        torch.channels_last)`` gives them, read straight into NHWC.

        Only a plain state_dict is read that way (:func:`_plain_state_dict`: string keys, plain tensors as values
        and nowhere else, module versions as the one attribute), and in it only a tensor that is the one user of its
        storage, covers all of it in contiguous NCHW strides, carries no conjugate/negative bit or grad, and is
        stored in native byte order: replacing such a tensor changes nothing anything else can see. It is read a
        slice of whole output channels at a time into one small reused buffer and copied from there, while the
        slice is in cache, into its NHWC tensor: no NCHW tensor is filled and then converted (docs/bundle-format.md
        §1.3); its NCHW storage was allocated but never written, so it mostly costs no page. Every other storage is
        read into place. (From a loaded member view the reads are copies out of its buffer, which the caller frees
        once this returns: on the host, the weights are then in memory twice while they load.)
        """
        pending, self._pending = self._pending or {}, None
        if channels_last and not self._swap and _plain_state_dict(decoded):
            converted = self._read_channels_last(decoded, pending)
            for key, tensor in converted.items():
                dict.__setitem__(decoded, key, tensor)  # an OrderedDict keeps its order and its _metadata
        for span, flat, dtype in pending.values():
            self._fill_in_place(span, flat, dtype)
        return decoded

    def _read_channels_last(
        self, decoded: dict, pending: dict[str, tuple[RecordSpan, torch.Tensor, torch.dtype]]
    ) -> dict[str, torch.Tensor]:
        """The NHWC tensors of :meth:`fill` by mapping key; their records are taken off ``pending``."""
        record_of = {flat.data_ptr(): record for record, (_, flat, _) in pending.items() if flat.numel()}
        converted: dict[str, torch.Tensor] = {}
        buffer: torch.Tensor | None = None
        for key, tensor in dict.items(decoded):
            if tensor.dim() != 4 or not tensor.numel():
                continue
            record = record_of.get(tensor.untyped_storage().data_ptr())
            if (record is None or self._references[record] != 1 or tensor.storage_offset() != 0
                    or not tensor.is_contiguous() or tensor.nbytes != tensor.untyped_storage().nbytes()
                    or is_channels_last(tensor) or tensor.requires_grad or tensor.is_conj() or tensor.is_neg()):
                continue  # read into place; build_network converts it the general way
            span, _, _ = pending.pop(record)
            nhwc = torch.empty(tensor.shape, dtype=tensor.dtype, memory_format=torch.channels_last)
            row = tensor[0].nbytes  # one output channel
            rows = max(1, min(tensor.shape[0], _NHWC_SLICE_BYTES // row))
            if buffer is None or buffer.numel() < rows * row:
                buffer = torch.empty(rows * row, dtype=torch.uint8)
            for first in range(0, tensor.shape[0], rows):
                count = min(rows, tensor.shape[0] - first)
                chunk = buffer[: count * row]
                self._read(span, count * row, chunk.numpy(), skip=first * row)
                nhwc[first : first + count].copy_(chunk.view(tensor.dtype).view(count, *tensor.shape[1:]))
            converted[key] = nhwc
        return converted


def _plain_state_dict(decoded: Any) -> bool:
    """Whether ``decoded`` is what ``torch.save(module.state_dict())`` writes and nothing more: a dict with string
    keys, each value a distinct plain tensor without backward hooks, and at most ``_metadata`` as an attribute,
    mapping module names to dicts of plain numbers and strings (``{"": {"version": 1}, ...}``). Then its values are
    the only way to reach its tensors (a Parameter, a container or a hook could hold a tensor sharing a storage
    without asking the pickle for it again), so :meth:`_StorageFile.fill` may replace one whose storage the pickle
    named once without anything else holding the old one."""
    if not isinstance(decoded, dict):
        return False
    attributes = getattr(decoded, "__dict__", {})
    if set(attributes) - {"_metadata"}:
        return False
    metadata = attributes.get("_metadata", {})
    if not isinstance(metadata, dict) or not all(
        isinstance(name, str) and isinstance(entry, dict)
        and all(isinstance(field, str) and type(value) in (int, float, str, bool, type(None))
                for field, value in dict.items(entry))
        for name, entry in dict.items(metadata)
    ):
        return False
    values = list(dict.values(decoded))
    return (all(isinstance(key, str) for key in decoded)
            and all(type(value) is torch.Tensor and not value._backward_hooks for value in values)
            and len({id(value) for value in values}) == len(values))


def is_channels_last(tensor: torch.Tensor) -> bool:
    """Whether a 4-D tensor has exactly the strides ``tensor.to(memory_format=torch.channels_last)`` gives (so
    converting it would change nothing). ``is_contiguous(memory_format=torch.channels_last)`` is not the test: it
    also holds for NCHW tensors with one channel or one pixel, which ``.to`` restrides."""
    _, channels, _, width = tensor.shape
    return tensor.stride() == (tensor.shape[2] * width * channels, 1, width * channels, channels)


#: Bytes of NCHW weights read at a time before their NHWC copy (:meth:`_StorageFile.fill`): small enough to stay in
#: cache between the read and the copy.
_NHWC_SLICE_BYTES = 1 << 20


def _direct_storage_prefix(spans: dict[str, RecordSpan]) -> str | None:
    """The archive folder (``"archive/"``) when every storage record can be read in place: all records in one
    folder holding one ``data.pkl``, every ``data/`` record stored whole. None: leave the file to ``torch.load``."""
    pickles = [name for name in spans if name.endswith("/data.pkl") and name.count("/") == 1]
    if len(pickles) != 1:
        return None
    prefix = pickles[0][: -len("data.pkl")]
    for name, span in spans.items():
        if not name.startswith(prefix):
            return None
        if name.startswith(f"{prefix}data/") and not span.stored_intact:
            return None
    return prefix


def _unpickle_with_storages(pickled: bytes, storages: _StorageFile, member: str, *, channels_last: bool) -> Any:
    """``data.pkl`` through the C unpickler resolving :data:`_TORCH_ALLOWED_GLOBALS` (torch's own rebuild
    functions), its storages from :class:`_StorageFile`: ``torch.load``'s result without its per-tensor machinery
    (with ``channels_last``, a plain state_dict's 4-D tensors in NHWC: :meth:`_StorageFile.fill`)."""
    unpickler = type("_StorageUnpickler", (_AllowListUnpickler,), {"member": member})(io.BytesIO(pickled))
    unpickler.persistent_load = storages.storage
    return storages.fill(unpickler.load(), channels_last=channels_last)


def _weights_only_forced() -> bool:
    """``TORCH_FORCE_WEIGHTS_ONLY_LOAD`` makes torch.load refuse any ``pickle_module``; torch's own restricted
    unpickler then runs after the scan instead."""
    return os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "0").strip().lower() in ("1", "y", "yes", "true")


def _torch_load_failure(exc: Exception, member: str) -> Exception:
    text = short_message(exc)
    if "Weights only load failed" in text or "Unsupported global" in text or "weights_only" in text:
        first_line = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
        return UnsafeBundleError(
            f"{member} needs arbitrary Python objects to unpickle and was refused by "
            f"torch.load(weights_only=True): {first_line}"
        )
    return CorruptBundleError(f"{member} is not a valid torch file: {type(exc).__name__}: {text}")


def torch_load(
    data: bytes | MemberView, member: str, *, scan: bool = True, max_inflated_bytes: int | None = None,
    channels_last: bool = False,
) -> Any:
    """Decode a torch member (``model.pth``, ``torch_scaling_metadata.pt``) after checks that no opt-in skips.

    ``data`` is the member's bytes, or a :class:`~.archive.MemberView` of a stored member (read straight from the
    archive file, or from the buffer it was loaded into, whose bytes the storages then become: one copy of the
    weights in memory instead of two).

    Always: the bytes must be torch's zip format, with at most :data:`MAX_TORCH_RECORDS` records whose inflated
    sizes add up to at most ``max_inflated_bytes`` (default: the member's own size, i.e. no expansion).

    With ``scan`` (the default): the embedded pickle names only the globals a state_dict or metadata dict needs, uses
    no other way to reach code, is no TorchScript archive, and its structure is bounded
    (:func:`~.budget.scan_pickle_structure`); it is then unpickled by the C unpickler resolving the same allow-list
    (:class:`_AllowListUnpickler`, torch's own rebuild functions), about twice as fast as torch's pure-Python
    ``weights_only`` unpickler, whose allow-list is wider. Where every storage record is stored whole in the one
    archive folder (what ``torch.save`` writes), the storages are read in place, as tensors over the loaded
    member's bytes or with one ``preadv`` each (:class:`_StorageFile`: ``torch.load``'s objects without its
    per-tensor machinery); otherwise ``torch.load`` runs with that unpickler. ``allow_unsafe`` turns ``scan`` off:
    torch's ``torch.load(weights_only=True)`` then decides alone.

    ``channels_last`` asks for a state_dict's 4-D tensors in NHWC memory format, as ``tensor.to(memory_format=
    torch.channels_last)`` gives them; the in-place path reads them that way (no NCHW tensor is filled first),
    the others leave them NCHW (the caller converts what is left).

    Raises:
        UnsafeBundleError, CorruptBundleError, UnsupportedBundleError.
    """
    if not data.startswith(b"PK\x03\x04"):
        raise CorruptBundleError(
            f"{member} is not a valid torch file: not in torch's zip serialization format (what torch.save has "
            "written since torch 1.6); it is damaged, or a legacy file this loader does not read"
        )
    size = len(data) if isinstance(data, (bytes, bytearray, memoryview)) else data.size
    spans = check_nested_zip(
        data, member, max_inflated_bytes=size if max_inflated_bytes is None else max_inflated_bytes,
        max_entries=MAX_TORCH_RECORDS,
    )
    pickled = _torch_pickle_record(data, member) if scan else b""
    if scan:
        _scan_torch_pickle(pickled, member)
    try:
        direct = _direct_storage_prefix(spans) if scan and not _weights_only_forced() else None
        if direct is not None:
            storages = _StorageFile(data, direct, spans, member, defer_reads=channels_last)
            return _unpickle_with_storages(pickled, storages, member, channels_last=channels_last)
        if scan and not _weights_only_forced():
            return torch.load(
                _torch_file(data), map_location="cpu", weights_only=False,
                pickle_module=_allow_list_pickle_module(member),
            )
        return torch.load(_torch_file(data), map_location="cpu", weights_only=True)
    except (UnsafeBundleError, CorruptBundleError):
        raise
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, ValueError, ...
        raise _torch_load_failure(exc, member) from exc
