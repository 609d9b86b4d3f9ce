"""Exact conversion of TensorFlow PtychoPINN archives (``wts.h5.zip``, version ``'1.0'``) into PyTorch bundles.

TensorFlow is upstream's default backend, so most existing bundles are TF archives (docs/bundle-format.md §9.1):
``manifest.dill`` plus, per model, ``model.keras`` (a Keras 3 zip of ``metadata.json``, ``config.json`` and
``model.weights.h5``), ``custom_objects.dill``, ``params.dill`` and ``model.h5``. This module reads one with
``zipfile`` + ``h5py`` + ``numpy`` only - no TensorFlow, no Keras, no code from the file - and rebuilds its
``diffraction_to_obj`` network as the package's :class:`~mlflow_ptycho_flavor.network.PtychoPINNNetwork`, exact to float32 rounding:

* the Functional graph in ``config.json`` is traced back from the ``CombineComplexLayer`` (``obj``) through both
  heads, the two decoder trunks and the encoder, and every layer's settings are checked against upstream's CNN;
  anything else is refused (:class:`~mlflow_ptycho_flavor.errors.TensorFlowConversionError`) rather than approximated;
* Keras stores weights by position, not by layer name: the k-th ``Conv2D`` of ``config.json`` is the h5 group
  ``layers/conv2d_k`` (cross-checked with the group's ``name`` attribute when present); kernels go HWIO -> OIHW;
* the TF network implies torch settings that ``params.dill`` does not hold (no CBAM, amp/phase heads, the legacy
  decoder-channel override when TF's border split differs from the torch default, TF's narrower border path
  zero-padded at N = 128/256), so the converted bundle always carries ``torch_scaling_metadata.pt``;
* input convention: TF feeds ``x * intensity_scale`` and divides by ``exp(log_scale)`` inside, so the CNN sees
  the normalized amplitudes ``x``; the converted network takes the same ``x`` with an input scale factor of 1.

Hostile input is handled like the PyTorch reader's (:mod:`mlflow_ptycho_flavor.bundle`): the source file is read once into memory
(regular files only) and every zip - the archive and the nested ``model.keras`` - is read by name with member,
total and compression-ratio caps, nothing is extracted to disk, ``.dill`` members go through the restricted
unpickler (the one TensorFlow global a real ``params.dill`` needs, ``convert_to_tensor`` of the probe, decodes to
numpy; every other global is refused before anything is imported), ``custom_objects.dill`` is never read, and
h5py opens the HDF5 files on in-memory bytes, following hard links only, refusing external, virtual or filtered
storage and checking every dataset's shape, dtype and stored size before reading it. Nothing here imports MLflow.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mlflow_ptycho_flavor._io import PathLike
from mlflow_ptycho_flavor.bundle.archive import DEFAULT_LIMITS, ArchiveReader, BundleLimits, resolve_bundle_path
from mlflow_ptycho_flavor.bundle.identify import SAVEDMODEL_ERA_DESCRIPTION, ArtifactKind, identify_artifact
from mlflow_ptycho_flavor.bundle.io import INFERENCE_MODEL, MANIFEST_MEMBER, save_torch_bundle
from mlflow_ptycho_flavor.bundle.params import validate_params_snapshot
from mlflow_ptycho_flavor.bundle.unpickle import safe_loads
from mlflow_ptycho_flavor.errors import (
    ConfigMismatchError,
    CorruptBundleError,
    NotABundleError,
    PtychoFlavorError,
    TensorFlowConversionError,
    UnsafeBundleError,
    short_repr,
)
from mlflow_ptycho_flavor.network import NetworkConfig, PtychoPINNNetwork, encoder_depth

__all__ = [
    "TF_ARCHIVE_VERSION",
    "TensorFlowArchive",
    "read_tf_archive",
    "convert_tf_bundle",
]

TF_ARCHIVE_VERSION = "1.0"
KERAS_MEMBER = f"{INFERENCE_MODEL}/model.keras"
PARAMS_MEMBER = f"{INFERENCE_MODEL}/params.dill"
MODEL_H5_MEMBER = f"{INFERENCE_MODEL}/model.h5"

# Caps for members whose real sizes are tiny (the archive-wide caps of BundleLimits still apply on top).
_MAX_MANIFEST_BYTES = 64 * 1024
_MAX_PARAMS_BYTES = 64 * 1024**2  # a 256x256 complex128 probe is 1 MiB
_MAX_MODEL_H5_BYTES = 1024**2  # one attribute (896 bytes in every archive seen)
_MAX_METADATA_JSON_BYTES = 64 * 1024
_MAX_CONFIG_JSON_BYTES = 64 * 1024**2  # ~45 KB at N=64
_MAX_LAYERS = 4096
_MAX_H5_OBJECTS = 100_000
_MAX_ATTR_BYTES = 4096
_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"

_RECTANGULAR_ERA = (
    "archives written between f32b85f (2025-07-28) and c03673d (2026-02-10) combine the heads as the rectangular "
    "A + i*phi (CombineComplexLayer without use_polar, 1-channel amplitude head); no PyTorch mode computes that "
    "combine, so the model cannot be converted exactly"
)

#: Every layer class upstream's ``diffraction_to_obj`` graph holds, with the modules Keras records for it.
_KNOWN_CLASSES: dict[str, tuple[str, ...]] = {
    "InputLayer": ("keras.layers", "keras.src.layers"),
    "Conv2D": ("keras.layers", "keras.src.layers"),
    "MaxPooling2D": ("keras.layers", "keras.src.layers"),
    "UpSampling2D": ("keras.layers", "keras.src.layers"),
    "ZeroPadding2D": ("keras.layers", "keras.src.layers"),
    "GetItem": ("keras.src.ops.numpy",),
    "Multiply": ("keras.src.ops.numpy",),
    "Add": ("keras.src.ops.numpy",),
    "Silu": ("keras.src.ops.nn",),
    "IntensityScaler": ("ptycho.model",),
    "ActivationLayer": ("ptycho.custom_layers",),
    "CenterMaskLayer": ("ptycho.tf_helper",),
    "CombineComplexLayer": ("ptycho.custom_layers",),
    # Downstream of ``obj`` (reassembly into the final object): not part of the converted network.
    "ReassemblePatchesLayer": ("ptycho.custom_layers",),
    "TrimReconstructionLayer": ("ptycho.custom_layers",),
}

def _refuse(reason: str) -> TensorFlowConversionError:
    return TensorFlowConversionError(f"TensorFlow archive cannot be converted exactly: {reason}")


# ----------------------------------------------------------------------------------------------------------------
# Zip archives held in memory
# ----------------------------------------------------------------------------------------------------------------
class _InMemoryArchive(ArchiveReader):
    """The PyTorch reader's capped, by-name zip access (:class:`~mlflow_ptycho_flavor.bundle.archive.ArchiveReader`)
    over bytes in memory, plus per-member caps."""

    def __init__(self, data: bytes, label: Path, limits: BundleLimits) -> None:
        super().__init__(label, limits, data=data)

    def read_capped(self, name: str, cap: int) -> bytes:
        """Read a member whose legitimate size is small, refusing it beyond ``cap`` bytes before inflating."""
        if name not in self:
            raise CorruptBundleError(
                f"{self.path} lacks the member {short_repr(name)}; members: {short_repr(sorted(self.names))}"
            )
        if self.size(name) > cap:
            raise UnsafeBundleError(
                f"member {short_repr(name)} of {self.path} declares {self.size(name)} bytes, over the {cap}-byte cap for "
                "that member (upstream writes far less); refused"
            )
        return self.read(name)


def _read_source(path: Path, limits: BundleLimits) -> bytes:
    """The whole source file, read once from a regular file (FIFOs, devices and directories refused)."""
    handle = ArchiveReader._open_regular_file(path)
    with handle:
        size = os.fstat(handle.fileno()).st_size
        if size > limits.max_total_bytes:
            raise UnsafeBundleError(
                f"{path} is {size} bytes, over the total cap of {limits.max_total_bytes} (BundleLimits.max_total_bytes)"
            )
        data = handle.read(size + 1)
    if len(data) != size:
        raise CorruptBundleError(f"{path} changed size while it was read ({size} -> {len(data)} bytes); retry")
    return data


def _open_nested_zip(data: bytes, label: Path, limits: BundleLimits) -> _InMemoryArchive:
    try:
        return _InMemoryArchive(data, label, limits)
    except NotABundleError as exc:  # the archive itself opened: a member that is not a zip is damage
        raise CorruptBundleError(f"{label} is not a Keras 3 zip: {exc}") from exc


# ----------------------------------------------------------------------------------------------------------------
# config.json: the Keras Functional graph
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class _Layer:
    """One ``config.layers`` entry: its class, settings and the layers feeding its single call."""

    index: int
    name: str
    class_name: str
    config: dict[str, Any]
    inputs: list[str]
    args: list[Any]


def _keras_tensors(value: Any, found: list[str], depth: int = 0) -> None:
    """Collect the producing layer names of the ``__keras_tensor__`` records inside a call's arguments."""
    if depth > 8:
        raise _refuse("a layer call nests its arguments deeper than upstream's graph ever does")
    if isinstance(value, list):
        for item in value:
            _keras_tensors(item, found, depth + 1)
    elif isinstance(value, dict):
        if value.get("class_name") == "__keras_tensor__":
            history = (value.get("config") or {}).get("keras_history")
            if (
                not isinstance(history, list)
                or len(history) != 3
                or not isinstance(history[0], str)
                or history[1:] != [0, 0]
            ):
                raise _refuse(f"a tensor reference {short_repr(history)} is not (layer, 0, 0): layers called twice or "
                              "multi-output layers are not part of upstream's CNN")
            found.append(history[0])
        else:
            for item in value.values():
                _keras_tensors(item, found, depth + 1)


