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
import math
import os
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mlflow_ptycho_flavor._io import PathLike
from mlflow_ptycho_flavor.bundle.archive import DEFAULT_LIMITS, BundleLimits, resolve_bundle_path
from mlflow_ptycho_flavor.bundle.io import INFERENCE_MODEL
from mlflow_ptycho_flavor.bundle.writer import save_torch_bundle
from mlflow_ptycho_flavor.convert.tensorflow.archive import (
    _MAX_CONFIG_JSON_BYTES,
    _MAX_MODEL_H5_BYTES,
    KERAS_MEMBER,
    MODEL_H5_MEMBER,
    TF_ARCHIVE_VERSION,
    _check_directory,
    _check_members,
    _decode_manifest,
    _decode_params,
    _InMemoryArchive,
    _keras_metadata,
    _open_nested_zip,
    _read_json,
    _read_source,
    _refuse,
)
from mlflow_ptycho_flavor.convert.tensorflow.graph import _parse_layers, _trace_graph
from mlflow_ptycho_flavor.convert.tensorflow.mapping import _check_params_agree, _intensity_scale, _torch_settings
from mlflow_ptycho_flavor.convert.tensorflow.weights import _read_conv_weights, _read_intensity_scale_attr
from mlflow_ptycho_flavor.errors import PtychoFlavorError
from mlflow_ptycho_flavor.network import NetworkConfig, PtychoPINNNetwork, weightless_construction

__all__ = [
    "TF_ARCHIVE_VERSION",
    "TensorFlowArchive",
    "read_tf_archive",
    "convert_tf_bundle",
]


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
    with weightless_construction():
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
