"""The ``ptycho_torch`` MLflow flavor end to end, against a real sqlite tracking + registry store under tmp_path.

Covers: pyfunc predictions against the standalone bundle loader (bit for bit) and their re-encodings, every input
form, batching; the bundle inside logged artifacts; ``runs:/`` and ``models:/`` URIs (version and alias) through
both loaders; ``mlflow.models.predict``; the MLmodel and requirements files field by field; error paths; device
selection; import order; CUDA (skipped without a GPU).

The autouse ``mlflow_store`` fixture (conftest) gives every test its own store, so nothing lands in the repository.
"""

from __future__ import annotations

import copy
import hashlib
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.models import Model
from packaging.version import Version

import mlflow_ptycho_flavor
from mlflow_ptycho_flavor import PtychoPINNNetwork, PtychoTorchModel, load_torch_bundle, save_torch_bundle
from mlflow_ptycho_flavor.network import use_channels_last

from conftest import REPO_ROOT, UPSTREAM_DIR

N = 64
BATCH = 2  # the CPU forward dominates the runtime: keep batches small
CHANNELS = {1: 1, 2: 4}  # gridsize -> C (object_big)
PARAM_NAMES = ["output_format", "batch_size", "input_kind", "normalize", "stitch", "crop_size", "device"]
UPSTREAM_BUNDLE = UPSTREAM_DIR / "n64_g1_bn_bcbam_trainscale"  # the smaller of the two upstream fixtures


# ------------------------------------------------------------------------------------------------------------
# helpers and module-scoped models
# ------------------------------------------------------------------------------------------------------------
def _amplitudes(batch: int, channels: int, seed: int = 1) -> np.ndarray:
    return (2.0 * np.random.default_rng(seed).random((batch, channels, N, N))).astype(np.float32)


def _scales(batch: int, seed: int = 2) -> np.ndarray:
    return (0.5 + 1.5 * np.random.default_rng(seed).random(batch)).astype(np.float32)


def _network_output(network: PtychoPINNNetwork, x: np.ndarray, scale: np.ndarray | None = None) -> np.ndarray:
    """What the network itself returns, with the factor the flavor passes (ones when no scale is given)."""
    factors = np.ones((x.shape[0], 1, 1, 1), np.float32) if scale is None else scale.reshape(-1, 1, 1, 1)
    with torch.inference_mode():
        return network(torch.from_numpy(x), torch.from_numpy(factors)).cpu().numpy()


def _sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _error_code(exc_info) -> str:
    return exc_info.value.error_code


@pytest.fixture(scope="module")
def networks(perturbed_network) -> dict[int, PtychoPINNNetwork]:
    return {
        1: perturbed_network(seed=11, N=N, n_filters_scale=1),
        2: perturbed_network(seed=12, N=N, n_filters_scale=1, C_model=4),
    }


@pytest.fixture(scope="module")
def model_dirs(networks, tmp_path_factory) -> dict[int, Path]:
    """``save_model`` output for each gridsize (saving needs no tracking store)."""
    root = tmp_path_factory.mktemp("saved-models")
    dirs = {}
    for gridsize, network in networks.items():
        dirs[gridsize] = root / f"g{gridsize}"
        mlflow.ptycho_torch.save_model(network, dirs[gridsize])
    return dirs


@pytest.fixture(scope="module")
def pyfuncs(model_dirs) -> dict[int, mlflow.pyfunc.PyFuncModel]:
    return {g: mlflow.pyfunc.load_model(str(d), model_config={"device": "cpu"}) for g, d in model_dirs.items()}


@pytest.fixture(scope="module")
def standalone(model_dirs) -> dict[int, PtychoPINNNetwork]:
    """The networks as ``load_torch_bundle`` rebuilds them from each saved model's ``wts.h5.zip``, in the memory
    layout the models predict with on the CPU by default (NHWC; contiguous is compared in
    test_channels_last_is_the_cpu_default_and_matches_the_contiguous_layout)."""
    return {
        g: use_channels_last(load_torch_bundle(d / "wts.h5.zip", device="cpu")[0])
        for g, d in model_dirs.items()
    }


@pytest.fixture(scope="module")
def inputs() -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """``(amplitudes, per-sample scale)`` per gridsize."""
    return {g: (_amplitudes(BATCH, c, seed=g), _scales(BATCH, seed=10 + g)) for g, c in CHANNELS.items()}


@pytest.fixture(scope="module")
def expected(standalone, inputs) -> dict[int, dict[str, np.ndarray]]:
    """What the standalone-loaded network returns for ``inputs``, without (``plain``) and with (``scaled``) scale."""
    return {
        g: {"plain": _network_output(standalone[g], x), "scaled": _network_output(standalone[g], x, scale)}
        for g, (x, scale) in inputs.items()
    }


