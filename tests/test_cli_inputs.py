"""The command line refuses bad arguments and hostile files before it writes anything (issue 12 §4).

* an NPZ whose ``.npy`` header claims 150 GiB and ``simulate --N 100000``: one ``error:`` line, exit 2, quickly,
  nothing written (neither the output nor a temporary file);
* argument mistakes of ``predict`` (``--png`` with ``--patches-only``, a zero, negative, NaN or boolean
  ``--scale``, ``--batch-size 0``) are detected before the output file is written;
* a ``log`` that is refused (not a bundle, ``--alias`` without ``--registered-model-name``) leaves no run behind;
* saved model directories, their files and PNGs get the permissions the process umask gives an ordinary file or
  folder (not the 0700/0600 of ``mkdtemp``/``mkstemp``).

Commands run in-process through ``cli.main``.
"""

from __future__ import annotations

import io
import os
import stat
import time
import zipfile
from pathlib import Path

import mlflow
import numpy as np
import pytest
from mlflow.entities import ViewType

from mlflow_ptycho_flavor import cli, save_torch_bundle
from mlflow_ptycho_flavor.sim.dataset import save_npz
from mlflow_ptycho_flavor.sim.simulate import simulate_dataset

GIB = 1024**3


@pytest.fixture()
def small_bundle(tmp_path, perturbed_network):
    return save_torch_bundle(perturbed_network(seed=5, N=64, n_filters_scale=1), tmp_path / "wts.h5")


@pytest.fixture()
def small_scan(tmp_path):
    path = tmp_path / "scan.npz"
    save_npz(simulate_dataset(N=64, n_scan=(3, 3), seed=1), path)
    return path


def _run(argv, capsys):
    code = cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _assert_one_error_line(code: int, out: str, err: str, *needles: str) -> str:
    assert code == 2, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err + out
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def _npy_header(shape: tuple[int, ...], descr: str = "<f4") -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": descr, "fortran_order": False, "shape": shape})
    return buffer.getvalue()


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def _write_claiming_npz(path: Path, compression: int) -> Path:
    """A 40 KB NPZ whose ``diff3d`` header claims (9830400, 64, 64) float32 = 150 GiB; the other keys are valid."""
    claimed = (150 * GIB // (4 * 64 * 64), 64, 64)
    with zipfile.ZipFile(path, "w", compression=compression) as archive:
        archive.writestr("diff3d.npy", _npy_header(claimed) + bytes(4096))
        archive.writestr("xcoords.npy", _npy(np.zeros(3)))
        archive.writestr("ycoords.npy", _npy(np.zeros(3)))
        archive.writestr("probeGuess.npy", _npy(np.ones((64, 64), np.complex64)))
    return path


@pytest.mark.parametrize("compression", [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED], ids=["stored", "deflated"])
def test_npz_whose_header_claims_150_gib_is_refused_without_allocating(compression, small_bundle, tmp_path, capsys):
    scan = _write_claiming_npz(tmp_path / "claims.npz", compression)
    assert scan.stat().st_size < 100_000
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    started = time.perf_counter()
    code, out, err = _run(["predict", small_bundle, scan, "-o", out_dir / "o.npz"], capsys)
    line = _assert_one_error_line(code, out, err, "diff3d")
    assert "150" in line or "GiB" in line or "bytes" in line, line
    assert time.perf_counter() - started < 20
    assert list(out_dir.iterdir()) == []


def test_simulate_with_an_absurd_size_is_one_error_line_and_writes_nothing(tmp_path, capsys):
    target = tmp_path / "sim" / "scan.npz"
    target.parent.mkdir()
    started = time.perf_counter()
    code, out, err = _run(["simulate", target, "--N", "100000"], capsys)
    _assert_one_error_line(code, out, err, "N")
    assert time.perf_counter() - started < 5  # refused before any array is allocated
    assert list(target.parent.iterdir()) == []


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--png", "{tmp}/x.png", "--patches-only"], "--png needs"),
        (["--scale", "0"], "scale"),
        (["--scale", "-2.5"], "scale"),
        (["--scale", "nan"], "scale"),
        (["--scale", "inf"], "scale"),
        (["--scale", "true"], "--scale must be"),
        (["--batch-size", "0"], "--batch-size"),
    ],
    ids=["png-with-patches-only", "scale-zero", "scale-negative", "scale-nan", "scale-inf", "scale-bool",
         "batch-size-zero"],
)
def test_predict_argument_errors_are_found_before_the_output_is_written(extra, needle, small_bundle, small_scan,
                                                                        tmp_path, capsys):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    argv = ["predict", small_bundle, small_scan, "-o", out_dir / "o.npz", *[a.format(tmp=out_dir) for a in extra]]
    code, out, err = _run(argv, capsys)
    _assert_one_error_line(code, out, err, needle)
    assert list(out_dir.iterdir()) == []  # neither o.npz nor x.png nor a temporary file


