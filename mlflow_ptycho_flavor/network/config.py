"""The configuration of the CNN ``diffraction_to_obj`` network (docs/bundle-format.md §3, §8.1, §8.5).

:class:`NetworkConfig` holds every knob that changes the CNN's state_dict or the numerics of its forward pass.
It is built from ``torch_scaling_metadata.pt`` or the params snapshot by :mod:`mlflow_ptycho_flavor.bundle.metadata`
and consumed by :mod:`mlflow_ptycho_flavor.network.cnn`; it never reads the global ``params.cfg``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from mlflow_ptycho_flavor.errors import ConfigMismatchError, UnsupportedBundleError, short_repr

__all__ = ["NetworkConfig", "SUPPORTED_PATCH_SIZES"]

#: Patch sizes N the networks are defined for (the encoder depth is log2(N/8)).
SUPPORTED_PATCH_SIZES = (64, 128, 256)
_CNN_OUTPUT_MODES = ("amp_phase", "real_imag")
_MODES = ("Unsupervised", "Supervised")


@dataclass(frozen=True)
class NetworkConfig:
    """Every knob that changes the state_dict or the numerics of ``forward_predict`` (docs/bundle-format.md §8.1 roles S/F).

    Field names follow upstream's torch ``ModelConfig``/``DataConfig`` (``C_model`` is the channel count
    ``gridsize**2``). Instances are immutable: a built network keeps its own copy.
    """

    N: int = 64
    C_model: int = 1
    n_filters_scale: int = 2
    object_big: bool = True
    probe_big: bool = True
    amp_activation: str = "sigmoid"
    mode: str = "Unsupervised"
    architecture: str = "cnn"
    cnn_output_mode: str = "amp_phase"
    use_shared_decoder: bool = False
    batch_norm: bool = False
    cbam_encoder: bool = True
    cbam_bottleneck: bool = False
    eca_encoder: bool = False
    cbam_decoder: bool = False
    eca_decoder: bool = False
    spatial_decoder: bool = False
    decoder_spatial_kernel: int = 7
    use_legacy_decoder_channel_override: bool = False
    decoder_last_amp_channels: int = 1
    decoder_last_c_outer_fraction: float = 0.125
    num_datasets: int = 1
    intensity_scale_trainable: bool = False
    intensity_scale: float = 10000.0

    def __post_init__(self) -> None:
        if self.N not in SUPPORTED_PATCH_SIZES:
            raise ConfigMismatchError(
                f"N={short_repr(self.N)} is not supported; supported patch sizes: {SUPPORTED_PATCH_SIZES}"
            )
        if self.architecture != "cnn":
            raise UnsupportedBundleError(
                f"architecture={short_repr(self.architecture)} is not the CNN NetworkConfig describes; the "
                "neural-operator family ('fno_vanilla', 'fno', 'ffno') is configured by FnoNetworkConfig"
            )
        if self.mode not in _MODES:
            raise UnsupportedBundleError(f"mode={short_repr(self.mode)} is not supported; expected one of {_MODES}")
        if self.cnn_output_mode not in _CNN_OUTPUT_MODES:
            raise UnsupportedBundleError(
                f"cnn_output_mode={short_repr(self.cnn_output_mode)} is not supported; expected one of "
                f"{_CNN_OUTPUT_MODES}"
            )
        for name in ("C_model", "n_filters_scale", "num_datasets", "decoder_spatial_kernel"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigMismatchError(f"{name} must be a positive int, got {short_repr(value)}")
        if self.use_legacy_decoder_channel_override and self.object_big:
            if self.decoder_last_amp_channels not in (1, self.C_model):
                raise ConfigMismatchError(
                    f"decoder_last_amp_channels={self.decoder_last_amp_channels} must be 1 or C_model="
                    f"{self.C_model} when use_legacy_decoder_channel_override is set"
                )

    # Derived quantities -------------------------------------------------------------------------------------
    @property
    def channels(self) -> int:
        """Input/output channels of the network: ``C_model`` with ``object_big``, else 1."""
        return self.C_model if self.object_big else 1

    @property
    def gridsize(self) -> int:
        return int(round(math.sqrt(self.C_model)))

    @property
    def effective_output_mode(self) -> str:
        """``real_imag`` only for an Unsupervised CNN asking for it (Supervised forces amp_phase)."""
        if self.mode == "Unsupervised" and self.cnn_output_mode == "real_imag":
            return "real_imag"
        return "amp_phase"
