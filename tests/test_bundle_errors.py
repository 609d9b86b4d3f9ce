"""Every way a bundle can be wrong gives a typed BundleError with a message naming the cause, and nothing is
written (or executed) while refusing it."""

from __future__ import annotations

import builtins
import io
import os
import pickle
import zipfile
from collections import OrderedDict

import pytest
import torch

from mlflow_ptycho_flavor import load_torch_bundle, read_bundle, save_torch_bundle
from mlflow_ptycho_flavor.bundle import BundleLimits
from mlflow_ptycho_flavor.errors import (
    ArchitectureEraError,
    BundleError,
    ConfigMismatchError,
    CorruptBundleError,
    NotABundleError,
    StateDictMismatchError,
    TensorFlowBundleError,
    UnsafeBundleError,
    UnsupportedBundleError,
)
from mlflow_ptycho_flavor.bundle.params import LEGACY_DEFAULT_CFG, cfg
from mlflow_ptycho_flavor.bundle.unpickle import ALLOW_PICKLE_ENV

P = "model.autoencoder."
UPSTREAM_MANIFEST = {"models": ["diffraction_to_obj", "autoencoder"], "version": "2.0-pytorch"}


def _listing(root) -> list:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.fixture
def refuses(tmp_path):
    """``refuses(path, error, match, **load_kwargs)``: the load raises, nothing new appears under tmp_path and the
    global config is untouched."""

    def check(path, error, match, **kwargs):
        before = _listing(tmp_path)
        with pytest.raises(error, match=match) as info:
            load_torch_bundle(path, device="cpu", **kwargs)
        assert _listing(tmp_path) == before
        assert cfg == LEGACY_DEFAULT_CFG
        return info.value

    return check


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    """A valid small bundle (N=64, s=1, gs=1) written by us, with sha256 hashes in its manifest."""
    from mlflow_ptycho_flavor.network import NetworkConfig, PtychoPINNNetwork

    net = PtychoPINNNetwork(NetworkConfig(n_filters_scale=1)).eval()
    return save_torch_bundle(net, tmp_path_factory.mktemp("valid") / "wts.h5")


@pytest.fixture(scope="module")
def members(bundle) -> dict:
    with zipfile.ZipFile(bundle) as archive:
        return {name: archive.read(name) for name in archive.namelist()}


@pytest.fixture(scope="module")
def state_dict(members) -> "OrderedDict[str, torch.Tensor]":
    return torch.load(io.BytesIO(members["diffraction_to_obj/model.pth"]), weights_only=True)


@pytest.fixture(scope="module")
def metadata(members) -> dict:
    return torch.load(io.BytesIO(members["torch_scaling_metadata.pt"]), weights_only=True)