def _parse_layers(config: Any) -> dict[str, _Layer]:
    if not isinstance(config, dict) or config.get("class_name") not in ("Functional", "Model"):
        raise _refuse(
            f"config.json describes a {short_repr(config.get('class_name') if isinstance(config, dict) else config)}, "
            "not a Keras Functional model"
        )
    entries = (config.get("config") or {}).get("layers")
    if not isinstance(entries, list) or not entries:
        raise CorruptBundleError("config.json has no config.layers list")
    if len(entries) > _MAX_LAYERS:
        raise UnsafeBundleError(f"config.json lists {len(entries)} layers (cap {_MAX_LAYERS}; upstream's has ~53)")
    layers: dict[str, _Layer] = {}
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise CorruptBundleError(f"config.json layer #{index} is a {type(entry).__name__}, not an object")
        name = entry.get("name")
        class_name = entry.get("class_name")
        if not isinstance(name, str) or not isinstance(class_name, str):
            raise CorruptBundleError(f"config.json layer #{index} lacks a name or class_name")
        if name in layers:
            raise _refuse(f"config.json names two layers {short_repr(name)}")
        allowed_modules = _KNOWN_CLASSES.get(class_name)
        if allowed_modules is None:
            raise _refuse(
                f"unknown layer {short_repr(name)} of class {short_repr(class_name)}: the converter maps upstream's CNN "
                f"({', '.join(sorted(_KNOWN_CLASSES))}) and nothing else"
            )
        if entry.get("module") not in allowed_modules:
            raise _refuse(
                f"layer {short_repr(name)} is a {class_name} from module {short_repr(entry.get('module'))}, not "
                f"{' / '.join(allowed_modules)}: a different implementation may compute something else"
            )
        layer_config = entry.get("config")
        if not isinstance(layer_config, dict):
            layer_config = {}
        nodes = entry.get("inbound_nodes", [])
        if not isinstance(nodes, list) or len(nodes) > 1:
            raise _refuse(f"layer {short_repr(name)} is called {len(nodes) if isinstance(nodes, list) else '?'} times; "
                          "every layer of upstream's CNN is called once")
        inputs: list[str] = []
        args: list[Any] = []
        if nodes:
            node = nodes[0]
            if not isinstance(node, dict) or not isinstance(node.get("args"), list):
                raise _refuse(f"layer {short_repr(name)} has a call record {short_repr(node)} in a format other than "
                              "Keras 3's {args, kwargs}")
            args = node["args"]
            _keras_tensors(args, inputs)
            kwarg_tensors: list[str] = []
            _keras_tensors(node.get("kwargs") or {}, kwarg_tensors)
            if kwarg_tensors:
                raise _refuse(f"layer {short_repr(name)} takes tensors as keyword arguments; upstream's CNN never does")
        layers[name] = _Layer(index, name, class_name, layer_config, inputs, args)
    for layer in layers.values():
        for source in layer.inputs:
            if source not in layers:
                raise CorruptBundleError(
                    f"config.json layer {short_repr(layer.name)} reads the unknown layer {short_repr(source)}"
                )
    return layers


