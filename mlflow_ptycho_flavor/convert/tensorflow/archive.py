"""Reading a TensorFlow archive's zips held in memory: the outer ``wts.h5.zip`` and the nested ``model.keras``.

The source file is read once (regular files only); every member is read by name through the PyTorch reader's
capped :class:`~mlflow_ptycho_flavor.bundle.archive.ArchiveReader` plus per-member caps, and ``.dill`` members go
through the restricted unpickler (docs/bundle-format.md §9.1). Nothing is extracted to disk.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from mlflow_ptycho_flavor.bundle.archive import ArchiveReader, BundleLimits
from mlflow_ptycho_flavor.bundle.identify import SAVEDMODEL_ERA_DESCRIPTION, ArtifactKind, identify_artifact
from mlflow_ptycho_flavor.bundle.io import INFERENCE_MODEL, MANIFEST_MEMBER
from mlflow_ptycho_flavor.bundle.params import validate_params_snapshot
from mlflow_ptycho_flavor.bundle.unpickle import safe_loads
from mlflow_ptycho_flavor.errors import (
    ConfigMismatchError,
    CorruptBundleError,
    NotABundleError,
    TensorFlowConversionError,
    UnsafeBundleError,
    short_repr,
)

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
