"""Write standalone ``wts.h5.zip`` bundles in upstream PtychoPINN's PyTorch layout (docs/bundle-format.md §1.3, §7).

Layout written: ``manifest.dill``, ``diffraction_to_obj/model.pth`` (state_dict), ``diffraction_to_obj/params.dill``,
``autoencoder/model.pth`` (``{'_sentinel': 'autoencoder'}``), ``autoencoder/params.dill`` (the same snapshot), and
``torch_scaling_metadata.pt`` (the torch configs upstream's metadata-aware loader rebuilds the network from). The
manifest adds ``backend`` and a sha256 per member, which upstream ignores. The writer refuses what the reader
(:mod:`.io`) would refuse, so a bundle that can be saved can be loaded; every write is atomic. Nothing here
imports MLflow.
"""

from __future__ import annotations

import hashlib
import io
import logging
import math
import pickle
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from mlflow_ptycho_flavor._io import PathLike
from mlflow_ptycho_flavor.bundle import params as params_module
from mlflow_ptycho_flavor.bundle.archive import DEFAULT_LIMITS, BundleLimits, resolve_bundle_path, write_zip
from mlflow_ptycho_flavor.bundle.compat import check_finite_weights, check_input_scale, genuine_file_bytes, stored_bytes
from mlflow_ptycho_flavor.bundle.io import (
    AUTOENCODER_MODEL,
    BACKEND,
    INFERENCE_MODEL,
    MANIFEST_MEMBER,
    METADATA_MEMBER,
    read_bundle,
)
from mlflow_ptycho_flavor.bundle.metadata import make_metadata
from mlflow_ptycho_flavor.errors import ConfigMismatchError, InvalidArgumentError, short_repr
from mlflow_ptycho_flavor.network import AnyNetworkConfig, FnoNetworkConfig, network_classes

__all__ = ["save_torch_bundle", "write_bundle"]

_logger = logging.getLogger(__name__)

MODEL_NAMES = (INFERENCE_MODEL, AUTOENCODER_MODEL)
SENTINEL = {"_sentinel": "autoencoder"}
_PICKLE_PROTOCOL = 4  # dill's default on Python <= 3.13, what upstream writes


def _torch_bytes(obj: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _pickle_bytes(obj: Any) -> bytes:
    return pickle.dumps(obj, protocol=_PICKLE_PROTOCOL)


def _architecture_params(config: AnyNetworkConfig) -> dict[str, Any]:
    """The snapshot keys that describe the network (§2.2); the rest of the snapshot comes from the caller."""
    gridsize = config.gridsize
    if gridsize * gridsize != config.C_model:
        raise ConfigMismatchError(
            f"C_model={config.C_model} is not a square gridsize**2; upstream bundles store gridsize only"
        )
    arch: dict[str, Any] = {
        "N": config.N,
        "gridsize": gridsize,
        "model_type": "pinn" if config.mode == "Unsupervised" else "supervised",
        "architecture": config.architecture,
    }
    if isinstance(config, FnoNetworkConfig):
        # TensorFlow-side fields: upstream writes them into the snapshot, and a metadata-free reader needs them
        arch.update(
            fno_modes=config.fno_modes,
            fno_width=config.fno_width,
            fno_blocks=config.fno_blocks,
            fno_cnn_blocks=config.fno_cnn_blocks,
            learned_input_channels=config.learned_input_channels,
            fno_input_transform=config.fno_input_transform,
            generator_output_mode=config.generator_output_mode,
        )
    else:
        arch.update({
            "n_filters_scale": config.n_filters_scale,
            "amp_activation": config.amp_activation,
            "object.big": config.object_big,
            "probe.big": config.probe_big,
        })
    # Our own training never applies a learned input scale unless the network says so; writing the flag
    # from the network keeps upstream's legacy loader's input scaling identical to ours.
    arch["intensity_scale.trainable"] = config.intensity_scale_trainable
    return arch


def _weights_payload(network: torch.nn.Module) -> "OrderedDict[str, torch.Tensor]":
    """The state_dict as upstream's ``torch.save(module.state_dict())`` writes it: every key in order, each shared
    tensor copied once so that its alias keys keep sharing one storage (§8.6.5), and the module versions
    (``_metadata``) kept; copies are contiguous CPU tensors owning exactly their bytes."""
    live = network.state_dict()
    copies: dict[tuple[Any, ...], torch.Tensor] = {}
    state: "OrderedDict[str, torch.Tensor]" = OrderedDict()
    for key, tensor in live.items():
        view = (tensor.device, tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape),
                tensor.stride(), tensor.dtype)
        if view not in copies:
            copies[view] = tensor.detach().to("cpu").contiguous().clone()
        state[key] = copies[view]
    metadata = getattr(live, "_metadata", None)
    if metadata is not None:
        state._metadata = metadata  # type: ignore[attr-defined]
    return state


