"""Read and load standalone ``wts.h5.zip`` bundles in upstream PtychoPINN's PyTorch layout.

Layout (docs/bundle-format.md §1.3, §7; written by :mod:`.writer`): ``manifest.dill``, ``diffraction_to_obj/model.pth`` (state_dict),
``diffraction_to_obj/params.dill``, ``autoencoder/model.pth`` (``{'_sentinel': 'autoencoder'}``),
``autoencoder/params.dill`` (the same snapshot), and ``torch_scaling_metadata.pt`` (the torch configs upstream's
metadata-aware loader rebuilds the network from). The manifest adds ``backend`` and a sha256 per member, which
upstream ignores.

The reader never extracts to disk and never writes anything: it opens regular files only, reads named members
into memory with size caps, refuses path tricks, symlinks, duplicate names, encrypted members and zip bombs,
decodes ``.dill`` members with a restricted unpickler (:mod:`.unpickle`) and ``.pth`` / ``.pt`` members with
``torch.load(weights_only=True)`` after checking that their pickle names only the globals a state_dict needs,
verifies hashes when present, checks the weights against the configured network on the ``meta`` device (no
memory allocated) before anything real is built, refuses NaN/inf weights, restores the params snapshot into the
global config (CONFIG-001), and loads the weights strictly. Work and memory are bounded by the file's real size
(docs/bundle-format.md §5), except that ``model.pth`` may inflate to what the configured network's weights
genuinely need (a zero-initialised network deflates ~1000:1 and must load). Every failure is a :class:`~.errors.BundleError`
subclass; anything unexpected raised while decoding untrusted bytes is wrapped, never leaked. Nothing here imports
MLflow.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import threading
import zlib
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mlflow_ptycho_flavor._io import PathLike
from mlflow_ptycho_flavor.bundle import params as params_module
from mlflow_ptycho_flavor.bundle.archive import (
    BUNDLE_FILE_NAME,
    DEFAULT_LIMITS,
    ArchiveReader,
    BundleLimits,
    MemberView,
    resolve_bundle_path,
)
from mlflow_ptycho_flavor.bundle.budget import check_plain_data, node_budget, plain_differences
from mlflow_ptycho_flavor.bundle.compat import (
    check_finite_weights,
    check_fits,
    check_input_scale,
    check_state_dict_values,
    config_errors,
    detect_era,
    network_layout,
    stored_bytes,
    strict_load,
)
from mlflow_ptycho_flavor.bundle.identify import identify_artifact
from mlflow_ptycho_flavor.bundle.metadata import (
    check_params_agree,
    network_config_from_metadata,
    network_config_from_params,
    validate_metadata,
)
from mlflow_ptycho_flavor.bundle.unpickle import is_channels_last, safe_loads, torch_load, unsafe_loading_allowed
from mlflow_ptycho_flavor.errors import (
    BundleError,
    ConfigMismatchError,
    CorruptBundleError,
    TensorFlowBundleError,
    UnsupportedBundleError,
    short_repr,
)
from mlflow_ptycho_flavor.network import (
    AnyNetworkConfig,
    build_network,
    network_from_state_dict,
    resolve_device,
    use_channels_last,
)

__all__ = [
    "BUNDLE_FILE_NAME",
    "BundleContents",
    "read_bundle",
    "read_and_build",
    "load_torch_bundle",
]

_logger = logging.getLogger(__name__)

MANIFEST_MEMBER = "manifest.dill"
METADATA_MEMBER = "torch_scaling_metadata.pt"
INFERENCE_MODEL = "diffraction_to_obj"
AUTOENCODER_MODEL = "autoencoder"
BACKEND = "pytorch"
_MAX_MODEL_NAME = 200  # upstream's model names are 'diffraction_to_obj' and 'autoencoder'


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
    network_config: AnyNetworkConfig
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
        self, device: str | torch.device | None = None, *, adopt_weights: bool = False, channels_last: bool = False
    ) -> torch.nn.Module:
        """Build the network from :attr:`network_config`, strict-load the weights, eval mode, on ``device``.

        The network is a :class:`~mlflow_ptycho_flavor.network.PtychoPINNNetwork` (CNN) or a
        :class:`~mlflow_ptycho_flavor.network.PtychoFnoNetwork` (FNO family), as the configuration's type says.

        Args:
            device: ``None``/``"auto"``, ``"cpu"``, ``"cuda:0"``, ...
            adopt_weights: let the network take over :attr:`state_dict`'s tensors instead of copying them (no
                random init, no copy: what the loaders use when the contents are discarded afterwards). Networks
                built with it from the same contents share their weights, except those a layout change copies.
            channels_last: run the network's activations in NHWC memory format
                (:func:`~mlflow_ptycho_flavor.network.use_channels_last`: its input and 4-D buffers). On the CPU
                the weights keep their stored layout (oneDNN reorders them for every convolution whatever their
                strides: the same bits, as fast, and nothing to copy at load); on other devices the 4-D weights
                are converted too, as ``network.to(memory_format=torch.channels_last)`` leaves them (before
                adoption: one copy each, no module walk).

        Raises:
            ValueError: ``device`` is not valid or not available.
            ConfigMismatchError: the configuration cannot be built.
            StateDictMismatchError: the weights do not fit it.
        """
        target = resolve_device(device)
        check_fits(self.network_config, self.state_dict, stored_bytes(self.state_dict))
        nhwc_weights = channels_last and target.type != "cpu"
        if adopt_weights:
            state_dict: Mapping[str, torch.Tensor] = self.state_dict
            if nhwc_weights:
                state_dict = _channels_last_copies(state_dict)
            elif not channels_last:  # weights read straight into NHWC (read_bundle(channels_last=True)) back in NCHW
                state_dict = {key: tensor.contiguous() if tensor.dim() == 4 and is_channels_last(tensor) else tensor
                              for key, tensor in state_dict.items()}
            with config_errors("diffraction_to_obj/model.pth"):
                network = network_from_state_dict(self.network_config, state_dict)
            # the weights were read onto the CPU: moving there would only walk every module (.to(device) keeps
            # each tensor's memory format)
            if target.type != "cpu":
                network = network.to(target)
        else:
            with config_errors("the bundle's network configuration"):
                network = build_network(self.network_config)
            strict_load(network, self.state_dict)
            network = network.to(target)
            if nhwc_weights:
                network = network.to(memory_format=torch.channels_last)
        if channels_last:
            network = use_channels_last(network)
        return network if adopt_weights else network.eval()  # adopted: in eval mode already (adopting_network)


def _channels_last_copies(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state_dict`` with its 4-D tensors as ``tensor.to(memory_format=torch.channels_last)`` gives them.

    The permuted copies are memory-bound and release the GIL, so about half of the bytes are copied on a worker
    thread while this one copies the rest: a second core halves what the NHWC default adds to a CPU load.
    """
    result = dict(state_dict)
    four_d = sorted((key for key, tensor in state_dict.items()  # .to() would return the others as they are
                     if tensor.dim() == 4 and not is_channels_last(tensor)),
                    key=lambda key: -state_dict[key].nbytes)
    halves: tuple[list[str], list[str]] = ([], [])
    loads = [0, 0]
    for key in four_d:  # largest first, each to the lighter half
        lighter = 0 if loads[0] <= loads[1] else 1
        halves[lighter].append(key)
        loads[lighter] += state_dict[key].nbytes
    converted: dict[str, torch.Tensor] = {}
    failure: list[BaseException] = []

    def convert(keys: list[str]) -> None:
        try:
            for key in keys:
                converted[key] = state_dict[key].to(memory_format=torch.channels_last)
        except BaseException as exc:  # noqa: BLE001 - re-raised on the calling thread
            failure.append(exc)

    worker = None
    if halves[1] and loads[1] >= _PARALLEL_COPY_BYTES:
        try:
            worker = threading.Thread(target=convert, args=(halves[1],), name="ptycho-nhwc-copy", daemon=True)
            worker.start()
        except RuntimeError:  # no thread available: all on this one
            worker = None
    convert(halves[0] if worker is not None else four_d)
    if worker is not None:
        worker.join()
    if failure:
        raise failure[0]
    result.update(converted)
    return result