@pytest.fixture
def logged_g1(networks):
    """Log the gridsize-1 network in a run; returns ``(ModelInfo, run_id)``."""
    with mlflow.start_run() as run:
        info = mlflow.ptycho_torch.log_model(networks[1], name="model")
    return info, run.info.run_id


# ------------------------------------------------------------------------------------------------------------
# (a) pyfunc predictions == the standalone bundle network, every input form, every output encoding
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("gridsize", [1, 2])
def test_pyfunc_predict_equals_load_torch_bundle_network_bit_for_bit(gridsize, pyfuncs, inputs, expected):
    x, _ = inputs[gridsize]
    got = pyfuncs[gridsize].predict(x)
    assert isinstance(got, np.ndarray) and got.dtype == np.complex64
    assert got.shape == (BATCH, CHANNELS[gridsize], N, N)
    np.testing.assert_array_equal(got, expected[gridsize]["plain"])
    # the output really depends on the input (a perturbed network, not a constant map)
    assert not np.allclose(got[0], got[1])


def test_pyfunc_accepts_rank3_input_for_single_channel_models(pyfuncs, inputs, expected):
    x, _ = inputs[1]
    got = pyfuncs[1].predict(x[:, 0], params={"output_format": "complex"})  # explicit "complex" == "auto" here
    np.testing.assert_array_equal(got, expected[1]["plain"])


@pytest.mark.parametrize("gridsize", [1, 2])
def test_output_formats_are_lossless_reencodings_of_the_complex_result(gridsize, pyfuncs, inputs, expected):
    model = pyfuncs[gridsize]
    x, _ = inputs[gridsize]
    complex_out = expected[gridsize]["plain"]  # == the pyfunc's complex output, bit for bit (test above)

    real_imag = model.predict(x, params={"output_format": "real_imag"})
    assert set(real_imag) == {"real", "imag"}
    assert real_imag["real"].dtype == real_imag["imag"].dtype == np.float32
    np.testing.assert_array_equal(real_imag["real"], complex_out.real)
    np.testing.assert_array_equal(real_imag["imag"], complex_out.imag)

    amp_phase = model.predict(x, params={"output_format": "amp_phase"})
    assert set(amp_phase) == {"amplitude", "phase"}
    assert amp_phase["amplitude"].dtype == amp_phase["phase"].dtype == np.float32
    rebuilt = amp_phase["amplitude"].astype(np.float64) * np.exp(1j * amp_phase["phase"].astype(np.float64))
    np.testing.assert_allclose(rebuilt, complex_out.astype(np.complex128), rtol=1e-6, atol=0)


@pytest.mark.parametrize("gridsize", [1, 2])
def test_dict_input_with_scale_and_dataframe_rows_give_the_same_numbers(gridsize, pyfuncs, inputs, expected):
    model, c = pyfuncs[gridsize], CHANNELS[gridsize]
    x, scale = inputs[gridsize]
    scaled = expected[gridsize]["scaled"]
    assert not np.array_equal(scaled, expected[gridsize]["plain"])  # the scale matters

    np.testing.assert_array_equal(model.predict({"diffraction": x, "scale": scale}), scaled)

    frame = pd.DataFrame({"diffraction": list(x.reshape(BATCH, -1)), "scale": scale}, index=[10, 11])
    out = model.predict(frame, params={"output_format": "real_imag"})
    assert isinstance(out, pd.DataFrame) and list(out.columns) == ["real", "imag"]
    assert list(out.index) == [10, 11]
    np.testing.assert_array_equal(np.stack(out["real"].to_list()).reshape(BATCH, c, N, N), scaled.real)
    np.testing.assert_array_equal(np.stack(out["imag"].to_list()).reshape(BATCH, c, N, N), scaled.imag)


