"""Read and write standalone ``wts.h5.zip`` bundles in upstream PtychoPINN's PyTorch layout.

Layout written (spec §1.3, §7): ``manifest.dill``, ``diffraction_to_obj/model.pth`` (state_dict),
``diffraction_to_obj/params.dill``, ``autoencoder/model.pth`` (``{'_sentinel': 'autoencoder'}``),
``autoencoder/params.dill`` (the same snapshot), and ``torch_scaling_metadata.pt`` (the torch configs upstream's
metadata-aware loader rebuilds the network from). The manifest adds ``backend`` and a sha256 per member, which
upstream ignores.

The reader never extracts to disk: it reads named members into memory with size caps, refuses path tricks,
symlinks, duplicate names and zip bombs, decodes ``.dill`` members with a restricted unpickler and ``.pth`` /
``.pt`` members with ``torch.load(weights_only=True)``, verifies hashes when present, restores the params
snapshot into the global config (CONFIG-001) before building the network, and loads the weights strictly.
Nothing here imports MLflow.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import logging
import math
import os
import stat
import tempfile
import zipfile
import zlib
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import torch

from . import params as params_module
from .errors import (
    ArchitectureEraError,
    ConfigMismatchError,
    CorruptBundleError,
    NotABundleError,
    StateDictMismatchError,
    TensorFlowBundleError,
    UnsafeBundleError,
    UnsupportedBundleError,
)
from .metadata import (
    check_params_agree,
    make_metadata,
    network_config_from_metadata,
    network_config_from_params,
    validate_metadata,
)
from .network import NetworkConfig, PtychoPINNNetwork
from .safe_pickle import safe_loads

__all__ = [
    "BUNDLE_FILE_NAME",
    "BundleLimits",
    "BundleContents",
    "resolve_bundle_path",
    "read_bundle",
    "load_torch_bundle",
    "save_torch_bundle",
    "resolve_device",
]

_logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]

BUNDLE_FILE_NAME = "wts.h5.zip"
MANIFEST_MEMBER = "manifest.dill"
METADATA_MEMBER = "torch_scaling_metadata.pt"
INFERENCE_MODEL = "diffraction_to_obj"
AUTOENCODER_MODEL = "autoencoder"
MODEL_NAMES = (INFERENCE_MODEL, AUTOENCODER_MODEL)
SENTINEL = {"_sentinel": "autoencoder"}
BACKEND = "pytorch"
_PICKLE_PROTOCOL = 4  # dill's default on Python <= 3.13, what upstream writes
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)


@dataclass(frozen=True)
class BundleLimits:
    """Caps that keep a hostile archive from exhausting memory (all configurable).

    Attributes:
        max_members: most entries the central directory may list.
        max_member_bytes: largest uncompressed member.
        max_total_bytes: largest sum of uncompressed sizes of the members read.
        max_compression_ratio: largest uncompressed/compressed ratio for members above ``ratio_floor_bytes``.
        ratio_floor_bytes: members smaller than this are exempt from the ratio check (tiny pickles compress
            well legitimately).
    """

    max_members: int = 64
    max_member_bytes: int = 2 * 1024**3
    max_total_bytes: int = 4 * 1024**3
    max_compression_ratio: float = 200.0
    ratio_floor_bytes: int = 1024 * 1024


DEFAULT_LIMITS = BundleLimits()


@dataclass
class BundleContents:
    """Everything decoded from a bundle, before or after the network is built.

    Attributes:
        path: the archive read.
        manifest: the decoded ``manifest.dill``.
        params: the ``params.dill`` snapshot (identical in every model folder).
        metadata: the validated ``torch_scaling_metadata.pt`` dict, or None when the bundle has none.
        network_config: the configuration the network is built from.
        state_dict: the ``diffraction_to_obj`` weights (CPU tensors).
        hashes_verified: member names whose sha256 matched the manifest.
        member_sizes: uncompressed size of every member.
    """

    path: Path
    manifest: dict[str, Any]
    params: dict[str, Any]
    metadata: dict[str, Any] | None
    network_config: NetworkConfig
    state_dict: "OrderedDict[str, torch.Tensor]"
    hashes_verified: list[str] = field(default_factory=list)
    member_sizes: dict[str, int] = field(default_factory=dict)

    @property
    def version(self) -> str:
        return self.manifest["version"]

    @property
    def backend(self) -> str:
        return self.manifest.get("backend", BACKEND)

    @property
    def intensity_scale(self) -> float | None:
        value = self.params.get("intensity_scale")
        return float(value) if value is not None else None

    def build_network(self, device: str | torch.device | None = None) -> PtychoPINNNetwork:
        """Build the network from :attr:`network_config`, strict-load the weights, eval mode, on ``device``."""
        network = PtychoPINNNetwork(self.network_config)
        _strict_load(network, self.state_dict)
        return network.to(resolve_device(device)).eval()


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None`` or ``"auto"`` -> CUDA when available, else CPU; anything else as given (validated)."""
    if device is None or (isinstance(device, str) and device.strip().lower() == "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device={device!r} is not a valid torch device (use 'auto', 'cpu' or 'cuda:0')") from exc
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} was requested but CUDA is not available here; use 'cpu' or 'auto'")
    return resolved