#: Below this many bytes a second thread costs more than it saves.
_PARALLEL_COPY_BYTES = 1 << 20


def _decode_manifest(reader: ArchiveReader, allow_unsafe: bool | None) -> dict[str, Any]:
    if MANIFEST_MEMBER not in reader:
        raise reader.refusal(
            f"{reader.path} has no manifest.dill: not a PtychoPINN bundle (members: "
            f"{short_repr(sorted(reader.names)[:10])})",
            CorruptBundleError,
        )
    manifest = safe_loads(reader.read(MANIFEST_MEMBER), member=MANIFEST_MEMBER, allow_unsafe=allow_unsafe)
    if not isinstance(manifest, dict):
        raise CorruptBundleError(
            f"manifest.dill must hold a dict {{'models': [...], 'version': ...}}, got {type(manifest).__name__}"
        )
    version = manifest.get("version")
    models = manifest.get("models")
    if (isinstance(version, str) and version == "1.0") or any(n.endswith("model.keras") for n in reader.names):
        action = identify_artifact(reader.path).action or "convert it with `ptycho-flavor convert`"
        raise TensorFlowBundleError(
            f"{reader.path} is a TensorFlow PtychoPINN archive (manifest version {short_repr(version)}, model.keras "
            f"members), not a PyTorch bundle: the PyTorch loader does not read Keras models; {action}"
        )
    if not isinstance(version, str):
        raise CorruptBundleError(f"manifest.dill['version'] must be a str, got {short_repr(version)}")
    if version != params_module.PYTORCH_BUNDLE_VERSION:
        raise UnsupportedBundleError(
            f"manifest version {short_repr(version)} is not supported; this loader reads "
            f"{params_module.PYTORCH_BUNDLE_VERSION!r} bundles"
        )
    if not isinstance(models, list) or not models or not all(
        isinstance(m, str) and len(m) <= _MAX_MODEL_NAME for m in models
    ):
        raise CorruptBundleError(
            f"manifest.dill['models'] must be a non-empty list of names (at most {_MAX_MODEL_NAME} characters "
            f"each), got {short_repr(models)}"
        )
    if len(set(models)) != len(models) or len(models) > reader.limits.max_members:
        raise CorruptBundleError(
            f"manifest.dill['models'] must list distinct model names (at most {reader.limits.max_members}), got "
            f"{short_repr(models)}"
        )
    if INFERENCE_MODEL not in models:
        raise CorruptBundleError(
            f"manifest lists models {short_repr(models)} but not {INFERENCE_MODEL!r}, the network inference needs"
        )
    backend = manifest.get("backend", BACKEND)
    if not isinstance(backend, str) or backend != BACKEND:
        raise UnsupportedBundleError(f"manifest backend {short_repr(backend)} is not supported; expected {BACKEND!r}")
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
            f"member {short_repr(name)} does not match the sha256 recorded in manifest.dill (expected "
            f"{expected[:16]}..., got {actual[:16]}...): the bundle was modified or damaged after it was written"
        )
    verified.append(name)


