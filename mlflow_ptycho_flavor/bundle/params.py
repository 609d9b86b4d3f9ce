"""The legacy ``params.cfg`` configuration and its restore rule (CONFIG-001).

Upstream PtychoPINN keeps a process-wide dict, ``ptycho.params.cfg``, that its data pipeline reads (``N``,
``gridsize``, ``neighbor_count``, ...). Every bundle carries a full snapshot of it in ``<model>/params.dill``, and
a loader must copy that snapshot into the global *before* anything shape-dependent is built: skipping the
restore gives gridsize/N shape errors downstream.

This module holds that dict as plain data (no TensorFlow, no MLflow), the exact key set and defaults that
upstream's PyTorch saver writes, validation of a snapshot's architecture keys, and :func:`restore_params`.
The network itself never reads the global: it is built from the snapshot passed to it, so a loaded model does
not change behaviour when the global changes later.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import math
import threading
from collections.abc import Iterator, Mapping
from typing import Any

from mlflow_ptycho_flavor.errors import ConfigMismatchError, short_repr
from mlflow_ptycho_flavor.network.config import SUPPORTED_PATCH_SIZES

__all__ = [
    "LEGACY_DEFAULT_CFG",
    "BUNDLE_PARAM_DEFAULTS",
    "PYTORCH_BUNDLE_VERSION",
    "ARCHITECTURE_PARAM_KEYS",
    "cfg",
    "restore_params",
    "params_restored",
    "reset_cfg",
    "make_params_snapshot",
    "validate_params_snapshot",
]

_logger = logging.getLogger(__name__)

PYTORCH_BUNDLE_VERSION = "2.0-pytorch"

#: Upstream's ``ptycho/params.py::DEFAULT_CFG``: what the global holds before any restore. Note N=128 and
#: gridsize=2 here, unlike the dataclass defaults below: that disagreement is why a skipped restore fails.
LEGACY_DEFAULT_CFG: dict[str, Any] = {
    "N": 128, "offset": 4, "gridsize": 2, "outer_offset_train": None, "outer_offset_test": None,
    "batch_size": 16, "nepochs": 60, "n_filters_scale": 2, "output_prefix": "outputs", "big_gridsize": 10,
    "max_position_jitter": 10, "sim_jitter_scale": 0.0, "default_probe_scale": 0.7, "mae_weight": 0.0,
    "nll_weight": 1.0, "tv_weight": 0.0, "realspace_mae_weight": 0.0, "realspace_weight": 0.0,
    "nphotons": 1e9, "nimgs_train": 9, "nimgs_test": 3, "data_source": "generic", "probe.trainable": False,
    "intensity_scale.trainable": False, "positions.provided": False, "object.big": True, "probe.big": False,
    "probe_scale": 10.0, "set_phi": False, "probe.mask": True, "pad_object": True, "model_type": "pinn",
    "label": "", "size": 392, "amp_activation": "sigmoid", "h5_path": "wts.h5", "npseed": 42, "debug": True,
    "gaussian_smoothing_sigma": 0.0, "use_xla_translate": True,
}

#: The 61 keys upstream's PyTorch saver writes (``dataclass_to_legacy_dict`` of the TF ``TrainingConfig``), in
#: the order it writes them, with the dataclass defaults. ``intensity_scale`` and ``_version`` follow them.
BUNDLE_PARAM_DEFAULTS: dict[str, Any] = {
    "batch_size": 16, "nepochs": 50, "mae_weight": 0.0, "nll_weight": 1.0, "realspace_mae_weight": 0.0,
    "realspace_weight": 0.0, "nphotons": 1e9, "n_groups": 512, "n_images": None, "n_subsample": None,
    "subsample_seed": None, "neighbor_count": 4, "enable_oversampling": False, "neighbor_pool_size": None,
    "sequential_sampling": False, "backend": "pytorch", "torch_loss_mode": "poisson",
    "torch_mae_pred_l2_match_target": False, "gradient_clip_val": None, "gradient_clip_algorithm": "norm",
    "optimizer": "adam", "momentum": 0.9, "weight_decay": 0.0, "adam_beta1": 0.9, "adam_beta2": 0.999,
    "scheduler": "Default", "lr_warmup_epochs": 0, "lr_min_ratio": 0.1, "plateau_factor": 0.5,
    "plateau_patience": 2, "plateau_min_lr": 5e-05, "plateau_threshold": 0.0,
    "N": 64, "gridsize": 1, "n_filters_scale": 2, "model_type": "pinn", "architecture": "cnn",
    "fno_modes": 12, "fno_width": 32, "fno_blocks": 4, "fno_cnn_blocks": 2, "learned_input_channels": 1,
    "max_hidden_channels": None, "resnet_width": None, "fno_input_transform": "none",
    "generator_output_mode": "real_imag", "amp_activation": "sigmoid", "probe_mask_sigma": 1.0,
    "probe_mask_diameter": None, "pad_object": True, "probe_scale": 4.0, "gaussian_smoothing_sigma": 0.0,
    "object.big": True, "probe.big": True, "probe.mask": False, "probe.trainable": False,
    "intensity_scale.trainable": True, "positions.provided": True, "output_prefix": "training_outputs",
    "train_data_file_path": None, "test_data_file_path": None,
}

#: Snapshot keys that decide the network (without ``torch_scaling_metadata.pt``) and their accepted types.
ARCHITECTURE_PARAM_KEYS: dict[str, tuple[type, ...]] = {
    "N": (int,),
    "gridsize": (int,),
    "n_filters_scale": (int,),
    "object.big": (bool,),
    "probe.big": (bool,),
    "amp_activation": (str,),
    "model_type": (str,),
    "architecture": (str,),
}
_REQUIRED_KEYS = ("N", "gridsize")
SUPPORTED_N = SUPPORTED_PATCH_SIZES

#: The process-wide legacy config, the counterpart of upstream's ``ptycho.params.cfg``.
cfg: dict[str, Any] = dict(LEGACY_DEFAULT_CFG)
_cfg_lock = threading.Lock()


def reset_cfg() -> None:
    """Put the global config back to upstream's ``DEFAULT_CFG`` (tests and long-lived processes)."""
    with _cfg_lock:
        cfg.clear()
        cfg.update(LEGACY_DEFAULT_CFG)


