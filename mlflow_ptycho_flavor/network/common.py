"""Pieces every architecture shares: the training-physics parameters, the fixed input scale and the input handling
around the generator core (§3.7, §8.4)."""

from __future__ import annotations

import contextlib
import functools
import math
import pickle
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

__all__ = ["ForwardModel", "ScaledInputNetwork", "fixed_input_scale", "weightless_construction", "weightless_network"]

#: What a layer's ``reset_parameters`` calls: every in-place initialiser of ``torch.nn.init`` and the tensor methods
#: they end in. Skipped while a network is built only to adopt stored weights.
_INITIALISERS = frozenset(
    [getattr(nn.init, name) for name in dir(nn.init) if name.endswith("_") and not name.startswith("_")]
    + [torch.Tensor.uniform_, torch.Tensor.normal_, torch.Tensor.zero_, torch.Tensor.fill_]
)


class _SkipInitialisers(TorchFunctionMode):
    """Turns the initialisers of :data:`_INITIALISERS` into no-ops (thread-local, like every torch function mode)."""

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        if func in _INITIALISERS:
            return args[0] if args else (kwargs or {}).get("tensor")
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def weightless_construction() -> Iterator[None]:
    """Build modules on the ``meta`` device without running their random initialisation.

    For networks whose every parameter and buffer is about to be replaced by stored weights
    (``load_state_dict(strict=True, assign=True)``): initialising meta tensors computes nothing but still costs
    most of a network's construction time (the decompositions of ``uniform_`` on ``meta``), about half of it for the
    CNN. Anything a loader sets outside the state_dict (non-persistent buffers) must be set afterwards.
    """
    with torch.device("meta"), _SkipInitialisers():
        yield


#: Weightless blueprints kept (one per network class and configuration recently loaded).
BLUEPRINT_CACHE_SIZE = 8


@functools.lru_cache(maxsize=BLUEPRINT_CACHE_SIZE)
def _weightless_blueprint(network_class: type, config: Any) -> bytes:
    with weightless_construction():
        return pickle.dumps(network_class(config), protocol=pickle.HIGHEST_PROTOCOL)


def weightless_network(network_class: type, config: Any) -> nn.Module:
    """A new ``network_class(config)`` on the ``meta`` device, uninitialised (see :func:`weightless_construction`).

    The first per class and configuration is constructed; later ones are unpickled from an in-memory blueprint of
    that first one, about four times faster than building the module tree again (construction is dominated by
    ``nn.Module`` bookkeeping, not by tensors). The blueprint is bytes this process produced from its own module,
    never bytes read from a file. Each call returns an independent module tree.
    """
    return pickle.loads(_weightless_blueprint(network_class, config))  # noqa: S301 - our own in-memory bytes


class _RectScaler(nn.Module):
    def __init__(self, num_datasets: int) -> None:
        super().__init__()
        self.s1 = nn.Parameter(torch.ones(num_datasets))
        self.s2 = nn.Parameter(torch.ones(num_datasets))


class ForwardModel(nn.Module):
    """``model.forward_model``: training-physics parameters present in the state_dict (strict loads need them),
    unused at inference (docs/bundle-format.md §3.7)."""

    def __init__(self, num_datasets: int) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(num_datasets))
        self.beta = nn.Parameter(torch.ones(num_datasets))
        self.rect_scaler = _RectScaler(num_datasets)


def fixed_input_scale(trainable: bool, intensity_scale: float) -> torch.Tensor | None:
    """The factor replacing the caller's when the intensity scale is trainable, else None (docs/bundle-format.md §8.4).

    ``exp(float32(ln s))`` evaluated by torch in float32 on a CPU scalar, after upstream's truthiness test
    (``ln 1 = 0`` keeps the caller's factor). Not a buffer: upstream's ``log_scale`` is neither in the state_dict
    nor moved with the module.
    """
    if not trainable:
        return None
    log_scale = torch.tensor(math.log(intensity_scale), dtype=torch.float32, device="cpu")
    if not bool(log_scale):
        return None
    return torch.exp(log_scale)


class ScaledInputNetwork(nn.Module):
    """The input handling both generator families share: the channel count, the fixed input scale, and scaling
    the input by it or by the caller's factor (docs/bundle-format.md §8.4).

    Subclasses set ``config`` and ``_fixed_input_scale`` (from :func:`fixed_input_scale`) in ``__init__``.
    """

    config: Any
    _fixed_input_scale: torch.Tensor | None

    @property
    def input_channels(self) -> int:
        return self.config.channels

    @property
    def uses_fixed_input_scale(self) -> bool:
        """True when the model ignores the caller's scale factor (trainable intensity scale, §8.4)."""
        return self._fixed_input_scale is not None

    def scaled_input(self, x: torch.Tensor, input_scale_factor: torch.Tensor | float | None) -> torch.Tensor:
        """``x`` times the fixed scale when the network has one, else times the caller's factor (``None`` means 1)."""
        if self._fixed_input_scale is not None:
            return x * self._fixed_input_scale
        if input_scale_factor is not None:
            return x * input_scale_factor
        return x
