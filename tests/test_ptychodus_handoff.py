"""The hand-off to and from ptychodus (issue 16): its data in, its model file out.

* Data: a scan stored the way ptychodus exports one (integer photon counts in ``diff3d`` with detector sentinel
  values under a ``bad_pixels`` mask, the probe as ``(1, N, N)`` modes, object-frame ``xcoords``/``ycoords``) runs
  through ``ptycho-flavor predict --stitch`` and through the pyfunc (``input_kind="counts"``, also as the JSON
  integer lists MLflow's scoring handler decodes) and gives the same stitched object as the equivalent amplitude
  input in upstream's schema: ``sqrt(counts)`` with the bad pixels zeroed, written here with numpy's own square
  root. What reaches the network (amplitudes, factors, positions) is compared bit for bit; the network's outputs
  to float32 rounding (``_assert_same_result``), because two runs of the same float32 network on this shared CPU
  have been seen to differ by ~2e-6 in one pattern of a batch.
* Model: ``ptycho-flavor fetch`` runs in a fresh interpreter where pandas cannot be imported (``mlflow-skinny``'s
  situation, as ptychodus has it) against a real sqlite tracking/registry store under ``tmp_path``, for
  ``models:/name@alias``, ``models:/name/<version>`` and ``runs:/`` URIs and all three layouts; a stored bundle
  whose bytes no longer match the MLmodel's ``bundle_sha256`` gets the typed error and leaves the target as it was.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import mlflow
import numpy as np
import pytest

from mlflow_ptycho_flavor import cli, save_torch_bundle
from mlflow_ptycho_flavor.errors import PredictionInputError
from mlflow_ptycho_flavor.model.inference import PtychoTorchModel, counts_to_amplitudes, prepare_diffraction
from mlflow_ptycho_flavor.sim.dataset import PtychoDataset, load_npz, normalization_factor, save_npz
from mlflow_ptycho_flavor.sim.ptychodus import load_ptychodus_npz, looks_like_ptychodus_npz
from mlflow_ptycho_flavor.sim.simulate import simulate_dataset
from test_host_safety import BLOCKER

REPO_ROOT = Path(__file__).resolve().parents[1]
N = 64
BAD = [(N // 2, N // 2 + 1), (5, 7), (40, 12)]  # one next to the bright centre, two in the wings
SENTINEL = -1  # what a detector leaves in a dead pixel


# ----------------------------------------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def scan():
    """A simulated 4 x 4 scan, its integer counts, and a detector mask of three bad pixels."""
    dataset = simulate_dataset(N=N, n_scan=(4, 4), nphotons=1e6, seed=7)
    counts = np.rint(dataset.diff3d.astype(np.float64) ** 2).astype(np.int32)
    mask = np.zeros((N, N), dtype=bool)
    for row, col in BAD:
        mask[row, col] = True
    return dataset, counts, mask


def _write_ptychodus(path: Path, dataset, counts, mask, *, swap: bool = False) -> Path:
    """The scan as ptychodus exports it: counts (sentinels under the mask), (1, N, N) probe, bad_pixels."""
    stored = counts.copy()
    stored[:, mask] = SENTINEL
    x, y = (dataset.ycoords, dataset.xcoords) if swap else (dataset.xcoords, dataset.ycoords)
    np.savez(path, diff3d=stored, probeGuess=dataset.probeGuess[None], xcoords=x, ycoords=y,
             xcoords_start=x, ycoords_start=y, objectGuess=dataset.objectGuess,
             scan_index=np.zeros(len(counts), dtype=np.int64), bad_pixels=mask)
    return path


def _zeroed(counts, mask):
    clean = counts.copy()
    clean[:, mask] = 0
    return clean


def _amplitudes(counts, mask) -> np.ndarray:
    """The equivalent amplitude input, by the documented definition: sqrt(counts), bad pixels zeroed."""
    return np.sqrt(_zeroed(counts, mask).astype(np.float64)).astype(np.float32)


@pytest.fixture(scope="module")
def files(tmp_path_factory, scan):
    dataset, counts, mask = scan
    folder = tmp_path_factory.mktemp("handoff-data")
    ptychodus = _write_ptychodus(folder / "ptychodus.npz", dataset, counts, mask)
    swapped = _write_ptychodus(folder / "ptychodus_yx.npz", dataset, counts, mask, swap=True)
    amplitude = folder / "amplitudes.npz"
    save_npz(PtychoDataset(diff3d=_amplitudes(counts, mask), xcoords=dataset.xcoords, ycoords=dataset.ycoords,
                           probeGuess=dataset.probeGuess, objectGuess=dataset.objectGuess), amplitude)
    return {"ptychodus": ptychodus, "yx": swapped, "amplitude": amplitude}


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    from conftest import make_perturbed_network

    return save_torch_bundle(make_perturbed_network(seed=11, N=N, n_filters_scale=1),
                             tmp_path_factory.mktemp("handoff-bundle") / "wts.h5")


def _assert_same_result(actual, expected, err_msg: str = "") -> None:
    """Network outputs of identical inputs: equal to float32 rounding (values are O(1); the options compared here
    change them by > 1e-2)."""
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5, err_msg=err_msg)


def _clearly_different(a, b) -> bool:
    return a.shape != b.shape or float(np.abs(a - b).max()) > 1e-3


def _predict(capsys, bundle, data, out, *options) -> tuple[dict, str]:
    code = cli.main(["predict", str(bundle), str(data), "-o", str(out), *options])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    with np.load(out) as result:
        return {key: result[key] for key in result.files}, captured.out


def test_one_square_root_for_counts_and_intensities():
    counts = np.array([[0, 1, 2, 9, 1000, 2**24 + 1]], dtype=np.int64)
    exact = np.sqrt(counts.astype(np.float64)).astype(np.float32)  # 2**24 + 1 is not a float32
    np.testing.assert_array_equal(counts_to_amplitudes(counts), exact)
    np.testing.assert_array_equal(counts_to_amplitudes(counts.astype(np.float32), input_kind="intensity"),
                                  np.sqrt(counts.astype(np.float32)))
    with pytest.raises(PredictionInputError, match=r"non-integer values \(e.g. 2.5\) with input_kind='counts'"):
        counts_to_amplitudes(np.array([1.0, 2.5]))
    np.testing.assert_array_equal(counts_to_amplitudes(np.array([2.25]), input_kind="intensity"), [1.5])
    with pytest.raises(PredictionInputError, match="negative counts with input_kind='counts'"):
        counts_to_amplitudes(np.array([4, -1]))
    # the model layer's input_kind="counts": integers (as JSON decodes them) pass, fractions do not
    x = np.full((2, N, N), 4, dtype=np.int64)
    np.testing.assert_array_equal(prepare_diffraction(x, N=N, channels=1, input_kind="counts"),
                                  np.full((2, 1, N, N), 2.0, np.float32))
    with pytest.raises(PredictionInputError, match="non-integer"):
        prepare_diffraction(x + 0.5, N=N, channels=1, input_kind="counts")
    with pytest.raises(PredictionInputError, match="input_kind='counts'"):
        prepare_diffraction(x, N=N, channels=1)  # integers are not amplitudes; the hint names the fix


def test_ptychodus_files_are_recognised_from_their_headers(files, scan, tmp_path):
    dataset, counts, _ = scan
    assert looks_like_ptychodus_npz(files["ptychodus"])
    assert not looks_like_ptychodus_npz(files["amplitude"])
    probe_only = tmp_path / "modes.npz"  # float amplitudes, but a modes axis on the probe
    np.savez(probe_only, diff3d=np.sqrt(counts).astype(np.float32), probeGuess=dataset.probeGuess[None],
             xcoords=dataset.xcoords, ycoords=dataset.ycoords)
    assert looks_like_ptychodus_npz(probe_only)
    integer_only = tmp_path / "counts.npz"  # upstream's keys and probe shape, but integer counts
    np.savez(integer_only, diff3d=counts, probeGuess=dataset.probeGuess, xcoords=dataset.xcoords,
             ycoords=dataset.ycoords)
    assert looks_like_ptychodus_npz(integer_only)
    (tmp_path / "junk.npz").write_bytes(b"not a zip at all")
    assert not looks_like_ptychodus_npz(tmp_path / "junk.npz")


def test_cli_predict_stitches_ptychodus_data_like_the_amplitude_input(capsys, bundle, files, tmp_path):
    # what predict feeds the network: the same amplitudes and the same upstream factor, bit for bit
    converted, reference = load_ptychodus_npz(files["ptychodus"]), load_npz(files["amplitude"])
    np.testing.assert_array_equal(converted.dataset.diff3d, reference.diff3d)
    assert converted.scale == normalization_factor(reference.diff3d)

    ptychodus, printed = _predict(capsys, bundle, files["ptychodus"], tmp_path / "p.npz", "--stitch")
    amplitude, _ = _predict(capsys, bundle, files["amplitude"], tmp_path / "a.npz")
    assert "ptychodus-format data: diff3d as counts (amplitude = sqrt(counts))" in printed
    assert f"bad pixels {len(BAD)} set to 0" in printed and "upstream normalization" in printed
    assert set(ptychodus) == set(amplitude) >= {"object", "patches", "positions", "coverage"}
    for key in ("positions", "indices", "coverage", "origin"):
        np.testing.assert_array_equal(ptychodus[key], amplitude[key], err_msg=key)
    for key in ("patches", "object"):
        _assert_same_result(ptychodus[key], amplitude[key], err_msg=key)
    assert np.abs(ptychodus["object"]).max() > 0

    # [y, x] pairs read with --positions-order yx are the same scan
    swapped, _ = _predict(capsys, bundle, files["yx"], tmp_path / "yx.npz", "--positions-order", "yx")
    np.testing.assert_array_equal(swapped["positions"], amplitude["positions"])
    _assert_same_result(swapped["object"], amplitude["object"])
    misread, _ = _predict(capsys, bundle, files["yx"], tmp_path / "yx-as-xy.npz")
    assert _clearly_different(misread["positions"], amplitude["positions"])


def test_cli_normalization_and_bad_pixel_choices(capsys, bundle, files, scan, tmp_path):
    _, counts, mask = scan
    factor = normalization_factor(_amplitudes(counts, mask))
    ptychodus, printed = _predict(capsys, bundle, files["ptychodus"], tmp_path / "p2.npz", "--normalization",
                                  "ptychodus")
    assert "ptychodus normalization" in printed
    # ptychodus's torch path uses N^2 where upstream uses (N/2)^2: the factor doubles
    doubled, _ = _predict(capsys, bundle, files["amplitude"], tmp_path / "a2.npz", "--scale", repr(2 * factor))
    _assert_same_result(ptychodus["patches"], doubled["patches"])
    upstream, _ = _predict(capsys, bundle, files["amplitude"], tmp_path / "a1.npz")
    assert _clearly_different(ptychodus["patches"], upstream["patches"])

    inpainted, printed = _predict(capsys, bundle, files["ptychodus"], tmp_path / "i.npz", "--patches-only",
                                  "--bad-pixels", "inpaint")
    assert f"bad pixels {len(BAD)} inpainted" in printed and "object" not in inpainted
    assert _clearly_different(inpainted["patches"], upstream["patches"])  # other inputs at the bad pixels


@pytest.mark.parametrize(
    "options, message",
    [
        (["--normalization", "ptychodus", "--scale", "one"], "--normalization ptychodus chooses the convention"),
        (["--stitch", "--patches-only"], "not allowed with argument"),
    ],
)
def test_cli_conflicting_options_are_refused(capsys, bundle, files, tmp_path, options, message):
    try:
        code = cli.main(["predict", str(bundle), str(files["ptychodus"]), "-o", str(tmp_path / "o.npz"), *options])
    except SystemExit as exit_info:  # argparse's own refusal of mutually exclusive options
        code = exit_info.code
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o.npz").exists()


def test_cli_counts_refuses_fractional_values(capsys, bundle, files, tmp_path):
    code = cli.main(["predict", str(bundle), str(files["amplitude"]), "-o", str(tmp_path / "o.npz"), "--counts"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and "non-integer values" in err, err


@pytest.fixture(scope="module")
def pyfunc_model(tmp_path_factory, bundle):
    import mlflow.pyfunc

    from mlflow_ptycho_flavor.flavor import save_model

    model_dir = tmp_path_factory.mktemp("handoff-model") / "model"
    save_model(str(bundle), model_dir)
    return mlflow.pyfunc.load_model(str(model_dir), model_config={"device": "cpu"})


def test_pyfunc_takes_counts_and_gives_the_amplitude_object(pyfunc_model, files, scan, capsys, bundle, tmp_path):
    from mlflow.pyfunc import scoring_server

    dataset, counts, mask = scan
    with np.load(files["ptychodus"]) as stored:  # the file's own arrays; bad pixels zeroed as ptychodus exports
        diffraction = np.where(stored["bad_pixels"], 0, stored["diff3d"])
        positions = np.stack([stored["xcoords"], stored["ycoords"]], axis=1)
    assert diffraction.dtype.kind == "i"
    stitch = {"normalize": "dataset", "stitch": True}
    native = PtychoTorchModel.from_bundle(bundle, "cpu")  # what the pyfunc feeds its network, bit for bit
    from_counts_inputs = native.prepare(diffraction, input_kind="counts", normalize="dataset")
    from_amplitude_inputs = native.prepare(_amplitudes(counts, mask), normalize="dataset")
    for got, want in zip(from_counts_inputs, from_amplitude_inputs):
        np.testing.assert_array_equal(got, want)
    from_counts = pyfunc_model.predict({"diffraction": diffraction, "positions": positions},
                                       params={**stitch, "input_kind": "counts"})
    from_amplitudes = pyfunc_model.predict({"diffraction": _amplitudes(counts, mask), "positions": positions},
                                           params=stitch)
    _assert_same_result(from_counts, from_amplitudes)
    cli_object, _ = _predict(capsys, bundle, files["ptychodus"], tmp_path / "p.npz")
    _assert_same_result(from_counts, cli_object["object"])

    # JSON integer counts through MLflow's own request handler (what `mlflow models serve` runs per request)
    body = json.dumps({"inputs": {"diffraction": diffraction.tolist(), "positions": positions.tolist()},
                       "params": {**stitch, "input_kind": "counts", "output_format": "real_imag"}})
    response = scoring_server.invocations(body, "application/json", pyfunc_model, None)
    assert response.status == 200, response.response[:500]
    predictions = json.loads(response.response)["predictions"]
    served = np.asarray(predictions["real"], np.float32) + 1j * np.asarray(predictions["imag"], np.float32)
    _assert_same_result(served, from_counts)


# ----------------------------------------------------------------------------------------------------------------
# model: fetch with pandas blocked
# ----------------------------------------------------------------------------------------------------------------
FETCH_SCRIPT = """
import contextlib, io, json, sys
from pathlib import Path