def _upstream_cfg() -> dict | None:
    """Upstream's own ``ptycho.params.cfg`` when that package is importable, else None."""
    try:
        if importlib.util.find_spec("ptycho") is None:
            return None
        import ptycho.params as upstream_params  # type: ignore[import-not-found]
    except Exception:  # upstream needs TensorFlow at import; a broken install must not break us
        return None
    upstream_cfg = getattr(upstream_params, "cfg", None)
    return upstream_cfg if isinstance(upstream_cfg, dict) else None


def restore_params(snapshot: Mapping[str, Any]) -> dict[str, Any]:
    """Apply CONFIG-001: copy a bundle's params snapshot into the global config before anything is built.

    Every key of the snapshot is copied (``_version`` included, as upstream does); keys the snapshot lacks keep
    their previous values. Upstream's ``ptycho.params.cfg`` is updated too when that package is importable, so
    mixed pipelines see the same values.

    Args:
        snapshot: the ``params.dill`` dict of a bundle (validated with :func:`validate_params_snapshot`).

    Returns:
        The updated global :data:`cfg`.
    """
    validate_params_snapshot(snapshot)
    _apply(snapshot, _upstream_cfg())
    return cfg


def _apply(snapshot: Mapping[str, Any], upstream_cfg: dict | None) -> None:
    """Copy ``snapshot`` into :data:`cfg` and upstream's (the step restore_params and params_restored share)."""
    with _cfg_lock:
        cfg.update(snapshot)
    if upstream_cfg is not None:
        upstream_cfg.update(snapshot)


_ABSENT = object()


