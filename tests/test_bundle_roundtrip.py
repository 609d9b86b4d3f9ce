"""save_torch_bundle -> load_torch_bundle: bit-exact outputs for every §8.5 switch, upstream's member layout,
params.dill/model.pth/sentinel contents, path forms, atomic writes, metadata-free bundles (training-faithful and
legacy scaling) and the cross-checks between params.dill copies and the metadata."""

from __future__ import annotations

import io
import math
import pickle
import zipfile

import pytest
import torch

from mlflow_ptycho_flavor import load_torch_bundle, read_bundle, save_torch_bundle
from mlflow_ptycho_flavor.errors import ConfigMismatchError

BUILTIN_TYPES = (int, float, bool, str, type(None))


def _x(batch: int, channels: int, n: int, seed: int = 5) -> torch.Tensor:
    return 2 * torch.rand(batch, channels, n, n, generator=torch.Generator().manual_seed(seed))


def _factor(batch: int) -> torch.Tensor:
    return torch.linspace(0.6, 1.4, batch).reshape(batch, 1, 1, 1)


def _predict(net, x, factor):
    with torch.no_grad():
        return net(x, factor)


def _members(path) -> dict:
    with zipfile.ZipFile(path) as archive:
        return {name: archive.read(name) for name in archive.namelist()}


# ------------------------------------------------------------------------------------------------------------
# bit-exact round trips
# ------------------------------------------------------------------------------------------------------------
VARIANTS = {
    # N x gridsize grid
    "n64-gs1": dict(N=64, C_model=1),
    "n64-gs2": dict(N=64, C_model=4),
    "n128-gs1": dict(N=128, C_model=1),
    "n128-gs2": dict(N=128, C_model=4),
    "n64-gs1-s2": dict(N=64, C_model=1, n_filters_scale=2),
    # §8.5 switches (N=64, s=1)
    "batch_norm": dict(batch_norm=True),
    "cbam_bottleneck": dict(cbam_bottleneck=True),
    "no-cbam_encoder": dict(cbam_encoder=False),
    "no-cbam_encoder+eca": dict(cbam_encoder=False, eca_encoder=True),
    "decoder-attention-cbam": dict(cbam_decoder=True),
    "decoder-attention-eca": dict(eca_decoder=True),
    "decoder-attention-spatial-k5": dict(spatial_decoder=True, decoder_spatial_kernel=5),
    "shared-amp_phase-gs2": dict(use_shared_decoder=True, C_model=4),
    "shared-real_imag-gs2-bn": dict(use_shared_decoder=True, cnn_output_mode="real_imag", C_model=4,
                                    batch_norm=True),
    "shared-attention": dict(use_shared_decoder=True, cbam_decoder=True),
    "real_imag-separate-gs2": dict(cnn_output_mode="real_imag", C_model=4),
    "probe_big-false": dict(probe_big=False),
    "swish": dict(amp_activation="swish"),
    "object_big-false-gs2": dict(object_big=False, C_model=4),
    "legacy-override-gs1": dict(use_legacy_decoder_channel_override=True),
    "legacy-override-gs2-amp4-f0.25": dict(use_legacy_decoder_channel_override=True, C_model=4,
                                           decoder_last_amp_channels=4, decoder_last_c_outer_fraction=0.25),
    "legacy-override-shared-gs2": dict(use_legacy_decoder_channel_override=True, C_model=4, use_shared_decoder=True),
    "trainable-scale-2.5": dict(intensity_scale_trainable=True, intensity_scale=2.5),
    "supervised": dict(mode="Supervised"),
    "supervised-shared-bn": dict(mode="Supervised", use_shared_decoder=True, batch_norm=True),
    "num_datasets-3": dict(num_datasets=3),
}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_roundtrip_bit_exact(name, perturbed_network, tmp_path):
    config = {"N": 64, "n_filters_scale": 1, **VARIANTS[name]}
    net = perturbed_network(**config)
    c, n = net.config.channels, net.config.N
    x, f = _x(1, c, n), torch.full((1, 1, 1, 1), 0.8)
    before = _predict(net, x, f)
    assert torch.isfinite(torch.view_as_real(before)).all()

    path = save_torch_bundle(net, tmp_path / "wts.h5")
    loaded, params = load_torch_bundle(path, device="cpu")

    assert loaded.config == net.config
    assert not loaded.training
    assert list(loaded.state_dict()) == list(net.state_dict())
    for key, value in net.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    assert torch.equal(_predict(loaded, x, f), before)
    assert params["N"] == n and params["gridsize"] ** 2 == net.config.C_model
    assert params["model_type"] == ("pinn" if net.config.mode == "Unsupervised" else "supervised")


