"""An FNO-family model through MLflow: upstream's ``ffno`` fixture (the architecture of upstream's CI gate) logged as
it is, then pyfunc in this process, a real ``mlflow models serve`` on loopback, and Spark (``local[2]``) give the
numbers of the standalone load; its MLmodel section describes the operator.

Comparisons inside this process are bitwise. The server and Spark's Python workers are other processes whose
torch may run another thread count: the spectral layers are not bitwise invariant to it (the fixtures' README
measured <= 1e-6 between 1 and 2 threads), so those compare within 1e-5, and everything is also checked against
upstream's recorded output within the fixtures' 5e-5.
"""

from __future__ import annotations

import shutil

import mlflow
import numpy as np
import pytest
import torch
import yaml

import mlflow_ptycho_flavor  # noqa: F401  (registers mlflow.ptycho_torch)
from fno_helpers import FIXTURE_DIR, TOLERANCE, read_fixture
from mlflow_ptycho_flavor import load_torch_bundle
from mlflow_ptycho_flavor.flavor import save_model
from mlflow_ptycho_flavor.network import use_channels_last

FIXTURE = "n64_g1_ffno_default"
OTHER_PROCESS_ATOL = 1e-5


@pytest.fixture(scope="module")
def fixture():
    return read_fixture(FIXTURE)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, fixture):
    path = tmp_path_factory.mktemp("fno-model") / "model"
    save_model(str(fixture["bundle"]), path)
    return path


@pytest.fixture(scope="module")
def standalone(fixture):
    """The standalone load's output on the recorded inputs (the reference of this module), in the layout the models
    predict with on the CPU by default (NHWC)."""
    network, _ = load_torch_bundle(fixture["bundle"], device="cpu")
    network = use_channels_last(network)
    io_ = fixture["io"]
    with torch.no_grad():
        out = network(torch.from_numpy(io_["x"]), torch.from_numpy(io_["input_scale_factor"])).numpy()
    assert float(np.abs(out - io_["output"]).max()) <= TOLERANCE
    return out


def _scale(fixture) -> np.ndarray:
    return fixture["io"]["input_scale_factor"].reshape(-1)


def test_logged_bundle_is_stored_as_is_and_described(model_dir, fixture):
    assert (model_dir / "wts.h5.zip").read_bytes() == (FIXTURE_DIR / FIXTURE / "wts.h5.zip").read_bytes()
    section = yaml.safe_load((model_dir / "MLmodel").read_text())["flavors"]["ptycho_torch"]
    assert section["architecture"] == "ffno" and section["output_mode"] == "real_imag"
    assert (section["fno_width"], section["fno_modes"], section["fno_blocks"], section["fno_cnn_blocks"]) == (32, 12, 4, 2)
    assert section["C"] == 1 and section["N"] == 64


def test_pyfunc_matches_the_standalone_load(model_dir, fixture, standalone):
    pyfunc = mlflow.pyfunc.load_model(str(model_dir))
    io_ = fixture["io"]
    got = pyfunc.predict({"diffraction": io_["x"], "scale": _scale(fixture)})
    assert got.dtype == np.complex64 and np.array_equal(got, standalone)
    amp_phase = pyfunc.predict({"diffraction": io_["x"][:, 0], "scale": _scale(fixture)},
                               params={"output_format": "amp_phase"})
    assert np.array_equal(amp_phase["amplitude"], np.abs(standalone).astype(np.float32))


@pytest.mark.slow
def test_served_model_matches_the_standalone_load(model_dir, fixture, standalone, tmp_path):
    from serving_tools import ModelServer

    io_ = fixture["io"]
    with ModelServer(str(model_dir), log_path=tmp_path / "server.log") as server:
        status, body = server.invoke({"inputs": {"diffraction": io_["x"].tolist(), "scale": _scale(fixture).tolist()}})
        assert status == 200, body
        got = np.asarray(body["predictions"]["real"], np.float32) + 1j * np.asarray(body["predictions"]["imag"],
                                                                                    np.float32)
        status, body = server.invoke({"inputs": np.zeros((1, 4, 64, 64)).tolist()})
        assert status == 400 and "C=1" in str(body)
    np.testing.assert_allclose(got, standalone, rtol=0, atol=OTHER_PROCESS_ATOL)
    assert float(np.abs(got - io_["output"]).max()) <= TOLERANCE


@pytest.mark.slow
def test_spark_matches_the_standalone_load(model_dir, fixture, standalone, tmp_path):
    pytest.importorskip("pyspark", reason="pyspark is not installed (pip install 'mlflow-ptycho-flavor[spark]')")
    if shutil.which("java") is None:
        pytest.skip("Spark needs a Java runtime (java is not on PATH)")
    from mlflow_ptycho_flavor.flavor import spark as ptycho_spark

    io_ = fixture["io"]
    # repeat the three recorded patterns so both partitions get work, in shuffled order
    order = np.random.default_rng(0).permutation(np.tile(np.arange(3), 4))
    session = ptycho_spark.local_spark_session("local[2]", tmp_dir=tmp_path / "spark", log_level="ERROR")
    try:
        got = ptycho_spark.spark_predict(session, str(model_dir), io_["x"][order], scale=_scale(fixture)[order],
                                         batch_size=4, num_partitions=2)
    finally:
        session.stop()
    assert got.shape == (12, 1, 64, 64) and got.dtype == np.complex64
    np.testing.assert_allclose(got, standalone[order], rtol=0, atol=OTHER_PROCESS_ATOL)
    assert float(np.abs(got - io_["output"][order]).max()) <= TOLERANCE
