"""Tracing the Keras Functional graph in ``config.json`` back from ``obj`` and checking it is upstream's CNN.

Every layer's class, module and settings are checked against upstream's CNN; anything else is refused
(:class:`~mlflow_ptycho_flavor.errors.TensorFlowConversionError`) rather than approximated (docs/bundle-format.md §9).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from mlflow_ptycho_flavor.convert.tensorflow.archive import _refuse
from mlflow_ptycho_flavor.errors import CorruptBundleError, UnsafeBundleError, short_repr
from mlflow_ptycho_flavor.network import encoder_depth

_MAX_LAYERS = 4096

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