def test_roundtrip_through_dict_form_and_module_autoencoder(perturbed_network, tmp_path):
    """Upstream's dict form; an nn.Module autoencoder entry is saved as its state_dict."""
    net = perturbed_network(n_filters_scale=1)
    path = save_torch_bundle({"diffraction_to_obj": net, "autoencoder": {"_sentinel": "autoencoder"}}, tmp_path)
    assert path == tmp_path / "wts.h5.zip"
    loaded, _ = load_torch_bundle(path, device="cpu")
    x = _x(1, 1, 64)
    assert torch.equal(_predict(loaded, x, None), _predict(net, x, None))

    other = torch.nn.Linear(2, 3)
    path2 = save_torch_bundle({"diffraction_to_obj": net, "autoencoder": other}, tmp_path / "b" / "wts.h5")
    auto = torch.load(io.BytesIO(_members(path2)["autoencoder/model.pth"]), weights_only=True)
    assert set(auto) == {"weight", "bias"} and torch.equal(auto["weight"], other.weight.detach())


# ------------------------------------------------------------------------------------------------------------
# the bytes we write
# ------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def default_bundle(tmp_path_factory):
    """A bundle of the upstream default configuration (N=64, s=2, gs=1), written by us."""
    from mlflow_ptycho_flavor.network import NetworkConfig, PtychoPINNNetwork

    net = PtychoPINNNetwork(NetworkConfig()).eval()
    path = save_torch_bundle(net, tmp_path_factory.mktemp("default") / "wts.h5", intensity_scale=527.0)
    return path, _members(path)


@pytest.fixture(scope="module")
def upstream_members(upstream_dir):
    return _members(upstream_dir / "n64_g1_default" / "wts.h5.zip")


def test_member_names_match_upstream(default_bundle, upstream_members):
    _, members = default_bundle
    assert set(members) == set(upstream_members)
    assert set(members) == {
        "manifest.dill", "diffraction_to_obj/model.pth", "diffraction_to_obj/params.dill",
        "autoencoder/model.pth", "autoencoder/params.dill", "torch_scaling_metadata.pt",
    }
    with zipfile.ZipFile(default_bundle[0]) as archive:
        # torch files stored (float weights do not deflate; read straight from the file), pickles deflated as
        # upstream writes them; any zip reader takes both (docs/bundle-format.md §1.3)
        methods = {info.filename: info.compress_type for info in archive.infolist()}
        assert not any(info.is_dir() for info in archive.infolist())
    assert methods == {name: zipfile.ZIP_STORED if name.endswith((".pth", ".pt")) else zipfile.ZIP_DEFLATED
                       for name in methods}


def test_manifest(default_bundle):
    manifest = pickle.loads(default_bundle[1]["manifest.dill"])
    assert isinstance(manifest, dict)
    assert manifest["models"] == ["diffraction_to_obj", "autoencoder"]
    assert manifest["version"] == "2.0-pytorch"


def _walk_types(value) -> set:
    if isinstance(value, dict):
        return {type(value)} | {t for k, v in value.items() for t in _walk_types(k) | _walk_types(v)}
    if isinstance(value, (list, tuple)):
        return {type(value)} | {t for v in value for t in _walk_types(v)}
    return {type(value)}


def test_params_dill_builtins_and_upstream_keys(default_bundle, upstream_members):
    members = default_bundle[1]
    params = pickle.loads(members["diffraction_to_obj/params.dill"])
    upstream = pickle.loads(upstream_members["diffraction_to_obj/params.dill"])
    assert type(params) is dict
    assert _walk_types(params) <= {dict, *BUILTIN_TYPES}
    assert len(params) == 63
    assert set(params) == set(upstream)
    assert list(params) == list(upstream)
    assert params["intensity_scale"] == 527.0 and params["_version"] == "2.0-pytorch"
    assert members["diffraction_to_obj/params.dill"] == members["autoencoder/params.dill"]
    assert members["diffraction_to_obj/params.dill"][:2] == b"\x80\x04"  # dill's default protocol 4


def test_autoencoder_sentinel(default_bundle):
    sentinel = torch.load(io.BytesIO(default_bundle[1]["autoencoder/model.pth"]), weights_only=True)
    assert sentinel == {"_sentinel": "autoencoder"}


