"""Clean-room PyTorch implementation of PtychoPINN's neural-operator generators (``fno_vanilla``, ``fno``, ``ffno``).

Written from the bundle-format specification (``docs/bundle-format.md`` §8.4, §8.6) and the observations recorded
with the upstream-written fixtures (``tests/data/upstream_fno/README.md``), not from upstream code. The module
tree reproduces upstream's state_dict key for key, shape for shape and dtype for dtype, aliases included:

* the generator core is registered twice, as ``model.generator`` and ``model.autoencoder`` (one module, so every
  core key appears under both prefixes and the two keys hold the same tensor);
* ``ffno`` shares one factorized spectral operator between its stack and every block
  (``ffno_stack.shared_spectral`` = ``ffno_stack.blocks.i.shared_spectral``) and registers ``ffno_stack.blocks``
  a second time as ``blocks``; its scalar gate ``ffno_stack.shared_gate`` is reached by the blocks without being
  registered in them;
* ``model.forward_model.*`` (training physics) is present although inference never uses it, so loads are strict.

Spectral weights are complex64. The network is built from a :class:`FnoNetworkConfig` alone and never reads the
global ``params.cfg``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mlflow_ptycho_flavor.errors import StateDictMismatchError
from mlflow_ptycho_flavor.network.common import (
    adopting_network,
    ForwardModel,
    ScaledInputNetwork,
    fixed_input_scale,
    weightless_construction,
)
from mlflow_ptycho_flavor.network.fno_config import FnoNetworkConfig

__all__ = [
    "PtychoFnoNetwork",
    "alias_groups",
    "check_aliases_agree",
]


# --------------------------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------------------------
def _conv3x3(cin: int, cout: int) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=3, stride=1, padding=1)


def _conv1x1(cin: int, cout: int) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=1)


def _complex_weights(*shape: int) -> nn.Parameter:
    """Complex64 spectral weights, initialised small (uniform real and imaginary parts in ``[0, 1/(cin*cout))``).

    The scale only matters for a freshly built network; loaded bundles replace it.
    """
    scale = 1.0 / (shape[0] * shape[1])
    return nn.Parameter(scale * torch.rand(*shape, dtype=torch.complex64))


def _transform_input(kind: str, x: torch.Tensor) -> torch.Tensor:
    """The lifter's input transform (docs/bundle-format.md §8.6)."""
    if kind == "sqrt":
        return torch.sqrt(torch.clamp(x, min=0))
    if kind == "log1p":
        return torch.log1p(torch.clamp(x, min=0))
    if kind == "instancenorm":  # InstanceNorm2d(C, affine=False, eps=1e-6): per sample and channel, no weights
        return F.instance_norm(x, eps=1e-6)
    return x


