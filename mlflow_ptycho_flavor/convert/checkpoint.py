"""Lightning checkpoints (``*.ckpt``) of upstream's PyTorch training -> standalone ``wts.h5.zip`` bundles.

Upstream's Lightning training (and ptychodus, which loads its PyTorch PtychoPINN models from them) keeps models
as checkpoints: a ``torch.save`` zip whose pickle holds a plain dict with the module's ``state_dict``, the four
torch config dicts in ``hyper_parameters`` (``asdict`` of upstream's ``ModelConfig``, ``DataConfig``,
``TrainingConfig``, ``InferenceConfig``, plus five Lightning-module extras), and training state (optimizer
moments, loop counters, callback state). A bundle needs exactly the first two: the state_dict becomes
``diffraction_to_obj/model.pth`` and the four dicts become ``torch_scaling_metadata.pt``, the member
upstream's metadata-aware loader rebuilds the network from (docs/bundle-format.md §8). Rebuilding from those
four dicts and loading the state_dict strictly reproduces the restored checkpoint's ``forward_predict`` bit
for bit (fixture README, "Results of reloading").

Reading is safe by construction (:func:`read_checkpoint`):

* the zip is opened as a regular file, its directory size and entry count are capped before it is parsed,
  member names are checked (no absolute paths, ``..``, duplicates), and every member read is size-capped
  (:class:`CheckpointLimits`);
* ``data.pkl`` is first disassembled (which executes nothing and allocates no declared sizes), then unpickled
  by a restricted unpickler that resolves exactly the globals such checkpoints reference -
  ``collections.OrderedDict``, ``torch._utils._rebuild_tensor_v2``, ``torch.FloatStorage``,
  ``torch.LongStorage`` (fixture README, "Globals the pickle references") and, for the FNO family's complex64
  spectral weights, ``torch.ComplexFloatStorage`` - to inert stand-ins: storages become
  references to ``data/<key>`` records and tensors become (storage, offset, size, stride) records. Any other
  global (``os.system``, ``pathlib.PosixPath``, a Lightning class) raises :class:`UnsafeCheckpointError`
  naming it, before anything is imported or called;
* only the tensors reachable from ``state_dict`` (and ``ci_statistics`` / tensors in ``hyper_parameters``, if
  any) are materialised, from their storage records, after checking that every view lies inside its storage.
  Optimizer, scheduler, loop and callback state is never read beyond the pickle's own bytes: their storages
  are not even decompressed.

Converting (:func:`convert_checkpoint`) sends the config dicts through the same validation as stored metadata
(:func:`~mlflow_ptycho_flavor.bundle.metadata.validate_metadata`, :func:`~mlflow_ptycho_flavor.bundle.metadata.network_config_from_metadata`), checks the weights
against the configured network on the ``meta`` device, writes the bundle atomically next to its target,
re-reads it with :func:`~mlflow_ptycho_flavor.bundle.read_bundle` and only then moves it into place. Checkpoints of upstream's
older architecture era (UNet skip ``merge_blocks``, what ptychodus 1.7's branch trains) are refused with
:class:`~mlflow_ptycho_flavor.errors.ArchitectureEraError`; settings a bundle cannot carry (non-default Lightning extras such as
``parity_scale_mode``) with :class:`UnsupportedCheckpointError`.
"""

from __future__ import annotations