def _torch_bytes(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _zip(path, members: dict) -> "os.PathLike":
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return path


# ------------------------------------------------------------------------------------------------------------
# not a bundle at all
# ------------------------------------------------------------------------------------------------------------
def test_tensorflow_archive(tmp_path, refuses):
    params = pickle.dumps({"N": 64, "gridsize": 1, "intensity_scale": 1.0, "_version": "1.0"}, protocol=4)
    tf = {"manifest.dill": pickle.dumps({"models": ["autoencoder", "diffraction_to_obj"], "version": "1.0"})}
    for model in ("autoencoder", "diffraction_to_obj"):
        tf[f"{model}/model.keras"] = b"PK\x03\x04 keras-3 archive"
        tf[f"{model}/params.dill"] = params
        tf[f"{model}/model.h5"] = b"\x89HDF\r\n\x1a\n"
    path = _zip(tmp_path / "wts.h5.zip", tf)
    error = refuses(path, TensorFlowBundleError, r"TensorFlow PtychoPINN archive \(manifest version '1\.0'")
    assert isinstance(error, UnsupportedBundleError)


def test_tensorflow_archive_without_manifest(tmp_path, refuses):
    path = _zip(tmp_path / "wts.h5.zip", {"diffraction_to_obj/model.keras": b"keras"})
    refuses(path, TensorFlowBundleError, "TensorFlow PtychoPINN archive")


def test_non_zip_file(tmp_path, refuses):
    path = tmp_path / "wts.h5.zip"
    path.write_text("this is not a zip archive\n" * 10)
    refuses(path, NotABundleError, "is not a zip archive")


def test_missing_file(tmp_path, refuses):
    refuses(tmp_path / "nowhere" / "wts.h5", NotABundleError, r"no bundle at .*wts\.h5\.zip: the file does not exist")
    assert not (tmp_path / "nowhere").exists()


def test_empty_directory(tmp_path, refuses):
    (tmp_path / "empty").mkdir()
    refuses(tmp_path / "empty", NotABundleError, "does not exist")


def test_zip_without_manifest(tmp_path, refuses):
    path = _zip(tmp_path / "wts.h5.zip", {"readme.txt": b"hello"})
    refuses(path, CorruptBundleError, "has no manifest.dill: not a PtychoPINN bundle")


@pytest.mark.parametrize("keep", [1, 4, 100, "25%", "50%", "90%", -100, -22, -1])
def test_truncated_archive(bundle, tmp_path, refuses, keep):
    """Cut short anywhere (also inside the end-of-central-directory record): NotABundle or Corrupt, nothing else."""
    data = bundle.read_bytes()
    if isinstance(keep, str):
        keep = len(data) * int(keep[:-1]) // 100
    path = tmp_path / "wts.h5.zip"
    path.write_bytes(data[:keep])
    error = refuses(path, BundleError, r"wts\.h5\.zip")
    assert isinstance(error, (NotABundleError, CorruptBundleError))


def test_damaged_compressed_data(bundle, tmp_path, refuses):
    """Bytes flipped inside the weights (the central directory intact): the manifest's sha256 (checked beside the
    decoding: the member is stored) or, for a deflated copy, the CRC / inflate error."""
    data = bytearray(bundle.read_bytes())
    with zipfile.ZipFile(bundle) as archive:
        info = archive.getinfo("diffraction_to_obj/model.pth")
    start = info.header_offset + 30 + len(info.filename) + len(info.extra)
    for i in range(start + 1000, start + 1064):
        data[i] ^= 0xFF
    path = tmp_path / "wts.h5.zip"
    path.write_bytes(bytes(data))
    refuses(path, CorruptBundleError, r"member 'diffraction_to_obj/model\.pth' (of .* (is damaged|cannot be decompressed)|"
                                      r"does not match the sha256 recorded in manifest\.dill)")


# ------------------------------------------------------------------------------------------------------------
# members and manifest
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "member, message",
    [
        ("diffraction_to_obj/model.pth", r"lacks the member 'diffraction_to_obj/model\.pth'"),
        ("diffraction_to_obj/params.dill", r"lacks 'diffraction_to_obj/params\.dill'"),
        ("autoencoder/params.dill", r"lacks 'autoencoder/params\.dill'"),
        ("manifest.dill", r"has no manifest\.dill"),
    ],
)
def test_missing_member(bundle, tmp_path, refuses, rewrite_bundle, member, message):
    path = rewrite_bundle(bundle, tmp_path / "wts.h5.zip", remove=[member], hashes="drop")
    refuses(path, CorruptBundleError, message)


@pytest.mark.parametrize(
    "manifest, error, message",
    [
        (["diffraction_to_obj", "autoencoder"], CorruptBundleError, r"manifest\.dill must hold a dict"),
        ({"models": ["diffraction_to_obj", "autoencoder"]}, CorruptBundleError, r"\['version'\] must be a str"),
        ({"models": ["autoencoder"], "version": "2.0-pytorch"}, CorruptBundleError,
         r"lists models \['autoencoder'\] but not 'diffraction_to_obj'"),
        ({"version": "2.0-pytorch"}, CorruptBundleError, r"\['models'\] must be a non-empty list"),
        ({"models": "diffraction_to_obj", "version": "2.0-pytorch"}, CorruptBundleError,
         r"\['models'\] must be a non-empty list"),
        ({"models": ["diffraction_to_obj"], "version": "3.0-pytorch"}, UnsupportedBundleError,
         r"manifest version '3\.0-pytorch' is not supported"),
        ({"models": ["diffraction_to_obj"], "version": "2.0-pytorch", "backend": "jax"}, UnsupportedBundleError,
         r"manifest backend 'jax' is not supported"),
        ({"models": ["diffraction_to_obj"], "version": "2.0-pytorch", "sha256": ["x"]}, CorruptBundleError,
         r"\['sha256'\] must map member names"),
    ],
    ids=["list", "no-version", "no-diffraction_to_obj", "no-models", "models-str", "version-3", "backend", "sha"],
)
def test_bad_manifest(bundle, tmp_path, refuses, rewrite_bundle, manifest, error, message):
    path = rewrite_bundle(bundle, tmp_path / "wts.h5.zip", manifest=manifest)
    refuses(path, error, message)


