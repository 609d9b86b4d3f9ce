"""``torch_scaling_metadata.pt``: upstream's four torch config dicts, and how a network config is resolved.

Upstream's metadata-aware loader (docs/bundle-format.md §8) rebuilds ``diffraction_to_obj`` from the ``model_config`` /
``data_config`` dicts stored in this member, ignoring ``params.dill``. This module keeps the dataclass field
order and defaults of those dicts (so bundles we write are rebuilt identically by upstream), validates stored
metadata the way upstream's dataclass constructors would (unknown key -> refuse), and turns either source into
the configuration of the architecture it names: :class:`~mlflow_ptycho_flavor.network.NetworkConfig` for the CNN,
:class:`~mlflow_ptycho_flavor.network.FnoNetworkConfig` for the neural-operator family (§8.6):

* metadata present: it alone decides the network (docs/bundle-format.md §8.2), cross-checked against the params snapshot;
* metadata absent: the params snapshot decides, with torch defaults for torch-only knobs and the caller's
  factor honoured (training-faithful, docs/bundle-format.md §8.3); ``legacy_scaling=True`` reproduces upstream's legacy
  ``load_torch_bundle`` input scaling instead.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from mlflow_ptycho_flavor.bundle.params import BUNDLE_PARAM_DEFAULTS
from mlflow_ptycho_flavor.errors import ConfigMismatchError, CorruptBundleError, UnsupportedBundleError, short_repr
from mlflow_ptycho_flavor.network import AnyNetworkConfig, FnoNetworkConfig, NetworkConfig
from mlflow_ptycho_flavor.network.fno_config import (
    FNO_ARCHITECTURES,
    fno_config_from_metadata,
    fno_model_config_fields,
    refuse_architecture,
)

__all__ = [
    "METADATA_SCHEMA_VERSION",
    "MODEL_CONFIG_DEFAULTS",
    "DATA_CONFIG_DEFAULTS",
    "TRAINING_CONFIG_DEFAULTS",
    "INFERENCE_CONFIG_DEFAULTS",
    "network_config_from_metadata",
    "network_config_from_params",
    "make_metadata",
    "check_params_agree",
]

METADATA_SCHEMA_VERSION = "ci-entrypoints-v1"

#: Upstream ``ptycho_torch.config_params.ModelConfig`` fields in order, with their defaults (docs/bundle-format.md §8.1).
MODEL_CONFIG_DEFAULTS: dict[str, Any] = {
    "mode": "Unsupervised", "architecture": "cnn", "fno_modes": 12, "fno_width": 32, "fno_blocks": 4,
    "fno_cnn_blocks": 2, "learned_input_channels": 1, "fno_input_transform": "none",
    "max_hidden_channels": None, "resnet_width": None, "spectral_bottleneck_blocks": 6,
    "spectral_bottleneck_modes": 12, "spectral_bottleneck_share_weights": True,
    "spectral_bottleneck_gate_init": 0.1, "spectral_bottleneck_gate_mode": "shared",
    "generator_output_mode": "real_imag", "cnn_output_mode": "amp_phase", "use_shared_decoder": False,
    "intensity_scale_trainable": False, "intensity_scale": 10000.0, "max_position_jitter": 10,
    "num_datasets": 1, "C_model": 4, "n_filters_scale": 2, "amp_activation": "silu", "batch_norm": False,
    "probe_mask": False, "probe_mask_tensor": None, "probe_mask_sigma": 1.0, "probe_mask_diameter": None,
    "edge_pad": 10, "decoder_last_c_outer_fraction": 0.125, "decoder_last_amp_channels": 1,
    "use_legacy_decoder_channel_override": False, "eca_encoder": False, "cbam_encoder": True,
    "cbam_bottleneck": False, "cbam_decoder": False, "eca_decoder": False, "spatial_decoder": False,
    "decoder_spatial_kernel": 7, "object_big": True, "probe_big": True, "offset": 6, "C_forward": 4,
    "training_patch_weighting": "central_mask", "physics_forward_mode": "amplitude",
    "rect_s1s2_trainable": True, "rect_s1s2_init": "ones", "amplitude_physics_gain": 1.0, "pad_object": True,
    "gaussian_smoothing_sigma": 0.0, "loss_function": "Poisson", "amp_loss": None, "phase_loss": None,
    "amp_loss_coeff": 1.0, "phase_loss_coeff": 1.0,
}

#: Upstream ``DataConfig`` fields (docs/bundle-format.md §8.1).
DATA_CONFIG_DEFAULTS: dict[str, Any] = {
    "nphotons": 1e5, "scale_contract_version": "ci_intensity_v2", "measurement_domain": "count_intensity",
    "N": 64, "C": 4, "K": 6, "K_quadrant": 30, "n_subsample": 7, "subsample_seed": None, "grid_size": (2, 2),
    "neighbor_function": "Nearest", "min_neighbor_distance": 0.0, "max_neighbor_distance": 3.0,
    "scan_pattern": "Isotropic", "normalize": "Batch", "probe_scale": 4.0, "probe_normalize": True,
    "data_scaling": "Parseval", "phase_subtraction": True, "x_bounds": (0.1, 0.9), "y_bounds": (0.1, 0.9),
}

#: Upstream ``TrainingConfig`` fields (docs/bundle-format.md §8.1); only ``torch_loss_mode`` matters for inference.
TRAINING_CONFIG_DEFAULTS: dict[str, Any] = {
    "training_directories": [], "nll": True, "device": "cuda", "strategy": "ddp", "n_devices": 1,
    "framework": "Lightning", "orchestrator": "Mlflow", "learning_rate": 0.001, "epochs": 50, "batch_size": 16,
    "epochs_fine_tune": 0, "fine_tune_gamma": 0.1, "scheduler": "Default", "lr_warmup_epochs": 0,
    "lr_min_ratio": 0.1, "plateau_factor": 0.5, "plateau_patience": 2, "plateau_min_lr": 5e-05,
    "plateau_threshold": 0.0, "num_workers": 4, "accum_steps": 1, "gradient_clip_val": None,
    "gradient_clip_algorithm": "norm", "optimizer": "adam", "momentum": 0.9, "weight_decay": 0.0,
    "adam_beta1": 0.9, "adam_beta2": 0.999, "log_grad_norm": False, "grad_norm_log_freq": 1,
    "stage_1_epochs": 0, "stage_2_epochs": 0, "stage_3_epochs": 0, "physics_weight_schedule": "cosine",
    "stage_3_lr_factor": 0.1, "torch_loss_mode": "poisson", "torch_mae_pred_l2_match_target": False,
    "experiment_name": "Synthetic_Runs", "notes": "", "model_name": "PtychoPINNv2",
    "output_dir": "training_outputs", "train_data_file": None, "test_data_file": None, "n_groups": None,
}

#: Upstream ``InferenceConfig`` fields (docs/bundle-format.md §8.1); not used by the network.
INFERENCE_CONFIG_DEFAULTS: dict[str, Any] = {
    "middle_trim": 32, "batch_size": 1000, "experiment_number": 0, "pad_eval": True, "window": 20,
    "patch_weighting": "probe", "varpro_scaling": True, "log_patch_stats": False, "patch_stats_limit": None,
}

_SECTIONS = {
    "data_config": DATA_CONFIG_DEFAULTS,
    "model_config": MODEL_CONFIG_DEFAULTS,
    "training_config": TRAINING_CONFIG_DEFAULTS,
    "inference_config": INFERENCE_CONFIG_DEFAULTS,
}
_CONTRACT_PAIRS = {("ci_intensity_v2", "count_intensity"), ("legacy_v1", "normalized_amplitude")}
_NETWORK_FIELDS = tuple(NetworkConfig.__dataclass_fields__)

# Types a stored value may have, per default's type (None defaults accept None or a number/str).
_BOOL_KEYS = {k for k, v in MODEL_CONFIG_DEFAULTS.items() if isinstance(v, bool)}
_INT_KEYS = {k for k, v in MODEL_CONFIG_DEFAULTS.items() if isinstance(v, int) and not isinstance(v, bool)}
_STR_KEYS = {k for k, v in MODEL_CONFIG_DEFAULTS.items() if isinstance(v, str)}


def _check_section(name: str, section: Any) -> dict[str, Any]:
    if not isinstance(section, Mapping):
        raise CorruptBundleError(
            f"torch_scaling_metadata.pt: {name!r} must be a dict, got {type(section).__name__}"
        )
    unknown = [key for key in section if key not in _SECTIONS[name]]
    if unknown:
        raise UnsupportedBundleError(
            f"torch_scaling_metadata.pt: {name} has unknown key(s) {short_repr(unknown)}; an unknown knob may change "
            "the network, so the bundle is refused (upstream's rebuild raises TypeError too). Upgrade "
            "mlflow-ptycho-flavor or remove the key if it is known to be inert"
        )
    for key, value in section.items():
        _check_magnitude(f"{name}[{key!r}]", value)
    return {**_SECTIONS[name], **dict(section)}


def _check_magnitude(where: str, value: Any) -> None:
    """Refuse an int beyond 64 bits in a config value (or a tuple of them): cheap to store, but arithmetic on a
    multi-megabyte int (``gridsize ** 2``, a network size) takes seconds to hours."""
    for item in value if isinstance(value, tuple) else (value,):
        if isinstance(item, int) and item.bit_length() > 63:
            raise ConfigMismatchError(
                f"torch_scaling_metadata.pt: {where} is an int of {item.bit_length()} bits; config values fit in 64 "
                "bits, so the bundle is refused"
            )


def _typed(model_config: Mapping[str, Any], key: str) -> Any:
    value = model_config[key]
    if key in _BOOL_KEYS and not isinstance(value, bool):
        raise ConfigMismatchError(f"model_config[{key!r}] must be bool, got {type(value).__name__} {short_repr(value)}")
    if key in _INT_KEYS and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigMismatchError(f"model_config[{key!r}] must be int, got {type(value).__name__} {short_repr(value)}")
    if key in _STR_KEYS and not isinstance(value, str):
        raise ConfigMismatchError(f"model_config[{key!r}] must be str, got {type(value).__name__} {short_repr(value)}")
    return value


def validate_metadata(metadata: Any) -> dict[str, Any]:
    """Check the structure of a decoded ``torch_scaling_metadata.pt`` and fill missing keys with defaults.

    Returns:
        A new dict with the four sections completed (missing keys take upstream HEAD defaults, docs/bundle-format.md §8.2.2).
    """
    if not isinstance(metadata, Mapping):
        raise CorruptBundleError(
            f"torch_scaling_metadata.pt must hold a dict, got {type(metadata).__name__}"
        )
    schema = metadata.get("schema_version")
    if schema != METADATA_SCHEMA_VERSION:
        raise UnsupportedBundleError(
            f"torch_scaling_metadata.pt has schema_version={short_repr(schema)}; this loader reads "
            f"{METADATA_SCHEMA_VERSION!r} only"
        )
    result: dict[str, Any] = {"schema_version": schema}
    for name in _SECTIONS:
        result[name] = _check_section(name, metadata.get(name, {}))
    result["ci_statistics"] = metadata.get("ci_statistics")
    return result


def network_config_from_metadata(metadata: Mapping[str, Any]) -> AnyNetworkConfig:
    """Resolve the network from validated metadata (docs/bundle-format.md §8.2), refusing what upstream's constructor refuses.

    ``model_config['architecture']`` picks the configuration: the CNN's :class:`NetworkConfig`, or the FNO
    family's :class:`FnoNetworkConfig` (§8.6, built from ``data_config['C']`` and the ``fno_*`` keys). Any other
    architecture (``neuralop_uno`` included) is refused with an error naming it.
    """
    model_config = metadata["model_config"]
    data_config = metadata["data_config"]
    training_config = metadata["training_config"]
    architecture = _typed(model_config, "architecture")
    if architecture != "cnn" and architecture not in FNO_ARCHITECTURES:
        refuse_architecture(architecture, "model_config['architecture']")
    mode = _typed(model_config, "mode")
    if mode == "Supervised":
        if training_config.get("torch_loss_mode") != "mae" or model_config.get("loss_function") != "MAE":
            raise ConfigMismatchError(
                "model_config['mode']='Supervised' requires training_config['torch_loss_mode']=='mae' and "
                "model_config['loss_function']=='MAE' (upstream refuses to construct it otherwise)"
            )
    contract = (data_config.get("scale_contract_version"), data_config.get("measurement_domain"))
    if contract not in _CONTRACT_PAIRS:
        raise ConfigMismatchError(
            f"data_config scale contract {short_repr(contract)} is not one of {sorted(_CONTRACT_PAIRS)}"
        )
    physics = model_config.get("physics_forward_mode")
    gain = model_config.get("amplitude_physics_gain")
    if not isinstance(gain, (int, float)) or isinstance(gain, bool) or not math.isfinite(gain) or gain <= 0:
        raise ConfigMismatchError(
            f"model_config['amplitude_physics_gain'] must be finite and > 0, got {short_repr(gain)}"
        )
    if physics == "rectangular_scaled":
        # the FNO family's head requirement (generator_output_mode='real_imag') is checked with its config
        if architecture == "cnn" and (mode != "Unsupervised" or model_config.get("cnn_output_mode") != "real_imag"):
            raise ConfigMismatchError(
                "physics_forward_mode='rectangular_scaled' requires real/imag output (cnn_output_mode="
                "'real_imag', Unsupervised)"
            )
        if gain != 1.0:
            raise ConfigMismatchError("physics_forward_mode='rectangular_scaled' requires amplitude_physics_gain=1.0")
    elif physics != "amplitude":
        raise UnsupportedBundleError(
            f"model_config['physics_forward_mode']={short_repr(physics)} is not known; expected 'amplitude' or "
            "'rectangular_scaled'"
        )
    if architecture in FNO_ARCHITECTURES:
        return fno_config_from_metadata(model_config, data_config)
    N = data_config.get("N")
    if isinstance(N, bool) or not isinstance(N, int):
        raise ConfigMismatchError(f"data_config['N'] must be int, got {short_repr(N)}")
    values: dict[str, Any] = {"N": N}
    for field in _NETWORK_FIELDS:
        if field == "N":
            continue
        values[field] = _typed(model_config, field)
    scale = model_config["intensity_scale"]
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise ConfigMismatchError(f"model_config['intensity_scale'] must be a number, got {short_repr(scale)}")
    values["intensity_scale"] = float(scale)
    fraction = model_config["decoder_last_c_outer_fraction"]
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)):
        raise ConfigMismatchError(
            f"model_config['decoder_last_c_outer_fraction'] must be a number, got {short_repr(fraction)}"
        )
    values["decoder_last_c_outer_fraction"] = float(fraction)
    return NetworkConfig(**values)


def _fno_config_from_params(params: Mapping[str, Any], architecture: str, legacy_scaling: bool) -> FnoNetworkConfig:
    """The FNO family from a snapshot alone: its ``fno_*`` and ``generator_output_mode`` keys are TensorFlow-side
    fields, so the snapshot holds what the rebuild needs (docs/bundle-format.md §8.3); absent keys take upstream's
    defaults, torch-only knobs (``num_datasets``) the torch defaults."""
    if legacy_scaling:
        raise UnsupportedBundleError(
            f"legacy_scaling=True reproduces upstream's legacy load_torch_bundle, which ignores "
            f"architecture={architecture!r} and builds a randomly initialised CNN instead; there is no legacy "
            "behaviour to reproduce for this bundle. Load it without legacy_scaling"
        )
    gridsize = params["gridsize"]
    defaults = BUNDLE_PARAM_DEFAULTS
    return FnoNetworkConfig(
        N=params["N"],
        C_model=params.get("C", gridsize * gridsize),
        architecture=architecture,
        fno_modes=params.get("fno_modes", defaults["fno_modes"]),
        fno_width=params.get("fno_width", defaults["fno_width"]),
        fno_blocks=params.get("fno_blocks", defaults["fno_blocks"]),
        fno_cnn_blocks=params.get("fno_cnn_blocks", defaults["fno_cnn_blocks"]),
        learned_input_channels=params.get("learned_input_channels", defaults["learned_input_channels"]),
        fno_input_transform=params.get("fno_input_transform", defaults["fno_input_transform"]),
        generator_output_mode=params.get("generator_output_mode", defaults["generator_output_mode"]),
        mode="Unsupervised" if params.get("model_type") == "pinn" else "Supervised",
        intensity_scale_trainable=False,
    )


def network_config_from_params(params: Mapping[str, Any], *, legacy_scaling: bool = False) -> AnyNetworkConfig:
    """Resolve the network from a params snapshot alone (bundles without metadata, docs/bundle-format.md §8.3).

    Args:
        params: the validated ``params.dill`` dict.
        legacy_scaling: reproduce upstream's legacy ``load_torch_bundle`` input scaling (multiply the input by
            ``params['intensity_scale']`` and ignore the caller's factor whenever
            ``params['intensity_scale.trainable']``). Off by default: training never used that scaling.
    """
    architecture = params.get("architecture", "cnn")
    if architecture != "cnn" and architecture not in FNO_ARCHITECTURES:
        refuse_architecture(architecture, "params['architecture']")
    model_type = params.get("model_type")
    if model_type not in ("pinn", "supervised", None):
        raise ConfigMismatchError(f"params['model_type'] must be 'pinn' or 'supervised', got {short_repr(model_type)}")
    if architecture in FNO_ARCHITECTURES:
        return _fno_config_from_params(params, architecture, legacy_scaling)
    gridsize = params["gridsize"]
    values: dict[str, Any] = {
        "N": params["N"],
        "C_model": params.get("C", gridsize * gridsize),
        "n_filters_scale": int(params.get("n_filters_scale", 2)),
        "object_big": params.get("object.big", False),
        "probe_big": params.get("probe.big", True),
        "amp_activation": params.get("amp_activation", "silu"),
        "mode": "Unsupervised" if model_type == "pinn" else "Supervised",
    }
    if legacy_scaling:
        values["intensity_scale_trainable"] = bool(params.get("intensity_scale.trainable", False))
        values["intensity_scale"] = float(params.get("intensity_scale", 1.0))
    else:
        values["intensity_scale_trainable"] = False
    return NetworkConfig(**values)


def check_params_agree(params: Mapping[str, Any], network: AnyNetworkConfig) -> None:
    """Refuse a bundle whose params snapshot disagrees with the network its metadata describes (docs/bundle-format.md §8.2.1).

    The snapshot is what CONFIG-001 restores into the global config, so a disagreement would mislead every
    consumer of ``params.cfg``. Compared: ``N``, ``gridsize**2`` with the channel count, ``model_type``,
    ``architecture``, and the keys the architecture is built from (CNN: width scale, ``object.big``, ``probe.big``,
    ``amp_activation``; FNO family: the ``fno_*`` sizes, input transform and head, which upstream writes on both
    sides). Keys the snapshot lacks are not compared.
    """
    checks = [
        ("N", params.get("N"), "data_config['N']", network.N),
        ("architecture", params.get("architecture"), "model_config['architecture']", network.architecture),
    ]
    if isinstance(network, FnoNetworkConfig):
        checks.append(("gridsize**2", params["gridsize"] ** 2, "data_config['C']", network.C_model))
        fno_keys = ["fno_modes", "fno_width", "fno_blocks", "learned_input_channels", "fno_input_transform",
                    "generator_output_mode"]
        if network.architecture != "fno_vanilla":  # fno_vanilla has no refiners: the count is inert there
            fno_keys.append("fno_cnn_blocks")
        checks.extend((key, params.get(key), f"model_config[{key!r}]", getattr(network, key)) for key in fno_keys)
    else:
        checks += [
            ("gridsize**2", params["gridsize"] ** 2, "model_config['C_model']", network.C_model),
            ("n_filters_scale", params.get("n_filters_scale"), "model_config['n_filters_scale']", network.n_filters_scale),
            ("object.big", params.get("object.big"), "model_config['object_big']", network.object_big),
            ("probe.big", params.get("probe.big"), "model_config['probe_big']", network.probe_big),
            ("amp_activation", params.get("amp_activation"), "model_config['amp_activation']", network.amp_activation),
        ]
    model_type = params.get("model_type")
    if model_type is not None:
        checks.append(("model_type", model_type, "model_config['mode']",
                       {"Unsupervised": "pinn", "Supervised": "supervised"}[network.mode]))
    for param_key, param_value, meta_key, meta_value in checks:
        if param_value is None:
            continue
        if param_value != meta_value:
            raise ConfigMismatchError(
                f"params.dill[{param_key!r}]={short_repr(param_value)} disagrees with torch_scaling_metadata.pt "
                f"{meta_key}={short_repr(meta_value)}; the params snapshot restored into params.cfg must describe the "
                "same network - re-save the bundle so both agree"
            )


def make_metadata(
    network: AnyNetworkConfig,
    params: Mapping[str, Any],
    *,
    ci_statistics: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Build the ``torch_scaling_metadata.pt`` dict upstream's metadata-aware loader rebuilds our network from.

    Values follow what upstream's workflow factory writes: data/model configs from the network, training-side
    values bridged from the params snapshot.
    """
    gridsize = network.gridsize
    data_config = dict(DATA_CONFIG_DEFAULTS)
    data_config.update(
        N=network.N,
        C=network.C_model,
        grid_size=(gridsize, gridsize),
        nphotons=float(params.get("nphotons", DATA_CONFIG_DEFAULTS["nphotons"])),
        K=int(params.get("neighbor_count", DATA_CONFIG_DEFAULTS["K"])),
    )
    model_config = dict(MODEL_CONFIG_DEFAULTS)
    if isinstance(network, FnoNetworkConfig):
        fields = fno_model_config_fields(network)
        model_config.update(fields["model_config"])
        data_config.update(fields["data_config"])
    else:
        for field in _NETWORK_FIELDS:
            if field != "N":
                model_config[field] = getattr(network, field)
        model_config["C_forward"] = network.C_model
    if network.mode == "Supervised":
        model_config["loss_function"] = "MAE"
    training_config = dict(TRAINING_CONFIG_DEFAULTS)
    training_config.update(
        epochs=int(params.get("nepochs", training_config["epochs"])),
        batch_size=int(params.get("batch_size", training_config["batch_size"])),
        torch_loss_mode="mae" if network.mode == "Supervised" else params.get("torch_loss_mode", "poisson"),
        output_dir=str(params.get("output_prefix", training_config["output_dir"])),
        train_data_file=params.get("train_data_file_path"),
        test_data_file=params.get("test_data_file_path"),
        n_groups=params.get("n_groups"),
    )
    return {
        "schema_version": METADATA_SCHEMA_VERSION,
        "data_config": data_config,
        "model_config": model_config,
        "training_config": training_config,
        "inference_config": dict(INFERENCE_CONFIG_DEFAULTS),
        "ci_statistics": dict(ci_statistics) if ci_statistics is not None else None,
    }