class _MemberDigest:
    """The integrity checks of one large member, computed on a worker thread while the caller decodes it.

    The member's bytes are in memory: a stored member loaded whole from the file (:meth:`MemberView.load`, its CRC
    not checked by the read) or a deflated one inflated by :meth:`ArchiveReader.read`. A stored member's CRC-32 is
    checked here, as ``zipfile`` would (a wrong CRC field makes upstream's ``zipfile`` reader refuse the file even
    when the bytes are intact), together with the sha256 the manifest records (when it does): one ``hashlib`` and one
    ``zlib`` call over the whole buffer, both releasing the GIL, so with a spare core they cost no wall time;
    :meth:`check` waits for them. The caller must not write the buffer meanwhile (the tensors decoded over it are
    only read until then). They guard against damage, not tampering (whoever can edit the member can edit the
    manifest and the directory), so decoding the bytes before the digests are known loses nothing: the decoders are
    bounded on their own.
    """

    def __init__(
        self, reader: ArchiveReader, manifest: Mapping[str, Any], name: str, data: bytes | MemberView
    ) -> None:
        self.name = name
        self.reader = reader
        self.expected_sha256: str | None = (manifest.get("sha256") or {}).get(name)
        self.expected_crc = reader.crc(name) if reader.stored(name) else None  # deflated: zipfile checked it
        memory = data.memory if isinstance(data, MemberView) else data
        if memory is None:
            raise ValueError(f"{name}: a member view is hashed once it is loaded (MemberView.load)")
        self._memory: Any = memory
        self._sha256: str | None = None
        self._crc: int | None = None
        self._thread: threading.Thread | None = None
        if self.expected_sha256 is None and self.expected_crc is None:
            return
        try:
            self._thread = threading.Thread(target=self._compute, name="ptycho-bundle-digest", daemon=True)
            self._thread.start()
        except RuntimeError:  # no thread available: computed in wait()
            self._thread = None

    def _compute(self) -> None:
        # One thread, sha256 first (measured on a two-core machine: a thread for each digest beside the loading one,
        # or the CRC first, made the whole load 1.13x slower)
        memory, self._memory = self._memory, None
        if memory is None:
            return
        self._sha256 = hashlib.sha256(memory).hexdigest() if self.expected_sha256 is not None else None
        self._crc = zlib.crc32(memory) if self.expected_crc is not None else 0

    def wait(self) -> None:
        """Wait for the digests (computing them here when no thread could be started)."""
        if self._thread is not None:
            self._thread.join()
        else:
            self._compute()

    def check(self, verified: list[str]) -> None:
        """Wait for the digests and raise :class:`CorruptBundleError` if one does not match."""
        self.wait()
        if self.expected_sha256 is not None:
            if self._sha256 != self.expected_sha256.lower():
                raise CorruptBundleError(
                    f"member {short_repr(self.name)} does not match the sha256 recorded in manifest.dill (expected "
                    f"{self.expected_sha256[:16]}..., got {str(self._sha256)[:16]}...): the bundle was modified or "
                    "damaged after it was written"
                )
            verified.append(self.name)
        if self.expected_crc is not None and self._crc != self.expected_crc:
            raise self.reader.crc_error(self.name)


