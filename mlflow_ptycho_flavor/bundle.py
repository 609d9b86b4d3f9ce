"""Read and write standalone ``wts.h5.zip`` bundles in upstream PtychoPINN's PyTorch layout.

Layout written (spec §1.3, §7): ``manifest.dill``, ``diffraction_to_obj/model.pth`` (state_dict),
``diffraction_to_obj/params.dill``, ``autoencoder/model.pth`` (``{'_sentinel': 'autoencoder'}``),
``autoencoder/params.dill`` (the same snapshot), and ``torch_scaling_metadata.pt`` (the torch configs upstream's
metadata-aware loader rebuilds the network from). The manifest adds ``backend`` and a sha256 per member, which
upstream ignores.

The reader never extracts to disk and never writes anything: it opens regular files only, reads named members
into memory with size caps, refuses path tricks, symlinks, duplicate names, encrypted members and zip bombs,
decodes ``.dill`` members with a restricted unpickler (:mod:`.safe_pickle`) and ``.pth`` / ``.pt`` members with
``torch.load(weights_only=True)`` after checking that their pickle names only the globals a state_dict needs,
verifies hashes when present, checks the weights against the configured network on the ``meta`` device (no
memory allocated) before anything real is built, restores the params snapshot into the global config
(CONFIG-001), and loads the weights strictly. Every failure is a :class:`~.errors.BundleError` subclass; anything
unexpected raised while decoding untrusted bytes is wrapped, never leaked. Nothing here imports MLflow.
"""

from __future__ import annotations

import _compat_pickle
import contextlib
import dataclasses
import functools
import hashlib
import io
import logging
import math
import os
import pickletools
import reprlib
import stat
import tempfile
import zipfile
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import torch

