"""identify_artifact / describe_for_error: whatever a user hands over is named correctly, from bounded reads only,
and the bundle reader's refusals of foreign files say what they are and how to convert them.

Real containers throughout: upstream's checkpoint and bundle fixtures, checkpoints and state_dicts written here
with ``torch.save``, an MLflow model directory written by the flavor, a TensorFlow archive built with the member
names upstream's TensorFlow saver writes (docs/bundle-format.md §1.2; the archive itself is 4-9 MB, so a minimal
one stands in), NPZ files, random bytes.
"""

from __future__ import annotations

import io
import os
import pickle
import struct
import zipfile
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch

from mlflow_ptycho_flavor.sim.dataset import save_npz
from mlflow_ptycho_flavor.sim.simulate import simulate_dataset
from mlflow_ptycho_flavor.bundle import read_bundle
from mlflow_ptycho_flavor.bundle.identify import ArtifactKind, DetectLimits, describe_for_error, identify_artifact
from mlflow_ptycho_flavor.errors import (
    CorruptBundleError,
    NotABundleError,
    TensorFlowBundleError,
    UnsafeBundleError,
)
from mlflow_ptycho_flavor.network import NetworkConfig, PtychoPINNNetwork

FIXTURE = Path(__file__).resolve().parent / "data" / "checkpoints" / "main_n64_g1_default"
CKPT = FIXTURE / "main_n64_g1_default.ckpt"
BUNDLE = FIXTURE / "bundle_from_same_module" / "wts.h5.zip"


class _RunsCommand:
    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


@pytest.fixture(scope="module")
def fixture_payload() -> dict:
    return torch.load(CKPT, map_location="cpu", weights_only=True)


def _tensorflow_archive(path: Path) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("manifest.dill", pickle.dumps({"models": ["autoencoder", "diffraction_to_obj"],
                                                        "version": "1.0"}, protocol=4))
        for model in ("autoencoder", "diffraction_to_obj"):
            with zipfile.ZipFile(buffer := io.BytesIO(), "w") as keras:  # model.keras is itself a zip
                keras.writestr("config.json", "{}")
                keras.writestr("model.weights.h5", b"\x89HDF\r\n\x1a\n")
            archive.writestr(f"{model}/model.keras", buffer.getvalue())
            archive.writestr(f"{model}/custom_objects.dill", pickle.dumps({}, protocol=4))
            archive.writestr(f"{model}/params.dill", pickle.dumps({"N": 64, "gridsize": 1}, protocol=4))
            archive.writestr(f"{model}/model.h5", b"\x89HDF\r\n\x1a\n")
    return path


def test_lightning_checkpoint_gets_the_convert_command():
    info = identify_artifact(CKPT)
    assert info.kind is ArtifactKind.LIGHTNING_CHECKPOINT
    assert info.details["lightning_version"] == "2.6.6" and not info.older_era
    message = describe_for_error(CKPT)
    assert message.startswith(f"{CKPT} is a PyTorch Lightning checkpoint")
    assert f"ptycho-flavor convert {CKPT} out/wts.h5.zip" in message


def test_older_era_checkpoint_is_named_as_such(tmp_path, fixture_payload):
    payload = dict(fixture_payload)
    state = OrderedDict(payload["state_dict"])
    state["model.autoencoder.decoder_amp.merge_blocks.0.0.weight"] = torch.zeros(4, 4, 3, 3)
    payload["state_dict"] = state
    path = tmp_path / "best-checkpoint.ckpt"
    torch.save(payload, path)
    info = identify_artifact(path)
    assert info.kind is ArtifactKind.LIGHTNING_CHECKPOINT and info.older_era
    assert "E1" in info.description and "ptychodus 1.7" in info.description
    assert "convert" not in info.action and "re-train" in info.action


def test_bundle_and_directory_holding_one():
    info = identify_artifact(BUNDLE)
    assert info.kind is ArtifactKind.TORCH_BUNDLE and info.action == ""
    assert "torch_scaling_metadata.pt" in info.description
    # A folder holding wts.h5.zip is what every reader resolves to that file: identified by it.
    folder = identify_artifact(BUNDLE.parent)
    assert folder.kind is ArtifactKind.TORCH_BUNDLE and folder.path == BUNDLE
    assert folder.details["directory"] == str(BUNDLE.parent)