import logging
import math
import os
import zipfile
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mlflow_ptycho_flavor._io import PathLike, stream_sha256
from mlflow_ptycho_flavor.bundle import params as params_module
from mlflow_ptycho_flavor.bundle.archive import _check_member_name, resolve_bundle_path
from mlflow_ptycho_flavor.bundle.compat import check_fits, config_errors, detect_era, stored_bytes
from mlflow_ptycho_flavor.bundle.identify import (
    OLDER_ERA_DESCRIPTION,
    DetectLimits,
    ZipDirectoryTooLarge,
    describe_for_error,
    open_bounded_zip,
    open_regular_file,
    torch_archive_prefix,
)
from mlflow_ptycho_flavor.bundle.io import BACKEND
from mlflow_ptycho_flavor.bundle.writer import write_bundle
from mlflow_ptycho_flavor.bundle.metadata import (
    METADATA_SCHEMA_VERSION,
    check_params_agree,
    network_config_from_metadata,
    validate_metadata,
)
from mlflow_ptycho_flavor.convert.checkpoint_pickle import (
    CHECKPOINT_ALLOWED_GLOBALS,
    DEFAULT_CHECKPOINT_LIMITS,
    CheckpointLimits,
    _check_state_dict_metadata,
    _materialize,
    _quote,
    _StorageReader,
    _TensorRef,
    _unpickle,
)
from mlflow_ptycho_flavor.errors import (
    ArchitectureEraError,
    BundleError,
    CorruptCheckpointError,
    InvalidArgumentError,
    NotACheckpointError,
    UnsafeCheckpointError,
    UnsupportedBundleError,
    UnsupportedCheckpointError,
    short_repr,
)
from mlflow_ptycho_flavor.network import FNO_ARCHITECTURES, AnyNetworkConfig

__all__ = [
    "CHECKPOINT_ALLOWED_GLOBALS",
    "CheckpointLimits",
    "LightningCheckpoint",
    "read_checkpoint",
    "convert_checkpoint",
]

_logger = logging.getLogger(__name__)

#: The config dicts of ``hyper_parameters`` that become ``torch_scaling_metadata.pt`` sections.
CONFIG_KEYS = ("data_config", "model_config", "training_config", "inference_config")
#: The other hyper-parameters upstream's ``PtychoPINN_Lightning.__init__`` records, with its defaults. A bundle
#: cannot carry them (upstream's rebuild uses these defaults), so a checkpoint holding anything else is refused.
LIGHTNING_EXTRAS_DEFAULTS: dict[str, Any] = {
    "generator_output": "amp_phase",
    "generator_overrides": {},
    "parity_scale_mode": "off",
    "parity_fixed_delta": 0.0,
    "parity_init_scheme": "default",
}


@dataclass
class LightningCheckpoint:
    """What :func:`read_checkpoint` keeps from a checkpoint (everything a bundle needs, nothing else).

    Attributes:
        path: the file read.
        state_dict: the module's weights, CPU tensors in stored order, with the ``_metadata`` attribute
            ``torch.nn.Module.state_dict`` attaches (module prefix -> ``{'version': n}``).
        hyper_parameters: the ``hyper_parameters`` dict (plain data; tensors in it materialised).
        ci_statistics: ``{name: [float, ...]}`` from the checkpoint's ``ci_statistics`` entry, or None when absent.
        lightning_version: ``pytorch-lightning_version``, when recorded.
        epoch: the epoch the checkpoint was saved in, when recorded.
        global_step: optimizer steps taken, when recorded.
        dropped: top-level entries that were not read (optimizer, scheduler, loop and callback state).
        sha256: hex digest of the whole file as read (recorded in a converted bundle's provenance).
        size_bytes: the file's size.
    """

    path: Path
    state_dict: "OrderedDict[str, torch.Tensor]"
    hyper_parameters: dict[str, Any]
    ci_statistics: dict[str, list[float]] | None = None
    lightning_version: str | None = None
    epoch: int | None = None
    global_step: int | None = None
    dropped: tuple[str, ...] = field(default_factory=tuple)
    sha256: str | None = None
    size_bytes: int | None = None

    def bundle_metadata(self) -> dict[str, Any]:
        """The ``torch_scaling_metadata.pt`` dict this checkpoint maps to, validated (see :func:`convert_checkpoint`).

        Raises:
            ArchitectureEraError: the checkpoint is from upstream's older architecture era.
            UnsupportedCheckpointError: it holds Lightning extras a bundle cannot carry.
            BundleError: the config dicts fail the stored-metadata validation.
        """
        _check_checkpoint_era(self)
        _check_extras(self)
        configs = {name: dict(self.hyper_parameters[name]) for name in CONFIG_KEYS}
        model_config = configs["model_config"]
        # Upstream's module sets loss_function from torch_loss_mode in __init__, after recording the hparams, so its
        # own bundle of the same module says 'MAE' where the checkpoint may still say 'Poisson' (fixture README
        # caveat). The loss is parameter-free: neither the weights nor forward_predict depend on it.
        if configs["training_config"].get("torch_loss_mode") == "mae":
            model_config["loss_function"] = "MAE"
        metadata = {"schema_version": METADATA_SCHEMA_VERSION, **configs, "ci_statistics": self.ci_statistics}
        with config_errors(f"{self.path.name} hyper_parameters"):
            return validate_metadata(metadata)

    def network_config(self) -> AnyNetworkConfig:
        """The network the checkpoint's configs describe (raises like :meth:`bundle_metadata`, or names an
        architecture the metadata path does not build)."""
        metadata = self.bundle_metadata()
        with config_errors(f"{self.path.name} hyper_parameters"):
            try:
                return network_config_from_metadata(metadata)
            except UnsupportedBundleError as exc:
                raise UnsupportedCheckpointError(f"{self.path}: {exc}") from exc