def test_batch_size_splits_exactly_like_separate_network_calls(pyfuncs, standalone, inputs, expected):
    """batch_size is honoured exactly: batch_size=1 equals one network call per pattern, bit for bit.

    batch_size=1 and the default (one batch of B) are NOT bitwise identical, and cannot be: torch's CPU conv
    kernels round differently for different batch sizes (observed max difference ~5e-7 on outputs ~0.5 with the
    bare network, no flavor involved). So the default is compared with a tolerance.
    """
    model, network = pyfuncs[1], standalone[1]
    x, _ = inputs[1]
    default = expected[1]["plain"]  # one call of B; the pyfunc default equals it bit for bit (test above)
    one = model.predict(x, params={"batch_size": 1})
    per_pattern = np.concatenate([_network_output(network, x[i : i + 1]) for i in range(BATCH)])
    np.testing.assert_array_equal(one, per_pattern)
    np.testing.assert_allclose(one, default, rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------------------------------------
# (b) the bundle inside the logged artifacts is the standalone bundle
# ------------------------------------------------------------------------------------------------------------
def test_bundle_downloaded_from_logged_model_loads_standalone_and_equals_the_logged_bundle(
    logged_g1, networks, inputs, expected, tmp_path
):
    info, run_id = logged_g1
    downloaded = Path(
        mlflow.artifacts.download_artifacts(
            artifact_uri=f"runs:/{run_id}/model/wts.h5.zip", dst_path=str(tmp_path / "download")
        )
    )
    assert downloaded.name == "wts.h5.zip" and downloaded.is_file()
    # byte-identical to what save_torch_bundle writes for this network (the writer is deterministic) ...
    reference = save_torch_bundle(networks[1], tmp_path / "reference" / "wts.h5.zip")
    assert downloaded.read_bytes() == reference.read_bytes()
    # ... and to the hash the MLmodel records
    model_dir = Path(mlflow.artifacts.download_artifacts(artifact_uri=info.model_uri, dst_path=str(tmp_path / "m")))
    assert Model.load(str(model_dir)).flavors["ptycho_torch"]["bundle_sha256"] == _sha256(downloaded)

    mlflow.set_tracking_uri("http://127.0.0.1:9")  # no tracking server: the standalone loader must not care
    network, params = load_torch_bundle(downloaded, device="cpu")
    assert params["N"] == N and params["gridsize"] == 1
    original = networks[1].state_dict()
    assert list(network.state_dict()) == list(original)
    for key, tensor in network.state_dict().items():
        assert torch.equal(tensor, original[key]), key
    network = use_channels_last(network)  # the layout `expected` was computed in
    np.testing.assert_array_equal(_network_output(network, inputs[1][0]), expected[1]["plain"])


def test_logging_a_bundle_path_stores_it_byte_for_byte(tmp_path):
    source = UPSTREAM_BUNDLE / "wts.h5.zip"
    with mlflow.start_run() as run:
        info = mlflow.ptycho_torch.log_model(source, name="upstream")
    stored = Path(
        mlflow.artifacts.download_artifacts(
            artifact_uri=f"runs:/{run.info.run_id}/upstream/wts.h5.zip", dst_path=str(tmp_path / "dl")
        )
    )
    assert _sha256(stored) == _sha256(source)
    assert stored.stat().st_size == source.stat().st_size
    # and it still reproduces upstream's recorded output through the flavor
    io = np.load(UPSTREAM_BUNDLE / "io.npz")
    native = mlflow.ptycho_torch.load_model(info.model_uri, device="cpu")
    got = native.predict(io["x"][:2], io["input_scale_factor"][:2])
    np.testing.assert_allclose(got, io["output"][:2], rtol=0, atol=5e-5)


# ------------------------------------------------------------------------------------------------------------
# (c) run / registry URIs
# ------------------------------------------------------------------------------------------------------------
def test_log_model_without_an_active_run_is_loadable_and_leaves_no_run_open(networks, inputs, expected):
    assert mlflow.active_run() is None
    info = mlflow.ptycho_torch.log_model(networks[1], name="model")
    assert mlflow.active_run() is None
    assert info.model_uri.startswith("models:/m-")
    x, want = inputs[1][0], expected[1]["plain"]
    np.testing.assert_array_equal(mlflow.pyfunc.load_model(info.model_uri).predict(x), want)
    np.testing.assert_array_equal(mlflow.ptycho_torch.load_model(info.model_uri, device="cpu").predict(x), want)


def test_log_model_in_an_active_run_loads_from_runs_uri_with_both_loaders(logged_g1, inputs, expected):
    info, run_id = logged_g1
    assert info.run_id == run_id
    uri = f"runs:/{run_id}/model"
    x, expected = inputs[1][0], expected[1]["plain"]
    pyfunc_model = mlflow.pyfunc.load_model(uri)
    assert pyfunc_model.metadata.run_id == run_id
    np.testing.assert_array_equal(pyfunc_model.predict(x), expected)
    native = mlflow.ptycho_torch.load_model(uri, device="cpu")
    assert isinstance(native, PtychoTorchModel)
    assert native.manifest["version"] == "2.0-pytorch" and native.params["gridsize"] == 1
    np.testing.assert_array_equal(native.predict(x), expected)


def test_registered_model_loads_by_version_and_by_alias_with_both_loaders(networks, inputs, expected):
    with mlflow.start_run():
        info = mlflow.ptycho_torch.log_model(networks[2], name="model", registered_model_name="ptycho-test")
    assert info.registered_model_version == 1
    client = MlflowClient()
    version = client.get_model_version("ptycho-test", "1")
    assert version.source == info.model_uri
    client.set_registered_model_alias("ptycho-test", "champion", "1")
    x, expected = inputs[2][0], expected[2]["plain"]
    for uri in ("models:/ptycho-test/1", "models:/ptycho-test@champion"):
        np.testing.assert_array_equal(mlflow.pyfunc.load_model(uri).predict(x), expected, err_msg=uri)
        native = mlflow.ptycho_torch.load_model(uri, device="cpu")
        assert native.channels == 4 and native.gridsize == 2
        np.testing.assert_array_equal(native.predict(x), expected, err_msg=uri)


# ------------------------------------------------------------------------------------------------------------
# (d) mlflow.models.predict (the serving code path, in-process with env_manager="local")
# ------------------------------------------------------------------------------------------------------------
def test_mlflow_models_predict_writes_real_imag_json_equal_to_in_process_predict(model_dirs, inputs, expected, tmp_path):
    """MLflow 3.17's ``mlflow.models.predict`` returns None; it runs the scoring server's ``_predict`` under a
    simulated serving environment (``_MLFLOW_IS_IN_SERVING_ENVIRONMENT=true``), so ``output_format="auto"``
    becomes ``real_imag``, and writes ``{"predictions": {"real": [...], "imag": [...]}}`` to ``output_path``."""
    x, scale = inputs[2]
    output = tmp_path / "predictions.json"
    returned = mlflow.models.predict(
        str(model_dirs[2]), {"diffraction": x, "scale": scale}, env_manager="local", output_path=str(output)
    )
    assert returned is None
    payload = json.loads(output.read_text())
    assert set(payload) == {"predictions"} and set(payload["predictions"]) == {"real", "imag"}
    in_process = expected[2]["scaled"]  # == pyfunc predict of the same dict, bit for bit (tests above)
    for part, values in (("real", in_process.real), ("imag", in_process.imag)):
        served = np.asarray(payload["predictions"][part], dtype=np.float64)
        assert served.shape == (BATCH, 4, N, N)
        # float32 -> JSON -> float64 is exact, so the served numbers are the in-process float32 values
        assert np.array_equal(served, values.astype(np.float64)), part


def test_mlflow_models_predict_honours_json_params_and_prints_to_stdout(model_dirs, inputs, expected, tmp_path, capsys):
    x, _ = inputs[1]
    request = tmp_path / "request.json"
    request.write_text(json.dumps({"inputs": {"diffraction": x.tolist()}, "params": {"output_format": "amp_phase"}}))
    capsys.readouterr()
    mlflow.models.predict(str(model_dirs[1]), input_path=str(request), env_manager="local")
    printed = capsys.readouterr().out
    payload = json.loads(printed[printed.index('{"predictions"') :])
    plain = expected[1]["plain"]
    assert set(payload["predictions"]) == {"amplitude", "phase"}
    for part, values in (("amplitude", np.abs(plain)), ("phase", np.angle(plain))):
        np.testing.assert_array_equal(np.asarray(payload["predictions"][part], dtype=np.float32), values)


def test_mlflow_models_predict_refuses_complex_output(model_dirs, tmp_path):
    request = tmp_path / "request.json"
    request.write_text(
        json.dumps({"inputs": {"diffraction": _amplitudes(1, 1).tolist()}, "params": {"output_format": "complex"}})
    )
    output = tmp_path / "out.json"
    with pytest.raises(MlflowException, match="'complex' cannot be sent as JSON") as exc_info:
        mlflow.models.predict(
            str(model_dirs[1]), input_path=str(request), env_manager="local", output_path=str(output)
        )
    assert _error_code(exc_info) == "INVALID_PARAMETER_VALUE"
    assert not output.exists()


# ------------------------------------------------------------------------------------------------------------
# (e) MLmodel and environment files
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("gridsize", [1, 2])
def test_mlmodel_records_flavor_pyfunc_and_signature_field_by_field(gridsize, model_dirs):
    model_dir = model_dirs[gridsize]
    mlmodel = Model.load(str(model_dir))
    assert set(mlmodel.flavors) == {"ptycho_torch", "python_function"}
    native = mlmodel.flavors["ptycho_torch"]
    c = CHANNELS[gridsize]
    expected = {
        "bundle": "wts.h5.zip",
        "bundle_version": "2.0-pytorch",
        "backend": "pytorch",
        "bundle_sha256": _sha256(model_dir / "wts.h5.zip"),
        "pytorch_version": str(torch.__version__),
        "N": N,
        "gridsize": gridsize,
        "C": c,
        "n_filters_scale": 1,
        "architecture": "cnn",
        "mode": "Unsupervised",
        "output_mode": "amp_phase",
        "object_big": True,
        "probe_big": True,
        "batch_norm": False,
        "use_shared_decoder": False,
        "intensity_scale": 1.0,
        "fixed_input_scale": False,
        "has_scaling_metadata": True,
        "code": None,
    }
    for key, value in expected.items():
        assert native[key] == value, key
    assert isinstance(native["input"], str) and isinstance(native["output"], str)

    pyfunc_conf = mlmodel.flavors["python_function"]
    assert pyfunc_conf["loader_module"] == "mlflow_ptycho_flavor"
    assert pyfunc_conf["data"] == "wts.h5.zip"
    assert pyfunc_conf["config"] == {"device": None, "channels_last": None}
    assert pyfunc_conf["env"] == {"conda": "conda.yaml", "virtualenv": "python_env.yaml"}
    assert (model_dir / pyfunc_conf["data"]).is_file()

    signature = mlmodel.signature
    assert signature.inputs is None  # several input forms are accepted; see mlflow_ptycho_flavor.flavor
    assert [p.name for p in signature.params.params] == PARAM_NAMES
    assert {p.name: p.default for p in signature.params.params} == {
        "output_format": "auto",
        "batch_size": 0,
        "input_kind": "amplitude",
        "normalize": "none",
        "stitch": False,
        "crop_size": 0,
        "device": "",
    }
    outputs = signature.outputs.to_dict()
    assert [o["name"] for o in outputs] == ["real", "imag"]
    assert [o["tensor-spec"]["dtype"] for o in outputs] == ["float32", "float32"]
    assert [tuple(o["tensor-spec"]["shape"]) for o in outputs] == [(-1, c, N, N)] * 2


def test_save_model_declares_extra_model_config_keys(networks, tmp_path):
    mlflow.ptycho_torch.save_model(networks[1], tmp_path / "m", model_config={"device": "cpu"})
    assert Model.load(str(tmp_path / "m")).flavors["python_function"]["config"] == {"device": "cpu", "channels_last": None}


def test_requirements_pin_public_versions_without_local_tags(model_dirs):
    model_dir = model_dirs[1]
    lines = (model_dir / "requirements.txt").read_text().split()
    public_torch = Version(torch.__version__).public
    assert f"torch=={public_torch}" in lines
    assert f"mlflow=={mlflow.__version__}" in lines
    assert f"mlflow-ptycho-flavor=={mlflow_ptycho_flavor.__version__}" in lines
    # this package's and mlflow's own requirements bring them; each pin costs every pyfunc load a metadata lookup
    assert not any(line.startswith(("pandas", "numpy", "dill")) for line in lines)
    assert lines == ["--find-links", "wheels", f"torch=={public_torch}", f"mlflow=={mlflow.__version__}",
                     f"mlflow-ptycho-flavor=={mlflow_ptycho_flavor.__version__}"]
    for name in ("requirements.txt", "conda.yaml", "python_env.yaml"):
        assert "+" not in (model_dir / name).read_text(), name
    conda = yaml.safe_load((model_dir / "conda.yaml").read_text())
    pip_deps = next(d["pip"] for d in conda["dependencies"] if isinstance(d, dict))
    assert f"torch=={public_torch}" in pip_deps


# ------------------------------------------------------------------------------------------------------------
# (f) error paths
# ------------------------------------------------------------------------------------------------------------
def test_save_model_into_existing_non_empty_dir_raises_and_leaves_it_untouched(networks, tmp_path):
    target = tmp_path / "existing"
    target.mkdir()
    (target / "keep.txt").write_bytes(b"precious")
    with pytest.raises(MlflowException, match="already exists and is not empty") as exc_info:
        mlflow.ptycho_torch.save_model(networks[1], target)
    assert _error_code(exc_info) == "RESOURCE_ALREADY_EXISTS"
    assert sorted(p.name for p in target.iterdir()) == ["keep.txt"]
    assert (target / "keep.txt").read_bytes() == b"precious"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "artifacts") == ["existing", "mlflow.db"]