def test_model_pth_state_dict_matches_upstream_keys(default_bundle, upstream_members):
    members = default_bundle[1]
    assert members["diffraction_to_obj/model.pth"][:4] == b"PK\x03\x04"  # torch zip serialization
    ours = torch.load(io.BytesIO(members["diffraction_to_obj/model.pth"]), weights_only=True)
    theirs = torch.load(io.BytesIO(upstream_members["diffraction_to_obj/model.pth"]), weights_only=True)
    assert list(ours) == list(theirs)
    assert {k: (v.shape, v.dtype) for k, v in ours.items()} == {k: (v.shape, v.dtype) for k, v in theirs.items()}


def test_metadata_loads_weights_only(default_bundle):
    meta = torch.load(io.BytesIO(default_bundle[1]["torch_scaling_metadata.pt"]), weights_only=True)
    assert list(meta) == ["schema_version", "data_config", "model_config", "training_config", "inference_config",
                          "ci_statistics"]
    assert meta["schema_version"] == "ci-entrypoints-v1"
    assert meta["data_config"]["N"] == 64 and meta["model_config"]["C_model"] == 1
    assert meta["data_config"]["grid_size"] == (1, 1)


#: Fields the spec documents as "X/None" (§8.1): a fresh bundle may hold None where upstream's run held a value.
OPTIONAL_FIELDS = {
    "data_config": {"subsample_seed"},
    "model_config": {"max_hidden_channels", "resnet_width", "probe_mask_tensor", "probe_mask_diameter", "amp_loss",
                     "phase_loss"},
    "training_config": {"gradient_clip_val", "train_data_file", "test_data_file", "n_groups", "strategy"},
    "inference_config": {"patch_stats_limit"},
}


def test_metadata_layout_matches_upstream(default_bundle, upstream_members):
    """A fresh bundle's torch_scaling_metadata.pt has upstream's top-level keys, the four config dicts with exactly
    upstream's key order, and the same value types except None in documented optional fields."""
    ours = torch.load(io.BytesIO(default_bundle[1]["torch_scaling_metadata.pt"]), weights_only=True)
    theirs = torch.load(io.BytesIO(upstream_members["torch_scaling_metadata.pt"]), weights_only=True)
    assert list(ours) == list(theirs)
    for section, optional in OPTIONAL_FIELDS.items():
        assert list(ours[section]) == list(theirs[section]), section
        for key, value in theirs[section].items():
            mine = ours[section][key]
            if key in optional and None in (mine, value):
                continue
            assert type(mine) is type(value), (section, key, mine, value)
    # the values that decide the network are upstream's (both are the default N=64, s=2, gs=1 CNN)
    assert ours["model_config"] == theirs["model_config"]


def test_ci_statistics_recorded(perturbed_network, tmp_path):
    net = perturbed_network(n_filters_scale=1)
    stats = {"rms_input_scale": [1.5, 2.0], "mean_measured_intensity": [10.0, 12.0]}
    path = save_torch_bundle(net, tmp_path, ci_statistics=stats)
    assert read_bundle(path).metadata["ci_statistics"] == stats


def test_config_values_recorded_and_conflicts_refused(perturbed_network, tmp_path):
    net = perturbed_network(n_filters_scale=1)
    path = save_torch_bundle(net, tmp_path, config={"nphotons": 1e6, "nepochs": 7, "neighbor_count": 5})
    params = read_bundle(path).params
    assert (params["nphotons"], params["nepochs"], params["neighbor_count"]) == (1e6, 7, 5)
    with pytest.raises(ConfigMismatchError, match=r"config\['N'\]=128 conflicts"):
        save_torch_bundle(net, tmp_path / "other", config={"N": 128})
    assert not (tmp_path / "other").exists() and not (tmp_path / "other.zip").exists()


# ------------------------------------------------------------------------------------------------------------
# path forms and atomic writes
# ------------------------------------------------------------------------------------------------------------
def test_path_forms(perturbed_network, tmp_path):
    net = perturbed_network(n_filters_scale=1)
    out = tmp_path / "out"
    base = save_torch_bundle(net, out / "wts.h5")
    assert base == out / "wts.h5.zip" and base.is_file()
    assert sorted(p.name for p in out.iterdir()) == ["wts.h5.zip"]

    folder = tmp_path / "folder"
    folder.mkdir()
    in_dir = save_torch_bundle(net, folder)
    assert in_dir == folder / "wts.h5.zip" and in_dir.is_file()

    full = save_torch_bundle(net, tmp_path / "full" / "model.zip")
    assert full == tmp_path / "full" / "model.zip" and full.is_file()

    expected = net.state_dict()
    for given in (out / "wts.h5", out / "wts.h5.zip", out, str(out / "wts.h5"), folder, full):
        loaded, _ = load_torch_bundle(given, device="cpu")
        got = loaded.state_dict()
        assert list(got) == list(expected) and all(torch.equal(got[k], v) for k, v in expected.items()), given


