"""Clean-room PyTorch implementation of PtychoPINN's inference network (``diffraction_to_obj``).

Written from the bundle-format specification (``docs/bundle-format.md`` §3, §8.4-8.5), not from
upstream code. The module tree reproduces upstream's state_dict key for key, shape for shape and dtype for
dtype (every key starts with ``model.`` because upstream saves its Lightning wrapper), including parameters that
inference never uses (``forward_model.*``, decoder attention blocks), so bundles load strictly both ways.

The network is built from a :class:`NetworkConfig` alone and never reads the global ``params.cfg``.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from mlflow_ptycho_flavor.errors import UnsupportedBundleError
from mlflow_ptycho_flavor.network.common import (
    adopting_network,
    ForwardModel,
    ScaledInputNetwork,
    fixed_input_scale,
)
from mlflow_ptycho_flavor.network.config import NetworkConfig

__all__ = ["PtychoPINNNetwork", "encoder_depth"]


def encoder_depth(N: int) -> int:
    """Number of encoder blocks L: 3/4/5 for N = 64/128/256 (the bottleneck is always 8x8)."""
    return {64: 3, 128: 4, 256: 5}[N]


def _widths(cfg: NetworkConfig) -> tuple[list[int], list[int]]:
    """Encoder block widths and decoder trunk widths (docs/bundle-format.md §3.2)."""
    s = cfg.n_filters_scale
    depth = encoder_depth(cfg.N)
    encoder = [128 * s // 2 ** (depth - 1 - i) for i in range(depth)]
    trunk = [32 * s * 2 ** (depth - 2 - j) for j in range(depth - 1)]
    return encoder, trunk


# --------------------------------------------------------------------------------------------------------------
# Attention blocks
# --------------------------------------------------------------------------------------------------------------
class _ChannelGate(nn.Module):
    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        hidden = channels // reduction
        self.mlp = nn.Sequential(
            nn.Flatten(), nn.Linear(channels, hidden), nn.ReLU(), nn.Linear(hidden, channels)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        window = (x.size(2), x.size(3))
        avg = F.avg_pool2d(x, window, stride=window)
        peak = F.max_pool2d(x, window, stride=window)
        attention = self.mlp(avg) + self.mlp(peak)
        scale = torch.sigmoid(attention).unsqueeze(2).unsqueeze(3)
        return x * scale


class _SpatialGate(nn.Module):
    def __init__(self, kernel_size: int = 7) -> None:
        super().__init__()
        self.compress = nn.Conv2d(2, 1, kernel_size, stride=1, padding=(kernel_size - 1) // 2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = torch.cat((torch.max(x, 1)[0].unsqueeze(1), torch.mean(x, 1).unsqueeze(1)), dim=1)
        return x * torch.sigmoid(self.compress(pooled))


class _CBAM(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.ChannelGate = _ChannelGate(channels)
        self.SpatialGate = _SpatialGate()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.SpatialGate(self.ChannelGate(x))


class _ECA(nn.Module):
    """Efficient channel attention with a fixed kernel of 3 (docs/bundle-format.md §8.5.3)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(1, 1, kernel_size=3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.mean(dim=(2, 3))
        y = self.conv(y.unsqueeze(1)).squeeze(1)
        return x * torch.sigmoid(y)[:, :, None, None]


class _DecoderSpatialAttention(nn.Module):
    """Built by ``spatial_decoder`` but never applied upstream; exists for its state_dict key."""

    def __init__(self, kernel_size: int) -> None:
        super().__init__()
        self.spatial_gate = _SpatialGate(kernel_size)


# --------------------------------------------------------------------------------------------------------------
# Convolutional blocks
# --------------------------------------------------------------------------------------------------------------
def _conv3x3(cin: int, cout: int) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=3, stride=1, padding=1)