def test_save_model_into_existing_empty_dir_works(networks, tmp_path):
    (tmp_path / "empty").mkdir()
    mlflow.ptycho_torch.save_model(networks[1], tmp_path / "empty")
    assert (tmp_path / "empty" / "MLmodel").is_file()


@pytest.mark.parametrize(
    ("case", "error", "match"),
    [
        ("bad model type", TypeError, "must be a PtychoPINNNetwork"),
        ("torch module that is not the network", TypeError, "must be a PtychoPINNNetwork"),
        ("missing bundle path", MlflowException, "is not a loadable bundle"),
        ("file that is not a bundle", MlflowException, "is not a loadable bundle"),
        ("config with a bundle path", MlflowException, "a bundle path is stored as it is"),
        ("intensity_scale with a bundle path", MlflowException, "a bundle path is stored as it is"),
    ],
)
def test_rejected_save_model_leaves_no_directory(case, error, match, tmp_path):
    junk = tmp_path / "junk.zip"
    junk.write_bytes(b"not a zip archive")
    bundle = str(UPSTREAM_BUNDLE / "wts.h5.zip")
    calls = {
        "bad model type": ({"weights": 1}, {}),
        "torch module that is not the network": (torch.nn.Linear(2, 2), {}),
        "missing bundle path": (str(tmp_path / "nowhere" / "wts.h5.zip"), {}),
        "file that is not a bundle": (str(junk), {}),
        "config with a bundle path": (bundle, {"config": {"nphotons": 1e9}}),
        "intensity_scale with a bundle path": (bundle, {"intensity_scale": 2.0}),
    }
    model, kwargs = calls[case]
    outputs = tmp_path / "outputs"
    outputs.mkdir()
    with pytest.raises(error, match=match) as exc_info:
        mlflow.ptycho_torch.save_model(model, outputs / "model", **kwargs)
    if error is MlflowException:
        assert _error_code(exc_info) == "INVALID_PARAMETER_VALUE"
    assert list(outputs.iterdir()) == []  # neither the model directory nor a staging directory


