"""Reading a Lightning checkpoint's ``data.pkl`` without executing it: a restricted unpickler and bounded storages.

``data.pkl`` is first disassembled (which executes nothing and allocates no declared sizes), then unpickled by a
restricted unpickler that resolves exactly :data:`CHECKPOINT_ALLOWED_GLOBALS` to inert stand-ins: storages
become references to ``data/<key>`` records and tensors become (storage, offset, size, stride) records. Only the
tensors that are kept are then materialised, after checking that every view lies inside its storage
(:mod:`mlflow_ptycho_flavor.convert.checkpoint` says which are kept, and converts).
"""

from __future__ import annotations

import _compat_pickle
import collections
import io
import math
import pickle
import re
import zipfile
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mlflow_ptycho_flavor.bundle.budget import scan_pickle_structure
from mlflow_ptycho_flavor.bundle.unpickle import STORAGE_MARKERS, StorageMarker, check_plain_data
from mlflow_ptycho_flavor.errors import (
    CorruptBundleError,
    CorruptCheckpointError,
    UnsafeBundleError,
    UnsafeCheckpointError,
    short_repr,
)

#: Storage globals a checkpoint may name: float32 weights, int64 counters, complex64 spectral weights (FNO family,
#: §8.6). They resolve to the bundle reader's inert :class:`~mlflow_ptycho_flavor.bundle.unpickle.StorageMarker`.
_STORAGE_NAMES = ("FloatStorage", "LongStorage", "ComplexFloatStorage")
#: Every global the restricted unpickler resolves (module, name); nothing else is ever looked up.
CHECKPOINT_ALLOWED_GLOBALS: frozenset[tuple[str, str]] = frozenset(
    {("collections", "OrderedDict"), ("torch._utils", "_rebuild_tensor_v2")}
    | {("torch", name) for name in _STORAGE_NAMES}
)
_STORAGE_KEY = re.compile(r"^[0-9A-Za-z_.-]{1,64}$")
_MAX_DIMS = 16


@dataclass(frozen=True)
class CheckpointLimits:
    """Caps that keep a hostile checkpoint from exhausting memory or time (all configurable).

    Attributes:
        max_members: most zip entries (a checkpoint holds one per stored tensor, optimizer moments included).
        max_pickle_bytes: largest ``data.pkl`` record.
        max_weight_bytes: most bytes of storages materialised (the state_dict and the few small extras).
        max_directory_bytes: largest zip central directory read.
    """

    max_members: int = 100_000
    max_pickle_bytes: int = 256 * 1024 * 1024
    max_weight_bytes: int = 4 * 1024**3
    max_directory_bytes: int = 64 * 1024 * 1024


DEFAULT_CHECKPOINT_LIMITS = CheckpointLimits()


# ----------------------------------------------------------------------------------------------------------------
# Restricted unpickling: inert stand-ins for storages and tensors
# ----------------------------------------------------------------------------------------------------------------
class _StandIn:
    """Base of the constructors the allowed callables resolve to (storage classes resolve to the bundle reader's
    :class:`~mlflow_ptycho_flavor.bundle.unpickle.StorageMarker`): no instance dict, and pickle's BUILD is refused.

    Fresh instances are made per unpickler, so a hostile pickle cannot alter anything that outlives it.
    """

    __slots__ = ()

    def __setstate__(self, state: Any) -> None:
        raise UnsafeCheckpointError("the pickle applies state (BUILD) to a constructor, which torch.save never does")

    def __reduce__(self) -> Any:
        raise TypeError("checkpoint stand-ins cannot be pickled")


class _Constructor(_StandIn):
    """What ``collections.OrderedDict`` / ``torch._utils._rebuild_tensor_v2`` resolve to: a wrapped safe function."""

    __slots__ = ("_function", "_label")

    def __init__(self, function: Any, label: str) -> None:
        self._function = function
        self._label = label

    def __call__(self, *args: Any) -> Any:
        return self._function(*args)

    def __repr__(self) -> str:
        return self._label