def resolve_bundle_path(path: PathLike, *, for_writing: bool = False) -> Path:
    """Map the accepted path forms to the archive path.

    ``out/wts.h5`` (upstream's base path) -> ``out/wts.h5.zip``; a directory -> ``<dir>/wts.h5.zip``; a path
    ending in ``.zip`` is used as is.
    """
    p = Path(os.fspath(path)).expanduser()
    if p.suffix == ".zip":
        return p
    if p.is_dir():
        return p / BUNDLE_FILE_NAME
    if for_writing or not p.exists():
        return p.with_name(p.name + ".zip")
    return p


# ----------------------------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------------------------
def _check_member_name(name: str) -> None:
    parts = name.replace("\\", "/").split("/")
    bad = (
        name.startswith(("/", "\\"))
        or "\\" in name
        or "\x00" in name
        or (len(name) >= 2 and name[1] == ":")
        or any(part in ("..", ".") for part in parts)
    )
    if bad:
        raise UnsafeBundleError(
            f"archive member name {name!r} is absolute or escapes the archive (.., drive letter, backslash); "
            "a bundle never needs such names, so the archive is refused"
        )


class _ArchiveReader:
    """In-memory, size-capped access to the members of a zip archive."""

    def __init__(self, path: Path, limits: BundleLimits) -> None:
        self.path = path
        self.limits = limits
        self._total = 0
        try:
            self._zip = zipfile.ZipFile(path, "r")
        except FileNotFoundError as exc:
            raise NotABundleError(f"no bundle at {path}: the file does not exist") from exc
        except IsADirectoryError as exc:
            raise NotABundleError(f"{path} is a directory, not a wts.h5.zip archive") from exc
        except zipfile.BadZipFile as exc:
            raise NotABundleError(
                f"{path} is not a zip archive ({exc}); a PtychoPINN bundle is a wts.h5.zip written by "
                "save_torch_bundle or upstream's model manager - check the path, or re-download a truncated file"
            ) from exc
        except (OSError, ValueError, EOFError) as exc:
            raise CorruptBundleError(f"{path} cannot be read as a zip archive: {exc}") from exc
        try:
            self._infos = self._index()
        except BaseException:
            self._zip.close()
            raise

    def _index(self) -> dict[str, zipfile.ZipInfo]:
        infos = self._zip.infolist()
        if len(infos) > self.limits.max_members:
            raise UnsafeBundleError(
                f"{self.path} lists {len(infos)} members (limit {self.limits.max_members}); a bundle has 6"
            )
        index: dict[str, zipfile.ZipInfo] = {}
        for info in infos:
            _check_member_name(info.filename)
            if info.filename in index:
                raise UnsafeBundleError(
                    f"{self.path} holds the member {info.filename!r} twice; which copy a reader sees would be "
                    "ambiguous, so the archive is refused"
                )
            mode = (info.external_attr >> 16) & 0xFFFF
            if stat.S_ISLNK(mode):
                raise UnsafeBundleError(f"{self.path}: member {info.filename!r} is a symbolic link; refused")
            index[info.filename] = info
        return index

    @property
    def names(self) -> list[str]:
        return list(self._infos)

    def __contains__(self, name: str) -> bool:
        return name in self._infos

    def size(self, name: str) -> int:
        return self._infos[name].file_size

    def read(self, name: str) -> bytes:
        info = self._infos.get(name)
        if info is None:
            raise CorruptBundleError(
                f"{self.path} lacks the member {name!r}; members present: {sorted(self._infos)}"
            )
        limits = self.limits
        if info.file_size > limits.max_member_bytes:
            raise UnsafeBundleError(
                f"member {name!r} expands to {info.file_size} bytes, over the per-member cap of "
                f"{limits.max_member_bytes} (BundleLimits.max_member_bytes)"
            )
        if self._total + info.file_size > limits.max_total_bytes:
            raise UnsafeBundleError(
                f"members read so far expand past the total cap of {limits.max_total_bytes} bytes "
                "(BundleLimits.max_total_bytes)"
            )
        if info.file_size >= limits.ratio_floor_bytes:
            ratio = info.file_size / max(info.compress_size, 1)
            if ratio > limits.max_compression_ratio:
                raise UnsafeBundleError(
                    f"member {name!r} has a compression ratio of {ratio:.0f}:1, over the cap of "
                    f"{limits.max_compression_ratio:.0f}:1 (a zip bomb?); raise BundleLimits.max_compression_ratio "
                    "if the file is trusted"
                )
        try:
            # zipfile stops at the declared size and checks the CRC, so memory is bounded by the caps above.
            with self._zip.open(info) as handle:
                data = handle.read(info.file_size + 1)
        except zipfile.BadZipFile as exc:
            raise CorruptBundleError(f"member {name!r} of {self.path} is damaged: {exc}") from exc
        except (OSError, EOFError, ValueError, zlib.error) as exc:
            raise CorruptBundleError(f"member {name!r} of {self.path} cannot be decompressed: {exc}") from exc
        except NotImplementedError as exc:
            raise UnsupportedBundleError(f"member {name!r} uses an unsupported zip feature: {exc}") from exc
        if len(data) != info.file_size:
            raise CorruptBundleError(
                f"member {name!r} of {self.path} decompressed to {len(data)} bytes, header says {info.file_size}"
            )
        self._total += len(data)
        return data

    def close(self) -> None:
        self._zip.close()


