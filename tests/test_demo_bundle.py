"""The bundle shipped for ``ptycho-flavor demo`` (mlflow_ptycho_flavor/sim/demo_bundle/, written by
scripts/train_demo_bundle.py): it loads strictly, matches its record, reproduces the prediction recorded when it was
trained, and reconstructs the demo's fresh scan as well as its record says."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mlflow_ptycho_flavor.bundle import load_torch_bundle
from mlflow_ptycho_flavor.demo import reconstruct_scan
from mlflow_ptycho_flavor.errors import InvalidArgumentError
from mlflow_ptycho_flavor.model.inference import PtychoTorchModel
from mlflow_ptycho_flavor.sim.demo_model import (
    DEMO_SIMULATION,
    TRAINING_SCAN,
    shipped_bundle_path,
    shipped_bundle_record,
    simulate_demo_scan,
)
from mlflow_ptycho_flavor.sim.train import predict_patches

REFERENCE = Path(__file__).resolve().parent / "data" / "demo_bundle" / "reference.npz"

#: Recorded outputs are compared with this absolute tolerance (outputs are complex numbers of modulus ~0.3-1). The
#: reference was computed by another process, maybe on another CPU: float32 convolution kernels differ by ~1e-7
#: relative per operation with the instruction set and blocking, which stays ~1e-6 after the network's ~30 layers
#: (1 and 2 threads here agree exactly). 1e-4 leaves margin for that while any change of weights, scaling or
#: architecture moves outputs by 1e-2 or more.
RECORDED_OUTPUT_ATOL = 1e-4
#: The issue's goals for the demo's stitched object.
GOAL_ERROR = 0.10
GOAL_PHASE_CORRELATION = 0.8


@pytest.fixture(scope="module")
def shipped():
    network, params = load_torch_bundle(shipped_bundle_path(), device="cpu")
    return network, params


def test_shipped_bundle_is_small_loads_strictly_and_matches_its_record(shipped):
    network, params = shipped
    record = shipped_bundle_record()
    path = shipped_bundle_path()
    assert hashlib.sha256(path.read_bytes()).hexdigest() == record["bundle_sha256"]
    assert path.stat().st_size == record["bundle_bytes"] < 3_000_000
    assert params["N"] == DEMO_SIMULATION["N"] == 64
    assert params["gridsize"] == 1 and params["n_filters_scale"] == 1 and params["model_type"] == "pinn"
    assert sum(p.numel() for p in network.parameters()) < 700_000
    # The record describes this recipe (what the demo simulates with), and its figures meet the goals.
    assert record["simulation"] == DEMO_SIMULATION
    assert record["training_scan"]["seed"] == TRAINING_SCAN["seed"]
    assert record["train_config"]["steps"] == len(record["loss_curve"]["loss"]) * 10
    figures = record["demo_scan_figures"]
    assert figures["stitched_object_error"] <= GOAL_ERROR
    assert figures["phase_correlation"] >= GOAL_PHASE_CORRELATION
    json.dumps(record)  # plain JSON all the way down


def test_shipped_bundle_reproduces_its_recorded_prediction(shipped):
    network, params = shipped
    with np.load(REFERENCE) as reference:
        diffraction, factor, expected = reference["diffraction"], float(reference["factor"]), reference["output"]
    assert diffraction.dtype == np.float32 and expected.dtype == np.complex64 and expected.shape == diffraction.shape
    with torch.no_grad():
        direct = predict_patches(network, diffraction, factor)
    np.testing.assert_allclose(direct, expected, rtol=0, atol=RECORDED_OUTPUT_ATOL)
    # The inference wrapper (what pyfunc runs) gives the same numbers as the bare network in this process.
    wrapped = PtychoTorchModel(network=network, params=params).predict(diffraction[:, None], factor)
    np.testing.assert_array_equal(wrapped[:, 0], direct)
    # The recorded inputs are the demo's default scan's first patterns (regenerated here, same seed).
    scan = simulate_demo_scan(seed=0)
    np.testing.assert_allclose(scan.diff3d[: len(diffraction)], diffraction, rtol=1e-6)


def test_shipped_bundle_reconstructs_the_demo_scan_as_recorded(shipped):
    network, _ = shipped
    scan = simulate_demo_scan(seed=0)
    with torch.no_grad():
        patches = predict_patches(network, scan)
    scored = reconstruct_scan(patches, scan)
    figures = shipped_bundle_record()["demo_scan_figures"]
    # Same code, same inputs; only float32 kernel rounding differs from the recording process.
    assert scored.error == pytest.approx(figures["stitched_object_error"], abs=2e-3)
    assert scored.phase_correlation == pytest.approx(figures["phase_correlation"], abs=2e-3)
    assert scored.error <= GOAL_ERROR and scored.phase_correlation >= GOAL_PHASE_CORRELATION


def test_demo_scan_never_reuses_the_training_object():
    with pytest.raises(InvalidArgumentError, match="the shipped demo bundle was trained on"):
        simulate_demo_scan(seed=TRAINING_SCAN["seed"])
