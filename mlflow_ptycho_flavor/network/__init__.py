"""The networks: pure PyTorch modules built from a configuration, with no file I/O and no global state.

This is the lowest layer of the package above :mod:`~mlflow_ptycho_flavor.errors`: the bundle reader checks
weights against these modules (on the ``meta`` device) and builds them; inference runs them. Every architecture
has a frozen config dataclass and a module whose ``forward(x, input_scale_factor)`` maps float32 amplitudes
``(B, C, N, N)`` to complex64 object patches ``(B, C, N, N)`` (docs/bundle-format.md §4, §8.4).
"""

from __future__ import annotations

from typing import Any

import torch

from mlflow_ptycho_flavor.errors import InvalidArgumentError
from mlflow_ptycho_flavor.network.cnn import PtychoPINNNetwork, encoder_depth
from mlflow_ptycho_flavor.network.config import SUPPORTED_ARCHITECTURES, SUPPORTED_PATCH_SIZES, NetworkConfig

__all__ = [
    "NetworkConfig",
    "PtychoPINNNetwork",
    "SUPPORTED_ARCHITECTURES",
    "SUPPORTED_PATCH_SIZES",
    "build_network",
    "describe_architecture",
    "encoder_depth",
    "network_classes",
    "network_from_state_dict",
    "resolve_device",
]


def network_classes() -> tuple[type[torch.nn.Module], ...]:
    """The module classes a bundle's ``diffraction_to_obj`` can be (for ``isinstance`` checks when saving)."""
    return (PtychoPINNNetwork,)


def build_network(config: NetworkConfig) -> torch.nn.Module:
    """A freshly initialised network for ``config`` (the architecture is chosen by the config's type)."""
    if isinstance(config, NetworkConfig):
        return PtychoPINNNetwork(config)
    raise TypeError(f"no network is defined for a {type(config).__name__} configuration")


def network_from_state_dict(config: NetworkConfig, state_dict) -> torch.nn.Module:
    """The network for ``config`` adopting ``state_dict``'s tensors (no random init, no copy; strict)."""
    if isinstance(config, NetworkConfig):
        return PtychoPINNNetwork.from_state_dict(config, state_dict)
    raise TypeError(f"no network is defined for a {type(config).__name__} configuration")


def describe_architecture(config: NetworkConfig) -> dict[str, Any]:
    """What drives the architecture, as plain values: the MLmodel flavor section and ``ptycho-flavor inspect``.

    ``fixed_input_scale`` is True when the network ignores the caller's scale factor (trainable intensity scale
    other than 1, docs/bundle-format.md §8.4).
    """
    if not isinstance(config, NetworkConfig):
        raise TypeError(f"no network is defined for a {type(config).__name__} configuration")
    return {
        "architecture": config.architecture,
        "mode": config.mode,
        "N": config.N,
        "gridsize": config.gridsize,
        "C": config.channels,
        "n_filters_scale": config.n_filters_scale,
        "output_mode": config.effective_output_mode,
        "object_big": config.object_big,
        "probe_big": config.probe_big,
        "amp_activation": config.amp_activation,
        "batch_norm": config.batch_norm,
        "use_shared_decoder": config.use_shared_decoder,
        "cbam_encoder": config.cbam_encoder,
        "cbam_bottleneck": config.cbam_bottleneck,
        "fixed_input_scale": bool(config.intensity_scale_trainable and config.intensity_scale != 1.0),
    }


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