def test_load_model_without_ptycho_torch_flavor_raises(tmp_path):
    model_dir = tmp_path / "other"
    model_dir.mkdir()
    other = Model()
    other.add_flavor("python_function", loader_module="some_other_module")
    other.save(str(model_dir / "MLmodel"))
    with pytest.raises(MlflowException, match='does not have the "ptycho_torch" flavor') as exc_info:
        mlflow.ptycho_torch.load_model(str(model_dir))
    assert _error_code(exc_info) == "RESOURCE_DOES_NOT_EXIST"


def _bad_inputs():
    good = _amplitudes(2, 1)
    nan = good.copy()
    nan[1, 0, 3, 4] = np.nan
    negative = good.copy()
    negative[0, 0, 0, 0] = -1.0
    return [
        pytest.param(good[:, None], None, "must have rank 3", id="rank 5"),
        pytest.param(_amplitudes(2, 1)[..., :32, :32], None, "trained on N=64", id="wrong N"),
        pytest.param(_amplitudes(2, 4), None, "takes C=1", id="wrong C"),
        pytest.param(np.ones((2, N, N), np.int32), None, "expected floating point", id="int dtype"),
        pytest.param(nan, None, "NaN or infinite", id="NaN"),
        pytest.param(negative, {"input_kind": "intensity"}, "negative counts", id="negative counts"),
        pytest.param(good, {"output_format": "hdf5"}, "is not one of", id="unknown output_format"),
        pytest.param({"diffraction": good, "extra": 1}, None, "unknown key", id="unknown dict key"),
        pytest.param("patterns.npy", None, "is not accepted", id="string"),
    ]