@dataclass(frozen=True)
class _StorageRef:
    """A storage record ``data/<key>`` of ``numel`` elements of ``dtype`` (not read yet)."""

    key: str
    dtype: torch.dtype
    numel: int

    def __setstate__(self, state: Any) -> None:
        raise UnsafeCheckpointError("the pickle applies state to a storage, which torch.save never does")


@dataclass(frozen=True)
class _TensorRef:
    """A tensor view of a storage, as ``_rebuild_tensor_v2`` would build it (not built yet)."""

    storage: _StorageRef
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]

    def __setstate__(self, state: Any) -> None:
        raise UnsafeCheckpointError("the pickle applies state to a tensor, which a checkpoint's state_dict never does")

    @property
    def numel(self) -> int:
        return math.prod(self.size)


def _quote(value: Any) -> str:
    """A bounded ``repr`` of a value read from the file: at most 200 characters of it reach a message."""
    text = short_repr(value)
    return text if len(text) <= 200 else text[:197] + "..."


def _non_negative_ints(value: Any, what: str) -> tuple[int, ...]:
    if not isinstance(value, tuple) or len(value) > _MAX_DIMS or not all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value
    ):
        raise CorruptCheckpointError(f"a tensor record has the invalid {what} {_quote(value)}")
    return value


def _rebuild_tensor_stand_in(
    storage: Any, storage_offset: Any, size: Any, stride: Any, requires_grad: Any = False,
    backward_hooks: Any = None, metadata: Any = None,
) -> _TensorRef:
    """Inert ``torch._utils._rebuild_tensor_v2``: validates the view against its storage, builds nothing."""
    if not isinstance(storage, _StorageRef):
        raise UnsafeCheckpointError(
            f"a tensor record rebuilds from {type(storage).__name__} instead of a stored tensor record; refused"
        )
    if isinstance(storage_offset, bool) or not isinstance(storage_offset, int) or storage_offset < 0:
        raise CorruptCheckpointError(f"a tensor record has the invalid storage offset {_quote(storage_offset)}")
    size_t = _non_negative_ints(size, "size")
    stride_t = _non_negative_ints(stride, "stride")
    if len(size_t) != len(stride_t):
        raise CorruptCheckpointError(f"a tensor record has size {size_t} but stride {stride_t}")
    if not isinstance(requires_grad, bool):
        raise CorruptCheckpointError("a tensor record's requires_grad flag is not a bool")
    if backward_hooks:
        raise UnsafeCheckpointError("a tensor record carries backward hooks, which saved weights never have; refused")
    if metadata:
        raise UnsafeCheckpointError("a tensor record carries Python attributes (tensor metadata); refused")
    if math.prod(size_t) > 0:
        last = storage_offset + sum((n - 1) * s for n, s in zip(size_t, stride_t))
        if last >= storage.numel:
            raise CorruptCheckpointError(
                f"a tensor of size {size_t}, stride {stride_t} at offset {storage_offset} reaches element {last} of "
                f"storage {storage.key!r}, which holds {storage.numel}: the checkpoint is damaged"
            )
    return _TensorRef(storage=storage, offset=storage_offset, size=size_t, stride=stride_t)


def _ordered_dict(*args: Any) -> OrderedDict:
    """``collections.OrderedDict`` over containers the pickle itself holds (bounded by its size)."""
    if any(not isinstance(a, (list, tuple, dict)) for a in args):
        raise UnsafeCheckpointError("the pickle builds an OrderedDict from something other than plain data; refused")
    return collections.OrderedDict(*args)