def _decode_manifest(reader: _ArchiveReader, allow_unsafe: bool | None) -> dict[str, Any]:
    if MANIFEST_MEMBER not in reader:
        if any(n.endswith("model.keras") for n in reader.names):
            raise TensorFlowBundleError(
                f"{reader.path} holds model.keras files but no manifest.dill: a TensorFlow PtychoPINN archive; "
                "load it with upstream's TensorFlow ModelManager, not the PyTorch loader"
            )
        raise CorruptBundleError(
            f"{reader.path} has no manifest.dill: not a PtychoPINN bundle (members: {sorted(reader.names)[:10]})"
        )
    manifest = safe_loads(reader.read(MANIFEST_MEMBER), member=MANIFEST_MEMBER, allow_unsafe=allow_unsafe)
    if not isinstance(manifest, dict):
        raise CorruptBundleError(
            f"manifest.dill must hold a dict {{'models': [...], 'version': ...}}, got {type(manifest).__name__}"
        )
    version = manifest.get("version")
    models = manifest.get("models")
    if version == "1.0" or any(n.endswith("model.keras") for n in reader.names):
        raise TensorFlowBundleError(
            f"{reader.path} is a TensorFlow PtychoPINN archive (manifest version {version!r}, model.keras "
            "members): this PyTorch loader cannot rebuild Keras models; load it with upstream's TensorFlow "
            "loader (ptycho.model_manager.ModelManager.load_multiple_models), or re-train with the PyTorch backend"
        )
    if not isinstance(version, str):
        raise CorruptBundleError(f"manifest.dill['version'] must be a str, got {version!r}")
    if version != params_module.PYTORCH_BUNDLE_VERSION:
        raise UnsupportedBundleError(
            f"manifest version {version!r} is not supported; this loader reads "
            f"{params_module.PYTORCH_BUNDLE_VERSION!r} bundles"
        )
    if not isinstance(models, list) or not models or not all(isinstance(m, str) for m in models):
        raise CorruptBundleError(f"manifest.dill['models'] must be a non-empty list of names, got {models!r}")
    if INFERENCE_MODEL not in models:
        raise CorruptBundleError(
            f"manifest lists models {models} but not {INFERENCE_MODEL!r}, the network inference needs"
        )
    backend = manifest.get("backend", BACKEND)
    if backend != BACKEND:
        raise UnsupportedBundleError(f"manifest backend {backend!r} is not supported; expected {BACKEND!r}")
    hashes = manifest.get("sha256")
    if hashes is not None and (
        not isinstance(hashes, dict)
        or not all(isinstance(k, str) and isinstance(v, str) for k, v in hashes.items())
    ):
        raise CorruptBundleError("manifest.dill['sha256'] must map member names to hex digests")
    return manifest