class _Lifter(nn.Module):
    """``conv1`` 3x3 (C -> w) -> exact GELU -> ``conv2`` 3x3 (w -> w)."""

    def __init__(self, cin: int, width: int) -> None:
        super().__init__()
        self.conv1 = _conv3x3(cin, width)
        self.conv2 = _conv3x3(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(F.gelu(self.conv1(x)))


class _SpectralConv2d(nn.Module):
    """``Spec`` of ``fno``/``fno_vanilla``: channel mixing of the lowest non-negative 2-D frequencies.

    rfft2 over (H, W); rows ``[0, min(m, H))`` and columns ``[0, min(m, W/2+1))`` are multiplied by the complex
    weights (``out[b,o,x,y] = sum_c in[b,c,x,y] * w[c,o,x,y]``), every other bin is zero; irfft2 back to (H, W).
    """

    def __init__(self, width: int, modes: int) -> None:
        super().__init__()
        self.weights = _complex_weights(width, width, modes, modes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        spectrum = torch.fft.rfft2(x)
        rows = min(self.weights.shape[2], height)
        cols = min(self.weights.shape[3], width // 2 + 1)
        mixed = torch.zeros(
            x.shape[0], self.weights.shape[1], height, width // 2 + 1, dtype=spectrum.dtype, device=x.device
        )
        mixed[:, :, :rows, :cols] = torch.einsum(
            "bcxy,coxy->boxy", spectrum[:, :, :rows, :cols], self.weights[:, :, :rows, :cols]
        )
        return torch.fft.irfft2(mixed, s=(height, width))


class _FnoBlock(nn.Module):
    """``x + GELU(Spec(x) + local_conv(x))`` with a 3x3 ``local_conv``."""

    def __init__(self, width: int, modes: int) -> None:
        super().__init__()
        self.spectral = _SpectralConv2d(width, modes)
        self.local_conv = _conv3x3(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + F.gelu(self.spectral(x) + self.local_conv(x))


class _FactorizedSpectralConv2d(nn.Module):
    """``Spec_f`` of ``ffno``: one channel mixing per axis, summed.

    Along W: rfft, the first ``min(m, W/2+1)`` bins times ``weights_x`` (``[c, o, k]``), irfft; along H the same
    with ``weights_y`` and the first ``min(m, H/2+1)`` bins.
    """

    def __init__(self, width: int, modes: int) -> None:
        super().__init__()
        self.weights_x = _complex_weights(width, width, modes)
        self.weights_y = _complex_weights(width, width, modes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, _, height, width = x.shape
        out_channels = self.weights_x.shape[1]

        spectrum_w = torch.fft.rfft(x, dim=-1)
        bins_w = min(self.weights_x.shape[2], width // 2 + 1)
        mixed_w = torch.zeros(batch, out_channels, height, width // 2 + 1, dtype=spectrum_w.dtype, device=x.device)
        mixed_w[..., :bins_w] = torch.einsum(
            "bchk,cok->bohk", spectrum_w[..., :bins_w], self.weights_x[..., :bins_w]
        )
        along_w = torch.fft.irfft(mixed_w, n=width, dim=-1)

        spectrum_h = torch.fft.rfft(x, dim=-2)
        bins_h = min(self.weights_y.shape[2], height // 2 + 1)
        mixed_h = torch.zeros(batch, out_channels, height // 2 + 1, width, dtype=spectrum_h.dtype, device=x.device)
        mixed_h[:, :, :bins_h, :] = torch.einsum(
            "bckw,cok->bokw", spectrum_h[:, :, :bins_h, :], self.weights_y[..., :bins_h]
        )
        along_h = torch.fft.irfft(mixed_h, n=height, dim=-2)
        return along_w + along_h


class _FfnoBlock(nn.Module):
    """``x + gate * project(GELU(expand(norm(Spec_f(x)))))``; ``shared_spectral`` is the stack's one operator."""

    def __init__(self, shared_spectral: _FactorizedSpectralConv2d, width: int) -> None:
        super().__init__()
        self.shared_spectral = shared_spectral
        self.norm = nn.InstanceNorm2d(width, affine=True, eps=1e-5)
        self.expand = _conv1x1(width, 2 * width)
        self.project = _conv1x1(2 * width, width)

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        return x + gate * self.project(F.gelu(self.expand(self.norm(self.shared_spectral(x)))))


class _FfnoStack(nn.Module):
    """``fno_blocks`` blocks sharing one factorized spectral operator and one scalar gate (initially 0.1)."""

    def __init__(self, width: int, modes: int, blocks: int) -> None:
        super().__init__()
        self.shared_gate = nn.Parameter(torch.tensor(0.1))
        self.shared_spectral = _FactorizedSpectralConv2d(width, modes)
        self.blocks = nn.ModuleList(_FfnoBlock(self.shared_spectral, width) for _ in range(blocks))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x, self.shared_gate)
        return x


class _Refiner(nn.Module):
    """``x + conv2(GELU(conv1(x)))`` with 3x3 convs (``ffno``'s ``refiners.i``)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.conv1 = _conv3x3(width, width)
        self.conv2 = _conv3x3(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.gelu(self.conv1(x)))


def _pi_tanh(x: torch.Tensor) -> torch.Tensor:
    return math.pi * torch.tanh(x)


def _polar(amplitude: torch.Tensor, phase: torch.Tensor) -> torch.Tensor:
    return amplitude.to(torch.complex64) * torch.exp(1j * phase.to(torch.complex64))


class _GeneratorCore(nn.Module):
    """Input transform -> lifter -> architecture body -> head; returns complex64 ``(B, C, H, W)``.

    Subclasses register their body modules between ``lifter`` and the head, in upstream's state_dict order, and
    implement :meth:`body`.
    """

    def __init__(self, cfg: FnoNetworkConfig) -> None:
        super().__init__()
        self.channels = cfg.C_model
        self.output_mode = cfg.generator_output_mode
        self.input_transform = cfg.fno_input_transform
        self.lifter = _Lifter(cfg.learned_input_channels * cfg.C_model, cfg.fno_width)

    def _add_head(self, cfg: FnoNetworkConfig) -> None:
        if cfg.generator_output_mode == "amp_phase":
            self.output_amp = _conv1x1(cfg.fno_width, cfg.C_model)
            self.output_phase = _conv1x1(cfg.fno_width, cfg.C_model)
        else:  # real_imag and amp_phase_logits: channel k < C is the first component of object k, C + k the second
            self.output_proj = _conv1x1(cfg.fno_width, 2 * cfg.C_model)

    def body(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.body(self.lifter(_transform_input(self.input_transform, x)))
        if self.output_mode == "amp_phase":
            return _polar(torch.sigmoid(self.output_amp(y)), _pi_tanh(self.output_phase(y)))
        raw = self.output_proj(y)
        batch, _, height, width = raw.shape
        pair = raw.view(batch, 2, self.channels, height, width)
        if self.output_mode == "real_imag":
            return torch.complex(pair[:, 0], pair[:, 1])
        return _polar(torch.sigmoid(pair[:, 0]), _pi_tanh(pair[:, 1]))


class _FnoVanillaCore(_GeneratorCore):
    """``fno_vanilla``: ``blocks.i`` and nothing else after the lifter."""

    def __init__(self, cfg: FnoNetworkConfig) -> None:
        super().__init__(cfg)
        self.blocks = nn.ModuleList(_FnoBlock(cfg.fno_width, cfg.fno_modes) for _ in range(cfg.fno_blocks))
        self._add_head(cfg)

    def body(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


class _CascadedFnoCore(_GeneratorCore):
    """``fno``: ``fno_blocks.i`` -> 1x1 ``intermediate`` -> ``cnn_refiner.i`` = (3x3 conv, GELU), no residual."""

    def __init__(self, cfg: FnoNetworkConfig) -> None:
        super().__init__(cfg)
        width = cfg.fno_width
        self.fno_blocks = nn.ModuleList(_FnoBlock(width, cfg.fno_modes) for _ in range(cfg.fno_blocks))
        self.intermediate = _conv1x1(width, width)
        self.cnn_refiner = nn.ModuleList(
            nn.Sequential(_conv3x3(width, width), nn.GELU()) for _ in range(cfg.fno_cnn_blocks)
        )
        self._add_head(cfg)

    def body(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.fno_blocks:
            x = block(x)
        x = self.intermediate(x)
        for refiner in self.cnn_refiner:
            x = refiner(x)
        return x


class _FfnoCore(_GeneratorCore):
    """``ffno``: ``ffno_stack`` (its block list registered again as ``blocks``) -> ``refiners.i``."""

    def __init__(self, cfg: FnoNetworkConfig) -> None:
        super().__init__(cfg)
        self.ffno_stack = _FfnoStack(cfg.fno_width, cfg.fno_modes, cfg.fno_blocks)
        self.blocks = self.ffno_stack.blocks
        self.refiners = nn.ModuleList(_Refiner(cfg.fno_width) for _ in range(cfg.fno_cnn_blocks))
        self._add_head(cfg)

    def body(self, x: torch.Tensor) -> torch.Tensor:
        x = self.ffno_stack(x)
        for refiner in self.refiners:
            x = refiner(x)
        return x


_CORES: dict[str, type[_GeneratorCore]] = {
    "fno_vanilla": _FnoVanillaCore,
    "fno": _CascadedFnoCore,
    "ffno": _FfnoCore,
}


class _FnoPtychoPINN(nn.Module):
    """Upstream's ``PtychoPINN`` holding a generator core: registered as ``generator`` and as ``autoencoder``."""

    def __init__(self, cfg: FnoNetworkConfig) -> None:
        super().__init__()
        core = _CORES[cfg.architecture](cfg)
        self.generator = core
        self.autoencoder = core
        self.forward_model = ForwardModel(cfg.num_datasets)


# --------------------------------------------------------------------------------------------------------------
# Aliases
# --------------------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=32)
def alias_groups(config: FnoNetworkConfig) -> tuple[tuple[str, ...], ...]:
    """The state_dict keys of ``config``'s network grouped by the one tensor they name, in state_dict order.

    Built once per configuration on the ``meta`` device (no memory). Single-key groups are included.
    """
    with weightless_construction():
        network = PtychoFnoNetwork(config)
    groups: dict[int, list[str]] = {}
    for key, tensor in network.state_dict(keep_vars=True).items():
        groups.setdefault(id(tensor), []).append(key)
    return tuple(tuple(keys) for keys in groups.values())


def _same_view(a: torch.Tensor, b: torch.Tensor) -> bool:
    """True when two tensors are the same view of one storage (then their values agree without reading them)."""
    return (
        a.device == b.device
        and a.dtype == b.dtype
        and a.shape == b.shape
        and a.stride() == b.stride()
        and a.storage_offset() == b.storage_offset()
        and a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
    )


def check_aliases_agree(config: FnoNetworkConfig, state_dict: Mapping[str, Any]) -> None:
    """Refuse a state_dict whose alias keys (one tensor in the network) hold different values.

    Upstream's strict load copies every alias into the one shared parameter, so the last key silently wins; a
    file whose aliases disagree was not written from one network, and loading it would drop weights unseen.
    Keys that are missing or not tensors are left to the strict-load check. Aliases that are views of the same
    storage (as ``torch.save`` writes shared tensors) are accepted without comparing values.

    Raises:
        StateDictMismatchError: naming the first disagreeing pair of keys.
    """
    for group in alias_groups(config):
        tensors = [(key, state_dict.get(key)) for key in group]
        tensors = [(key, t) for key, t in tensors if isinstance(t, torch.Tensor)]
        if len(tensors) < 2:
            continue
        first_key, first = tensors[0]
        for key, tensor in tensors[1:]:
            if _same_view(first, tensor):
                continue
            if first.dtype != tensor.dtype or first.shape != tensor.shape or not torch.equal(first, tensor):
                raise StateDictMismatchError(
                    f"diffraction_to_obj/model.pth: {key[:160]} and {first_key[:160]} name one tensor of the "
                    f"{config.architecture} network but hold different values; the weights were not saved from "
                    "one network (upstream would silently keep the last alias). Re-save the model"
                )


# --------------------------------------------------------------------------------------------------------------
# The network
# --------------------------------------------------------------------------------------------------------------
class PtychoFnoNetwork(ScaledInputNetwork):
    """An FNO-family ``diffraction_to_obj`` network: amplitudes ``(B, C, N, N)`` float32 -> complex64 patches.

    ``forward(x, input_scale_factor)`` follows upstream's ``forward_predict`` (§8.4, §8.6): the input is
    multiplied by the caller's per-sample factor, unless the model carries a trainable intensity scale, in which
    case ``exp(float32(ln intensity_scale))`` replaces it; then input transform, lifter, body and head. Call
    :meth:`eval` before inference, as for the CNN (these networks hold no running statistics, so train and eval
    modes compute the same).

    Attributes:
        config: the immutable :class:`FnoNetworkConfig` the network was built from.
    """

    def __init__(self, config: FnoNetworkConfig) -> None:
        super().__init__()
        self.config = config
        self.model = _FnoPtychoPINN(config)
        self._fixed_input_scale = fixed_input_scale(config.intensity_scale_trainable, config.intensity_scale)

    @classmethod
    def from_state_dict(cls, config: FnoNetworkConfig, state_dict: Mapping[str, Any]) -> "PtychoFnoNetwork":
        """Build the network around existing weights: no random initialisation and no copy.

        The module tree is created on the ``meta`` device and the tensors of ``state_dict`` are adopted as its
        parameters (:func:`~.common.adopting_network`: what ``load_state_dict(strict=True, assign=True)``
        gives). Alias keys must agree (:func:`check_aliases_agree`); the tensor of the last alias becomes the shared
        parameter, as in upstream's load. The caller hands the tensors over: they become the network's.
        """
        check_aliases_agree(config, state_dict)
        network = adopting_network(cls, config, state_dict)
        return network

    def forward(self, x: torch.Tensor, input_scale_factor: torch.Tensor | float | None = None) -> torch.Tensor:
        """Predict complex object patches from amplitude patterns.

        Args:
            x: float32 ``(B, C, N, N)`` amplitudes (C = ``config.channels``).
            input_scale_factor: per-sample factor broadcastable to ``x`` (normally ``(B, 1, 1, 1)``);
                ``None`` means 1.

        Returns:
            complex64 ``(B, C, N, N)``.
        """
        x = self.scaled_input(x, input_scale_factor)
        return self.model.autoencoder(x)

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"architecture={c.architecture}, N={c.N}, C={c.C_model}, width={c.fno_width}, modes={c.fno_modes}, "
            f"blocks={c.fno_blocks}, cnn_blocks={c.fno_cnn_blocks}, transform={c.fno_input_transform}, "
            f"output={c.generator_output_mode}"
        )
