"""``ptycho-flavor convert SRC DST``: detection, dispatch to the right converter, refusals that write nothing.

Sources are the upstream-written fixtures (``tests/data/checkpoints``, ``tests/data/tensorflow``) and real
containers made here: a bare state_dict and an older-era checkpoint written with ``torch.save``, an MLflow model
directory written by the flavor, an NPZ dataset, random bytes. Commands run in-process through ``cli.main``, plus
one run of the console script, as a user starts it.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import shutil
import subprocess
import sys
import zipfile
from collections import OrderedDict
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch

from mlflow_ptycho_flavor import cli, load_torch_bundle, read_bundle
from mlflow_ptycho_flavor.convert.checkpoint import read_checkpoint
from mlflow_ptycho_flavor.convert.tensorflow import read_tf_archive
from mlflow_ptycho_flavor.network import NetworkConfig, PtychoPINNNetwork
from mlflow_ptycho_flavor.sim.dataset import save_npz
from mlflow_ptycho_flavor.sim.simulate import simulate_dataset

DATA = Path(__file__).resolve().parent / "data"
CKPT_DIR = DATA / "checkpoints" / "main_n64_g1_default"
CKPT = CKPT_DIR / "main_n64_g1_default.ckpt"
TORCH_BUNDLE = CKPT_DIR / "bundle_from_same_module" / "wts.h5.zip"
TF_DIR = DATA / "tensorflow" / "tf_n64_g1_s1_probe_tensor"
TF_ARCHIVE = TF_DIR / "wts.h5.zip"
#: Recorded checkpoint output: the fixture README measures ~1.2e-7 of kernel noise and suggests 5e-5.
CKPT_TOLERANCE = 5e-5
#: Recorded TF ``obj``: float32 rounding between frameworks, relative to max|obj| (tests/data/tensorflow/README.md).
TF_RELATIVE_TOLERANCE = 1e-4


def _run(argv: list[str], capsys) -> tuple[int, str, str]:
    code = cli.main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _io(folder: Path) -> dict[str, np.ndarray]:
    with np.load(folder / "io.npz") as data:
        return {key: data[key] for key in data.files}


def _forward(network: PtychoPINNNetwork, x: np.ndarray, factor: np.ndarray | None = None) -> np.ndarray:
    factors = torch.ones(x.shape[0], 1, 1, 1) if factor is None else torch.from_numpy(factor)
    with torch.no_grad():
        return network(torch.from_numpy(x), factors).numpy()


def _listing(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


# ----------------------------------------------------------------------------------------------------------------
# Conversions
# ----------------------------------------------------------------------------------------------------------------
def test_checkpoint_converts_and_the_bundle_loads_strictly(tmp_path, capsys):
    dst = tmp_path / "out" / "wts.h5.zip"
    code, out, err = _run(["convert", str(CKPT), str(dst)], capsys)
    assert code == 0, err
    assert err == ""
    assert out.splitlines()[0] == f"converted lightning checkpoint {CKPT} -> {dst}"
    assert _sha256(CKPT) in out
    network, _ = load_torch_bundle(dst, device="cpu")  # strict load, CONFIG-001 restore
    data = _io(CKPT_DIR)
    result = _forward(network, data["x"], data["input_scale_factor"])
    assert float(np.abs(result - data["output"]).max()) <= CKPT_TOLERANCE
    expected = read_checkpoint(CKPT).state_dict
    stored = read_bundle(dst).state_dict
    assert list(stored) == list(expected) and all(torch.equal(stored[k], expected[k]) for k in expected)
    provenance = read_bundle(dst).manifest["provenance"]
    assert provenance["converted_from"] == "lightning_checkpoint"
    assert provenance["source"]["sha256"] == _sha256(CKPT)
    assert "optimizer_states" in provenance["dropped"]


def test_checkpoint_intensity_scale_is_recorded(tmp_path, capsys):
    code, _, err = _run(["convert", str(CKPT), str(tmp_path / "model.zip"), "--intensity-scale", "988.5"], capsys)
    assert code == 0, err
    assert read_bundle(tmp_path / "model.zip").params["intensity_scale"] == 988.5


def test_tensorflow_archive_converts_from_the_file_and_its_folder(tmp_path, capsys):
    bundles = []
    for number, src in enumerate((TF_ARCHIVE, TF_DIR)):
        dst = tmp_path / f"out{number}"
        dst.mkdir()
        code, out, err = _run(["convert", str(src), str(dst)], capsys)
        assert code == 0, err
        assert out.splitlines()[0] == f"converted tensorflow archive {TF_ARCHIVE} -> {dst / 'wts.h5.zip'}"
        bundles.append(dst / "wts.h5.zip")
    data = _io(TF_DIR)
    network, _ = load_torch_bundle(bundles[0], device="cpu")
    result = _forward(network, data["x_normed_nchw"])
    bound = TF_RELATIVE_TOLERANCE * float(np.abs(data["obj"]).max())
    assert float(np.abs(result - data["obj"]).max()) <= bound
    first, second = (read_bundle(b) for b in bundles)
    assert all(torch.equal(first.state_dict[k], second.state_dict[k]) for k in first.state_dict)
    assert first.manifest["provenance"]["source"]["sha256"] == _sha256(TF_ARCHIVE)
    # The same network the converter builds in memory (same process: bitwise).
    np.testing.assert_array_equal(result, _forward(read_tf_archive(TF_ARCHIVE).build_network(), data["x_normed_nchw"]))


# ----------------------------------------------------------------------------------------------------------------
# Refusals: one error line, exit 2, nothing written
# ----------------------------------------------------------------------------------------------------------------
def _bare_state_dict(folder: Path) -> Path:
    path = folder / "weights.pth"
    torch.save(PtychoPINNNetwork(NetworkConfig(N=64, C_model=1, n_filters_scale=1)).state_dict(), path)
    return path


def _older_era_checkpoint(folder: Path) -> Path:
    payload = torch.load(CKPT, map_location="cpu", weights_only=True)
    state = OrderedDict(payload["state_dict"])
    state["model.autoencoder.decoder_amp.merge_blocks.0.0.weight"] = torch.zeros(4, 4, 3, 3)
    payload["state_dict"] = state
    path = folder / "latent.ckpt"
    torch.save(payload, path)
    return path


def _mlflow_model_dir(folder: Path) -> Path:
    path = folder / "logged"
    mlflow.ptycho_torch.save_model(PtychoPINNNetwork(NetworkConfig(N=64, C_model=1, n_filters_scale=1)), path)
    return path


def _npz_dataset(folder: Path) -> Path:
    path = folder / "scan.npz"
    save_npz(simulate_dataset(N=64, n_scan=4, seed=0), path)
    return path


def _random_bytes(folder: Path) -> Path:
    path = folder / "model.ckpt"
    path.write_bytes(np.random.default_rng(3).bytes(4096))
    return path


def _savedmodel_dir(folder: Path) -> Path:
    (folder / "exported" / "diffraction_to_obj").mkdir(parents=True)
    (folder / "exported" / "diffraction_to_obj" / "saved_model.pb").write_bytes(b"\x08\x01")
    return folder / "exported"


@pytest.mark.parametrize(
    ("make", "extra", "message"),
    [
        (lambda folder: TORCH_BUNDLE, [], "is a PyTorch PtychoPINN bundle"),
        (_bare_state_dict, [], "is a bare PyTorch state_dict"),
        (_mlflow_model_dir, [], "is an MLflow model directory (flavors ptycho_torch, python_function)"),
        (_npz_dataset, [], "is a NumPy .npz archive of a ptychography dataset"),
        (_random_bytes, [], "is not a recognised format"),
        (lambda folder: folder / "missing.ckpt", [], "is a path that does not exist"),
        (_older_era_checkpoint, [], "older E1 architecture era"),
        (_savedmodel_dir, [], "SavedModel directory"),
        (lambda folder: TF_ARCHIVE, ["--intensity-scale", "2"], "applies to Lightning checkpoints only"),
    ],
    ids=["torch-bundle", "bare-state-dict", "mlflow-model-dir", "npz-dataset", "random-bytes", "missing",
         "older-era-checkpoint", "savedmodel-dir", "tf-with-intensity-scale"],
)
def test_refusals_print_one_line_exit_2_and_write_nothing(tmp_path, capsys, make, extra, message):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    src = make(inputs)
    before = _listing(tmp_path)
    code, out, err = _run(["convert", str(src), str(tmp_path / "out" / "wts.h5.zip"), *extra], capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert message in lines[0]
    assert "Traceback" not in err + out
    assert _listing(tmp_path) == before  # no bundle, no folder, no temporary file


def test_refusal_of_a_bundle_says_what_to_do_instead(tmp_path, capsys):
    code, _, err = _run(["convert", str(TORCH_BUNDLE), str(tmp_path / "copy.zip")], capsys)
    assert code == 2
    assert "nothing to convert" in err and "ptycho-flavor log" in err


def test_destination_that_is_the_source_is_refused_and_kept(tmp_path, capsys):
    for name, src in (("ckpt.zip", CKPT), ("tf.zip", TF_ARCHIVE)):
        path = tmp_path / name
        shutil.copyfile(src, path)
        code, _, err = _run(["convert", str(path), str(path)], capsys)
        assert code == 2 and "itself" in err, err
        assert path.read_bytes() == src.read_bytes()


def test_a_damaged_tensorflow_archive_is_refused_and_an_existing_destination_kept(tmp_path, capsys):
    work = tmp_path / "work"
    work.mkdir()
    damaged = work / "damaged.zip"
    with zipfile.ZipFile(TF_ARCHIVE) as archive, zipfile.ZipFile(damaged, "w") as out:
        for info in archive.infolist():
            if info.filename != "diffraction_to_obj/model.h5":
                out.writestr(info.filename, archive.read(info))
    dst = work / "wts.h5.zip"
    dst.write_bytes(b"previous bundle")
    code, _, err = _run(["convert", str(damaged), str(dst)], capsys)
    assert code == 2 and "diffraction_to_obj/model.h5" in err, err
    assert dst.read_bytes() == b"previous bundle"
    assert sorted(p.name for p in work.iterdir()) == ["damaged.zip", "wts.h5.zip"]


def test_console_script_refusal(tmp_path):
    src = _random_bytes(tmp_path)
    exe = Path(sys.executable).with_name("ptycho-flavor")
    done = subprocess.run([str(exe), "convert", str(src), str(tmp_path / "out.zip")], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and done.stderr.startswith(f"error: {src} is not a recognised format")
    assert not (tmp_path / "out.zip").exists()


def test_help_lists_convert(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    assert "convert" in capsys.readouterr().out


class _RunsCommand:
    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def test_code_carrying_files_named_like_checkpoints_run_nothing(tmp_path, capsys):
    """A plain pickle (legacy torch.save) and a torch.save zip that pickles objects are named, never unpickled."""
    marker = tmp_path / "pwned"
    legacy = tmp_path / "legacy.ckpt"
    legacy.write_bytes(pickle.dumps({"state_dict": _RunsCommand(f"touch {marker}")}, protocol=2))
    code, _, err = _run(["convert", str(legacy), str(tmp_path / "out.zip")], capsys)
    assert code == 2 and "plain pickle" in err and "never unpickles" in err
    objects = tmp_path / "objects.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": _RunsCommand(f"touch {marker}")}, objects)
    code, _, err = _run(["convert", str(objects), str(tmp_path / "out.zip")], capsys)
    assert code == 2 and "pickles Python objects" in err and "posix.system" in err, err
    assert not marker.exists()
    assert not (tmp_path / "out.zip").exists()
