"""The HDF5 files of a TF archive, opened on in-memory bytes: ``model.weights.h5`` and ``model.h5``.

h5py follows hard links only, external, virtual or filtered storage is refused, and every dataset's shape, dtype
and stored size is checked before it is read. Keras stores weights by position: the k-th ``Conv2D`` of
``config.json`` is the group ``layers/conv2d_k``; kernels go HWIO -> OIHW (docs/bundle-format.md §9).
"""

from __future__ import annotations

import io
import math
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from mlflow_ptycho_flavor.convert.tensorflow.archive import KERAS_MEMBER, MODEL_H5_MEMBER, _refuse
from mlflow_ptycho_flavor.convert.tensorflow.graph import _GraphPlan, _Layer
from mlflow_ptycho_flavor.errors import CorruptBundleError, PtychoFlavorError, UnsafeBundleError, short_repr

_MAX_H5_OBJECTS = 100_000
_MAX_ATTR_BYTES = 4096
_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


def _open_h5(data: bytes, member: str) -> Any:
    import h5py

    if not data.startswith(_HDF5_SIGNATURE):
        raise CorruptBundleError(f"{member} is not an HDF5 file (no HDF5 signature at offset 0)")
    try:
        return h5py.File(io.BytesIO(data), "r")
    except Exception as exc:  # noqa: BLE001 - the HDF5 library parsing untrusted bytes
        raise CorruptBundleError(f"{member} cannot be opened as HDF5: {type(exc).__name__}: {str(exc)[:200]}") from exc


def _hard_child(group: Any, name: str, member: str, path: str) -> Any:
    """``group[name]`` through a hard link only (soft and external links could reach other files)."""
    import h5py

    try:
        link = group.get(name, getlink=True)
    except Exception as exc:  # noqa: BLE001
        raise CorruptBundleError(f"{member}: {path} cannot be read: {type(exc).__name__}: {str(exc)[:200]}") from exc
    if link is None:
        raise CorruptBundleError(f"{member} lacks {path}")
    if not isinstance(link, h5py.HardLink):
        raise UnsafeBundleError(f"{member}: {path} is a {type(link).__name__}, which could read other files; Keras "
                                "writes hard links only, so the file is refused")
    try:
        return group[name]
    except Exception as exc:  # noqa: BLE001
        raise CorruptBundleError(f"{member}: {path} cannot be read: {type(exc).__name__}: {str(exc)[:200]}") from exc


def _small_attr(obj: Any, name: str, member: str, path: str) -> Any:
    """An attribute's value (``None`` when absent), refusing fixed-size ones stored larger than the cap.

    A variable-length string's bytes live in the file, so they are bounded by the (already capped) file size.
    """
    try:
        if name not in obj.attrs:
            return None
        attr_id = obj.attrs.get_id(name)
        if attr_id.get_storage_size() > _MAX_ATTR_BYTES:
            raise UnsafeBundleError(f"{member}: attribute {path}@{name} stores {attr_id.get_storage_size()} bytes "
                                    f"(cap {_MAX_ATTR_BYTES})")
        return obj.attrs[name]
    except PtychoFlavorError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise CorruptBundleError(f"{member}: attribute {path}@{name} cannot be read: {type(exc).__name__}: "
                                 f"{str(exc)[:200]}") from exc


def _check_dataset_storage(dataset: Any, member: str, path: str) -> int:
    """Refuse external, virtual or filtered storage; return the bytes the dataset really stores."""
    import h5py

    try:
        plist = dataset.id.get_create_plist()
        layout = plist.get_layout()
        externals = plist.get_external_count()
        filters = plist.get_nfilters()
        stored = dataset.id.get_storage_size()
    except Exception as exc:  # noqa: BLE001
        raise CorruptBundleError(f"{member}: {path} has an unreadable layout: {type(exc).__name__}: "
                                 f"{str(exc)[:200]}") from exc
    if externals or layout == h5py.h5d.VIRTUAL:
        raise UnsafeBundleError(f"{member}: {path} keeps its data in other files (external or virtual storage); "
                                "Keras never does, and reading it would touch files outside the archive")
    if filters:
        raise UnsafeBundleError(f"{member}: {path} is stored through {filters} HDF5 filter(s) (compression); Keras "
                                "writes plain datasets, and filtered data could inflate far beyond the file")
    return int(stored)