class _GraphWalk:
    """Walks the traced graph backwards from ``obj``, checking each layer against upstream's CNN."""

    def __init__(self, layers: dict[str, _Layer]) -> None:
        self.layers = layers
        self.visited: set[str] = set()

    def producer(self, layer: _Layer, count: int = 1) -> list[_Layer]:
        if len(layer.inputs) != count:
            raise _refuse(
                f"layer {short_repr(layer.name)} ({layer.class_name}) takes {len(layer.inputs)} input(s); upstream's CNN "
                f"feeds it {count}"
            )
        return [self.layers[name] for name in layer.inputs]

    def expect(self, layer: _Layer, class_name: str | tuple[str, ...], role: str) -> _Layer:
        classes = (class_name,) if isinstance(class_name, str) else class_name
        if layer.class_name not in classes:
            raise _refuse(
                f"unexpected graph: {role} should be a {' or '.join(classes)}, but layer {short_repr(layer.name)} is a "
                f"{layer.class_name}. The converter maps upstream's CNN (docs/bundle-format.md §9.6) only"
            )
        self.visited.add(layer.name)
        return layer


def _setting(layer: _Layer, key: str, expected: Any, role: str) -> None:
    value = layer.config.get(key)
    ok = value in expected if isinstance(expected, tuple) else value == expected  # a tuple lists alternatives
    if not ok:
        raise _refuse(
            f"unexpected graph: {role} (layer {short_repr(layer.name)}) has {key}={short_repr(value)}, upstream's CNN uses "
            f"{short_repr(expected)}"
        )


def _check_dtype_policy(layer: _Layer) -> None:
    policy = layer.config.get("dtype")
    name = (policy.get("config") or {}).get("name") if isinstance(policy, dict) else policy
    if name not in (None, "float32"):
        raise _refuse(f"layer {short_repr(layer.name)} computes in {short_repr(name)}, not float32 (mixed precision is not "
                      "reproduced by the float32 PyTorch network)")


def _check_conv(layer: _Layer, activation: str, role: str) -> None:
    _check_dtype_policy(layer)
    _setting(layer, "kernel_size", [3, 3], role)
    _setting(layer, "strides", [1, 1], role)
    _setting(layer, "padding", "same", role)
    _setting(layer, "data_format", "channels_last", role)
    _setting(layer, "dilation_rate", [1, 1], role)
    _setting(layer, "groups", 1, role)
    _setting(layer, "use_bias", True, role)
    _setting(layer, "activation", activation, role)
    filters = layer.config.get("filters")
    if isinstance(filters, bool) or not isinstance(filters, int) or filters < 1:
        raise _refuse(f"{role} (layer {short_repr(layer.name)}) has filters={short_repr(filters)}")


def _slice_of(layer: _Layer) -> tuple[Any, Any, Any]:
    """``(start, stop, step)`` of a ``GetItem`` written as ``x[..., start:stop:step]``."""
    key = layer.args[1] if len(layer.args) == 2 else None
    if (
        not isinstance(key, list)
        or len(key) != 2
        or not isinstance(key[0], dict)
        or key[0].get("class_name") != "__ellipsis__"
        or not isinstance(key[1], dict)
        or key[1].get("class_name") != "__slice__"
        or not isinstance(key[1].get("config"), dict)
    ):
        raise _refuse(f"unexpected graph: GetItem {short_repr(layer.name)} has the key {short_repr(key)}, not [..., a:b]")
    cfg = key[1]["config"]
    return cfg.get("start"), cfg.get("stop"), cfg.get("step")


@dataclass
class _Head:
    """One branch's last stage: layer names of its convs, the activation and the channel split."""

    centre_conv: str
    activation: str
    activation_scale: Any
    border_channels: int
    trunk_top: str
    border_convs: tuple[str, str, str] | None  # conv_up_block.conv1, conv_up_block.conv2, conv2