def test_predict_scale_rule_is_the_model_rule(small_bundle, small_scan, tmp_path, capsys):
    """``--scale 0`` is refused with the same message as ``PtychoTorchModel.predict(x, 0.0)``."""
    from mlflow_ptycho_flavor import PtychoTorchModel, PredictionInputError

    model = PtychoTorchModel.from_bundle(small_bundle, device="cpu")
    with pytest.raises(PredictionInputError) as native:
        model.predict(np.ones((1, 64, 64), np.float32), 0.0)
    code, out, err = _run(["predict", small_bundle, small_scan, "-o", tmp_path / "o.npz", "--scale", "0"], capsys)
    line = _assert_one_error_line(code, out, err)
    assert str(native.value).splitlines()[0] in line


def _all_runs() -> list:
    client = mlflow.MlflowClient()
    experiments = client.search_experiments(view_type=ViewType.ALL)
    return client.search_runs([e.experiment_id for e in experiments], run_view_type=ViewType.ALL)


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["log", "{tmp}/not_a_zip.zip"], "not a loadable bundle"),
        (["log", "{tmp}/truncated.zip"], "not a loadable bundle"),
        (["log", "{bundle}", "--alias", "champion"], "--alias needs --registered-model-name"),
        (["log", "{bundle}", "--registered-model-name", "m", "--alias", "latest"], "reserved"),
        (["log", "{bundle}", "--registered-model-name", "m", "--alias", "v3"], "reserved"),
        (["log", "{bundle}", "--registered-model-name", "a/b"], "cannot contain"),
    ],
    ids=["not-a-zip", "truncated-bundle", "alias-without-name", "alias-latest", "alias-version", "name-slash"],
)
def test_refused_log_leaves_no_run_behind(argv, needle, small_bundle, tmp_path, capsys):
    (tmp_path / "not_a_zip.zip").write_text("hello")
    (tmp_path / "truncated.zip").write_bytes(small_bundle.read_bytes()[: small_bundle.stat().st_size // 2])
    assert _all_runs() == []
    code, out, err = _run([a.format(tmp=tmp_path, bundle=small_bundle) for a in argv], capsys)
    _assert_one_error_line(code, out, err, needle)
    assert _all_runs() == [], "a refused `log` left a run in the tracking store"


def test_log_whose_conversion_fails_leaves_no_visible_run(tmp_path, capsys):
    """A file recognised as a Lightning checkpoint passes the pre-check; its conversion fails inside the run, and
    the empty run is deleted instead of staying behind as FAILED."""
    import torch

    checkpoint = tmp_path / "damaged.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "pytorch-lightning_version": "2.1.0", "hyper_parameters": {}},
               checkpoint)
    code, out, err = _run(["log", checkpoint], capsys)
    _assert_one_error_line(code, out, err, "hyper_parameters")
    client = mlflow.MlflowClient()
    experiments = client.search_experiments(view_type=ViewType.ALL)
    assert client.search_runs([e.experiment_id for e in experiments]) == []  # active runs: none
    assert all(r.info.lifecycle_stage == "deleted" for r in _all_runs())


def test_log_still_logs_a_good_bundle(small_bundle, capsys):
    code, out, err = _run(["log", small_bundle], capsys)
    assert code == 0, err
    runs = _all_runs()
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"


# ----------------------------------------------------------------------------------------------------------------
# permissions follow the umask
# ----------------------------------------------------------------------------------------------------------------
@pytest.fixture(params=[0o022, 0o027], ids=["umask-022", "umask-027"])
def umask(request):
    previous = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(previous)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_saved_model_directory_and_files_follow_the_umask(umask, tmp_path, perturbed_network):
    from mlflow_ptycho_flavor.flavor import save_model

    target = tmp_path / "model"
    save_model(perturbed_network(seed=2, N=64, n_filters_scale=1), target)
    entries = [target, *target.rglob("*")]
    assert any(p.name == "wts.h5.zip" for p in entries)
    for path in entries:
        want = (0o777 if path.is_dir() else 0o666) & ~umask
        assert _mode(path) == want, f"{path.relative_to(tmp_path)}: {oct(_mode(path))} != {oct(want)}"


def test_standalone_bundle_and_simulated_npz_follow_the_umask(umask, tmp_path, perturbed_network, capsys):
    bundle = save_torch_bundle(perturbed_network(seed=2, N=64, n_filters_scale=1), tmp_path / "out" / "wts.h5")
    code, _, err = _run(["simulate", tmp_path / "out" / "scan.npz", "--N", "64"], capsys)
    assert code == 0, err
    for path in (bundle, tmp_path / "out" / "scan.npz"):
        assert _mode(path) == 0o666 & ~umask, f"{path.name}: {oct(_mode(path))}"


def test_logged_model_artifacts_follow_the_umask(umask, perturbed_network, mlflow_store):
    info = mlflow.ptycho_torch.log_model(perturbed_network(seed=2, N=64, n_filters_scale=1), name="model")
    local = Path(mlflow.artifacts.download_artifacts(info.model_uri, dst_path=str(mlflow_store.root / "dl")))
    stored = [p for p in mlflow_store.artifact_root.rglob("*") if p.name in ("MLmodel", "wts.h5.zip")]
    assert len(stored) == 2
    for path in stored + [p.parent for p in stored]:
        want = (0o777 if path.is_dir() else 0o666) & ~umask
        assert _mode(path) == want, f"{path}: {oct(_mode(path))} != {oct(want)}"
    assert (local / "wts.h5.zip").exists()


def test_png_and_npz_written_by_predict_follow_the_umask(umask, small_bundle, small_scan, tmp_path, capsys):
    out_npz, png = tmp_path / "out" / "recon.npz", tmp_path / "out" / "recon.png"
    code, _, err = _run(["predict", small_bundle, small_scan, "-o", out_npz, "--png", png], capsys)
    assert code == 0, err
    for path in (out_npz, png):
        assert _mode(path) == 0o666 & ~umask, f"{path.name}: {oct(_mode(path))}"


def test_reconstruction_figure_follows_the_umask(umask, tmp_path):
    from mlflow_ptycho_flavor.sim.plotting import save_reconstruction_figure

    obj = np.exp(1j * np.linspace(0, 1, 32 * 32)).reshape(32, 32).astype(np.complex64)
    path = save_reconstruction_figure(tmp_path / "fig.png", obj, truth=obj)
    assert _mode(Path(path)) == 0o666 & ~umask


def test_ptychodus_npz_whose_header_claims_150_gib_is_refused_without_allocating(tmp_path):
    """The ptychodus reader reads members through the same guarded reader as ``load_npz``."""
    from mlflow_ptycho_flavor.errors import DatasetError
    from mlflow_ptycho_flavor.sim.ptychodus import load_ptychodus_npz

    scan = _write_claiming_npz(tmp_path / "claims.npz", zipfile.ZIP_DEFLATED)
    started = time.perf_counter()
    with pytest.raises(DatasetError, match="diff3d"):
        load_ptychodus_npz(scan, input_kind="counts")
    assert time.perf_counter() - started < 5