@dataclass
class _Weights:
    tensors: "OrderedDict[str, np.ndarray]"  # torch key -> array in torch layout (OIHW), exactly TF's values
    sources: dict[str, str]  # torch key -> h5 dataset path
    padded: list[str]  # keys whose TF tensor was embedded in a larger zero tensor


def _read_conv_weights(
    data: bytes, layers: dict[str, _Layer], plan: _GraphPlan, expected: Mapping[str, torch.Tensor]
) -> _Weights:
    """Read each mapped Conv2D's kernel and bias, checked against the torch layout before any data is read."""
    member = f"{KERAS_MEMBER}/model.weights.h5"
    ordered = sorted(layers.values(), key=lambda layer: layer.index)
    conv_names = [layer.name for layer in ordered if layer.class_name == "Conv2D"]
    group_of = {name: ("conv2d" if k == 0 else f"conv2d_{k}") for k, name in enumerate(conv_names)}
    handle = _open_h5(data, member)
    try:
        _check_no_stray_datasets(handle, member, {f"layers/{group}/vars" for group in group_of.values()})
        layers_group = _hard_child(handle, "layers", member, "layers")
        planned: list[tuple[str, str, Any, tuple[int, ...], bool]] = []
        total = 0
        for prefix, layer_name in plan.conv_roles.items():
            group_name = group_of[layer_name]
            group = _hard_child(layers_group, group_name, member, f"layers/{group_name}")
            variables = _hard_child(group, "vars", member, f"layers/{group_name}/vars")
            recorded = _small_attr(variables, "name", member, f"layers/{group_name}/vars")
            if isinstance(recorded, bytes):
                recorded = recorded.decode("utf-8", "replace")
            if recorded is not None and recorded != layer_name:
                raise CorruptBundleError(
                    f"{member}: layers/{group_name} records the layer name {short_repr(recorded)}, but the "
                    f"{conv_names.index(layer_name)}-th Conv2D of config.json is {short_repr(layer_name)}: the weights do "
                    "not follow Keras 3's positional layout, so no mapping can be trusted"
                )
            if set(variables.keys()) != {"0", "1"}:
                raise CorruptBundleError(
                    f"{member}: layers/{group_name}/vars holds {short_repr(sorted(variables.keys()))}, not a kernel (0) "
                    "and a bias (1)"
                )
            for index, suffix in (("0", "weight"), ("1", "bias")):
                path = f"layers/{group_name}/vars/{index}"
                dataset = _hard_child(variables, index, member, path)
                if not hasattr(dataset, "shape") or not hasattr(dataset, "dtype"):
                    raise CorruptBundleError(f"{member}: {path} is not a dataset")
                key = f"{prefix}.{suffix}"
                shape = tuple(int(d) for d in dataset.shape)
                target = tuple(expected[key].shape)
                torch_shape = (shape[3], shape[2], shape[0], shape[1]) if len(shape) == 4 else shape
                padded = _check_shape(key, path, torch_shape, target, prefix in plan.border_prefixes and plan.N != 64)
                if dataset.dtype.kind != "f" or dataset.dtype.itemsize != 4:
                    raise CorruptBundleError(f"{member}: {path} has dtype {dataset.dtype}, not float32")
                nbytes = math.prod(shape) * 4
                stored = _check_dataset_storage(dataset, member, path)
                if stored != nbytes:
                    raise CorruptBundleError(f"{member}: {path} declares {nbytes} bytes of data but stores {stored}; "
                                             "the file is damaged or crafted")
                total += nbytes
                planned.append((key, path, dataset, shape, padded))
        if total > len(data):
            raise CorruptBundleError(f"{member}: its datasets declare {total} bytes, more than the file's {len(data)}")
        tensors: OrderedDict[str, np.ndarray] = OrderedDict()
        sources: dict[str, str] = {}
        padded_keys: list[str] = []
        for key, path, dataset, shape, padded in planned:
            array = np.empty(shape, dtype="<f4")
            try:
                dataset.read_direct(array)
            except Exception as exc:  # noqa: BLE001 - HDF5 reading untrusted bytes
                raise CorruptBundleError(f"{member}: {path} cannot be read: {type(exc).__name__}: "
                                         f"{str(exc)[:200]}") from exc
            if array.ndim == 4:
                array = np.ascontiguousarray(array.transpose(3, 2, 0, 1))  # HWIO -> OIHW
            if padded:
                embedded = np.zeros(tuple(expected[key].shape), dtype="<f4")
                embedded[tuple(slice(0, d) for d in array.shape)] = array
                array = embedded
                padded_keys.append(key)
            tensors[key] = array
            sources[key] = path
    finally:
        handle.close()
    return _Weights(tensors, sources, padded_keys)