def _plain_provenance(value: Any, depth: int = 0) -> Any:
    """A copy of ``value`` made of plain data only, so the manifest stays readable by the restricted unpickler.

    Raises:
        InvalidArgumentError: anything but str/int/float/bool/None, lists/tuples and str-keyed dicts, a non-finite
            float, or nesting deeper than 8 levels.
    """
    if depth > 8:
        raise InvalidArgumentError("provenance nests deeper than 8 levels; it is a small record of plain data")
    if value is None or isinstance(value, (str, bool, int)):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise InvalidArgumentError(f"provenance holds a non-finite float {short_repr(value)}")
        return value
    if isinstance(value, (list, tuple)):
        return [_plain_provenance(v, depth + 1) for v in value]
    if isinstance(value, Mapping):
        if not all(isinstance(k, str) for k in value):
            raise InvalidArgumentError("provenance dict keys must be strings")
        return {k: _plain_provenance(v, depth + 1) for k, v in value.items()}
    raise InvalidArgumentError(
        f"provenance must be plain data (str, int, float, bool, None, lists, str-keyed dicts), got a "
        f"{type(value).__name__}"
    )


def _split_models(models: Any) -> tuple[torch.nn.Module, Any]:
    classes = network_classes()
    names = " or ".join(c.__name__ for c in classes)
    if isinstance(models, classes):
        return models, SENTINEL
    if not isinstance(models, Mapping):
        raise TypeError(
            f"models must be a {names} or a dict {{'diffraction_to_obj': network, 'autoencoder': ...}}, "
            f"got {type(models).__name__}"
        )
    if not models:
        raise ValueError("models is empty; pass {'diffraction_to_obj': network}")
    unknown = sorted(set(models) - set(MODEL_NAMES))
    if unknown:
        raise ValueError(f"models has unknown entries {unknown}; a bundle holds only {list(MODEL_NAMES)}")
    network = models.get(INFERENCE_MODEL)
    if not isinstance(network, classes):
        raise TypeError(
            f"models['{INFERENCE_MODEL}'] must be a {names} (build one from a NetworkConfig or FnoNetworkConfig), "
            f"got {type(network).__name__}"
        )
    autoencoder = models.get(AUTOENCODER_MODEL, SENTINEL)
    if isinstance(autoencoder, Mapping):
        if "_sentinel" not in autoencoder:
            raise TypeError("models['autoencoder'] must be an nn.Module or a sentinel dict with key '_sentinel'")
    elif not isinstance(autoencoder, torch.nn.Module):
        raise TypeError(f"models['autoencoder'] must be an nn.Module or a sentinel dict, got {type(autoencoder).__name__}")
    return network, autoencoder


def save_torch_bundle(
    models: Any,
    path: PathLike,
    config: Mapping[str, Any] | None = None,
    *,
    intensity_scale: float | None = None,
    ci_statistics: Mapping[str, Any] | None = None,
    provenance: Mapping[str, Any] | None = None,
    allow_nonfinite: bool = False,
    limits: BundleLimits = DEFAULT_LIMITS,
) -> Path:
    """Write a ``wts.h5.zip`` that upstream PtychoPINN and this package both load exactly.

    Args:
        models: the ``diffraction_to_obj`` network (:class:`PtychoPINNNetwork` or :class:`PtychoFnoNetwork`), or
            upstream's dict form
            ``{'diffraction_to_obj': network, 'autoencoder': module_or_sentinel}``.
        path: ``out/wts.h5`` (upstream's base path, ``.zip`` appended), ``out/wts.h5.zip``, or a directory.
        config: legacy ``params.cfg`` values to record (``nphotons``, ``nepochs``, ``batch_size``, ...). The
            architecture keys are taken from the network; giving a conflicting one raises.
        intensity_scale: the physics scaling constant to record (else ``config['intensity_scale']``, else 1.0).
        ci_statistics: optional CI statistics for the metadata (docs/bundle-format.md §8.1).
        provenance: where the weights came from (e.g. the source archive's sha256 when converting), recorded as
            ``manifest["provenance"]``; plain data only (str, int, float, bool, None, lists and str-keyed dicts).
            Upstream's loaders ignore manifest keys they do not know.
        allow_nonfinite: write NaN/inf weights anyway (forensics); refused by default, as :func:`read_bundle`
            refuses them.
        limits: the :class:`BundleLimits` the bundle must load under (default: what :func:`read_bundle` uses);
            an archive the reader would refuse is not written.

    Returns:
        The archive path written. The write is atomic: a temp file in the same folder renamed into place, so an
        existing bundle survives any failure.

    Raises:
        NonFiniteWeightsError: NaN/inf weights without ``allow_nonfinite``.
        ConfigMismatchError: the configuration conflicts with the network, or its input scale is unusable.
        UnsafeBundleError: the bundle would break ``limits``.
    """
    network, autoencoder = _split_models(models)
    arch = _architecture_params(network.config)
    overrides = dict(config or {})
    for key, value in arch.items():
        if key in overrides and key != "intensity_scale.trainable" and overrides[key] != value:
            raise ConfigMismatchError(
                f"config[{short_repr(key)}]={short_repr(overrides[key])} conflicts with the network's "
                f"{key}={value!r}; the params snapshot must describe the network being saved"
            )
    overrides.update(arch)
    if intensity_scale is not None and (not isinstance(intensity_scale, (int, float)) or isinstance(intensity_scale, bool) or not math.isfinite(intensity_scale)):
        raise ValueError(f"intensity_scale must be a finite number, got {short_repr(intensity_scale)}")
    snapshot = params_module.make_params_snapshot(overrides, intensity_scale=intensity_scale)
    metadata = make_metadata(network.config, snapshot, ci_statistics=ci_statistics)
    check_input_scale(network.config, "the network being saved")
    state = _weights_payload(network)
    if isinstance(autoencoder, torch.nn.Module):
        auto_payload: Any = OrderedDict((k, v.detach().to("cpu")) for k, v in autoencoder.state_dict().items())
    else:
        auto_payload = dict(autoencoder)
    return write_bundle(
        path, state_dict=state, params=snapshot, metadata=metadata, autoencoder=auto_payload, provenance=provenance,
        allow_nonfinite=allow_nonfinite, limits=limits, source="the network being saved",
    )