def _verify_hash(manifest: Mapping[str, Any], name: str, data: bytes, verified: list[str]) -> None:
    expected = (manifest.get("sha256") or {}).get(name)
    if expected is None:
        return
    actual = hashlib.sha256(data).hexdigest()
    if actual != expected.lower():
        raise CorruptBundleError(
            f"member {name!r} does not match the sha256 recorded in manifest.dill (expected {expected[:16]}..., "
            f"got {actual[:16]}...): the bundle was modified or damaged after it was written"
        )
    verified.append(name)


def _torch_load(data: bytes, member: str) -> Any:
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, ValueError, ...
        text = str(exc)
        if "Weights only load failed" in text or "Unsupported global" in text or "weights_only" in text:
            first_line = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
            raise UnsafeBundleError(
                f"{member} needs arbitrary Python objects to unpickle and was refused by "
                f"torch.load(weights_only=True): {first_line}"
            ) from exc
        raise CorruptBundleError(f"{member} is not a valid torch file: {type(exc).__name__}: {text[:300]}") from exc


def _detect_era(state_dict: Mapping[str, torch.Tensor], cfg: NetworkConfig) -> None:
    """Refuse state_dicts of upstream eras E0-E2 (spec §3.6), whose forward cannot be reproduced."""
    keys = set(state_dict)
    merge = sorted(k for k in keys if ".merge_blocks." in k)
    if merge:
        raise ArchitectureEraError(
            f"this state_dict is from upstream's E1 era (UNet skip merges, 2026-04-21..2026-07-09): keys such as "
            f"{merge[:2]} exist only there and its heads are real/imag with a different forward; this loader "
            "builds the current (E3) network only. Re-export the model with current PtychoPINN"
        )
    if cfg.mode == "Unsupervised" and "model.forward_model.alpha" in keys and (
        "model.forward_model.rect_scaler.s1" not in keys
    ):
        raise ArchitectureEraError(
            "this state_dict is from upstream's E0 era (no model.forward_model.rect_scaler.s1/s2, legacy heads): "
            "its forward differs from the current (E3) network; re-export the model with current PtychoPINN"
        )
    if cfg.use_legacy_decoder_channel_override or cfg.use_shared_decoder:
        return
    key = "model.autoencoder.decoder_amp.amp.conv1.weight"
    weight = state_dict.get(key)
    if weight is not None and weight.dim() == 4:
        width = 32 * cfg.n_filters_scale
        legacy_in = width - max(1, int(math.floor(width * 0.125)))
        if weight.shape[1] == legacy_in and weight.shape[1] != width - cfg.channels:
            raise ArchitectureEraError(
                f"{key} has {weight.shape[1]} input channels: the legacy head of upstream's E0-E2 eras "
                f"(border path of {width - legacy_in} channels, unmasked border), whose forward differs from the "
                f"current (E3) network expecting {width - cfg.channels}; re-export the model with current PtychoPINN"
            )


def _strict_load(network: PtychoPINNNetwork, state_dict: Mapping[str, Any]) -> None:
    expected = network.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    problems = []
    if missing:
        problems.append(f"missing keys {missing[:5]}{' ...' if len(missing) > 5 else ''} ({len(missing)})")
    if unexpected:
        problems.append(
            f"unexpected keys {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''} ({len(unexpected)})"
        )
    for key, ref in expected.items():
        got = state_dict.get(key)
        if got is None:
            continue
        if not isinstance(got, torch.Tensor):
            problems.append(f"{key} is a {type(got).__name__}, not a tensor")
        elif tuple(got.shape) != tuple(ref.shape):
            problems.append(f"{key} has shape {tuple(got.shape)}, the configuration needs {tuple(ref.shape)}")
        elif got.dtype != ref.dtype:
            problems.append(f"{key} has dtype {got.dtype}, expected {ref.dtype}")
    if problems:
        raise StateDictMismatchError(
            "diffraction_to_obj/model.pth does not fit the network its configuration describes ("
            + "; ".join(problems[:6])
            + "). The weights and the params/metadata come from different models; nothing was loaded"
        )
    network.load_state_dict(state_dict, strict=True)


