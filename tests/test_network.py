"""The clean-room network against the spec: key counts (§8.5.8), shapes (§3.5, §8.5.5, §8.5.7), parameter totals
(§3.2), the N=256 zero-width CBAM gate (§8.5.2), output shapes and dtypes, the probe_big=False border ring
(§8.5.4), real_imag bounds (§8.5.6), input scaling (§8.4) and batch-norm eval/train (§8.5.1)."""

from __future__ import annotations

import copy

import pytest
import torch

from mlflow_ptycho_flavor.errors import ConfigMismatchError, UnsupportedBundleError
from mlflow_ptycho_flavor.network import NetworkConfig, PtychoPINNNetwork

P = "model.autoencoder."
L_OF = {64: 3, 128: 4, 256: 5}
BASE_KEYS = {64: 63, 128: 80, 256: 97}


def _keys(**config) -> "dict[str, torch.Size]":
    net = PtychoPINNNetwork(NetworkConfig(**config))
    return {k: v.shape for k, v in net.state_dict().items()}


def _count(**config) -> int:
    return len(PtychoPINNNetwork(NetworkConfig(**config)).state_dict())


def _x(batch: int, channels: int, n: int, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return 2 * torch.rand(batch, channels, n, n, generator=gen)


def _predict(net: PtychoPINNNetwork, x: torch.Tensor, factor=None) -> torch.Tensor:
    with torch.no_grad():
        return net(x, factor)


def _ring(n: int) -> torch.Tensor:
    """Boolean (N, N) mask of the border ring: everything outside rows/cols [N/4, N - N/4)."""
    q = n // 4
    mask = torch.ones(n, n, dtype=torch.bool)
    mask[q : n - q, q : n - q] = False
    return mask


# ------------------------------------------------------------------------------------------------------------
# §8.5.8 key counts
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [64, 128, 256])
def test_key_counts_of_every_knob(n):
    L = L_OF[n]
    base = dict(N=n, n_filters_scale=1)
    assert _count(**base) == BASE_KEYS[n]
    expected = {
        "batch_norm": (dict(batch_norm=True), BASE_KEYS[n] + 5 * (4 * L + 2)),
        "cbam_bottleneck": (dict(cbam_bottleneck=True), BASE_KEYS[n] + 5),
        "no cbam_encoder": (dict(cbam_encoder=False), BASE_KEYS[n] - 5 * L),
        "no cbam_encoder + eca_encoder": (dict(cbam_encoder=False, eca_encoder=True), BASE_KEYS[n] - 5 * L + L),
        "eca_encoder with cbam (no effect)": (dict(eca_encoder=True), BASE_KEYS[n]),
        "cbam_decoder": (dict(cbam_decoder=True), BASE_KEYS[n] + 2 * 5 * (L - 1)),
        "eca_decoder": (dict(eca_decoder=True), BASE_KEYS[n] + 2 * 1 * (L - 1)),
        "spatial_decoder": (dict(spatial_decoder=True), BASE_KEYS[n] + 2 * 1 * (L - 1)),
        "all decoder flags (ECA wins)": (
            dict(cbam_decoder=True, eca_decoder=True, spatial_decoder=True), BASE_KEYS[n] + 2 * (L - 1)),
        "spatial + cbam decoder (spatial wins)": (
            dict(cbam_decoder=True, spatial_decoder=True), BASE_KEYS[n] + 2 * (L - 1)),
        "shared decoder": (dict(use_shared_decoder=True), BASE_KEYS[n] - (8 * L + 8) + (10 * L - 1)),
        "shared decoder + cbam_decoder": (
            dict(use_shared_decoder=True, cbam_decoder=True),
            BASE_KEYS[n] - (8 * L + 8) + (10 * L - 1) + 5 * (L - 1)),
        "shared decoder + eca_decoder": (
            dict(use_shared_decoder=True, eca_decoder=True), BASE_KEYS[n] - (8 * L + 8) + (10 * L - 1) + (L - 1)),
        "shared decoder + batch_norm": (
            dict(use_shared_decoder=True, batch_norm=True),
            BASE_KEYS[n] - (8 * L + 8) + (10 * L - 1) + 5 * (4 * L + 2)),
        "Supervised": (dict(mode="Supervised"), BASE_KEYS[n] - 4),
        "num_datasets=3": (dict(num_datasets=3), BASE_KEYS[n]),
        "gridsize 2": (dict(C_model=4), BASE_KEYS[n]),
        "real_imag / probe_big / swish / object_big (no key change)": (
            dict(cnn_output_mode="real_imag", probe_big=False, amp_activation="swish", object_big=False, C_model=4),
            BASE_KEYS[n]),
        "bn + bottleneck + no-cbam-encoder + eca": (
            dict(batch_norm=True, cbam_bottleneck=True, cbam_encoder=False, eca_encoder=True),
            BASE_KEYS[n] + 5 * (4 * L + 2) + 5 - 5 * L + L),
    }
    got = {name: _count(**base, **knobs) for name, (knobs, _) in expected.items()}
    assert got == {name: count for name, (_, count) in expected.items()}