from mlflow_ptycho_flavor import cli

tracking_uri, out, cases = sys.argv[1], Path(sys.argv[2]), json.loads(sys.argv[3])
report = {"runs": []}
for uri, layout, folder in cases:
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = cli.main(["fetch", uri, "--to", str(out / folder), "--as", layout, "--tracking-uri", tracking_uri])
    report["runs"].append({"code": code, "error": [l for l in err.getvalue().splitlines() if l.startswith("error:")]})

from mlflow_ptycho_flavor.errors import BundleHashMismatchError, CorruptBundleError, PtychoFlavorError
from mlflow_ptycho_flavor.fetch import fetch_bundle
try:
    fetch_bundle("models:/handoff@broken", out / "typed")
    report["typed"] = "no error"
except Exception as exc:
    report["typed"] = type(exc).__name__
    report["typed_family"] = [isinstance(exc, BundleHashMismatchError), isinstance(exc, CorruptBundleError),
                              isinstance(exc, PtychoFlavorError)]
report["pandas_loaded"] = "pandas" in sys.modules
report["flavor_loaded"] = "mlflow_ptycho_flavor.flavor" in sys.modules
print(json.dumps(report))
"""


def _fetch_without_pandas(tmp_path: Path, tracking_uri: str, out: Path, cases: list) -> dict:
    script = tmp_path / "fetch_skinny.py"
    script.write_text(f"BLOCKED = {['pandas']!r}\n" + BLOCKER + textwrap.dedent(FETCH_SCRIPT))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, (str(REPO_ROOT), os.environ.get("PYTHONPATH")))),
           "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
        env.pop(var, None)
    done = subprocess.run([sys.executable, str(script), tracking_uri, str(out), json.dumps(cases)], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_fetch_with_pandas_blocked_writes_verified_bundles(mlflow_store, bundle, tmp_path):
    from mlflow_ptycho_flavor.flavor import log_model

    client = mlflow.MlflowClient()
    with mlflow.start_run() as run:
        good = log_model(str(bundle), name="model", registered_model_name="handoff")
        mlflow.log_text("not a model", "notes/readme.txt")
    client.set_registered_model_alias("handoff", "champion", good.registered_model_version)
    with mlflow.start_run():
        broken = log_model(str(bundle), name="model", registered_model_name="handoff")
    client.set_registered_model_alias("handoff", "broken", broken.registered_model_version)
    # damage the second version's stored bundle: one byte flipped in the artifact store
    location = client.get_logged_model(broken.model_id).artifact_location
    stored = Path(location.removeprefix("file://")) / "wts.h5.zip"
    data = bytearray(stored.read_bytes())
    data[len(data) // 2] ^= 0xFF
    stored.write_bytes(bytes(data))

    out = tmp_path / "out"
    (out / "kept").mkdir(parents=True)
    previous = out / "kept" / "model.zip"
    previous.write_bytes(b"the model.zip ptychodus had before")
    cases = [
        ["models:/handoff@champion", "model.zip", "ptychodus-input"],
        [f"runs:/{run.info.run_id}/model", "wts.h5.zip", "upstream"],
        [f"models:/handoff/{good.registered_model_version}", "dir", "model-dir"],
        ["models:/handoff@broken", "model.zip", "kept"],
        [f"runs:/{run.info.run_id}/notes", "model.zip", "not-a-model"],
    ]
    report = _fetch_without_pandas(tmp_path, mlflow_store.tracking_uri, out, cases)
    assert report["pandas_loaded"] is False and report["flavor_loaded"] is False, report
    runs = report["runs"]
    assert [r["code"] for r in runs] == [0, 0, 0, 2, 2], runs

    original = bundle.read_bytes()
    expected = good.flavors["ptycho_torch"]["bundle_sha256"]
    assert _sha256(bundle) == expected
    assert (out / "ptychodus-input" / "model.zip").read_bytes() == original
    assert (out / "upstream" / "wts.h5.zip").read_bytes() == original
    model_dir = out / "model-dir"
    assert (model_dir / "wts.h5.zip").read_bytes() == original and (model_dir / "MLmodel").is_file()
    # refused fetches create nothing; successful ones leave exactly the file (no temporary files)
    assert sorted(p.name for p in out.iterdir()) == ["kept", "model-dir", "ptychodus-input", "upstream"]
    assert [p.name for p in (out / "ptychodus-input").iterdir()] == ["model.zip"]
    assert [p.name for p in (out / "upstream").iterdir()] == ["wts.h5.zip"]
    with zipfile.ZipFile(out / "ptychodus-input" / "model.zip") as archive:
        assert "diffraction_to_obj/model.pth" in archive.namelist()

    # wrong hash: the typed error, one line naming the cause, and the earlier model.zip untouched
    assert report["typed"] == "BundleHashMismatchError" and report["typed_family"] == [True, True, True], report
    assert len(runs[3]["error"]) == 1 and "bundle_sha256" in runs[3]["error"][0], runs[3]
    assert [p.name for p in (out / "kept").iterdir()] == ["model.zip"]
    assert previous.read_bytes() == b"the model.zip ptychodus had before"
    assert not (out / "typed").exists()
    assert "not an MLflow model" in runs[4]["error"][0], runs[4]
    assert not (out / "not-a-model").exists()


def test_fetch_refuses_targets_before_downloading(tmp_path, capsys):
    folder = tmp_path / "targets"
    occupied = folder / "occupied"
    occupied.mkdir(parents=True)
    (occupied / "something").write_text("x")
    a_file = folder / "file"
    a_file.write_text("x")
    for argv, message in (
        (["fetch", "models:/nothing@here", "--to", str(occupied), "--as", "dir"], "not an empty folder"),
        (["fetch", "models:/nothing@here", "--to", str(a_file)], "is a file"),
    ):
        assert cli.main(argv) == 2
        assert message in capsys.readouterr().err
    assert sorted(p.name for p in folder.iterdir()) == ["file", "occupied"]
    assert [p.name for p in occupied.iterdir()] == ["something"]