@pytest.mark.parametrize(("data", "params", "match"), _bad_inputs())
def test_pyfunc_predict_rejects_bad_input_with_invalid_parameter_value(data, params, match, pyfuncs):
    with pytest.raises(MlflowException, match=match) as exc_info:
        pyfuncs[1].predict(data, params=params)
    assert _error_code(exc_info) == "INVALID_PARAMETER_VALUE"


def test_complex_output_is_refused_in_the_serving_environment(pyfuncs, inputs, expected, monkeypatch):
    x, _ = inputs[1]
    monkeypatch.setenv("_MLFLOW_IS_IN_SERVING_ENVIRONMENT", "true")
    with pytest.raises(MlflowException, match="'complex' cannot be sent as JSON") as exc_info:
        pyfuncs[1].predict(x, params={"output_format": "complex"})
    assert _error_code(exc_info) == "INVALID_PARAMETER_VALUE"
    served = pyfuncs[1].predict(x)  # "auto" while serving = real_imag
    assert set(served) == {"real", "imag"}
    np.testing.assert_array_equal(served["real"], expected[1]["plain"].real)
    np.testing.assert_array_equal(served["imag"], expected[1]["plain"].imag)


def test_device_in_params_raises_naming_model_config(pyfuncs):
    """Through the public pyfunc API, as a user (or the scoring server) calls it."""
    with pytest.raises(MlflowException, match="model_config") as exc_info:
        pyfuncs[1].predict(_amplitudes(1, 1), params={"device": "cuda:0"})
    assert _error_code(exc_info) == "INVALID_PARAMETER_VALUE"


@pytest.mark.parametrize("gridsize", [1, 2])
def test_empty_batch_returns_an_empty_result(gridsize, pyfuncs):
    c = CHANNELS[gridsize]
    out = pyfuncs[gridsize].predict(np.zeros((0, c, N, N), np.float32))
    assert out.shape == (0, c, N, N) and out.dtype == np.complex64
    split = pyfuncs[gridsize].predict(np.zeros((0, c, N, N), np.float32), params={"output_format": "real_imag"})
    assert split["real"].shape == split["imag"].shape == (0, c, N, N)
    if c == 1:
        assert pyfuncs[gridsize].predict(np.zeros((0, N, N), np.float32)).shape == (0, 1, N, N)