def test_atomic_write_keeps_existing_bundle(perturbed_network, tmp_path, monkeypatch):
    old = perturbed_network(n_filters_scale=1, seed=1)
    new = perturbed_network(n_filters_scale=1, seed=2)
    path = save_torch_bundle(old, tmp_path / "wts.h5")
    original = path.read_bytes()

    real_writestr = zipfile.ZipFile.writestr
    calls = []

    def failing_writestr(self, *args, **kwargs):
        calls.append(args[0])
        if len(calls) == 3:
            raise OSError("disk full (simulated)")
        return real_writestr(self, *args, **kwargs)

    monkeypatch.setattr(zipfile.ZipFile, "writestr", failing_writestr)
    with pytest.raises(OSError, match="disk full"):
        save_torch_bundle(new, tmp_path / "wts.h5")
    monkeypatch.undo()

    assert len(calls) == 3  # the failure happened mid-way through the members
    assert path.read_bytes() == original
    assert sorted(p.name for p in tmp_path.iterdir()) == ["wts.h5.zip"]  # no temp file left behind
    loaded, _ = load_torch_bundle(path, device="cpu")
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in old.state_dict().items())


def test_atomic_write_failure_at_rename_leaves_nothing(perturbed_network, tmp_path, monkeypatch):
    import os

    net = perturbed_network(n_filters_scale=1)

    def failing_replace(*_args, **_kwargs):
        raise OSError("rename refused (simulated)")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="rename refused"):
        save_torch_bundle(net, tmp_path / "wts.h5")
    monkeypatch.undo()
    assert list(tmp_path.iterdir()) == []