def read_bundle(
    path: PathLike,
    *,
    allow_unsafe: bool | None = None,
    legacy_scaling: bool = False,
    limits: BundleLimits = DEFAULT_LIMITS,
) -> BundleContents:
    """Decode and validate a bundle without building the network or touching the global config.

    Args:
        path: ``wts.h5.zip``, its base ``wts.h5``, or a directory holding ``wts.h5.zip``.
        allow_unsafe: unpickle ``.dill`` members with dill (runs code from the file; trusted files only).
        legacy_scaling: for bundles without ``torch_scaling_metadata.pt``, reproduce upstream's legacy
            ``load_torch_bundle`` input scaling instead of honouring the caller's factor (spec §4.2).
        limits: size caps against zip bombs.

    Raises:
        BundleError: one of its subclasses, naming the cause and the fix.
    """
    archive = resolve_bundle_path(path)
    reader = _ArchiveReader(archive, limits)
    try:
        manifest = _decode_manifest(reader, allow_unsafe)
        verified: list[str] = []
        snapshots: list[tuple[str, bytes, dict]] = []
        for model in manifest["models"]:
            member = f"{model}/params.dill"
            if member not in reader:
                raise CorruptBundleError(f"{archive} lacks {member!r}, which the manifest's model {model!r} needs")
            raw = reader.read(member)
            _verify_hash(manifest, member, raw, verified)
            snapshot = safe_loads(raw, member=member, allow_unsafe=allow_unsafe)
            params_module.validate_params_snapshot(snapshot, source=member)
            snapshots.append((member, raw, snapshot))
        first_member, first_raw, params = snapshots[0]
        for member, raw, snapshot in snapshots[1:]:
            if raw != first_raw and snapshot != params:
                differing = sorted(
                    k for k in set(snapshot) | set(params) if snapshot.get(k, object()) != params.get(k, object())
                )
                raise ConfigMismatchError(
                    f"{member} differs from {first_member} in keys {differing[:8]}; every model of a bundle must "
                    "carry the same params snapshot"
                )
        metadata = None
        if METADATA_MEMBER in reader:
            raw = reader.read(METADATA_MEMBER)
            _verify_hash(manifest, METADATA_MEMBER, raw, verified)
            metadata = validate_metadata(_torch_load(raw, METADATA_MEMBER))
            network_config = network_config_from_metadata(metadata)
            check_params_agree(params, network_config)
        else:
            network_config = network_config_from_params(params, legacy_scaling=legacy_scaling)
        weights_member = f"{INFERENCE_MODEL}/model.pth"
        raw = reader.read(weights_member)
        _verify_hash(manifest, weights_member, raw, verified)
        state_dict = _torch_load(raw, weights_member)
        if not isinstance(state_dict, Mapping) or not all(isinstance(k, str) for k in state_dict):
            raise CorruptBundleError(f"{weights_member} must hold a state_dict (a dict of tensors)")
        if "_sentinel" in state_dict:
            raise CorruptBundleError(f"{weights_member} is a weightless sentinel; the bundle has no trained network")
        _detect_era(state_dict, network_config)
        for name in reader.names:
            if name not in verified and name != MANIFEST_MEMBER and (manifest.get("sha256") or {}).get(name):
                _verify_hash(manifest, name, reader.read(name), verified)
        member_sizes = {name: reader.size(name) for name in reader.names}
    finally:
        reader.close()
    return BundleContents(
        path=archive,
        manifest=manifest,
        params=params,
        metadata=metadata,
        network_config=network_config,
        state_dict=OrderedDict(state_dict),
        hashes_verified=verified,
        member_sizes=member_sizes,
    )


