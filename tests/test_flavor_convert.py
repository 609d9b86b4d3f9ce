"""``mlflow.ptycho_torch.log_model`` / ``save_model`` of a Lightning checkpoint or a TensorFlow archive: converted
on the way in, against a real sqlite tracking store under tmp_path (the autouse ``mlflow_store`` fixture).

The logged model must give the numbers of the bundle the converter writes standalone (same process: bitwise), a
TensorFlow archive must be kept byte for byte next to its converted bundle, and whatever else is handed over (a
bare state_dict, an MLflow model directory, random bytes, an older-era checkpoint) must be refused naming what it
is, leaving nothing behind.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
import yaml
from mlflow.exceptions import MlflowException

from mlflow_ptycho_flavor import load_torch_bundle, read_bundle
from mlflow_ptycho_flavor.convert import convert_checkpoint, convert_tf_bundle
from mlflow_ptycho_flavor.errors import ArchitectureEraError, UnconvertibleInputError
from mlflow_ptycho_flavor.network import NetworkConfig, PtychoPINNNetwork, use_channels_last

DATA = Path(__file__).resolve().parent / "data"
CKPT_DIR = DATA / "checkpoints" / "main_n64_g1_default"
CKPT = CKPT_DIR / "main_n64_g1_default.ckpt"
TF_DIR = DATA / "tensorflow" / "tf_n64_g1_s1_probe_tensor"
TF_ARCHIVE = TF_DIR / "wts.h5.zip"


def _sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _io(folder: Path) -> dict[str, np.ndarray]:
    with np.load(folder / "io.npz") as data:
        return {key: data[key] for key in data.files}


def _standalone_output(bundle: Path, x: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """The bundle's network as ``load_torch_bundle`` rebuilds it, in the layout the models predict with on the CPU
    by default (NHWC)."""
    network, _ = load_torch_bundle(bundle, device="cpu")
    network = use_channels_last(network)
    with torch.no_grad():
        return network(torch.from_numpy(x), torch.from_numpy(scale.reshape(-1, 1, 1, 1))).numpy()


def _flavor_section(model_dir: Path) -> dict:
    return yaml.safe_load((model_dir / "MLmodel").read_text())["flavors"]["ptycho_torch"]


def test_logged_checkpoint_predicts_like_the_standalone_converted_bundle(tmp_path):
    with mlflow.start_run():
        info = mlflow.ptycho_torch.log_model(str(CKPT), name="model")
    data = _io(CKPT_DIR)
    x, scale = data["x"], data["input_scale_factor"].reshape(-1)
    pyfunc = mlflow.pyfunc.load_model(info.model_uri, model_config={"device": "cpu"})
    got = pyfunc.predict({"diffraction": x, "scale": scale})
    standalone = convert_checkpoint(CKPT, tmp_path / "standalone" / "wts.h5.zip")
    np.testing.assert_array_equal(got, _standalone_output(standalone, x, scale))
    native = mlflow.ptycho_torch.load_model(info.model_uri, device="cpu")
    np.testing.assert_array_equal(native.predict(x, scale), got)
    # The logged bundle carries the checkpoint's weights; the MLmodel says where they came from.
    local = Path(mlflow.artifacts.download_artifacts(info.model_uri, dst_path=str(tmp_path / "download")))
    logged, converted = read_bundle(local / "wts.h5.zip"), read_bundle(standalone)
    assert all(torch.equal(logged.state_dict[k], converted.state_dict[k]) for k in converted.state_dict)
    source = _flavor_section(local)["source"]
    assert source == {"kind": "lightning_checkpoint", "file_name": CKPT.name, "sha256": _sha256(CKPT),
                      "size_bytes": CKPT.stat().st_size}
    assert not (local / "source").exists()  # checkpoints hold optimizer state: only the converted bundle is kept


def test_checkpoint_intensity_scale_is_recorded_in_the_logged_bundle(tmp_path):
    mlflow.ptycho_torch.save_model(str(CKPT), tmp_path / "model", intensity_scale=988.5)
    assert read_bundle(tmp_path / "model" / "wts.h5.zip").params["intensity_scale"] == 988.5


def test_logged_tensorflow_archive_keeps_the_original_bytes(tmp_path):
    with mlflow.start_run():
        info = mlflow.ptycho_torch.log_model(str(TF_ARCHIVE), name="model")
    local = Path(mlflow.artifacts.download_artifacts(info.model_uri, dst_path=str(tmp_path / "download")))
    assert (local / "source" / "wts.h5.zip").read_bytes() == TF_ARCHIVE.read_bytes()
    source = _flavor_section(local)["source"]
    assert source == {"kind": "tensorflow_archive", "file_name": "wts.h5.zip", "sha256": _sha256(TF_ARCHIVE),
                      "size_bytes": TF_ARCHIVE.stat().st_size, "artifact": "source/wts.h5.zip"}
    data = _io(TF_DIR)
    x = data["x_normed_nchw"]
    ones = np.ones(x.shape[0], np.float32)
    got = mlflow.pyfunc.load_model(info.model_uri, model_config={"device": "cpu"}).predict(x)
    standalone = convert_tf_bundle(TF_ARCHIVE, tmp_path / "standalone.zip")
    np.testing.assert_array_equal(got, _standalone_output(standalone, x, ones))
    assert read_bundle(local / "wts.h5.zip").manifest["provenance"]["source"]["sha256"] == _sha256(TF_ARCHIVE)


def _bare_state_dict(folder: Path) -> Path:
    path = folder / "weights.pth"
    torch.save(PtychoPINNNetwork(NetworkConfig(N=64, C_model=1, n_filters_scale=1)).state_dict(), path)
    return path


def _mlflow_model_dir(folder: Path) -> Path:
    path = folder / "already-logged"
    mlflow.ptycho_torch.save_model(PtychoPINNNetwork(NetworkConfig(N=64, C_model=1, n_filters_scale=1)), path)
    return path


def _random_bytes(folder: Path) -> Path:
    path = folder / "model.ckpt"
    path.write_bytes(np.random.default_rng(5).bytes(4096))
    return path


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (_bare_state_dict, "is a bare PyTorch state_dict"),
        (_mlflow_model_dir, "is an MLflow model directory (flavors ptycho_torch, python_function)"),
        (_random_bytes, "is not a recognised format"),
    ],
    ids=["bare-state-dict", "mlflow-model-dir", "random-bytes"],
)
def test_inputs_that_are_neither_bundles_nor_convertible_are_refused_naming_them(tmp_path, make, message):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    src = make(inputs)
    outputs = tmp_path / "outputs"
    outputs.mkdir()
    with pytest.raises(MlflowException, match="is not a loadable bundle") as excinfo:
        mlflow.ptycho_torch.save_model(str(src), outputs / "model")
    assert excinfo.value.error_code == "INVALID_PARAMETER_VALUE"
    assert isinstance(excinfo.value.__cause__, UnconvertibleInputError)
    assert message in str(excinfo.value)
    assert list(outputs.iterdir()) == []  # neither the model directory nor a staging directory


def test_older_era_checkpoint_is_refused_naming_the_era_and_nothing_is_logged(tmp_path):
    payload = torch.load(CKPT, map_location="cpu", weights_only=True)
    state = OrderedDict(payload["state_dict"])
    state["model.autoencoder.decoder_amp.merge_blocks.0.0.weight"] = torch.zeros(4, 4, 3, 3)
    payload["state_dict"] = state
    path = tmp_path / "latent.ckpt"
    torch.save(payload, path)
    with mlflow.start_run() as run:
        with pytest.raises(MlflowException, match="could not be converted into a bundle") as excinfo:
            mlflow.ptycho_torch.log_model(str(path), name="model")
    assert isinstance(excinfo.value.__cause__, ArchitectureEraError)
    assert "E1" in str(excinfo.value) and "ptychodus 1.7" in str(excinfo.value)
    assert mlflow.MlflowClient().list_artifacts(run.info.run_id) == []


def test_network_only_arguments_are_refused_for_a_tensorflow_archive(tmp_path):
    with pytest.raises(MlflowException, match="a bundle path is stored as it is"):
        mlflow.ptycho_torch.save_model(str(TF_ARCHIVE), tmp_path / "model", intensity_scale=2.0)
    assert not (tmp_path / "model").exists()


@pytest.mark.slow
def test_served_tensorflow_model_answers_with_the_standalone_numbers(tmp_path):
    """A TF archive saved as an MLflow model, served by a real ``mlflow models serve`` on loopback, answers with the
    numbers of the standalone converted bundle (another process: compared to float32 rounding, 1e-5) and within
    1e-4 x max|obj| of TensorFlow's own recorded output (docs/bundle-format.md §9.10)."""
    from serving_tools import ModelServer

    model_dir = tmp_path / "model"
    mlflow.ptycho_torch.save_model(str(TF_ARCHIVE), model_dir)
    data = _io(TF_DIR)
    x = data["x_normed_nchw"]
    standalone = _standalone_output(convert_tf_bundle(TF_ARCHIVE, tmp_path / "standalone.zip"), x,
                                    np.ones(x.shape[0], np.float32))
    with ModelServer(str(model_dir), log_path=tmp_path / "server.log") as server:
        status, body = server.invoke({"inputs": x.tolist()})
    assert status == 200, body
    served = np.asarray(body["predictions"]["real"], np.float32) + 1j * np.asarray(body["predictions"]["imag"],
                                                                                   np.float32)
    np.testing.assert_allclose(served, standalone, rtol=0, atol=1e-5)
    assert float(np.abs(served - data["obj"]).max()) <= 1e-4 * float(np.abs(data["obj"]).max())
