"""The clean-room FNO-family networks (``fno_vanilla``, ``fno``, ``ffno``) against the spec (§8.4, §8.6) and the
bundles upstream wrote for them (tests/data/upstream_fno):

* each upstream fixture's state_dict loads strictly into the network built from its ``torch_scaling_metadata.pt``,
  every key reaches the model byte for byte (sha256 per key as in ``meta.json``, aliases included) and the
  forward reproduces the recorded ``output``;
* key counts and shapes (§8.6's table) for every architecture x output mode x N x gridsize, on the meta device;
* the forward of every architecture x output mode x input transform x gridsize against an independent float64
  NumPy reimplementation of the spec's text (FFTs by NumPy, convolutions by shifted sums);
* head layouts, input transforms and input scaling semantics; a bit-for-bit state_dict round trip; config
  validation (typed errors, bounded sizes, ``neuralop_uno`` naming its package) and the metadata mapping.
"""

from __future__ import annotations

import copy
import hashlib
import io
import math
import pickle
import time

import numpy as np
import pytest
import torch

from mlflow_ptycho_flavor.errors import ConfigMismatchError, StateDictMismatchError, UnsupportedBundleError
from mlflow_ptycho_flavor.network.fno import PtychoFnoNetwork, alias_groups, check_aliases_agree
from mlflow_ptycho_flavor.network.fno_config import (
    FNO_ARCHITECTURES,
    FNO_CONFIG_LIMITS,
    FNO_INPUT_TRANSFORMS,
    GENERATOR_OUTPUT_MODES,
    UPSTREAM_FNO_DEFAULTS,
    FnoNetworkConfig,
    fno_config_from_metadata,
    fno_model_config_fields,
)
from mlflow_ptycho_flavor.bundle.metadata import DATA_CONFIG_DEFAULTS, MODEL_CONFIG_DEFAULTS
from fno_helpers import FIXTURES, KEY_TABLE, TOLERANCE, le_bytes, make_perturbed_fno_network, read_fixture

PREFIXES = ("model.generator.", "model.autoencoder.")
FORWARD_MODEL_KEYS = [
    "model.forward_model.alpha",
    "model.forward_model.beta",
    "model.forward_model.rect_scaler.s1",
    "model.forward_model.rect_scaler.s2",
]


# ----------------------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------------------
def _predict(network: PtychoFnoNetwork, x, factor=None) -> torch.Tensor:
    with torch.no_grad():
        return network(torch.as_tensor(x), None if factor is None else torch.as_tensor(factor))


def _max_abs(a, b) -> float:
    return float(np.abs(np.asarray(a) - np.asarray(b)).max())


def _key_count(architecture: str, output_mode: str, blocks: int, cnn_blocks: int) -> int:
    """Keys derived from §8.6's module description: core keys twice, plus the 4 forward_model keys."""
    head = 4 if output_mode == "amp_phase" else 2
    lifter = 4
    if architecture == "fno_vanilla":
        core = lifter + 3 * blocks + head
    elif architecture == "fno":
        core = lifter + 3 * blocks + 2 + 2 * cnn_blocks + head
    else:  # gate, shared operator, blocks (2 shared + norm/expand/project 6), the blocks alias, refiners
        core = lifter + 1 + 2 + 8 * blocks + 8 * blocks + 4 * cnn_blocks + head
    return 2 * core + 4


def _x(batch: int, channels: int, n: int, seed: int = 3) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return 2 * torch.rand(batch, channels, n, n, generator=gen)


# ----------------------------------------------------------------------------------------------------------------
# An independent float64 reference of §8.6 (NumPy FFTs, convolutions as sums of shifted slices)
# ----------------------------------------------------------------------------------------------------------------
_erf = np.vectorize(math.erf, otypes=[np.float64])


def _np_gelu(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)))


