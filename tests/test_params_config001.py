"""CONFIG-001 both ways: loading a bundle restores its params snapshot into the legacy global ``params.cfg``
(every key, ``_version`` included; absent keys keep their values), while the network built from the bundle never
reads that global. Snapshot validation names the offending key."""

from __future__ import annotations

import pickle
import zipfile

import pytest
import torch

from mlflow_ptycho_flavor import load_torch_bundle, save_torch_bundle
from mlflow_ptycho_flavor.bundle import params as params_module
from mlflow_ptycho_flavor.errors import ConfigMismatchError
from mlflow_ptycho_flavor.bundle.params import (
    LEGACY_DEFAULT_CFG,
    cfg,
    make_params_snapshot,
    reset_cfg,
    restore_params,
    validate_params_snapshot,
)


def _x(batch, channels, n=64):
    return 2 * torch.rand(batch, channels, n, n, generator=torch.Generator().manual_seed(9))


def _predict(net, x):
    with torch.no_grad():
        return net(x, torch.ones(x.shape[0], 1, 1, 1))


@pytest.fixture(scope="module")
def default_fixture(upstream_dir):
    return upstream_dir / "n64_g1_default" / "wts.h5.zip"


@pytest.fixture(scope="module")
def gridsize2_bundle(tmp_path_factory, perturbed_network):
    net = perturbed_network(n_filters_scale=1, C_model=4)
    path = save_torch_bundle(net, tmp_path_factory.mktemp("gs2") / "wts.h5")
    return path, net


def test_autouse_fixture_starts_from_legacy_defaults():
    assert cfg == LEGACY_DEFAULT_CFG
    assert (cfg["N"], cfg["gridsize"]) == (128, 2)


def test_restore_params_copies_every_key_including_version():
    snapshot = make_params_snapshot({"N": 64, "gridsize": 1, "nphotons": 1e6, "custom_key": "kept"},
                                    intensity_scale=3.5)
    result = restore_params(snapshot)
    assert result is cfg  # the global itself is updated, not a copy
    for key, value in snapshot.items():
        assert cfg[key] == value, key
    assert cfg["_version"] == "2.0-pytorch"
    assert cfg["intensity_scale"] == 3.5 and cfg["custom_key"] == "kept"


def test_restore_params_keeps_absent_keys():
    cfg["offset"] = 11  # a previous value, not from DEFAULT_CFG
    restore_params({"N": 64, "gridsize": 1})
    assert cfg["offset"] == 11
    assert cfg["big_gridsize"] == LEGACY_DEFAULT_CFG["big_gridsize"]
    assert cfg["probe_scale"] == LEGACY_DEFAULT_CFG["probe_scale"]
    assert (cfg["N"], cfg["gridsize"]) == (64, 1)
    assert set(cfg) == set(LEGACY_DEFAULT_CFG)  # nothing added that the snapshot lacks


def test_restore_params_is_all_or_nothing():
    before = dict(cfg)
    with pytest.raises(ConfigMismatchError, match=r"\['gridsize'\] must be int"):
        restore_params({"N": 64, "gridsize": "1", "nphotons": 5.0})
    assert cfg == before


def test_reset_cfg_restores_defaults():
    cfg.update(N=256, gridsize=3, extra=1)
    reset_cfg()
    assert cfg == LEGACY_DEFAULT_CFG


def test_load_restores_bundle_params(default_fixture):
    _, params = load_torch_bundle(default_fixture, device="cpu")
    assert (cfg["N"], cfg["gridsize"]) == (64, 1)
    assert cfg["_version"] == "2.0-pytorch"
    assert cfg["neighbor_count"] == 4 and cfg["n_filters_scale"] == 2
    assert all(cfg[k] == v for k, v in params.items())
    # keys the bundle lacks keep DEFAULT_CFG's values
    assert cfg["offset"] == LEGACY_DEFAULT_CFG["offset"] and cfg["size"] == LEGACY_DEFAULT_CFG["size"]


def test_load_without_restore_leaves_global_untouched(default_fixture):
    net, params = load_torch_bundle(default_fixture, device="cpu", restore_params=False)
    assert cfg == LEGACY_DEFAULT_CFG
    assert (cfg["N"], cfg["gridsize"]) == (128, 2)
    assert params["N"] == 64 and net.config.N == 64


def test_returned_params_are_a_copy(default_fixture):
    _, params = load_torch_bundle(default_fixture, device="cpu")
    params["N"] = 999
    assert cfg["N"] == 64


def test_loaded_network_ignores_later_global_changes(default_fixture):
    net, _ = load_torch_bundle(default_fixture, device="cpu")
    x = _x(1, 1)
    before = _predict(net, x)
    cfg["N"] = 256
    cfg["gridsize"] = 3
    cfg["n_filters_scale"] = 1
    cfg["object.big"] = False
    assert torch.equal(_predict(net, x), before)


