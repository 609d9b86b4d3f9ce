"""Lightning checkpoints of upstream's training -> bundles (tests/data/checkpoints, written by upstream itself).

The fixture checkpoint comes with the reference output of upstream's own ``load_from_checkpoint`` +
``forward_predict`` and with the bundle upstream wrote from the same trained module. Its weights are barely
trained (4 Adam steps), so the output check is weak on its own: every tensor's bytes are compared too, against
the bundle and against the sha256 table of ``meta.json``. Hostile and foreign checkpoints are built here with
``torch.save`` (the container upstream's files use) from the fixture's own weights and configs.
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import os
import pickle
import struct
import tracemalloc
import zipfile
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch

from mlflow_ptycho_flavor import load_torch_bundle, read_bundle
from mlflow_ptycho_flavor.convert.checkpoint import (
    CHECKPOINT_ALLOWED_GLOBALS,
    CheckpointLimits,
    LightningCheckpoint,
    _unpickle,
    convert_checkpoint,
    read_checkpoint,
)
from mlflow_ptycho_flavor.errors import (
    ArchitectureEraError,
    BundleError,
    CheckpointError,
    CorruptCheckpointError,
    NotACheckpointError,
    StateDictMismatchError,
    UnsafeCheckpointError,
    UnsupportedBundleError,
    UnsupportedCheckpointError,
)

FIXTURE = Path(__file__).resolve().parent / "data" / "checkpoints" / "main_n64_g1_default"
CKPT = FIXTURE / "main_n64_g1_default.ckpt"
UPSTREAM_BUNDLE = FIXTURE / "bundle_from_same_module" / "wts.h5.zip"
#: Acceptance for recorded outputs: the fixture README measures equivalent-kernel noise of ~1.2e-7 (mkldnn off,
#: float64 evaluation) and suggests 5e-5, the same bound as the upstream bundle fixtures.
TOLERANCE = 5e-5


@pytest.fixture(scope="module")
def meta() -> dict:
    return json.loads((FIXTURE / "meta.json").read_text())


@pytest.fixture(scope="module")
def io_npz() -> dict[str, np.ndarray]:
    with np.load(FIXTURE / "io.npz") as data:
        return {k: data[k] for k in data.files}


@pytest.fixture(scope="module")
def checkpoint() -> LightningCheckpoint:
    return read_checkpoint(CKPT)


@pytest.fixture(scope="module")
def converted(tmp_path_factory, checkpoint) -> Path:
    return convert_checkpoint(CKPT, tmp_path_factory.mktemp("converted") / "out" / "wts.h5.zip")


def _member(bundle: Path, name: str) -> bytes:
    with zipfile.ZipFile(bundle) as archive:
        return archive.read(name)


def _torch_member(bundle: Path, name: str):
    return torch.load(io.BytesIO(_member(bundle, name)), map_location="cpu", weights_only=True)


def _predict(bundle: Path, io_npz: dict) -> np.ndarray:
    network, _ = load_torch_bundle(bundle, device="cpu")
    with torch.no_grad():
        return network(torch.from_numpy(io_npz["x"]), torch.from_numpy(io_npz["input_scale_factor"])).numpy()


def _write_ckpt(path: Path, checkpoint: LightningCheckpoint, *, state_dict=None, hyper_parameters=None, **extra):
    """A Lightning-shaped checkpoint written by torch.save (the container of real ones), with chosen contents."""
    payload = {
        "epoch": 0,
        "global_step": 4,
        "pytorch-lightning_version": "2.6.6",
        "state_dict": checkpoint.state_dict if state_dict is None else state_dict,
        "optimizer_states": [{"state": {0: {"exp_avg": torch.ones(3)}}, "param_groups": [{"lr": 1e-3}]}],
        "hparams_name": None,
        "hyper_parameters": copy.deepcopy(checkpoint.hyper_parameters) if hyper_parameters is None else hyper_parameters,
        **extra,
    }
    torch.save(payload, path)
    return path


# ----------------------------------------------------------------------------------------------------------------
# The fixture converts exactly
# ----------------------------------------------------------------------------------------------------------------
def test_read_keeps_weights_and_configs_and_drops_training_state(checkpoint, meta):
    recorded = meta["checkpoint"]
    assert list(checkpoint.state_dict) == [e["key"] for e in recorded["state_dict"]["entries"]]
    assert checkpoint.hyper_parameters == torch.load(CKPT, map_location="cpu", weights_only=True)["hyper_parameters"]
    assert checkpoint.lightning_version == recorded["scalars"]["pytorch-lightning_version"]
    assert (checkpoint.epoch, checkpoint.global_step) == (recorded["scalars"]["epoch"], recorded["scalars"]["global_step"])
    assert set(checkpoint.dropped) == {"loops", "callbacks", "optimizer_states", "lr_schedulers", "hparams_name"}
    assert checkpoint.ci_statistics is None
    assert isinstance(checkpoint.hyper_parameters["data_config"]["grid_size"], tuple)


def test_allow_list_is_exactly_what_the_fixture_references(meta):
    referenced = {tuple(g.rsplit(".", 1)) for g in meta["checkpoint"]["pickle"]["globals_referenced"]}
    assert referenced <= CHECKPOINT_ALLOWED_GLOBALS
    # The extras: LongStorage for the g2_bn fixture's int64 num_batches_tracked (fixture README, globals table) and
    # ComplexFloatStorage for FNO-family spectral weights (tests/test_fno_bundles.py converts such checkpoints)
    assert CHECKPOINT_ALLOWED_GLOBALS - referenced == {("torch", "LongStorage"), ("torch", "ComplexFloatStorage")}


def test_converted_bundle_loads_strictly_and_reproduces_upstream_output(converted, io_npz):
    out = _predict(converted, io_npz)
    assert out.dtype == np.complex64 and out.shape == io_npz["output"].shape
    assert float(np.abs(out - io_npz["output"]).max()) <= TOLERANCE


def test_converted_bundle_equals_the_bundle_upstream_wrote_from_the_same_module(converted, io_npz):
    # Outputs: both bundles through the same loader in this process -> bitwise.
    np.testing.assert_array_equal(_predict(converted, io_npz), _predict(UPSTREAM_BUNDLE, io_npz))
    ours = _torch_member(converted, "diffraction_to_obj/model.pth")
    theirs = _torch_member(UPSTREAM_BUNDLE, "diffraction_to_obj/model.pth")
    assert list(ours) == list(theirs)
    for key in theirs:
        assert ours[key].dtype == theirs[key].dtype and ours[key].shape == theirs[key].shape, key
        assert ours[key].contiguous().numpy().tobytes() == theirs[key].contiguous().numpy().tobytes(), key
    assert ours._metadata == theirs._metadata
    assert _torch_member(converted, "autoencoder/model.pth") == {"_sentinel": "autoencoder"}


def test_state_dict_bytes_match_the_recorded_sha256_table(converted, meta):
    entries = meta["checkpoint"]["state_dict"]["entries"]
    state = _torch_member(converted, "diffraction_to_obj/model.pth")
    assert len(state) == len(entries) == 63
    for entry in entries:
        tensor = state[entry["key"]]
        assert list(tensor.shape) == entry["shape"] and str(tensor.dtype).removeprefix("torch.") == entry["dtype"]
        digest = hashlib.sha256(tensor.contiguous().numpy().astype(tensor.numpy().dtype.newbyteorder("<")).tobytes())
        assert digest.hexdigest() == entry["sha256_le_bytes"], entry["key"]


def test_metadata_equals_the_checkpoint_configs_including_types(converted, checkpoint):
    ours = _torch_member(converted, "torch_scaling_metadata.pt")
    theirs = _torch_member(UPSTREAM_BUNDLE, "torch_scaling_metadata.pt")
    assert list(ours) == ["schema_version", "data_config", "model_config", "training_config", "inference_config",
                          "ci_statistics"]
    assert ours == theirs
    for name in ("data_config", "model_config", "training_config", "inference_config"):
        assert ours[name] == checkpoint.hyper_parameters[name]
        assert list(ours[name]) == list(theirs[name])
        assert {k: type(v) for k, v in ours[name].items()} == {k: type(v) for k, v in theirs[name].items()}


def test_params_snapshot_follows_the_configs(converted):
    ours = read_bundle(converted).params
    theirs = read_bundle(UPSTREAM_BUNDLE).params
    assert list(ours) == list(theirs)
    # Not in a checkpoint (fixture README, params.dill section): the physics scale and the test file path;
    # intensity_scale.trainable is taken from the network (False), like save_torch_bundle writes it.
    unsourced = {"intensity_scale", "intensity_scale.trainable", "test_data_file_path"}
    assert {k for k in ours if ours[k] != theirs[k]} == unsourced
    assert ours["intensity_scale"] == 1.0 and ours["intensity_scale.trainable"] is False
    recorded = convert_checkpoint(CKPT, converted.with_name("scaled.zip"), intensity_scale=988.2117919921875)
    assert read_bundle(recorded).params["intensity_scale"] == theirs["intensity_scale"]


def test_manifest_and_layout_match_upstream(converted):
    with zipfile.ZipFile(converted) as ours, zipfile.ZipFile(UPSTREAM_BUNDLE) as theirs:
        assert sorted(ours.namelist()) == sorted(theirs.namelist())
    manifest = pickle.loads(_member(converted, "manifest.dill"))
    assert manifest["models"] == ["diffraction_to_obj", "autoencoder"] and manifest["version"] == "2.0-pytorch"
    assert read_bundle(converted).hashes_verified  # every member's sha256 is recorded and checks


def test_destination_forms(tmp_path, checkpoint):
    assert convert_checkpoint(checkpoint, tmp_path) == tmp_path / "wts.h5.zip"
    assert convert_checkpoint(checkpoint, tmp_path / "batch" / "model.zip") == tmp_path / "batch" / "model.zip"
    assert convert_checkpoint(checkpoint, tmp_path / "base" / "wts.h5") == tmp_path / "base" / "wts.h5.zip"
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["base", "batch", "model.zip", "wts.h5.zip", "wts.h5.zip"]


def test_training_state_is_never_read(tmp_path, checkpoint):
    """Deleting every storage record the state_dict does not use (Adam moments, callback scores) changes nothing."""
    with zipfile.ZipFile(CKPT) as archive:
        pickled = archive.read("archive/data.pkl")
        value = _unpickle(pickled, "data.pkl", CheckpointLimits())
        kept = {f"archive/data/{ref.storage.key}" for ref in value["state_dict"].values()}
        stripped = tmp_path / "stripped.ckpt"
        with zipfile.ZipFile(stripped, "w", zipfile.ZIP_STORED) as out:
            for info in archive.infolist():
                if not info.filename.startswith("archive/data/") or info.filename in kept:
                    out.writestr(info.filename, archive.read(info))
    assert len(kept) == 63 and len(zipfile.ZipFile(stripped).namelist()) == 63 + 6
    again = read_checkpoint(stripped)
    for key, tensor in checkpoint.state_dict.items():
        assert torch.equal(again.state_dict[key], tensor)


# ----------------------------------------------------------------------------------------------------------------
# Hostile checkpoints run nothing
# ----------------------------------------------------------------------------------------------------------------
class _RunsCommand:
    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


@pytest.mark.parametrize(
    "payload, global_name",
    [
        ("os.system", "system"),
        ("pathlib", "pathlib.PosixPath"),
        ("module", "torch.nn.modules.linear.Linear"),
    ],
)
def test_hostile_checkpoint_runs_nothing_and_names_the_global(tmp_path, checkpoint, payload, global_name):
    marker = tmp_path / "pwned"
    if payload == "os.system":
        extra = {"callbacks": {"Evil": _RunsCommand(f"touch {marker}")}}
    elif payload == "pathlib":
        hyper = copy.deepcopy(checkpoint.hyper_parameters)
        hyper["training_config"]["output_dir"] = Path("/tmp/out")
        extra = {"hyper_parameters": hyper}
    else:
        extra = {"loops": torch.nn.Linear(2, 2)}
    path = _write_ckpt(tmp_path / "hostile.ckpt", checkpoint, **extra)
    dst = tmp_path / "out" / "wts.h5.zip"
    with pytest.raises(UnsafeCheckpointError, match=global_name.replace(".", r"\.")) as excinfo:
        convert_checkpoint(path, dst)
    assert isinstance(excinfo.value, CheckpointError) and "refused" in str(excinfo.value)
    assert not marker.exists()
    assert not dst.parent.exists() or not any(dst.parent.iterdir())


def test_pickle_that_calls_a_storage_type_or_fakes_records_is_refused(tmp_path, checkpoint):
    """Hand-written pickles: a storage class called directly, and a tensor rebuilt from a non-storage."""
    calls_storage = b"\x80\x02ctorch\nFloatStorage\n(K\x05tR."  # torch.FloatStorage(5)
    fake_rebuild = b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n(K\x00K\x00)))\x89tR."
    for number, pickled in enumerate((calls_storage, fake_rebuild)):
        path = tmp_path / f"crafted{number}.ckpt"
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr("archive/data.pkl", pickled)
            archive.writestr("archive/version", "3\n")
        with pytest.raises(UnsafeCheckpointError):
            read_checkpoint(path)


def _shared_tuple_key_pickle(levels: int) -> bytes:
    """``{t: 1}`` where ``t = (u, u)``, ``u = (v, v)``, ... ``levels`` deep: 2**levels steps to hash the one key."""
    data = b"\x80\x02K\x00q\x00"  # 0, memo 0
    for level in range(levels):
        data += b"h" + bytes([level]) + b"h" + bytes([level]) + b"\x86q" + bytes([level + 1])  # (prev, prev)
    return data + b"}q\xfeh" + bytes([levels]) + b"K\x01s."


@pytest.mark.parametrize(
    "pickled, match",
    [
        (b"\x80\x02}r" + struct.pack("<I", 2**26) + b".", r"stores into pickle memo slot 67108864"),
        (_shared_tuple_key_pickle(60), r"'billion laughs' pickle"),
        (b"\x80\x05\x8e" + struct.pack("<Q", 2**33) + b"x.", r"expected 8589934592 bytes in a bytes8"),
    ],
    ids=["memo-slot-1GB", "shared-tuple-key", "bytes8-8GB-declared"],
)
def test_pickle_whose_decoding_alone_would_exhaust_memory_or_time_is_refused(tmp_path, pickled, match):
    """Refused before the C unpickler runs: it would size its memo to 2**27 slots, hash one key 2**60 steps long, or
    allocate 8 GiB for a payload the file does not hold."""
    path = tmp_path / "crafted.ckpt"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", pickled)
        archive.writestr("archive/version", "3\n")
    tracemalloc.start()
    try:
        with pytest.raises(CheckpointError, match=match):
            read_checkpoint(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 * 2**20


def test_damaged_storage_is_refused_and_existing_destination_kept(tmp_path):
    damaged = tmp_path / "damaged.ckpt"
    with zipfile.ZipFile(CKPT) as archive, zipfile.ZipFile(damaged, "w") as out:
        for info in archive.infolist():
            data = archive.read(info)
            out.writestr(info.filename, data[:-4] if info.filename == "archive/data/0" else data)
    dst = tmp_path / "wts.h5.zip"
    dst.write_bytes(b"previous bundle")
    with pytest.raises(CorruptCheckpointError, match="archive/data/0"):
        convert_checkpoint(damaged, dst)
    assert dst.read_bytes() == b"previous bundle"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["damaged.ckpt", "wts.h5.zip"]


def test_size_caps(tmp_path):
    with pytest.raises(UnsafeCheckpointError, match="max_weight_bytes|weight cap"):
        read_checkpoint(CKPT, limits=CheckpointLimits(max_weight_bytes=100_000))
    with pytest.raises(UnsafeCheckpointError, match="entries"):
        read_checkpoint(CKPT, limits=CheckpointLimits(max_members=64))
    with pytest.raises(UnsafeCheckpointError, match="data.pkl"):
        read_checkpoint(CKPT, limits=CheckpointLimits(max_pickle_bytes=1000))


# ----------------------------------------------------------------------------------------------------------------
# What cannot be converted is refused, naming why
# ----------------------------------------------------------------------------------------------------------------
def test_older_era_checkpoint_with_merge_blocks_is_refused_naming_the_era(tmp_path, checkpoint):
    state = OrderedDict(checkpoint.state_dict)
    for head in ("amp", "phase"):
        for block in (0, 1):
            for layer in (0, 2):
                state[f"model.autoencoder.decoder_{head}.merge_blocks.{block}.{layer}.weight"] = torch.zeros(4, 4, 3, 3)
                state[f"model.autoencoder.decoder_{head}.merge_blocks.{block}.{layer}.bias"] = torch.zeros(4)
    del state["model.forward_model.alpha"], state["model.forward_model.beta"]
    path = _write_ckpt(tmp_path / "latent.ckpt", checkpoint, state_dict=state)
    with pytest.raises(ArchitectureEraError, match="E1") as excinfo:
        convert_checkpoint(path, tmp_path / "wts.h5.zip")
    message = str(excinfo.value)
    assert "merge_blocks" in message and "ptychodus 1.7" in message and "latent_experimental" in message
    assert not (tmp_path / "wts.h5.zip").exists()


def test_older_era_configs_are_refused_even_with_current_weights(tmp_path, checkpoint):
    hyper = copy.deepcopy(checkpoint.hyper_parameters)
    hyper["model_config"]["use_reference_model"] = False
    hyper["model_config"]["architecture"] = "unet"
    del hyper["model_config"]["physics_forward_mode"]
    for extra in ("generator_output", "generator_overrides", "parity_scale_mode", "parity_fixed_delta",
                  "parity_init_scheme"):
        del hyper[extra]
    path = _write_ckpt(tmp_path / "latent_configs.ckpt", checkpoint, hyper_parameters=hyper)
    with pytest.raises(ArchitectureEraError, match="unet"):
        convert_checkpoint(path, tmp_path / "wts.h5.zip")


def test_lightning_extras_a_bundle_cannot_carry_are_refused(tmp_path, checkpoint):
    hyper = copy.deepcopy(checkpoint.hyper_parameters)
    hyper["parity_scale_mode"] = "tied"
    path = _write_ckpt(tmp_path / "parity.ckpt", checkpoint, hyper_parameters=hyper)
    with pytest.raises(UnsupportedCheckpointError, match="parity_scale_mode"):
        convert_checkpoint(path, tmp_path / "wts.h5.zip")
    hyper = copy.deepcopy(checkpoint.hyper_parameters)
    hyper["freeze_encoder"] = True
    path = _write_ckpt(tmp_path / "unknown.ckpt", checkpoint, hyper_parameters=hyper)
    with pytest.raises(UnsupportedCheckpointError, match="freeze_encoder"):
        convert_checkpoint(path, tmp_path / "wts.h5.zip")


def test_config_dicts_go_through_the_stored_metadata_validation(tmp_path, checkpoint):
    hyper = copy.deepcopy(checkpoint.hyper_parameters)
    hyper["model_config"]["n_filters_scale"] = "1"
    path = _write_ckpt(tmp_path / "typed.ckpt", checkpoint, hyper_parameters=hyper)
    with pytest.raises(BundleError, match="n_filters_scale"):
        convert_checkpoint(path, tmp_path / "wts.h5.zip")
    hyper = copy.deepcopy(checkpoint.hyper_parameters)
    hyper["model_config"]["n_filters_scale"] = 2  # configs of another network than the weights
    path = _write_ckpt(tmp_path / "mismatch.ckpt", checkpoint, hyper_parameters=hyper)
    with pytest.raises(StateDictMismatchError):
        convert_checkpoint(path, tmp_path / "wts.h5.zip")
    assert not (tmp_path / "wts.h5.zip").exists()


def test_fno_family_checkpoint_gets_a_typed_error_naming_the_architecture(tmp_path, checkpoint):
    hyper = copy.deepcopy(checkpoint.hyper_parameters)
    hyper["model_config"]["architecture"] = "fno"
    path = _write_ckpt(tmp_path / "fno.ckpt", checkpoint, hyper_parameters=hyper)
    # While the metadata path lacks FNO the refusal names the architecture; once it builds FNO networks, these CNN
    # weights no longer fit the configured FNO network, which the strict check reports instead.
    with pytest.raises((UnsupportedBundleError, StateDictMismatchError)) as excinfo:
        convert_checkpoint(path, tmp_path / "wts.h5.zip")
    if isinstance(excinfo.value, UnsupportedBundleError):
        assert "'fno'" in str(excinfo.value)
    assert not (tmp_path / "wts.h5.zip").exists()


def test_other_torch_files_are_named_not_misread(tmp_path, checkpoint):
    bare = tmp_path / "weights.pth"
    torch.save(checkpoint.state_dict, bare)
    with pytest.raises(NotACheckpointError, match="bare state_dict"):
        convert_checkpoint(bare, tmp_path / "wts.h5.zip")
    with pytest.raises(NotACheckpointError, match="PyTorch PtychoPINN bundle"):
        read_checkpoint(UPSTREAM_BUNDLE)
    noise = tmp_path / "noise.ckpt"
    noise.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(NotACheckpointError, match="not a recognised format"):
        read_checkpoint(noise)
    with pytest.raises(NotACheckpointError, match="does not exist"):
        read_checkpoint(tmp_path / "missing.ckpt")
    no_configs = tmp_path / "no_configs.ckpt"
    torch.save({"state_dict": checkpoint.state_dict, "epoch": 0}, no_configs)
    with pytest.raises(UnsupportedCheckpointError, match="hyper_parameters"):
        read_checkpoint(no_configs)


def test_ci_statistics_entry_becomes_the_metadata_field(tmp_path, checkpoint):
    hyper = copy.deepcopy(checkpoint.hyper_parameters)
    hyper["model_config"].update(physics_forward_mode="rectangular_scaled", cnn_output_mode="real_imag")
    stats = {"rms_input_scale": torch.tensor([2.5, 3.0]), "mean_measured_intensity": torch.tensor([[100.0], [80.0]])}
    path = _write_ckpt(tmp_path / "ci.ckpt", checkpoint, hyper_parameters=hyper, ci_statistics=stats)
    bundle = convert_checkpoint(path, tmp_path / "wts.h5.zip")
    metadata = _torch_member(bundle, "torch_scaling_metadata.pt")
    assert metadata["ci_statistics"] == {"rms_input_scale": [2.5, 3.0], "mean_measured_intensity": [100.0, 80.0]}
    assert metadata["model_config"]["physics_forward_mode"] == "rectangular_scaled"
    assert read_bundle(bundle).network_config.effective_output_mode == "real_imag"


def test_conversion_and_detection_need_no_mlflow(tmp_path):
    """ptychodus ships mlflow-skinny at most: the converter, detection and the data loader import no MLflow."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(f"""
        import sys
        sys.modules["mlflow"] = None  # any import of mlflow now fails
        from mlflow_ptycho_flavor.convert.checkpoint import convert_checkpoint
        from mlflow_ptycho_flavor.bundle.identify import describe_for_error
        import mlflow_ptycho_flavor.sim.ptychodus
        print(convert_checkpoint({str(CKPT)!r}, {str(tmp_path / "wts.h5.zip")!r}))
        print(describe_for_error({str(CKPT)!r}))
        print(sorted(m for m in sys.modules if m.startswith("mlflow.")))
    """)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.strip().splitlines()
    assert lines[0] == str(tmp_path / "wts.h5.zip") and "Lightning checkpoint" in lines[1] and lines[2] == "[]"


def test_batch_norm_checkpoint_with_int64_buffers_converts_exactly(tmp_path, checkpoint, io_npz):
    """LongStorage (num_batches_tracked) is the other global upstream's checkpoints reference (g2_bn fixture)."""
    from mlflow_ptycho_flavor.bundle.metadata import network_config_from_metadata, validate_metadata
    from mlflow_ptycho_flavor.network import PtychoPINNNetwork

    hyper = copy.deepcopy(checkpoint.hyper_parameters)
    hyper["model_config"]["batch_norm"] = True
    config = network_config_from_metadata(validate_metadata({"schema_version": "ci-entrypoints-v1", **hyper}))
    network = PtychoPINNNetwork(config).eval()
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for key, tensor in network.state_dict().items():
            if key.endswith("num_batches_tracked"):
                tensor.fill_(4)
            elif key.endswith("running_var"):
                tensor.uniform_(0.5, 1.5, generator=generator)
            else:
                tensor.add_(0.05 * torch.randn(tensor.shape, generator=generator))
    state = network.state_dict()
    assert any(t.dtype == torch.int64 for t in state.values())
    path = _write_ckpt(tmp_path / "bn.ckpt", checkpoint, state_dict=state, hyper_parameters=hyper)
    bundle = convert_checkpoint(path, tmp_path / "wts.h5.zip")
    stored = _torch_member(bundle, "diffraction_to_obj/model.pth")
    assert list(stored) == list(state) and all(torch.equal(stored[k], state[k]) for k in state)
    assert all(stored[k].dtype == state[k].dtype for k in state)
    x, factor = torch.from_numpy(io_npz["x"]), torch.from_numpy(io_npz["input_scale_factor"])
    with torch.no_grad():
        expected = network(x, factor).numpy()
    np.testing.assert_array_equal(_predict(bundle, io_npz), expected)


def test_a_written_bundle_that_would_not_load_never_replaces_the_destination(tmp_path, checkpoint):
    """write_bundle(verify=True), the converter's last step: the finished archive is re-read before the rename."""
    from mlflow_ptycho_flavor.bundle.writer import write_bundle

    contents = read_bundle(UPSTREAM_BUNDLE)
    incomplete = OrderedDict(list(checkpoint.state_dict.items())[:-1])  # one weight short of the configured network
    dst = tmp_path / "wts.h5.zip"
    dst.write_bytes(b"previous bundle")
    with pytest.raises(StateDictMismatchError):
        write_bundle(dst, state_dict=incomplete, params=contents.params, metadata=contents.metadata, verify=True)
    assert dst.read_bytes() == b"previous bundle"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["wts.h5.zip"]  # no temporary file left
    written = write_bundle(dst, state_dict=checkpoint.state_dict, params=contents.params, metadata=contents.metadata,
                           verify=True)
    assert read_bundle(written).state_dict.keys() == checkpoint.state_dict.keys()