def _np_conv(x: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """Cross-correlation with zero padding k//2, stride 1: ``out[b,o] = sum_{c,i,j} w[o,c,i,j] x[b,c,.+i,.+j]``."""
    k = weight.shape[-1]
    pad = k // 2
    padded = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    height, width = x.shape[-2:]
    out = np.zeros((x.shape[0], weight.shape[0], height, width))
    for i in range(k):
        for j in range(k):
            out += np.einsum("bchw,oc->bohw", padded[:, :, i : i + height, j : j + width], weight[:, :, i, j])
    return out + bias[None, :, None, None]


def _np_instance_norm(x: np.ndarray, eps: float) -> np.ndarray:
    mean = x.mean(axis=(2, 3), keepdims=True)
    var = x.var(axis=(2, 3), keepdims=True)
    return (x - mean) / np.sqrt(var + eps)


def _np_spec(x: np.ndarray, weights: np.ndarray) -> np.ndarray:
    height, width = x.shape[-2:]
    spectrum = np.fft.rfft2(x)
    rows, cols = min(weights.shape[2], height), min(weights.shape[3], width // 2 + 1)
    mixed = np.zeros((x.shape[0], weights.shape[1]) + spectrum.shape[2:], dtype=np.complex128)
    for c in range(x.shape[1]):
        for o in range(weights.shape[1]):
            mixed[:, o, :rows, :cols] += spectrum[:, c, :rows, :cols] * weights[c, o, :rows, :cols]
    return np.fft.irfft2(mixed, s=(height, width))


def _np_spec_factorized(x: np.ndarray, weights_x: np.ndarray, weights_y: np.ndarray) -> np.ndarray:
    height, width = x.shape[-2:]
    out_channels = weights_x.shape[1]
    along_w = np.fft.rfft(x, axis=-1)
    bins = min(weights_x.shape[2], width // 2 + 1)
    mixed = np.zeros((x.shape[0], out_channels) + along_w.shape[2:], dtype=np.complex128)
    for c in range(x.shape[1]):
        for o in range(out_channels):
            mixed[:, o, :, :bins] += along_w[:, c, :, :bins] * weights_x[c, o, None, :bins]
    result = np.fft.irfft(mixed, n=width, axis=-1)
    along_h = np.fft.rfft(x, axis=-2)
    bins = min(weights_y.shape[2], height // 2 + 1)
    mixed = np.zeros((x.shape[0], out_channels) + along_h.shape[2:], dtype=np.complex128)
    for c in range(x.shape[1]):
        for o in range(out_channels):
            mixed[:, o, :bins, :] += along_h[:, c, :bins, :] * weights_y[c, o, :bins, None]
    return result + np.fft.irfft(mixed, n=height, axis=-2)


def _reference_forward(cfg: FnoNetworkConfig, state_dict: dict, x: np.ndarray, factor: np.ndarray) -> np.ndarray:
    """§8.6 read literally, on the ``model.autoencoder.`` keys (float64 / complex128)."""
    w = {k[len("model.autoencoder."):]: v.detach().double().numpy() if not v.is_complex() else
         v.detach().to(torch.complex128).numpy() for k, v in state_dict.items() if k.startswith("model.autoencoder.")}
    conv = lambda name, y: _np_conv(y, w[name + ".weight"], w[name + ".bias"])  # noqa: E731
    y = x.astype(np.float64) * factor.astype(np.float64)
    if cfg.fno_input_transform == "sqrt":
        y = np.sqrt(np.maximum(y, 0))
    elif cfg.fno_input_transform == "log1p":
        y = np.log1p(np.maximum(y, 0))
    elif cfg.fno_input_transform == "instancenorm":
        y = _np_instance_norm(y, 1e-6)
    y = conv("lifter.conv2", _np_gelu(conv("lifter.conv1", y)))
    if cfg.architecture in ("fno_vanilla", "fno"):
        prefix = "blocks" if cfg.architecture == "fno_vanilla" else "fno_blocks"
        for i in range(cfg.fno_blocks):
            spectral = _np_spec(y, w[f"{prefix}.{i}.spectral.weights"])
            y = y + _np_gelu(spectral + conv(f"{prefix}.{i}.local_conv", y))
        if cfg.architecture == "fno":
            y = conv("intermediate", y)
            for i in range(cfg.fno_cnn_blocks):
                y = _np_gelu(conv(f"cnn_refiner.{i}.0", y))
    else:
        gate = float(w["ffno_stack.shared_gate"])
        for i in range(cfg.fno_blocks):
            p = f"ffno_stack.blocks.{i}."
            s = _np_spec_factorized(y, w[p + "shared_spectral.weights_x"], w[p + "shared_spectral.weights_y"])
            s = _np_instance_norm(s, 1e-5) * w[p + "norm.weight"][None, :, None, None]
            s = s + w[p + "norm.bias"][None, :, None, None]
            y = y + gate * conv(p + "project", _np_gelu(conv(p + "expand", s)))
        for i in range(cfg.fno_cnn_blocks):
            y = y + conv(f"refiners.{i}.conv2", _np_gelu(conv(f"refiners.{i}.conv1", y)))
    c = cfg.C_model
    if cfg.generator_output_mode == "amp_phase":
        amplitude = 1 / (1 + np.exp(-conv("output_amp", y)))
        return amplitude * np.exp(1j * math.pi * np.tanh(conv("output_phase", y)))
    raw = conv("output_proj", y)
    first, second = raw[:, :c], raw[:, c:]
    if cfg.generator_output_mode == "real_imag":
        return first + 1j * second
    return 1 / (1 + np.exp(-first)) * np.exp(1j * math.pi * np.tanh(second))


# ----------------------------------------------------------------------------------------------------------------
# Upstream fixtures
# ----------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module", params=FIXTURES)
def fixture(request):
    loaded = read_fixture(request.param)
    md = loaded["metadata"]
    config = fno_config_from_metadata(md["model_config"], md["data_config"])
    # keep the file's tensors untouched for the byte comparisons: the network adopts a shallow copy's tensors
    network = PtychoFnoNetwork.from_state_dict(config, dict(loaded["state_dict"])).eval()
    return {**loaded, "name": request.param, "config": config, "network": network}


def test_fixture_config_comes_from_metadata(fixture):
    cfg, recorded = fixture["config"], fixture["meta"]["config"]["pt_model_config"]
    assert cfg.architecture == recorded["architecture"]
    assert cfg.generator_output_mode == recorded["generator_output_mode"]
    assert (cfg.fno_width, cfg.fno_modes, cfg.fno_blocks, cfg.fno_cnn_blocks) == (32, 12, 4, 2)
    assert cfg.N == 64 and cfg.C_model == 1


def test_fixture_every_key_reaches_the_model_unchanged(fixture):
    entries = fixture["meta"]["state_dict"]["entries"]
    loaded = fixture["network"].state_dict()
    assert list(loaded) == [e["key"] for e in entries]  # same keys, same order
    assert len(loaded) == fixture["meta"]["state_dict"]["n_keys"]
    for entry in entries:
        tensor = loaded[entry["key"]]
        assert str(tensor.dtype).removeprefix("torch.") == entry["dtype"]
        assert list(tensor.shape) == entry["shape"]
        assert hashlib.sha256(le_bytes(tensor)).hexdigest() == entry["sha256_le_bytes"], entry["key"]
    assert any(e["dtype"] == "complex64" for e in entries)


def test_fixture_weights_are_adopted_not_copied(fixture):
    loaded = fixture["network"].state_dict()
    for key, original in fixture["state_dict"].items():
        assert loaded[key].data_ptr() == original.data_ptr(), key


def test_fixture_alias_structure_matches_upstream(fixture):
    entries = fixture["meta"]["state_dict"]["entries"]
    upstream_groups: dict[int, list[str]] = {}
    for entry in entries:
        upstream_groups.setdefault(entry["alias_group"], []).append(entry["key"])
    assert sorted(map(tuple, upstream_groups.values())) == sorted(alias_groups(fixture["config"]))
    assert len(upstream_groups) == fixture["meta"]["state_dict"]["n_distinct_tensors"]
    # in the loaded network every alias group is one parameter
    keep_vars = fixture["network"].state_dict(keep_vars=True)
    for group in alias_groups(fixture["config"]):
        assert len({id(keep_vars[key]) for key in group}) == 1


def test_fixture_reproduces_reference_output(fixture):
    io_ = fixture["io"]
    out = _predict(fixture["network"], io_["x"], io_["input_scale_factor"])
    assert out.dtype == torch.complex64 and tuple(out.shape) == io_["output"].shape
    assert _max_abs(out.numpy(), io_["output"]) <= TOLERANCE
    assert _max_abs(np.abs(out.numpy()), io_["output_amp"]) <= TOLERANCE
    # the legacy loader's output (a random CNN) is far away: the comparison can fail
    assert _max_abs(out.numpy(), io_["output_legacy_load_torch_bundle"]) > 0.1


def test_fixture_output_depends_on_the_metadata_only_fields(fixture):
    """``fno_input_transform``, the real_imag <-> logits head and the trainable scale change numbers, not keys
    (README: 'a loader must read these fields from the metadata')."""
    io_ = fixture["io"]
    reference = _predict(fixture["network"], io_["x"], io_["input_scale_factor"]).numpy()
    state_dict = fixture["network"].state_dict()
    edits = [dict(fno_input_transform="log1p"), dict(intensity_scale_trainable=True, intensity_scale=2.5)]
    if fixture["config"].generator_output_mode == "real_imag":
        edits.append(dict(generator_output_mode="amp_phase_logits"))
    for edit in edits:
        edited = PtychoFnoNetwork.from_state_dict(fixture["config"].replace(**edit), dict(state_dict)).eval()
        assert _max_abs(_predict(edited, io_["x"], io_["input_scale_factor"]).numpy(), reference) > 1e-2, edit


def test_fixture_state_dict_round_trips_bit_for_bit(fixture):
    buffer = io.BytesIO()
    torch.save(fixture["network"].state_dict(), buffer)
    reread = torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)
    # shared tensors are written once, as upstream's own file stores them
    storages = {t.untyped_storage().data_ptr() for t in reread.values()}
    assert len(storages) == fixture["meta"]["state_dict"]["n_distinct_tensors"]
    again = PtychoFnoNetwork.from_state_dict(fixture["config"], reread).eval()
    for (key, a), (key2, b) in zip(fixture["network"].state_dict().items(), again.state_dict().items()):
        assert key == key2 and a.dtype == b.dtype and le_bytes(a) == le_bytes(b)
    io_ = fixture["io"]
    first = _predict(fixture["network"], io_["x"], io_["input_scale_factor"])
    second = _predict(again, io_["x"], io_["input_scale_factor"])
    assert torch.equal(first, second)


def test_fixture_disagreeing_aliases_are_refused(fixture):
    state_dict = dict(fixture["state_dict"])
    key = next(k for k in state_dict if k.startswith("model.autoencoder.") and k.endswith("weight"))
    tampered = state_dict[key].clone()
    tampered.view(-1)[0] += 1
    state_dict[key] = tampered
    with pytest.raises(StateDictMismatchError, match="different values"):
        check_aliases_agree(fixture["config"], state_dict)
    with pytest.raises(StateDictMismatchError):
        PtychoFnoNetwork.from_state_dict(fixture["config"], state_dict)
    # an equal copy that is not a view of the same storage is accepted
    state_dict[key] = fixture["state_dict"][key].clone()
    check_aliases_agree(fixture["config"], state_dict)


# ----------------------------------------------------------------------------------------------------------------
# State-dict layout (meta device: no memory, no init)
# ----------------------------------------------------------------------------------------------------------------
def _layout(**config) -> "dict[str, torch.Tensor]":
    with torch.device("meta"):
        return PtychoFnoNetwork(FnoNetworkConfig(**config)).state_dict()


@pytest.mark.parametrize("architecture", FNO_ARCHITECTURES)
@pytest.mark.parametrize("output_mode", GENERATOR_OUTPUT_MODES)
@pytest.mark.parametrize("n", [64, 128])
@pytest.mark.parametrize("gridsize", [1, 2])
def test_key_counts_and_shapes(architecture, output_mode, n, gridsize):
    c = gridsize * gridsize
    layout = _layout(architecture=architecture, generator_output_mode=output_mode, N=n, C_model=c)
    real_imag_count, amp_phase_count = KEY_TABLE[architecture]
    assert len(layout) == (amp_phase_count if output_mode == "amp_phase" else real_imag_count)
    assert len(layout) == _key_count(architecture, output_mode, 4, 2)
    keys = list(layout)
    assert keys[-4:] == FORWARD_MODEL_KEYS
    half = (len(keys) - 4) // 2
    generator, autoencoder = keys[:half], keys[half:-4]
    assert all(k.startswith(PREFIXES[0]) for k in generator)
    assert [k.replace("generator", "autoencoder", 1) for k in generator] == autoencoder
    suffix = {k[len(PREFIXES[1]):]: v for k, v in layout.items() if k.startswith(PREFIXES[1])}
    assert suffix["lifter.conv1.weight"].shape == (32, c, 3, 3)
    assert suffix["lifter.conv2.weight"].shape == (32, 32, 3, 3)
    if output_mode == "amp_phase":
        assert suffix["output_amp.weight"].shape == suffix["output_phase.weight"].shape == (c, 32, 1, 1)
        assert "output_proj.weight" not in suffix
    else:
        assert suffix["output_proj.weight"].shape == (2 * c, 32, 1, 1)
        assert "output_amp.weight" not in suffix
    complex_keys = {k for k, v in suffix.items() if v.dtype == torch.complex64}
    assert all(v.dtype in (torch.float32, torch.complex64) for v in layout.values())
    if architecture == "ffno":
        assert complex_keys == {
            f"{p}shared_spectral.weights_{axis}"
            for p in ["ffno_stack.", *(f"{s}.{i}." for s in ("ffno_stack.blocks", "blocks") for i in range(4))]
            for axis in "xy"
        }
        assert suffix["ffno_stack.shared_spectral.weights_x"].shape == (32, 32, 12)
        assert suffix["ffno_stack.shared_gate"].shape == ()
        assert suffix["blocks.2.expand.weight"].shape == (64, 32, 1, 1)
        assert suffix["refiners.1.conv2.weight"].shape == (32, 32, 3, 3)
    else:
        prefix = "blocks" if architecture == "fno_vanilla" else "fno_blocks"
        assert complex_keys == {f"{prefix}.{i}.spectral.weights" for i in range(4)}
        assert suffix[f"{prefix}.0.spectral.weights"].shape == (32, 32, 12, 12)
        assert suffix[f"{prefix}.3.local_conv.weight"].shape == (32, 32, 3, 3)
        if architecture == "fno":
            assert suffix["intermediate.weight"].shape == (32, 32, 1, 1)
            assert suffix["cnn_refiner.1.0.weight"].shape == (32, 32, 3, 3)


@pytest.mark.parametrize("architecture", FNO_ARCHITECTURES)
@pytest.mark.parametrize("blocks, cnn_blocks", [(1, 0), (3, 5), (7, 1)])
def test_key_counts_follow_block_counts(architecture, blocks, cnn_blocks):
    for output_mode in GENERATOR_OUTPUT_MODES:
        layout = _layout(architecture=architecture, generator_output_mode=output_mode, fno_blocks=blocks,
                         fno_cnn_blocks=cnn_blocks, fno_width=8, fno_modes=5)
        assert len(layout) == _key_count(architecture, output_mode, blocks, cnn_blocks)


def test_fno_vanilla_ignores_fno_cnn_blocks():
    assert _layout(architecture="fno_vanilla", fno_cnn_blocks=0).keys() == _layout(
        architecture="fno_vanilla", fno_cnn_blocks=9
    ).keys()


def test_size_knobs_shape_the_weights_and_n_does_not():
    layout = _layout(architecture="fno", fno_width=16, fno_modes=40, C_model=4, num_datasets=3)
    assert layout["model.generator.fno_blocks.0.spectral.weights"].shape == (16, 16, 40, 40)
    assert layout["model.generator.lifter.conv1.weight"].shape == (16, 4, 3, 3)
    assert all(layout[k].shape == (3,) for k in FORWARD_MODEL_KEYS)
    for architecture in FNO_ARCHITECTURES:  # the cores do not depend on the resolution
        small, large = _layout(architecture=architecture, N=64), _layout(architecture=architecture, N=256)
        assert {k: v.shape for k, v in small.items()} == {k: v.shape for k, v in large.items()}


def test_metadata_versions_of_instance_norms_are_written():
    """upstream's ffno model.pth records ``version: 2`` for its InstanceNorm2d modules (README 'Bundle layout')."""
    state_dict = make_perturbed_fno_network(architecture="ffno", fno_width=4, fno_modes=3, fno_blocks=1).state_dict()
    versions = {k: v.get("version") for k, v in state_dict._metadata.items()}
    assert versions["model.generator.ffno_stack.blocks.0.norm"] == 2
    assert versions["model.generator.lifter.conv1"] == 1


# ----------------------------------------------------------------------------------------------------------------
# Forward numerics against the float64 reference
# ----------------------------------------------------------------------------------------------------------------
SMALL = dict(fno_width=4, fno_blocks=2, fno_cnn_blocks=2)


def _check_against_reference(n: int = 64, batch: int = 2, **config) -> float:
    network = make_perturbed_fno_network(seed=5, N=n, **{**SMALL, **config})
    cfg = network.config
    x = _x(batch, cfg.C_model, n).numpy()
    factor = np.linspace(0.5, 1.5, batch, dtype=np.float32).reshape(batch, 1, 1, 1)
    out = _predict(network, x, factor).numpy()
    reference = _reference_forward(cfg, network.state_dict(), x, factor)
    assert out.dtype == np.complex64 and out.shape == (batch, cfg.C_model, n, n)
    scale = float(np.abs(reference).max())
    assert 0.05 < scale < 50  # a meaningful, non-saturated output
    error = _max_abs(out, reference)
    # float32 against float64 through ~10 layers and FFTs of 4096 points: a few ulp of the output's magnitude
    assert error <= 2e-5 * max(1.0, scale), (config, error, scale)
    return error


@pytest.mark.parametrize("architecture", FNO_ARCHITECTURES)
@pytest.mark.parametrize("output_mode", GENERATOR_OUTPUT_MODES)
@pytest.mark.parametrize("gridsize", [1, 2])
def test_forward_matches_reference_per_head(architecture, output_mode, gridsize):
    _check_against_reference(architecture=architecture, generator_output_mode=output_mode,
                             C_model=gridsize * gridsize, fno_modes=5)


@pytest.mark.parametrize("architecture", FNO_ARCHITECTURES)
@pytest.mark.parametrize("transform", FNO_INPUT_TRANSFORMS)
def test_forward_matches_reference_per_input_transform(architecture, transform):
    _check_against_reference(architecture=architecture, fno_input_transform=transform, C_model=4,
                             generator_output_mode="real_imag", fno_modes=5)


@pytest.mark.parametrize("architecture", FNO_ARCHITECTURES)
def test_forward_matches_reference_with_modes_beyond_the_spectrum(architecture):
    """``fno_modes`` larger than N/2+1 (and than N for the fno row cut): the weights exist, the kept bins stop."""
    _check_against_reference(architecture=architecture, fno_modes=70, fno_width=2, fno_blocks=1, batch=1)


@pytest.mark.parametrize("architecture", FNO_ARCHITECTURES)
def test_forward_matches_reference_at_n128(architecture):
    _check_against_reference(n=128, batch=1, architecture=architecture, C_model=4, fno_modes=12,
                             generator_output_mode="amp_phase", fno_input_transform="sqrt")


# ----------------------------------------------------------------------------------------------------------------
# Semantics: heads, transforms, scaling
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("architecture", FNO_ARCHITECTURES)
def test_output_proj_channel_layout(architecture):
    """Channel k < C of ``output_proj`` is the real part of object k, channel C+k its imaginary part."""
    network = make_perturbed_fno_network(architecture=architecture, C_model=4, fno_modes=3, **SMALL)
    with torch.no_grad():
        network.model.generator.output_proj.weight.zero_()
        network.model.generator.output_proj.bias.copy_(torch.arange(1.0, 9.0))
    out = _predict(network, _x(2, 4, 64))
    for k in range(4):
        assert torch.all(out[:, k] == complex(k + 1, k + 5))
    logits = PtychoFnoNetwork.from_state_dict(
        network.config.replace(generator_output_mode="amp_phase_logits"), network.state_dict()
    )
    out = _predict(logits, _x(2, 4, 64))
    for k in range(4):
        expected = torch.sigmoid(torch.tensor(k + 1.0)) * torch.exp(1j * math.pi * torch.tanh(torch.tensor(k + 5.0)))
        assert torch.allclose(out[:, k], expected.to(torch.complex64).expand_as(out[:, k]), atol=1e-6)


@pytest.mark.parametrize("output_mode", ["amp_phase", "amp_phase_logits"])
def test_amp_phase_heads_are_bounded(output_mode):
    network = make_perturbed_fno_network(architecture="fno", generator_output_mode=output_mode, C_model=4, fno_modes=4, **SMALL)
    out = _predict(network, 5 * _x(2, 4, 64))
    amplitude, phase = out.abs(), out.angle()
    assert amplitude.min() > 0 and amplitude.max() < 1
    assert phase.abs().max() <= math.pi + 1e-6
    assert amplitude.std() > 1e-3 and phase.std() > 1e-3


@pytest.mark.parametrize("transform", ["sqrt", "log1p"])
def test_sqrt_and_log1p_clamp_negative_input(transform):
    network = make_perturbed_fno_network(architecture="ffno", fno_input_transform=transform, fno_modes=4, **SMALL)
    x = _x(2, 1, 64) - 1.0  # about half negative
    assert torch.equal(_predict(network, x), _predict(network, torch.clamp(x, min=0)))
    plain = PtychoFnoNetwork.from_state_dict(network.config.replace(fno_input_transform="none"),
                                             network.state_dict())
    assert _max_abs(_predict(plain, x).numpy(), _predict(network, x).numpy()) > 1e-2


def test_instancenorm_transform_removes_the_input_scale():
    network = make_perturbed_fno_network(architecture="fno_vanilla", fno_input_transform="instancenorm", fno_modes=4, **SMALL)
    x = _x(2, 1, 64)
    assert _max_abs(_predict(network, x, 3.0).numpy(), _predict(network, x).numpy()) < 1e-5
    plain = PtychoFnoNetwork.from_state_dict(network.config.replace(fno_input_transform="none"),
                                             network.state_dict())
    assert _max_abs(_predict(plain, x, 3.0).numpy(), _predict(plain, x).numpy()) > 1e-2


def test_input_scale_factor_multiplies_the_input():
    network = make_perturbed_fno_network(architecture="ffno", fno_modes=4, **SMALL)
    x = _x(3, 1, 64)
    factor = torch.tensor([0.5, 1.0, 1.5]).reshape(3, 1, 1, 1)
    assert torch.equal(_predict(network, x, factor), _predict(network, x * factor))
    assert torch.equal(_predict(network, x), _predict(network, x, 1.0))
    assert not network.uses_fixed_input_scale


def test_trainable_scale_ignores_the_factor():
    base = make_perturbed_fno_network(architecture="fno", fno_modes=4, **SMALL)
    trained = PtychoFnoNetwork.from_state_dict(
        base.config.replace(intensity_scale_trainable=True, intensity_scale=2.5), base.state_dict()
    ).eval()
    assert trained.uses_fixed_input_scale
    x = _x(2, 1, 64)
    assert torch.equal(_predict(trained, x, 0.7), _predict(base, x, 2.5))
    one = PtychoFnoNetwork(base.config.replace(intensity_scale_trainable=True, intensity_scale=1.0))
    assert not one.uses_fixed_input_scale  # ln(1) = 0: upstream keeps the caller's factor


def test_train_and_eval_modes_agree():
    network = make_perturbed_fno_network(architecture="ffno", fno_input_transform="instancenorm", fno_modes=4, **SMALL)
    x = _x(2, 1, 64)
    evaluated = _predict(network, x)
    assert torch.equal(_predict(network.train(), x), evaluated)


def test_copies_keep_aliases_and_numbers():
    network = make_perturbed_fno_network(architecture="ffno", fno_modes=4, **SMALL)
    x = _x(1, 1, 64)
    for clone in (copy.deepcopy(network), pickle.loads(pickle.dumps(network))):
        assert clone.model.generator is clone.model.autoencoder
        assert clone.model.generator.blocks[1].shared_spectral is clone.model.generator.ffno_stack.shared_spectral
        assert torch.equal(_predict(clone, x), _predict(network, x))


@pytest.mark.parametrize("architecture", FNO_ARCHITECTURES)
@pytest.mark.parametrize("output_mode", GENERATOR_OUTPUT_MODES)
@pytest.mark.parametrize("gridsize", [1, 2])
def test_state_dict_round_trip_bit_for_bit(architecture, output_mode, gridsize):
    network = make_perturbed_fno_network(architecture=architecture, generator_output_mode=output_mode, C_model=gridsize ** 2,
                         fno_modes=6, fno_input_transform="log1p", **SMALL)
    buffer = io.BytesIO()
    torch.save(network.state_dict(), buffer)
    reread = torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)
    again = PtychoFnoNetwork.from_state_dict(network.config, reread).eval()
    original = network.state_dict()
    assert list(again.state_dict()) == list(original)
    for key, tensor in again.state_dict().items():
        assert tensor.dtype == original[key].dtype and le_bytes(tensor) == le_bytes(original[key]), key
    x = _x(2, gridsize ** 2, 64)
    assert torch.equal(_predict(again, x), _predict(network, x))


# ----------------------------------------------------------------------------------------------------------------
# Configuration: validation, bounds, metadata mapping
# ----------------------------------------------------------------------------------------------------------------
def test_neuralop_uno_is_refused_naming_its_package():
    with pytest.raises(UnsupportedBundleError, match="neuralop_uno.*neuraloperator"):
        FnoNetworkConfig(architecture="neuralop_uno")
    with pytest.raises(UnsupportedBundleError, match="neuralop_uno.*neuraloperator"):
        fno_config_from_metadata({"architecture": "neuralop_uno"}, {"N": 128, "C": 1})


@pytest.mark.parametrize("architecture", ["transformer", "FNO", "x" * 5000, 3])
def test_unknown_architectures_are_refused_naming_them(architecture):
    with pytest.raises(UnsupportedBundleError) as info:
        fno_config_from_metadata({"architecture": architecture}, {})
    message = str(info.value)
    assert repr(architecture)[:50] in message and len(message) < 600


def test_cnn_is_not_an_fno_config():
    with pytest.raises(ConfigMismatchError, match="CNN"):
        FnoNetworkConfig(architecture="cnn")


@pytest.mark.parametrize(
    "changes, error, pattern",
    [
        (dict(fno_input_transform="fourier"), UnsupportedBundleError, "fno_input_transform"),
        (dict(generator_output_mode="amp"), UnsupportedBundleError, "generator_output_mode"),
        (dict(mode="Supervised"), UnsupportedBundleError, "Supervised"),
        (dict(learned_input_channels=2), UnsupportedBundleError, "learned_input_channels"),
        (dict(fno_width=0), ConfigMismatchError, "fno_width"),
        (dict(fno_blocks=0), ConfigMismatchError, "fno_blocks"),
        (dict(fno_cnn_blocks=-1), ConfigMismatchError, "fno_cnn_blocks"),
        (dict(fno_modes=True), ConfigMismatchError, "fno_modes"),
        (dict(fno_width=12.0), ConfigMismatchError, "fno_width"),
        (dict(C_model="4"), ConfigMismatchError, "C_model"),
        (dict(N=96), ConfigMismatchError, "N=96"),
        (dict(intensity_scale_trainable=1), ConfigMismatchError, "intensity_scale_trainable"),
        (dict(intensity_scale_trainable=True, intensity_scale=0.0), ConfigMismatchError, "finite number > 0"),
        (dict(intensity_scale_trainable=True, intensity_scale=float("nan")), ConfigMismatchError, "finite"),
        (dict(intensity_scale="big"), ConfigMismatchError, "intensity_scale"),
        (dict(fno_blocks=10**9), UnsupportedBundleError, "fno_blocks=1000000000 exceeds"),
        (dict(fno_width=10**6), UnsupportedBundleError, "fno_width"),
        (dict(fno_modes=10**6), UnsupportedBundleError, "fno_modes"),
        (dict(C_model=90000), UnsupportedBundleError, "C_model"),
        (dict(num_datasets=10**12), UnsupportedBundleError, "num_datasets"),
    ],
)
def test_invalid_configs_get_typed_errors(changes, error, pattern):
    with pytest.raises(error, match=pattern):
        FnoNetworkConfig(**changes)


def test_largest_allowed_config_builds_on_meta_quickly():
    """The bounds keep a hostile metadata dict cheap: the largest network builds on the meta device (no memory)
    in well under a second per hundred blocks; its layout is what a fit check compares with the file's bytes."""
    limits = {k: FNO_CONFIG_LIMITS[k] for k in ("fno_blocks", "fno_cnn_blocks", "fno_width", "fno_modes")}
    start = time.perf_counter()
    for architecture in FNO_ARCHITECTURES:
        layout = _layout(architecture=architecture, **limits)
        assert all(t.device.type == "meta" for t in layout.values())
    assert time.perf_counter() - start < 30
    needed = sum(t.numel() * t.element_size() for t in layout.values())
    assert needed > 10**12  # terabytes if it were real: only the meta device may ever build it


def test_upstream_defaults_agree_with_the_metadata_tables():
    for key, value in UPSTREAM_FNO_DEFAULTS.items():
        table = DATA_CONFIG_DEFAULTS if key in ("N", "C") else MODEL_CONFIG_DEFAULTS
        assert table[key] == value, key
    cfg = fno_config_from_metadata({"architecture": "fno"}, {})
    assert (cfg.N, cfg.C_model, cfg.fno_width, cfg.fno_modes, cfg.fno_blocks, cfg.fno_cnn_blocks) == (
        64, 4, 32, 12, 4, 2
    )
    assert cfg.generator_output_mode == "real_imag" and cfg.fno_input_transform == "none"


def test_cnn_knobs_and_model_config_c_model_are_ignored():
    """The rebuilt core takes C from data_config; CNN knobs change nothing (README 'No effect, bitwise')."""
    plain = fno_config_from_metadata({"architecture": "ffno", "C_model": 1}, {"C": 4, "N": 64})
    noisy = fno_config_from_metadata(
        {"architecture": "ffno", "C_model": 9, "n_filters_scale": 1, "batch_norm": True, "cnn_output_mode":
         "real_imag", "amp_activation": "swish", "spectral_bottleneck_blocks": 2}, {"C": 4, "N": 64}
    )
    assert plain == noisy and plain.C_model == 4


def test_rectangular_physics_needs_the_real_imag_head():
    fno_config_from_metadata({"architecture": "fno", "physics_forward_mode": "rectangular_scaled"}, {})
    for mode in ("amp_phase", "amp_phase_logits"):
        with pytest.raises(ConfigMismatchError, match="rectangular_scaled"):
            fno_config_from_metadata({"architecture": "fno", "physics_forward_mode": "rectangular_scaled",
                                      "generator_output_mode": mode}, {})


def test_metadata_values_of_wrong_type_are_refused():
    with pytest.raises(ConfigMismatchError):
        fno_config_from_metadata({"architecture": "ffno", "fno_width": "32"}, {})
    with pytest.raises((ConfigMismatchError, UnsupportedBundleError)):
        fno_config_from_metadata({"architecture": "ffno", "fno_input_transform": ["none"]}, {})
    with pytest.raises(ConfigMismatchError):
        fno_config_from_metadata({"architecture": "ffno"}, {"N": 64.0})


@pytest.mark.parametrize(
    "config",
    [
        FnoNetworkConfig(),
        FnoNetworkConfig(architecture="fno", N=128, C_model=4, generator_output_mode="amp_phase",
                         fno_input_transform="sqrt", fno_width=16, fno_modes=20, fno_blocks=3, fno_cnn_blocks=0),
        FnoNetworkConfig(architecture="fno_vanilla", generator_output_mode="amp_phase_logits", num_datasets=2,
                         intensity_scale_trainable=True, intensity_scale=2.5, fno_input_transform="instancenorm"),
    ],
)
def test_model_config_fields_rebuild_the_same_config(config):
    fields = fno_model_config_fields(config)
    model_config = {**MODEL_CONFIG_DEFAULTS, **fields["model_config"]}
    data_config = {**DATA_CONFIG_DEFAULTS, **fields["data_config"]}
    assert set(model_config) == set(MODEL_CONFIG_DEFAULTS) and set(data_config) == set(DATA_CONFIG_DEFAULTS)
    assert fno_config_from_metadata(model_config, data_config) == config
    assert data_config["grid_size"] == (config.gridsize, config.gridsize)


def test_duck_interface_of_the_config():
    cfg = FnoNetworkConfig(architecture="fno", C_model=4, generator_output_mode="amp_phase_logits")
    assert (cfg.channels, cfg.gridsize, cfg.effective_output_mode) == (4, 2, "amp_phase_logits")
    assert cfg.replace(C_model=9).gridsize == 3
    network = PtychoFnoNetwork(cfg)
    assert network.input_channels == 4 and network.config is cfg
    assert "architecture=fno" in repr(network)