# ----------------------------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------------------------
def _open_checkpoint(path: Path, limits: CheckpointLimits) -> tuple[Any, zipfile.ZipFile, str]:
    try:
        handle = open_regular_file(path)
    except FileNotFoundError as exc:
        raise NotACheckpointError(f"no checkpoint at {path}: the file does not exist") from exc
    except (OSError, ValueError) as exc:
        raise NotACheckpointError(f"{path} cannot be opened as a checkpoint: {str(exc)[:200]}") from exc
    try:
        detect_limits = DetectLimits(max_entries=limits.max_members, max_directory_bytes=limits.max_directory_bytes)
        try:
            archive = open_bounded_zip(handle, detect_limits)
        except ZipDirectoryTooLarge as exc:
            raise UnsafeCheckpointError(f"{path}: {exc}, beyond CheckpointLimits; refused") from exc
        if archive is None:
            raise NotACheckpointError(f"{path} is not a Lightning checkpoint: {describe_for_error(path)}")
        names = archive.namelist()
        if len(set(names)) != len(names):
            archive.close()
            raise UnsafeCheckpointError(f"{path} lists a member twice; which copy a reader sees would be ambiguous")
        try:
            for name in names:
                _check_member_name(name)
        except BundleError as exc:
            archive.close()
            raise UnsafeCheckpointError(f"{path}: {exc}") from exc
        prefix = torch_archive_prefix(names)
        if prefix is None:
            archive.close()
            raise NotACheckpointError(f"{path} is not a Lightning checkpoint: {describe_for_error(path)}")
        return handle, archive, prefix
    except BaseException:
        handle.close()
        raise


def _read_record(archive: zipfile.ZipFile, name: str, cap: int, path: Path) -> bytes | None:
    try:
        info = archive.getinfo(name)
    except KeyError:
        return None
    if info.file_size > cap:
        raise UnsafeCheckpointError(f"{path}: {name!r} is {info.file_size} bytes, beyond the cap of {cap}; refused")
    try:
        with archive.open(info) as member:
            return member.read(cap + 1)
    except Exception as exc:  # noqa: BLE001 - damaged member
        raise CorruptCheckpointError(f"{path}: {name!r} is damaged ({type(exc).__name__}: {str(exc)[:200]})") from exc