@pytest.mark.parametrize("restore", [True, False])
def test_gridsize2_bundle_loads_regardless_of_global(gridsize2_bundle, restore):
    path, original = gridsize2_bundle
    cfg.update(N=256, gridsize=1, n_filters_scale=3)  # stale, conflicting global
    net, params = load_torch_bundle(path, device="cpu", restore_params=restore)
    assert params["gridsize"] == 2 and net.config.C_model == 4
    assert cfg["gridsize"] == (2 if restore else 1)
    x = _x(1, 4)
    out = _predict(net, x)
    assert out.shape == (1, 4, 64, 64)
    assert torch.equal(out, _predict(original, x))


def test_loading_two_bundles_in_turn_updates_global(gridsize2_bundle, default_fixture):
    load_torch_bundle(gridsize2_bundle[0], device="cpu")
    assert (cfg["N"], cfg["gridsize"], cfg["n_filters_scale"]) == (64, 2, 1)
    load_torch_bundle(default_fixture, device="cpu")
    assert (cfg["N"], cfg["gridsize"], cfg["n_filters_scale"]) == (64, 1, 2)


# ------------------------------------------------------------------------------------------------------------
# validation of a snapshot
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "snapshot, message",
    [
        ({"gridsize": 1}, r"lacks the required key 'N'"),
        ({"N": 64}, r"lacks the required key 'gridsize'"),
        ({"N": "64", "gridsize": 1}, r"\['N'\] must be int, got str '64'"),
        ({"N": 64.0, "gridsize": 1}, r"\['N'\] must be int, got float"),
        ({"N": 64, "gridsize": True}, r"\['gridsize'\] must be int, got bool True"),
        ({"N": 100, "gridsize": 1}, r"\['N'\] = 100 is not a supported patch size"),
        ({"N": 64, "gridsize": 0}, r"\['gridsize'\] must be >= 1"),
        ({"N": 64, "gridsize": 1, "n_filters_scale": 0}, r"\['n_filters_scale'\] must be >= 1"),
        ({"N": 64, "gridsize": 1, "object.big": 1}, r"\['object\.big'\] must be bool"),
        ({"N": 64, "gridsize": 1, "amp_activation": None}, r"\['amp_activation'\] must be str"),
        ({"N": 64, "gridsize": 1, "intensity_scale": float("nan")}, r"\['intensity_scale'\] must be a finite number"),
        ([("N", 64)], r"must hold a dict"),
    ],
)
def test_validate_snapshot_names_the_key(snapshot, message):
    with pytest.raises(ConfigMismatchError, match=message):
        validate_params_snapshot(snapshot)
    before = dict(cfg)
    with pytest.raises(ConfigMismatchError, match=message):
        restore_params(snapshot)
    assert cfg == before


def test_bundle_with_invalid_snapshot_refused_and_global_untouched(tmp_path, rewrite_bundle, gridsize2_bundle):
    path, _ = gridsize2_bundle
    with zipfile.ZipFile(path) as archive:
        params = pickle.loads(archive.read("diffraction_to_obj/params.dill"))
    for update, message in (({"N": "64"}, r"diffraction_to_obj/params\.dill\['N'\] must be int"),
                            ({"gridsize": True}, r"\['gridsize'\] must be int")):
        raw = pickle.dumps({**params, **update}, protocol=4)
        bad = rewrite_bundle(path, tmp_path / "bad.zip", hashes="recompute",
                             replace={"diffraction_to_obj/params.dill": raw, "autoencoder/params.dill": raw})
        with pytest.raises(ConfigMismatchError, match=message):
            load_torch_bundle(bad, device="cpu")
        assert cfg == LEGACY_DEFAULT_CFG
    missing = {k: v for k, v in params.items() if k != "N"}
    raw = pickle.dumps(missing, protocol=4)
    bad = rewrite_bundle(path, tmp_path / "bad2.zip", hashes="recompute",
                         replace={"diffraction_to_obj/params.dill": raw, "autoencoder/params.dill": raw})
    with pytest.raises(ConfigMismatchError, match=r"lacks the required key 'N'"):
        load_torch_bundle(bad, device="cpu")
    assert cfg == LEGACY_DEFAULT_CFG


def test_make_params_snapshot_has_upstream_key_set():
    snapshot = make_params_snapshot()
    assert len(snapshot) == 63
    assert list(snapshot)[-2:] == ["intensity_scale", "_version"]
    assert snapshot["intensity_scale"] == 1.0
    assert (snapshot["N"], snapshot["gridsize"]) == (64, 1)
    assert params_module.BUNDLE_PARAM_DEFAULTS["intensity_scale.trainable"] is True