def _check_shape(key: str, path: str, tf_shape: tuple[int, ...], torch_shape: tuple[int, ...], may_pad: bool) -> bool:
    """True when the TF tensor must be zero-padded into the torch shape (TF's narrower border path at N > 64)."""
    if tf_shape == torch_shape:
        return False
    if may_pad and len(tf_shape) == len(torch_shape) and all(a <= b for a, b in zip(tf_shape, torch_shape)):
        return True
    raise _refuse(
        f"{path} has the shape {tf_shape} (torch layout) for {key}, the PyTorch CNN the graph describes needs "
        f"{torch_shape}: the layer widths are not upstream's channel plan"
    )


def _check_no_stray_datasets(handle: Any, member: str, mapped_vars: set[str]) -> None:
    """Refuse weights the converter would silently drop (datasets outside the mapped Conv2D groups)."""
    import h5py

    seen = 0
    stray: list[str] = []

    def visit(name: str, obj: Any) -> Any:
        nonlocal seen
        seen += 1
        if seen > _MAX_H5_OBJECTS:
            return True
        if isinstance(obj, h5py.Dataset):
            parent = name.rsplit("/", 1)[0]
            if parent not in mapped_vars and not name.startswith("optimizer/"):
                stray.append(name)
                if len(stray) >= 8:
                    return True
        return None

    try:
        handle.visititems(visit)
    except Exception as exc:  # noqa: BLE001
        raise CorruptBundleError(f"{member} cannot be walked: {type(exc).__name__}: {str(exc)[:200]}") from exc
    if seen > _MAX_H5_OBJECTS:
        raise UnsafeBundleError(f"{member} holds more than {_MAX_H5_OBJECTS} HDF5 objects (upstream's holds ~100)")
    if stray:
        raise _refuse(f"{member} stores weights {short_repr(stray)} for layers outside upstream's CNN path; converting "
                      "without them would not be the same model")


def _read_intensity_scale_attr(data: bytes) -> float:
    member = MODEL_H5_MEMBER
    handle = _open_h5(data, member)
    try:
        try:
            present = "intensity_scale" in handle.attrs
            attr_id = handle.attrs.get_id("intensity_scale") if present else None
        except Exception as exc:  # noqa: BLE001
            raise CorruptBundleError(f"{member}: attributes cannot be read: {type(exc).__name__}") from exc
        if attr_id is None:
            raise CorruptBundleError(f"{member} lacks the intensity_scale attribute upstream writes")
        if attr_id.dtype.kind != "f" or attr_id.shape not in ((), (1,)):
            raise CorruptBundleError(f"{member}@intensity_scale is {attr_id.dtype} of shape {attr_id.shape}, not a "
                                     "float scalar")
        value = _small_attr(handle, "intensity_scale", member, "/")
    finally:
        handle.close()
    return float(np.asarray(value).reshape(()))
