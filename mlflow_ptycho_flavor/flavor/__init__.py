"""The ``ptycho_torch`` MLflow flavor: save, log and load PtychoPINN PyTorch models.

A saved model carries two flavors:

* ``ptycho_torch`` (native): the standalone ``wts.h5.zip`` bundle is the primary artifact at the model root, so
  it can be downloaded and loaded without MLflow (:func:`mlflow_ptycho_flavor.load_torch_bundle`), and
  upstream PtychoPINN loads it too. The MLmodel section records what a reader needs without opening the zip.
* ``python_function``: :func:`mlflow.pyfunc.load_model` returns a wrapper whose ``predict`` runs
  ``diffraction_to_obj`` on the device chosen at load time; ``mlflow models serve`` serves it.

After ``import mlflow_ptycho_flavor`` this module is also ``mlflow.ptycho_torch``.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from mlflow import pyfunc
from mlflow.exceptions import MlflowException
from mlflow.models import Model, ModelInputExample, ModelSignature
from mlflow.models.model import MLMODEL_FILE_NAME
from mlflow.protos.databricks_pb2 import (
    INVALID_PARAMETER_VALUE,
    RESOURCE_ALREADY_EXISTS,
    RESOURCE_DOES_NOT_EXIST,
)

from mlflow_ptycho_flavor import FLAVOR_NAME
from mlflow_ptycho_flavor._io import atomic_directory, file_sha256
from mlflow_ptycho_flavor.bundle import (
    BUNDLE_FILE_NAME,
    BundleContents,
    looks_like_bundle_path,
    read_bundle,
    save_torch_bundle,
)
from mlflow_ptycho_flavor.bundle.identify import ArtifactInfo, ArtifactKind, identify_artifact
from mlflow_ptycho_flavor.convert import CONVERTIBLE_KINDS, ConversionResult, convert_any, unconvertible
from mlflow_ptycho_flavor.errors import BundleError, NotABundleError, PtychoFlavorError, short_repr
from mlflow_ptycho_flavor.flavor import env as _mlflow_env
from mlflow_ptycho_flavor.flavor.env import invalid_parameter
from mlflow_ptycho_flavor.flavor.pyfunc_model import PYFUNC_MAX_CANVAS_PIXELS, PtychoTorchPyfuncModel, param_schema
from mlflow_ptycho_flavor.model.inference import PtychoTorchModel
from mlflow_ptycho_flavor.network import describe_architecture, network_classes, resolve_device

__all__ = [
    "FLAVOR_NAME",
    "save_model",
    "log_model",
    "load_model",
    "get_default_pip_requirements",
    "get_default_conda_env",
    "infer_signature",
]

_logger = logging.getLogger(__name__)

LOADER_MODULE = "mlflow_ptycho_flavor"
#: Folder of the model directory that keeps a converted TensorFlow archive byte for byte.
SOURCE_DIR = "source"
_DEVICE_ENV = "MLFLOW_DEFAULT_PREDICTION_DEVICE"


def get_default_pip_requirements() -> list[str]:
    """Pinned requirements (public versions, no ``+cpu`` tags) a serving environment needs."""
    return _mlflow_env.default_pip_requirements()


def get_default_conda_env() -> dict[str, Any]:
    """The default conda environment for models produced by this flavor."""
    return _mlflow_env.default_conda_env()


def infer_signature(contents: BundleContents | torch.nn.Module) -> ModelSignature:
    """A signature with the ``(-1, C, N, N)`` float32 output tensor spec and the params schema.

    The input is documented in the MLmodel flavor section rather than enforced as a schema, because the model
    accepts several input forms (``(B, N, N)`` arrays, dicts with a scale, DataFrames) that a single tensor
    spec would reject (see docs/mlflow-notes.md).
    """
    import numpy as np
    from mlflow.types.schema import Schema, TensorSpec

    config = contents.network_config if isinstance(contents, BundleContents) else contents.config
    c, n = config.channels, config.N
    outputs = Schema(
        [
            TensorSpec(np.dtype(np.float32), (-1, c, n, n), name="real"),
            TensorSpec(np.dtype(np.float32), (-1, c, n, n), name="imag"),
        ]
    )
    return ModelSignature(inputs=None, outputs=outputs, params=param_schema())


def _validate_model_argument(model: Any) -> None:
    if isinstance(model, network_classes()):
        return
    if isinstance(model, (str, os.PathLike)):
        return
    raise TypeError(
        "`model` must be a PtychoPINNNetwork or PtychoFnoNetwork (the diffraction_to_obj module) or a path to a "
        f"wts.h5.zip bundle, a Lightning checkpoint or a TensorFlow archive, got {type(model).__name__}"
    )


def _check_target(path: Path) -> None:
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise MlflowException(
            f"Path '{path}' already exists and is not empty; choose a new directory (nothing was written)",
            error_code=RESOURCE_ALREADY_EXISTS,
        )


def _flavor_section(
    contents: BundleContents, bundle_sha256: str, source: dict[str, Any] | None = None
) -> dict[str, Any]:
    section = {
        "bundle": BUNDLE_FILE_NAME,
        "bundle_version": contents.version,
        "backend": contents.backend,
        "bundle_sha256": bundle_sha256,
        "pytorch_version": str(torch.__version__),
        **describe_architecture(contents.network_config),
        "intensity_scale": contents.intensity_scale,
        "has_scaling_metadata": contents.metadata is not None,
        "input": "float32 (B, C, N, N) or (B, N, N) for C=1: amplitudes, or photon counts / intensities with "
                 "input_kind; optional per-sample scale",
        "output": "complex64 (B, C, N, N); JSON-safe real/imag or amp/phase forms when serving",
    }
    if source is not None:
        section["source"] = source
    return section


def _identify_model_path(model: Any, *, config: Any, autoencoder: Any, intensity_scale: Any) -> ArtifactInfo:
    """What a ``model`` path is; refuses (nothing written yet) what is neither a bundle nor convertible, and the
    network-only arguments (``intensity_scale`` is also taken when converting a Lightning checkpoint)."""
    shown = os.fspath(model)
    info = identify_artifact(model)
    scale_allowed = info.kind is ArtifactKind.LIGHTNING_CHECKPOINT
    if config is not None or autoencoder is not None or (intensity_scale is not None and not scale_allowed):
        raise invalid_parameter(
            "`config`, `autoencoder` and `intensity_scale` apply when saving a network (`intensity_scale` also "
            "when converting a Lightning checkpoint); a bundle path is stored as it is"
        )
    if info.kind is ArtifactKind.TORCH_BUNDLE:
        try:
            read_bundle(model)
        except BundleError as exc:
            raise invalid_parameter(f"`model` path {shown!r} is not a loadable bundle: {exc}") from exc
    elif info.kind not in CONVERTIBLE_KINDS:
        error = unconvertible(info)
        raise invalid_parameter(f"`model` path {shown!r} is not a loadable bundle: {error}") from error
    return info


def validate_model_path(model: str | os.PathLike) -> None:
    """Refuse, before anything is logged, a ``model`` path :func:`log_model` would refuse: a bundle that does not
    load, or a file that is neither a bundle nor convertible (what ``ptycho-flavor log`` checks before it starts a
    run, so a refused log leaves no run behind).

    Raises:
        MlflowException: ``INVALID_PARAMETER_VALUE``, naming the path and what it is.
    """
    _identify_model_path(model, config=None, autoencoder=None, intensity_scale=None)


def _convert_into(model: Any, bundle_path: Path, staging: Path, intensity_scale: float | None) -> dict[str, Any]:
    """Convert a checkpoint or TF archive to ``bundle_path``; a TF archive is also kept under ``source/``.

    Returns:
        The MLmodel flavor section's ``source`` record: kind, file name, sha256, size, and the stored copy.
    """
    try:
        result: ConversionResult = convert_any(model, bundle_path, intensity_scale=intensity_scale)
    except PtychoFlavorError as exc:
        raise invalid_parameter(f"`model` path {os.fspath(model)!r} could not be converted into a bundle: {exc}") from exc
    record: dict[str, Any] = {
        "kind": result.source_kind.value,
        "file_name": result.source.name,
        "sha256": result.source_sha256,
        "size_bytes": result.source_size,
    }
    if result.source_kind is ArtifactKind.TENSORFLOW_ARCHIVE:
        stored = staging / SOURCE_DIR / result.source.name
        stored.parent.mkdir()
        shutil.copyfile(result.source, stored)
        if file_sha256(stored) != result.source_sha256:
            raise invalid_parameter(
                f"{result.source} changed while it was being logged (its sha256 no longer matches the bytes "
                "converted); log it again once nothing writes to it"
            )
        record["artifact"] = f"{SOURCE_DIR}/{result.source.name}"
    return record


def save_model(
    model: Any,
    path: str | os.PathLike,
    *,
    config: dict[str, Any] | None = None,
    autoencoder: Any = None,
    intensity_scale: float | None = None,
    signature: ModelSignature | None = None,
    input_example: ModelInputExample | None = None,
    pip_requirements: Any = None,
    extra_pip_requirements: Any = None,
    conda_env: Any = None,
    code_paths: list[str] | None = None,
    mlflow_model: Model | None = None,
    metadata: dict[str, Any] | None = None,
    model_config: dict[str, Any] | None = None,
    bundle_package: bool = True,
) -> None:
    """Save a PtychoPINN model as an MLflow model directory whose primary artifact is ``wts.h5.zip``.

    Args:
        model: the ``diffraction_to_obj`` network (``PtychoPINNNetwork`` or ``PtychoFnoNetwork``), or a path to
            an existing ``wts.h5.zip`` (validated, then stored byte for byte - bundles trained by upstream are
            logged as they are), or to a Lightning checkpoint (``*.ckpt``) or TensorFlow archive, converted exactly into the model's bundle
            (:func:`mlflow_ptycho_flavor.convert.convert_any`). A TensorFlow archive is also stored byte for byte
            as ``source/<name>``; the flavor section's ``source`` records the kind, sha256 and size of what was
            converted. Anything else (a bare state_dict, an MLflow model directory, unknown bytes) is refused
            naming what it is.
        path: the model directory to create (must not exist, or be empty).
        config: legacy ``params.cfg`` values recorded in the bundle when saving a network (``nphotons``, ...).
        autoencoder: optional autoencoder module (default: upstream's weightless sentinel).
        intensity_scale: the physics scaling constant recorded in ``params.dill`` (when saving a network or
            converting a Lightning checkpoint).
        signature: model signature; inferred (output tensors + params schema) when omitted.
        input_example: an input example to store with the model.
        pip_requirements, extra_pip_requirements, conda_env: environment overrides, as in ``mlflow.pytorch``.
        code_paths: local code to ship with the model (e.g. this package's folder for a plain checkout).
        mlflow_model: the :class:`mlflow.models.Model` to add flavors to (``Model.log`` passes one).
        metadata: custom metadata stored in MLmodel.
        model_config: load-time options declared for ``pyfunc.load_model(..., model_config=...)``; ``device``
            is always declared.
        bundle_package: store a wheel of this package (built from the code running now) as ``wheels/<wheel>``
            and point the requirements at it (``--find-links wheels``), so an environment built from the model
            alone installs it: the package is on no index. Pass False when the deployment can install
            ``mlflow-ptycho-flavor`` from an index of its own.

    Raises:
        MlflowException: bad arguments (nothing is written) or an existing non-empty ``path``.
    """
    _mlflow_env.validate_env_arguments(conda_env, pip_requirements, extra_pip_requirements)
    _validate_model_argument(model)
    if model_config is not None and not isinstance(model_config, dict):
        raise invalid_parameter(f"`model_config` must be a dict, got {type(model_config).__name__}")
    target = Path(os.fspath(path)).resolve()
    _check_target(target)
    source_info = None
    if not isinstance(model, network_classes()):
        source_info = _identify_model_path(model, config=config, autoencoder=autoencoder, intensity_scale=intensity_scale)

    with atomic_directory(target) as staging:
        bundle_path = staging / BUNDLE_FILE_NAME
        source_record = None
        if source_info is not None and source_info.kind is ArtifactKind.TORCH_BUNDLE:
            shutil.copyfile(source_info.path, bundle_path)
        elif source_info is not None:
            source_record = _convert_into(model, bundle_path, staging, intensity_scale)
        else:
            models: dict[str, Any] = {"diffraction_to_obj": model}
            if autoencoder is not None:
                models["autoencoder"] = autoencoder
            save_torch_bundle(models, bundle_path, config, intensity_scale=intensity_scale)
        contents = read_bundle(bundle_path)

        mlflow_model = mlflow_model if mlflow_model is not None else Model()
        if signature is None and input_example is None:
            signature = infer_signature(contents)
        if signature is not None:
            mlflow_model.signature = signature
        if input_example is not None:
            _mlflow_env.save_input_example(mlflow_model, input_example, str(staging))
        if metadata is not None:
            mlflow_model.metadata = metadata
        code_dir = _mlflow_env.copy_code_paths(code_paths, str(staging))
        mlflow_model.add_flavor(
            FLAVOR_NAME, code=code_dir, **_flavor_section(contents, file_sha256(bundle_path), source_record)
        )
        pyfunc.add_to_model(
            mlflow_model,
            loader_module=LOADER_MODULE,
            data=BUNDLE_FILE_NAME,
            code=code_dir,
            conda_env=_mlflow_env.CONDA_ENV_FILE_NAME,
            python_env=_mlflow_env.PYTHON_ENV_FILE_NAME,
            model_config={"device": None, "channels_last": None, **(model_config or {})},
        )
        mlflow_model.save(str(staging / MLMODEL_FILE_NAME))
        _mlflow_env.write_environment_files(
            str(staging),
            conda_env=conda_env,
            pip_requirements=pip_requirements,
            extra_pip_requirements=extra_pip_requirements,
            bundle_package=bundle_package,
        )
        _check_target(target)


def log_model(
    model: Any,
    name: str | None = None,
    *,
    config: dict[str, Any] | None = None,
    autoencoder: Any = None,
    intensity_scale: float | None = None,
    signature: ModelSignature | None = None,
    input_example: ModelInputExample | None = None,
    pip_requirements: Any = None,
    extra_pip_requirements: Any = None,
    conda_env: Any = None,
    code_paths: list[str] | None = None,
    registered_model_name: str | None = None,
    await_registration_for: int = _mlflow_env.DEFAULT_AWAIT_MAX_SLEEP_SECONDS,
    metadata: dict[str, Any] | None = None,
    model_config: dict[str, Any] | None = None,
    bundle_package: bool = True,
    **kwargs: Any,
):
    """Log a PtychoPINN model (network, ``wts.h5.zip``, ``.ckpt`` or TF archive path) as an MLflow model; see
    :func:`save_model`.

    Works with or without an active run (MLflow starts one when needed). ``registered_model_name`` also
    registers a model version. Extra keyword arguments (``params``, ``tags``, ``model_type``, ``step``,
    ``model_id``) go to :meth:`mlflow.models.Model.log`.

    Returns:
        :class:`mlflow.models.model.ModelInfo` of the logged model.
    """
    import sys

    return Model.log(
        artifact_path=None,
        name=name or "model",
        flavor=sys.modules[__name__],
        model=model,
        config=config,
        autoencoder=autoencoder,
        intensity_scale=intensity_scale,
        signature=signature,
        input_example=input_example,
        pip_requirements=pip_requirements,
        extra_pip_requirements=extra_pip_requirements,
        conda_env=conda_env,
        code_paths=code_paths,
        registered_model_name=registered_model_name,
        await_registration_for=await_registration_for,
        metadata=metadata,
        model_config=model_config,
        bundle_package=bundle_package,
        **kwargs,
    )


def _load_native(
    bundle_path: str | os.PathLike, device: Any, *, channels_last: bool | None = None
) -> PtychoTorchModel:
    """:meth:`PtychoTorchModel.from_bundle`, with the package's errors turned into ``MlflowException``."""
    try:
        return PtychoTorchModel.from_bundle(bundle_path, device, channels_last=channels_last)
    except BundleError as exc:
        code = RESOURCE_DOES_NOT_EXIST if isinstance(exc, NotABundleError) else INVALID_PARAMETER_VALUE
        raise MlflowException(f"cannot load the ptycho_torch bundle {os.fspath(bundle_path)}: {exc}", error_code=code) from exc
    except ValueError as exc:  # bad device
        raise invalid_parameter(str(exc)) from exc


def load_model(
    model_uri: str, dst_path: str | None = None, *, device: Any = None, channels_last: bool | None = None
) -> PtychoTorchModel:
    """Load a ``ptycho_torch`` model as a native :class:`~mlflow_ptycho_flavor.inference.PtychoTorchModel`.

    Args:
        model_uri: any MLflow model URI (local directory, ``runs:/<run_id>/model``, ``models:/name/1``,
            ``models:/name@alias``, ``models:/m-<id>``), or a bare ``wts.h5.zip`` path.
        dst_path: where to download remote artifacts (a temporary directory by default).
        device: ``None``/``"auto"``, ``"cpu"``, ``"cuda:0"``, ...
        channels_last: NHWC memory format for the convolutions; ``None`` (default) turns it on on the CPU,
            where it is faster (see :meth:`PtychoTorchModel.from_bundle`).

    Returns:
        The network on its device, with the params, manifest and metadata, and a ``predict`` method.
    """
    model_uri = os.fspath(model_uri)
    if looks_like_bundle_path(model_uri):
        return _load_native(model_uri, device, channels_last=channels_last)
    local_path = _mlflow_env.download_model(model_uri, dst_path)
    flavor_conf = _mlflow_env.flavor_configuration(local_path, FLAVOR_NAME)
    _mlflow_env.add_code_to_system_path(local_path, flavor_conf)
    _warn_on_torch_version_change(flavor_conf)
    return _load_native(
        os.path.join(local_path, flavor_conf.get("bundle", BUNDLE_FILE_NAME)), device, channels_last=channels_last
    )


def _warn_on_torch_version_change(flavor_conf: dict[str, Any]) -> None:
    import torch

    saved = flavor_conf.get("pytorch_version")
    if saved and saved != str(torch.__version__):
        _logger.warning(
            "Stored model was saved with torch %s but torch %s is installed; the state_dict format is stable, "
            "but outputs may differ in the last bits",
            saved,
            torch.__version__,
        )


def _resolve_pyfunc_device(model_config: dict[str, Any] | None) -> Any:
    device = (model_config or {}).get("device")
    if device in (None, ""):
        device = os.environ.get(_DEVICE_ENV) or None
    return device


def _load_pyfunc(path: str, model_config: dict[str, Any] | None = None) -> PtychoTorchPyfuncModel:
    """pyfunc loader: ``path`` is the ``wts.h5.zip`` in the model directory (the pyfunc ``data`` entry)."""
    device = _resolve_pyfunc_device(model_config)
    try:
        resolve_device(device)
    except ValueError as exc:
        raise invalid_parameter(f"{exc} (set via model_config['device'] or {_DEVICE_ENV})") from exc
    channels_last = (model_config or {}).get("channels_last")
    if channels_last is not None and not isinstance(channels_last, bool):
        raise invalid_parameter(
            f"model_config['channels_last'] must be true, false or null (the default: on for the CPU), got "
            f"{short_repr(channels_last)}"
        )
    max_canvas_pixels = (model_config or {}).get("max_canvas_pixels") or PYFUNC_MAX_CANVAS_PIXELS
    _mlflow_env.guard_scoring_server()  # a no-op outside the scoring server
    model = _load_native(path, device, channels_last=channels_last)
    try:
        return PtychoTorchPyfuncModel(model, max_canvas_pixels=max_canvas_pixels)
    except PtychoFlavorError as exc:
        raise invalid_parameter(f"{exc} (model_config['max_canvas_pixels'])") from exc