from . import params as params_module
from .errors import (
    ArchitectureEraError,
    BundleError,
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
from .safe_pickle import check_plain_data, safe_loads, unsafe_loading_allowed

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

    def build_network(
        self, device: str | torch.device | None = None, *, adopt_weights: bool = False
    ) -> PtychoPINNNetwork:
        """Build the network from :attr:`network_config`, strict-load the weights, eval mode, on ``device``.

        Args:
            device: ``None``/``"auto"``, ``"cpu"``, ``"cuda:0"``, ...
            adopt_weights: let the network take over :attr:`state_dict`'s tensors instead of copying them (no
                random init, no copy: what the loaders use when the contents are discarded afterwards). Networks
                built with it from the same contents share their weights.

        Raises:
            ValueError: ``device`` is not valid or not available.
            ConfigMismatchError: the configuration cannot be built.
            StateDictMismatchError: the weights do not fit it.
        """
        target = resolve_device(device)
        _check_fits(self.network_config, self.state_dict, _stored_bytes(self.state_dict))
        if adopt_weights:
            with _config_errors("diffraction_to_obj/model.pth"):
                network = PtychoPINNNetwork.from_state_dict(self.network_config, self.state_dict)
            return network.to(target).eval()
        with _config_errors("the bundle's network configuration"):
            network = PtychoPINNNetwork(self.network_config)
        _strict_load(network, self.state_dict)
        return network.to(target).eval()


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
        self._file = self._open_regular_file(path)
        try:
            head = self._file.read(4)
            self._file.seek(0)
            self._zip = zipfile.ZipFile(self._file, "r")
        except zipfile.BadZipFile as exc:
            self._file.close()
            hint = (
                "it starts like one, so it is probably truncated or damaged - re-download or re-copy it"
                if head == b"PK\x03\x04"
                else "a PtychoPINN bundle is a wts.h5.zip written by save_torch_bundle or upstream's model manager - "
                "check the path"
            )
            raise NotABundleError(f"{path} is not a zip archive ({exc}); {hint}") from exc
        except Exception as exc:  # noqa: BLE001 - zipfile parsing untrusted bytes: anything is "damaged"
            self._file.close()
            raise CorruptBundleError(
                f"{path} cannot be read as a zip archive: {type(exc).__name__}: {exc}"
            ) from exc
        try:
            self._infos = self._index()
        except BaseException:
            self.close()
            raise

    @staticmethod
    def _open_regular_file(path: Path) -> io.BufferedReader:
        # O_NONBLOCK: opening a FIFO must not hang; fstat on the open descriptor: no check/use race.
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
        except FileNotFoundError as exc:
            raise NotABundleError(f"no bundle at {path}: the file does not exist") from exc
        except IsADirectoryError as exc:
            raise NotABundleError(f"{path} is a directory, not a wts.h5.zip archive") from exc
        except (OSError, ValueError) as exc:  # ValueError: a NUL byte in the path
            raise NotABundleError(f"{path!r} cannot be opened: {exc}") from exc
        try:
            mode = os.fstat(fd).st_mode
            if not stat.S_ISREG(mode):
                kind = "a directory" if stat.S_ISDIR(mode) else "not a regular file (device, FIFO or socket)"
                raise NotABundleError(f"{path} is {kind}, not a wts.h5.zip archive")
            return os.fdopen(fd, "rb")
        except BaseException:
            os.close(fd)
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
        if info.flag_bits & 0x1:
            raise UnsupportedBundleError(
                f"member {name!r} of {self.path} is encrypted; bundles are never encrypted, so it is not read"
            )
        try:
            # zipfile stops at the declared size and checks the CRC, so memory is bounded by the caps above.
            with self._zip.open(info) as handle:
                data = handle.read(info.file_size + 1)
        except zipfile.BadZipFile as exc:
            raise CorruptBundleError(f"member {name!r} of {self.path} is damaged: {exc}") from exc
        except NotImplementedError as exc:
            raise UnsupportedBundleError(f"member {name!r} uses an unsupported zip feature: {exc}") from exc
        except Exception as exc:  # noqa: BLE001 - zlib/bz2/lzma/struct errors on untrusted bytes: damaged
            raise CorruptBundleError(
                f"member {name!r} of {self.path} cannot be decompressed: {type(exc).__name__}: {exc}"
            ) from exc
        if len(data) != info.file_size:
            raise CorruptBundleError(
                f"member {name!r} of {self.path} decompressed to {len(data)} bytes, header says {info.file_size}"
            )
        self._total += len(data)
        return data

    def close(self) -> None:
        try:
            self._zip.close()
        finally:
            self._file.close()


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
    if (isinstance(version, str) and version == "1.0") or any(n.endswith("model.keras") for n in reader.names):
        raise TensorFlowBundleError(
            f"{reader.path} is a TensorFlow PtychoPINN archive (manifest version {version!r}, model.keras "
            "members): this PyTorch loader cannot rebuild Keras models; load it with upstream's TensorFlow "
            "loader (ptycho.model_manager.ModelManager.load_multiple_models), or re-train with the PyTorch backend"
        )
    if not isinstance(version, str):
        raise CorruptBundleError(f"manifest.dill['version'] must be a str, got {_short(version)}")
    if version != params_module.PYTORCH_BUNDLE_VERSION:
        raise UnsupportedBundleError(
            f"manifest version {_short(version)} is not supported; this loader reads "
            f"{params_module.PYTORCH_BUNDLE_VERSION!r} bundles"
        )
    if not isinstance(models, list) or not models or not all(isinstance(m, str) for m in models):
        raise CorruptBundleError(
            f"manifest.dill['models'] must be a non-empty list of names, got {_short(models)}"
        )
    if len(set(models)) != len(models) or len(models) > reader.limits.max_members:
        raise CorruptBundleError(
            f"manifest.dill['models'] must list distinct model names (at most {reader.limits.max_members}), got "
            f"{_short(models)}"
        )
    if INFERENCE_MODEL not in models:
        raise CorruptBundleError(
            f"manifest lists models {_short(models)} but not {INFERENCE_MODEL!r}, the network inference needs"
        )
    backend = manifest.get("backend", BACKEND)
    if not isinstance(backend, str) or backend != BACKEND:
        raise UnsupportedBundleError(f"manifest backend {_short(backend)} is not supported; expected {BACKEND!r}")
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


_REPR = reprlib.Repr()
_REPR.maxstring = 160
_REPR.maxother = 160
_REPR.maxlist = _REPR.maxtuple = _REPR.maxdict = _REPR.maxset = 10
_REPR.maxlevel = 3


def _short(value: Any) -> str:
    """A bounded ``repr`` for error messages (values from a hostile file can be huge or deeply nested)."""
    try:
        return _REPR.repr(value)
    except Exception:  # noqa: BLE001 - a broken __repr__ must not replace the real error
        return f"<{type(value).__name__}>"


@contextlib.contextmanager
def _config_errors(source: str):
    """Turn the errors plain-data validation and network construction raise on bad values into typed errors."""
    try:
        yield
    except BundleError:
        raise
    except (ValueError, TypeError, KeyError, AttributeError, OverflowError, ZeroDivisionError, RuntimeError,
            MemoryError, RecursionError) as exc:
        raise ConfigMismatchError(
            f"{source}: invalid configuration value ({type(exc).__name__}: {str(exc)[:300]})"
        ) from exc


#: Globals a torch-saved state_dict or metadata dict needs; checked in the member's pickle before torch.load runs.
#: torch's own weights_only list is wider and includes allocation bombs (``bytearray(10**10)``, nested
#: ``_codecs.encode(..., 'hex')``, ``torch.Tensor(10**6, 10**6)``) and whatever other code in the process added
#: with ``torch.serialization.add_safe_globals``.
_TORCH_ALLOWED_GLOBALS = frozenset(
    {
        "collections.OrderedDict",
        "torch._utils._rebuild_tensor_v2",
        "torch._utils._rebuild_parameter",
        "torch._utils._rebuild_parameter_with_state",
        "builtins.set",
        "builtins.complex",
        "torch.Size",
        "torch.device",
    }
)


def _torch_global_allowed(module: str, name: str) -> bool:
    if f"{module}.{name}" in _TORCH_ALLOWED_GLOBALS:
        return True
    if module != "torch":
        return False
    value = vars(torch).get(name)  # not getattr: torch's module __getattr__ imports submodules lazily
    if isinstance(value, torch.dtype):
        return True
    # FloatStorage, LongStorage, ...: markers torch maps to a dtype, never called with data
    return name.endswith("Storage") and name not in ("UntypedStorage", "TypedStorage") and isinstance(value, type)


def _scan_torch_pickle(data: bytes, member: str) -> None:
    """Refuse a torch zip file whose ``data.pkl`` names a global outside :data:`_TORCH_ALLOWED_GLOBALS`.

    The scan reads the record through torch's own zip reader (the bytes torch.load would unpickle) and only
    disassembles the pickle; nothing is called.
    """
    if not data.startswith(b"PK\x03\x04"):
        raise CorruptBundleError(
            f"{member} is not a valid torch file: not in torch's zip serialization format (what torch.save has "
            "written since torch 1.6); it is damaged, or a legacy file this loader does not read"
        )
    try:
        reader = torch._C.PyTorchFileReader(io.BytesIO(data))
        pickled = reader.get_record("data.pkl")
    except Exception as exc:  # noqa: BLE001 - torch's zip reader on untrusted bytes
        raise CorruptBundleError(f"{member} is not a valid torch file: {type(exc).__name__}: {str(exc)[:300]}") from exc
    try:
        for opcode, arg, _ in pickletools.genops(pickled):
            if opcode.name == "GLOBAL":
                module, _, name = str(arg).partition(" ")
                # torch.save writes protocol 2 with Python-2 names (__builtin__.set); torch maps them back like this
                if (module, name) in _compat_pickle.NAME_MAPPING:
                    module, name = _compat_pickle.NAME_MAPPING[(module, name)]
                elif module in _compat_pickle.IMPORT_MAPPING:
                    module = _compat_pickle.IMPORT_MAPPING[module]
                if not _torch_global_allowed(module, name):
                    _refuse_torch_global(member, f"{module}.{name}")
            elif opcode.name in ("STACK_GLOBAL", "INST", "OBJ", "EXT1", "EXT2", "EXT4"):
                raise UnsafeBundleError(f"{member} uses the pickle opcode {opcode.name}, which torch.save never writes")
    except UnsafeBundleError:
        raise
    except Exception as exc:  # noqa: BLE001 - malformed pickle stream
        raise CorruptBundleError(f"{member} holds a malformed pickle: {type(exc).__name__}: {str(exc)[:300]}") from exc


def _torch_default_allows(full_name: str) -> bool:
    try:
        from torch._weights_only_unpickler import _get_allowed_globals

        return full_name in _get_allowed_globals()
    except Exception:  # noqa: BLE001 - private torch API; only used to word the message
        return False


def _refuse_torch_global(member: str, full_name: str) -> None:
    if _torch_default_allows(full_name):
        raise UnsafeBundleError(
            f"{member} references the global {full_name}, which torch.load(weights_only=True) would call but a "
            "state_dict or metadata dict never needs (a few bytes can make it allocate gigabytes); refused before "
            "loading"
        )
    raise UnsafeBundleError(
        f"{member} needs arbitrary Python objects to unpickle (the global {full_name}) and was refused by "
        "torch.load(weights_only=True) rules, checked before loading: nothing was imported or called"
    )


def _torch_load(data: bytes, member: str, *, scan: bool = True) -> Any:
    if scan:
        _scan_torch_pickle(data, member)
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


def _tensor_bytes(tensor: Any) -> int:
    return tensor.numel() * tensor.element_size() if isinstance(tensor, torch.Tensor) else 0


def _stored_bytes(state_dict: Mapping[str, Any]) -> int:
    """Bytes of distinct storages behind the tensors (an expanded view counts once, at its real size)."""
    seen: dict[int, int] = {}
    for tensor in state_dict.values():
        if isinstance(tensor, torch.Tensor) and tensor.device.type != "meta":
            storage = tensor.untyped_storage()
            seen[storage.data_ptr()] = max(seen.get(storage.data_ptr(), 0), storage.nbytes())
    return sum(seen.values())


def _check_state_dict_values(state_dict: Any, member: str) -> None:
    if not isinstance(state_dict, Mapping) or not all(isinstance(k, str) for k in state_dict):
        raise CorruptBundleError(f"{member} must hold a state_dict (a dict of tensors)")
    if "_sentinel" in state_dict:
        raise CorruptBundleError(f"{member} is a weightless sentinel; the bundle has no trained network")
    for key, value in state_dict.items():
        if not isinstance(value, torch.Tensor):
            continue  # reported with the key/shape diff (StateDictMismatchError)
        if value.layout != torch.strided or value.device.type != "cpu" or value.is_quantized:
            raise CorruptBundleError(
                f"{member}: {_short(key)} is a {value.layout} tensor on {value.device.type}; weights are dense CPU "
                "tensors"
            )


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
    if isinstance(weight, torch.Tensor) and weight.dim() == 4:
        width = 32 * cfg.n_filters_scale
        legacy_in = width - max(1, int(math.floor(width * 0.125)))
        current = (cfg.channels, width - cfg.channels)
        # Legacy heads take 32s - floor(4s) input channels and give one amplitude channel; at n_filters_scale=1
        # and gridsize 2 the input count coincides with the current head's, so compare the output count too.
        if weight.shape[0] == 1 and weight.shape[1] == legacy_in and tuple(weight.shape[:2]) != current:
            raise ArchitectureEraError(
                f"{key} has shape {tuple(weight.shape)}: the legacy head of upstream's E0-E2 eras (border path "
                f"of {width - legacy_in} channels, unmasked border), whose forward differs from the current (E3) "
                f"network expecting (out, in) channels {current}; re-export the model with current PtychoPINN"
            )


def _state_dict_problems(expected: Mapping[str, torch.Tensor], state_dict: Mapping[str, Any]) -> list[str]:
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    problems = []
    if missing:
        problems.append(f"missing keys {missing[:5]}{' ...' if len(missing) > 5 else ''} ({len(missing)})")
    if unexpected:
        problems.append(
            f"unexpected keys {[k[:160] for k in unexpected[:5]]}{' ...' if len(unexpected) > 5 else ''} "
            f"({len(unexpected)})"
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
    return problems


def _raise_mismatch(problems: list[str]) -> None:
    raise StateDictMismatchError(
        "diffraction_to_obj/model.pth does not fit the network its configuration describes ("
        + "; ".join(problems[:6])
        + "). The weights and the params/metadata come from different models; nothing was loaded"
    )


@functools.lru_cache(maxsize=32)
def _expected_layout(config: NetworkConfig) -> "OrderedDict[str, torch.Tensor]":
    """The state_dict layout (meta tensors: keys, shapes, dtypes) of a configuration, built once per process."""
    with torch.device("meta"):
        return PtychoPINNNetwork(config).state_dict()


def _check_fits(config: NetworkConfig, state_dict: Mapping[str, Any], stored_bytes: int) -> None:
    """Check the weights against the configured network built on the ``meta`` device (allocates nothing).

    A hostile configuration (``n_filters_scale=10**6``, ``gridsize=300``) would otherwise allocate without bound
    before the strict load could object, and stride-0 "expanded" tensors could match any shape from a few bytes:
    the network's parameter bytes must also fit in the bytes the member actually holds.
    """
    with _config_errors("the bundle's network configuration"):
        expected = _expected_layout(dataclasses.replace(config, intensity_scale_trainable=False))
    problems = _state_dict_problems(expected, state_dict)
    if problems:
        _raise_mismatch(problems)
    needed = sum(_tensor_bytes(t) for t in expected.values())
    if needed > stored_bytes:
        raise StateDictMismatchError(
            f"the configured network needs {needed} bytes of weights but diffraction_to_obj/model.pth holds only "
            f"{stored_bytes}: its tensors are expanded views, not stored weights; refused"
        )


def _strict_load(network: PtychoPINNNetwork, state_dict: Mapping[str, Any]) -> None:
    problems = _state_dict_problems(network.state_dict(), state_dict)
    if problems:
        _raise_mismatch(problems)
    with _config_errors("diffraction_to_obj/model.pth"):
        network.load_state_dict(state_dict, strict=True)


def _plain_equal(a: Any, b: Any, depth: int = 0) -> bool:
    """``a == b`` for decoded plain data that never raises (numpy arrays compare element-wise)."""
    if depth > 64:
        return False
    if type(a) is not type(b):
        try:
            numbers = (int, float, complex)
            return bool(a == b) if isinstance(a, numbers) and isinstance(b, numbers) else False
        except Exception:  # noqa: BLE001
            return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_plain_equal(a[k], b[k], depth + 1) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_plain_equal(x, y, depth + 1) for x, y in zip(a, b))
    if type(a).__module__ == "numpy" and hasattr(a, "shape"):
        import numpy as np

        return bool(np.array_equal(a, b))
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001
        return False


def _check_input_scale(config: NetworkConfig, source: str) -> None:
    if config.intensity_scale_trainable:
        scale = config.intensity_scale
        if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
            raise ConfigMismatchError(
                f"{source}: intensity_scale={scale!r} with a trainable (fixed) input scale would multiply every "
                "input by NaN, 0 or infinity; it must be a finite number > 0"
            )


def read_bundle(
    path: PathLike,
    *,
    allow_unsafe: bool | None = None,
    legacy_scaling: bool = False,
    limits: BundleLimits = DEFAULT_LIMITS,
) -> BundleContents:
    """Decode and validate a bundle without building the network or touching the global config.

    Reads nothing but the named members, into memory (nothing is extracted or written), and checks the weights
    against the configured network on the ``meta`` device, so a bundle that passes here builds.

    Args:
        path: ``wts.h5.zip``, its base ``wts.h5``, or a directory holding ``wts.h5.zip``.
        allow_unsafe: unpickle ``.dill`` members with dill (runs code from the file; trusted files only) and skip
            the global check of torch members (``torch.load(weights_only=True)`` still applies).
        legacy_scaling: for bundles without ``torch_scaling_metadata.pt``, reproduce upstream's legacy
            ``load_torch_bundle`` input scaling instead of honouring the caller's factor (spec §4.2).
        limits: size caps against zip bombs.

    Raises:
        BundleError: one of its subclasses, naming the cause and the fix.
    """
    archive = resolve_bundle_path(path)
    scan = not unsafe_loading_allowed(allow_unsafe)  # same opt-in as the .dill members
    reader = _ArchiveReader(archive, limits)
    try:
        manifest = _decode_manifest(reader, allow_unsafe)
        verified: list[str] = []
        snapshots: list[tuple[str, bytes, dict]] = []
        for model in manifest["models"]:
            member = f"{model}/params.dill"
            if member not in reader:
                raise CorruptBundleError(
                    f"{archive} lacks {_short(member)}, which the manifest's model {_short(model)} needs"
                )
            raw = reader.read(member)
            _verify_hash(manifest, member, raw, verified)
            snapshot = safe_loads(raw, member=member, allow_unsafe=allow_unsafe)
            with _config_errors(member):
                params_module.validate_params_snapshot(snapshot, source=member)
            snapshots.append((member, raw, snapshot))
        first_member, first_raw, params = snapshots[0]
        for member, raw, snapshot in snapshots[1:]:
            if raw != first_raw and not _plain_equal(snapshot, params):
                differing = sorted(
                    str(k) for k in set(snapshot) | set(params)
                    if k not in snapshot or k not in params or not _plain_equal(snapshot[k], params[k])
                )
                raise ConfigMismatchError(
                    f"{member} differs from {first_member} in keys {_short(differing[:8])}; every model of a bundle "
                    "must carry the same params snapshot"
                )
        metadata = None
        if METADATA_MEMBER in reader:
            raw = reader.read(METADATA_MEMBER)
            _verify_hash(manifest, METADATA_MEMBER, raw, verified)
            decoded = _torch_load(raw, METADATA_MEMBER, scan=scan)
            check_plain_data(decoded, member=METADATA_MEMBER, size=len(raw), leaf_types=(torch.Tensor,))
            with _config_errors(METADATA_MEMBER):
                metadata = validate_metadata(decoded)
                network_config = network_config_from_metadata(metadata)
                check_params_agree(params, network_config)
            _check_input_scale(network_config, METADATA_MEMBER)
        else:
            with _config_errors(first_member):
                network_config = network_config_from_params(params, legacy_scaling=legacy_scaling)
            _check_input_scale(network_config, first_member)
        weights_member = f"{INFERENCE_MODEL}/model.pth"
        raw = reader.read(weights_member)
        _verify_hash(manifest, weights_member, raw, verified)
        state_dict = _torch_load(raw, weights_member, scan=scan)
        _check_state_dict_values(state_dict, weights_member)
        _detect_era(state_dict, network_config)
        _check_fits(network_config, state_dict, len(raw))
        hashes = manifest.get("sha256") or {}
        for name in reader.names:
            if name not in verified and name != MANIFEST_MEMBER and hashes.get(name):
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
    network = contents.build_network(device, adopt_weights=True)
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
    # Every member deflated, as upstream writes them. (Storing model.pth uncompressed loads faster, but a file cut
    # short inside it would expose the nested torch zip's own directory to zip readers.)
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