def load_torch_bundle(
    path: PathLike,
    *,
    device: str | torch.device | None = None,
    restore_params: bool = True,
    allow_unsafe: bool | None = None,
    legacy_scaling: bool = False,
    limits: BundleLimits = DEFAULT_LIMITS,
) -> tuple[PtychoPINNNetwork, dict[str, Any]]:
    """Load the ``diffraction_to_obj`` network of a ``wts.h5.zip``, standalone (no MLflow, no server).

    Follows CONFIG-001: the params snapshot is restored into :data:`mlflow_ptycho_flavor.params.cfg` (and
    upstream's ``ptycho.params.cfg`` when importable) before the network is built. The network itself is built
    from the bundle alone and strict-loaded.

    Args:
        path: ``wts.h5.zip``, its base ``wts.h5``, or a directory holding ``wts.h5.zip``.
        device: ``None``/``"auto"`` (CUDA if available, else CPU), ``"cpu"``, ``"cuda:0"``, ...
        restore_params: apply CONFIG-001 (default). Only skip it when nothing in the process reads the global.
        allow_unsafe: see :func:`read_bundle`.
        legacy_scaling: see :func:`read_bundle`.
        limits: size caps against zip bombs.

    Returns:
        ``(network, params)``: the network in eval mode on ``device``, and the params snapshot.

    Example:
        >>> model, params = load_torch_bundle("out/wts.h5.zip", device="cpu")  # doctest: +SKIP
        >>> obj = model(amplitudes, scale)  # complex64 (B, C, N, N)  # doctest: +SKIP
    """
    contents = read_bundle(path, allow_unsafe=allow_unsafe, legacy_scaling=legacy_scaling, limits=limits)
    if restore_params:
        params_module.restore_params(contents.params)
    network = contents.build_network(device)
    return network, dict(contents.params)


