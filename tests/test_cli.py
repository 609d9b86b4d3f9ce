"""The ``ptycho-flavor`` command line: every command, its output files and its error paths.

Commands run in-process through ``cli.main`` (fast) except one console-script smoke test and the demo, which
runs as a subprocess exactly as a user would start it.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import mlflow
import numpy as np
import pytest

from mlflow_ptycho_flavor import cli, load_torch_bundle, save_torch_bundle
from mlflow_ptycho_flavor.sim.dataset import load_npz, save_npz
from mlflow_ptycho_flavor.sim.demo_model import shipped_bundle_path
from mlflow_ptycho_flavor.sim.simulate import simulate_dataset

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture()
def small_bundle(tmp_path, perturbed_network):
    return save_torch_bundle(perturbed_network(seed=5, N=64, n_filters_scale=1), tmp_path / "wts.h5")


@pytest.fixture()
def small_scan(tmp_path):
    dataset = simulate_dataset(N=64, n_scan=(4, 4), seed=1)
    path = tmp_path / "scan.npz"
    save_npz(dataset, path)
    return path


def _run(argv, capsys):
    code = cli.main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for command in ("demo", "inspect", "predict", "log", "serve", "simulate", "spark-predict"):
        assert command in out


def test_inspect_bundle_reports_architecture_and_hashes(small_bundle, capsys):
    code, out, err = _run(["inspect", str(small_bundle), "--json"], capsys)
    assert code == 0, err
    report = json.loads(out)
    assert report["version"] == "2.0-pytorch"
    assert report["backend"] == "pytorch"
    assert report["N"] == 64 and report["gridsize"] == 1 and report["n_filters_scale"] == 1
    assert report["hashes verified"] == "5/5"  # every member but the manifest itself
    network, _ = load_torch_bundle(small_bundle, device="cpu")
    assert report["parameters"] == sum(p.numel() for p in network.parameters())


def test_inspect_upstream_bundle_says_no_hashes(upstream_dir, capsys):
    code, out, _ = _run(["inspect", str(upstream_dir / "n64_g1_default" / "wts.h5.zip")], capsys)
    assert code == 0
    assert "none recorded (upstream bundle)" in out
    assert "parameters" in out and "2339896" in out


def test_inspect_logged_model_by_uri(small_bundle, capsys):
    info = mlflow.ptycho_torch.log_model(str(small_bundle), name="model")
    code, out, err = _run(["inspect", info.model_uri, "--json"], capsys)
    assert code == 0, err
    assert json.loads(out)["model directory"]


def test_predict_writes_patches_stitched_object_and_png(small_bundle, small_scan, tmp_path, capsys):
    out_npz, png = tmp_path / "out" / "recon.npz", tmp_path / "out" / "recon.png"
    code, out, err = _run(["predict", str(small_bundle), str(small_scan), "-o", str(out_npz), "--png", str(png)], capsys)
    assert code == 0, err
    result = np.load(out_npz)
    assert result["patches"].shape == (16, 1, 64, 64) and result["patches"].dtype == np.complex64
    assert result["object"].ndim == 2 and result["coverage"].max() >= 1
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The same numbers as the native model with the dataset normalization
    from mlflow_ptycho_flavor.flavor import load_model

    native = load_model(str(small_bundle), device="cpu")
    expected = native.predict(load_npz(small_scan).diff3d, normalize="dataset")
    np.testing.assert_array_equal(result["patches"], expected)


def test_predict_with_logged_model_uri_and_patches_only(small_bundle, small_scan, tmp_path, capsys):
    info = mlflow.ptycho_torch.log_model(str(small_bundle), name="model", registered_model_name="cli-model")
    out_npz = tmp_path / "p.npz"
    code, _, err = _run(["predict", "models:/cli-model/1", str(small_scan), "-o", str(out_npz), "--patches-only",
                         "--scale", "one"], capsys)
    assert code == 0, err
    assert "object" not in np.load(out_npz).files
    assert info.registered_model_version == 1


def test_log_registers_and_sets_alias(small_bundle, capsys):
    code, out, err = _run(["log", str(small_bundle), "--registered-model-name", "cli-log", "--alias", "champion"], capsys)
    assert code == 0, err
    assert "models:/cli-log/1" in out
    version = mlflow.MlflowClient().get_model_version_by_alias("cli-log", "champion")
    assert str(version.version) == "1"
    model = mlflow.pyfunc.load_model("models:/cli-log@champion")
    assert model.metadata.flavors["ptycho_torch"]["N"] == 64


def test_serve_dry_run_prints_the_mlflow_command(capsys):
    code, out, _ = _run(["serve", "models:/x@champion", "--port", "5123", "--dry-run"], capsys)
    assert code == 0
    assert "models serve -m models:/x@champion -h 127.0.0.1 -p 5123 --env-manager local" in out


def test_simulate_writes_a_loadable_scan(tmp_path, capsys):
    target = tmp_path / "sim.npz"
    code, out, _ = _run(["simulate", str(target), "--seed", "3"], capsys)
    assert code == 0
    assert load_npz(target).N == 64 and "simulated" in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["inspect", "{tmp}/missing.zip"], "no bundle at"),
        (["inspect", "{tmp}/not_a_zip.zip"], "is not a zip archive"),
        (["predict", "{tmp}/missing.zip", "{tmp}/scan.npz", "-o", "{tmp}/o.npz"], "no bundle at"),
        (["predict", "{bundle}", "{tmp}/missing.npz", "-o", "{tmp}/o.npz"], "missing.npz"),
        (["predict", "{bundle}", "{scan}", "-o", "{tmp}/o.npz", "--scale", "lots"], "--scale must be"),
        (["predict", "{bundle}", "{scan}", "-o", "{tmp}/o.npz", "--png", "{tmp}/x.png", "--patches-only"], "--png needs"),
        (["predict", "nonsense-uri", "{scan}", "-o", "{tmp}/o.npz"], "neither a file"),
        (["log", "{tmp}/missing.zip"], "no bundle at"),
        (["log", "{tmp}/not_a_zip.zip"], "not a loadable bundle"),
        (["inspect", "{tf}"], "TensorFlow"),
    ],
)
def test_user_mistakes_print_one_line_and_exit_2(argv, message, tmp_path, small_bundle, small_scan, capsys):
    (tmp_path / "not_a_zip.zip").write_text("hello")
    tf = tmp_path / "tf.zip"
    import pickle

    with zipfile.ZipFile(tf, "w") as archive:
        archive.writestr("manifest.dill", pickle.dumps({"models": ["autoencoder", "diffraction_to_obj"], "version": "1.0"}))
        archive.writestr("diffraction_to_obj/model.keras", b"keras")
    argv = [a.format(tmp=tmp_path, bundle=small_bundle, scan=small_scan, tf=tf) for a in argv]
    code, out, err = _run(argv, capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert message in lines[0]
    assert "Traceback" not in err + out


def test_console_script_and_module_entry_points(tmp_path):
    exe = Path(sys.executable).with_name("ptycho-flavor")
    for command in ([str(exe)], [sys.executable, "-m", "mlflow_ptycho_flavor"]):
        done = subprocess.run([*command, "inspect", str(tmp_path / "nope.zip")], capture_output=True, text=True, timeout=120)
        assert done.returncode == 2
        assert done.stderr.startswith("error: no bundle at")
        assert "Traceback" not in done.stderr


@pytest.mark.slow
def test_demo_end_to_end_leaves_png_registered_model_and_bundle(tmp_path):
    # The README's first command, in quick mode (an 8 x 8 scan), from the shipped bundle, as a user starts it.
    out_dir = tmp_path / "demo"
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/demo.db"}
    done = subprocess.run(
        [sys.executable, "-m", "mlflow_ptycho_flavor", "demo", "--quick", "--out-dir", str(out_dir)],
        capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    table = dict(re.findall(r"^  (\S.*?\S)  +(.*)$", done.stdout, flags=re.MULTILINE))
    assert table["pyfunc == standalone zip"] == "True"
    assert table["model"].startswith("shipped bundle, trained offline by scripts/train_demo_bundle.py")
    assert "--from-scratch trains one here" in table["model"]
    # Even the small scan is reconstructed: the figures are printed and sensible (the full scan's are in the
    # README and tested in test_demo_bundle.py).
    assert float(table["stitched object error"]) < 0.2
    assert float(table["phase correlation"]) > 0.7
    png = out_dir / "reconstruction.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    network, params = load_torch_bundle(out_dir / "wts.h5.zip", device="cpu")
    assert params["N"] == 64 and params["intensity_scale"] > 0
    assert (out_dir / "wts.h5.zip").read_bytes() == shipped_bundle_path().read_bytes()
    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    mlflow.set_registry_uri(env["MLFLOW_TRACKING_URI"])
    version = mlflow.MlflowClient().get_model_version_by_alias("ptycho-demo", "champion")
    assert str(version.version) == "1"
    run = mlflow.get_run(version.run_id)
    assert run.data.params["model_source"] == "shipped demo bundle"
    assert float(run.data.metrics["phase_correlation"]) == pytest.approx(float(table["phase correlation"]), abs=1e-3)
    assert not (tmp_path / "mlruns").exists()  # artifacts went under the demo folder


def test_demo_from_scratch_trains_logs_and_reconstructs(tmp_path):
    # --from-scratch keeps the full path: train here, save, log + register, reload both ways, stitch, PNG.
    from mlflow_ptycho_flavor.demo import run_demo

    summary = run_demo(tmp_path / "demo", quick=True, from_scratch=True, seed=3)
    assert summary["pyfunc == standalone zip"] is True
    assert summary["model"].startswith("trained here: 8 steps x 8")
    assert " -> " in summary["held-out patch error (untrained -> trained)"]
    assert 0 < float(summary["stitched object error"]) < 1.5
    assert -1 <= float(summary["phase correlation"]) <= 1
    assert "train " in summary["timings (s)"]
    network, params = load_torch_bundle(tmp_path / "demo" / "wts.h5.zip", device="cpu")
    assert params["nepochs"] >= 1
    assert (tmp_path / "demo" / "reconstruction.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