def test_key_count_spot_values_at_n64():
    """The concrete numbers the spec states for N=64: BN +70, shared decoder 60 keys in all (10L-1 = 29 decoder
    keys instead of 8L+8 = 32), Supervised 59."""
    assert _count(n_filters_scale=1, batch_norm=True) == 63 + 70
    shared = _keys(n_filters_scale=1, use_shared_decoder=True)
    assert len(shared) == 60
    assert sum(k.startswith(P + "decoder_shared.") for k in shared) == 29
    separate = _keys(n_filters_scale=1)
    assert sum(k.startswith((P + "decoder_amp.", P + "decoder_phase.")) for k in separate) == 32
    assert _count(n_filters_scale=1, mode="Supervised") == 59


def test_num_datasets_shapes_forward_model_keys():
    keys = _keys(n_filters_scale=1, num_datasets=3)
    for name in ("alpha", "beta", "rect_scaler.s1", "rect_scaler.s2"):
        assert keys[f"model.forward_model.{name}"] == (3,)
    supervised = _keys(n_filters_scale=1, num_datasets=3, mode="Supervised")
    assert not any(k.startswith("model.forward_model.") for k in supervised)
    assert set(supervised) == {k for k in keys if not k.startswith("model.forward_model.")}


# ------------------------------------------------------------------------------------------------------------
# §3.2 parameter totals and §3.5 state_dict table
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "n, c_model, total",
    [(64, 1, 2_339_896), (128, 1, 4_727_900), (256, 1, 12_994_431), (64, 4, 2_351_734)],
)
def test_parameter_totals(n, c_model, total):
    net = PtychoPINNNetwork(NetworkConfig(N=n, C_model=c_model))
    assert sum(p.numel() for p in net.parameters()) == total
    # at defaults there are no buffers: state_dict and parameters coincide
    assert sum(t.numel() for t in net.state_dict().values()) == total


