"""CONFIG-001 on the data path: grouping reads the global params.cfg, so it only works after the restore."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mlflow_ptycho_flavor import load_torch_bundle, restore_params, save_torch_bundle
from mlflow_ptycho_flavor.bundle import params
from mlflow_ptycho_flavor.errors import ConfigMismatchError, PredictionInputError
from mlflow_ptycho_flavor.model.grouping import group_patterns
from mlflow_ptycho_flavor.model.inference import PtychoTorchModel


def _scan(count: int, N: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    side = int(np.ceil(np.sqrt(count)))
    grid = np.stack(np.meshgrid(np.arange(side), np.arange(side)), -1).reshape(-1, 2)[:count] * (N / 4.0)
    coords = grid + rng.uniform(-1, 1, grid.shape)
    patterns = rng.uniform(0, 2, (count, N, N)).astype(np.float32)
    return patterns, coords[:, 0], coords[:, 1]


@pytest.fixture()
def gs2_bundle(tmp_path, perturbed_network):
    network = perturbed_network(seed=3, N=64, C_model=4, n_filters_scale=1)
    return save_torch_bundle(network, tmp_path / "wts.h5"), network


def test_grouping_with_restored_config_feeds_the_gridsize2_network(gs2_bundle):
    path, reference = gs2_bundle
    network, snapshot = load_torch_bundle(path, device="cpu")  # restores N=64, gridsize=2
    assert (params.cfg["N"], params.cfg["gridsize"]) == (64, 2)
    patterns, x, y = _scan(12, 64)
    groups = group_patterns(patterns, x, y)
    assert groups.diffraction.shape == (12, 4, 64, 64)
    assert groups.positions.shape == (12, 4, 2)
    np.testing.assert_array_equal(groups.indices[:, 0], np.arange(12))  # each group seeded by its own pattern
    distances = np.linalg.norm(groups.positions - groups.positions[:, :1], axis=-1)
    assert np.all(np.diff(distances, axis=1) >= 0)  # neighbours in order of distance
    model = PtychoTorchModel(network=network, params=snapshot)
    out = model.predict(groups.diffraction)
    with torch.inference_mode():
        expected = reference(torch.from_numpy(groups.diffraction), None).numpy()
    np.testing.assert_array_equal(out, expected)


def test_skipped_restore_gives_the_n_shape_error(gs2_bundle):
    path, _ = gs2_bundle
    load_torch_bundle(path, device="cpu", restore_params=False)
    assert params.cfg["N"] == 128  # upstream's DEFAULT_CFG is still in place
    patterns, x, y = _scan(12, 64)
    with pytest.raises(ConfigMismatchError, match=r"params.cfg\['N'\] = 128.*CONFIG-001"):
        group_patterns(patterns, x, y)


def test_stale_gridsize_gives_the_channel_mismatch_error(upstream_dir, gs2_bundle):
    path, _ = gs2_bundle
    network, snapshot = load_torch_bundle(path, device="cpu", restore_params=False)
    # The global holds another model's snapshot (N=64, gridsize=1): grouping yields one channel per pattern.
    restore_params({**snapshot, "gridsize": 1})
    patterns, x, y = _scan(12, 64)
    groups = group_patterns(patterns, x, y)
    assert groups.diffraction.shape == (12, 1, 64, 64)
    model = PtychoTorchModel(network=network, params=snapshot)
    with pytest.raises(PredictionInputError, match=r"1 channel\(s\) but this model takes C=4"):
        model.predict(groups.diffraction)
    restore_params(snapshot)
    assert model.predict(group_patterns(patterns, x, y).diffraction).shape == (12, 4, 64, 64)


def test_upstream_fixture_restore_both_ways(upstream_dir):
    bundle = upstream_dir / "n64_g1_default" / "wts.h5.zip"
    patterns, x, y = _scan(5, 64)
    load_torch_bundle(bundle, device="cpu", restore_params=False)
    with pytest.raises(ConfigMismatchError, match="Restore the bundle's params"):
        group_patterns(patterns, x, y)
    load_torch_bundle(bundle, device="cpu")
    assert group_patterns(patterns, x, y).diffraction.shape == (5, 1, 64, 64)


def test_too_few_patterns_for_a_group_is_a_config_error():
    patterns, x, y = _scan(3, 64)
    with pytest.raises(ConfigMismatchError, match="groups of 4 patterns"):
        group_patterns(patterns, x, y, config={"N": 64, "gridsize": 2})