# ------------------------------------------------------------------------------------------------------------
# (g) device selection, raw model access, import order
# ------------------------------------------------------------------------------------------------------------
def _device_of(pyfunc_model) -> torch.device:
    return next(pyfunc_model.get_raw_model().parameters()).device


def test_model_config_device_selects_the_device(model_dirs, monkeypatch):
    monkeypatch.setenv("MLFLOW_DEFAULT_PREDICTION_DEVICE", "meta")  # model_config wins over the variable
    loaded = mlflow.pyfunc.load_model(str(model_dirs[1]), model_config={"device": "cpu"})
    assert _device_of(loaded) == torch.device("cpu")
    # "meta" is a device every torch has: it shows the requested device really is where the network goes
    monkeypatch.delenv("MLFLOW_DEFAULT_PREDICTION_DEVICE")
    assert _device_of(mlflow.pyfunc.load_model(str(model_dirs[1]), model_config={"device": "meta"})).type == "meta"
    with pytest.raises(MlflowException, match="model_config") as exc_info:
        mlflow.pyfunc.load_model(str(model_dirs[1]), model_config={"device": "warp-drive"})
    assert _error_code(exc_info) == "INVALID_PARAMETER_VALUE"


def test_default_prediction_device_env_var_selects_the_device(model_dirs, monkeypatch):
    monkeypatch.setenv("MLFLOW_DEFAULT_PREDICTION_DEVICE", "cpu")
    assert _device_of(mlflow.pyfunc.load_model(str(model_dirs[1]))) == torch.device("cpu")
    monkeypatch.setenv("MLFLOW_DEFAULT_PREDICTION_DEVICE", "meta")
    assert _device_of(mlflow.pyfunc.load_model(str(model_dirs[1]))).type == "meta"
    monkeypatch.setenv("MLFLOW_DEFAULT_PREDICTION_DEVICE", "warp-drive")
    with pytest.raises(MlflowException, match="MLFLOW_DEFAULT_PREDICTION_DEVICE"):
        mlflow.pyfunc.load_model(str(model_dirs[1]))


def test_get_raw_model_returns_the_network(pyfuncs):
    raw = pyfuncs[1].get_raw_model()
    assert isinstance(raw, PtychoPINNNetwork) and not raw.training
    assert raw.config.N == N and raw.config.channels == 1


def test_unwrap_python_model_returns_the_network(pyfuncs):
    """MLflow's ``PyFuncModel.unwrap_python_model()`` reads ``_model_impl.python_model``."""
    assert pyfuncs[1].unwrap_python_model() is pyfuncs[1].get_raw_model()


def _run_python(code: str, cwd: Path) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def test_import_flavor_alone_does_not_import_mlflow_and_a_later_import_mlflow_exposes_the_flavor(
    model_dirs, tmp_path
):
    """One interpreter (each one costs seconds): standalone use never imports MLflow; then ``import mlflow``
    afterwards makes ``mlflow.ptycho_torch.save_model`` available."""
    bundle = model_dirs[1] / "wts.h5.zip"
    _run_python(
        f"""
        import sys
        import mlflow_ptycho_flavor
        assert "mlflow" not in sys.modules, "import mlflow_ptycho_flavor imported mlflow"
        network, params = mlflow_ptycho_flavor.load_torch_bundle({str(bundle)!r}, device="cpu")
        assert params["N"] == 64
        leaked = sorted(m for m in sys.modules if m == "mlflow" or m.startswith("mlflow."))
        assert not leaked, leaked

        import mlflow
        mlflow.ptycho_torch.save_model(network, "model")
        assert mlflow.ptycho_torch.load_model("model", device="cpu").N == 64
        """,
        tmp_path,
    )
    assert (tmp_path / "model" / "MLmodel").is_file()


def test_import_mlflow_then_flavor_allows_import_mlflow_ptycho_torch(tmp_path):
    _run_python(
        """
        import sys
        import mlflow
        import mlflow_ptycho_flavor
        import mlflow.ptycho_torch
        assert mlflow.ptycho_torch is sys.modules["mlflow_ptycho_flavor.flavor"]
        assert mlflow.ptycho_torch.FLAVOR_NAME == "ptycho_torch"
        from mlflow.ptycho_torch import save_model, log_model, load_model
        """,
        tmp_path,
    )