def write_bundle(
    path: PathLike,
    *,
    state_dict: Mapping[str, torch.Tensor],
    params: Mapping[str, Any],
    metadata: Mapping[str, Any],
    autoencoder: Any = SENTINEL,
    provenance: Mapping[str, Any] | None = None,
    verify: bool = False,
    allow_nonfinite: bool = False,
    limits: BundleLimits = DEFAULT_LIMITS,
    source: str = "the bundle being written",
) -> Path:
    """Write already-validated parts as a bundle in upstream's layout (docs/bundle-format.md §1.3).

    The one place the member list and the manifest (models, version, backend, a sha256 per member, optional
    provenance) are put together: :func:`save_torch_bundle` and the converters all end here.

    Args:
        path: ``out/wts.h5`` (``.zip`` appended), ``out/wts.h5.zip``, any ``*.zip``, or a directory.
        state_dict: the ``diffraction_to_obj`` weights, stored unchanged (keys, order, dtypes, ``_metadata``).
        params: the ``params.dill`` snapshot (written to both model folders).
        metadata: the ``torch_scaling_metadata.pt`` dict.
        autoencoder: the ``autoencoder/model.pth`` payload (upstream's weightless sentinel by default).
        provenance: plain data recorded as ``manifest["provenance"]``.
        verify: re-read the finished archive with :func:`read_bundle` before it takes ``path``'s place, so a
            bundle that would not load is never left there.
        allow_nonfinite: write NaN/inf weights anyway (forensics); refused by default.
        limits: the caps the archive must meet with the reader's own rule (checked before it is published).
        source: what the weights are, for messages.

    Returns:
        The archive path written (atomically: an existing file survives any failure).
    """
    if not allow_nonfinite:
        check_finite_weights(state_dict, source)
    params_bytes = _pickle_bytes(dict(params))
    members = [
        (f"{INFERENCE_MODEL}/model.pth", _torch_bytes(state_dict)),
        (f"{INFERENCE_MODEL}/params.dill", params_bytes),
        (f"{AUTOENCODER_MODEL}/model.pth", _torch_bytes(autoencoder)),
        (f"{AUTOENCODER_MODEL}/params.dill", params_bytes),
        (METADATA_MEMBER, _torch_bytes(dict(metadata))),
    ]
    manifest: dict[str, Any] = {
        "models": [INFERENCE_MODEL, AUTOENCODER_MODEL],
        "version": params_module.PYTORCH_BUNDLE_VERSION,
        "backend": BACKEND,
        "sha256": {name: hashlib.sha256(data).hexdigest() for name, data in members},
    }
    if provenance is not None:
        if not isinstance(provenance, Mapping):
            raise InvalidArgumentError(f"provenance must be a dict of plain data, got {type(provenance).__name__}")
        manifest["provenance"] = _plain_provenance(provenance)
    target = resolve_bundle_path(path, for_writing=True)
    # model.pth may be as large as its own weights need (a zero-initialised network deflates ~1000:1), as the
    # reader allows for the network the metadata describes.
    genuine = {f"{INFERENCE_MODEL}/model.pth": genuine_file_bytes(stored_bytes(state_dict), len(state_dict))}
    write_zip(
        target, [(MANIFEST_MEMBER, _pickle_bytes(manifest))] + members,
        verify=(lambda written: read_bundle(written, limits=limits, allow_nonfinite=allow_nonfinite)) if verify
        else None,
        limits=limits, genuine_bytes=genuine,
    )
    _logger.info("wrote PtychoPINN bundle %s", target)
    return target