@contextlib.contextmanager
def params_restored(snapshot: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    """:func:`restore_params` for a load that can still fail after it (the network is built after the restore,
    CONFIG-001): if the block raises, every key the snapshot set gets its previous value back, in :data:`cfg` and in
    upstream's, so a failed load leaves the global config as it found it."""
    validate_params_snapshot(snapshot)
    upstream_cfg = _upstream_cfg()
    with _cfg_lock:
        previous = {key: cfg.get(key, _ABSENT) for key in snapshot}
    previous_upstream = {key: upstream_cfg.get(key, _ABSENT) for key in snapshot} if upstream_cfg is not None else {}
    _apply(snapshot, upstream_cfg)
    try:
        yield cfg
    except BaseException:
        with _cfg_lock:
            _put_back(cfg, previous)
        if upstream_cfg is not None:
            _put_back(upstream_cfg, previous_upstream)
        raise


def _put_back(target: dict[str, Any], previous: Mapping[str, Any]) -> None:
    for key, value in previous.items():
        if value is _ABSENT:
            target.pop(key, None)
        else:
            target[key] = value


def validate_params_snapshot(snapshot: Mapping[str, Any], *, source: str = "params.dill") -> None:
    """Check that a snapshot is a dict with ``N`` and ``gridsize``, well-typed architecture keys, and no int beyond
    64 bits (cheap to store, but ``gridsize ** 2`` on a multi-megabyte int takes seconds to hours).

    Raises:
        ConfigMismatchError: naming the key, the bad value and what is accepted.
    """
    if not isinstance(snapshot, Mapping):
        raise ConfigMismatchError(
            f"{source} must hold a dict of config values, got {type(snapshot).__name__}; "
            "re-save the bundle with save_torch_bundle"
        )
    for key in _REQUIRED_KEYS:
        if key not in snapshot:
            raise ConfigMismatchError(
                f"{source} lacks the required key {key!r} (upstream's loader requires N and gridsize); "
                "the bundle cannot be rebuilt - re-save it with a full params snapshot"
            )
    for key, types in ARCHITECTURE_PARAM_KEYS.items():
        if key not in snapshot:
            continue
        value = snapshot[key]
        ok = isinstance(value, types) and not (bool not in types and isinstance(value, bool))
        if not ok:
            expected = " or ".join(t.__name__ for t in types)
            raise ConfigMismatchError(
                f"{source}[{key!r}] must be {expected}, got {type(value).__name__} {short_repr(value)}"
            )
    if snapshot["N"] not in SUPPORTED_N:
        raise ConfigMismatchError(
            f"{source}['N'] = {short_repr(snapshot['N'])} is not a supported patch size; supported: {SUPPORTED_N}"
        )
    if snapshot["gridsize"] < 1:
        raise ConfigMismatchError(f"{source}['gridsize'] must be >= 1, got {short_repr(snapshot['gridsize'])}")
    if "n_filters_scale" in snapshot and snapshot["n_filters_scale"] < 1:
        raise ConfigMismatchError(
            f"{source}['n_filters_scale'] must be >= 1, got {short_repr(snapshot['n_filters_scale'])}"
        )
    scale = snapshot.get("intensity_scale")
    if scale is not None and (
        isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(float(scale))
    ):
        raise ConfigMismatchError(f"{source}['intensity_scale'] must be a finite number, got {short_repr(scale)}")
    for key, value in snapshot.items():
        if isinstance(value, int) and value.bit_length() > 63:
            raise ConfigMismatchError(
                f"{source}[{short_repr(key)}] is an int of {value.bit_length()} bits; config values fit in 64 bits, "
                "so the snapshot is refused"
            )


def make_params_snapshot(
    overrides: Mapping[str, Any] | None = None,
    *,
    intensity_scale: float | None = None,
) -> dict[str, Any]:
    """Build a full 63-key ``params.dill`` dict the way upstream's PyTorch saver does.

    Starts from :data:`BUNDLE_PARAM_DEFAULTS`, applies ``overrides`` (legacy key names such as ``object.big``;
    unknown keys are kept, like upstream keeps whatever its config held), then appends ``intensity_scale``
    (argument, else the override's value, else ``1.0``) and ``_version``.
    """
    snapshot = dict(BUNDLE_PARAM_DEFAULTS)
    extra = dict(overrides or {})
    extra.pop("_version", None)
    override_scale = extra.pop("intensity_scale", None)
    snapshot.update(extra)
    scale = intensity_scale if intensity_scale is not None else override_scale
    snapshot["intensity_scale"] = float(scale) if scale is not None else 1.0
    snapshot["_version"] = PYTORCH_BUNDLE_VERSION
    validate_params_snapshot(snapshot, source="params snapshot")
    return snapshot
