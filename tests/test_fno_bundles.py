"""FNO-family bundles end to end without MLflow: upstream's fixtures through ``load_torch_bundle`` (strict,
reproducing the recorded outputs, every key byte for byte), our own bundles (save -> load bit for bit for every
architecture x output mode x input transform x gridsize, upstream's member names and key layout, aliases stored
once), metadata-free bundles, ``PtychoTorchModel`` and ``inspect``, and the hostile-input rules for these weights
(complex dtypes and shapes, NaN/inf, disagreeing aliases, expanded views, oversized configurations, the
``neuraloperator`` variant, ``neuralop_uno``)."""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import pickle
import time
import zipfile

import numpy as np
import pytest
import torch

from fno_helpers import (
    FIXTURES,
    TOLERANCE,
    amplitudes,
    distinct_storages,
    expected_distinct,
    expected_keys,
    le_bytes,
    make_perturbed_fno_network,
    read_fixture,
)
from mlflow_ptycho_flavor import PtychoTorchModel, cli, load_torch_bundle, read_bundle, save_torch_bundle
from mlflow_ptycho_flavor.bundle import params as params_module
from mlflow_ptycho_flavor.bundle.metadata import network_config_from_metadata
from mlflow_ptycho_flavor.errors import (
    ConfigMismatchError,
    CorruptBundleError,
    StateDictMismatchError,
    UnsupportedBundleError,
)
from mlflow_ptycho_flavor.network import (
    FNO_ARCHITECTURES,
    FnoNetworkConfig,
    PtychoFnoNetwork,
    describe_architecture,
)
from mlflow_ptycho_flavor.network.fno_config import FNO_INPUT_TRANSFORMS, GENERATOR_OUTPUT_MODES

WEIGHTS = "diffraction_to_obj/model.pth"
METADATA = "torch_scaling_metadata.pt"
UPSTREAM_MEMBERS = [
    "manifest.dill",
    WEIGHTS,
    "diffraction_to_obj/params.dill",
    "autoencoder/model.pth",
    "autoencoder/params.dill",
    METADATA,
]


@pytest.fixture
def refuses(tmp_path):
    """``refuses(path, error, match)``: loading raises ``error`` with a bounded message matching ``match``, nothing
    new appears under tmp_path and the global config keeps upstream's defaults (nothing was restored)."""

    def check(path, error, match):
        before = sorted(tmp_path.rglob("*"))
        with pytest.raises(error, match=match) as info:
            load_torch_bundle(path, device="cpu")
        assert sorted(tmp_path.rglob("*")) == before
        assert params_module.cfg == params_module.LEGACY_DEFAULT_CFG
        assert len(str(info.value)) < 1200
        return info.value

    return check


def _predict(network, x, factor=None) -> np.ndarray:
    with torch.no_grad():
        out = network(torch.as_tensor(x), None if factor is None else torch.as_tensor(factor))
    return out.numpy()


def _max_abs(a, b) -> float:
    return float(np.abs(np.asarray(a) - np.asarray(b)).max())