def test_tensorflow_archive(tmp_path):
    path = _tensorflow_archive(tmp_path / "wts.h5.zip")
    info = identify_artifact(path)
    assert info.kind is ArtifactKind.TENSORFLOW_ARCHIVE and not info.older_era
    assert "TensorFlow" in describe_for_error(path)
    assert f"ptycho-flavor convert {path} out/wts.h5.zip" in info.action


def test_savedmodel_era_tensorflow_archive_and_directories(tmp_path):
    """SavedModel-era archives (zip or loose folder) are TensorFlow, named as the era no converter reads."""
    path = tmp_path / "saved.zip"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("manifest.dill", pickle.dumps({"models": ["diffraction_to_obj"], "version": "1.0"}))
        archive.writestr("diffraction_to_obj/saved_model.pb", b"\x08\x01")
        archive.writestr("diffraction_to_obj/variables/variables.index", b"")
    info = identify_artifact(path)
    assert info.kind is ArtifactKind.TENSORFLOW_ARCHIVE and info.older_era
    assert "SavedModel" in info.description and "f32b85f" in info.action and "convert it" not in info.action
    folder = tmp_path / "exported" / "diffraction_to_obj"
    folder.mkdir(parents=True)
    (folder / "saved_model.pb").write_bytes(b"\x08\x01")
    info = identify_artifact(folder.parent)
    assert info.kind is ArtifactKind.TENSORFLOW_ARCHIVE and info.older_era
    extracted = tmp_path / "extracted" / "diffraction_to_obj"
    extracted.mkdir(parents=True)
    (extracted / "model.keras").write_bytes(b"PK\x05\x06" + bytes(18))
    info = identify_artifact(extracted.parent)
    assert info.kind is ArtifactKind.DIRECTORY and "extracted TensorFlow" in info.description
    assert "wts.h5.zip archive itself" in info.action


def test_bare_state_dict(tmp_path):
    network = PtychoPINNNetwork(NetworkConfig(N=64, C_model=1, n_filters_scale=1))
    path = tmp_path / "model.pth"
    torch.save(network.state_dict(), path)
    info = identify_artifact(path)
    assert info.kind is ArtifactKind.BARE_STATE_DICT
    assert info.details["tensors"] == len(network.state_dict())
    assert "no model configuration" in info.description and "save_torch_bundle" in info.action


def test_torch_file_pickling_objects_is_unknown_and_runs_nothing(tmp_path, fixture_payload):
    marker = tmp_path / "pwned"
    path = tmp_path / "module.pt"
    torch.save({"model": torch.nn.Linear(2, 2), "evil": _RunsCommand(f"touch {marker}")}, path)
    info = identify_artifact(path)
    assert info.kind is ArtifactKind.UNKNOWN and "pickles Python objects" in info.description
    assert "posix.system" in info.details["globals"] and "torch.nn.modules.linear.Linear" in info.details["globals"]
    hostile_ckpt = tmp_path / "hostile.ckpt"
    torch.save({**fixture_payload, "callbacks": {"x": _RunsCommand(f"touch {marker}")}}, hostile_ckpt)
    assert identify_artifact(hostile_ckpt).kind is ArtifactKind.LIGHTNING_CHECKPOINT
    assert not marker.exists()


def test_mlflow_model_directory(tmp_path):
    from mlflow_ptycho_flavor import save_model

    network = PtychoPINNNetwork(NetworkConfig(N=64, C_model=1, n_filters_scale=1))
    target = tmp_path / "model"
    save_model(network, target)
    info = identify_artifact(target)
    assert info.kind is ArtifactKind.MLFLOW_MODEL_DIR
    assert {"ptycho_torch", "python_function"} <= set(info.details["flavors"])
    assert "load_model" in info.action
    assert identify_artifact(target / "wts.h5.zip").kind is ArtifactKind.TORCH_BUNDLE


def test_npz_dataset(tmp_path):
    path = tmp_path / "data.npz"
    save_npz(simulate_dataset(N=64, n_scan=4, seed=0), path)
    info = identify_artifact(path)
    assert info.kind is ArtifactKind.NPZ_DATASET and "ptychography dataset" in info.description
    assert {"diff3d", "xcoords", "ycoords", "probeGuess"} <= set(info.details["keys"])
    assert "not a model" in describe_for_error(path)