# ------------------------------------------------------------------------------------------------------------
# (h) CUDA
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("gridsize", [1, 2])
def test_cuda_load_matches_cpu_output(gridsize, model_dirs, pyfuncs):
    x = _amplitudes(BATCH, CHANNELS[gridsize])
    cpu = pyfuncs[gridsize].predict(x)
    on_gpu = mlflow.pyfunc.load_model(str(model_dirs[gridsize]), model_config={"device": "cuda:0"})
    assert _device_of(on_gpu) == torch.device("cuda:0")
    np.testing.assert_allclose(on_gpu.predict(x), cpu, rtol=0, atol=1e-4)
    native = mlflow.ptycho_torch.load_model(str(model_dirs[gridsize]), device="cuda:0")
    assert native.device.type == "cuda"
    np.testing.assert_allclose(native.predict(x), cpu, rtol=0, atol=1e-4)


# ------------------------------------------------------------------------------------------------------------
# isolation
# ------------------------------------------------------------------------------------------------------------
def test_tracking_and_artifacts_stay_under_tmp_path(networks, mlflow_store, tmp_path):
    watched = [REPO_ROOT / "mlruns", REPO_ROOT / "mlartifacts", REPO_ROOT / "mlflow.db", Path.cwd() / "mlruns"]
    existed = {p for p in watched if p.exists()}
    repo_entries = {p.name for p in REPO_ROOT.iterdir()}
    assert mlflow.get_tracking_uri() == mlflow.get_registry_uri() == f"sqlite:///{tmp_path}/mlflow.db"
    with mlflow.start_run() as run:
        info = mlflow.ptycho_torch.log_model(networks[1], name="model", registered_model_name="isolation")
        mlflow.log_param("p", 1)
    mlflow.pyfunc.load_model("models:/isolation/1")
    artifact_root = (tmp_path / "artifacts").as_uri()
    assert run.info.artifact_uri.startswith(artifact_root)
    assert MlflowClient().get_logged_model(info.model_id).artifact_location.startswith(artifact_root)
    assert MlflowClient().get_model_version_download_uri("isolation", "1").startswith(artifact_root)
    assert mlflow_store.artifact_root == tmp_path / "artifacts"
    assert any((tmp_path / "artifacts").rglob("wts.h5.zip"))
    assert {p for p in watched if p.exists()} == existed
    new_entries = {p.name for p in REPO_ROOT.iterdir()} - repo_entries
    assert not {n for n in new_entries if n.startswith(("mlruns", "mlartifacts")) or n.endswith(".db")}


@pytest.mark.parametrize("gridsize", [1, 2])
def test_channels_last_is_the_cpu_default_and_matches_the_contiguous_layout(model_dirs, pyfuncs, gridsize):
    """On the CPU the default (channels_last=None) runs NHWC activations, the faster layout, with the weights as
    stored (oneDNN reorders them for every convolution: the same bits as converting them); model_config / load_model
    can turn it off. Both agree to float rounding, and the pyfunc and native defaults agree bit for bit."""
    default = pyfuncs[gridsize]
    network = default.get_raw_model()
    first_conv = network.model.autoencoder.encoder.blocks[0].conv1
    assert network.channels_last and first_conv.weight.is_contiguous()  # NCHW weights, nothing copied at load
    activations = []
    hook = first_conv.register_forward_hook(lambda module, args, out: activations.append((args[0], out)))
    plain = mlflow.pyfunc.load_model(str(model_dirs[gridsize]), model_config={"device": "cpu", "channels_last": False})
    assert not plain.get_raw_model().channels_last
    x = np.random.default_rng(gridsize).uniform(0, 2, (5, gridsize**2, 64, 64)).astype(np.float32)
    reference = plain.predict(x)
    contiguous, _ = load_torch_bundle(model_dirs[gridsize] / "wts.h5.zip", device="cpu")
    np.testing.assert_array_equal(reference, _network_output(contiguous, x))  # off: the eager network exactly
    got = default.predict(x)
    hook.remove()
    for tensor in activations[0]:  # the first convolution's input and output, in exact NHWC strides
        batch, channels, height, width = tensor.shape
        assert tensor.stride() == (height * width * channels, 1, width * channels, channels)
    # the weights' layout changes no bit: the network converted whole (torch's channels_last) gives the same output
    nhwc_weights = copy.deepcopy(contiguous).to(memory_format=torch.channels_last)
    assert first_conv.weight.stride() != nhwc_weights.model.autoencoder.encoder.blocks[0].conv1.weight.stride()
    np.testing.assert_array_equal(got, _network_output(nhwc_weights, x))
    np.testing.assert_allclose(got, reference, rtol=0, atol=1e-5 * max(1.0, float(np.abs(reference).max())))
    native = mlflow.ptycho_torch.load_model(str(model_dirs[gridsize]), device="cpu")
    np.testing.assert_array_equal(native.predict(x), got)
    with pytest.raises(MlflowException, match=r"model_config\['channels_last'\] must be true, false or null"):
        mlflow.pyfunc.load_model(str(model_dirs[gridsize]), model_config={"channels_last": "yes"})