def _parse_head(walk: _GraphWalk, top: _Layer, N: int, branch: str) -> _Head:
    """One head, checked against upstream's last stage (t = the decoder trunk's output)::

        Add(ZeroPadding2D(Act(Conv(GetItem[..., :-c](t)))),
            Multiply(Silu(Conv(Up(Conv(Conv(GetItem[..., -c:](t)))))), CenterMaskLayer(border)))

    or the ``ZeroPadding2D`` part alone without ``probe.big``.
    """
    if top.class_name == "ActivationLayer":
        raise _refuse(
            f"the {branch} head ends in an activation without the centre/border split: an archive trained with "
            "pad_object=False, whose last stage (one Conv_Up_block -> conv -> activation path) has no PyTorch "
            "counterpart"
        )
    walk.expect(top, ("Add", "ZeroPadding2D"), f"the {branch} branch feeding obj")
    border_top: _Layer | None = None
    if top.class_name == "Add":
        pair = walk.producer(top, 2)
        classes = sorted(layer.class_name for layer in pair)
        if classes != ["Multiply", "ZeroPadding2D"]:
            raise _refuse(f"unexpected graph: the {branch} branch adds {classes}, upstream adds the padded centre "
                          "and the masked border")
        padded = next(layer for layer in pair if layer.class_name == "ZeroPadding2D")
        border_top = next(layer for layer in pair if layer.class_name == "Multiply")
    else:
        padded = top
    walk.expect(padded, "ZeroPadding2D", f"the {branch} centre padding")
    quarter = N // 4
    _setting(padded, "padding", [[quarter, quarter], [quarter, quarter]], f"the {branch} centre padding")
    _setting(padded, "data_format", "channels_last", f"the {branch} centre padding")
    (activation,) = walk.producer(padded)
    walk.expect(activation, "ActivationLayer", f"the {branch} centre activation")
    (centre_conv,) = walk.producer(activation)
    walk.expect(centre_conv, "Conv2D", f"the {branch} centre conv")
    _check_conv(centre_conv, "linear", f"the {branch} centre conv")
    (centre_slice,) = walk.producer(centre_conv)
    walk.expect(centre_slice, "GetItem", f"the {branch} centre channel slice")
    start, stop, step = _slice_of(centre_slice)
    if start is not None or step not in (None, 1) or isinstance(stop, bool) or not isinstance(stop, int) or stop >= 0:
        raise _refuse(f"unexpected graph: the {branch} centre takes channels [{short_repr(start)}:{short_repr(stop)}:"
                      f"{short_repr(step)}], upstream takes [..., :-c]")
    border_channels = -stop
    (trunk_top,) = walk.producer(centre_slice)
    border_convs = None
    if border_top is not None:
        factors = walk.producer(border_top, 2)
        silu = next((layer for layer in factors if layer.class_name == "Silu"), None)
        mask = next((layer for layer in factors if layer.class_name == "CenterMaskLayer"), None)
        if silu is None or mask is None:
            raise _refuse(f"unexpected graph: the {branch} border multiplies "
                          f"{sorted(layer.class_name for layer in factors)}, upstream multiplies Silu by a border mask")
        walk.expect(silu, "Silu", f"the {branch} border activation")
        walk.expect(mask, "CenterMaskLayer", f"the {branch} border mask")
        _setting(mask, "kind", "border", f"the {branch} border mask")
        _setting(mask, "N", N, f"the {branch} border mask")
        if walk.producer(mask)[0] is not silu:
            raise _refuse(f"unexpected graph: the {branch} border mask is not computed on the border activation")
        (conv2,) = walk.producer(silu)
        walk.expect(conv2, "Conv2D", f"the {branch} border conv2")
        _check_conv(conv2, "linear", f"the {branch} border conv2")
        (up,) = walk.producer(conv2)
        walk.expect(up, "UpSampling2D", f"the {branch} border up-sampling")
        _check_upsampling(up, f"the {branch} border up-sampling")
        (up_conv2,) = walk.producer(up)
        walk.expect(up_conv2, "Conv2D", f"the {branch} border conv_up_block.conv2")
        _check_conv(up_conv2, "relu", f"the {branch} border conv_up_block.conv2")
        (up_conv1,) = walk.producer(up_conv2)
        walk.expect(up_conv1, "Conv2D", f"the {branch} border conv_up_block.conv1")
        _check_conv(up_conv1, "relu", f"the {branch} border conv_up_block.conv1")
        (border_slice,) = walk.producer(up_conv1)
        walk.expect(border_slice, "GetItem", f"the {branch} border channel slice")
        b_start, b_stop, b_step = _slice_of(border_slice)
        if b_start != -border_channels or b_stop is not None or b_step not in (None, 1):
            raise _refuse(f"unexpected graph: the {branch} border takes channels [{short_repr(b_start)}:{short_repr(b_stop)}:"
                          f"{short_repr(b_step)}], the complement of the centre's [..., :{stop}] is [..., {stop}:]")
        if walk.producer(border_slice)[0] is not trunk_top:
            raise _refuse(f"unexpected graph: the {branch} centre and border read different decoder outputs")
        border_convs = (up_conv1.name, up_conv2.name, conv2.name)
    return _Head(
        centre_conv=centre_conv.name,
        activation=str(activation.config.get("activation_name")),
        activation_scale=activation.config.get("scale"),
        border_channels=border_channels,
        trunk_top=trunk_top.name,
        border_convs=border_convs,
    )


def _check_upsampling(layer: _Layer, role: str) -> None:
    _setting(layer, "size", [2, 2], role)
    _setting(layer, "interpolation", "nearest", role)
    _setting(layer, "data_format", "channels_last", role)


def _parse_levels(walk: _GraphWalk, top: _Layer, kind: str, branch: str) -> tuple[list[tuple[str, str]], _Layer]:
    """Levels ``[Up|Pool](Conv(relu)(Conv(relu)(previous)))`` from ``top`` down.

    Returns the (conv1, conv2) layer names per level, input side first, and the layer below the last level.
    """
    step_class, stop_classes = ("UpSampling2D", ("MaxPooling2D",)) if kind == "decoder" else (
        "MaxPooling2D", ("IntensityScaler",))
    levels: list[tuple[str, str]] = []
    layer = top
    while True:
        role = f"{branch} {kind} level {len(levels)} counting from the {'head' if kind == 'decoder' else 'bottleneck'}"
        walk.expect(layer, step_class, role)
        if step_class == "UpSampling2D":
            _check_upsampling(layer, role)
        else:
            _setting(layer, "pool_size", [2, 2], role)
            _setting(layer, "strides", ([2, 2], None), role)
            _setting(layer, "padding", ("same", "valid"), role)  # equal on the even sizes N/2**k
            _setting(layer, "data_format", "channels_last", role)
        (conv2,) = walk.producer(layer)
        walk.expect(conv2, "Conv2D", f"{role} conv2")
        _check_conv(conv2, "relu", f"{role} conv2")
        (conv1,) = walk.producer(conv2)
        walk.expect(conv1, "Conv2D", f"{role} conv1")
        _check_conv(conv1, "relu", f"{role} conv1")
        levels.append((conv1.name, conv2.name))
        (below,) = walk.producer(conv1)
        if below.class_name in stop_classes:
            return levels[::-1], below
        if len(levels) >= 8:
            raise _refuse(f"unexpected graph: the {branch} {kind} has more than 8 levels (upstream: at most 5)")
        layer = below


@dataclass
class _GraphPlan:
    """What the graph says: sizes, settings and which Conv2D layer feeds which torch key."""

    N: int
    channels: int
    n_filters_scale: int
    out_channels: int
    border_channels: int
    probe_big: bool
    amp_activation_tf: str
    conv_roles: "OrderedDict[str, str]"  # torch key prefix (without .weight/.bias) -> config layer name
    border_prefixes: tuple[str, ...]