@pytest.mark.parametrize(
    "content, expected",
    [
        (np.random.default_rng(0).bytes(4096), "not a recognised format"),
        (b"", "an empty file"),
        (b"PK\x03\x04" + bytes(200), "truncated"),
        (b"\x89HDF\r\n\x1a\n" + bytes(64), "HDF5"),
        (pickle.dumps({"a": 1}, protocol=2), "plain pickle"),
    ],
)
def test_other_bytes_are_unknown_with_a_reason(tmp_path, content, expected):
    path = tmp_path / "thing.bin"
    path.write_bytes(content)
    info = identify_artifact(path)
    assert info.kind is ArtifactKind.UNKNOWN and expected in info.description


def test_missing_path_and_plain_directory(tmp_path):
    assert identify_artifact(tmp_path / "nope").description == "a path that does not exist"
    (tmp_path / "notes.txt").write_text("x")
    info = identify_artifact(tmp_path)
    assert info.kind is ArtifactKind.DIRECTORY and "'notes.txt'" in info.description


def test_zip_directory_is_capped_before_it_is_parsed(tmp_path):
    info = identify_artifact(CKPT, limits=DetectLimits(max_entries=64))
    assert info.kind is ArtifactKind.UNKNOWN and "248 entries" in info.description
    # A crafted end record claiming 2**32 entries is described from those 22 bytes alone.
    forged = tmp_path / "forged.zip"
    forged.write_bytes(b"PK\x03\x04" + bytes(30) + b"PK\x05\x06" + struct.pack("<4H2IH", 0, 0, 0xFFFF, 0xFFFF,
                                                                                 0xFFFFFFF0, 0, 0))
    info = identify_artifact(forged)
    assert info.kind is ArtifactKind.UNKNOWN and "too large" in info.description


def test_long_paths_are_shortened_in_messages(tmp_path):
    deep = tmp_path / ("d" * 120) / ("e" * 120)
    deep.mkdir(parents=True)
    path = deep / "weights.ckpt"
    path.write_bytes(b"junk")
    message = describe_for_error(path)
    assert message.split(" is ", 1)[0].endswith("...") and len(message.split(" is ", 1)[0]) == 200


# ----------------------------------------------------------------------------------------------------------------
# The bundle reader names what a foreign file is (docs/bundle-format.md §11), with the fix
# ----------------------------------------------------------------------------------------------------------------
def _zip_of(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return path


@pytest.mark.parametrize(
    ("make", "error", "fragments"),
    [
        (lambda d: CKPT, NotABundleError,
         ["is not a PtychoPINN bundle but a PyTorch Lightning checkpoint", f"ptycho-flavor convert {CKPT} out/"]),
        (lambda d: _tensorflow_archive(d / "wts.h5.zip"), TensorFlowBundleError,
         ["is a TensorFlow PtychoPINN archive (manifest version '1.0'", "not a PyTorch bundle", "ptycho-flavor convert"]),
        (lambda d: torch.save(PtychoPINNNetwork(NetworkConfig(N=64, C_model=1, n_filters_scale=1)).state_dict(),
                              d / "model.pth") or d / "model.pth", NotABundleError,
         ["is not a PtychoPINN bundle but a bare PyTorch state_dict", "save_torch_bundle"]),
        (lambda d: save_npz(simulate_dataset(N=64, n_scan=4, seed=0), d / "scan.npz") or d / "scan.npz",
         NotABundleError, ["is not a PtychoPINN bundle but a NumPy .npz archive", "not a model"]),
        (lambda d: (d / "x.zip").write_bytes(np.random.default_rng(1).bytes(512)) and d / "x.zip", NotABundleError,
         ["is not a zip archive", "It is not a recognised format"]),
        (lambda d: _zip_of(d / "many.zip", {f"f{i}.txt": b"x" for i in range(70)}), UnsafeBundleError,
         ["lists 70 members (limit 64)", "It is a zip archive of another kind"]),
        (lambda d: _zip_of(d / "readme.zip", {"readme.txt": b"hello"}), CorruptBundleError,
         ["has no manifest.dill", "It is a zip archive of another kind (members 'readme.txt')"]),
    ],
    ids=["checkpoint", "tensorflow", "bare-state-dict", "npz", "random-bytes", "many-members", "no-manifest"],
)
def test_bundle_reader_refusals_name_what_the_file_is(tmp_path, make, error, fragments):
    path = make(tmp_path)
    with pytest.raises(error) as excinfo:
        read_bundle(path)
    assert type(excinfo.value) is error
    for fragment in fragments:
        assert fragment in str(excinfo.value)
