"""TensorFlow archive -> PyTorch bundle conversion (``mlflow_ptycho_flavor.convert.tensorflow``), with no TensorFlow.

Reference data: three archives written by upstream PtychoPINN's own TF code (``tests/data/tensorflow``, see its
README and NOTES), each with the TF ``obj`` layer's output recorded on fixed inputs.

Tolerance for converted-vs-TF outputs: ``1e-4 * max|obj|``. Both frameworks compute in float32 with different
conv kernels; the fixture README measures TF's own float32 output up to 9.2e-5 away from the exact (float64)
result at max|obj| = 8.79, i.e. ~1e-5 relative, and the converted network sits at the same distance. 1e-4
relative leaves 10x margin for kernel choice, while the smallest effect of reverting any single TF weight tensor
is >= 1e-2 absolute (>= 1.2e-2 relative) - 100x above the bound - so a misplaced, mis-transposed or missing
tensor fails. Bitwise comparisons are made only between values computed in the same run (weights: against the
sha256 of the HWIO bytes recorded in each ``meta.json``).

Variants the shared set lacks (swish, ``probe.big=False``, N=128/256) are built here: either by editing a fixture's
``config.json`` / weights in memory, or with :func:`_graph_config`, which emits upstream's graph (its structure
is checked against the real fixtures). Their reference is :func:`_interpret_obj`, an independent float64
evaluation of the Keras graph layer by layer (TF semantics from the fixture README), itself validated against the
recorded TF outputs of every fixture.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import io
import json
import math
import os
import pickle
import struct
import sys
import zipfile
from pathlib import Path
from typing import Any, Callable

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mlflow_ptycho_flavor.bundle import (
    BundleLimits,
    load_torch_bundle,
    read_bundle,
    save_torch_bundle,
)
from mlflow_ptycho_flavor.errors import (
    ConfigMismatchError,
    CorruptBundleError,
    InvalidArgumentError,
    NotABundleError,
    PtychoFlavorError,
    TensorFlowConversionError,
    UnsafeBundleError,
    UnsupportedBundleError,
)
from mlflow_ptycho_flavor.network import NetworkConfig, PtychoPINNNetwork
from mlflow_ptycho_flavor.bundle.identify import ArtifactKind, identify_artifact
from mlflow_ptycho_flavor.bundle.unpickle import safe_loads
from mlflow_ptycho_flavor.convert.tensorflow import convert_tf_bundle, read_tf_archive

DATA = Path(__file__).resolve().parent / "data" / "tensorflow"
FIXTURES = ["tf_n64_g1_s1_probe_tensor", "tf_n64_g1_s2_default", "tf_n64_g2_s1"]
SMALL = "tf_n64_g1_s1_probe_tensor"  # n_filters_scale 1: the cheapest base for edited archives
RELATIVE_TOL = 1e-4
UPSTREAM_TORCH_MEMBERS = {
    "manifest.dill",
    "diffraction_to_obj/model.pth",
    "diffraction_to_obj/params.dill",
    "autoencoder/model.pth",
    "autoencoder/params.dill",
    "torch_scaling_metadata.pt",
}


def _io(name: str) -> dict[str, np.ndarray]:
    with np.load(DATA / name / "io.npz") as data:
        return {key: data[key] for key in data.files}


def _meta(name: str) -> dict[str, Any]:
    return json.loads((DATA / name / "meta.json").read_text())


def _predict(network: PtychoPINNNetwork, x_nchw: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return network(torch.from_numpy(x_nchw), torch.ones(x_nchw.shape[0], 1, 1, 1)).numpy()


def _assert_close(got: np.ndarray, reference: np.ndarray) -> None:
    assert got.shape == reference.shape and got.dtype == np.complex64
    bound = RELATIVE_TOL * float(np.abs(reference).max())
    err = float(np.abs(got - reference).max())
    assert err <= bound, f"max |converted - reference| = {err:.3g} > {bound:.3g}"


# ----------------------------------------------------------------------------------------------------------------
# Archive parts: read a fixture, edit it in memory, write it back in upstream's layout
# ----------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Parts:
    """An archive's pieces; weights are keyed by config.json layer name (read via the h5 ``vars@name`` attribute)."""

    outer: dict[str, bytes]
    config: dict[str, Any]
    metadata: dict[str, Any]
    weights: dict[str, list[np.ndarray]]
    params: dict[str, Any] | None  # None: keep outer's params.dill bytes as they are
    intensity_scale_attr: float


@pytest.fixture(scope="module")
def fixture_parts() -> Callable[[str], Parts]:
    cache: dict[str, Parts] = {}

    def get(name: str) -> Parts:
        if name not in cache:
            cache[name] = _read_parts(DATA / name / "wts.h5.zip")
        return copy.deepcopy(cache[name])

    return get


def _read_parts(path: Path) -> Parts:
    with zipfile.ZipFile(path) as outer:
        members = {name: outer.read(name) for name in outer.namelist()}
    with zipfile.ZipFile(io.BytesIO(members["diffraction_to_obj/model.keras"])) as inner:
        config = json.loads(inner.read("config.json"))
        metadata = json.loads(inner.read("metadata.json"))
        weights_bytes = inner.read("model.weights.h5")
    weights: dict[str, list[np.ndarray]] = {}
    with h5py.File(io.BytesIO(weights_bytes), "r") as handle:
        for group in handle["layers"].values():
            variables = group.get("vars")
            if variables is not None and "0" in variables:
                weights[variables.attrs["name"]] = [variables["0"][()], variables["1"][()]]
    with h5py.File(io.BytesIO(members["diffraction_to_obj/model.h5"]), "r") as handle:
        scale = float(handle.attrs["intensity_scale"])
    return Parts(members, config, metadata, weights, None, scale)


def _layers(parts: Parts) -> list[dict[str, Any]]:
    return parts.config["config"]["layers"]


def _layer(parts: Parts, name: str) -> dict[str, Any]:
    return next(entry for entry in _layers(parts) if entry["name"] == name)


def _conv_names(config: dict[str, Any]) -> list[str]:
    return [entry["name"] for entry in config["config"]["layers"] if entry["class_name"] == "Conv2D"]