def _trace_graph(layers: dict[str, _Layer]) -> _GraphPlan:
    walk = _GraphWalk(layers)
    combines = [layer for layer in layers.values() if layer.class_name == "CombineComplexLayer"]
    if len(combines) != 1:
        raise _refuse(f"unexpected graph: {len(combines)} CombineComplexLayer layers (upstream's obj is one)")
    (obj,) = combines
    walk.expect(obj, "CombineComplexLayer", "obj")
    use_polar = obj.config.get("use_polar")
    if use_polar is not True:
        raise _refuse(f"obj has use_polar={short_repr(use_polar)}: {_RECTANGULAR_ERA}")
    amp_top, phase_top = walk.producer(obj, 2)

    # N first: the padding and mask checks need it. The input is found by walking the amp branch's first inputs.
    inputs = [layer for layer in layers.values() if layer.class_name == "IntensityScaler"]
    if len(inputs) != 1:
        raise _refuse(f"unexpected graph: {len(inputs)} IntensityScaler layers (upstream scales its one input once)")
    (scaler,) = inputs
    walk.expect(scaler, "IntensityScaler", "the input scaler")
    (input_layer,) = walk.producer(scaler)
    walk.expect(input_layer, "InputLayer", "the diffraction input")
    shape = input_layer.config.get("batch_shape")
    if (
        not isinstance(shape, list)
        or len(shape) != 4
        or shape[0] is not None
        or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape[1:])
        or shape[1] != shape[2]
    ):
        raise _refuse(f"the diffraction input has shape {short_repr(shape)}, not (None, N, N, C)")
    N, channels = shape[1], shape[3]
    if N not in (64, 128, 256):
        raise _refuse(f"N={short_repr(N)}: the PyTorch CNN supports N = 64, 128, 256 only")
    gridsize = math.isqrt(channels) if channels > 0 else 0
    if gridsize < 1 or gridsize * gridsize != channels:
        raise _refuse(f"the input has {short_repr(channels)} channels, not gridsize**2")

    amp = _parse_head(walk, amp_top, N, "amplitude")
    phase = _parse_head(walk, phase_top, N, "phase")
    if (amp.border_convs is None) != (phase.border_convs is None):
        raise _refuse("unexpected graph: one head has a border path and the other has none (probe.big applies to "
                      "both in upstream's CNN)")
    if amp.border_channels != phase.border_channels:
        raise _refuse(f"unexpected graph: the heads split {amp.border_channels} and {phase.border_channels} "
                      "channels to their border paths")
    _check_activations(amp, phase)

    trunks = []
    for head, branch in ((amp, "amplitude"), (phase, "phase")):
        levels, bottleneck = _parse_levels(walk, layers[head.trunk_top], "decoder", branch)
        trunks.append((levels, bottleneck))
    if trunks[0][1] is not trunks[1][1]:
        raise _refuse("unexpected graph: the two decoders read different encoder outputs")
    encoder_levels, stop = _parse_levels(walk, trunks[0][1], "encoder", "the")
    if stop is not scaler:
        raise _refuse("unexpected graph: the encoder does not start at the input scaler")
    depth = encoder_depth(N)
    if len(encoder_levels) != depth or any(len(levels) != depth - 1 for levels, _ in trunks):
        raise _refuse(
            f"unexpected graph: {len(encoder_levels)} encoder and {[len(t[0]) for t in trunks]} decoder levels; at "
            f"N={N} upstream's CNN has {depth} and {depth - 1}"
        )

    last_encoder = layers[encoder_levels[-1][1]].config["filters"]
    if last_encoder % 128:
        raise _refuse(f"the last encoder level has {last_encoder} filters, not 128 * n_filters_scale")
    n_filters_scale = last_encoder // 128
    out_channels = layers[amp.centre_conv].config["filters"]
    if layers[phase.centre_conv].config["filters"] != out_channels:
        raise _refuse("unexpected graph: the amplitude and phase heads have different channel counts")
    if out_channels != channels:
        if out_channels == 1:
            raise _refuse(
                f"the heads emit 1 channel for {channels} input channels: an object.big=False model at gridsize "
                f"{gridsize}, for which the PyTorch CNN has no exact counterpart"
            )
        raise _refuse(f"the heads emit {out_channels} channels for {channels} input channels")

    roles: OrderedDict[str, str] = OrderedDict()
    for i, (conv1, conv2) in enumerate(encoder_levels):
        roles[f"model.autoencoder.encoder.blocks.{i}.conv1"] = conv1
        roles[f"model.autoencoder.encoder.blocks.{i}.conv2"] = conv2
    border_prefixes: list[str] = []
    for (levels, _), head, decoder, head_name in ((trunks[0], amp, "decoder_amp", "amp"),
                                                  (trunks[1], phase, "decoder_phase", "phase")):
        for j, (conv1, conv2) in enumerate(levels):
            roles[f"model.autoencoder.{decoder}.blocks.{j}.conv1"] = conv1
            roles[f"model.autoencoder.{decoder}.blocks.{j}.conv2"] = conv2
        prefix = f"model.autoencoder.{decoder}.{head_name}"
        roles[f"{prefix}.conv1"] = head.centre_conv
        border = (f"{prefix}.conv_up_block.conv1", f"{prefix}.conv_up_block.conv2", f"{prefix}.conv2")
        border_prefixes.extend(border)
        if head.border_convs is not None:
            roles.update(zip(border, head.border_convs))

    stray = [layer.name for layer in layers.values() if layer.class_name == "Conv2D" and layer.name not in walk.visited]
    if stray:
        raise _refuse(f"unexpected graph: Conv2D layers {short_repr(stray)} are not on upstream's CNN path to obj")
    return _GraphPlan(
        N=N,
        channels=channels,
        n_filters_scale=n_filters_scale,
        out_channels=out_channels,
        border_channels=amp.border_channels,
        probe_big=amp.border_convs is not None,
        amp_activation_tf=amp.activation,
        conv_roles=roles,
        border_prefixes=tuple(border_prefixes),
    )


def _check_activations(amp: _Head, phase: _Head) -> None:
    name = amp.activation
    if name in ("relu", "softplus"):
        raise _refuse(
            f"amp_activation={name!r}: upstream's PyTorch CNN applies SiLU for every amplitude activation other "
            "than 'sigmoid', so the converted centre path would differ by up to max|relu - silu| = 0.2785 "
            "(docs/bundle-format.md §9.9). Only 'sigmoid' and 'swish' archives convert exactly"
        )
    if name not in ("sigmoid", "swish", "silu"):
        raise _refuse(f"amp_activation={short_repr(name)} is not one the PyTorch CNN computes ('sigmoid', 'swish')")
    if amp.activation_scale not in (None, 1, 1.0):
        raise _refuse(f"the amplitude activation is scaled by {short_repr(amp.activation_scale)}; the PyTorch CNN does not "
                      "scale it")
    scale = phase.activation_scale
    if (
        phase.activation != "tanh"
        or isinstance(scale, bool)
        or not isinstance(scale, (int, float))
        or abs(scale - math.pi) > 1e-12
    ):
        raise _refuse(f"the phase activation is {short_repr(phase.activation)} x {short_repr(scale)}; the PyTorch CNN "
                      "computes pi * tanh")