def read_checkpoint(path: PathLike, *, limits: CheckpointLimits = DEFAULT_CHECKPOINT_LIMITS) -> LightningCheckpoint:
    """Read the weights and configs of a Lightning checkpoint safely, dropping all training state unread.

    Args:
        path: the ``.ckpt`` file (any ``torch.save`` zip holding a Lightning checkpoint dict).
        limits: size caps.

    Returns:
        The state_dict (with its ``_metadata``), the hyper-parameters and the few recorded scalars.

    Raises:
        NotACheckpointError: the file is something else; the message says what (a bundle, a bare state_dict, ...).
        UnsafeCheckpointError: the pickle names a global outside :data:`CHECKPOINT_ALLOWED_GLOBALS`, or the file
            exceeds ``limits``.
        CorruptCheckpointError: the file is damaged (a storage cut short, a view outside its storage, bad pickle).
    """
    p = Path(os.fspath(path)).expanduser()
    handle, archive, prefix = _open_checkpoint(p, limits)
    source = f"{p.name}:{prefix}/data.pkl"
    try:
        sha256, size_bytes = stream_sha256(handle)
        byteorder = _read_record(archive, f"{prefix}/byteorder", 16, p)
        if byteorder is not None and byteorder.strip() != b"little":
            raise UnsafeCheckpointError(
                f"{p} stores tensors in {byteorder[:16]!r} byte order; only little-endian checkpoints are read"
            )
        data = _read_record(archive, f"{prefix}/data.pkl", limits.max_pickle_bytes, p)
        if data is None:  # pragma: no cover - torch_archive_prefix requires the record
            raise NotACheckpointError(f"{p} has no {prefix}/data.pkl")
        value = _unpickle(data, source, limits)
        if isinstance(value, Mapping) and "state_dict" not in value and value and all(
            isinstance(v, _TensorRef) for v in value.values()
        ):
            raise NotACheckpointError(
                f"{p} is not a Lightning checkpoint but a bare state_dict ({len(value)} tensors, no configuration): "
                "a bundle also needs the four config dicts a checkpoint's hyper_parameters carry; convert the .ckpt "
                "it came from, or load the weights into a PtychoPINNNetwork and save it with save_torch_bundle"
            )
        if not isinstance(value, dict) or "state_dict" not in value:
            raise NotACheckpointError(
                f"{p} is a torch.save file but not a Lightning checkpoint (a dict with 'state_dict' and "
                f"'hyper_parameters'); top level: {type(value).__name__} "
                f"{_quote(sorted(map(str, value))[:10]) if isinstance(value, Mapping) else ''}"
            )
        raw_state = value["state_dict"]
        if not isinstance(raw_state, Mapping) or not raw_state or not all(
            isinstance(k, str) and isinstance(v, _TensorRef) for k, v in raw_state.items()
        ):
            raise CorruptCheckpointError(f"{p}: 'state_dict' is not a non-empty map of parameter names to tensors")
        hyper = value.get("hyper_parameters")
        if not isinstance(hyper, dict):
            raise UnsupportedCheckpointError(
                f"{p} has no 'hyper_parameters' dict (got {type(hyper).__name__}): the network's configuration is "
                "not recorded, so it cannot become a bundle. Upstream's PtychoPINN_Lightning records its four "
                "config dicts there; re-save the checkpoint with current upstream training"
            )
        reader = _StorageReader(archive, prefix, p, limits)
        state_dict = _materialize(raw_state if isinstance(raw_state, OrderedDict) else OrderedDict(raw_state), reader)
        _check_state_dict_metadata(state_dict, str(p))
        hyper_parameters = _materialize(hyper, reader)
        ci_raw = value.get("ci_statistics")
        ci_statistics = None
        if ci_raw is not None:
            if not isinstance(ci_raw, Mapping) or not all(
                isinstance(k, str) and isinstance(v, _TensorRef) for k, v in ci_raw.items()
            ):
                raise CorruptCheckpointError(f"{p}: 'ci_statistics' is not a map of names to tensors")
            ci_statistics = {
                name: [float(x) for x in reader.tensor(ref).reshape(-1).tolist()] for name, ref in ci_raw.items()
            }
    finally:
        archive.close()
        handle.close()
    scalars = {k: value.get(k) for k in ("epoch", "global_step", "pytorch-lightning_version")}
    kept = {"state_dict", "hyper_parameters", "ci_statistics", "epoch", "global_step", "pytorch-lightning_version"}
    return LightningCheckpoint(
        path=p,
        state_dict=state_dict,
        hyper_parameters=hyper_parameters,
        ci_statistics=ci_statistics,
        lightning_version=scalars["pytorch-lightning_version"][:40] if isinstance(
            scalars["pytorch-lightning_version"], str) else None,
        epoch=scalars["epoch"] if isinstance(scalars["epoch"], int) else None,
        global_step=scalars["global_step"] if isinstance(scalars["global_step"], int) else None,
        dropped=tuple(str(k) for k in value if k not in kept),
        sha256=sha256,
        size_bytes=size_bytes,
    )