def _weights_h5(config: dict[str, Any], weights: dict[str, list[np.ndarray]],
                mutate: Callable[[h5py.File], None] | None = None) -> bytes:
    """``model.weights.h5`` as Keras 3 lays it out: the k-th Conv2D of config.json in ``layers/conv2d_k``."""
    buffer = io.BytesIO()
    with h5py.File(buffer, "w") as handle:
        handle.create_group("vars")
        for k, name in enumerate(_conv_names(config)):
            variables = handle.create_group(f"layers/{'conv2d' if k == 0 else f'conv2d_{k}'}/vars")
            variables.attrs["name"] = name
            kernel, bias = weights[name]
            variables.create_dataset("0", data=kernel)
            variables.create_dataset("1", data=bias)
        if mutate is not None:
            mutate(handle)
    return buffer.getvalue()


def _stored_zip(entries: dict[str, bytes], compression: int = zipfile.ZIP_STORED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=compression, compresslevel=1 if compression else None) as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def _model_h5(scale: float) -> bytes:
    buffer = io.BytesIO()
    with h5py.File(buffer, "w") as handle:
        handle.attrs["intensity_scale"] = np.float64(scale)
    return buffer.getvalue()


def _write(parts: Parts, path: Path, *, weights_h5: bytes | None = None, keras: bytes | None = None,
           outer_overrides: dict[str, bytes | None] | None = None) -> Path:
    """Write ``parts`` as a TF archive (outer members deflated, model.keras members stored, as upstream does)."""
    if keras is None:
        keras = _stored_zip({
            "metadata.json": json.dumps(parts.metadata).encode(),
            "config.json": json.dumps(parts.config).encode(),
            "model.weights.h5": weights_h5 if weights_h5 is not None else _weights_h5(parts.config, parts.weights),
        })
    members = dict(parts.outer)
    members["diffraction_to_obj/model.keras"] = keras
    members["diffraction_to_obj/model.h5"] = _model_h5(parts.intensity_scale_attr)
    if parts.params is not None:
        members["diffraction_to_obj/params.dill"] = pickle.dumps(parts.params, protocol=4)
    for name, data in (outer_overrides or {}).items():
        if data is None:
            members.pop(name, None)
        else:
            members[name] = data
    path.write_bytes(_stored_zip(members, zipfile.ZIP_DEFLATED))
    return path


def _decode_params(raw: bytes) -> dict[str, Any]:
    """A TF params.dill decoded by the package's restricted unpickler (an EagerTensor probe arrives as numpy)."""
    return safe_loads(raw, member="params.dill", allow_unsafe=False, allow_tensorflow_tensors=True)


def _params(parts: Parts) -> dict[str, Any]:
    return _decode_params(parts.outer["diffraction_to_obj/params.dill"])


# ----------------------------------------------------------------------------------------------------------------
# Independent reference: evaluate the Keras graph up to ``obj`` (float64, NCHW internally)
# ----------------------------------------------------------------------------------------------------------------
def _inputs_of(entry: dict[str, Any]) -> list[str]:
    found: list[str] = []

    def walk(value: Any) -> None:
        if isinstance(value, list):
            for item in value:
                walk(item)
        elif isinstance(value, dict):
            if value.get("class_name") == "__keras_tensor__":
                found.append(value["config"]["keras_history"][0])
            else:
                for item in value.values():
                    walk(item)

    for node in entry.get("inbound_nodes", []):
        walk(node["args"])
    return found


_ACTIVATIONS = {
    "sigmoid": torch.sigmoid,
    "swish": lambda t: t * torch.sigmoid(t),
    "relu": torch.relu,
    "softplus": F.softplus,
    "tanh": torch.tanh,
}