def _torch_settings(plan: _GraphPlan, object_big: bool) -> dict[str, Any]:
    """The NetworkConfig fields the TF network implies (docs/bundle-format.md §9.7)."""
    settings: dict[str, Any] = {
        "N": plan.N,
        "C_model": plan.channels,
        "n_filters_scale": plan.n_filters_scale,
        "object_big": object_big,
        "probe_big": plan.probe_big,
        "amp_activation": "sigmoid" if plan.amp_activation_tf == "sigmoid" else "silu",
        "mode": "Unsupervised",
        "architecture": "cnn",
        "cnn_output_mode": "amp_phase",
        "use_shared_decoder": False,
        "batch_norm": False,
        "cbam_encoder": False,
        "cbam_bottleneck": False,
        "intensity_scale_trainable": False,
    }
    width = 32 * plan.n_filters_scale
    if plan.border_channels != plan.out_channels:
        # TF sends the last c trunk channels to the border path; the torch default sends out_channels. The legacy
        # override routes floor(32 s * f) channels: f = (c + 0.5) / (32 s) gives exactly c
        # (docs/bundle-format.md §8.5.7).
        if not 1 <= plan.border_channels <= width // 2 - 1:
            raise _refuse(f"the heads route {plan.border_channels} of {width} channels to the border path; the PyTorch "
                          f"head can route 1..{width // 2 - 1} besides its default")
        settings.update(
            use_legacy_decoder_channel_override=True,
            decoder_last_c_outer_fraction=(plan.border_channels + 0.5) / width,
            decoder_last_amp_channels=plan.out_channels,
        )
    return settings


# ----------------------------------------------------------------------------------------------------------------
# HDF5 on in-memory bytes
# ----------------------------------------------------------------------------------------------------------------
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


# ----------------------------------------------------------------------------------------------------------------
# Reading an archive
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class TensorFlowArchive:
    """A decoded TF archive and the PyTorch network it converts to (nothing written yet).

    Attributes:
        path: the archive read.
        sha256: hex digest of the archive's bytes.
        size_bytes: the archive's size.
        manifest: the decoded ``manifest.dill``.
        params: the ``diffraction_to_obj/params.dill`` snapshot as stored (a TF probe decoded to numpy).
        intensity_scale: the physics scaling constant (``params.dill`` and ``model.h5`` agree on it).
        keras_metadata: ``model.keras``'s ``metadata.json`` (``keras_version``, ``date_saved``).
        network_config: the torch configuration the TF network implies.
        state_dict: the converted ``diffraction_to_obj`` weights (float32 CPU tensors, strict-loadable).
        h5_sources: torch key -> ``model.weights.h5`` dataset it came from.
        zero_padded_keys: keys whose TF tensor was embedded in a larger zero tensor (border path at N > 64).
        keys_without_source: keys the TF network has no counterpart for (unused by inference): the
            ``forward_model`` scalars (ones, their upstream init) and, without ``probe.big``, the border-path
            head keys (zeros).
    """

    path: Path
    sha256: str
    size_bytes: int
    manifest: dict[str, Any]
    params: dict[str, Any]
    intensity_scale: float
    keras_metadata: dict[str, Any]
    network_config: NetworkConfig
    state_dict: "OrderedDict[str, torch.Tensor]"
    h5_sources: dict[str, str] = field(default_factory=dict)
    zero_padded_keys: list[str] = field(default_factory=list)
    keys_without_source: list[str] = field(default_factory=list)

    def build_network(self) -> PtychoPINNNetwork:
        """The converted network in eval mode on the CPU (strict load; the tensors are copied)."""
        network = PtychoPINNNetwork(self.network_config)
        network.load_state_dict(self.state_dict, strict=True)
        return network.eval()


def _check_directory(path: Path) -> None:
    """A folder given instead of the zip: name what it holds (an extracted or SavedModel-era archive)."""
    if not path.is_dir() or (path / "wts.h5.zip").exists():
        return
    info = identify_artifact(path)
    if info.kind is ArtifactKind.TENSORFLOW_ARCHIVE and info.older_era:
        raise _refuse(f"{path} is a SavedModel directory: {SAVEDMODEL_ERA_DESCRIPTION}")
    raise NotABundleError(f"{info.sentence()}; the converter reads the TensorFlow wts.h5.zip archive")


def _check_members(archive: _InMemoryArchive) -> None:
    """Name what the archive is when it has no ``model.keras`` to convert: a PyTorch bundle or an older era."""
    names = archive.names
    if KERAS_MEMBER in archive:
        return
    if f"{INFERENCE_MODEL}/model.pth" in archive:
        raise _refuse(f"{archive.path} is already a PyTorch bundle (it holds {INFERENCE_MODEL}/model.pth); load it "
                      "with load_torch_bundle, there is nothing to convert")
    if any(name.startswith(f"{INFERENCE_MODEL}/") and name.endswith("saved_model.pb") for name in names):
        raise _refuse(f"{archive.path} holds a SavedModel directory for {INFERENCE_MODEL}: {SAVEDMODEL_ERA_DESCRIPTION}")
    raise CorruptBundleError(
        f"{archive.path} lacks {KERAS_MEMBER} (members: {short_repr(sorted(names)[:12])}); TF archives hold one "
        "model.keras per model since f32b85f (2025-07-28)"
    )


def _decode_manifest(archive: _InMemoryArchive) -> dict[str, Any]:
    if MANIFEST_MEMBER not in archive:
        raise CorruptBundleError(f"{archive.path} has no manifest.dill: not a PtychoPINN archive (members: "
                                 f"{short_repr(sorted(archive.names)[:10])})")
    manifest = safe_loads(archive.read_capped(MANIFEST_MEMBER, _MAX_MANIFEST_BYTES), member=MANIFEST_MEMBER,
                          allow_unsafe=False)
    if not isinstance(manifest, dict):
        raise CorruptBundleError(f"manifest.dill must hold a dict, got {type(manifest).__name__}")
    version = manifest.get("version")
    if version != TF_ARCHIVE_VERSION:
        raise _refuse(f"manifest version {short_repr(version)} is not the TF archive version {TF_ARCHIVE_VERSION!r}")
    models = manifest.get("models")
    if not isinstance(models, list) or INFERENCE_MODEL not in models:
        raise CorruptBundleError(f"manifest.dill lists the models {short_repr(models)}, without {INFERENCE_MODEL!r}")
    return manifest


def _read_json(archive: _InMemoryArchive, name: str, cap: int) -> Any:
    raw = archive.read_capped(name, cap)
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise CorruptBundleError(f"{archive.path}/{name} is not valid JSON: {type(exc).__name__}: "
                                 f"{str(exc)[:200]}") from exc