# ----------------------------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------------------------
def _torch_bytes(obj: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _pickle_bytes(obj: Any) -> bytes:
    import pickle

    return pickle.dumps(obj, protocol=_PICKLE_PROTOCOL)


def _architecture_params(config: NetworkConfig) -> dict[str, Any]:
    gridsize = config.gridsize
    if gridsize * gridsize != config.C_model:
        raise ConfigMismatchError(
            f"C_model={config.C_model} is not a square gridsize**2; upstream bundles store gridsize only"
        )
    return {
        "N": config.N,
        "gridsize": gridsize,
        "n_filters_scale": config.n_filters_scale,
        "model_type": "pinn" if config.mode == "Unsupervised" else "supervised",
        "architecture": config.architecture,
        "amp_activation": config.amp_activation,
        "object.big": config.object_big,
        "probe.big": config.probe_big,
        # Our own training never applies a learned input scale unless the network says so; writing the flag
        # from the network keeps upstream's legacy loader's input scaling identical to ours.
        "intensity_scale.trainable": config.intensity_scale_trainable,
    }


def _split_models(models: Any) -> tuple[PtychoPINNNetwork, Any]:
    if isinstance(models, PtychoPINNNetwork):
        return models, SENTINEL
    if not isinstance(models, Mapping):
        raise TypeError(
            "models must be a PtychoPINNNetwork or a dict {'diffraction_to_obj': network, 'autoencoder': ...}, "
            f"got {type(models).__name__}"
        )
    if not models:
        raise ValueError("models is empty; pass {'diffraction_to_obj': network}")
    unknown = sorted(set(models) - set(MODEL_NAMES))
    if unknown:
        raise ValueError(f"models has unknown entries {unknown}; a bundle holds only {list(MODEL_NAMES)}")
    network = models.get(INFERENCE_MODEL)
    if not isinstance(network, PtychoPINNNetwork):
        raise TypeError(
            f"models['{INFERENCE_MODEL}'] must be a PtychoPINNNetwork (build one from a NetworkConfig), got "
            f"{type(network).__name__}"
        )
    autoencoder = models.get(AUTOENCODER_MODEL, SENTINEL)
    if isinstance(autoencoder, Mapping):
        if "_sentinel" not in autoencoder:
            raise TypeError("models['autoencoder'] must be an nn.Module or a sentinel dict with key '_sentinel'")
    elif not isinstance(autoencoder, torch.nn.Module):
        raise TypeError(f"models['autoencoder'] must be an nn.Module or a sentinel dict, got {type(autoencoder).__name__}")
    return network, autoencoder


def _zip_info(name: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name, date_time=_ZIP_DATE)
    info.compress_type = zipfile.ZIP_DEFLATED
    info.external_attr = (stat.S_IFREG | 0o644) << 16
    return info


def _write_atomically(target: Path, members: list[tuple[str, bytes]]) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as handle:
            with zipfile.ZipFile(handle, "w", compression=zipfile.ZIP_DEFLATED) as archive:
                for name, data in members:
                    archive.writestr(_zip_info(name), data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


def save_torch_bundle(
    models: Any,
    path: PathLike,
    config: Mapping[str, Any] | None = None,
    *,
    intensity_scale: float | None = None,
    ci_statistics: Mapping[str, Any] | None = None,
) -> Path:
    """Write a ``wts.h5.zip`` that upstream PtychoPINN and this package both load exactly.

    Args:
        models: the ``diffraction_to_obj`` :class:`PtychoPINNNetwork`, or upstream's dict form
            ``{'diffraction_to_obj': network, 'autoencoder': module_or_sentinel}``.
        path: ``out/wts.h5`` (upstream's base path, ``.zip`` appended), ``out/wts.h5.zip``, or a directory.
        config: legacy ``params.cfg`` values to record (``nphotons``, ``nepochs``, ``batch_size``, ...). The
            architecture keys are taken from the network; giving a conflicting one raises.
        intensity_scale: the physics scaling constant to record (else ``config['intensity_scale']``, else 1.0).
        ci_statistics: optional CI statistics for the metadata (see spec §8.1).

    Returns:
        The archive path written. The write is atomic: a temp file in the same folder renamed into place, so an
        existing bundle survives any failure.
    """
    network, autoencoder = _split_models(models)
    arch = _architecture_params(network.config)
    overrides = dict(config or {})
    for key, value in arch.items():
        if key in overrides and key != "intensity_scale.trainable" and overrides[key] != value:
            raise ConfigMismatchError(
                f"config[{key!r}]={overrides[key]!r} conflicts with the network's {key}={value!r}; the params "
                "snapshot must describe the network being saved"
            )
    overrides.update(arch)
    if intensity_scale is not None and (not isinstance(intensity_scale, (int, float)) or isinstance(intensity_scale, bool) or not math.isfinite(intensity_scale)):
        raise ValueError(f"intensity_scale must be a finite number, got {intensity_scale!r}")
    snapshot = params_module.make_params_snapshot(overrides, intensity_scale=intensity_scale)
    metadata = make_metadata(network.config, snapshot, ci_statistics=ci_statistics)
    params_bytes = _pickle_bytes(snapshot)
    state = OrderedDict((k, v.detach().to("cpu").contiguous().clone()) for k, v in network.state_dict().items())
    if isinstance(autoencoder, torch.nn.Module):
        auto_payload: Any = OrderedDict((k, v.detach().to("cpu")) for k, v in autoencoder.state_dict().items())
    else:
        auto_payload = dict(autoencoder)
    members = [
        (f"{INFERENCE_MODEL}/model.pth", _torch_bytes(state)),
        (f"{INFERENCE_MODEL}/params.dill", params_bytes),
        (f"{AUTOENCODER_MODEL}/model.pth", _torch_bytes(auto_payload)),
        (f"{AUTOENCODER_MODEL}/params.dill", params_bytes),
        (METADATA_MEMBER, _torch_bytes(metadata)),
    ]
    manifest = {
        "models": [INFERENCE_MODEL, AUTOENCODER_MODEL],
        "version": params_module.PYTORCH_BUNDLE_VERSION,
        "backend": BACKEND,
        "sha256": {name: hashlib.sha256(data).hexdigest() for name, data in members},
    }
    target = resolve_bundle_path(path, for_writing=True)
    _write_atomically(target, [(MANIFEST_MEMBER, _pickle_bytes(manifest))] + members)
    _logger.info("wrote PtychoPINN bundle %s", target)
    return target


def network_from_config(config: NetworkConfig | Mapping[str, Any] | None = None, **overrides: Any) -> PtychoPINNNetwork:
    """Convenience: build a fresh (randomly initialised) network in eval mode from a config or keywords."""
    if config is None:
        cfg = NetworkConfig(**overrides)
    elif isinstance(config, NetworkConfig):
        cfg = dataclasses.replace(config, **overrides)
    else:
        cfg = NetworkConfig(**{**dict(config), **overrides})
    return PtychoPINNNetwork(cfg).eval()

