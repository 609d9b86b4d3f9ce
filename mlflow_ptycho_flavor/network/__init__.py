"""The networks: pure PyTorch modules built from a configuration, with no file I/O and no global state.

This is the lowest layer of the package above :mod:`~mlflow_ptycho_flavor.errors`: the bundle reader checks
weights against these modules (on the ``meta`` device) and builds them; inference runs them. Every architecture
has a frozen config dataclass and a module whose ``forward(x, input_scale_factor)`` maps float32 amplitudes
``(B, C, N, N)`` to complex64 object patches ``(B, C, N, N)`` (docs/bundle-format.md §4, §8.4):

* the CNN (``architecture='cnn'``): :class:`NetworkConfig` -> :class:`PtychoPINNNetwork` (§3, §8.5);
* the neural-operator family (``'fno_vanilla'``, ``'fno'``, ``'ffno'``): :class:`FnoNetworkConfig` ->
  :class:`PtychoFnoNetwork` (§8.6).

The architecture is chosen by the config's type: :func:`build_network`, :func:`network_from_state_dict` and
:func:`describe_architecture` dispatch on it.
"""

from __future__ import annotations

from typing import Any, Union

import torch

from mlflow_ptycho_flavor.errors import InvalidArgumentError
from mlflow_ptycho_flavor.network.cnn import PtychoPINNNetwork, encoder_depth
from mlflow_ptycho_flavor.network.common import use_channels_last, weightless_construction
from mlflow_ptycho_flavor.network.config import SUPPORTED_PATCH_SIZES, NetworkConfig
from mlflow_ptycho_flavor.network.fno import PtychoFnoNetwork
from mlflow_ptycho_flavor.network.fno_config import FNO_ARCHITECTURES, FnoNetworkConfig

__all__ = [
    "AnyNetworkConfig",
    "FNO_ARCHITECTURES",
    "FnoNetworkConfig",
    "NetworkConfig",
    "PtychoFnoNetwork",
    "PtychoPINNNetwork",
    "SUPPORTED_ARCHITECTURES",
    "SUPPORTED_PATCH_SIZES",
    "build_network",
    "config_classes",
    "describe_architecture",
    "encoder_depth",
    "network_classes",
    "network_from_state_dict",
    "resolve_device",
    "use_channels_last",
    "weightless_construction",
]

#: Every ``architecture`` value this package builds.
SUPPORTED_ARCHITECTURES = ("cnn",) + FNO_ARCHITECTURES

#: A configuration of any supported architecture.
AnyNetworkConfig = Union[NetworkConfig, FnoNetworkConfig]

_NETWORK_OF_CONFIG: dict[type, type[torch.nn.Module]] = {
    NetworkConfig: PtychoPINNNetwork,
    FnoNetworkConfig: PtychoFnoNetwork,
}


def network_classes() -> tuple[type[torch.nn.Module], ...]:
    """The module classes a bundle's ``diffraction_to_obj`` can be (for ``isinstance`` checks when saving)."""
    return tuple(_NETWORK_OF_CONFIG.values())


def config_classes() -> tuple[type, ...]:
    """The configuration classes of the supported architectures."""
    return tuple(_NETWORK_OF_CONFIG)


def _network_class(config: Any) -> Any:
    network_class = _NETWORK_OF_CONFIG.get(type(config))
    if network_class is None:
        raise TypeError(f"no network is defined for a {type(config).__name__} configuration")
    return network_class


def build_network(config: AnyNetworkConfig) -> torch.nn.Module:
    """A freshly initialised network for ``config`` (the architecture is chosen by the config's type)."""
    return _network_class(config)(config)


def network_from_state_dict(config: AnyNetworkConfig, state_dict) -> torch.nn.Module:
    """The network for ``config`` adopting ``state_dict``'s tensors (no random init, no copy; strict)."""
    return _network_class(config).from_state_dict(config, state_dict)


def describe_architecture(config: AnyNetworkConfig) -> dict[str, Any]:
    """What drives the architecture, as plain values: the MLmodel flavor section and ``ptycho-flavor inspect``.

    Shared keys come first (``architecture``, ``mode``, ``N``, ``gridsize``, ``C``, ``output_mode``), then the
    architecture's own knobs (CNN: width scale, attention, decoders; FNO family: width, modes, blocks, refiners,
    input transform). ``fixed_input_scale`` is True when the network ignores the caller's scale factor (trainable
    intensity scale other than 1, docs/bundle-format.md §8.4).
    """
    _network_class(config)
    summary: dict[str, Any] = {
        "architecture": config.architecture,
        "mode": config.mode,
        "N": config.N,
        "gridsize": config.gridsize,
        "C": config.channels,
    }
    if isinstance(config, FnoNetworkConfig):
        summary.update(
            output_mode=config.effective_output_mode,
            fno_width=config.fno_width,
            fno_modes=config.fno_modes,
            fno_blocks=config.fno_blocks,
            fno_cnn_blocks=config.fno_cnn_blocks,
            fno_input_transform=config.fno_input_transform,
        )
    else:
        summary.update(
            n_filters_scale=config.n_filters_scale,
            output_mode=config.effective_output_mode,
            object_big=config.object_big,
            probe_big=config.probe_big,
            amp_activation=config.amp_activation,
            batch_norm=config.batch_norm,
            use_shared_decoder=config.use_shared_decoder,
            cbam_encoder=config.cbam_encoder,
            cbam_bottleneck=config.cbam_bottleneck,
        )
    summary["fixed_input_scale"] = bool(config.intensity_scale_trainable and config.intensity_scale != 1.0)
    return summary


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None`` or ``"auto"`` -> CUDA when available, else CPU; anything else as given (validated).

    Raises:
        ValueError: ``device`` is not a torch device, or names CUDA where none is available.
    """
    if device is None or (isinstance(device, str) and device.strip().lower() == "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise InvalidArgumentError(f"device={device!r} is not a valid torch device (use 'auto', 'cpu' or 'cuda:0')") from exc
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise InvalidArgumentError(f"device={device!r} was requested but CUDA is not available here; use 'cpu' or 'auto'")
    return resolved
