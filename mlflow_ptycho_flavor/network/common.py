"""Pieces every architecture shares: the training-physics parameters, the fixed input scale and the input handling
around the generator core (§3.7, §8.4)."""

from __future__ import annotations

import contextlib
import functools
import io
import math
import pickle
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

__all__ = [
    "ForwardModel", "ScaledInputNetwork", "fixed_input_scale", "weightless_construction", "adopting_network", "nhwc",
    "use_channels_last",
]

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


@dataclass(frozen=True)
class _Blueprint:
    """A network's module tree pickled without its tensors: every state_dict entry is a persistent id (its key; an
    aliased tensor under the last of its keys, as ``load_state_dict`` leaves it), with what adopting one needs."""

    pickled: bytes
    #: state_dict key -> (parameter rather than buffer, requires_grad, shape)
    entries: dict[str, tuple[bool, bool, tuple[int, ...]]]


class _BlueprintPickler(pickle.Pickler):
    def __init__(self, file: io.BytesIO, key_of: dict[int, str]) -> None:
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self._key_of = key_of

    def persistent_id(self, obj: Any) -> str | None:
        return self._key_of.get(id(obj)) if isinstance(obj, torch.Tensor) else None


class _AdoptingUnpickler(pickle.Unpickler):
    def __init__(self, file: io.BytesIO, blueprint: _Blueprint, state_dict: Mapping[str, Any]) -> None:
        super().__init__(file)
        self._entries = blueprint.entries
        self._state_dict = state_dict

    def persistent_load(self, key: str) -> torch.Tensor:
        # what load_state_dict(assign=True) sets: the tensor itself, a parameter keeping the module's requires_grad
        tensor = self._state_dict[key]
        is_parameter, requires_grad, _ = self._entries[key]
        if not is_parameter:
            return tensor
        if isinstance(tensor, nn.Parameter):
            return tensor.requires_grad_(requires_grad)
        return nn.Parameter(tensor, requires_grad=requires_grad)


@functools.lru_cache(maxsize=BLUEPRINT_CACHE_SIZE)
def _weightless_blueprint(network_class: type, config: Any) -> _Blueprint:
    with weightless_construction():
        network = network_class(config)
    network.eval()  # every module unpickled from the blueprint is in eval mode already (no walk per load)
    state = network.state_dict(keep_vars=True)
    key_of = {id(tensor): key for key, tensor in state.items()}  # an alias: the last key wins
    buffer = io.BytesIO()
    _BlueprintPickler(buffer, key_of).dump(network)
    entries = {
        key: (isinstance(tensor, nn.Parameter), tensor.requires_grad, tuple(tensor.shape))
        for key, tensor in state.items()
    }
    return _Blueprint(buffer.getvalue(), entries)


def adopting_network(network_class: type, config: Any, state_dict: Mapping[str, Any]) -> nn.Module:
    """A new ``network_class(config)`` whose parameters and buffers are ``state_dict``'s tensors (no init, no copy).

    What ``weightless construction + load_state_dict(strict=True, assign=True)`` gives, in one pass: the first
    network per class and configuration is constructed on the ``meta`` device (:func:`weightless_construction`)
    and pickled without its tensors; every later one is unpickled from that in-memory blueprint with the stored
    tensors put in place of the persistent ids, about three times faster than building the tree and loading into it
    (construction and ``load_state_dict`` are ``nn.Module`` bookkeeping, not tensor work). The blueprint is bytes
    this process produced from its own module, never bytes read from a file. Each call returns an independent
    module tree, in eval mode; non-persistent buffers stay on ``meta`` for the caller to set.

    Raises:
        RuntimeError: keys missing or unexpected, or a shape that differs (``load_state_dict``'s wording).
    """
    blueprint = _weightless_blueprint(network_class, config)
    problems = _adoption_problems(blueprint.entries, state_dict)
    if problems:
        raise RuntimeError(f"Error(s) in loading state_dict for {network_class.__name__}:\n\t" + "\n\t".join(problems))
    return _AdoptingUnpickler(io.BytesIO(blueprint.pickled), blueprint, state_dict).load()  # noqa: S301 - our bytes