# ----------------------------------------------------------------------------------------------------------------
# Checks before converting
# ----------------------------------------------------------------------------------------------------------------
def _check_checkpoint_era(ckpt: LightningCheckpoint) -> None:
    """Refuse checkpoints of upstream's older architecture era by the markers of the fixture README."""
    hyper = ckpt.hyper_parameters
    model_config = hyper.get("model_config")
    markers: list[str] = []
    merge = [k for k in ckpt.state_dict if ".merge_blocks." in k]
    if merge:
        markers.append(f"state_dict keys such as {merge[0][:100]!r}")
    if isinstance(model_config, Mapping):
        if model_config.get("architecture") == "unet":
            markers.append("model_config['architecture']='unet'")
        for name in ("use_reference_model", "object_representation"):
            if name in model_config:
                markers.append(f"model_config[{name!r}]")
    if markers:
        raise ArchitectureEraError(
            f"{ckpt.path} is a checkpoint of {OLDER_ERA_DESCRIPTION} ({'; '.join(markers[:3])}): its network differs "
            "from the current (E3) one this package and upstream main build, so it cannot be converted exactly. "
            "Re-train the model with current upstream PtychoPINN (main)"
        )
    missing = [k for k in CONFIG_KEYS if not isinstance(hyper.get(k), Mapping)]
    if missing:
        raise UnsupportedCheckpointError(
            f"{ckpt.path}: hyper_parameters lack the config dict(s) {missing} (present: "
            f"{_quote(sorted(map(str, hyper))[:12])}); upstream's PtychoPINN_Lightning records all four, so this "
            "checkpoint does not come from upstream's current training"
        )
    if isinstance(model_config, Mapping) and "physics_forward_mode" not in model_config:
        raise ArchitectureEraError(
            f"{ckpt.path}: model_config has no 'physics_forward_mode', a field every checkpoint of the current (E3) "
            "era records: it comes from an older upstream era whose network may differ; re-train it with current "
            "upstream PtychoPINN (main)"
        )


def _fno_generator_output(model_config: Any) -> str | None:
    """For an FNO-family checkpoint, the ``generator_output`` upstream's training records beside the default.

    Upstream's trainer sets it to the core's head (``'amp_phase'`` for ``generator_output_mode='amp_phase'``, else
    ``'real_imag'``); the rebuilt FNO core takes its head from ``model_config['generator_output_mode']`` alone
    (upstream's own rebuild, with this extra at its default, reproduces real_imag ``ffno`` models bit for bit:
    tests/data/upstream_fno/README.md), so that value is as faithful as the default.
    """
    if not isinstance(model_config, Mapping) or model_config.get("architecture") not in FNO_ARCHITECTURES:
        return None
    return "amp_phase" if model_config.get("generator_output_mode") == "amp_phase" else "real_imag"