class _DoubleConv(nn.Module):
    """conv1 -> [bn1] -> ReLU -> conv2 -> [bn2] -> ReLU (registration order conv1, conv2, bn1, bn2)."""

    def __init__(self, cin: int, cout: int, batch_norm: bool) -> None:
        super().__init__()
        self.conv1 = _conv3x3(cin, cout)
        self.conv2 = _conv3x3(cout, cout)
        self.bn1 = nn.BatchNorm2d(cout) if batch_norm else None
        self.bn2 = nn.BatchNorm2d(cout) if batch_norm else None

    def double_conv(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        if self.bn1 is not None:
            x = self.bn1(x)
        x = F.relu(x)
        x = self.conv2(x)
        if self.bn2 is not None:
            x = self.bn2(x)
        return F.relu(x)


class _ConvPoolBlock(_DoubleConv):
    def __init__(self, cin: int, cout: int, cfg: NetworkConfig) -> None:
        super().__init__(cin, cout, cfg.batch_norm)
        if cfg.cbam_encoder:
            self.attention: nn.Module | None = _CBAM(cout)
            self._apply_attention = True
        else:
            self.attention = _ECA() if cfg.eca_encoder else None
            self._apply_attention = False  # upstream builds the ECA here but never applies it

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.double_conv(x)
        if self._apply_attention:
            x = self.attention(x)
        return F.max_pool2d(x, kernel_size=2, stride=2)


class _ConvUpBlock(_DoubleConv):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(self.double_conv(x), scale_factor=2, mode="nearest")


class _Encoder(nn.Module):
    def __init__(self, cfg: NetworkConfig) -> None:
        super().__init__()
        widths, _ = _widths(cfg)
        cin = cfg.channels
        blocks = []
        for width in widths:
            blocks.append(_ConvPoolBlock(cin, width, cfg))
            cin = width
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


def _decoder_attention_blocks(cfg: NetworkConfig, trunk: list[int]) -> nn.ModuleList | None:
    """Decoder attention modules: built from flags, never applied (ECA, else spatial, else CBAM)."""
    if cfg.eca_decoder:
        return nn.ModuleList(_ECA() for _ in trunk)
    if cfg.spatial_decoder:
        return nn.ModuleList(_DecoderSpatialAttention(cfg.decoder_spatial_kernel) for _ in trunk)
    if cfg.cbam_decoder:
        return nn.ModuleList(_CBAM(width) for width in trunk)
    return None


def _border_mask(N: int) -> torch.Tensor:
    """1 on the outer ring, 0 on the centre square ``[N/4, 3N/4)`` (docs/bundle-format.md §3.4); always a real CPU tensor."""
    quarter = N // 4
    mask = torch.ones(1, 1, N, N, device="cpu")
    mask[..., quarter : N - quarter, quarter : N - quarter] = 0
    return mask


class _Head(nn.Module):
    """``Decoder_last``: centre path at N/2 padded to N, plus a border path masked to the outer ring."""

    def __init__(
        self, cfg: NetworkConfig, out_channels: int, border_channels: int, batch_norm: bool, activation
    ) -> None:
        super().__init__()
        width = 32 * cfg.n_filters_scale
        self.N = cfg.N
        self.border_channels = border_channels
        self.probe_big = cfg.probe_big
        self.activation = activation
        self.conv1 = _conv3x3(width - border_channels, out_channels)
        self.conv_up_block = _ConvUpBlock(border_channels, width, batch_norm)
        self.conv2 = _conv3x3(width, out_channels)
        self.bn1 = nn.BatchNorm2d(out_channels) if batch_norm else None
        self.bn2 = nn.BatchNorm2d(out_channels) if batch_norm else None
        self.register_buffer("border_mask", _border_mask(cfg.N), persistent=False)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        split = y.size(1) - self.border_channels
        centre = self.conv1(y[:, :split])
        if self.bn1 is not None:
            centre = self.bn1(centre)
        centre = self.activation(centre)
        quarter = self.N // 4
        centre = F.pad(centre, (quarter, quarter, quarter, quarter), mode="constant", value=0.0)
        if not self.probe_big:
            return centre
        border = self.conv2(self.conv_up_block(y[:, split:]))
        if self.bn2 is not None:
            border = self.bn2(border)
        border = F.silu(border) * self.border_mask
        return centre + border


def _amp_activation(cfg: NetworkConfig):
    if cfg.effective_output_mode == "real_imag":
        return _real_activation
    return torch.sigmoid if cfg.amp_activation == "sigmoid" else F.silu


def _phase_activation(cfg: NetworkConfig):
    if cfg.effective_output_mode == "real_imag":
        return _imag_activation
    return _pi_tanh


def _pi_tanh(x: torch.Tensor) -> torch.Tensor:
    return math.pi * torch.tanh(x)


def _real_activation(x: torch.Tensor) -> torch.Tensor:
    return 0.2 + torch.tanh(x)


def _imag_activation(x: torch.Tensor) -> torch.Tensor:
    return 1.2 * torch.tanh(x)


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def _border_width(cfg: NetworkConfig, out_channels: int) -> int:
    """Channels routed to the border path: ``Co`` at HEAD, or the legacy fraction with the override."""
    if cfg.use_legacy_decoder_channel_override:
        fraction = min(max(cfg.decoder_last_c_outer_fraction, 0.0), 0.5)
        return max(1, int(math.floor(32 * cfg.n_filters_scale * fraction)))
    return out_channels


class _SeparateDecoder(nn.Module):
    """``decoder_amp`` / ``decoder_phase``: a trunk of up-blocks and one head."""

    def __init__(self, cfg: NetworkConfig, head_name: str, out_channels: int, batch_norm: bool, activation):
        super().__init__()
        _, trunk = _widths(cfg)
        cin = 128 * cfg.n_filters_scale
        blocks = []
        for width in trunk:
            blocks.append(_ConvUpBlock(cin, width, batch_norm))
            cin = width
        self.blocks = nn.ModuleList(blocks)
        attention = _decoder_attention_blocks(cfg, trunk)
        if attention is not None:
            self.attention_blocks = attention
        self.head_name = head_name
        head = _Head(cfg, out_channels, _border_width(cfg, out_channels), batch_norm, activation)
        self.add_module(head_name, head)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return getattr(self, self.head_name)(x)


class _RefinementBlock(nn.Module):
    def __init__(self, channels: int, expansion: int) -> None:
        super().__init__()
        wide = expansion * channels
        self.block = nn.Sequential(
            _conv3x3(channels, wide), nn.ReLU(), _conv3x3(wide, wide), nn.ReLU(), _conv3x3(wide, channels)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x + self.block(x))


class _SharedDecoder(nn.Module):
    """``decoder_shared`` (docs/bundle-format.md §8.5.5): one trunk with refinement blocks and ECA, one 2-branch head."""

    def __init__(self, cfg: NetworkConfig) -> None:
        super().__init__()
        _, trunk = _widths(cfg)
        if cfg.use_legacy_decoder_channel_override:
            self.branch_channels = cfg.decoder_last_amp_channels if cfg.object_big else 1
        else:
            self.branch_channels = cfg.channels
        head_channels = 2 * self.branch_channels
        cin = 128 * cfg.n_filters_scale
        blocks, refinements = [], []
        for j, width in enumerate(trunk):
            blocks.append(_ConvUpBlock(cin, width, cfg.batch_norm))
            refinements.append(_RefinementBlock(width, 2 if j == len(trunk) - 1 else 1))
            cin = width
        self.blocks = nn.ModuleList(blocks)
        attention = _decoder_attention_blocks(cfg, trunk)
        if attention is not None:
            self.attention_blocks = attention
        self.refinement_blocks = nn.ModuleList(refinements)
        self.eca = _ECA()
        border = _border_width(cfg, head_channels)
        self.head = _Head(cfg, head_channels, border, cfg.batch_norm, _identity)
        self.first_activation = _amp_activation(cfg)
        self.second_activation = _phase_activation(cfg)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        for block, refinement in zip(self.blocks, self.refinement_blocks):
            x = refinement(block(x))
        raw = self.head(self.eca(x))
        first = raw[:, : self.branch_channels]
        second = raw[:, self.branch_channels :]
        return self.first_activation(first), self.second_activation(second)


class _Autoencoder(nn.Module):
    def __init__(self, cfg: NetworkConfig) -> None:
        super().__init__()
        self.encoder = _Encoder(cfg)
        self.bottleneck_cbam = _CBAM(128 * cfg.n_filters_scale) if cfg.cbam_bottleneck else nn.Identity()
        self.shared = cfg.use_shared_decoder
        if cfg.use_shared_decoder:
            self.decoder_shared = _SharedDecoder(cfg)
        else:
            phase_channels = cfg.channels
            if cfg.use_legacy_decoder_channel_override and cfg.object_big:
                amp_channels = cfg.decoder_last_amp_channels
            else:
                amp_channels = cfg.channels
            self.decoder_amp = _SeparateDecoder(cfg, "amp", amp_channels, False, _amp_activation(cfg))
            self.decoder_phase = _SeparateDecoder(
                cfg, "phase", phase_channels, cfg.batch_norm, _phase_activation(cfg)
            )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = self.bottleneck_cbam(self.encoder(x))
        if self.shared:
            return self.decoder_shared(y)
        return self.decoder_amp(y), self.decoder_phase(y)


class _PtychoPINNCore(nn.Module):
    def __init__(self, cfg: NetworkConfig) -> None:
        super().__init__()
        self.autoencoder = _Autoencoder(cfg)
        if cfg.mode == "Unsupervised":
            self.forward_model = ForwardModel(cfg.num_datasets)


class PtychoPINNNetwork(ScaledInputNetwork):
    """The ``diffraction_to_obj`` network: amplitudes ``(B, C, N, N)`` float32 -> complex64 object patches.

    ``forward(x, input_scale_factor)`` follows upstream's ``forward_predict`` (docs/bundle-format.md §4.1, §8.4): the input is
    multiplied by the caller's per-sample factor, unless the model carries a trainable intensity scale, in
    which case ``exp(float32(ln intensity_scale))`` replaces it. Use :meth:`eval` before inference (batch norm
    uses running statistics only in eval mode); :func:`~mlflow_ptycho_flavor.bundle.load_torch_bundle` returns
    the network in eval mode.

    Attributes:
        config: the immutable :class:`NetworkConfig` the network was built from.
    """

    def __init__(self, config: NetworkConfig) -> None:
        super().__init__()
        self.config = config
        with warnings.catch_warnings():
            # N=256 with n_filters_scale=1 has a zero-width CBAM gate (docs/bundle-format.md §8.5.2); its init is a no-op.
            warnings.filterwarnings("ignore", message="Initializing zero-element tensors")
            self.model = _PtychoPINNCore(config)
        self._real_imag = config.effective_output_mode == "real_imag"
        self._fixed_input_scale = fixed_input_scale(config.intensity_scale_trainable, config.intensity_scale)

    @classmethod
    def from_state_dict(cls, config: NetworkConfig, state_dict) -> "PtychoPINNNetwork":
        """Build the network around existing weights: no random initialisation and no copy.

        The module tree is created on the ``meta`` device (no memory, no init) and the tensors of ``state_dict``
        are adopted as its parameters and buffers (:func:`~.common.adopting_network`: what
        ``load_state_dict(strict=True, assign=True)`` gives), so loading costs what reading the weights costs. The
        caller hands the tensors over: they become the network's.
        """
        network = adopting_network(cls, config, state_dict)
        for module in network.modules():
            if isinstance(module, _Head):
                module.border_mask = _border_mask(config.N)
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
        first, second = self.model.autoencoder(x)
        if first.shape != second.shape:
            raise UnsupportedBundleError(
                f"the amplitude and phase heads give different shapes {tuple(first.shape)} vs "
                f"{tuple(second.shape)} (use_legacy_decoder_channel_override with decoder_last_amp_channels="
                f"{self.config.decoder_last_amp_channels} and separate decoders); upstream cannot predict with "
                "this configuration either"
            )
        if self._real_imag:
            return torch.complex(first, second)
        return first.to(torch.complex64) * torch.exp(1j * second.to(torch.complex64))

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"N={c.N}, C={c.C_model}, n_filters_scale={c.n_filters_scale}, output={c.effective_output_mode}, "
            f"shared_decoder={c.use_shared_decoder}, batch_norm={c.batch_norm}"
        )