def _load_stored(reader: ArchiveReader, name: str, archive: Path) -> MemberView | None:
    """A stored member read whole into memory (:meth:`MemberView.load`), or None where it is absent or deflated (or
    the archive cannot give a view: then it is read with :meth:`ArchiveReader.read`)."""
    if name not in reader or not reader.stored(name):
        return None
    # Stored bytes are the file's own: the compression-ratio cap, against inflation, has nothing to bound (the
    # member's extent is checked against the next structure instead); the per-member cap applies.
    view = reader.view(name, genuine_bytes=reader.size(name))
    if view is not None and not view.load(torch.empty(view.size, dtype=torch.uint8).numpy()):
        raise CorruptBundleError(f"member {short_repr(name)} of {archive} is cut short (the file shrank)")
    return view


def read_bundle(
    path: PathLike,
    *,
    allow_unsafe: bool | None = None,
    legacy_scaling: bool = False,
    limits: BundleLimits = DEFAULT_LIMITS,
    allow_nonfinite: bool = False,
    channels_last: bool = False,
) -> BundleContents:
    """Decode and validate a bundle without building the network or touching the global config.

    Reads nothing but the named members, into memory (nothing is extracted or written), and checks the weights
    against the configured network on the ``meta`` device, so a bundle that passes here builds. Work and memory
    stay bounded by the file's real size whatever its headers declare (docs/bundle-format.md §5); ``model.pth``
    may inflate to what the configured network's weights genuinely need.

    Args:
        path: ``wts.h5.zip``, its base ``wts.h5``, or a directory holding ``wts.h5.zip``.
        allow_unsafe: unpickle ``.dill`` members with dill (runs code from the file; trusted files only) and skip
            the global check of torch members (``torch.load(weights_only=True)`` and every size cap still apply).
        legacy_scaling: for bundles without ``torch_scaling_metadata.pt``, reproduce upstream's legacy
            ``load_torch_bundle`` input scaling instead of honouring the caller's factor (docs/bundle-format.md §4.2).
        limits: size caps against zip bombs.
        allow_nonfinite: accept NaN/inf weights (forensics); refused by default.
        channels_last: read the 4-D weights in NHWC memory format where they can be read that way in place (the
            same values; what ``build_network(channels_last=True)`` wants, without an NCHW copy first).

    Raises:
        BundleError: one of its subclasses, naming the cause and the fix
            (:class:`~mlflow_ptycho_flavor.errors.NonFiniteWeightsError` for NaN/inf weights).
    """
    contents, digest = _read_bundle(
        path, allow_unsafe=allow_unsafe, legacy_scaling=legacy_scaling, limits=limits, allow_nonfinite=allow_nonfinite,
        channels_last=channels_last,
    )
    digest.check(contents.hashes_verified)
    return contents