def _keras_metadata(archive: _InMemoryArchive) -> dict[str, Any]:
    metadata = _read_json(archive, "metadata.json", _MAX_METADATA_JSON_BYTES)
    if not isinstance(metadata, dict):
        raise CorruptBundleError(f"{archive.path}/metadata.json must hold an object")
    version = metadata.get("keras_version")
    if not isinstance(version, str):
        raise CorruptBundleError(f"{archive.path}/metadata.json has no keras_version string")
    major = version.split(".", 1)[0]
    if not major.isdigit() or int(major) < 3:
        raise _refuse(f"model.keras was written by Keras {short_repr(version)}: Keras 2 .keras files lay their weights out "
                      "differently, and only Keras 3 archives (upstream since f32b85f) are mapped")
    kept: dict[str, Any] = {}
    for key, value in list(metadata.items())[:32]:  # provenance: short plain values only
        if isinstance(value, str) and len(value) <= 200 or isinstance(value, (bool, int)):
            kept[str(key)[:64]] = value
        elif isinstance(value, float) and math.isfinite(value):
            kept[str(key)[:64]] = value
    return kept


def _decode_params(archive: _InMemoryArchive) -> dict[str, Any]:
    raw = archive.read_capped(PARAMS_MEMBER, _MAX_PARAMS_BYTES)
    params = safe_loads(raw, member=PARAMS_MEMBER, allow_unsafe=False, allow_tensorflow_tensors=True)
    try:
        validate_params_snapshot(params, source=PARAMS_MEMBER)
    except ConfigMismatchError:
        raise
    except Exception as exc:  # noqa: BLE001 - odd values in plain data
        raise ConfigMismatchError(f"{PARAMS_MEMBER}: invalid value ({type(exc).__name__}: {str(exc)[:200]})") from exc
    return dict(params)


def _check_params_agree(params: Mapping[str, Any], plan: _GraphPlan) -> bool:
    """Cross-check the snapshot with the graph; returns the object.big the torch network should carry."""
    if params.get("model_type", "pinn") != "pinn":
        raise _refuse(f"params.dill model_type={short_repr(params.get('model_type'))}: only PINN ('pinn') archives are "
                      "mapped (a supervised TF graph was not verified)")
    if params.get("pad_object", True) is not True:
        raise _refuse("params.dill has pad_object=False, whose last stage has no PyTorch counterpart")
    gridsize = math.isqrt(plan.channels)
    object_big = params.get("object.big", True)
    checks = [
        ("N", params.get("N"), plan.N),
        ("gridsize", params.get("gridsize"), gridsize),
        ("n_filters_scale", params.get("n_filters_scale", plan.n_filters_scale), plan.n_filters_scale),
        ("probe.big", params.get("probe.big", plan.probe_big), plan.probe_big),
        ("amp_activation", params.get("amp_activation", plan.amp_activation_tf), plan.amp_activation_tf),
    ]
    for key, stored, graph in checks:
        if stored != graph:
            raise ConfigMismatchError(
                f"{PARAMS_MEMBER}[{key!r}]={short_repr(stored)} disagrees with the network in model.keras "
                f"({key}={graph!r}); the archive's parts come from different models, so it is not converted"
            )
    if not isinstance(object_big, bool):
        raise ConfigMismatchError(f"{PARAMS_MEMBER}['object.big'] must be bool, got {short_repr(object_big)}")
    if not object_big and gridsize > 1:
        raise _refuse(f"object.big=False at gridsize {gridsize} has no exact PyTorch counterpart")
    return object_big


def _intensity_scale(params: Mapping[str, Any], attribute: float) -> float:
    stored = params.get("intensity_scale")
    if stored is None:
        raise ConfigMismatchError(f"{PARAMS_MEMBER} lacks intensity_scale (upstream's saver always writes it)")
    value = float(stored)
    if not (math.isfinite(value) and value > 0 and math.isfinite(attribute)):
        raise ConfigMismatchError(f"intensity_scale={short_repr(stored)} must be a finite number > 0")
    if value != attribute:
        raise ConfigMismatchError(
            f"{PARAMS_MEMBER} intensity_scale={value!r} disagrees with {MODEL_H5_MEMBER}@intensity_scale="
            f"{attribute!r}; upstream writes the same value to both"
        )
    return value


def read_tf_archive(path: PathLike, *, limits: BundleLimits = DEFAULT_LIMITS) -> TensorFlowArchive:
    """Decode a TF archive and map its ``diffraction_to_obj`` network onto the PyTorch CNN, writing nothing.

    Args:
        path: the TF ``wts.h5.zip`` (or its base ``wts.h5``, or a folder holding it).
        limits: zip caps (members, sizes, compression ratio) for the archive and the nested ``model.keras``.

    Returns:
        The decoded archive with the converted configuration and state_dict.

    Raises:
        TensorFlowConversionError: the archive is from an era or uses a setting that has no exact PyTorch
            counterpart, or its graph is not upstream's CNN (the message says which).
        UnsafeBundleError, CorruptBundleError, NotABundleError, ConfigMismatchError: hostile, damaged or
            inconsistent input.
    """
    given = Path(os.fspath(path)).expanduser()
    _check_directory(given)
    source = resolve_bundle_path(given)
    data = _read_source(source, limits)
    digest = hashlib.sha256(data).hexdigest()
    outer = _InMemoryArchive(data, source, limits)
    try:
        _check_members(outer)
        manifest = _decode_manifest(outer)
        keras_bytes = outer.read(KERAS_MEMBER)
        params = _decode_params(outer)
        scale_attr = _read_intensity_scale_attr(outer.read_capped(MODEL_H5_MEMBER, _MAX_MODEL_H5_BYTES))
    finally:
        outer.close()
    inner = _open_nested_zip(keras_bytes, source / KERAS_MEMBER, limits)
    try:
        keras_metadata = _keras_metadata(inner)
        layers = _parse_layers(_read_json(inner, "config.json", _MAX_CONFIG_JSON_BYTES))
        weights_bytes = inner.read("model.weights.h5")
    finally:
        inner.close()
    del keras_bytes

    plan = _trace_graph(layers)
    object_big = _check_params_agree(params, plan)
    intensity_scale = _intensity_scale(params, scale_attr)
    settings = _torch_settings(plan, object_big)
    try:
        config = NetworkConfig(**settings, intensity_scale=intensity_scale)
    except PtychoFlavorError as exc:
        raise _refuse(f"the implied PyTorch configuration is invalid: {exc}") from exc
    with torch.device("meta"):
        layout = PtychoPINNNetwork(config).state_dict()
    torch_bytes = sum(t.numel() * t.element_size() for t in layout.values())
    if torch_bytes > 2 * len(weights_bytes) + 16 * 1024**2:
        raise _refuse(f"the implied PyTorch network needs {torch_bytes} bytes of weights, far more than the "
                      f"{len(weights_bytes)}-byte weights file holds")
    weights = _read_conv_weights(weights_bytes, layers, plan, layout)

    state_dict: OrderedDict[str, torch.Tensor] = OrderedDict()
    without_source: list[str] = []
    for key, meta in layout.items():
        array = weights.tensors.get(key)
        if array is not None:
            state_dict[key] = torch.from_numpy(array)
        elif key.startswith("model.forward_model."):
            state_dict[key] = torch.ones(meta.shape, dtype=meta.dtype)  # upstream's init; training physics only
            without_source.append(key)
        elif key.rsplit(".", 1)[0] in plan.border_prefixes and not plan.probe_big:
            state_dict[key] = torch.zeros(meta.shape, dtype=meta.dtype)  # border path unused without probe.big
            without_source.append(key)
        else:
            raise _refuse(f"the PyTorch CNN has {key} with no TensorFlow source; the mapping is incomplete")
    return TensorFlowArchive(
        path=source,
        sha256=digest,
        size_bytes=len(data),
        manifest=manifest,
        params=params,
        intensity_scale=intensity_scale,
        keras_metadata=keras_metadata,
        network_config=config,
        state_dict=state_dict,
        h5_sources=dict(weights.sources),
        zero_padded_keys=list(weights.padded),
        keys_without_source=without_source,
    )


