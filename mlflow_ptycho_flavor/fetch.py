"""Fetch a logged model's bundle to where a consumer expects it, verified, with ``mlflow-skinny`` alone.

ptychodus (the beamline application) depends on ``mlflow-skinny``, which has no pandas, so the flavor module
(:mod:`mlflow_ptycho_flavor.flavor`, whose ``mlflow.models`` imports need pandas) cannot load there. This module
needs neither: it downloads the model with :func:`mlflow.artifacts.download_artifacts` (part of
``mlflow-skinny``; resolves ``models:/name@alias``, ``models:/name/3``, ``runs:/<run_id>/<name>``, logged-model
``models:/m-...`` URIs and local model directories), reads the ``MLmodel`` YAML itself, checks the bundle against
the ``bundle_sha256`` that ``save_model`` recorded there, and writes it atomically (:mod:`._io`) in one of three
layouts:

============== ===============================================================================================
``model.zip``  ``<to>/model.zip``: what ptychodus's batch mode reads from its input folder
``wts.h5.zip`` ``<to>/wts.h5.zip``: the plain bundle name, what upstream PtychoPINN's loaders take (a folder holding
               ``wts.h5.zip``, or the base path ``<to>/wts.h5``)
``dir``        ``<to>`` becomes the whole MLflow model directory (``MLmodel``, environment files, the bundle at
               its root): a local copy that ``ptycho-flavor predict``, ``mlflow models serve -m`` and upstream's
               folder loaders all take. ``<to>`` must be absent or empty.
============== ===============================================================================================

A bundle whose bytes differ from the recorded hash raises :class:`~.errors.BundleHashMismatchError` and nothing is
written: the download goes to a temporary folder (removed on every outcome), the hash is checked before anything
is created at the target, and checked again on the written copy before it is renamed into place.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlflow_ptycho_flavor._io import PathLike, atomic_directory, atomic_write, file_sha256
from mlflow_ptycho_flavor.errors import (
    BundleHashMismatchError,
    InvalidArgumentError,
    ModelFetchError,
    short_repr,
)

__all__ = ["FETCH_LAYOUTS", "FetchedBundle", "fetch_bundle"]

#: The layouts :func:`fetch_bundle` writes (see the module docstring).
FETCH_LAYOUTS: tuple[str, ...] = ("model.zip", "wts.h5.zip", "dir")
_FLAVOR = "ptycho_torch"  # the flavor's MLmodel key (mlflow_ptycho_flavor.FLAVOR_NAME)
_MLMODEL = "MLmodel"
#: An MLmodel is a few kB of YAML; anything far larger is not one this package wrote.
_MAX_MLMODEL_BYTES = 1 << 20
_SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class FetchedBundle:
    """What :func:`fetch_bundle` wrote.

    Attributes:
        model_uri: the URI fetched.
        layout: ``"model.zip"``, ``"wts.h5.zip"`` or ``"dir"``.
        path: the file written, or the model directory for ``"dir"``.
        bundle: the bundle file itself (``path`` for the file layouts).
        sha256: the bundle's sha256, equal to the MLmodel's ``bundle_sha256``.
        size_bytes: the bundle's size.
    """

    model_uri: str
    layout: str
    path: Path
    bundle: Path
    sha256: str
    size_bytes: int


def _check_target(to: Path, layout: str) -> Path:
    """The path to write; refuses, before any download, targets that cannot receive the layout."""
    if layout not in FETCH_LAYOUTS:
        raise InvalidArgumentError(f"layout {short_repr(layout)} is not one of {FETCH_LAYOUTS}")
    if layout == "dir":
        if to.exists() and (not to.is_dir() or any(to.iterdir())):
            raise InvalidArgumentError(
                f"{short_repr(str(to))} already exists and is not an empty folder; the 'dir' layout makes it the "
                "model directory: give a new folder, or use the 'model.zip' / 'wts.h5.zip' layouts to write a file "
                "into an existing one"
            )
        return to
    if to.exists() and not to.is_dir():
        raise InvalidArgumentError(f"{short_repr(str(to))} is a file; --to names the folder to write {layout} into")
    target = to / layout
    if target.is_dir():
        raise InvalidArgumentError(f"{short_repr(str(target))} is a folder; remove it or choose another --to")
    return target


def _download(model_uri: str, into: Path) -> Path:
    """Download the model at ``model_uri`` under ``into``; returns the model's root folder."""
    try:
        from mlflow.artifacts import download_artifacts
    except ImportError as exc:
        raise ModelFetchError(
            f"fetching a model needs MLflow ({type(exc).__name__}: {str(exc)[:200]}); mlflow-skinny is enough: "
            "pip install mlflow-skinny"
        ) from exc
    return Path(download_artifacts(artifact_uri=model_uri, dst_path=str(into)))