def _read_bundle(
    path: PathLike,
    *,
    allow_unsafe: bool | None,
    legacy_scaling: bool,
    limits: BundleLimits,
    allow_nonfinite: bool,
    channels_last: bool,
) -> tuple[BundleContents, "_MemberDigest"]:
    """:func:`read_bundle`'s work, except that the weights' digests may still be running on their worker thread: the
    caller checks them (:meth:`_MemberDigest.check`) before it hands out anything built from the contents. On an
    error nothing is left running."""
    archive = resolve_bundle_path(path)
    scan = not unsafe_loading_allowed(allow_unsafe)  # same opt-in as the .dill members
    reader = ArchiveReader(archive, limits)
    digest: _MemberDigest | None = None
    try:
        manifest = _decode_manifest(reader, allow_unsafe)
        verified: list[str] = []
        weights_member = f"{INFERENCE_MODEL}/model.pth"
        # A stored model.pth is read whole from the file in one call, its storages then tensors over those bytes
        # (docs/bundle-format.md §1.3). It is read first, so that its digests run on a worker thread while the small
        # members are decoded (its size is the file's own: no network configuration is needed to bound it).
        weights: bytes | MemberView | None = _load_stored(reader, weights_member, archive)
        if weights is not None:
            digest = _MemberDigest(reader, manifest, weights_member, weights)
        snapshots: list[tuple[str, bytes, dict]] = []
        for model in manifest["models"]:
            member = f"{model}/params.dill"
            if member not in reader:
                raise CorruptBundleError(
                    f"{archive} lacks {short_repr(member)}, which the manifest's model {short_repr(model)} needs"
                )
            raw = reader.read(member)
            _verify_hash(manifest, member, raw, verified)
            if snapshots and raw == snapshots[0][1]:
                snapshots.append((member, raw, snapshots[0][2]))  # the same bytes decode to the same snapshot
                continue
            snapshot = safe_loads(raw, member=member, allow_unsafe=allow_unsafe)
            with config_errors(member):
                params_module.validate_params_snapshot(snapshot, source=member)
            snapshots.append((member, raw, snapshot))
        first_member, first_raw, params = snapshots[0]
        for member, raw, snapshot in snapshots[1:]:
            if raw == first_raw:
                continue
            # Bounded by both members' sizes: decoded values that passed check_plain_data fit easily; values from
            # an unsafe (unchecked) load that do not are refused rather than compared for ever.
            differing = plain_differences(
                snapshot, params, budget=node_budget(len(raw)) + node_budget(len(first_raw)),
                what=f"{member} with {first_member}",
            )
            if differing:
                raise ConfigMismatchError(
                    f"{member} differs from {first_member} in keys {short_repr(differing[:8])}; every model of a bundle "
                    "must carry the same params snapshot"
                )
        metadata = None
        if METADATA_MEMBER in reader:
            raw = reader.read(METADATA_MEMBER)
            _verify_hash(manifest, METADATA_MEMBER, raw, verified)
            decoded = torch_load(raw, METADATA_MEMBER, scan=scan)
            check_plain_data(decoded, member=METADATA_MEMBER, size=len(raw), leaf_types=(torch.Tensor,))
            with config_errors(METADATA_MEMBER):
                metadata = validate_metadata(decoded)
                network_config = network_config_from_metadata(metadata)
                check_params_agree(params, network_config)
            check_input_scale(network_config, METADATA_MEMBER)
        else:
            with config_errors(first_member):
                network_config = network_config_from_params(params, legacy_scaling=legacy_scaling)
            check_input_scale(network_config, first_member)
        # What the configured network's weights need decides how far model.pth may inflate (outer and nested zip),
        # never past the per-member cap.
        layout = network_layout(network_config)
        genuine = min(layout.genuine_file_bytes, limits.max_member_bytes)
        if digest is None:  # deflated (inflated into memory now, within what the network needs) or absent
            weights = reader.read(weights_member, genuine_bytes=genuine, verify_crc=False)
            digest = _MemberDigest(reader, manifest, weights_member, weights)
        weights_size = reader.size(weights_member)
        try:
            state_dict = torch_load(weights, weights_member, scan=scan, max_inflated_bytes=max(weights_size, genuine),
                                    channels_last=channels_last)
            check_state_dict_values(state_dict, weights_member)
            detect_era(state_dict, network_config)
            check_fits(network_config, state_dict, weights_size, layout)
            if not allow_nonfinite:
                check_finite_weights(state_dict, weights_member)
        except BundleError:
            digest.check(verified)  # damage explains a decoding failure better than the decoder does
            raise
        hashes = manifest.get("sha256") or {}
        for name in reader.names:
            if name not in verified and name not in (MANIFEST_MEMBER, weights_member) and hashes.get(name):
                _verify_hash(manifest, name, reader.read(name), verified)
        member_sizes = {name: reader.size(name) for name in reader.names}
        pending, digest = digest, None  # the caller's to check (the buffer it hashes is only read meanwhile)
    finally:
        if digest is not None:
            digest.wait()  # an error: no thread outlives the read
        reader.close()
    contents = BundleContents(
        path=archive,
        manifest=manifest,
        params=params,
        metadata=metadata,
        network_config=network_config,
        state_dict=OrderedDict(state_dict),
        hashes_verified=verified,
        member_sizes=member_sizes,
    )
    return contents, pending