def _adoption_problems(
    entries: dict[str, tuple[bool, bool, tuple[int, ...]]], state_dict: Mapping[str, Any]
) -> list[str]:
    """What ``load_state_dict(strict=True)`` would report for ``state_dict`` against the blueprint's entries."""
    missing = [key for key in entries if key not in state_dict]
    unexpected = [key for key in state_dict if key not in entries]
    problems = []
    if unexpected:
        problems.append("Unexpected key(s) in state_dict: " + ", ".join(f'"{key}"' for key in unexpected) + ".")
    if missing:
        problems.append("Missing key(s) in state_dict: " + ", ".join(f'"{key}"' for key in missing) + ".")
    for key, (_, _, shape) in entries.items():
        tensor = state_dict.get(key)
        if tensor is None:
            continue
        if not isinstance(tensor, torch.Tensor):
            problems.append(f'While copying the parameter named "{key}", expected torch.Tensor or Tensor-like '
                            f"object from checkpoint but received {type(tensor)}")
        elif tuple(tensor.shape) != shape:
            problems.append(f"size mismatch for {key}: copying a param with shape {tensor.shape} from checkpoint, "
                            f"the shape in current model is {torch.Size(shape)}.")
    return problems


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
    #: Whether the forward runs its activations in NHWC memory format (:func:`use_channels_last`); class default off.
    channels_last: bool = False

    @property
    def input_channels(self) -> int:
        return self.config.channels

    @property
    def uses_fixed_input_scale(self) -> bool:
        """True when the model ignores the caller's scale factor (trainable intensity scale, §8.4)."""
        return self._fixed_input_scale is not None

    def scaled_input(self, x: torch.Tensor, input_scale_factor: torch.Tensor | float | None) -> torch.Tensor:
        """``x`` times the fixed scale when the network has one, else times the caller's factor (``None`` means 1);
        in NHWC strides when :attr:`channels_last` is set (the layout every later activation then keeps)."""
        if self._fixed_input_scale is not None:
            x = x * self._fixed_input_scale
        elif input_scale_factor is not None:
            x = x * input_scale_factor
        return nhwc(x) if self.channels_last and x.dim() == 4 else x


def nhwc(x: torch.Tensor) -> torch.Tensor:
    """``x`` (4-D) with exactly the strides ``x.contiguous(memory_format=torch.channels_last)`` means.

    The convolutions take the NHWC path when their input has these strides, and every later activation keeps
    them. A one-channel tensor holds its values in the same order in both layouts, so it gets a free view with
    those strides; ``x.contiguous(memory_format=torch.channels_last)`` would return it unchanged, still with NCHW
    strides (which torch reads as NCHW).
    """
    batch, channels, height, width = x.shape
    strides = (height * width * channels, 1, width * channels, channels)
    if x.stride() == strides:
        return x
    if channels == 1 and x.is_contiguous():
        return x.as_strided(x.shape, strides)
    return torch.empty_like(x, memory_format=torch.channels_last).copy_(x)


def use_channels_last(network: nn.Module, enabled: bool = True) -> nn.Module:
    """Make ``network`` (a :class:`ScaledInputNetwork`) run its activations in NHWC: its input is given NHWC strides
    (:func:`nhwc`) and its 4-D buffers (the CNN's border masks) are converted; returns it. ``enabled=False`` undoes
    it: the eager, contiguous layout (4-D buffers and weights contiguous, input as the caller gives it).

    The 4-D weights are left as they are. On the CPU that changes nothing but the load: oneDNN reorders every
    convolution's weights into its own blocked layout on each call whatever their strides, so NHWC activations
    with NCHW weights give the same bits, as fast, as ``network.to(memory_format=torch.channels_last)``
    (benchmarks/RESULTS.md §1). On a GPU the caller converts the weights too (cuDNN wants both in one layout).
    ``network.to(memory_format=torch.contiguous_format)`` alone does not return the network to the eager layout:
    the flag stays, and the forward still gives its input NHWC strides; ``use_channels_last(network, False)`` does.
    """
    if enabled:
        for module in network.modules():
            for name, buffer in module._buffers.items():
                if buffer is not None and buffer.dim() == 4:
                    module._buffers[name] = buffer.to(memory_format=torch.channels_last)
    else:
        network.to(memory_format=torch.contiguous_format)  # every 4-D parameter and buffer
    network.channels_last = enabled
    return network