def _torch_bytes(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _members(path) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as archive:
        return {name: archive.read(name) for name in archive.namelist()}


def _weights(path):
    return torch.load(io.BytesIO(_members(path)[WEIGHTS]), weights_only=True)


# ----------------------------------------------------------------------------------------------------------------
# Upstream fixtures through the loader
# ----------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module", params=FIXTURES)
def upstream(request):
    fixture = read_fixture(request.param)
    network, params = load_torch_bundle(fixture["bundle"], device="cpu")
    return {**fixture, "name": request.param, "network": network, "params": params}


def test_fixture_loads_strictly_and_reproduces_output(upstream):
    network, io_ = upstream["network"], upstream["io"]
    assert isinstance(network, PtychoFnoNetwork) and not network.training
    recorded = upstream["meta"]["config"]["pt_model_config"]
    assert network.config.architecture == recorded["architecture"]
    assert network.config.generator_output_mode == recorded["generator_output_mode"]
    out = _predict(network, io_["x"], io_["input_scale_factor"])
    assert out.dtype == np.complex64 and out.shape == io_["output"].shape
    assert _max_abs(out, io_["output"]) <= TOLERANCE


def test_fixture_every_key_reaches_the_model_unchanged(upstream):
    entries = upstream["meta"]["state_dict"]["entries"]
    state = upstream["network"].state_dict()
    assert list(state) == [e["key"] for e in entries]
    for entry in entries:
        tensor = state[entry["key"]]
        assert str(tensor.dtype) == f"torch.{entry['dtype']}" and list(tensor.shape) == entry["shape"]
        assert hashlib.sha256(le_bytes(tensor)).hexdigest() == entry["sha256_le_bytes"], entry["key"]


def test_fixture_contents_and_config001(upstream):
    contents = read_bundle(upstream["bundle"])
    assert isinstance(contents.network_config, FnoNetworkConfig)
    assert contents.network_config == upstream["network"].config
    assert len(contents.state_dict) == upstream["meta"]["state_dict"]["n_keys"]
    assert distinct_storages(contents.state_dict) == upstream["meta"]["state_dict"]["n_distinct_tensors"]
    # load_torch_bundle restored the snapshot (CONFIG-001), FNO keys included
    load_torch_bundle(upstream["bundle"], device="cpu")
    assert params_module.cfg["architecture"] == upstream["params"]["architecture"] == contents.network_config.architecture
    assert params_module.cfg["fno_width"] == 32


def test_fixture_summary_and_model_wrapper(upstream):
    summary = describe_architecture(upstream["network"].config)
    assert {k: summary[k] for k in ("architecture", "fno_width", "fno_modes", "fno_blocks", "fno_cnn_blocks")} == {
        "architecture": upstream["network"].config.architecture, "fno_width": 32, "fno_modes": 12,
        "fno_blocks": 4, "fno_cnn_blocks": 2,
    }
    assert "n_filters_scale" not in summary
    model = PtychoTorchModel.from_bundle(upstream["bundle"], device="cpu")
    io_ = upstream["io"]
    got = model.predict(io_["x"], io_["input_scale_factor"].reshape(-1), batch_size=2)
    assert _max_abs(got, io_["output"]) <= TOLERANCE
    # the CPU default is NHWC; the contiguous layout is the eager network's, bit for bit
    contiguous = PtychoTorchModel.from_bundle(upstream["bundle"], device="cpu", channels_last=False)
    eager = _predict(upstream["network"], io_["x"][:2], io_["input_scale_factor"][:2])
    assert np.array_equal(contiguous.predict(io_["x"][:2], io_["input_scale_factor"][:2].reshape(-1)), eager)
    assert _max_abs(got[:2], eager) <= 1e-5


def test_inspect_reports_the_operator(upstream, capsys):
    assert cli.main(["inspect", str(upstream["bundle"]), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    cfg = upstream["network"].config
    assert report["architecture"] == cfg.architecture and report["output_mode"] == cfg.generator_output_mode
    assert (report["fno_width"], report["fno_modes"], report["fno_blocks"], report["fno_cnn_blocks"]) == (32, 12, 4, 2)
    assert report["fno_input_transform"] == "none"
    assert report["state_dict keys"] == upstream["meta"]["state_dict"]["n_keys"]
    distinct = {t.untyped_storage().data_ptr(): t.numel() for t in upstream["state_dict"].values()}
    # a shared tensor is one parameter, however many keys name it
    assert report["parameters"] == sum(distinct.values()) == upstream["meta"]["state_dict"]["total_numel_distinct_tensors"]
    assert report["parameters"] < upstream["meta"]["state_dict"]["total_numel"]


def test_fixture_without_metadata_builds_from_params(upstream, tmp_path, rewrite_bundle):
    """§8.3: the snapshot holds architecture, fno_* and generator_output_mode (TensorFlow-side fields)."""
    path = rewrite_bundle(upstream["bundle"], tmp_path / "wts.h5.zip", remove=[METADATA])
    network, _ = load_torch_bundle(path, device="cpu")
    assert network.config == upstream["network"].config
    io_ = upstream["io"]
    assert np.array_equal(_predict(network, io_["x"], io_["input_scale_factor"]),
                          _predict(upstream["network"], io_["x"], io_["input_scale_factor"]))
    with pytest.raises(UnsupportedBundleError, match="legacy_scaling.*randomly initialised CNN"):
        read_bundle(path, legacy_scaling=True)


def test_fixture_resave_keeps_upstream_layout(upstream, tmp_path):
    """Our writer: upstream's member names and order, key order, one storage per shared tensor, module versions,
    and the metadata/params values upstream's rebuild reads; the re-saved bundle predicts bit for bit the same."""
    path = save_torch_bundle(upstream["network"], tmp_path / "wts.h5", intensity_scale=123.0)
    with zipfile.ZipFile(path) as ours, zipfile.ZipFile(upstream["bundle"]) as theirs:
        assert ours.namelist() == theirs.namelist() == UPSTREAM_MEMBERS
        our_size, their_size = ours.getinfo(WEIGHTS).file_size, theirs.getinfo(WEIGHTS).file_size
    assert abs(our_size - their_size) < 0.05 * their_size  # aliases stored once, as upstream's file
    ours_sd, theirs_sd = _weights(path), upstream["state_dict"]
    assert list(ours_sd) == list(theirs_sd)
    assert distinct_storages(ours_sd) == distinct_storages(theirs_sd)
    assert all(le_bytes(ours_sd[k]) == le_bytes(theirs_sd[k]) for k in theirs_sd)
    # module versions of every module owning a key (InstanceNorm: 'version': 2); upstream's file also lists
    # weightless modules (activations, its loss), which load_state_dict never consults for keys
    owners = {key.rsplit(".", 1)[0] for key in theirs_sd}
    assert {m: ours_sd._metadata[m] for m in owners} == {m: theirs_sd._metadata[m] for m in owners}
    assert 2 in {v.get("version") for v in ours_sd._metadata.values()} or "ffno" not in upstream["name"]
    members = _members(path)
    ours_meta = torch.load(io.BytesIO(members[METADATA]), weights_only=True)
    theirs_meta = upstream["metadata"]
    for section in ("model_config", "data_config", "training_config", "inference_config"):
        assert list(ours_meta[section]) == list(theirs_meta[section]), section  # upstream's field order
    for key in ("mode", "architecture", "fno_modes", "fno_width", "fno_blocks", "fno_cnn_blocks",
                "learned_input_channels", "fno_input_transform", "generator_output_mode",
                "intensity_scale_trainable", "num_datasets"):
        assert ours_meta["model_config"][key] == theirs_meta["model_config"][key], key
    for key in ("N", "C", "grid_size"):
        assert tuple(np.atleast_1d(ours_meta["data_config"][key])) == tuple(np.atleast_1d(theirs_meta["data_config"][key]))
    ours_params = pickle.loads(members["diffraction_to_obj/params.dill"])
    theirs_params = pickle.loads(_members(upstream["bundle"])["diffraction_to_obj/params.dill"])
    assert list(ours_params) == list(theirs_params)
    for key in ("N", "gridsize", "model_type", "architecture", "fno_modes", "fno_width", "fno_blocks",
                "fno_cnn_blocks", "learned_input_channels", "fno_input_transform", "generator_output_mode"):
        assert ours_params[key] == theirs_params[key], key
    reloaded, _ = load_torch_bundle(path, device="cpu")
    io_ = upstream["io"]
    assert np.array_equal(_predict(reloaded, io_["x"], io_["input_scale_factor"]),
                          _predict(upstream["network"], io_["x"], io_["input_scale_factor"]))


# ----------------------------------------------------------------------------------------------------------------
# Our bundles: the full matrix
# ----------------------------------------------------------------------------------------------------------------
MATRIX = list(itertools.product(FNO_ARCHITECTURES, GENERATOR_OUTPUT_MODES, FNO_INPUT_TRANSFORMS, (1, 2)))


@pytest.mark.parametrize("architecture, output_mode, transform, gridsize", MATRIX)
def test_save_load_round_trip_bit_for_bit(architecture, output_mode, transform, gridsize, tmp_path):
    # default width, blocks and refiners (so §8.6.4's key counts apply); few modes keep the files small
    network = make_perturbed_fno_network(seed=len(tmp_path.name), architecture=architecture,
                                         generator_output_mode=output_mode, fno_input_transform=transform,
                                         C_model=gridsize ** 2, fno_modes=3)
    path = save_torch_bundle(network, tmp_path / "wts.h5", config={"nphotons": 1e6})
    stored = _weights(path)
    assert len(stored) == expected_keys(architecture, output_mode)
    assert distinct_storages(stored) == expected_distinct(architecture, output_mode)
    assert _members(path).keys() == set(UPSTREAM_MEMBERS)
    loaded, params = load_torch_bundle(path, device="cpu")
    assert isinstance(loaded, PtychoFnoNetwork) and loaded.config == network.config
    assert params["architecture"] == architecture and params["gridsize"] == gridsize
    original = network.state_dict()
    assert list(loaded.state_dict()) == list(original)
    for key, tensor in loaded.state_dict().items():
        assert tensor.dtype == original[key].dtype and le_bytes(tensor) == le_bytes(original[key]), key
    x = amplitudes(2, gridsize ** 2)
    factor = np.array([0.7, 1.3], np.float32).reshape(2, 1, 1, 1)
    assert np.array_equal(_predict(loaded, x, factor), _predict(network, x, factor))


def test_metadata_we_write_rebuilds_the_network_as_upstream_reads_it(tmp_path):
    """Upstream's rebuild reads only model_config/data_config: resolving them alone gives the same config."""
    cfg = dict(architecture="fno", generator_output_mode="amp_phase_logits", fno_input_transform="sqrt",
               C_model=4, fno_width=8, fno_modes=20, fno_blocks=3, fno_cnn_blocks=1, num_datasets=2,
               intensity_scale_trainable=True, intensity_scale=2.5)
    network = make_perturbed_fno_network(**cfg)
    path = save_torch_bundle(network, tmp_path / "wts.h5")
    metadata = torch.load(io.BytesIO(_members(path)[METADATA]), weights_only=True)
    assert network_config_from_metadata(metadata) == network.config
    assert metadata["model_config"]["C_model"] == metadata["data_config"]["C"] == 4
    assert metadata["data_config"]["grid_size"] == (2, 2)
    loaded, _ = load_torch_bundle(path, device="cpu")
    assert loaded.uses_fixed_input_scale
    x = amplitudes(1, 4)
    assert np.array_equal(_predict(loaded, x, 0.3), _predict(network, x, 2.5))  # the factor is ignored


def test_metadata_free_bundle_of_ours_builds_from_params(tmp_path, rewrite_bundle):
    network = make_perturbed_fno_network(architecture="fno_vanilla", fno_input_transform="log1p", C_model=4,
                                         generator_output_mode="amp_phase", fno_width=6, fno_modes=5)
    path = save_torch_bundle(network, tmp_path / "wts.h5")
    stripped = rewrite_bundle(path, tmp_path / "stripped.zip", remove=[METADATA], hashes="recompute")
    loaded, _ = load_torch_bundle(stripped, device="cpu")
    assert loaded.config == network.config
    x = amplitudes(2, 4)
    assert np.array_equal(_predict(loaded, x), _predict(network, x))


def test_non_square_channel_count_cannot_be_saved(tmp_path):
    network = make_perturbed_fno_network(C_model=3, fno_width=4, fno_modes=3)
    with pytest.raises(ConfigMismatchError, match="not a square"):
        save_torch_bundle(network, tmp_path / "wts.h5")
    assert not list(tmp_path.iterdir())


# ----------------------------------------------------------------------------------------------------------------
# Hostile and inconsistent files
# ----------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_bundles(tmp_path_factory):
    """One small saved bundle per architecture (gridsize 2), with its network."""
    root = tmp_path_factory.mktemp("fno-small")
    made = {}
    for architecture in FNO_ARCHITECTURES:
        network = make_perturbed_fno_network(architecture=architecture, C_model=4, fno_width=6, fno_modes=4,
                                             fno_blocks=2, fno_cnn_blocks=1)
        made[architecture] = (save_torch_bundle(network, root / architecture / "wts.h5"), network)
    return made


def _with_weights(rewrite_bundle, src, dst, state_dict):
    return rewrite_bundle(src, dst, replace={WEIGHTS: _torch_bytes(state_dict)}, hashes="drop")


def _alias_keys(state_dict, key_suffix):
    """Every key naming the same tensor as ``model.generator.<key_suffix>`` (the loaded storages say which)."""
    first = state_dict[f"model.generator.{key_suffix}"]
    return [k for k, t in state_dict.items() if t.untyped_storage().data_ptr() == first.untyped_storage().data_ptr()]


def _replace_group(state_dict, key_suffix, tensor):
    """Put ``tensor`` under every alias key of one tensor (consistent aliases: only the value is hostile)."""
    edited = dict(state_dict)
    for key in _alias_keys(state_dict, key_suffix):
        edited[key] = tensor
    return edited


SPECTRAL = {"ffno": "ffno_stack.shared_spectral.weights_x", "fno": "fno_blocks.1.spectral.weights",
            "fno_vanilla": "blocks.0.spectral.weights"}


@pytest.mark.parametrize("architecture", FNO_ARCHITECTURES)
@pytest.mark.parametrize(
    "make, pattern",
    [
        (lambda t: t.to(torch.complex128), r"dtype torch.complex128, expected torch.complex64"),
        (lambda t: t.real.contiguous(), r"dtype torch.float32, expected torch.complex64"),
        (lambda t: t[:, :, :-1].contiguous(), r"has shape .*the configuration needs"),
    ],
    ids=["complex128", "real-part-only", "shape"],
)
def test_complex_weights_of_wrong_dtype_or_shape(small_bundles, rewrite_bundle, tmp_path, refuses, architecture,
                                                 make, pattern):
    path, _ = small_bundles[architecture]
    state = _weights(path)
    edited = _replace_group(state, SPECTRAL[architecture], make(state[f"model.generator.{SPECTRAL[architecture]}"]))
    refuses(_with_weights(rewrite_bundle, path, tmp_path / "wts.h5.zip", edited), StateDictMismatchError, pattern)


@pytest.mark.parametrize("architecture", FNO_ARCHITECTURES)
@pytest.mark.parametrize("part", ["real", "imag"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_complex_weights(small_bundles, rewrite_bundle, tmp_path, refuses, architecture, part, value):
    path, _ = small_bundles[architecture]
    state = _weights(path)
    bad = state[f"model.generator.{SPECTRAL[architecture]}"].clone()
    getattr(bad.view(-1)[3:4], part).fill_(value)
    edited = _replace_group(state, SPECTRAL[architecture], bad)
    refuses(_with_weights(rewrite_bundle, path, tmp_path / "wts.h5.zip", edited), CorruptBundleError,
            r"spectral\.weights.*holds 1 NaN or infinite value")


def test_non_finite_real_weights(small_bundles, rewrite_bundle, tmp_path, refuses):
    path, _ = small_bundles["ffno"]
    state = _weights(path)
    bad = state["model.generator.lifter.conv1.weight"].clone()
    bad.view(-1)[0] = float("nan")
    edited = _replace_group(state, "lifter.conv1.weight", bad)
    refuses(_with_weights(rewrite_bundle, path, tmp_path / "wts.h5.zip", edited), CorruptBundleError,
            r"lifter\.conv1\.weight.*NaN or infinite")


@pytest.mark.parametrize("architecture", FNO_ARCHITECTURES)
def test_disagreeing_aliases(small_bundles, rewrite_bundle, tmp_path, refuses, architecture):
    path, _ = small_bundles[architecture]
    state = _weights(path)
    key = f"model.autoencoder.{SPECTRAL[architecture]}"
    edited = dict(state)
    edited[key] = state[key].clone()
    edited[key].view(-1)[0] += 1
    refuses(_with_weights(rewrite_bundle, path, tmp_path / "wts.h5.zip", edited), StateDictMismatchError,
            r"name one tensor .* hold different values")


def test_equal_but_unshared_aliases_load(small_bundles, rewrite_bundle, tmp_path):
    """A writer that stores each alias separately (equal bytes) is accepted: only disagreement is refused."""
    path, network = small_bundles["ffno"]
    state = {k: v.clone() for k, v in _weights(path).items()}
    edited = _with_weights(rewrite_bundle, path, tmp_path / "wts.h5.zip", state)
    loaded, _ = load_torch_bundle(edited, device="cpu")
    x = amplitudes(1, 4)
    assert np.array_equal(_predict(loaded, x), _predict(network, x))


def test_expanded_views_cannot_pass_for_weights(small_bundles, rewrite_bundle, tmp_path, refuses):
    path, _ = small_bundles["fno"]
    state = _weights(path)
    scalars = {torch.float32: torch.zeros(1), torch.complex64: torch.zeros(1, dtype=torch.complex64)}
    edited = {k: scalars[v.dtype].expand(v.shape) if v.dim() else v for k, v in state.items()}
    refuses(_with_weights(rewrite_bundle, path, tmp_path / "wts.h5.zip", edited), StateDictMismatchError,
            r"expanded views")


def test_neuraloperator_spectral_layer_is_named(small_bundles, rewrite_bundle, tmp_path, refuses):
    """Bundles trained with neuraloperator's spectral layer have other keys (§8.6.6): named, not a bare diff."""
    path, _ = small_bundles["fno"]
    state = _weights(path)
    edited = {k.replace("spectral.weights", "spectral.weight.tensor"): v for k, v in state.items()}
    refuses(_with_weights(rewrite_bundle, path, tmp_path / "wts.h5.zip", edited), UnsupportedBundleError,
            r"neuraloperator")


def _with_model_config(rewrite_bundle, src, dst, **changes):
    """Edit the metadata's model_config; keys the params snapshot also holds are edited there too, so the
    snapshot cross-check (which runs first) lets the edited value reach the check under test."""
    members = _members(src)
    metadata = torch.load(io.BytesIO(members[METADATA]), weights_only=True)
    metadata["model_config"].update(changes)
    params = pickle.loads(members["diffraction_to_obj/params.dill"])
    params.update({k: v for k, v in changes.items() if k in params})
    raw = pickle.dumps(params, protocol=4)
    return rewrite_bundle(src, dst, hashes="drop", replace={
        METADATA: _torch_bytes(metadata), "diffraction_to_obj/params.dill": raw, "autoencoder/params.dill": raw})


@pytest.mark.parametrize(
    "changes, error, pattern",
    [
        (dict(architecture="neuralop_uno"), UnsupportedBundleError, r"'neuralop_uno'.*'neuraloperator'"),
        (dict(architecture="unet3d"), UnsupportedBundleError, r"'unet3d' is not an architecture"),
        (dict(fno_blocks=10**9), UnsupportedBundleError, r"fno_blocks=1000000000 exceeds"),
        (dict(fno_width=2048, fno_modes=1024), StateDictMismatchError, r"does not fit"),
        (dict(fno_width="6"), ConfigMismatchError, r"fno_width must be an int"),
        (dict(fno_input_transform="fft"), UnsupportedBundleError, r"fno_input_transform='fft'"),
        (dict(generator_output_mode="amp_phase"), StateDictMismatchError, r"missing keys"),
        (dict(learned_input_channels=2), UnsupportedBundleError, r"learned_input_channels=2"),
        (dict(mode="Supervised", loss_function="MAE"), ConfigMismatchError, r"torch_loss_mode"),
        (dict(physics_forward_mode="rectangular_scaled", generator_output_mode="amp_phase_logits"),
         ConfigMismatchError, r"rectangular_scaled' requires real/imag output"),
    ],
    ids=["uno", "unknown", "blocks-1e9", "huge-within-limits", "width-str", "transform", "head", "lic",
         "supervised", "rectangular-logits"],
)
def test_bad_fno_metadata(small_bundles, rewrite_bundle, tmp_path, refuses, changes, error, pattern):
    path, _ = small_bundles["ffno"]
    edited = _with_model_config(rewrite_bundle, path, tmp_path / "wts.h5.zip", **changes)
    start = time.perf_counter()
    refuses(edited, error, pattern)
    assert time.perf_counter() - start < 30  # decided on the meta device: nothing of the claimed size is built


def test_params_snapshot_must_agree_with_fno_metadata(small_bundles, rewrite_bundle, tmp_path, refuses):
    path, _ = small_bundles["ffno"]
    params = pickle.loads(_members(path)["diffraction_to_obj/params.dill"])
    raw = pickle.dumps({**params, "fno_width": 64}, protocol=4)
    edited = rewrite_bundle(path, tmp_path / "wts.h5.zip", hashes="drop",
                            replace={"diffraction_to_obj/params.dill": raw, "autoencoder/params.dill": raw})
    refuses(edited, ConfigMismatchError, r"params.dill\['fno_width'\]=64 disagrees .*model_config\['fno_width'\]=6")


def test_fno_weights_under_cnn_configuration_are_named(small_bundles, upstream_dir, rewrite_bundle, tmp_path,
                                                        refuses):
    path, _ = small_bundles["ffno"]
    cnn_bundle = upstream_dir / "n64_g1_default" / "wts.h5.zip"
    edited = rewrite_bundle(cnn_bundle, tmp_path / "wts.h5.zip", replace={WEIGHTS: _members(path)[WEIGHTS]})
    refuses(edited, StateDictMismatchError, r"neural-operator generator weights .*describes the CNN")


# ----------------------------------------------------------------------------------------------------------------
# Lightning checkpoints of FNO-family models
# ----------------------------------------------------------------------------------------------------------------
def _fno_checkpoint(path, network, generator_output: str):
    """A checkpoint shaped like upstream's training writes it (torch.save of the Lightning dict): the module's
    state_dict (aliases sharing storage, complex64 spectral weights) and the four configs plus the five extras."""
    from mlflow_ptycho_flavor.bundle.metadata import make_metadata

    snapshot = params_module.make_params_snapshot({"N": network.config.N, "gridsize": network.config.gridsize})
    configs = make_metadata(network.config, snapshot)
    hyper = {name: configs[name] for name in ("model_config", "data_config", "training_config", "inference_config")}
    hyper.update(generator_output=generator_output, generator_overrides={}, parity_scale_mode="off",
                 parity_fixed_delta=0.0, parity_init_scheme="default")
    torch.save({"epoch": 1, "global_step": 8, "pytorch-lightning_version": "2.6.6",
                "state_dict": network.state_dict(), "optimizer_states": [], "lr_schedulers": [],
                "hparams_name": "kwargs", "hyper_parameters": hyper}, path)
    return path


@pytest.mark.parametrize("architecture, output_mode, generator_output", [
    ("ffno", "real_imag", "real_imag"),          # what upstream's trainer records for this head
    ("ffno", "amp_phase_logits", "amp_phase"),   # Lightning's default
    ("fno", "amp_phase", "amp_phase"),
])
def test_fno_checkpoint_converts_exactly(tmp_path, architecture, output_mode, generator_output):
    from mlflow_ptycho_flavor.convert import convert_checkpoint

    network = make_perturbed_fno_network(architecture=architecture, generator_output_mode=output_mode, C_model=4,
                                         fno_width=6, fno_modes=4, fno_blocks=2, fno_cnn_blocks=1)
    ckpt = _fno_checkpoint(tmp_path / "last.ckpt", network, generator_output)
    bundle = convert_checkpoint(ckpt, tmp_path / "wts.h5.zip")
    stored = _weights(bundle)
    assert list(stored) == list(network.state_dict())
    assert distinct_storages(stored) == len({id(p) for p in network.state_dict(keep_vars=True).values()})
    loaded, _ = load_torch_bundle(bundle, device="cpu")
    assert loaded.config == network.config
    x = amplitudes(2, 4)
    assert np.array_equal(_predict(loaded, x), _predict(network, x))


def test_fno_checkpoint_with_a_foreign_generator_output_is_refused(tmp_path):
    from mlflow_ptycho_flavor.convert import convert_checkpoint
    from mlflow_ptycho_flavor.errors import UnsupportedCheckpointError

    network = make_perturbed_fno_network(architecture="fno", generator_output_mode="amp_phase", fno_width=6,
                                         fno_modes=4)
    ckpt = _fno_checkpoint(tmp_path / "last.ckpt", network, "real_imag")
    with pytest.raises(UnsupportedCheckpointError, match=r"generator_output'\]='real_imag' differs"):
        convert_checkpoint(ckpt, tmp_path / "wts.h5.zip")
    assert not (tmp_path / "wts.h5.zip").exists()