def _read_flavor_section(root: Path, model_uri: str) -> tuple[str, str]:
    """The bundle's file name and recorded sha256 from ``root/MLmodel`` (plain YAML; no MLflow model classes)."""
    import yaml

    shown = short_repr(model_uri)
    mlmodel = root / _MLMODEL
    if not mlmodel.is_file():
        raise ModelFetchError(
            f"{shown} holds no MLmodel file, so it is not an MLflow model: point at the model itself "
            "(models:/<name>@<alias>, models:/<name>/<version>, runs:/<run_id>/<model name> or a model directory)"
        )
    if mlmodel.stat().st_size > _MAX_MLMODEL_BYTES:
        raise ModelFetchError(f"the MLmodel of {shown} is larger than {_MAX_MLMODEL_BYTES} bytes; it is not one "
                              "mlflow-ptycho-flavor wrote")
    try:
        document: Any = yaml.safe_load(mlmodel.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ModelFetchError(f"the MLmodel of {shown} is not readable YAML ({type(exc).__name__})") from exc
    flavors = document.get("flavors") if isinstance(document, dict) else None
    section = flavors.get(_FLAVOR) if isinstance(flavors, dict) else None
    if not isinstance(section, dict):
        names = sorted(map(str, flavors))[:10] if isinstance(flavors, dict) else []
        raise ModelFetchError(
            f"{shown} is not a {_FLAVOR} model (its MLmodel lists flavors {names}); fetch takes models logged with "
            "mlflow_ptycho_flavor.log_model or `ptycho-flavor log`"
        )
    name, expected = section.get("bundle", "wts.h5.zip"), section.get("bundle_sha256")
    if not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name:
        raise ModelFetchError(f"the MLmodel of {shown} names the bundle {short_repr(name)}, not a file at the model "
                              "root; re-log the model with ptycho-flavor log")
    if not isinstance(expected, str) or not _SHA256.fullmatch(expected):
        raise ModelFetchError(
            f"the MLmodel of {shown} records no valid bundle_sha256 (found {short_repr(expected)}), so the download "
            "cannot be verified; re-log the model with this package (save_model records the hash)"
        )
    return name, expected


def _verify(path: Path, expected: str, model_uri: str) -> None:
    actual = file_sha256(path)
    if actual != expected:
        raise BundleHashMismatchError(
            f"the bundle downloaded from {short_repr(model_uri)} has sha256 {actual}, but its MLmodel records "
            f"bundle_sha256 {expected}: the stored copy is damaged or was replaced after logging. Nothing was "
            "written; re-log the model from a good bundle"
        )


def fetch_bundle(model_uri: str, to: PathLike, *, layout: str = "model.zip") -> FetchedBundle:
    """Download the bundle of the ``ptycho_torch`` model at ``model_uri`` into ``to``, verified by its sha256.

    Uses only what ``mlflow-skinny`` has (the tracking and registry URIs are MLflow's: ``mlflow.set_tracking_uri``
    / ``set_registry_uri`` or ``MLFLOW_TRACKING_URI``); never imports pandas or the flavor module.

    Args:
        model_uri: ``models:/<name>@<alias>``, ``models:/<name>/<version>``, ``runs:/<run_id>/<model name>``, a
            logged-model ``models:/m-...`` URI or a local model directory.
        to: the folder to write into (created when missing); for ``layout="dir"`` the model directory itself.
        layout: ``"model.zip"`` (ptychodus's batch input), ``"wts.h5.zip"`` (upstream's name) or ``"dir"``.

    Returns:
        :class:`FetchedBundle`: what was written and the verified hash.

    Raises:
        InvalidArgumentError: an unknown layout, or a target that cannot take it (checked before downloading).
        ModelFetchError: ``model_uri`` is not a ``ptycho_torch`` model, or its MLmodel records no usable bundle
            name or hash.
        BundleHashMismatchError: the downloaded bundle differs from the recorded hash.
        MlflowException: MLflow cannot resolve or download ``model_uri``.
    """
    to_path = Path(os.fspath(to)).absolute()
    target = _check_target(to_path, layout)
    download_dir = Path(tempfile.mkdtemp(prefix="ptycho-fetch-"))
    try:
        root = _download(model_uri, download_dir)
        name, expected = _read_flavor_section(root, model_uri)
        downloaded = root / name
        if downloaded.is_symlink() or not downloaded.is_file():
            raise ModelFetchError(f"{short_repr(model_uri)} has no bundle file {short_repr(name)} at its root, "
                                  "though its MLmodel names it; the model directory is incomplete")
        size = downloaded.stat().st_size
        _verify(downloaded, expected, model_uri)  # before anything is created at the target
        if layout == "dir":
            with atomic_directory(target) as staging:
                for entry in root.iterdir():
                    shutil.move(str(entry), str(staging / entry.name))
                _verify(staging / name, expected, model_uri)
            bundle = target / name
        else:
            def copy(handle: Any) -> None:
                with open(downloaded, "rb") as source:
                    shutil.copyfileobj(source, handle, 1 << 20)

            # Checked again on the written temporary file, so exactly the verified bytes are renamed into place.
            bundle = atomic_write(target, copy, verify=lambda written: _verify(written, expected, model_uri))
    finally:
        shutil.rmtree(download_dir, ignore_errors=True)
    return FetchedBundle(model_uri=model_uri, layout=layout, path=target, bundle=bundle, sha256=expected,
                         size_bytes=size)