def _check_extras(ckpt: LightningCheckpoint) -> None:
    """Refuse Lightning hyper-parameters a bundle cannot carry (upstream's rebuild always uses their defaults)."""
    extras = {k: v for k, v in ckpt.hyper_parameters.items() if k not in CONFIG_KEYS}
    fno_output = _fno_generator_output(ckpt.hyper_parameters.get("model_config"))
    if fno_output is not None and extras.get("generator_output") == fno_output:
        extras.pop("generator_output")
    unknown = sorted(str(k) for k in extras if k not in LIGHTNING_EXTRAS_DEFAULTS)
    if unknown:
        raise UnsupportedCheckpointError(
            f"{ckpt.path}: hyper_parameters hold unknown key(s) {_quote(unknown[:8])}; an unknown knob may change the "
            "network and a bundle could not carry it, so the checkpoint is refused"
        )
    for key, value in extras.items():
        default = LIGHTNING_EXTRAS_DEFAULTS[key]
        same = (value in (None, {}) and default == {}) or (type(value) is type(default) and value == default)
        if not same:
            raise UnsupportedCheckpointError(
                f"{ckpt.path}: hyper_parameters[{key!r}]={_quote(value)} differs from upstream's default "
                f"{default!r}; a bundle rebuilds the module with the default (it stores only the four config dicts), "
                "so the converted model would not reproduce this checkpoint. Re-train with the default, or use the "
                "checkpoint with upstream's own Lightning loader"
            )


def _params_snapshot(metadata: Mapping[str, Any], intensity_scale: float | None) -> dict[str, Any]:
    """The ``params.dill`` dict, synthesised from the configs as the fixture README's provenance table maps them.

    ``intensity_scale`` is not in a checkpoint (upstream derives it from the training data); it is recorded as given,
    else 1.0. No loader of this package uses it, and with ``intensity_scale.trainable`` taken from the network
    (False unless the model really scales its input) upstream's legacy params-only loader honours the caller's
    factor too.
    """
    data_config = metadata["data_config"]
    model_config = metadata["model_config"]
    training_config = metadata["training_config"]
    grid = data_config.get("grid_size")
    gridsize = grid[0] if isinstance(grid, (tuple, list)) and grid else int(round(math.sqrt(model_config["C_model"])))
    probe_mask = model_config.get("probe_mask")
    overrides: dict[str, Any] = {
        "N": data_config["N"],
        "gridsize": gridsize,
        "nphotons": data_config.get("nphotons"),
        "neighbor_count": data_config.get("K"),
        "subsample_seed": data_config.get("subsample_seed"),
        "probe_scale": data_config.get("probe_scale"),
        "model_type": "pinn" if model_config.get("mode") == "Unsupervised" else "supervised",
        "object.big": model_config.get("object_big"),
        "probe.big": model_config.get("probe_big"),
        "probe.mask": probe_mask if isinstance(probe_mask, bool) else probe_mask is not None,
        "intensity_scale.trainable": bool(model_config.get("intensity_scale_trainable", False)),
        "batch_size": training_config.get("batch_size"),
        "nepochs": training_config.get("epochs"),
        "n_groups": training_config.get("n_groups"),
        "output_prefix": training_config.get("output_dir"),
        "train_data_file_path": training_config.get("train_data_file"),
        "test_data_file_path": training_config.get("test_data_file"),
        "backend": BACKEND,
    }
    for key in ("n_filters_scale", "architecture", "amp_activation", "fno_modes", "fno_width", "fno_blocks",
                "fno_cnn_blocks", "learned_input_channels", "max_hidden_channels", "resnet_width",
                "fno_input_transform", "generator_output_mode", "probe_mask_sigma", "probe_mask_diameter",
                "pad_object", "gaussian_smoothing_sigma"):
        if key in model_config:
            overrides[key] = model_config[key]
    for key in ("torch_loss_mode", "torch_mae_pred_l2_match_target", "optimizer", "momentum", "weight_decay",
                "adam_beta1", "adam_beta2", "scheduler", "plateau_factor", "plateau_patience", "plateau_min_lr",
                "plateau_threshold", "gradient_clip_val", "gradient_clip_algorithm", "lr_warmup_epochs",
                "lr_min_ratio"):
        if key in training_config:
            overrides[key] = training_config[key]
    return params_module.make_params_snapshot(overrides, intensity_scale=intensity_scale)


def _provenance(ckpt: LightningCheckpoint) -> dict[str, Any]:
    """``manifest["provenance"]`` of a converted checkpoint: which file it came from and what was dropped."""
    return {
        "converted_from": "lightning_checkpoint",
        "source": {
            "file_name": ckpt.path.name[:200],
            "sha256": ckpt.sha256,
            "size_bytes": ckpt.size_bytes,
            "lightning_version": ckpt.lightning_version,
            "epoch": ckpt.epoch,
            "global_step": ckpt.global_step,
        },
        "dropped": [name[:100] for name in ckpt.dropped[:32]],
    }