# ----------------------------------------------------------------------------------------------------------------
# Conversion and detection
# ----------------------------------------------------------------------------------------------------------------
def _package_version() -> str:
    try:
        from importlib.metadata import version

        return version("mlflow-ptycho-flavor")
    except Exception:  # noqa: BLE001 - not installed (source checkout)
        return "unknown"


def _torch_params(archive: TensorFlowArchive) -> dict[str, Any]:
    """The TF params snapshot, kept as far as it describes the converted network.

    Every key is kept (the probe as a numpy array) except ``_version`` (the saver writes the PyTorch version);
    ``backend`` becomes ``'pytorch'`` and ``amp_activation`` the torch name (``'swish'`` -> ``'silu'``, the same
    function); ``intensity_scale.trainable`` is set from the network by the saver (False: the converted network
    honours the caller's factor). The TF values are recorded in the provenance.
    """
    params = dict(archive.params)
    params.pop("_version", None)
    params["backend"] = "pytorch"
    params["amp_activation"] = archive.network_config.amp_activation
    return params


def _provenance(archive: TensorFlowArchive) -> dict[str, Any]:
    params = archive.params
    return {
        "converted_from": "tensorflow",
        "converter": f"mlflow-ptycho-flavor {_package_version()} (convert.tensorflow.convert_tf_bundle)",
        "source": {
            "file_name": archive.path.name,
            "sha256": archive.sha256,
            "size_bytes": archive.size_bytes,
            "archive_version": TF_ARCHIVE_VERSION,
            "model": INFERENCE_MODEL,
            "keras_version": archive.keras_metadata.get("keras_version"),
            "keras_date_saved": archive.keras_metadata.get("date_saved"),
            # Keras 3 records no TensorFlow version in the archive; kept as None unless its metadata names one.
            "tensorflow_version": archive.keras_metadata.get("tensorflow_version"),
            "keras_metadata": dict(archive.keras_metadata),
            "params_version": params.get("_version") if isinstance(params.get("_version"), str) else None,
            "params_backend": params.get("backend") if isinstance(params.get("backend"), str) else None,
            "amp_activation": params.get("amp_activation"),
            "intensity_scale_trainable": bool(params.get("intensity_scale.trainable", False)),
            "intensity_scale": archive.intensity_scale,
        },
        "mapping": {
            "h5_datasets": dict(archive.h5_sources),
            "zero_padded_keys": list(archive.zero_padded_keys),
            "keys_without_source": list(archive.keys_without_source),
            "border_channels": _border_channels(archive.network_config),
            "input_convention": (
                "normalized amplitudes (what TF's IntensityScaler outputs) with input_scale_factor 1; the TF model "
                "took x * intensity_scale and divided by exp(log_scale) inside"
            ),
        },
    }


def _border_channels(config: NetworkConfig) -> int:
    if config.use_legacy_decoder_channel_override:
        return max(1, int(math.floor(32 * config.n_filters_scale * min(config.decoder_last_c_outer_fraction, 0.5))))
    return config.channels


def convert_tf_bundle(
    src: PathLike | TensorFlowArchive, dst: PathLike, *, limits: BundleLimits = DEFAULT_LIMITS
) -> Path:
    """Convert a TensorFlow PtychoPINN archive into a PyTorch ``wts.h5.zip``, exact to float32 rounding.

    The output is in upstream's PyTorch layout (``manifest.dill``, ``diffraction_to_obj/{model.pth, params.dill}``,
    ``autoencoder/{model.pth, params.dill}`` with the sentinel) **with** ``torch_scaling_metadata.pt``: the torch
    settings the TF network implies are not in ``params.dill``, and without them upstream's loader would rebuild
    another network. The TF params snapshot is kept (see :func:`_torch_params`), and ``manifest["provenance"]``
    records the source's sha256, the Keras version and the mapping. Feed the converted network the normalized
    amplitudes the TF CNN saw, with an input scale factor of 1.

    Args:
        src: the TF ``wts.h5.zip`` (or its base ``wts.h5``, or a folder holding it), or a
            :class:`TensorFlowArchive` already read.
        dst: where to write: ``out/wts.h5.zip``, ``out/wts.h5`` or an existing folder. Written atomically.
        limits: zip caps for the source archive and its nested ``model.keras``.

    Returns:
        The path of the bundle written.

    Raises:
        TensorFlowConversionError: no exact PyTorch counterpart (the message names the era or setting), or ``dst``
            is the source itself.
        UnsafeBundleError, CorruptBundleError, NotABundleError, ConfigMismatchError: hostile, damaged or
            inconsistent input.
    """
    archive = src if isinstance(src, TensorFlowArchive) else read_tf_archive(src, limits=limits)
    target = resolve_bundle_path(dst, for_writing=True)
    if target.exists() and os.path.samefile(target, archive.path):
        raise _refuse(f"the destination {target} is the source archive itself; writing there would replace it")
    network = PtychoPINNNetwork.from_state_dict(archive.network_config, OrderedDict(archive.state_dict))
    return save_torch_bundle(
        network,
        target,
        config=_torch_params(archive),
        intensity_scale=archive.intensity_scale,
        provenance=_provenance(archive),
    )