def test_overwrite_replaces_bundle(perturbed_network, tmp_path):
    first = perturbed_network(n_filters_scale=1, seed=1)
    second = perturbed_network(n_filters_scale=1, seed=2, C_model=4)
    save_torch_bundle(first, tmp_path)
    save_torch_bundle(second, tmp_path)
    loaded, params = load_torch_bundle(tmp_path, device="cpu")
    assert loaded.config == second.config and params["gridsize"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["wts.h5.zip"]


# ------------------------------------------------------------------------------------------------------------
# bundles without torch_scaling_metadata.pt (pre-2026-07-09 upstream or direct save_torch_bundle calls)
# ------------------------------------------------------------------------------------------------------------
def _strip_metadata(rewrite_bundle, src, dst, params_update=None):
    members = _members(src)
    replace = {}
    if params_update:
        params = pickle.loads(members["diffraction_to_obj/params.dill"])
        params.update(params_update)
        raw = pickle.dumps(params, protocol=4)
        replace = {"diffraction_to_obj/params.dill": raw, "autoencoder/params.dill": raw}
    manifest = {"models": ["diffraction_to_obj", "autoencoder"], "version": "2.0-pytorch"}  # upstream's form
    return rewrite_bundle(src, dst, remove=["torch_scaling_metadata.pt"], replace=replace, manifest=manifest)


@pytest.mark.parametrize("c_model", [1, 4])
def test_metadata_free_bundle_is_training_faithful(perturbed_network, tmp_path, rewrite_bundle, c_model):
    """Built from params.dill with torch defaults for the torch-only knobs; the caller's factor is honoured even
    when params says intensity_scale.trainable (upstream's legacy quirk is opt-in)."""
    net = perturbed_network(n_filters_scale=1, C_model=c_model)
    saved = save_torch_bundle(net, tmp_path / "a")
    stripped = _strip_metadata(rewrite_bundle, saved, tmp_path / "b.zip",
                               {"intensity_scale.trainable": True, "intensity_scale": 527.3})
    contents = read_bundle(stripped)
    assert contents.metadata is None
    assert contents.network_config == net.config
    loaded, _ = load_torch_bundle(stripped, device="cpu")
    x, f = _x(2, c_model, 64), _factor(2)
    assert torch.equal(_predict(loaded, x, f), _predict(net, x, f))
    assert not torch.equal(_predict(loaded, x, f), _predict(loaded, x, 2 * f))


def test_metadata_free_bundle_legacy_scaling(perturbed_network, tmp_path, rewrite_bundle):
    """legacy_scaling=True with params intensity_scale.trainable: x * exp(float32(ln s)), the factor ignored."""
    scale = 527.3
    net = perturbed_network(n_filters_scale=1)
    saved = save_torch_bundle(net, tmp_path / "a")
    stripped = _strip_metadata(rewrite_bundle, saved, tmp_path / "b.zip",
                               {"intensity_scale.trainable": True, "intensity_scale": scale})
    loaded, _ = load_torch_bundle(stripped, device="cpu", legacy_scaling=True)
    assert loaded.uses_fixed_input_scale
    x = _x(2, 1, 64)
    e = torch.exp(torch.tensor(math.log(scale), dtype=torch.float32))
    assert abs(e.item() - scale) < 1e-3
    manual = _predict(net, x * e, None)
    assert torch.equal(_predict(loaded, x, _factor(2)), manual)
    assert torch.equal(_predict(loaded, x, 7 * _factor(2)), manual)

    # not trainable in params: legacy scaling honours the factor
    untrainable = _strip_metadata(rewrite_bundle, saved, tmp_path / "c.zip",
                                  {"intensity_scale.trainable": False, "intensity_scale": scale})
    loaded2, _ = load_torch_bundle(untrainable, device="cpu", legacy_scaling=True)
    assert torch.equal(_predict(loaded2, x, _factor(2)), _predict(net, x, _factor(2)))


def test_metadata_free_bundle_params_architecture(perturbed_network, tmp_path, rewrite_bundle):
    """object.big, probe.big, amp_activation and model_type come from params.dill."""
    net = perturbed_network(n_filters_scale=1, C_model=4, object_big=False, probe_big=False,
                            amp_activation="swish", mode="Supervised")
    saved = save_torch_bundle(net, tmp_path / "a")
    stripped = _strip_metadata(rewrite_bundle, saved, tmp_path / "b.zip")
    loaded, _ = load_torch_bundle(stripped, device="cpu")
    assert loaded.config == net.config
    x = _x(1, 1, 64)
    assert torch.equal(_predict(loaded, x, None), _predict(net, x, None))


# ------------------------------------------------------------------------------------------------------------
# params.dill cross-checks
# ------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_bundle(tmp_path_factory):
    from mlflow_ptycho_flavor.network import NetworkConfig, PtychoPINNNetwork

    path = save_torch_bundle(PtychoPINNNetwork(NetworkConfig(n_filters_scale=1)),
                             tmp_path_factory.mktemp("small") / "wts.h5")
    return path, pickle.loads(_members(path)["diffraction_to_obj/params.dill"])


@pytest.mark.parametrize(
    "update, message",
    [
        ({"N": 128}, r"params\.dill\['N'\]=128 disagrees with torch_scaling_metadata\.pt data_config\['N'\]=64"),
        ({"gridsize": 2}, r"params\.dill\['gridsize\*\*2'\]=4 disagrees"),
        ({"n_filters_scale": 2}, r"params\.dill\['n_filters_scale'\]=2 disagrees"),
        ({"object.big": False}, r"params\.dill\['object\.big'\]=False disagrees"),
        ({"probe.big": False}, r"params\.dill\['probe\.big'\]=False disagrees"),
        ({"amp_activation": "swish"}, r"params\.dill\['amp_activation'\]='swish' disagrees"),
        ({"model_type": "supervised"}, r"params\.dill\['model_type'\]='supervised' disagrees"),
    ],
)
def test_params_metadata_disagreement(small_bundle, tmp_path, rewrite_bundle, update, message):
    path, params = small_bundle
    raw = pickle.dumps({**params, **update}, protocol=4)
    bad = rewrite_bundle(path, tmp_path / "bad.zip", hashes="recompute",
                         replace={"diffraction_to_obj/params.dill": raw, "autoencoder/params.dill": raw})
    with pytest.raises(ConfigMismatchError, match=message):
        load_torch_bundle(bad, device="cpu")


def test_params_copies_differ(small_bundle, tmp_path, rewrite_bundle):
    path, params = small_bundle
    other = pickle.dumps({**params, "nphotons": 5.0}, protocol=4)
    bad = rewrite_bundle(path, tmp_path / "bad.zip", hashes="recompute", replace={"autoencoder/params.dill": other})
    with pytest.raises(ConfigMismatchError, match=r"autoencoder/params\.dill differs from diffraction_to_obj/params\.dill in keys \['nphotons'\]"):
        load_torch_bundle(bad, device="cpu")


def test_params_copies_equal_but_not_byte_identical_accepted(small_bundle, tmp_path, rewrite_bundle):
    """Equal dicts pickled differently (protocol 2 vs 4) are the same snapshot."""
    path, params = small_bundle
    bad = rewrite_bundle(path, tmp_path / "ok.zip", hashes="recompute",
                         replace={"autoencoder/params.dill": pickle.dumps(params, protocol=2)})
    _, loaded_params = load_torch_bundle(bad, device="cpu")
    assert loaded_params == params
