"""Configuration of PtychoPINN's neural-operator generators (``fno_vanilla``, ``fno``, ``ffno``): validated,
immutable :class:`FnoNetworkConfig` and its mapping to and from ``torch_scaling_metadata.pt`` (docs/bundle-format.md
§8.4, §8.6). The modules it configures are in :mod:`mlflow_ptycho_flavor.network.fno`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from mlflow_ptycho_flavor.errors import ConfigMismatchError, UnsupportedBundleError, short_repr
from mlflow_ptycho_flavor.network.config import SUPPORTED_PATCH_SIZES

__all__ = [
    "FNO_ARCHITECTURES",
    "FNO_INPUT_TRANSFORMS",
    "GENERATOR_OUTPUT_MODES",
    "EXTERNAL_ARCHITECTURES",
    "FNO_CONFIG_LIMITS",
    "UPSTREAM_FNO_DEFAULTS",
    "FnoNetworkConfig",
    "fno_config_from_metadata",
    "fno_model_config_fields",
    "refuse_architecture",
]

#: Architectures this module builds (upstream ``model_config['architecture']`` values).
FNO_ARCHITECTURES = ("fno_vanilla", "fno", "ffno")
#: ``fno_input_transform`` values (docs/bundle-format.md §8.6: applied to the scaled input before the lifter).
FNO_INPUT_TRANSFORMS = ("none", "sqrt", "log1p", "instancenorm")
#: ``generator_output_mode`` values of the non-CNN generators.
GENERATOR_OUTPUT_MODES = ("real_imag", "amp_phase", "amp_phase_logits")
#: Upstream architectures that need a package outside PyTorch, with the pip name of that package.
EXTERNAL_ARCHITECTURES = {"neuralop_uno": "neuraloperator"}

#: Upper bounds on the size knobs. Each block is a Python module, so the counts bound the time and memory of
#: building even on the ``meta`` device; widths and modes bound tensor shapes (a hostile bundle's metadata must
#: not make the fit check allocate, and its weights must then fit the bytes the file really holds). The bounds are
#: far above anything upstream trains (defaults: 4 blocks, 2 refiners, width 32, 12 modes, C = gridsize**2 <= 16).
FNO_CONFIG_LIMITS: dict[str, int] = {
    "fno_blocks": 64,
    "fno_cnn_blocks": 64,
    "fno_width": 2048,
    "fno_modes": 1024,
    "C_model": 256,
    "num_datasets": 1 << 20,
}

#: Upstream ``ModelConfig``/``DataConfig`` defaults of the keys an FNO-family network is built from
#: (docs/bundle-format.md §8.1); a metadata dict that lacks one of them is read with this value, as upstream's
#: dataclass constructors do.
UPSTREAM_FNO_DEFAULTS: dict[str, Any] = {
    "mode": "Unsupervised",
    "architecture": "cnn",
    "fno_modes": 12,
    "fno_width": 32,
    "fno_blocks": 4,
    "fno_cnn_blocks": 2,
    "learned_input_channels": 1,
    "fno_input_transform": "none",
    "generator_output_mode": "real_imag",
    "intensity_scale_trainable": False,
    "intensity_scale": 10000.0,
    "num_datasets": 1,
    "physics_forward_mode": "amplitude",
    "N": 64,
    "C": 4,
}


def refuse_architecture(architecture: Any, source: str) -> None:
    """Raise the typed refusal for an architecture the FNO family does not build (names it and the way out).

    ``neuralop_uno`` names the external package it needs; ``cnn`` points to the CNN's own configuration.
    """
    shown = short_repr(architecture)
    if architecture == "cnn":
        raise ConfigMismatchError(
            f"{source}='cnn' describes the CNN generator, which NetworkConfig/PtychoPINNNetwork build, not the "
            "FNO family; build it through the network factory instead"
        )
    package = EXTERNAL_ARCHITECTURES.get(architecture) if isinstance(architecture, str) else None
    if package is not None:
        raise UnsupportedBundleError(
            f"{source}={shown}: this generator is built by the external package {package!r} (pip install "
            f"{package}, module 'neuralop') with hyper-parameters the bundle format does not record, so it cannot "
            "be rebuilt faithfully; it is refused. Supported architectures: cnn, "
            + ", ".join(FNO_ARCHITECTURES)
        )
    raise UnsupportedBundleError(
        f"{source}={shown} is not an architecture this loader builds (supported: cnn, "
        f"{', '.join(FNO_ARCHITECTURES)}); re-export the model with one of them or upgrade mlflow-ptycho-flavor"
    )


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigMismatchError(f"{name} must be an int, got {type(value).__name__} {short_repr(value)}")
    if value < minimum:
        raise ConfigMismatchError(f"{name} must be >= {minimum}, got {short_repr(value)}")
    limit = FNO_CONFIG_LIMITS.get(name)
    if limit is not None and value > limit:
        raise UnsupportedBundleError(
            f"{name}={short_repr(value)} exceeds the largest value this loader builds ({limit}); such a network is far "
            "beyond anything upstream trains, and building it could exhaust memory"
        )


@dataclass(frozen=True)
class FnoNetworkConfig:
    """Every knob that changes the state_dict or the numerics of an FNO-family ``forward_predict`` (§8.6).

    Field names follow upstream's torch ``ModelConfig`` keys; ``C_model`` holds upstream's ``data_config['C']``
    (the channel count ``gridsize**2``, which the non-CNN cores are built from; upstream's ``model_config
    ['C_model']`` plays no role for them). The CNN knobs, ``amp_activation`` and the ``spectral_bottleneck_*``
    keys have no influence on these networks (docs/bundle-format.md §8.1, §8.6) and are therefore not fields.
    Instances are immutable and validated on construction.
    """

    N: int = 64
    C_model: int = 1
    architecture: str = "ffno"
    fno_modes: int = 12
    fno_width: int = 32
    fno_blocks: int = 4
    fno_cnn_blocks: int = 2
    learned_input_channels: int = 1
    fno_input_transform: str = "none"
    generator_output_mode: str = "real_imag"
    mode: str = "Unsupervised"
    num_datasets: int = 1
    intensity_scale_trainable: bool = False
    intensity_scale: float = 10000.0

    def __post_init__(self) -> None:
        if not isinstance(self.architecture, str) or self.architecture not in FNO_ARCHITECTURES:
            refuse_architecture(self.architecture, "architecture")
        if isinstance(self.N, bool) or not isinstance(self.N, int) or self.N not in SUPPORTED_PATCH_SIZES:
            raise ConfigMismatchError(
                f"N={short_repr(self.N)} is not supported; supported patch sizes: "
                + ", ".join(map(str, SUPPORTED_PATCH_SIZES))
            )
        _check_int("C_model", self.C_model, 1)
        _check_int("fno_modes", self.fno_modes, 1)
        _check_int("fno_width", self.fno_width, 1)
        _check_int("fno_blocks", self.fno_blocks, 1)
        _check_int("fno_cnn_blocks", self.fno_cnn_blocks, 0)
        _check_int("num_datasets", self.num_datasets, 1)
        _check_int("learned_input_channels", self.learned_input_channels, 1)
        if self.learned_input_channels != 1:
            raise UnsupportedBundleError(
                f"learned_input_channels={self.learned_input_channels}: the lifter would expect "
                f"{self.learned_input_channels}*C input channels, but inference feeds the C diffraction channels "
                "only (upstream's own fno/fno_vanilla trainers build with 1); only 1 is supported"
            )
        if self.fno_input_transform not in FNO_INPUT_TRANSFORMS:
            raise UnsupportedBundleError(
                f"fno_input_transform={short_repr(self.fno_input_transform)} is not supported; expected one of "
                f"{FNO_INPUT_TRANSFORMS}"
            )
        if self.generator_output_mode not in GENERATOR_OUTPUT_MODES:
            raise UnsupportedBundleError(
                f"generator_output_mode={short_repr(self.generator_output_mode)} is not supported; expected one "
                f"of {GENERATOR_OUTPUT_MODES}"
            )
        if self.mode != "Unsupervised":
            raise UnsupportedBundleError(
                f"mode={short_repr(self.mode)} with architecture={self.architecture!r}: only Unsupervised "
                "FNO-family models are supported (a Supervised neural-operator forward is not specified)"
            )
        if not isinstance(self.intensity_scale_trainable, bool):
            raise ConfigMismatchError(
                f"intensity_scale_trainable must be bool, got {short_repr(self.intensity_scale_trainable)}"
            )
        scale = self.intensity_scale
        if isinstance(scale, bool) or not isinstance(scale, (int, float)):
            raise ConfigMismatchError(f"intensity_scale must be a number, got {short_repr(scale)}")
        try:
            finite_positive = math.isfinite(scale) and scale > 0
        except OverflowError:  # an int beyond float range
            finite_positive = False
        if self.intensity_scale_trainable and not finite_positive:
            raise ConfigMismatchError(
                f"intensity_scale={short_repr(scale)} with a trainable (fixed) input scale would multiply every input by "
                "NaN, 0 or infinity; it must be a finite number > 0"
            )

    # Derived quantities, named as on NetworkConfig ------------------------------------------------------------
    @property
    def channels(self) -> int:
        """Input/output channels of the network (``C``; there is no ``object_big`` switch for these cores)."""
        return self.C_model

    @property
    def gridsize(self) -> int:
        return int(round(math.sqrt(self.C_model)))

    @property
    def effective_output_mode(self) -> str:
        """The head: ``real_imag``, ``amp_phase`` or ``amp_phase_logits`` (``generator_output_mode``)."""
        return self.generator_output_mode

    def replace(self, **changes: object) -> "FnoNetworkConfig":
        return dataclasses.replace(self, **changes)


# --------------------------------------------------------------------------------------------------------------
# Metadata <-> config
# --------------------------------------------------------------------------------------------------------------
def _value(section: Mapping[str, Any], key: str) -> Any:
    return section[key] if key in section else UPSTREAM_FNO_DEFAULTS[key]


def fno_config_from_metadata(model_config: Mapping[str, Any], data_config: Mapping[str, Any]) -> FnoNetworkConfig:
    """Resolve an FNO-family network from ``torch_scaling_metadata.pt``'s ``model_config``/``data_config``.

    Mirrors upstream's metadata-aware rebuild (docs/bundle-format.md §8.2, §8.6): the core is built from
    ``data_config['C']`` and ``data_config['N']`` and the ``fno_*``/``generator_output_mode`` keys; missing keys
    take upstream's defaults.
    The CNN knobs are ignored, as upstream ignores them. Checked here as well: ``physics_forward_mode=
    'rectangular_scaled'`` needs the real/imag head (docs/bundle-format.md §8.1, role V).

    Raises:
        UnsupportedBundleError: an architecture, head, transform or mode this module does not build
            (``neuralop_uno`` names the external package it needs), or sizes beyond :data:`FNO_CONFIG_LIMITS`.
        ConfigMismatchError: wrongly typed or out-of-range values.
    """
    architecture = _value(model_config, "architecture")
    if not isinstance(architecture, str) or architecture not in FNO_ARCHITECTURES:
        refuse_architecture(architecture, "model_config['architecture']")
    physics = _value(model_config, "physics_forward_mode")
    output_mode = _value(model_config, "generator_output_mode")
    if physics == "rectangular_scaled" and output_mode != "real_imag":
        raise ConfigMismatchError(
            f"physics_forward_mode='rectangular_scaled' requires real/imag output, but generator_output_mode="
            f"{short_repr(output_mode)} (upstream refuses to construct this model)"
        )
    scale = _value(model_config, "intensity_scale")
    if isinstance(scale, int) and not isinstance(scale, bool):
        try:
            scale = float(scale)
        except OverflowError:
            raise ConfigMismatchError(
                f"model_config['intensity_scale']={short_repr(scale)} is beyond the float range"
            ) from None
    return FnoNetworkConfig(
        N=_value(data_config, "N"),
        C_model=_value(data_config, "C"),
        architecture=architecture,
        fno_modes=_value(model_config, "fno_modes"),
        fno_width=_value(model_config, "fno_width"),
        fno_blocks=_value(model_config, "fno_blocks"),
        fno_cnn_blocks=_value(model_config, "fno_cnn_blocks"),
        learned_input_channels=_value(model_config, "learned_input_channels"),
        fno_input_transform=_value(model_config, "fno_input_transform"),
        generator_output_mode=output_mode,
        mode=_value(model_config, "mode"),
        num_datasets=_value(model_config, "num_datasets"),
        intensity_scale_trainable=_value(model_config, "intensity_scale_trainable"),
        intensity_scale=scale,
    )


def fno_model_config_fields(cfg: FnoNetworkConfig) -> dict[str, dict[str, Any]]:
    """The metadata values that make upstream's metadata-aware loader rebuild exactly ``cfg``'s network.

    Returns:
        ``{"model_config": {...}, "data_config": {...}}`` with upstream key names, to be merged over the default
        sections of ``torch_scaling_metadata.pt``. ``C_model``/``C_forward`` are written as ``C`` (what upstream's
        workflow writes for gridsize² channels) although the rebuilt core reads ``data_config['C']`` only.
    """
    gridsize = cfg.gridsize
    model_config = {
        "mode": cfg.mode,
        "architecture": cfg.architecture,
        "fno_modes": cfg.fno_modes,
        "fno_width": cfg.fno_width,
        "fno_blocks": cfg.fno_blocks,
        "fno_cnn_blocks": cfg.fno_cnn_blocks,
        "learned_input_channels": cfg.learned_input_channels,
        "fno_input_transform": cfg.fno_input_transform,
        "generator_output_mode": cfg.generator_output_mode,
        "intensity_scale_trainable": cfg.intensity_scale_trainable,
        "intensity_scale": float(cfg.intensity_scale),
        "num_datasets": cfg.num_datasets,
        "C_model": cfg.C_model,
        "C_forward": cfg.C_model,
    }
    data_config = {
        "N": cfg.N,
        "C": cfg.C_model,
        "grid_size": (gridsize, gridsize),
    }
    return {"model_config": model_config, "data_config": data_config}