def _table_gs1() -> "list[tuple[str, tuple]]":
    rows = []
    widths = [64, 128, 256]
    cin = 1
    for i, g in enumerate(widths):
        b = f"{P}encoder.blocks.{i}."
        rows += [
            (b + "conv1.weight", (g, cin, 3, 3)), (b + "conv1.bias", (g,)),
            (b + "conv2.weight", (g, g, 3, 3)), (b + "conv2.bias", (g,)),
            (b + "attention.ChannelGate.mlp.1.weight", (g // 16, g)),
            (b + "attention.ChannelGate.mlp.1.bias", (g // 16,)),
            (b + "attention.ChannelGate.mlp.3.weight", (g, g // 16)),
            (b + "attention.ChannelGate.mlp.3.bias", (g,)),
            (b + "attention.SpatialGate.compress.weight", (1, 2, 7, 7)),
        ]
        cin = g
    for dec, head in (("decoder_amp", "amp"), ("decoder_phase", "phase")):
        d = f"{P}{dec}."
        rows += [
            (d + "blocks.0.conv1.weight", (128, 256, 3, 3)), (d + "blocks.0.conv1.bias", (128,)),
            (d + "blocks.0.conv2.weight", (128, 128, 3, 3)), (d + "blocks.0.conv2.bias", (128,)),
            (d + "blocks.1.conv1.weight", (64, 128, 3, 3)), (d + "blocks.1.conv1.bias", (64,)),
            (d + "blocks.1.conv2.weight", (64, 64, 3, 3)), (d + "blocks.1.conv2.bias", (64,)),
            (d + f"{head}.conv1.weight", (1, 63, 3, 3)), (d + f"{head}.conv1.bias", (1,)),
            (d + f"{head}.conv_up_block.conv1.weight", (64, 1, 3, 3)),
            (d + f"{head}.conv_up_block.conv1.bias", (64,)),
            (d + f"{head}.conv_up_block.conv2.weight", (64, 64, 3, 3)),
            (d + f"{head}.conv_up_block.conv2.bias", (64,)),
            (d + f"{head}.conv2.weight", (1, 64, 3, 3)), (d + f"{head}.conv2.bias", (1,)),
        ]
    rows += [(f"model.forward_model.{k}", (1,)) for k in ("alpha", "beta", "rect_scaler.s1", "rect_scaler.s2")]
    return rows


def test_state_dict_table_gridsize1():
    """§3.5, gridsize 1: all 63 keys, in order, with their shapes, all float32."""
    table = _table_gs1()
    assert len(table) == 63
    sd = PtychoPINNNetwork(NetworkConfig(N=64, C_model=1, n_filters_scale=2)).state_dict()
    assert [(k, tuple(v.shape)) for k, v in sd.items()] == table
    assert {v.dtype for v in sd.values()} == {torch.float32}


def test_state_dict_table_gridsize2_c_dependent_keys():
    """§3.5, gridsize 2: only encoder.blocks.0.conv1.weight and the four head convs change."""
    c_dependent = {
        f"{P}encoder.blocks.0.conv1.weight": (64, 4, 3, 3),
        f"{P}decoder_amp.amp.conv1.weight": (4, 60, 3, 3),
        f"{P}decoder_amp.amp.conv1.bias": (4,),
        f"{P}decoder_amp.amp.conv_up_block.conv1.weight": (64, 4, 3, 3),
        f"{P}decoder_amp.amp.conv2.weight": (4, 64, 3, 3),
        f"{P}decoder_amp.amp.conv2.bias": (4,),
        f"{P}decoder_phase.phase.conv1.weight": (4, 60, 3, 3),
        f"{P}decoder_phase.phase.conv1.bias": (4,),
        f"{P}decoder_phase.phase.conv_up_block.conv1.weight": (64, 4, 3, 3),
        f"{P}decoder_phase.phase.conv2.weight": (4, 64, 3, 3),
        f"{P}decoder_phase.phase.conv2.bias": (4,),
    }
    expected = [(k, c_dependent.get(k, shape)) for k, shape in _table_gs1()]
    sd = PtychoPINNNetwork(NetworkConfig(N=64, C_model=4, n_filters_scale=2)).state_dict()
    assert [(k, tuple(v.shape)) for k, v in sd.items()] == expected
    # object_big=False gives the gs=1 shapes for any gridsize
    flat = PtychoPINNNetwork(NetworkConfig(N=64, C_model=4, object_big=False)).state_dict()
    assert [(k, tuple(v.shape)) for k, v in flat.items()] == _table_gs1()


def test_batch_norm_keys_placement_and_order():
    """§8.5.1: BN in encoder blocks, the phase trunk and head, never in decoder_amp; block order conv1, conv2, bn1, bn2."""
    keys = list(_keys(n_filters_scale=1, batch_norm=True))
    bn = [k for k in keys if ".bn1." in k or ".bn2." in k]
    assert not any("decoder_amp" in k for k in bn)
    assert f"{P}decoder_phase.phase.bn1.running_var" in keys
    assert f"{P}decoder_phase.phase.conv_up_block.bn2.num_batches_tracked" in keys
    block = [k for k in keys if k.startswith(f"{P}encoder.blocks.0.")]
    assert block[:14] == [
        f"{P}encoder.blocks.0.{m}.{p}"
        for m, params in (("conv1", ("weight", "bias")), ("conv2", ("weight", "bias")),
                          ("bn1", ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")),
                          ("bn2", ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")))
        for p in params
    ]
    head = [k.split("phase.phase.")[1].split(".")[0] for k in keys if "decoder_phase.phase." in k]
    assert list(dict.fromkeys(head)) == ["conv1", "conv_up_block", "conv2", "bn1", "bn2"]


def test_shared_decoder_example_shapes():
    """§8.5.5 example: N=64, s=1, gs=2."""
    keys = _keys(N=64, n_filters_scale=1, C_model=4, use_shared_decoder=True)
    s = f"{P}decoder_shared."
    assert keys[s + "head.conv1.weight"] == (8, 24, 3, 3)
    assert keys[s + "head.conv_up_block.conv1.weight"] == (32, 8, 3, 3)
    assert keys[s + "head.conv_up_block.conv2.weight"] == (32, 32, 3, 3)
    assert keys[s + "head.conv2.weight"] == (8, 32, 3, 3)
    assert keys[s + "refinement_blocks.1.block.0.weight"] == (64, 32, 3, 3)
    assert keys[s + "refinement_blocks.1.block.2.weight"] == (64, 64, 3, 3)
    assert keys[s + "refinement_blocks.1.block.4.weight"] == (32, 64, 3, 3)
    assert keys[s + "refinement_blocks.0.block.0.weight"] == (64, 64, 3, 3)
    assert keys[s + "blocks.0.conv1.weight"] == (64, 128, 3, 3)
    assert keys[s + "eca.conv.weight"] == (1, 1, 3)
    assert not any("decoder_amp" in k or "decoder_phase" in k for k in keys)


def test_legacy_override_example_shapes():
    """§8.5.7 example: N=64, s=2, gs=2, amp channels 1."""
    keys = _keys(N=64, n_filters_scale=2, C_model=4, use_legacy_decoder_channel_override=True)
    assert keys[f"{P}decoder_amp.amp.conv1.weight"] == (1, 56, 3, 3)
    assert keys[f"{P}decoder_amp.amp.conv_up_block.conv1.weight"] == (64, 8, 3, 3)
    assert keys[f"{P}decoder_amp.amp.conv2.weight"] == (1, 64, 3, 3)
    assert keys[f"{P}decoder_phase.phase.conv1.weight"] == (4, 56, 3, 3)
    assert keys[f"{P}decoder_phase.phase.conv2.weight"] == (4, 64, 3, 3)
    # fraction 0.25 at s=1 routes floor(32 * 0.25) = 8 channels; the fraction is clamped to 0.5
    quarter = _keys(n_filters_scale=1, C_model=4, use_legacy_decoder_channel_override=True,
                    decoder_last_amp_channels=4, decoder_last_c_outer_fraction=0.25)
    assert quarter[f"{P}decoder_amp.amp.conv1.weight"] == (4, 24, 3, 3)
    assert quarter[f"{P}decoder_amp.amp.conv_up_block.conv1.weight"] == (32, 8, 3, 3)
    clamped = _keys(n_filters_scale=1, use_legacy_decoder_channel_override=True, decoder_last_c_outer_fraction=0.9)
    assert clamped[f"{P}decoder_phase.phase.conv1.weight"] == (1, 16, 3, 3)
    # without the override the knobs are ignored
    assert _keys(n_filters_scale=1, decoder_last_c_outer_fraction=0.25)[f"{P}decoder_amp.amp.conv1.weight"] == (1, 31, 3, 3)


def test_legacy_override_invalid_amp_channels_refused():
    with pytest.raises(ConfigMismatchError, match="decoder_last_amp_channels=2 must be 1 or C_model=4"):
        NetworkConfig(C_model=4, use_legacy_decoder_channel_override=True, decoder_last_amp_channels=2)


def test_legacy_override_unequal_heads_fail_at_forward(perturbed_network):
    """Amp channels 1 with C_model 4 and separate decoders: upstream raises at forward; so do we."""
    net = perturbed_network(n_filters_scale=1, C_model=4, use_legacy_decoder_channel_override=True)
    with pytest.raises(UnsupportedBundleError, match="different shapes"):
        _predict(net, _x(1, 4, 64))
    shared = perturbed_network(n_filters_scale=1, C_model=4, use_legacy_decoder_channel_override=True,
                               use_shared_decoder=True)
    out = _predict(shared, _x(1, 4, 64))
    assert out.shape == (1, 1, 64, 64) and out.dtype == torch.complex64


def test_n256_s1_zero_width_cbam_gate():
    """§8.5.2: G=8 at encoder block 0 gives a zero-width hidden layer; the gate is then sigmoid(2 * mlp.3.bias)."""
    net = PtychoPINNNetwork(NetworkConfig(N=256, n_filters_scale=1)).eval()
    keys = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    g = f"{P}encoder.blocks.0.attention.ChannelGate."
    assert keys[g + "mlp.1.weight"] == (0, 8)
    assert keys[g + "mlp.1.bias"] == (0,)
    assert keys[g + "mlp.3.weight"] == (8, 0)
    assert keys[g + "mlp.3.bias"] == (8,)
    gate = net.model.autoencoder.encoder.blocks[0].attention.ChannelGate
    with torch.no_grad():
        gate.mlp[3].bias.copy_(torch.linspace(-2, 2, 8))
        x = torch.randn(2, 8, 16, 16)
        expected = x * torch.sigmoid(2 * gate.mlp[3].bias)[None, :, None, None]
        assert torch.allclose(gate(x), expected, rtol=0, atol=1e-6)
        out = net(_x(1, 1, 256), torch.ones(1, 1, 1, 1))
    assert out.shape == (1, 1, 256, 256) and torch.isfinite(torch.view_as_real(out)).all()


# ------------------------------------------------------------------------------------------------------------
# Forward: shapes, border ring, real_imag bounds
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("c_model", [1, 4])
def test_forward_shape_and_dtype(perturbed_network, c_model):
    net = perturbed_network(n_filters_scale=1, C_model=c_model)
    out = _predict(net, _x(2, c_model, 64), torch.full((2, 1, 1, 1), 0.9))
    assert out.shape == (2, c_model, 64, 64)
    assert out.dtype == torch.complex64
    assert torch.isfinite(torch.view_as_real(out)).all()


def test_forward_shape_n128_gridsize2(perturbed_network):
    net = perturbed_network(N=128, n_filters_scale=1, C_model=4)
    out = _predict(net, _x(1, 4, 128))
    assert out.shape == (1, 4, 128, 128) and out.dtype == torch.complex64


def test_object_big_false_at_gridsize2(perturbed_network):
    net = perturbed_network(n_filters_scale=1, C_model=4, object_big=False)
    assert net.input_channels == 1
    out = _predict(net, _x(2, 1, 64), torch.ones(2, 1, 1, 1))
    assert out.shape == (2, 1, 64, 64) and out.dtype == torch.complex64
    with pytest.raises((RuntimeError, ValueError), match="channels"):
        _predict(net, _x(2, 4, 64))


@pytest.mark.parametrize(
    "knobs, ring_value",
    [
        (dict(), 0j),
        (dict(cnn_output_mode="real_imag"), 0j),
        (dict(amp_activation="swish"), 0j),
        (dict(use_shared_decoder=True), 0.5 + 0j),
        (dict(use_shared_decoder=True, cnn_output_mode="real_imag"), 0.2 + 0j),
        (dict(use_shared_decoder=True, amp_activation="swish"), 0j),
    ],
    ids=["separate", "separate-real_imag", "separate-swish", "shared-sigmoid", "shared-real_imag", "shared-swish"],
)
def test_probe_big_false_border_ring(perturbed_network, knobs, ring_value):
    """§8.5.4: without probe_big each head returns its centre path; the ring is 0 (separate) or act(0) (shared)."""
    net = perturbed_network(n_filters_scale=1, C_model=4, probe_big=False, **knobs)
    out = _predict(net, _x(2, 4, 64))
    ring = out[..., _ring(64)]
    expected = torch.full_like(ring, complex(ring_value))
    assert torch.equal(ring, expected)
    # the centre is not trivially constant
    centre = out[..., 16:48, 16:48]
    assert centre.abs().std() > 1e-3
    # and with probe_big the ring carries the border path
    net_big = perturbed_network(n_filters_scale=1, C_model=4, probe_big=True, **knobs)
    assert not torch.equal(_predict(net_big, _x(2, 4, 64))[..., _ring(64)], expected)


def test_real_imag_separate_decoders_bounds(perturbed_network):
    """§8.5.6: centre real = 0.2 + tanh(.) in (-0.8, 1.2), imag = 1.2 tanh(.) in (-1.2, 1.2); the ring is plain SiLU."""
    net = perturbed_network(n_filters_scale=1, C_model=4, cnn_output_mode="real_imag")
    out = _predict(net, 3 * _x(2, 4, 64))
    centre = out[..., 16:48, 16:48]
    assert centre.real.min() > -0.8 and centre.real.max() < 1.2
    assert centre.imag.min() > -1.2 and centre.imag.max() < 1.2
    assert centre.real.std() > 1e-3 and centre.imag.std() > 1e-3
    # amp_phase of the same weights is a different function (amp * exp(i phase), no 0.2 offset)
    amp_phase = perturbed_network(n_filters_scale=1, C_model=4)
    assert not torch.allclose(_predict(amp_phase, 3 * _x(2, 4, 64)), out)


def test_real_imag_shared_decoder_bounds_whole_frame(perturbed_network):
    """Shared decoder: the branch activation covers the whole frame, SiLU border included."""
    net = perturbed_network(n_filters_scale=1, C_model=4, cnn_output_mode="real_imag", use_shared_decoder=True)
    out = _predict(net, 3 * _x(2, 4, 64))
    assert out.real.min() > -0.8 and out.real.max() < 1.2
    assert out.imag.min() > -1.2 and out.imag.max() < 1.2


def test_supervised_forces_amp_phase(perturbed_network):
    """Supervised ignores the real_imag knob (same weights: same output as Supervised amp_phase)."""
    a = perturbed_network(n_filters_scale=1, mode="Supervised", cnn_output_mode="real_imag")
    b = perturbed_network(n_filters_scale=1, mode="Supervised")
    x = _x(2, 1, 64)
    assert torch.equal(_predict(a, x), _predict(b, x))


def test_amp_activation_other_strings_are_silu(perturbed_network):
    """Any amp_activation other than 'sigmoid' is SiLU."""
    x = _x(1, 1, 64)
    outs = [_predict(perturbed_network(n_filters_scale=1, amp_activation=a), x) for a in ("swish", "silu", "relu")]
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])
    assert not torch.equal(outs[0], _predict(perturbed_network(n_filters_scale=1), x))


# ------------------------------------------------------------------------------------------------------------
# §8.4 input scaling
# ------------------------------------------------------------------------------------------------------------
def _pair(perturbed_network, scale, trainable=True):
    """The same weights with and without a trainable intensity scale."""
    plain = perturbed_network(n_filters_scale=1, seed=3)
    scaled = perturbed_network(n_filters_scale=1, seed=3, intensity_scale_trainable=trainable, intensity_scale=scale)
    return plain, scaled


def test_trainable_scale_ignores_factor(perturbed_network):
    plain, scaled = _pair(perturbed_network, 2.5)
    x = _x(2, 1, 64)
    assert scaled.uses_fixed_input_scale
    one = _predict(scaled, x, torch.ones(2, 1, 1, 1))
    seven = _predict(scaled, x, torch.full((2, 1, 1, 1), 7.0))
    assert torch.equal(one, seven)
    assert torch.equal(one, _predict(scaled, x, None))
    # e = exp(float32(ln 2.5)) = 2.5: identical to passing 2.5 to the plain network
    assert torch.equal(one, _predict(plain, x, torch.full((2, 1, 1, 1), 2.5)))
    assert not torch.equal(one, _predict(plain, x, torch.ones(2, 1, 1, 1)))


def test_trainable_scale_of_one_honours_factor(perturbed_network):
    """ln(1) = 0 is falsy: the caller's factor is used."""
    plain, scaled = _pair(perturbed_network, 1.0)
    x = _x(2, 1, 64)
    f = torch.tensor([0.7, 1.3]).reshape(2, 1, 1, 1)
    assert not scaled.uses_fixed_input_scale
    assert torch.equal(_predict(scaled, x, f), _predict(plain, x, f))
    assert not torch.equal(_predict(scaled, x, f), _predict(scaled, x, 7 * f))


def test_untrainable_scale_value_is_irrelevant(perturbed_network):
    plain, scaled = _pair(perturbed_network, 2.5, trainable=False)
    x = _x(2, 1, 64)
    f = torch.tensor([0.7, 1.3]).reshape(2, 1, 1, 1)
    assert torch.equal(_predict(scaled, x, f), _predict(plain, x, f))


@pytest.mark.parametrize(
    "scale, e",
    [(10000.0, 10000.0009765625), (988.0, 988.0001220703125), (1.00000001, 1.0)],
)
def test_trainable_scale_float32_exp_values(perturbed_network, scale, e):
    """§8.4: e = exp(float32(ln s)) in float32 (observed values), and the factor is ignored."""
    plain, scaled = _pair(perturbed_network, scale)
    assert scaled.uses_fixed_input_scale  # 1.00000001: ln is 1e-8 != 0, so still "trainable"
    x = _x(1, 1, 64) / scale  # keep the network input in its working range
    got = _predict(scaled, x, torch.full((1, 1, 1, 1), 3.0))
    assert torch.equal(got, _predict(plain, x, torch.tensor(e, dtype=torch.float32)))
    assert torch.tensor(e, dtype=torch.float32).item() == e  # the value is representable as stated


def test_trainable_scale_10000_differs_from_exact_10000(perturbed_network):
    """The one-ulp offset of float32 exp reaches the input: x*10000.0009765625 != x*10000 elementwise."""
    _, scaled = _pair(perturbed_network, 10000.0)
    x = _x(1, 1, 64)
    seen = []

    def hook(_module, args):
        seen.append(args[0].clone())

    handle = scaled.model.autoencoder.register_forward_pre_hook(hook)
    try:
        _predict(scaled, x, torch.ones(1, 1, 1, 1))
    finally:
        handle.remove()
    assert torch.equal(seen[0], x * torch.tensor(10000.0009765625, dtype=torch.float32))
    assert not torch.equal(seen[0], x * 10000.0)


# ------------------------------------------------------------------------------------------------------------
# batch norm
# ------------------------------------------------------------------------------------------------------------
def test_batch_norm_eval_and_train_differ(perturbed_network):
    """Eval uses the running statistics, train mode the batch statistics (and updates the running ones)."""
    net = perturbed_network(n_filters_scale=1, batch_norm=True)
    x = _x(2, 1, 64)
    evaluated = _predict(net, x)
    assert torch.equal(_predict(net, x), evaluated)  # eval is deterministic and stateless
    trained = _predict(net.train(), x)
    assert (evaluated - trained).abs().max() > 1e-3


def test_batch_norm_eval_uses_running_statistics(perturbed_network):
    """Eval BN is affine in the running stats: changing running_mean of a phase-head BN changes the output."""
    net = perturbed_network(n_filters_scale=1, batch_norm=True)
    x = _x(1, 1, 64)
    before = _predict(net, x)
    with torch.no_grad():
        net.model.autoencoder.decoder_phase.phase.bn1.running_mean.add_(0.5)
    assert not torch.equal(_predict(net, x), before)


def test_network_does_not_read_global_cfg(perturbed_network):
    from mlflow_ptycho_flavor.bundle import params

    net = perturbed_network(n_filters_scale=1)
    x = _x(1, 1, 64)
    before = _predict(net, x)
    params.cfg.update(N=256, gridsize=3, n_filters_scale=7, **{"object.big": False, "probe.big": False})
    assert torch.equal(_predict(net, x), before)
    fresh = PtychoPINNNetwork(NetworkConfig(n_filters_scale=1))
    assert fresh.config.N == 64 and len(fresh.state_dict()) == 63


def test_config_validation():
    with pytest.raises(ConfigMismatchError, match="N=96 is not supported"):
        NetworkConfig(N=96)
    with pytest.raises(UnsupportedBundleError, match="architecture='fno'"):
        NetworkConfig(architecture="fno")
    with pytest.raises(ConfigMismatchError, match="C_model must be a positive int"):
        NetworkConfig(C_model=True)
    with pytest.raises(UnsupportedBundleError, match="cnn_output_mode='logits'"):
        NetworkConfig(cnn_output_mode="logits")


def test_config_derived_quantities():
    assert NetworkConfig(C_model=9).gridsize == 3
    assert NetworkConfig(C_model=4).channels == 4
    assert NetworkConfig(C_model=4, object_big=False).channels == 1


def _exact_nhwc(tensor: torch.Tensor) -> bool:
    batch, channels, height, width = tensor.shape
    return tensor.stride() == (height * width * channels, 1, width * channels, channels)


@pytest.mark.parametrize("shape", [(2, 1, 8, 8), (2, 4, 8, 8), (3, 1, 1, 5), (0, 1, 8, 8)])
def test_nhwc_gives_exact_channels_last_strides_and_the_same_values(shape):
    """What the convolutions read as NHWC: one-channel tensors too, which ``contiguous(channels_last)`` leaves with
    NCHW strides (a free view here: their values are already in NHWC order)."""
    from mlflow_ptycho_flavor.network.common import nhwc

    x = torch.randn(shape)
    y = nhwc(x)
    assert _exact_nhwc(y) and torch.equal(y, x)
    if shape[1] == 1:
        assert y.data_ptr() == x.data_ptr()  # no copy
        if shape == (2, 1, 8, 8):  # what torch's own conversion leaves: NCHW strides, read as NCHW
            assert not _exact_nhwc(x.contiguous(memory_format=torch.channels_last))
    assert nhwc(y) is y
    strided = torch.randn(shape[0], shape[1], shape[2], shape[3] * 2)[..., ::2]  # not contiguous: copied
    assert _exact_nhwc(nhwc(strided)) and torch.equal(nhwc(strided), strided)


def test_use_channels_last_runs_nhwc_activations_on_the_stored_weights():
    """The CPU default layout: NHWC activations from the first convolution on, the weights untouched, the output
    bit for bit that of torch's whole-network channels_last."""
    from mlflow_ptycho_flavor.network import use_channels_last

    torch.manual_seed(0)
    reference = PtychoPINNNetwork(NetworkConfig(N=64, C_model=4, n_filters_scale=1)).eval()
    network = copy.deepcopy(reference)
    weights = {key: tensor.data_ptr() for key, tensor in network.state_dict().items() if tensor.dim() == 4}
    assert use_channels_last(network) is network and network.channels_last and not reference.channels_last
    assert {key: tensor.data_ptr() for key, tensor in network.state_dict().items() if tensor.dim() == 4} == weights
    seen = []
    network.model.autoencoder.encoder.blocks[0].conv1.register_forward_hook(lambda m, args, out: seen.append(out))
    x, factor = torch.rand(3, 4, 64, 64), torch.ones(3, 1, 1, 1)
    with torch.inference_mode():
        got = network(x, factor)
        expected = copy.deepcopy(reference).to(memory_format=torch.channels_last)(x, factor)
    assert _exact_nhwc(seen[0]) and torch.equal(got, expected)


def test_use_channels_last_disabled_returns_the_network_to_the_eager_layout():
    """``use_channels_last(network, False)`` undoes the CPU default: contiguous activations and buffers, the eager
    network's output bit for bit; converting the memory format alone keeps the NHWC flag."""
    from mlflow_ptycho_flavor.network import use_channels_last

    torch.manual_seed(0)
    reference = PtychoPINNNetwork(NetworkConfig(N=64, C_model=4, n_filters_scale=1)).eval()
    network = use_channels_last(copy.deepcopy(reference))
    assert network.to(memory_format=torch.contiguous_format).channels_last  # the flag outlives .to()
    assert use_channels_last(network, enabled=False) is network and not network.channels_last
    assert all(buffer.is_contiguous() for buffer in network.buffers())
    assert all(parameter.is_contiguous() for parameter in network.parameters())
    seen = []
    network.model.autoencoder.encoder.blocks[0].conv1.register_forward_hook(lambda m, args, out: seen.append(out))
    x, factor = torch.rand(3, 4, 64, 64), torch.ones(3, 1, 1, 1)
    with torch.inference_mode():
        got = network(x, factor)
        expected = reference(x, factor)
    assert seen[0].is_contiguous() and not _exact_nhwc(seen[0]) and torch.equal(got, expected)