class _CheckpointUnpickler(pickle.Unpickler):
    """Resolves :data:`CHECKPOINT_ALLOWED_GLOBALS` to stand-ins; refuses every other global."""

    def __init__(self, data: bytes, source: str, max_numel: int) -> None:
        super().__init__(io.BytesIO(data))
        self._source = source
        self._max_numel = max_numel
        self.storages: dict[str, _StorageRef] = {}

    def find_class(self, module: str, name: str) -> Any:
        # torch.save writes protocol 2, whose GLOBAL opcodes use Python 2 names; map them as pickle itself would.
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        elif module in _compat_pickle.IMPORT_MAPPING:
            module = _compat_pickle.IMPORT_MAPPING[module]
        if (module, name) not in CHECKPOINT_ALLOWED_GLOBALS:
            raise UnsafeCheckpointError(
                f"{self._source} references the global {str(module)[:80]}.{str(name)[:80]}, which a checkpoint of "
                "upstream's training never needs (its pickle names only collections.OrderedDict, "
                "torch._utils._rebuild_tensor_v2 and torch.FloatStorage/LongStorage/ComplexFloatStorage); refused "
                "before anything was "
                "imported or called. If you trust the file, load it with torch and save its state_dict and configs "
                "with save_torch_bundle"
            )
        if module == "collections":
            return _Constructor(_ordered_dict, "collections.OrderedDict")
        if module == "torch._utils":
            return _Constructor(_rebuild_tensor_stand_in, "torch._utils._rebuild_tensor_v2")
        return STORAGE_MARKERS[name].named_in(self._source, UnsafeCheckpointError)

    def persistent_load(self, pid: Any) -> Any:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise UnsafeCheckpointError(
                f"{self._source} uses the persistent id {_quote(pid)}; torch.save only writes storage records"
            )
        _, storage_type, key, location, numel = pid
        if type(storage_type) is not StorageMarker:
            raise UnsafeCheckpointError(f"{self._source}: a storage record names {_quote(storage_type)} as its type")
        if not isinstance(key, str) or not _STORAGE_KEY.match(key):
            raise CorruptCheckpointError(f"{self._source}: invalid storage key {_quote(key)}")
        if not isinstance(location, str) or len(location) > 64:
            raise CorruptCheckpointError(f"{self._source}: invalid storage location {_quote(location)}")
        if isinstance(numel, bool) or not isinstance(numel, int) or not 0 <= numel <= self._max_numel:
            raise UnsafeCheckpointError(
                f"{self._source}: storage {key!r} declares {_quote(numel)} elements, beyond "
                f"CheckpointLimits.max_weight_bytes={self._max_numel}; refused"
            )
        known = self.storages.get(key)
        if known is None:
            known = self.storages[key] = _StorageRef(key=key, dtype=storage_type.dtype, numel=numel)
        elif known.dtype != storage_type.dtype or known.numel != numel:
            raise CorruptCheckpointError(f"{self._source}: storage {key!r} is described twice, differently")
        return known


def _unpickle(data: bytes, source: str, limits: CheckpointLimits) -> Any:
    """Decode ``data.pkl`` with :class:`_CheckpointUnpickler`: plain data whose tensors are :class:`_TensorRef` records."""
    try:
        # An abstract run first (docs/bundle-format.md §5): counted arguments (BINBYTES8, ...) present before the C
        # unpickler allocates their declared size, memo indices it would allocate up to, keys too costly to hash.
        try:
            scan_pickle_structure(data, source)
        except UnsafeBundleError as exc:
            raise UnsafeCheckpointError(str(exc)) from exc
        except CorruptBundleError as exc:
            raise CorruptCheckpointError(str(exc)) from exc
        unpickler = _CheckpointUnpickler(data, source, limits.max_weight_bytes)
        value = unpickler.load()
    except (UnsafeCheckpointError, CorruptCheckpointError) as exc:
        if str(exc).startswith(source):
            raise
        raise type(exc)(f"{source}: {exc}") from exc  # name the file in errors raised by the stand-ins
    except Exception as exc:  # noqa: BLE001 - only stand-ins ran: any other failure means malformed bytes
        raise CorruptCheckpointError(
            f"{source} is not a valid checkpoint pickle: {type(exc).__name__}: {str(exc)[:300]}"
        ) from exc
    check_plain_data(value, member=source, size=len(data), leaf_types=(_TensorRef, _StorageRef))
    return value