def test_manifest_not_a_pickle(bundle, tmp_path, refuses, rewrite_bundle):
    path = rewrite_bundle(bundle, tmp_path / "wts.h5.zip", manifest=b"\x80\x04garbage")
    refuses(path, CorruptBundleError, r"manifest\.dill is not a valid pickle")


def test_upstream_manifest_without_hashes_is_fine(bundle, tmp_path, rewrite_bundle):
    path = rewrite_bundle(bundle, tmp_path / "wts.h5.zip", manifest=UPSTREAM_MANIFEST)
    contents = read_bundle(path)
    assert contents.hashes_verified == []
    assert read_bundle(bundle).hashes_verified  # ours are verified


@pytest.mark.parametrize(
    "member",
    ["diffraction_to_obj/params.dill", "diffraction_to_obj/model.pth", "torch_scaling_metadata.pt",
     "autoencoder/model.pth", "autoencoder/params.dill"],
)
def test_sha256_mismatch(bundle, members, tmp_path, refuses, rewrite_bundle, member):
    data = bytearray(members[member])
    if member.endswith("params.dill"):
        # flip a character inside a string value: still a valid pickle of a valid snapshot
        at = bytes(data).index(b"training_outputs")
        data[at] = ord("T")
        assert pickle.loads(bytes(data))["output_prefix"] == "Training_outputs"
    else:
        data[len(data) // 2] ^= 0x01
    path = rewrite_bundle(bundle, tmp_path / "wts.h5.zip", replace={member: bytes(data)}, hashes="keep")
    refuses(path, CorruptBundleError, rf"member '{member}' does not match the sha256 recorded in manifest\.dill")


# ------------------------------------------------------------------------------------------------------------
# unsafe archives
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["../evil.txt", "a/../../evil.txt", "/abs/evil.txt", "C:/evil.txt",
                                  "a\\..\\evil.txt", "./manifest.dill"])
def test_member_name_path_tricks(bundle, tmp_path, refuses, rewrite_bundle, name):
    path = rewrite_bundle(bundle, tmp_path / "wts.h5.zip", replace={name: b"payload"})
    refuses(path, UnsafeBundleError, r"is absolute or escapes the archive")
    assert not (tmp_path.parent / "evil.txt").exists()


def test_duplicate_member(members, tmp_path, refuses):
    path = tmp_path / "wts.h5.zip"
    with pytest.warns(UserWarning, match="Duplicate name"):
        with zipfile.ZipFile(path, "w") as archive:
            for name, data in members.items():
                archive.writestr(name, data)
            archive.writestr("diffraction_to_obj/params.dill", members["diffraction_to_obj/params.dill"])
    refuses(path, UnsafeBundleError, r"holds the member 'diffraction_to_obj/params\.dill' twice")


def test_symlink_member(members, tmp_path, refuses):
    path = tmp_path / "wts.h5.zip"
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
        link = zipfile.ZipInfo("link")
        link.external_attr = (0o120777 << 16)
        archive.writestr(link, "/etc/passwd")
    refuses(path, UnsafeBundleError, r"member 'link' is a symbolic link")


def test_zip_bomb_member(members, tmp_path, refuses):
    """A member inflating 1000:1 beyond the ratio floor is refused before it is inflated."""
    path = tmp_path / "wts.h5.zip"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            if name != "torch_scaling_metadata.pt":
                archive.writestr(name, data)
        archive.writestr("torch_scaling_metadata.pt", bytes(16 * 1024 * 1024))
    refuses(path, UnsafeBundleError, r"compression ratio of \d+:1, over the cap of 200:1")