def read_and_build(
    path: PathLike,
    *,
    device: str | torch.device | None = None,
    channels_last: bool = False,
    restore_params: bool = True,
    allow_unsafe: bool | None = None,
    legacy_scaling: bool = False,
    limits: BundleLimits = DEFAULT_LIMITS,
    allow_nonfinite: bool = False,
) -> tuple[BundleContents, torch.nn.Module]:
    """:func:`read_bundle`, CONFIG-001 (the params snapshot restored into the global config, unless
    ``restore_params`` is False), then :meth:`BundleContents.build_network` adopting the weights: what every loader
    does.

    The weights' digests (sha256, CRC-32), which take longer than the rest of the read, run on their worker thread
    while the network is built; the network is handed out only once they match. A load that fails after the
    restore puts the global config back as it was (:func:`~.params.params_restored`).

    Args:
        path: ``wts.h5.zip``, its base ``wts.h5``, or a directory holding ``wts.h5.zip``.
        device: where the network goes (``None``/``"auto"``: CUDA if available, else CPU).
        channels_last: NHWC activations (:meth:`BundleContents.build_network`); the weights are read in NHWC
            where the device wants them so (not on the CPU).
        restore_params, allow_unsafe, legacy_scaling, limits, allow_nonfinite: see :func:`load_torch_bundle`.

    Raises:
        BundleError: one of its subclasses, naming the cause and the fix.
        ValueError: ``device`` is not valid or not available.
    """
    nhwc_read = channels_last and resolve_device(device).type != "cpu"
    contents, digest = _read_bundle(
        path, allow_unsafe=allow_unsafe, legacy_scaling=legacy_scaling, limits=limits, allow_nonfinite=allow_nonfinite,
        channels_last=nhwc_read,
    )
    restored = params_module.params_restored(contents.params) if restore_params else contextlib.nullcontext()
    with restored:
        try:
            network = contents.build_network(device, adopt_weights=True, channels_last=channels_last)
        except BundleError:
            digest.check(contents.hashes_verified)  # damage explains a failure better than the build does
            raise
        finally:
            digest.wait()
        digest.check(contents.hashes_verified)
    return contents, network


def load_torch_bundle(
    path: PathLike,
    *,
    device: str | torch.device | None = None,
    restore_params: bool = True,
    allow_unsafe: bool | None = None,
    legacy_scaling: bool = False,
    limits: BundleLimits = DEFAULT_LIMITS,
    allow_nonfinite: bool = False,
) -> tuple[torch.nn.Module, dict[str, Any]]:
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
        allow_nonfinite: accept NaN/inf weights (forensics); refused by default.

    Returns:
        ``(network, params)``: the network in eval mode on ``device`` (a ``PtychoPINNNetwork`` for the CNN, a
        ``PtychoFnoNetwork`` for the FNO family), and the params snapshot.

    Example:
        >>> model, params = load_torch_bundle("out/wts.h5.zip", device="cpu")  # doctest: +SKIP
        >>> obj = model(amplitudes, scale)  # complex64 (B, C, N, N)  # doctest: +SKIP
    """
    contents, network = read_and_build(
        path, device=device, restore_params=restore_params, allow_unsafe=allow_unsafe, legacy_scaling=legacy_scaling,
        limits=limits, allow_nonfinite=allow_nonfinite,
    )
    return network, dict(contents.params)