# ----------------------------------------------------------------------------------------------------------------
# Materialising the tensors that are kept
# ----------------------------------------------------------------------------------------------------------------
class _StorageReader:
    """Reads ``<prefix>/data/<key>`` records on demand into CPU tensors (each at most once), within a byte cap."""

    def __init__(self, archive: zipfile.ZipFile, prefix: str, path: Path, limits: CheckpointLimits) -> None:
        self._archive = archive
        self._prefix = prefix
        self._path = path
        self._limits = limits
        self._bases: dict[str, torch.Tensor] = {}
        self.bytes_read = 0

    def base(self, ref: _StorageRef) -> torch.Tensor:
        if ref.key in self._bases:
            return self._bases[ref.key]
        itemsize = torch.empty((), dtype=ref.dtype).element_size()
        nbytes = ref.numel * itemsize
        if self.bytes_read + nbytes > self._limits.max_weight_bytes:
            raise UnsafeCheckpointError(
                f"{self._path}: the weights need more than {self._limits.max_weight_bytes} bytes "
                "(CheckpointLimits.max_weight_bytes); refused"
            )
        name = f"{self._prefix}/data/{ref.key}"
        try:
            info = self._archive.getinfo(name)
        except KeyError as exc:
            raise CorruptCheckpointError(f"{self._path} lacks the storage record {name!r} its pickle refers to") from exc
        if info.file_size != nbytes:
            raise CorruptCheckpointError(
                f"{self._path}: storage record {name!r} holds {info.file_size} bytes, its pickle says {nbytes} "
                f"({ref.numel} x {ref.dtype}); the checkpoint is damaged or cut short"
            )
        try:
            with self._archive.open(info) as member:
                raw = member.read(nbytes + 1)
        except Exception as exc:  # noqa: BLE001 - zlib/CRC errors on untrusted bytes
            raise CorruptCheckpointError(
                f"{self._path}: storage record {name!r} is damaged ({type(exc).__name__}: {str(exc)[:200]})"
            ) from exc
        if len(raw) != nbytes:
            raise CorruptCheckpointError(f"{self._path}: storage record {name!r} is cut short")
        self.bytes_read += nbytes
        base = torch.frombuffer(bytearray(raw), dtype=ref.dtype) if nbytes else torch.empty(0, dtype=ref.dtype)
        self._bases[ref.key] = base
        return base

    def tensor(self, ref: _TensorRef) -> torch.Tensor:
        return torch.as_strided(self.base(ref.storage), ref.size, ref.stride, ref.offset)


def _materialize(value: Any, reader: _StorageReader) -> Any:
    """A copy of plain data with every tensor record replaced by its tensor (shared storages stay shared)."""
    if isinstance(value, _TensorRef):
        return reader.tensor(value)
    if isinstance(value, (_StorageRef, _StandIn)):
        raise UnsafeCheckpointError(
            f"the pickle holds {value!r} itself where a tensor or plain value belongs; torch.save never writes that"
        )
    if isinstance(value, OrderedDict):
        copy: Any = OrderedDict((k, _materialize(v, reader)) for k, v in value.items())
        copy.__dict__.update({k: v for k, v in vars(value).items()})
        return copy
    if isinstance(value, dict):
        if not all(isinstance(k, (str, int, float, bool, type(None))) for k in value):
            raise CorruptCheckpointError("a dict in the checkpoint has keys that are not plain strings or numbers")
        return {k: _materialize(v, reader) for k, v in value.items()}
    if isinstance(value, list):
        return [_materialize(v, reader) for v in value]
    if isinstance(value, tuple):
        return tuple(_materialize(v, reader) for v in value)
    return value


def _check_state_dict_metadata(state_dict: OrderedDict, source: str) -> None:
    extra = set(vars(state_dict)) - {"_metadata"}
    if extra:
        raise UnsafeCheckpointError(f"{source}: the state_dict carries unexpected attributes {_quote(sorted(extra))}")
    meta = vars(state_dict).get("_metadata")
    if meta is None:
        return
    if not isinstance(meta, Mapping) or not all(
        isinstance(k, str) and isinstance(v, Mapping)
        and all(isinstance(a, str) and isinstance(b, (int, str, bool, type(None))) for a, b in v.items())
        for k, v in meta.items()
    ):
        raise CorruptCheckpointError(f"{source}: the state_dict's _metadata is not a map of module prefixes")