@pytest.mark.parametrize(
    "limits, message",
    [
        (BundleLimits(max_members=3), r"lists 6 members \(limit 3\)"),
        (BundleLimits(max_member_bytes=10_000), r"over the per-member cap of 10000"),
        (BundleLimits(max_total_bytes=5_000), r"past the total cap of 5000 bytes"),
    ],
)
def test_size_limits(bundle, refuses, limits, message):
    refuses(bundle, UnsafeBundleError, message, limits=limits)


class _Exec:
    """Unpickling runs ``exec(code)``."""

    def __init__(self, code):
        self.code = code

    def __reduce__(self):
        return (builtins.exec, (self.code,))


class _System:
    """Unpickling runs ``os.system(command)``."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def _marker_code(marker) -> str:
    return f"open({str(marker)!r}, 'w').write('pwned')"


@pytest.mark.parametrize("kind", ["exec", "system"])
@pytest.mark.parametrize("member", ["diffraction_to_obj/params.dill", "manifest.dill"])
def test_code_bearing_pickle_refused_and_not_run(bundle, members, tmp_path, refuses, rewrite_bundle,
                                                 monkeypatch, kind, member):
    monkeypatch.delenv(ALLOW_PICKLE_ENV, raising=False)
    marker = tmp_path / "pwned"
    payload = _Exec(_marker_code(marker)) if kind == "exec" else _System(f"touch {marker}")
    if member == "manifest.dill":
        data = pickle.dumps({**UPSTREAM_MANIFEST, "x": payload}, protocol=4)
    else:
        data = pickle.dumps({**pickle.loads(members[member]), "x": payload}, protocol=4)
    path = rewrite_bundle(bundle, tmp_path / "wts.h5.zip", replace={member: data}, hashes="drop")
    global_name = "builtins.exec" if kind == "exec" else f"{os.system.__module__}.system"
    refuses(path, UnsafeBundleError, rf"{member} references the global {global_name}, which the safe loader refuses")
    assert not marker.exists()


def test_code_bearing_pickle_runs_when_explicitly_allowed(bundle, members, tmp_path, rewrite_bundle, monkeypatch):
    """Proves the refusal test above can fail: with allow_unsafe=True the same payload does run (harmless marker)."""
    monkeypatch.delenv(ALLOW_PICKLE_ENV, raising=False)
    marker = tmp_path / "ran"
    params = pickle.loads(members["diffraction_to_obj/params.dill"])
    data = pickle.dumps({**params, "x": _Exec(_marker_code(marker))}, protocol=4)
    path = rewrite_bundle(bundle, tmp_path / "wts.h5.zip", hashes="drop",
                          replace={"diffraction_to_obj/params.dill": data, "autoencoder/params.dill": data})
    net, loaded = load_torch_bundle(path, device="cpu", allow_unsafe=True)
    assert marker.read_text() == "pwned"
    assert loaded["x"] is None and net.config.N == 64


def test_unsafe_opt_in_by_environment(bundle, members, tmp_path, rewrite_bundle, monkeypatch):
    marker = tmp_path / "ran-env"
    params = pickle.loads(members["diffraction_to_obj/params.dill"])
    data = pickle.dumps({**params, "x": _Exec(_marker_code(marker))}, protocol=4)
    path = rewrite_bundle(bundle, tmp_path / "wts.h5.zip", hashes="drop",
                          replace={"diffraction_to_obj/params.dill": data, "autoencoder/params.dill": data})
    monkeypatch.setenv(ALLOW_PICKLE_ENV, "true")
    with pytest.raises(UnsafeBundleError, match=r"references the global builtins\.exec"):
        load_torch_bundle(path, device="cpu", allow_unsafe=False)  # the argument wins over the environment
    assert not marker.exists()
    load_torch_bundle(path, device="cpu")
    assert marker.exists()


class NotAllowed:
    """A class torch.load(weights_only=True) must not resolve."""

    def __init__(self):
        self.value = 1


@pytest.mark.parametrize("member", ["diffraction_to_obj/model.pth", "torch_scaling_metadata.pt"])
def test_torch_member_needing_arbitrary_globals(bundle, state_dict, metadata, tmp_path, refuses, rewrite_bundle,
                                                member):
    if member == "diffraction_to_obj/model.pth":
        payload = OrderedDict(state_dict)
        payload["model.extra"] = NotAllowed()
    else:
        payload = {**metadata, "ci_statistics": NotAllowed()}
    path = rewrite_bundle(bundle, tmp_path / "wts.h5.zip", replace={member: _torch_bytes(payload)}, hashes="drop")
    refuses(path, UnsafeBundleError,
            rf"{member} (references the global .*test_bundle_errors\.NotAllowed|needs arbitrary Python objects)")


def test_torch_member_with_code_payload_not_run(bundle, tmp_path, refuses, rewrite_bundle):
    marker = tmp_path / "pwned-pth"
    data = _torch_bytes({"model.x": _Exec(_marker_code(marker))})
    path = rewrite_bundle(bundle, tmp_path / "wts.h5.zip", replace={"diffraction_to_obj/model.pth": data},
                          hashes="drop")
    refuses(path, UnsafeBundleError,
            r"diffraction_to_obj/model\.pth (references the global (__builtin__|builtins)\.exec|needs arbitrary Python)")
    assert not marker.exists()


def test_torch_member_garbage(bundle, tmp_path, refuses, rewrite_bundle):
    path = rewrite_bundle(bundle, tmp_path / "wts.h5.zip", replace={"diffraction_to_obj/model.pth": b"garbage"},
                          hashes="drop")
    refuses(path, CorruptBundleError, r"diffraction_to_obj/model\.pth is not (a valid torch file|in torch's zip)")


# ------------------------------------------------------------------------------------------------------------
# weights from other eras / other networks
# ------------------------------------------------------------------------------------------------------------
def _with_state_dict(rewrite_bundle, src, dst, sd):
    return rewrite_bundle(src, dst, replace={"diffraction_to_obj/model.pth": _torch_bytes(OrderedDict(sd))},
                          hashes="drop")


def test_e1_era_state_dict(bundle, state_dict, tmp_path, refuses, rewrite_bundle):
    """E1: +16 decoder merge_blocks keys, no forward_model.alpha/beta (77 keys at N=64)."""
    sd = OrderedDict((k, v) for k, v in state_dict.items() if not k.endswith(("forward_model.alpha", "forward_model.beta")))
    shapes = {0: ((64, 128), (64, 64)), 1: ((32, 64), (32, 32))}  # N=64, s=1 (half the spec's s=2 widths)
    for dec in ("decoder_amp", "decoder_phase"):
        for j, (first, second) in shapes.items():
            sd[f"{P}{dec}.merge_blocks.{j}.0.weight"] = torch.zeros(*first, 3, 3)
            sd[f"{P}{dec}.merge_blocks.{j}.0.bias"] = torch.zeros(first[0])
            sd[f"{P}{dec}.merge_blocks.{j}.2.weight"] = torch.zeros(*second, 3, 3)
            sd[f"{P}{dec}.merge_blocks.{j}.2.bias"] = torch.zeros(second[0])
    assert len(sd) == 77
    path = _with_state_dict(rewrite_bundle, bundle, tmp_path / "wts.h5.zip", sd)
    refuses(path, ArchitectureEraError, r"upstream's E1 era \(UNet skip merges")


def test_e0_era_state_dict(bundle, state_dict, tmp_path, refuses, rewrite_bundle):
    """E0: no forward_model.rect_scaler.s1/s2 (61 keys at N=64)."""
    sd = OrderedDict((k, v) for k, v in state_dict.items() if ".rect_scaler." not in k)
    assert len(sd) == 61
    path = _with_state_dict(rewrite_bundle, bundle, tmp_path / "wts.h5.zip", sd)
    refuses(path, ArchitectureEraError, r"upstream's E0 era \(no model\.forward_model\.rect_scaler")


def test_legacy_head_shapes_without_override(upstream_dir, tmp_path, refuses, rewrite_bundle):
    """E2 (and E0/E1) heads on an N=64, s=2 network: amp.conv1 (1,56,3,3), border path of 8 channels."""
    src = upstream_dir / "n64_g1_default" / "wts.h5.zip"
    with zipfile.ZipFile(src) as archive:
        sd = torch.load(io.BytesIO(archive.read("diffraction_to_obj/model.pth")), weights_only=True)
    for head in ("decoder_amp.amp", "decoder_phase.phase"):
        sd[f"{P}{head}.conv1.weight"] = torch.zeros(1, 56, 3, 3)
        sd[f"{P}{head}.conv_up_block.conv1.weight"] = torch.zeros(64, 8, 3, 3)
    path = _with_state_dict(rewrite_bundle, src, tmp_path / "wts.h5.zip", sd)
    refuses(path, ArchitectureEraError, r"has shape \(1, 56, 3, 3\): the legacy head of upstream's E0-E2 eras")


def test_legacy_head_shapes_at_s1_gridsize2(perturbed_network, tmp_path, refuses, rewrite_bundle):
    """At s=1, gs=2 the legacy border width 28s equals the current 32s - C, so only the amplitude head's output
    channels tell the eras apart: the legacy amp head always has Co=1 (docs/bundle-format.md §3.6), the current one Co=C=4. A genuine
    E2 state_dict (amp head (1,28,3,3), phase head (4,28,3,3)) under a gs=2 configuration is a legacy era."""
    net = perturbed_network(n_filters_scale=1, C_model=4)
    src = save_torch_bundle(net, tmp_path / "src" / "wts.h5")
    sd = OrderedDict(net.state_dict())
    sd[f"{P}decoder_amp.amp.conv1.weight"] = torch.zeros(1, 28, 3, 3)
    sd[f"{P}decoder_amp.amp.conv1.bias"] = torch.zeros(1)
    sd[f"{P}decoder_amp.amp.conv2.weight"] = torch.zeros(1, 32, 3, 3)
    sd[f"{P}decoder_amp.amp.conv2.bias"] = torch.zeros(1)
    path = _with_state_dict(rewrite_bundle, src, tmp_path / "wts.h5.zip", sd)
    refuses(path, ArchitectureEraError, r"legacy head of upstream's E0-E2 eras")


@pytest.mark.parametrize(
    "change, message",
    [
        ("shape", r"encoder\.blocks\.0\.conv1\.weight has shape \(32, 4, 3, 3\), the configuration needs \(32, 1, 3, 3\)"),
        ("extra", r"unexpected keys .*model\.log_scale_delta"),
        ("missing", r"missing keys \['model\.autoencoder\.decoder_phase\.phase\.conv2\.bias'\]"),
        ("dtype", r"decoder_amp\.amp\.conv2\.bias has dtype torch\.float64, expected torch\.float32"),
    ],
)
def test_state_dict_mismatch(bundle, state_dict, tmp_path, refuses, rewrite_bundle, change, message):
    sd = OrderedDict(state_dict)
    if change == "shape":
        sd[f"{P}encoder.blocks.0.conv1.weight"] = torch.zeros(32, 4, 3, 3)
    elif change == "extra":
        sd["model.log_scale_delta"] = torch.zeros(())
    elif change == "missing":
        del sd[f"{P}decoder_phase.phase.conv2.bias"]
    else:
        sd[f"{P}decoder_amp.amp.conv2.bias"] = sd[f"{P}decoder_amp.amp.conv2.bias"].double()
    path = _with_state_dict(rewrite_bundle, bundle, tmp_path / "wts.h5.zip", sd)
    refuses(path, StateDictMismatchError, message)


def test_state_dict_value_not_a_tensor(bundle, state_dict, tmp_path, refuses, rewrite_bundle):
    sd = OrderedDict(state_dict)
    sd["model.forward_model.beta"] = [1.0]
    path = _with_state_dict(rewrite_bundle, bundle, tmp_path / "wts.h5.zip", sd)
    error = refuses(path, BundleError, r"model\.forward_model\.beta'? is a list")
    assert isinstance(error, (CorruptBundleError, StateDictMismatchError))


@pytest.mark.parametrize("s", [1, 2])
def test_gridsize2_weights_under_gridsize1_config(bundle, upstream_dir, tmp_path, refuses, rewrite_bundle, s):
    """gs=2 (current-era) weights under gs=1 params+metadata: a strict-load mismatch naming the shapes - not
    partially loaded (upstream's strict=False pitfall), and not mistaken for a legacy-era head: the legacy amp head
    always has one output channel, this one has four (at s=1 its 32s-4 = 28 input channels equal the legacy 28s)."""
    from mlflow_ptycho_flavor.network import NetworkConfig, PtychoPINNNetwork

    src = bundle if s == 1 else upstream_dir / "n64_g1_default" / "wts.h5.zip"
    gs2 = PtychoPINNNetwork(NetworkConfig(n_filters_scale=s, C_model=4)).state_dict()
    path = _with_state_dict(rewrite_bundle, src, tmp_path / "wts.h5.zip", gs2)
    width = 32 * s
    refuses(path, StateDictMismatchError,
            rf"encoder\.blocks\.0\.conv1\.weight has shape \({width}, 4, 3, 3\), the configuration needs "
            rf"\({width}, 1, 3, 3\)")


def test_sentinel_as_inference_weights(bundle, tmp_path, refuses, rewrite_bundle):
    path = _with_state_dict(rewrite_bundle, bundle, tmp_path / "wts.h5.zip", {"_sentinel": "autoencoder"})
    refuses(path, CorruptBundleError, r"is a weightless sentinel")


def test_metadata_free_bundle_with_torch_only_knobs(upstream_dir, tmp_path, refuses, rewrite_bundle):
    """Without its metadata the BN/bottleneck fixture cannot be rebuilt from params.dill: a strict-load error."""
    src = upstream_dir / "n64_g1_bn_bcbam_trainscale" / "wts.h5.zip"
    path = rewrite_bundle(src, tmp_path / "wts.h5.zip", remove=["torch_scaling_metadata.pt"])
    refuses(path, StateDictMismatchError, r"unexpected keys .*model\.autoencoder\.encoder\.blocks\.0\.bn1\.weight")


# ------------------------------------------------------------------------------------------------------------
# metadata content
# ------------------------------------------------------------------------------------------------------------
def _with_metadata(rewrite_bundle, src, dst, meta):
    return rewrite_bundle(src, dst, replace={"torch_scaling_metadata.pt": _torch_bytes(meta)}, hashes="drop")


@pytest.mark.parametrize(
    "section, key", [("model_config", "eca_bottleneck"), ("data_config", "new_knob"), ("training_config", "x")]
)
def test_unknown_metadata_key(bundle, metadata, tmp_path, refuses, rewrite_bundle, section, key):
    meta = {**metadata, section: {**metadata[section], key: True}}
    path = _with_metadata(rewrite_bundle, bundle, tmp_path / "wts.h5.zip", meta)
    refuses(path, UnsupportedBundleError, rf"{section} has unknown key\(s\) \['{key}'\]")


@pytest.mark.parametrize("architecture", ["neuralop_uno", "transformer"])
def test_unbuilt_architecture(bundle, metadata, tmp_path, refuses, rewrite_bundle, architecture):
    meta = {**metadata, "model_config": {**metadata["model_config"], "architecture": architecture}}
    path = _with_metadata(rewrite_bundle, bundle, tmp_path / "wts.h5.zip", meta)
    refuses(path, UnsupportedBundleError, rf"model_config\['architecture'\]='{architecture}'")


def test_neuralop_uno_names_its_package(bundle, metadata, tmp_path, refuses, rewrite_bundle):
    meta = {**metadata, "model_config": {**metadata["model_config"], "architecture": "neuralop_uno"}}
    path = _with_metadata(rewrite_bundle, bundle, tmp_path / "wts.h5.zip", meta)
    refuses(path, UnsupportedBundleError, r"external package 'neuraloperator'")


@pytest.mark.parametrize("architecture", ["fno", "ffno", "fno_vanilla"])
def test_fno_metadata_over_cnn_weights(bundle, metadata, members, tmp_path, refuses, rewrite_bundle, architecture):
    """The FNO family is built now: metadata naming it over a CNN bundle is refused, first because the params
    snapshot still says 'cnn', then (snapshot edited too) because the weights are a CNN's."""
    meta = {**metadata, "model_config": {**metadata["model_config"], "architecture": architecture}}
    path = _with_metadata(rewrite_bundle, bundle, tmp_path / "wts.h5.zip", meta)
    refuses(path, ConfigMismatchError, rf"params.dill\['architecture'\]='cnn' disagrees .*'{architecture}'")
    params = pickle.loads(members["diffraction_to_obj/params.dill"])
    raw = pickle.dumps({**params, "architecture": architecture}, protocol=4)
    path = rewrite_bundle(bundle, tmp_path / "both.zip", hashes="drop", replace={
        "torch_scaling_metadata.pt": _torch_bytes(meta),
        "diffraction_to_obj/params.dill": raw, "autoencoder/params.dill": raw})
    refuses(path, StateDictMismatchError, rf"CNN encoder weights .*architecture='{architecture}'")


def test_unbuilt_architecture_in_metadata_free_params(bundle, members, tmp_path, refuses, rewrite_bundle):
    params = pickle.loads(members["diffraction_to_obj/params.dill"])
    raw = pickle.dumps({**params, "architecture": "neuralop_uno"}, protocol=4)
    path = rewrite_bundle(bundle, tmp_path / "wts.h5.zip", remove=["torch_scaling_metadata.pt"], hashes="drop",
                          replace={"diffraction_to_obj/params.dill": raw, "autoencoder/params.dill": raw})
    refuses(path, UnsupportedBundleError, r"params\['architecture'\]='neuralop_uno'.*neuraloperator")


@pytest.mark.parametrize(
    "patch, error, message",
    [
        ({"schema_version": "ci-entrypoints-v2"}, UnsupportedBundleError, r"schema_version='ci-entrypoints-v2'"),
        ({"model_config": [1, 2]}, CorruptBundleError, r"'model_config' must be a dict, got list"),
        ({"model_config": {"batch_norm": "yes"}}, ConfigMismatchError, r"model_config\['batch_norm'\] must be bool"),
        ({"model_config": {"mode": "Supervised"}}, ConfigMismatchError, r"'Supervised' requires .*torch_loss_mode"),
        ({"model_config": {"physics_forward_mode": "magic"}}, UnsupportedBundleError,
         r"physics_forward_mode'\]='magic' is not known"),
        ({"data_config": {"scale_contract_version": "v9"}}, ConfigMismatchError, r"scale contract \('v9', "),
        ({"data_config": {"N": 96}}, ConfigMismatchError, r"N=96 is not supported"),
    ],
    ids=["schema", "section-type", "value-type", "supervised-poisson", "physics", "contract", "N"],
)
def test_bad_metadata_values(bundle, metadata, tmp_path, refuses, rewrite_bundle, patch, error, message):
    meta = dict(metadata)
    for key, value in patch.items():
        meta[key] = {**metadata[key], **value} if isinstance(value, dict) else value
    path = _with_metadata(rewrite_bundle, bundle, tmp_path / "wts.h5.zip", meta)
    refuses(path, error, message)


def test_metadata_not_a_dict(bundle, tmp_path, refuses, rewrite_bundle):
    path = _with_metadata(rewrite_bundle, bundle, tmp_path / "wts.h5.zip", [1, 2, 3])
    refuses(path, CorruptBundleError, r"torch_scaling_metadata\.pt must hold a dict, got list")


def test_metadata_missing_keys_take_defaults(bundle, metadata, tmp_path, rewrite_bundle):
    """Dropped keys take upstream HEAD defaults (docs/bundle-format.md §8.2.2) - here every default matches the network."""
    meta = {**metadata, "model_config": {k: v for k, v in metadata["model_config"].items()
                                         if k not in ("batch_norm", "cbam_encoder", "edge_pad")}}
    path = _with_metadata(rewrite_bundle, bundle, tmp_path / "wts.h5.zip", meta)
    net, _ = load_torch_bundle(path, device="cpu")
    assert net.config.cbam_encoder is True and net.config.batch_norm is False


def test_errors_are_bundle_errors():
    for error in (NotABundleError, CorruptBundleError, UnsafeBundleError, UnsupportedBundleError,
                  TensorFlowBundleError, ArchitectureEraError, ConfigMismatchError, StateDictMismatchError):
        assert issubclass(error, BundleError)
    assert issubclass(ArchitectureEraError, UnsupportedBundleError)
