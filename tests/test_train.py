"""The physics-informed trainer (``mlflow_ptycho_flavor.sim.train``): physics, learning, bundle, seeds, MLflow.

Everything runs on the CPU with ``n_filters_scale=1`` networks and small simulated scans; the one real training
run is shared (module fixture) by the learning and bundle tests.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from mlflow_ptycho_flavor.sim import dataset as data, metrics, physics, simulate, train
from mlflow_ptycho_flavor.bundle import load_torch_bundle
from mlflow_ptycho_flavor.model.inference import PtychoTorchModel

#: The shared training run. Measured ratios error_after / error_before on this compact scan, by simulation seed
#: (torch 2.13 CPU, one thread): 60 steps -> 0.27 (seed 1, used here), 0.48 (0), 0.40 (2), 0.58 (3);
#: 100 steps -> 0.25 (1), 0.44 (0). A broken forward model or scale convention gives ~1 whatever the seed.
LEARN_STEPS = 60
LEARN_BATCH = 8
LEARN_RATE = 2e-3
LEARN_SEED = 1


def _cfg(**overrides) -> train.TrainConfig:
    # One thread: reproducible across machines (reductions depend on the thread count) and several times
    # faster than oversubscribed OpenMP threads on a shared machine.
    base = dict(device="cpu", progress=False, n_filters_scale=1, num_threads=1)
    base.update(overrides)
    return train.TrainConfig(**base)


@pytest.fixture(scope="module")
def split() -> tuple[data.PtychoDataset, data.PtychoDataset]:
    """A compact scan (6 x 6 positions, 1 px apart): the held-out patterns see the same object as the training
    ones, which a network learns in tens of steps. Larger, sparser scans need a few hundred (demo --from-scratch trains 200)."""
    dataset = simulate.simulate_dataset(N=64, n_scan=(6, 6), step=1.0, nphotons=1e6, seed=LEARN_SEED)
    return data.train_test_split(dataset, test_fraction=0.2, seed=0)


@pytest.fixture(scope="module")
def trained(split) -> train.TrainResult:
    train_set, test_set = split
    config = _cfg(steps=LEARN_STEPS, batch_size=LEARN_BATCH, learning_rate=LEARN_RATE, seed=0)
    return train.train_model(train_set, config, test_dataset=test_set, mlflow_logging=False)


# ------------------------------------------------------------------------------------------------------------
# 1. The torch forward model is the simulator's
# ------------------------------------------------------------------------------------------------------------
def test_torch_forward_model_reproduces_the_simulators_noise_free_amplitudes():
    dataset = simulate.simulate_dataset(N=64, n_scan=(4, 4), poisson=False, seed=5)
    truth = dataset.ground_truth_patches
    expected = physics.predict_amplitudes(dataset, truth)  # float64, the simulator's exact model
    np.testing.assert_allclose(dataset.diff3d, expected, rtol=1e-6, atol=1e-6 * expected.max())

    got = physics.far_field_amplitudes(
        torch.from_numpy(truth), torch.from_numpy(dataset.probeGuess), dataset.photon_scale
    )
    assert got.dtype == torch.float32 and got.shape == truth.shape
    np.testing.assert_allclose(got.numpy(), expected, rtol=0, atol=2e-6 * expected.max())

    # The training physics (probe in normalized units, intensity_scale on both sides) maps the true patches
    # onto the loss's target amplitudes, and the Poisson loss of the truth is ~0 while a wrong object scores high.
    scaling = physics.compute_scaling(dataset)
    assert scaling.photon_scale_source == "dataset"
    assert scaling.intensity_scale == pytest.approx(math.sqrt(scaling.nphotons) / 32, rel=1e-9)
    assert scaling.nphotons == pytest.approx(1e6, rel=1e-6)  # the measured mean counts of noise-free data
    forward = physics.ForwardModel(dataset.probeGuess, scaling)
    target = forward.target_amplitudes(dataset.diff3d)
    pred = forward.amplitudes(torch.from_numpy(truth))
    np.testing.assert_allclose(
        pred.numpy(), scaling.target_factor * expected, rtol=0, atol=2e-6 * float(target.max())
    )
    counts = target.square()
    offset = train._poisson_offset(counts)
    at_truth = float(train._loss("poisson", forward.far_field(torch.from_numpy(truth)), target, counts, offset))
    wrong = torch.from_numpy(truth) * 0.8
    off_truth = float(train._loss("poisson", forward.far_field(wrong), target, counts, offset))
    assert abs(at_truth) < 1e-3 * off_truth

    with pytest.raises(ValueError, match="trailing"):
        physics.far_field_amplitudes(torch.from_numpy(truth[:, :32, :32]), torch.from_numpy(dataset.probeGuess))


def test_scaling_without_photon_scale_is_estimated_from_a_unit_modulus_object():
    dataset = simulate.simulate_dataset(N=64, n_scan=(3, 3), poisson=False, seed=2)
    bare = data.PtychoDataset(
        diff3d=dataset.diff3d, xcoords=dataset.xcoords, ycoords=dataset.ycoords, probeGuess=dataset.probeGuess
    )
    est = physics.compute_scaling(bare)
    exact = physics.compute_scaling(dataset)
    assert est.photon_scale_source == "estimated"
    assert est.normalization_factor == exact.normalization_factor
    assert est.intensity_scale == exact.intensity_scale
    counts = float(np.mean(np.sum(dataset.diff3d.astype(np.float64) ** 2, axis=(1, 2))))
    probe_energy = float(np.sum(np.abs(dataset.probeGuess.astype(np.complex128)) ** 2))
    assert est.photon_scale == pytest.approx(math.sqrt(counts / probe_energy), rel=1e-12)
    # An explicit photon budget rescales intensity_scale as in docs/bundle-format.md §2.4.
    assert physics.compute_scaling(dataset, nphotons=4e6).intensity_scale == pytest.approx(
        math.sqrt(4e6 / exact.nphotons) * exact.intensity_scale, rel=1e-12
    )


def test_reconstruction_error_removes_each_patterns_global_phase():
    rng = np.random.default_rng(0)
    truth = (rng.uniform(0.3, 1, (3, 64, 64)) * np.exp(1j * rng.uniform(-1, 1, (3, 64, 64)))).astype(np.complex64)
    shifted = truth * np.exp(1j * np.array([0.3, -2.0, 3.0]))[:, None, None]
    assert metrics.reconstruction_error(shifted, truth) == pytest.approx(0.0, abs=1e-6)
    assert metrics.reconstruction_error(shifted, truth, per_pattern=False) > 0.1
    assert metrics.reconstruction_error(np.zeros_like(truth), truth) == pytest.approx(1.0)
    # Only the central N/2 window counts by default.
    damaged = truth.copy()
    damaged[:, :8, :] = 0
    assert metrics.reconstruction_error(damaged, truth) == pytest.approx(0.0, abs=1e-6)
    assert metrics.reconstruction_error(damaged, truth, window="full") > 0.1
    assert metrics.reconstruction_error(torch.from_numpy(shifted), torch.from_numpy(truth)) < 1e-6
    with pytest.raises(ValueError, match="does not match"):
        metrics.reconstruction_error(truth[:2], truth)
    with pytest.raises(ValueError, match="zero inside the window"):
        metrics.reconstruction_error(truth, np.zeros_like(truth))
    with pytest.raises(ValueError, match="'center', 'full'"):
        metrics.reconstruction_error(truth, truth, window="middle")


# ------------------------------------------------------------------------------------------------------------
# 2. Training learns
# ------------------------------------------------------------------------------------------------------------
def test_training_halves_the_held_out_reconstruction_error(trained, split):
    _, test_set = split
    assert len(trained.loss_history) == LEARN_STEPS
    assert all(math.isfinite(v) for v in trained.loss_history)
    assert trained.error_before is not None and trained.error_after is not None
    assert trained.error_after <= 0.5 * trained.error_before, trained.summary()
    # error_after is the documented metric on the documented inference convention
    pred = train.predict_patches(trained.network, test_set)
    window = metrics.illuminated_window(test_set.probeGuess)
    assert 0.7 * window.size / 4 < window.sum() < window.size / 4  # the central square minus its dark corners
    assert metrics.reconstruction_error(pred, test_set.ground_truth_patches, window=window) == pytest.approx(
        trained.error_after
    )
    # Also clearly better than the uniform object of the right mean amplitude (an oracle baseline).
    truth = test_set.ground_truth_patches
    uniform = np.broadcast_to(np.abs(truth[:, window]).mean(axis=1)[:, None, None], truth.shape)
    assert trained.error_after < 0.8 * metrics.reconstruction_error(uniform, truth, window=window)
    assert not trained.network.training
    assert trained.n_train + trained.n_test == 36
    assert {"setup", "train", "total", "steps_per_second"} <= set(trained.timings)


# ------------------------------------------------------------------------------------------------------------
# 3. The bundle carries the trained network and its intensity_scale
# ------------------------------------------------------------------------------------------------------------
def test_trained_bundle_reloads_with_intensity_scale_and_identical_predictions(trained, split, tmp_path):
    _, test_set = split
    path = train.save_trained_bundle(trained, tmp_path / "wts.h5.zip")
    assert path == tmp_path / "wts.h5.zip" and trained.bundle_path == path
    network, params = load_torch_bundle(path, device="cpu")
    assert params["intensity_scale"] == trained.intensity_scale
    assert params["nphotons"] == trained.nphotons
    assert (params["N"], params["gridsize"], params["n_filters_scale"]) == (64, 1, 1)
    assert params["batch_size"] == LEARN_BATCH
    assert params["nepochs"] == math.ceil(LEARN_STEPS * LEARN_BATCH / trained.n_train)
    assert params["torch_loss_mode"] == "poisson" and params["intensity_scale.trainable"] is False
    assert not network.uses_fixed_input_scale  # the caller's factor is honoured, as in training

    # Documented convention: raw amplitudes, scale = normalization_factor of the data being reconstructed.
    factor = data.normalization_factor(test_set.diff3d)
    x = torch.from_numpy(test_set.diff3d[:, None])
    with torch.no_grad():
        expected = trained.network(x, factor)
        got = network(x, factor)
    assert torch.equal(got, expected)
    model = PtychoTorchModel(network=network, params=params)
    n = test_set.n_patterns  # one batch everywhere: CPU conv kernels may round differently per batch size
    assert np.array_equal(model.predict(test_set.diff3d, scale=factor, batch_size=n), expected.numpy())
    assert np.array_equal(model.predict(test_set.diff3d, normalize="dataset", batch_size=n), expected.numpy())
    assert np.array_equal(train.predict_patches(network, test_set)[:, None], expected.numpy())

    with pytest.raises(TypeError, match="TrainResult"):
        train.save_trained_bundle(network, tmp_path / "other.h5.zip")


# ------------------------------------------------------------------------------------------------------------
# 4. Seeded reproducibility
# ------------------------------------------------------------------------------------------------------------
def test_training_is_reproducible_for_a_fixed_seed(split):
    train_set, _ = split
    small = train_set.subset(range(12))
    threads = torch.get_num_threads()
    rng_before = torch.random.get_rng_state()
    runs = [train.train_model(small, _cfg(steps=3, batch_size=4, seed=s), mlflow_logging=False) for s in (7, 7, 8)]
    assert torch.equal(torch.random.get_rng_state(), rng_before)  # the caller's RNG is left alone
    assert torch.get_num_threads() == threads  # and so is its thread count
    assert runs[0].loss_history == runs[1].loss_history
    first, second = runs[0].network.state_dict(), runs[1].network.state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert runs[2].loss_history != runs[0].loss_history
    assert runs[0].error_before is None and runs[0].n_test == 0


def test_config_and_input_validation(split):
    train_set, _ = split
    with pytest.raises(ValueError, match="TrainConfig.steps must be a positive integer"):
        train.TrainConfig(steps=0)
    with pytest.raises(ValueError, match="TrainConfig.loss='l2' is not one of"):
        train.TrainConfig(loss="l2")
    with pytest.raises(ValueError, match="learning_rate must be a finite number > 0"):
        train.TrainConfig(learning_rate=float("nan"))
    with pytest.raises(ValueError, match="nphotons must be None or a finite number > 0"):
        train.TrainConfig(nphotons=-1.0)
    with pytest.raises(ValueError, match=r"N=64 patterns but TrainConfig.N=128"):
        train.train_model(train_set, _cfg(N=128, steps=1))
    with pytest.raises(TypeError, match="must be a PtychoDataset"):
        train.train_model(train_set.diff3d, _cfg(steps=1))
    with pytest.raises(ValueError, match="no MLflow run is active"):
        train.train_model(train_set, _cfg(steps=1), mlflow_logging=True)
    assert dataclasses.replace(train.TrainConfig.quick(seed=3), steps=2).steps == 2


# ------------------------------------------------------------------------------------------------------------
# 5. MLflow logging only into an active run
# ------------------------------------------------------------------------------------------------------------
def test_mlflow_logs_params_and_metrics_only_into_an_active_run(split, tmp_path, monkeypatch):
    import mlflow

    train_set, test_set = split
    small, small_test = train_set.subset(range(12)), test_set.subset(range(4))
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    monkeypatch.chdir(workdir)
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(var, raising=False)  # set_tracking_uri exports the URI; monkeypatch restores it
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    try:
        _check_mlflow_logging(mlflow, small, small_test, tmp_path, workdir)
    finally:
        while mlflow.active_run() is not None:
            mlflow.end_run()
        mlflow.set_tracking_uri(None)


def _check_mlflow_logging(mlflow, small, small_test, tmp_path: Path, workdir: Path) -> None:
    from mlflow import MlflowClient

    experiment = mlflow.create_experiment("train-test", artifact_location=(tmp_path / "artifacts").as_uri())
    config = _cfg(steps=3, batch_size=4, seed=1, log_every=2)
    with mlflow.start_run(experiment_id=experiment) as run:
        result = train.train_model(small, config, test_dataset=small_test)
    client = MlflowClient()
    logged = client.get_run(run.info.run_id).data
    assert logged.params["steps"] == "3" and logged.params["loss"] == "poisson"
    assert logged.params["batch_size"] == "4" and logged.params["nphotons"] == "None"
    assert float(logged.params["intensity_scale"]) == pytest.approx(result.intensity_scale)
    history = client.get_metric_history(run.info.run_id, "train_loss")
    assert [(m.step, m.value) for m in history] == [(0, result.loss_history[0]), (2, result.loss_history[2])]
    assert logged.metrics["error_before"] == pytest.approx(result.error_before)
    assert logged.metrics["error_after"] == pytest.approx(result.error_after)
    assert "train_seconds" in logged.metrics

    # Without an active run: nothing logged, no run started, no ./mlruns created.
    assert mlflow.active_run() is None
    train.train_model(small, config, test_dataset=small_test)
    assert mlflow.active_run() is None
    runs = client.search_runs([experiment, "0"])
    assert [r.info.run_id for r in runs] == [run.info.run_id]
    assert not (workdir / "mlruns").exists() and list(workdir.iterdir()) == []


# ------------------------------------------------------------------------------------------------------------
# 6. Learning-rate schedule and the overlap-consistency term
# ------------------------------------------------------------------------------------------------------------
def test_cosine_schedule_falls_from_the_peak_to_the_final_rate():
    config = train.TrainConfig(steps=101, learning_rate=1e-3, lr_schedule="cosine", final_learning_rate=1e-5)
    rates = [train.learning_rate_at(config, step) for step in range(config.steps)]
    assert rates[0] == pytest.approx(1e-3, rel=1e-12) and rates[-1] == pytest.approx(1e-5, rel=1e-12)
    assert rates[50] == pytest.approx(0.5 * (1e-3 + 1e-5), rel=1e-12)  # half-way down the half cosine
    assert all(later <= earlier for earlier, later in zip(rates, rates[1:]))
    constant = train.TrainConfig(steps=5, learning_rate=2e-3)
    assert {train.learning_rate_at(constant, step) for step in range(5)} == {2e-3}
    with pytest.raises(ValueError, match="lr_schedule='step' is not one of"):
        train.TrainConfig(lr_schedule="step")
    with pytest.raises(ValueError, match="final_learning_rate must be a finite number > 0"):
        train.TrainConfig(final_learning_rate=0.0)


def test_overlap_loss_is_zero_only_for_patches_that_agree_up_to_a_constant_phase():
    rng = np.random.default_rng(3)
    n = 16
    obj = torch.from_numpy(rng.normal(size=(40, 40)) + 1j * rng.normal(size=(40, 40))).to(torch.complex64)
    weight = torch.ones(n, n)
    # Patch a at object rows/cols 10.., patch b at (x, y) = (10 + 5, 10 - 3): scan offset (dx, dy) = (5, -3).
    a = obj[10:10 + n, 10:10 + n]
    b = obj[7:7 + n, 15:15 + n] * np.exp(1.3j)
    shifts = np.array([[5, -3]])
    same = train._overlap_loss(a[None], b[None], shifts, weight)
    assert abs(float(same)) < 1e-4 * float(torch.mean(a.abs() ** 2))
    # Wrong shift, or a different object under the overlap: clearly positive.
    assert float(train._overlap_loss(a[None], b[None], np.array([[4, -3]]), weight)) > 0.5
    other = torch.from_numpy(rng.normal(size=(n, n)) + 1j * rng.normal(size=(n, n))).to(torch.complex64)
    assert float(train._overlap_loss(a[None], other[None], shifts, weight)) > 0.5
    # By hand for one pixel of overlap: |a|^2 + |b|^2 - 2|a b*| = (|a| - |b|)^2.
    one_a = torch.zeros(2, 2, dtype=torch.complex64)
    one_b = torch.zeros(2, 2, dtype=torch.complex64)
    one_a[1, 1], one_b[0, 0] = 3.0, 1.0j
    value = train._overlap_loss(one_a[None], one_b[None], np.array([[1, 1]]), torch.ones(2, 2))
    assert float(value) == pytest.approx(4.0)


def test_overlap_training_is_seeded_and_refuses_scans_without_overlap(split):
    train_set, _ = split
    small = train_set.subset(range(12))
    runs = [train.train_model(small, _cfg(steps=3, batch_size=4, seed=2, overlap_weight=50.0), mlflow_logging=False)
            for _ in range(2)]
    assert runs[0].loss_history == runs[1].loss_history
    plain = train.train_model(small, _cfg(steps=3, batch_size=4, seed=2), mlflow_logging=False)
    assert plain.loss_history != runs[0].loss_history  # paired batches and the extra term change the run
    with pytest.raises(ValueError, match="batch_size must be even"):
        train.TrainConfig(overlap_weight=1.0, batch_size=5)
    with pytest.raises(ValueError, match="overlap_weight must be a finite number >= 0"):
        train.TrainConfig(overlap_weight=-1.0)
    sparse = simulate.simulate_dataset(N=64, n_scan=(1, 2), step=60.0, seed=0)
    with pytest.raises(ValueError, match="needs overlapping scan positions"):
        train.train_model(sparse, _cfg(steps=1, batch_size=2, overlap_weight=1.0), mlflow_logging=False)