def _interpret_obj(
    config: dict[str, Any], weights: dict[str, list[np.ndarray]], x_normed_nchw: np.ndarray
) -> np.ndarray:
    """The ``obj`` layer's output per the fixture README's inference semantics, fed the IntensityScaler output."""
    values: dict[str, torch.Tensor] = {}
    for entry in config["config"]["layers"]:
        kind, name, cfg = entry["class_name"], entry["name"], entry["config"]
        ins = [values.get(source) for source in _inputs_of(entry)]
        if kind == "InputLayer":
            continue
        if kind == "IntensityScaler":
            out = torch.from_numpy(x_normed_nchw).double()
        elif kind == "Conv2D":
            kernel, bias = weights[name]
            out = F.conv2d(ins[0], torch.from_numpy(kernel).double().permute(3, 2, 0, 1),
                           torch.from_numpy(bias).double(), padding=1)
            out = torch.relu(out) if cfg["activation"] == "relu" else out
        elif kind == "MaxPooling2D":
            out = F.max_pool2d(ins[0], 2)
        elif kind == "UpSampling2D":
            out = ins[0].repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
        elif kind == "GetItem":
            key = entry["inbound_nodes"][0]["args"][1][1]["config"]
            out = ins[0][:, key["start"]:key["stop"]]
        elif kind == "ZeroPadding2D":
            (top, bottom), (left, right) = cfg["padding"]
            out = F.pad(ins[0], (left, right, top, bottom))
        elif kind == "ActivationLayer":
            out = cfg["scale"] * _ACTIVATIONS[cfg["activation_name"]](ins[0])
        elif kind == "Silu":
            out = ins[0] * torch.sigmoid(ins[0])
        elif kind == "CenterMaskLayer":
            n = cfg["N"]
            mask = torch.ones(1, 1, n, n, dtype=torch.float64)
            mask[..., n // 4: n // 4 + n // 2, n // 4: n // 4 + n // 2] = 0.0  # 1 - centre mask of N/2 x N/2 ones
            out = mask
        elif kind == "Multiply":
            out = ins[0] * ins[1]
        elif kind == "Add":
            out = ins[0] + ins[1]
        elif kind == "CombineComplexLayer":
            amp, phase = ins
            return torch.complex(amp * torch.cos(phase), amp * torch.sin(phase)).numpy()
        else:
            raise AssertionError(f"the reference does not evaluate {kind}")
        values[name] = out
    raise AssertionError("no CombineComplexLayer in the graph")


# ----------------------------------------------------------------------------------------------------------------
# A builder of upstream's graph (for variants the shared set lacks)
# ----------------------------------------------------------------------------------------------------------------
def _tensor(name: str) -> dict[str, Any]:
    return {"class_name": "__keras_tensor__", "config": {"keras_history": [name, 0, 0]}}


def _graph_config(N: int, C: int, s: int, probe_big: bool, amp_activation: str, c_outer: int = 4) -> dict[str, Any]:
    """config.json of upstream's ``diffraction_to_obj`` (docs/tensorflow-bundles.md §3, fixture README)."""
    layers: list[dict[str, Any]] = []
    counter = {"conv": 0}
    policy = {"module": "keras", "class_name": "DTypePolicy", "config": {"name": "float32"}}

    def add(kind: str, module: str, name: str, cfg: dict[str, Any], args: list[Any]) -> str:
        layers.append({"module": module, "class_name": kind, "name": name, "config": {"name": name, **cfg},
                       "inbound_nodes": [{"args": args, "kwargs": {}}] if args else []})
        return name

    def conv(source: str, filters: int, activation: str) -> str:
        counter["conv"] += 1
        return add("Conv2D", "keras.layers", f"c{counter['conv']}", {
            "filters": filters, "kernel_size": [3, 3], "strides": [1, 1], "padding": "same",
            "data_format": "channels_last", "dilation_rate": [1, 1], "groups": 1, "activation": activation,
            "use_bias": True, "dtype": policy}, [_tensor(source)])

    def up(source: str, name: str) -> str:
        return add("UpSampling2D", "keras.layers", name, {"size": [2, 2], "interpolation": "nearest",
                                                          "data_format": "channels_last"}, [_tensor(source)])

    def item(source: str, name: str, start: Any, stop: Any) -> str:
        key = [{"class_name": "__ellipsis__", "config": {}},
               {"class_name": "__slice__", "config": {"start": start, "stop": stop, "step": None}}]
        return add("GetItem", "keras.src.ops.numpy", name, {}, [_tensor(source), key])

    depth = {64: 3, 128: 4, 256: 5}[N]
    add("InputLayer", "keras.layers", "input", {"batch_shape": [None, N, N, C], "dtype": "float32"}, [])
    x = add("IntensityScaler", "ptycho.model", "intensity_scaler", {}, [[_tensor("input")]])
    for i in range(depth):
        width = 128 * s // 2 ** (depth - 1 - i)
        x = conv(conv(x, width, "relu"), width, "relu")
        x = add("MaxPooling2D", "keras.layers", f"pool{i}", {"pool_size": [2, 2], "strides": [2, 2],
                                                             "padding": "same", "data_format": "channels_last"},
                [_tensor(x)])
    tops = []
    for branch, act, scale in (("amp", amp_activation, 1.0), ("phi", "tanh", math.pi)):
        t = x
        for j in range(depth - 1):
            width = 32 * s * 2 ** (depth - 2 - j)
            t = up(conv(conv(t, width, "relu"), width, "relu"), f"{branch}_up{j}")
        centre = conv(item(t, f"{branch}_centre_slice", None, -c_outer), C, "linear")
        centre = add("ActivationLayer", "ptycho.custom_layers", branch, {"activation_name": act, "scale": scale},
                     [_tensor(centre)])
        top = add("ZeroPadding2D", "keras.layers", f"{branch}_padded",
                  {"padding": [[N // 4, N // 4], [N // 4, N // 4]], "data_format": "channels_last"}, [_tensor(centre)])
        if probe_big:
            border_width = s * 2048 // N
            b = item(t, f"{branch}_border_slice", -c_outer, None)
            b = up(conv(conv(b, border_width, "relu"), border_width, "relu"), f"{branch}_border_up")
            b = add("Silu", "keras.src.ops.nn", f"{branch}_silu", {}, [_tensor(conv(b, C, "linear"))])
            mask = add("CenterMaskLayer", "ptycho.tf_helper", f"{branch}_mask", {"N": N, "c": 1, "kind": "border"},
                       [_tensor(b)])
            b = add("Multiply", "keras.src.ops.numpy", f"{branch}_multiply", {}, [_tensor(b), _tensor(mask)])
            top = add("Add", "keras.src.ops.numpy", f"{branch}_add", {}, [_tensor(top), _tensor(b)])
        tops.append(top)
    add("CombineComplexLayer", "ptycho.custom_layers", "obj", {"use_polar": True}, [[_tensor(t) for t in tops]])
    return {"module": "keras.src.models.functional", "class_name": "Functional",
            "config": {"name": "functional", "layers": layers}}


def _random_weights(config: dict[str, Any], seed: int) -> dict[str, list[np.ndarray]]:
    """He-scaled kernels and 0.1-scale biases per Conv2D (shapes from the graph), float32."""
    rng = np.random.default_rng(seed)
    channels = {}
    weights = {}
    for entry in config["config"]["layers"]:
        kind, name, cfg = entry["class_name"], entry["name"], entry["config"]
        ins = _inputs_of(entry)
        if kind == "InputLayer":
            channels[name] = cfg["batch_shape"][3]
        elif kind == "Conv2D":
            c_in = channels[ins[0]]
            kernel = rng.standard_normal((3, 3, c_in, cfg["filters"])) * math.sqrt(2.0 / (9 * c_in))
            weights[name] = [kernel.astype(np.float32), (0.1 * rng.standard_normal(cfg["filters"])).astype(np.float32)]
            channels[name] = cfg["filters"]
        elif kind == "GetItem":
            key = entry["inbound_nodes"][0]["args"][1][1]["config"]
            channels[name] = len(range(channels[ins[0]])[key["start"]:key["stop"]])
        elif ins:
            channels[name] = channels[ins[0]]
    return weights


def _signature(config: dict[str, Any]) -> list[tuple]:
    """Order- and name-free structure of a graph: each layer's class, key settings and producers' classes."""
    classes = {entry["name"]: entry["class_name"] for entry in config["config"]["layers"]}
    rows = []
    for entry in config["config"]["layers"]:
        cfg = entry["config"]
        if entry["class_name"] in ("ReassemblePatchesLayer", "TrimReconstructionLayer") or (
                entry["name"] == "input_positions"):  # after obj: not part of the converted network
            continue
        settings = tuple(str(cfg.get(k)) for k in ("filters", "activation", "activation_name", "padding", "kind",
                                                   "use_polar"))
        if entry["class_name"] == "GetItem":
            settings += (str(entry["inbound_nodes"][0]["args"][1][1]["config"]),)
        rows.append((entry["class_name"], settings, tuple(sorted(classes[s] for s in _inputs_of(entry)))))
    return sorted(rows)


# ----------------------------------------------------------------------------------------------------------------
# The shared fixtures convert exactly
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", FIXTURES)
def test_fixture_converts_and_matches_tf_obj(tmp_path, name):
    """Convert, load strictly through the package's reader, reproduce TF's ``obj`` (module docstring: tolerance)."""
    out = convert_tf_bundle(DATA / name / "wts.h5.zip", tmp_path / "converted" / "wts.h5.zip")
    assert out == tmp_path / "converted" / "wts.h5.zip"
    network, _ = load_torch_bundle(out, device="cpu")
    data = _io(name)
    _assert_close(_predict(network, data["x_normed_nchw"]), data["obj"])  # the exact tensor the TF CNN saw
    _assert_close(_predict(network, data["x_nchw"]), data["obj"])  # the raw amplitudes, equal to ~1 ulp
    config = network.config
    assert (config.cbam_encoder, config.cbam_bottleneck, config.batch_norm, config.use_shared_decoder) == (
        False, False, False, False)
    assert (config.cnn_output_mode, config.mode, config.intensity_scale_trainable) == (
        "amp_phase", "Unsupervised", False)
    assert not network.uses_fixed_input_scale  # the caller's factor (1) is honoured


@pytest.mark.parametrize("name", FIXTURES)
def test_converted_bundle_is_an_upstream_torch_bundle(tmp_path, name):
    """Upstream's member names, metadata with the implied settings, the CNN's exact key set, params and provenance."""
    src = DATA / name / "wts.h5.zip"
    out = convert_tf_bundle(src, tmp_path)
    assert out == tmp_path / "wts.h5.zip"
    with zipfile.ZipFile(out) as archive:
        assert set(archive.namelist()) == UPSTREAM_TORCH_MEMBERS
    contents = read_bundle(out)
    meta = _meta(name)
    spec = meta["config"]["spec"]
    model_config = contents.metadata["model_config"]
    gridsize = spec["gridsize"]
    assert contents.version == "2.0-pytorch"
    assert contents.metadata["data_config"]["N"] == spec["N"]
    assert contents.metadata["data_config"]["grid_size"] == (gridsize, gridsize)
    assert model_config["C_model"] == gridsize**2 and model_config["n_filters_scale"] == spec["n_filters_scale"]
    assert model_config["cbam_encoder"] is False and model_config["intensity_scale_trainable"] is False
    assert model_config["probe_big"] is spec["probe_big"] and model_config["amp_activation"] == "sigmoid"
    # gridsize 1: TF routes 4 channels to the border path, torch's default 1 -> the legacy override (4 exactly).
    assert model_config["use_legacy_decoder_channel_override"] is (gridsize == 1)
    assert contents.network_config == NetworkConfig(**{
        field: (contents.metadata["data_config"]["N"] if field == "N" else model_config[field])
        for field in NetworkConfig.__dataclass_fields__})
    with torch.device("meta"):
        expected = PtychoPINNNetwork(contents.network_config).state_dict()
    assert list(contents.state_dict) == list(expected)
    assert not any("attention" in key or "ChannelGate" in key for key in contents.state_dict)
    border = contents.state_dict["model.autoencoder.decoder_amp.amp.conv_up_block.conv1.weight"]
    assert border.shape[1] == 4  # TF's [..., -4:] border split

    # params snapshot kept: every TF key with its value, except the three the converted network redefines
    with zipfile.ZipFile(src) as archive:
        tf_params = _decode_params(archive.read("diffraction_to_obj/params.dill"))
    changed = {"_version": "2.0-pytorch", "backend": "pytorch", "intensity_scale.trainable": False}
    for key, value in tf_params.items():
        stored = contents.params[key]
        if key in changed:
            assert stored == changed[key], key
        elif isinstance(value, np.ndarray):
            assert np.array_equal(stored, value) and stored.dtype == value.dtype, key
        else:
            assert stored == value and type(stored) is type(value), key
    if name == "tf_n64_g1_s1_probe_tensor":  # the EagerTensor probe, decoded to numpy, survives the conversion
        np.testing.assert_array_equal(contents.params["probe"], _io(name)["params_probe"])
    assert contents.intensity_scale == float(_io(name)["intensity_scale"])

    provenance = contents.manifest["provenance"]
    source = provenance["source"]
    assert source["sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()
    assert source["size_bytes"] == src.stat().st_size
    assert source["keras_version"] == meta["environment"]["keras"] == "3.15.1"
    assert source["archive_version"] == "1.0" and source["params_backend"] == "tensorflow"
    assert source["tensorflow_version"] is None  # Keras 3 archives do not record it
    mapping = provenance["mapping"]
    assert mapping["h5_datasets"] == meta["converter"]["torch_key_to_h5_dataset"]  # found by content hash upstream
    assert mapping["keys_without_source"] == meta["converter"]["torch_keys_left_at_init"]
    assert mapping["zero_padded_keys"] == meta["converter"]["embedded_zero_padded"] == []


@pytest.mark.parametrize("name", FIXTURES)
def test_weights_arrive_bitwise(name):
    """Every TF tensor lands unchanged in the torch key upstream's study converter chose (sha256 of HWIO bytes)."""
    archive = read_tf_archive(DATA / name / "wts.h5.zip")
    table = _meta(name)["bundle"]["models"]["diffraction_to_obj"]["weights"]
    assert len(table) == len(archive.h5_sources) == 44
    for row in table:
        (key,) = row["torch_key_from_study_converter"]
        tensor = archive.state_dict[key].numpy()
        hwio = tensor.transpose(2, 3, 1, 0) if tensor.ndim == 4 else tensor
        assert hashlib.sha256(np.ascontiguousarray(hwio, dtype="<f4").tobytes()).hexdigest() == row["sha256_le_bytes"]
        assert archive.h5_sources[key] == row["h5_path"]
    for key in archive.keys_without_source:
        assert torch.equal(archive.state_dict[key], torch.ones_like(archive.state_dict[key]))


@pytest.mark.parametrize("name", FIXTURES)
def test_reference_interpreter_reproduces_tf(fixture_parts, name):
    """Validates the oracle the variant tests rely on: the graph interpreter gives TF's recorded ``obj``."""
    parts = fixture_parts(name)
    data = _io(name)
    reference = _interpret_obj(parts.config, parts.weights, data["x_normed_nchw"])
    _assert_close(reference.astype(np.complex64), data["obj"])


@pytest.mark.parametrize("name,C", [(SMALL, 1), ("tf_n64_g2_s1", 4)])
def test_graph_builder_matches_upstream_structure(fixture_parts, name, C):
    """The builder used for N=128/256 and probe.big=False emits upstream's graph (same layers, settings, wiring)."""
    assert _signature(_graph_config(64, C, 1, True, "sigmoid")) == _signature(fixture_parts(name).config)


def test_in_memory_conversion_equals_the_written_bundle(tmp_path):
    """read_tf_archive's network and the bundle convert_tf_bundle writes are the same (bitwise, same run)."""
    archive = read_tf_archive(DATA / SMALL / "wts.h5.zip")
    written, _ = load_torch_bundle(convert_tf_bundle(DATA / SMALL / "wts.h5.zip", tmp_path), device="cpu")
    assert list(archive.state_dict) == list(written.state_dict())
    assert all(torch.equal(archive.state_dict[k], v) for k, v in written.state_dict().items())
    x = _io(SMALL)["x_normed_nchw"]
    assert np.array_equal(_predict(archive.build_network(), x), _predict(written, x))


# ----------------------------------------------------------------------------------------------------------------
# Variants the shared set lacks: exact against the graph interpreter
# ----------------------------------------------------------------------------------------------------------------
def test_swish_archive_converts_to_silu(tmp_path, fixture_parts):
    parts = fixture_parts(SMALL)
    _layer(parts, "amp")["config"]["activation_name"] = "swish"
    parts.params = {**_params(parts), "amp_activation": "swish"}
    out = convert_tf_bundle(_write(parts, tmp_path / "swish.zip"), tmp_path / "out.zip")
    network, params = load_torch_bundle(out, device="cpu")
    assert network.config.amp_activation == "silu" and params["amp_activation"] == "silu"
    assert read_bundle(out).manifest["provenance"]["source"]["amp_activation"] == "swish"
    x = _io(SMALL)["x_normed_nchw"]
    _assert_close(_predict(network, x), _interpret_obj(parts.config, parts.weights, x))


@pytest.mark.parametrize("N,C,s,probe_big,activation", [
    (64, 4, 1, False, "swish"),  # the README's tf_n64_g2_s1_probesmall_swish row
    (128, 1, 1, True, "sigmoid"),  # tf_n128_g1_s1: border path 16 filters -> zero-padded to torch's 32
    (256, 1, 1, True, "sigmoid"),  # border path 8 filters
])
def test_built_archive_converts_exactly(tmp_path, fixture_parts, N, C, s, probe_big, activation):
    parts = fixture_parts(SMALL)
    parts.config = _graph_config(N, C, s, probe_big, activation)
    parts.weights = _random_weights(parts.config, seed=N + C)
    base = _params(parts)
    base.pop("probe")
    parts.params = {**base, "N": N, "gridsize": int(math.isqrt(C)), "n_filters_scale": s, "probe.big": probe_big,
                    "amp_activation": activation}
    archive = read_tf_archive(_write(parts, tmp_path / "built.zip"))
    if N == 64:
        assert archive.zero_padded_keys == []
    else:
        assert len(archive.zero_padded_keys) == 10  # README: tf_n128_g1_s1 has 10 such tensors
        key = "model.autoencoder.decoder_amp.amp.conv_up_block.conv2.weight"
        assert key in archive.zero_padded_keys
        width = s * 2048 // N
        assert archive.state_dict[key][width:].abs().max() == 0 and archive.state_dict[key][:, width:].abs().max() == 0
    if not probe_big:
        unused = [k for k in archive.keys_without_source if not k.startswith("model.forward_model.")]
        assert len(unused) == 12 and all(archive.state_dict[k].abs().max() == 0 for k in unused)
    out = convert_tf_bundle(tmp_path / "built.zip", tmp_path / "out.zip")
    network, _ = load_torch_bundle(out, device="cpu")
    x = np.random.default_rng(0).uniform(0, 2, size=(1, C, N, N)).astype(np.float32)
    reference = _interpret_obj(parts.config, parts.weights, x)
    assert np.abs(reference).max() > 0.1
    _assert_close(_predict(network, x), reference)


# ----------------------------------------------------------------------------------------------------------------
# What cannot be converted exactly is refused, naming the era or setting
# ----------------------------------------------------------------------------------------------------------------
def _identified_as_tf(path: Path) -> bool:
    """What the package's one detector (bundle.identify, docs/bundle-format.md §11) makes of ``path``."""
    return identify_artifact(path).kind is ArtifactKind.TENSORFLOW_ARCHIVE


def _refused(path: Path, error: type, match: str) -> PtychoFlavorError:
    with pytest.raises(error, match=match) as info:
        read_tf_archive(path)
    assert type(info.value) is error
    return info.value


@pytest.mark.parametrize("activation", ["relu", "softplus"])
def test_relu_and_softplus_amplitudes_are_refused(tmp_path, fixture_parts, activation):
    parts = fixture_parts(SMALL)
    _layer(parts, "amp")["config"]["activation_name"] = activation
    parts.params = {**_params(parts), "amp_activation": activation}
    _refused(_write(parts, tmp_path / "a.zip"), TensorFlowConversionError,
             rf"amp_activation='{activation}'.*SiLU.*0\.2785")


@pytest.mark.parametrize("use_polar", [False, "missing"])
def test_rectangular_combine_era_is_refused(tmp_path, fixture_parts, use_polar):
    parts = fixture_parts(SMALL)
    if use_polar == "missing":
        del _layer(parts, "obj")["config"]["use_polar"]
    else:
        _layer(parts, "obj")["config"]["use_polar"] = use_polar
    _refused(_write(parts, tmp_path / "a.zip"), TensorFlowConversionError, r"f32b85f.*c03673d.*A \+ i\*phi")


def test_savedmodel_era_archive_and_directory_are_refused(tmp_path, fixture_parts):
    parts = fixture_parts(SMALL)
    saved = {"diffraction_to_obj/saved_model.pb": b"\x08\x01", "diffraction_to_obj/keras_metadata.pb": b"",
             "diffraction_to_obj/variables/variables.index": b"", "diffraction_to_obj/model.keras": None}
    path = _write(parts, tmp_path / "saved.zip", outer_overrides=saved)
    _refused(path, TensorFlowConversionError, r"SavedModel.*f32b85f \(2025-07-28\)")
    assert _identified_as_tf(path)
    folder = tmp_path / "extracted" / "diffraction_to_obj"
    folder.mkdir(parents=True)
    (folder / "saved_model.pb").write_bytes(b"\x08\x01")
    _refused(tmp_path / "extracted", TensorFlowConversionError, r"SavedModel directory.*f32b85f")
    assert _identified_as_tf(tmp_path / "extracted")


def test_pad_object_false_and_object_big_false_are_refused(tmp_path, fixture_parts):
    parts = fixture_parts(SMALL)
    parts.params = {**_params(parts), "pad_object": False}
    _refused(_write(parts, tmp_path / "pad.zip"), TensorFlowConversionError, "pad_object=False")
    parts = fixture_parts("tf_n64_g2_s1")  # heads emitting 1 channel for 4 inputs: object.big=False at gridsize 2
    for entry in _layers(parts):
        if entry["class_name"] == "Conv2D" and entry["config"]["filters"] == 4:
            entry["config"]["filters"] = 1
    _refused(_write(parts, tmp_path / "big.zip"), TensorFlowConversionError, "object.big=False model at gridsize 2")


def test_keras2_model_is_refused(tmp_path, fixture_parts):
    parts = fixture_parts(SMALL)
    parts.metadata["keras_version"] = "2.14.0"
    _refused(_write(parts, tmp_path / "k2.zip"), TensorFlowConversionError, r"Keras '2\.14\.0'.*Keras 3")


def _add_stray_conv(parts: Parts) -> None:
    """A Conv2D (with weights) that reads the encoder but feeds nothing on the way to obj."""
    _layers(parts).append({**copy.deepcopy(_layer(parts, "conv2d_5")), "name": "extra_conv"})
    parts.weights["extra_conv"] = parts.weights["conv2d_5"]


def _edit_first(parts: Parts, kind: str, key: str, value: Any, nth: int = 0) -> None:
    entries = [entry for entry in _layers(parts) if entry["class_name"] == kind]
    entries[nth]["config"][key] = value


@pytest.mark.parametrize("edit,match", [
    (lambda p: _layer(p, "conv2d_5").update(class_name="BatchNormalization"), r"unknown layer 'conv2d_5'.*BatchNorm"),
    (lambda p: _layer(p, "conv2d_5").update(module="evil.layers"), r"Conv2D from module 'evil\.layers'"),
    (lambda p: _edit_first(p, "Conv2D", "kernel_size", [5, 5]), r"kernel_size=\[5, 5\]"),
    (lambda p: _edit_first(p, "Conv2D", "activation", "tanh", nth=3), r"activation='tanh'"),
    (lambda p: _edit_first(p, "UpSampling2D", "interpolation", "bilinear"), r"interpolation='bilinear'"),
    (lambda p: _edit_first(p, "ZeroPadding2D", "padding", [[8, 24], [16, 16]]), r"padding=\[\[8, 24\]"),
    (lambda p: _edit_first(p, "ActivationLayer", "scale", 2.0, nth=1), r"phase activation is 'tanh' x 2\.0"),
    (lambda p: _edit_first(p, "Conv2D", "dtype", {"config": {"name": "mixed_float16"}}), "mixed_float16"),
    (lambda p: _edit_first(p, "CenterMaskLayer", "kind", "center"), r"kind='center'"),
    (lambda p: _layer(p, "get_item_3")["inbound_nodes"][0]["args"][1][1]["config"].update(start=-3),
     r"border takes channels \[-3:None:None\]"),
    (lambda p: _layer(p, "conv2d_12")["inbound_nodes"][0]["args"][0]["config"].update(  # amp border reads phase
        keras_history=["get_item_3", 0, 0]),
     "the amplitude centre and border read different decoder outputs"),
    (lambda p: _add_stray_conv(p), r"Conv2D layers \['extra_conv'\] are not on upstream's CNN path"),
    (lambda p: _layers(p).append(copy.deepcopy(_layer(p, "conv2d_5"))), "names two layers 'conv2d_5'"),
    (lambda p: [e for e in _layers(p) if e["class_name"] == "CombineComplexLayer"][0]["inbound_nodes"].append({}),
     "called 2 times"),
])
def test_unexpected_graphs_are_refused(tmp_path, fixture_parts, edit, match):
    parts = fixture_parts(SMALL)
    edit(parts)
    _refused(_write(parts, tmp_path / "edited.zip"), TensorFlowConversionError, match)


def test_params_that_disagree_with_the_graph_are_refused(tmp_path, fixture_parts):
    parts = fixture_parts(SMALL)
    parts.params = {**_params(parts), "n_filters_scale": 2}
    _refused(_write(parts, tmp_path / "s.zip"), ConfigMismatchError, r"n_filters_scale.*=2 disagrees")
    parts = fixture_parts(SMALL)
    parts.intensity_scale_attr = 1000.0
    _refused(_write(parts, tmp_path / "scale.zip"), ConfigMismatchError, r"intensity_scale=988\.2.*1000\.0")


def test_pytorch_bundles_and_non_archives(tmp_path):
    torch_bundle = convert_tf_bundle(DATA / SMALL / "wts.h5.zip", tmp_path / "torch.zip")
    _refused(torch_bundle, TensorFlowConversionError, "already a PyTorch bundle")
    assert not _identified_as_tf(torch_bundle)
    for name in FIXTURES:
        assert _identified_as_tf(DATA / name / "wts.h5.zip")
        assert _identified_as_tf(DATA / name)  # the folder holding wts.h5.zip
    (tmp_path / "text.zip").write_text("not a zip")
    assert not _identified_as_tf(tmp_path / "text.zip")
    assert not _identified_as_tf(tmp_path / "missing.zip")
    _refused(tmp_path / "text.zip", NotABundleError, "not a zip archive")
    source = tmp_path / "tf.zip"
    source.write_bytes((DATA / SMALL / "wts.h5.zip").read_bytes())
    with pytest.raises(TensorFlowConversionError, match="is the source archive itself"):
        convert_tf_bundle(source, source)
    assert source.read_bytes() == (DATA / SMALL / "wts.h5.zip").read_bytes()


def test_manifest_and_required_members_are_checked(tmp_path, fixture_parts):
    parts = fixture_parts(SMALL)
    manifest = pickle.dumps({"models": ["autoencoder", "diffraction_to_obj"], "version": "3.0"}, protocol=4)
    path = _write(parts, tmp_path / "v.zip", outer_overrides={"manifest.dill": manifest})
    _refused(path, TensorFlowConversionError, r"manifest version '3\.0' is not the TF archive version '1\.0'")
    path = _write(parts, tmp_path / "nokeras.zip", outer_overrides={"diffraction_to_obj/model.keras": None})
    _refused(path, CorruptBundleError, r"lacks diffraction_to_obj/model\.keras")
    path = _write(parts, tmp_path / "noh5.zip", outer_overrides={"diffraction_to_obj/model.h5": None})
    _refused(path, CorruptBundleError, r"lacks the member 'diffraction_to_obj/model\.h5'")
    keras = _stored_zip({"metadata.json": json.dumps(parts.metadata).encode(), "config.json": b"{not json"})
    _refused(_write(parts, tmp_path / "json.zip", keras=keras), CorruptBundleError, "config.json is not valid JSON")


# ----------------------------------------------------------------------------------------------------------------
# Hostile archives: no code runs, sizes are bounded, damaged weights are typed errors
# ----------------------------------------------------------------------------------------------------------------
_AUDIT: dict[str, Any] = {"armed": False, "events": []}


def _audit(event: str, args: tuple) -> None:
    if not _AUDIT["armed"]:
        return
    if event in ("os.system", "subprocess.Popen", "os.exec", "os.posix_spawn", "os.spawn", "ctypes.dlopen"):
        _AUDIT["events"].append(event)
    elif event in ("compile", "exec"):
        source = args[1] if event == "compile" and len(args) > 1 else getattr(args[0], "co_filename", None)
        if not (isinstance(source, str) and (source.endswith(".py") or source.startswith("<frozen"))):
            _AUDIT["events"].append(event)
    elif event == "import" and args and str(args[0]).split(".")[0] in ("tensorflow", "keras", "ptycho"):
        _AUDIT["events"].append(f"import {args[0]}")


sys.addaudithook(_audit)  # inert unless armed


def _refused_quietly(path: Path, error: type, match: str, **kwargs: Any) -> PtychoFlavorError:
    """Like :func:`_refused`, asserting that no code ran and nothing from TensorFlow/Keras/ptycho was imported."""
    _AUDIT["events"].clear()
    _AUDIT["armed"] = True
    try:
        with pytest.raises(error, match=match) as info:
            read_tf_archive(path, **kwargs)
    finally:
        _AUDIT["armed"] = False
    assert type(info.value) is error
    assert _AUDIT["events"] == []
    return info.value


class _Reduce:
    def __init__(self, func: Any, args: tuple) -> None:
        self.func, self.args = func, args

    def __reduce__(self) -> tuple:
        return self.func, self.args


def test_payload_is_live(tmp_path):
    """Guard against a vacuous test: plain unpickling of the payload does run it."""
    marker = tmp_path / "live"
    pickle.loads(pickle.dumps(_Reduce(os.system, (f"touch {marker}",))))  # noqa: S301 - our own payload
    assert marker.exists()


@pytest.mark.parametrize("payload,match", [
    ("os.system", rf"global {os.system.__module__}\.system"),
    (b"ctensorflow.python.ops.gen_io_ops\nwrite_file\n(S'/tmp/x'\nS'data'\ntR.",
     r"global tensorflow\.python\.ops\.gen_io_ops\.write_file.*Nothing was imported"),
    (b"ctensorflow.python.framework.ops\nconvert_to_tensor\n(S'abc'\ntR.", "convert_to_tensor on a str"),
    (b"ctensorflow.python.framework.ops\nconvert_to_tensor\n(I1\nI2\ntR.", r"convert_to_tensor with 2 argument"),
    (b"ckeras.src.saving.serialization_lib\ndeserialize_keras_object\n(S'x'\ntR.", r"global keras\.src"),
])
def test_hostile_params_run_nothing(tmp_path, fixture_parts, payload, match):
    marker = tmp_path / "ran"
    parts = fixture_parts(SMALL)
    if payload == "os.system":
        data = pickle.dumps({**_params(parts), "probe": _Reduce(os.system, (f"touch {marker}",))}, protocol=4)
    else:
        data = payload
    path = _write(parts, tmp_path / "hostile.zip", outer_overrides={"diffraction_to_obj/params.dill": data})
    _refused_quietly(path, UnsafeBundleError, match)
    assert not marker.exists()
    assert "tensorflow" not in sys.modules


def test_custom_objects_dill_is_never_read(tmp_path, fixture_parts):
    """A code-running custom_objects.dill does not matter: the converter never unpickles it."""
    marker = tmp_path / "ran"
    payload = pickle.dumps(_Reduce(os.system, (f"touch {marker}",)), protocol=4)
    path = _write(fixture_parts(SMALL), tmp_path / "a.zip", outer_overrides={
        "diffraction_to_obj/custom_objects.dill": payload, "autoencoder/custom_objects.dill": payload})
    _AUDIT["events"].clear()
    _AUDIT["armed"] = True
    try:
        convert_tf_bundle(path, tmp_path / "out.zip")
    finally:
        _AUDIT["armed"] = False
    assert _AUDIT["events"] == [] and not marker.exists()


def _cd_offsets(data: bytes) -> dict[str, int]:
    eocd = data.rfind(b"PK\x05\x06")
    count, offset = struct.unpack_from("<H", data, eocd + 10)[0], struct.unpack_from("<I", data, eocd + 16)[0]
    entries = {}
    for _ in range(count):
        name_len, extra_len, comment_len = struct.unpack_from("<HHH", data, offset + 28)
        entries[data[offset + 46: offset + 46 + name_len].decode()] = offset
        offset += 46 + name_len + extra_len + comment_len
    return entries


def _declare_size(data: bytes, member: str, size: int) -> bytes:
    """Patch the uncompressed size a zip's central directory and local header declare for ``member``."""
    out = bytearray(data)
    entry = _cd_offsets(data)[member]
    struct.pack_into("<I", out, entry + 24, size)
    header = struct.unpack_from("<I", data, entry + 42)[0]
    struct.pack_into("<I", out, header + 22, size)
    return bytes(out)


@pytest.mark.parametrize("level", ["outer", "model.keras"])
@pytest.mark.parametrize("declared,error,match", [
    # deflated: zipfile stops inflating at the declared size; stored (model.keras's members): the size check
    (100, CorruptBundleError, r"is damaged: Bad CRC-32|declares 100 bytes but occupies \d+ .*the file is damaged"),
    (10**9, UnsafeBundleError, "declares 1000000000 bytes, over the"),
])
def test_members_that_lie_about_their_size(tmp_path, fixture_parts, level, declared, error, match):
    parts = fixture_parts(SMALL)
    path = _write(parts, tmp_path / "a.zip")
    if level == "outer":
        lying = _declare_size(path.read_bytes(), "diffraction_to_obj/params.dill", declared)
    else:
        keras = _declare_size(parts.outer["diffraction_to_obj/model.keras"], "config.json", declared)
        lying = _write(parts, tmp_path / "b.zip", keras=keras).read_bytes()
    path.write_bytes(lying)
    _refused_quietly(path, error, match)


def test_size_caps_and_compression_bombs(tmp_path, fixture_parts):
    parts = fixture_parts(SMALL)
    path = _write(parts, tmp_path / "a.zip")
    _refused_quietly(path, UnsafeBundleError, r"model\.keras' expands to .* per-member cap",
                     limits=BundleLimits(max_member_bytes=1024**2))
    bomb = _write(parts, tmp_path / "bomb.zip", outer_overrides={"diffraction_to_obj/params.dill": bytes(8 * 1024**2)})
    _refused_quietly(bomb, UnsafeBundleError, "compression ratio of .* zip bomb")


def _replace_dataset(path: str, **create: Any) -> Callable[[h5py.File], None]:
    def mutate(handle: h5py.File) -> None:
        parent, name = path.rsplit("/", 1)
        del handle[path]
        handle[parent].create_dataset(name, **create)

    return mutate


def _replace_link(path: str, link: Any) -> Callable[[h5py.File], None]:
    def mutate(handle: h5py.File) -> None:
        del handle[path]
        handle[path] = link

    return mutate


KERNEL = "layers/conv2d_2/vars/0"  # encoder block 1 conv1 at n_filters_scale 1: HWIO (3, 3, 32, 64), 73728 bytes


@pytest.mark.parametrize("mutate,error,match", [
    ("truncated", CorruptBundleError, "cannot be opened as HDF5"),
    ("garbage", CorruptBundleError, "not an HDF5 file"),
    (_replace_dataset(KERNEL, data=np.zeros((3, 3, 32, 65), "<f4")), TensorFlowConversionError,
     r"conv2d_2/vars/0 has the shape \(65, 32, 3, 3\).*needs \(64, 32, 3, 3\)"),
    (_replace_dataset(KERNEL, shape=(3, 3, 32, 64), dtype="<f4"), CorruptBundleError,
     "declares 73728 bytes of data but stores 0"),
    (_replace_dataset(KERNEL, data=np.zeros((3, 3, 32, 64), "<f8")), CorruptBundleError,
     "dtype float64, not float32"),
    (_replace_dataset(KERNEL, data=np.zeros((3, 3, 32, 64), "<f4"), compression="gzip"),
     UnsafeBundleError, "HDF5 filter"),
    ("external", UnsafeBundleError, "external or virtual storage"),
    (_replace_link("layers/conv2d_3/vars/1", h5py.SoftLink("/layers/conv2d_2/vars/1")), UnsafeBundleError,
     "is a SoftLink"),
    (_replace_link("layers/conv2d_3", h5py.ExternalLink("other.h5", "/x")), UnsafeBundleError, "is a ExternalLink"),
    (lambda h: h["layers/conv2d_3/vars"].attrs.__setitem__("name", "conv2d_4"), CorruptBundleError,
     "records the layer name 'conv2d_4'.*positional layout"),
    (lambda h: h.create_dataset("layers/intensity_scaler/vars/0", data=np.float32(6.9)),
     TensorFlowConversionError, r"stores weights \['layers/intensity_scaler/vars/0'\]"),
])
def test_damaged_or_crafted_weights(tmp_path, fixture_parts, mutate, error, match):
    parts = fixture_parts(SMALL)
    if mutate == "truncated":
        weights = _weights_h5(parts.config, parts.weights)[:100_000]
    elif mutate == "garbage":
        weights = b"\x00" * 4096
    elif mutate == "external":
        raw = tmp_path / "outside.bin"
        raw.write_bytes(bytes(73728))
        weights = _weights_h5(parts.config, parts.weights, _replace_dataset(
            KERNEL, shape=(3, 3, 32, 64), dtype="<f4", external=[(str(raw), 0, 73728)]))
    else:
        weights = _weights_h5(parts.config, parts.weights, mutate)
    _refused_quietly(_write(parts, tmp_path / "w.zip", weights_h5=weights), error, match)


def test_provenance_must_be_plain_data(tmp_path):
    network = PtychoPINNNetwork(NetworkConfig(N=64, C_model=1, n_filters_scale=1)).eval()
    path = save_torch_bundle(network, tmp_path, provenance={"source": {"sha256": "ab", "sizes": (1, 2.5)}, "n": None})
    assert read_bundle(path).manifest["provenance"] == {"source": {"sha256": "ab", "sizes": [1, 2.5]}, "n": None}
    for bad, match in [({"x": float("nan")}, "non-finite"), ({1: "a"}, "keys must be strings"),
                       ({"x": np.float32(1)}, "got a float32"), (["a"], "must be a dict")]:
        with pytest.raises(InvalidArgumentError, match=match):
            save_torch_bundle(network, tmp_path / "bad.zip", provenance=bad)
    assert not (tmp_path / "bad.zip").exists()
    assert issubclass(TensorFlowConversionError, UnsupportedBundleError)