# ----------------------------------------------------------------------------------------------------------------
# Converting
# ----------------------------------------------------------------------------------------------------------------
def convert_checkpoint(
    ckpt: PathLike | LightningCheckpoint,
    dst: PathLike,
    *,
    intensity_scale: float | None = None,
    limits: CheckpointLimits = DEFAULT_CHECKPOINT_LIMITS,
) -> Path:
    """Turn a Lightning checkpoint of upstream's current training into a standalone ``wts.h5.zip`` bundle.

    The bundle holds the checkpoint's state_dict unchanged (same keys, order, dtypes, bytes and ``_metadata``) as
    ``diffraction_to_obj/model.pth``, the four config dicts of its ``hyper_parameters`` as
    ``torch_scaling_metadata.pt`` (schema ``ci-entrypoints-v1``; ``ci_statistics`` from the checkpoint's entry of
    that name, else None), a ``params.dill`` synthesised from those configs (see :func:`_params_snapshot`), the
    autoencoder sentinel and a manifest with a sha256 per member - the layout upstream's own saver writes, which
    upstream's metadata-aware loader and :func:`~mlflow_ptycho_flavor.bundle.load_torch_bundle` rebuild exactly.

    Args:
        ckpt: the ``.ckpt`` path, or a :class:`LightningCheckpoint` already read.
        dst: ``out/wts.h5.zip``, ``out/wts.h5`` (``.zip`` appended), any ``*.zip`` (e.g. ptychodus's
            ``model.zip``), or a directory (``<dir>/wts.h5.zip``).
        intensity_scale: the physics scale to record in ``params.dill`` (the checkpoint does not hold it; upstream
            derives it from the training data). Default 1.0; no loader uses it for ``forward_predict``.
        limits: size caps for reading ``ckpt``.

    Returns:
        The bundle path written. Nothing is left at ``dst`` unless the finished bundle re-reads and validates.

    Raises:
        ArchitectureEraError: a checkpoint of upstream's older architecture era.
        UnsupportedCheckpointError: settings a bundle cannot carry, or an architecture the metadata path does not
            build (the message names it).
        BundleError: any other refusal (see :func:`read_checkpoint` and the metadata validation).
    """
    checkpoint = ckpt if isinstance(ckpt, LightningCheckpoint) else read_checkpoint(ckpt, limits=limits)
    if intensity_scale is not None and (
        isinstance(intensity_scale, bool) or not isinstance(intensity_scale, (int, float))
        or not math.isfinite(intensity_scale)
    ):
        raise InvalidArgumentError(f"intensity_scale must be a finite number, got {short_repr(intensity_scale)}")
    target = resolve_bundle_path(dst, for_writing=True)
    if target.exists() and os.path.samefile(target, checkpoint.path):
        raise InvalidArgumentError(
            f"the destination {target} is the checkpoint itself; writing there would replace it - choose another path"
        )
    metadata = checkpoint.bundle_metadata()
    network_config = checkpoint.network_config()
    state_dict = checkpoint.state_dict
    detect_era(state_dict, network_config)
    check_fits(network_config, state_dict, stored_bytes(state_dict))
    with config_errors(f"{checkpoint.path.name} hyper_parameters"):
        snapshot = _params_snapshot(metadata, intensity_scale)
        check_params_agree(snapshot, network_config)
    write_bundle(
        target,
        state_dict=state_dict,
        params=snapshot,
        metadata=metadata,
        provenance=_provenance(checkpoint),
        verify=True,  # the finished bundle must pass the loader's own checks before it takes dst's place
    )
    _logger.info("converted Lightning checkpoint %s into bundle %s (dropped %s)", checkpoint.path, target,
                 ", ".join(checkpoint.dropped) or "nothing")
    return target
