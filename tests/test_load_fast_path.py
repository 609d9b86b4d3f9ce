"""The load path of performance round 2 (docs/bundle-format.md §1.3, §5): stored torch members read whole from
the file in one call, their storages tensors over those bytes, with their sha256/CRC on a worker thread; truncated
archives; the pickle walk and structure scan; the C unpickler restricted to the state_dict allow-list; networks
adopted from weightless blueprints; and loaders that build the network while the digests run.

Every test here can fail: each compares against an independent oracle (pickletools, plain zipfile + torch.load,
a network built the slow way) or asserts a refusal.
"""

from __future__ import annotations

import io
import os
import pickle
import pickletools
import struct
import sys
import threading
import warnings
import zipfile
from collections import OrderedDict

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bundle_crafting import MANIFEST, METADATA, PARAMS, WEIGHTS, base, members, torch_bytes  # noqa: F401
from mlflow_ptycho_flavor import load_torch_bundle, save_torch_bundle
from mlflow_ptycho_flavor.bundle.budget import iter_opcodes, scan_pickle_structure
from mlflow_ptycho_flavor.bundle.identify import ArtifactKind, identify_artifact
from mlflow_ptycho_flavor.bundle.io import read_bundle
from mlflow_ptycho_flavor.bundle.archive import check_nested_zip
from mlflow_ptycho_flavor.bundle.unpickle import _StorageFile, _allow_list_pickle_module, is_channels_last, torch_load
from mlflow_ptycho_flavor.errors import BundleError, CorruptBundleError, UnsafeBundleError
from mlflow_ptycho_flavor.network import (
    NetworkConfig,
    PtychoPINNNetwork,
    network_from_state_dict,
    weightless_construction,
)
from mlflow_ptycho_flavor.network.fno_config import FnoNetworkConfig


def _rezip(members: dict, path, *, method: int | None = None, drop=()) -> None:
    """Write ``members`` with one compression method for all (None: ours, as save_torch_bundle chose)."""
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            if name in drop:
                continue
            chosen = method
            if chosen is None:
                chosen = zipfile.ZIP_STORED if data.startswith(b"PK\x03\x04") else zipfile.ZIP_DEFLATED
            archive.writestr(zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0)), data, compress_type=chosen)


# ------------------------------------------------------------------------------------------------------------
# layout: what upstream's loader contract needs
# ------------------------------------------------------------------------------------------------------------
def test_upstream_contract_reads_our_stored_members(base, members):
    """What upstream's loader does - zipfile, then torch.load(weights_only=True) / pickle per member - reads our
    bundle; the weights equal what our reader adopts."""
    with zipfile.ZipFile(base) as archive:
        methods = {info.filename: info.compress_type for info in archive.infolist()}
        plain = torch.load(io.BytesIO(archive.read(WEIGHTS)), weights_only=True)
        manifest = pickle.loads(archive.read(MANIFEST))
        pickle.loads(archive.read(PARAMS))
        torch.load(io.BytesIO(archive.read(METADATA)), weights_only=True)
    assert methods[WEIGHTS] == zipfile.ZIP_STORED and methods[METADATA] == zipfile.ZIP_STORED
    assert methods[MANIFEST] == zipfile.ZIP_DEFLATED and methods[PARAMS] == zipfile.ZIP_DEFLATED
    assert manifest["version"] == "2.0-pytorch"
    ours = read_bundle(base).state_dict
    assert list(ours) == list(plain)
    assert all(torch.equal(ours[k], plain[k]) for k in plain)


@pytest.mark.parametrize("method", [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, None])
def test_every_compression_layout_loads_the_same_network(base, members, tmp_path, method):
    reference, _ = load_torch_bundle(base, device="cpu")
    path = tmp_path / "wts.h5.zip"
    _rezip(members, path, method=method)
    network, _ = load_torch_bundle(path, device="cpu")
    x = torch.rand(2, 1, 64, 64)
    with torch.inference_mode():
        assert torch.equal(network(x, None), reference(x, None))
    assert WEIGHTS in read_bundle(path).hashes_verified  # the sha256 was checked whichever way it was read


# ------------------------------------------------------------------------------------------------------------
# truncation and integrity of stored members
# ------------------------------------------------------------------------------------------------------------
def test_truncated_anywhere_after_the_weights_is_refused_as_truncated(base, tmp_path):
    """Cut after the stored model.pth, a file ends in the torch file's own directory: zipfile would read the file
    as that inner zip. The reader and the identifier both call it truncated, never a state_dict."""
    data = base.read_bytes()
    with zipfile.ZipFile(base) as archive:
        info = archive.getinfo(WEIGHTS)
    name_length, extra_length = int.from_bytes(data[info.header_offset + 26: info.header_offset + 28], "little"), \
        int.from_bytes(data[info.header_offset + 28: info.header_offset + 30], "little")
    weights_end = info.header_offset + 30 + name_length + extra_length + info.compress_size
    assert data[weights_end - 22: weights_end - 18] == b"PK\x05\x06"  # the torch file's end record
    # (cut inside the archive's own 22-byte end record, no end record is found at all: "probably truncated")
    cuts = sorted({weights_end, weights_end + 1, weights_end + 50, (weights_end + len(data)) // 2, len(data) - 23})
    for cut in cuts:
        path = tmp_path / f"cut{cut}" / "wts.h5.zip"
        path.parent.mkdir()
        path.write_bytes(data[:cut])
        with pytest.raises(CorruptBundleError, match=r"is cut short or damaged: the zip directory at its end belongs"):
            load_torch_bundle(path, device="cpu")
        found = identify_artifact(path)
        assert found.kind is ArtifactKind.UNKNOWN and "truncated" in found.description


def test_truncated_inside_the_weights_is_refused(base, tmp_path):
    data = base.read_bytes()
    with zipfile.ZipFile(base) as archive:
        info = archive.getinfo(WEIGHTS)
    for fraction in (0.01, 0.5, 0.99):
        cut = info.header_offset + int(info.compress_size * fraction)
        path = tmp_path / f"cut{fraction}" / "wts.h5.zip"
        path.parent.mkdir()
        path.write_bytes(data[:cut])
        with pytest.raises(BundleError):
            load_torch_bundle(path, device="cpu")


def test_stored_weights_without_recorded_hashes_still_get_their_crc_checked(base, members, tmp_path, rewrite_bundle):
    """Upstream's manifests record no sha256: the worker thread then checks the stored member's CRC-32."""
    path = tmp_path / "nohash" / "wts.h5.zip"
    path.parent.mkdir()
    rewrite_bundle(base, path, hashes="drop")
    assert read_bundle(path).hashes_verified == []
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo(WEIGHTS)
    assert info.compress_type == zipfile.ZIP_STORED
    data[info.header_offset + 30 + len(info.filename) + info.file_size // 2] ^= 0x01  # a weight's bits
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptBundleError, match=r"is damaged: Bad CRC-32 for file 'diffraction_to_obj/model\.pth'"):
        load_torch_bundle(path, device="cpu")


# ------------------------------------------------------------------------------------------------------------
# the pickle walk
# ------------------------------------------------------------------------------------------------------------
def _genops(data: bytes) -> list[tuple[str, object]]:
    return [(op.name, arg) for op, arg, _ in pickletools.genops(data)]


def _comparable(name: str, arg):
    if isinstance(arg, memoryview):
        return bytes(arg)
    if name in ("GLOBAL", "INST"):
        return str(arg)
    return arg


_plain = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=40)
    | st.binary(max_size=40),
    lambda children: st.lists(children, max_size=4) | st.tuples(children, children)
    | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(value=_plain, protocol=st.integers(0, pickle.HIGHEST_PROTOCOL))
def test_iter_opcodes_walks_what_pickletools_walks(value, protocol):
    data = pickle.dumps(value, protocol=protocol)
    ours = [(name, _comparable(name, arg)) for name, arg in iter_opcodes(data)]
    theirs = [(name, arg) for name, arg in _genops(data)]
    assert [n for n, _ in ours] == [n for n, _ in theirs]
    for (name, mine), (_, reference) in zip(ours, theirs):
        if name in ("BINGET", "LONG_BINGET", "BINPUT", "LONG_BINPUT", "GET", "PUT", "BININT", "BININT1",
                    "BININT2", "LONG1", "LONG4", "PROTO", "FRAME", "BINUNICODE", "SHORT_BINUNICODE",
                    "BINBYTES", "SHORT_BINBYTES", "BINBYTES8", "BINFLOAT"):
            assert mine == reference, name


def test_iter_opcodes_on_real_members(members):
    """manifest, params and the torch data.pkl: same opcodes and memo indices as pickletools."""
    pickled = torch._C.PyTorchFileReader(io.BytesIO(members[WEIGHTS])).get_record("data.pkl")
    for data in (members[MANIFEST], members[PARAMS], pickled):
        ours = [(n, _comparable(n, a)) for n, a in iter_opcodes(data)]
        theirs = _genops(data)
        assert [n for n, _ in ours] == [n for n, _ in theirs]
        assert [a for n, a in ours if n.endswith(("GET", "PUT"))] == [a for n, a in theirs if n.endswith(("GET", "PUT"))]
        assert [a for n, a in ours if n == "GLOBAL"] == [a for n, a in theirs if n == "GLOBAL"]


@pytest.mark.parametrize(
    "data, match",
    [
        (b"", r"pickle exhausted before seeing STOP"),
        (b"\x80\x04\x8e" + (1 << 40).to_bytes(8, "little") + b".", r"expected 1099511627776 bytes in a bytes8"),
        (b"\x80\x02\xff.", r"unknown opcode 0xff at byte 2"),
        (b"\x80\x02J\x01\x00", r"BININT at byte 2 is cut short"),
        (b"cos\nsystem", r"GLOBAL at byte 0 has no end of line"),
        (b"\x80\x02X\xff\xff\xff\x7f", r"expected 2147483647 bytes in a unicodestring4 at byte 2"),
        # the opcodes the scan decodes inline (budget._Machine.run)
        (b"\x80\x02Nq", r"BINPUT at byte 3 is cut short"),
        (b"\x80\x02Nr\x01\x00", r"LONG_BINPUT at byte 3 is cut short"),
        (b"\x80\x02j\x01", r"LONG_BINGET at byte 2 is cut short"),
        (b"\x80\x02M\x01", r"BININT2 at byte 2 is cut short"),
        (b"\x80\x02G\x00\x00", r"BINFLOAT at byte 2 is cut short"),
        (b"\x80\x02\x8c", r"SHORT_BINUNICODE at byte 2 is cut short"),
        (b"\x80\x02\x8c\x05abc", r"expected 5 bytes in a unicodestring1 at byte 2, but only 3 remain"),
        (b"\x80\x02X\x01\x00", r"BINUNICODE at byte 2 is cut short"),
        (b"\x80\x02h\x07.", r"memo key 7 was never stored"),
        (b"\x80\x02q\x00.", r"stack underflow"),
        (b"\x80\x02N\x86.", r"stack underflow"),
        (b"\x80\x02NR.", r"stack underflow"),
        (b"\x80\x02Ns.", r"stack underflow"),
        (b"\x80\x02}Ns.", r"an opcode finds no value to work on"),
        (b"\x80\x02Q.", r"stack underflow"),
        (b"\x80\x04\x94.", r"stack underflow"),
        (b"\x80\x02Nt.", r"no MARK on the stack"),
        (b"\x80\x02(N", r"pickle exhausted before seeing STOP"),
    ],
)
def test_iter_opcodes_refuses_malformed_streams_without_allocating(data, match):
    with pytest.raises(CorruptBundleError, match=match):
        scan_pickle_structure(data, "x")


def test_the_scan_refuses_a_memo_slot_past_the_data_in_either_binary_form():
    for data in (b"\x80\x02Nr\xff\xff\xff\x7f.", b"\x80\x02Nq\xfa."):
        with pytest.raises(UnsafeBundleError, match=r"stores into pickle memo slot \d+, past anything its \d+ bytes"):
            scan_pickle_structure(data, "x")


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(value=_plain, protocol=st.integers(0, pickle.HIGHEST_PROTOCOL))
def test_the_scan_accepts_plain_data_and_refuses_every_cut_of_it(value, protocol):
    """Whatever pickle writes for plain data passes; every strict prefix of it is a typed refusal (the cut lands
    inside each kind of argument the scan decodes, inline or not)."""
    data = pickle.dumps(value, protocol=protocol)
    scan_pickle_structure(data, "x")
    for end in range(len(data)):
        with pytest.raises(CorruptBundleError):
            scan_pickle_structure(data[:end], "x")


def test_the_scan_accepts_the_real_members_and_refuses_their_cuts(members):
    pickled = torch._C.PyTorchFileReader(io.BytesIO(members[WEIGHTS])).get_record("data.pkl")
    for data in (members[MANIFEST], members[PARAMS], pickled):
        scan_pickle_structure(data, "x")
        for end in range(0, len(data), max(1, len(data) // 150)):
            with pytest.raises(CorruptBundleError):
                scan_pickle_structure(data[:end], "x")


# ------------------------------------------------------------------------------------------------------------
# torch members: the allow-list C unpickler
# ------------------------------------------------------------------------------------------------------------
class _System:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_allow_list_unpickler_refuses_globals_even_without_the_scan():
    """Defence in depth: the C unpickler handed to torch.load resolves the allow-list itself."""
    raw = torch_bytes(OrderedDict(w=torch.ones(2), evil=_System()))
    with pytest.raises(UnsafeBundleError, match=r"posix\.system|os\.system"):
        torch.load(io.BytesIO(raw), weights_only=False, pickle_module=_allow_list_pickle_module("m"))
    loaded = torch.load(io.BytesIO(torch_bytes(OrderedDict(w=torch.ones(2)))), weights_only=False,
                        pickle_module=_allow_list_pickle_module("m"))
    assert torch.equal(loaded["w"], torch.ones(2))


def test_torchscript_member_is_refused_before_torch_load_hands_it_to_jit():
    module = torch.jit.script(torch.nn.Linear(2, 2))
    buffer = io.BytesIO()
    torch.jit.save(module, buffer)
    with pytest.raises(UnsafeBundleError, match=r"m is a TorchScript archive .* which carries code"):
        torch_load(buffer.getvalue(), "m", max_inflated_bytes=10**7)


def test_forced_weights_only_environment_still_loads(base, monkeypatch):
    """TORCH_FORCE_WEIGHTS_ONLY_LOAD makes torch.load refuse a pickle_module; the scanned member then goes through
    torch's own restricted unpickler and loads the same weights."""
    reference = read_bundle(base).state_dict
    monkeypatch.setenv("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "1")
    forced = read_bundle(base).state_dict
    assert all(torch.equal(reference[k], forced[k]) for k in reference)


# ------------------------------------------------------------------------------------------------------------
# weightless construction and blueprints
# ------------------------------------------------------------------------------------------------------------
def test_weightless_construction_is_meta_and_thread_local():
    config = NetworkConfig(N=64)
    seen = {}

    def build_elsewhere():
        seen["other"] = PtychoPINNNetwork(config)

    with weightless_construction():
        meta = PtychoPINNNetwork(config)
        other = threading.Thread(target=build_elsewhere)
        other.start()
        other.join()
    assert all(p.is_meta for p in meta.parameters())
    real = seen["other"]  # another thread, built meanwhile: real, randomly initialised weights
    assert not any(p.is_meta for p in real.parameters())
    weight = next(p for p in real.parameters() if p.dim() == 4)  # a convolution kernel
    assert float(weight.abs().sum()) > 0 and torch.isfinite(weight).all()


@pytest.mark.parametrize("config", [NetworkConfig(N=64), FnoNetworkConfig(architecture="ffno", N=64)],
                         ids=["cnn", "ffno"])
def test_adopted_networks_are_independent_and_match_a_slow_build(config):
    from mlflow_ptycho_flavor.network import build_network

    torch.manual_seed(0)
    slow = build_network(config).eval()
    state = {k: v.clone() for k, v in slow.state_dict().items()}
    first = network_from_state_dict(config, {k: v.clone() for k, v in state.items()}).eval()
    second = network_from_state_dict(config, {k: v.clone() for k, v in state.items()}).eval()
    x = torch.rand(2, config.channels, 64, 64)
    with torch.inference_mode():
        expected = slow(x, None)
        assert torch.equal(first(x, None), expected) and torch.equal(second(x, None), expected)
    with torch.no_grad():
        next(first.parameters()).add_(1.0)
    assert not torch.equal(next(first.parameters()), next(second.parameters()))
    assert [n for n, _ in first.named_modules()] == [n for n, _ in slow.named_modules()]
    assert {k: b.shape for k, b in first.named_buffers()} == {k: b.shape for k, b in slow.named_buffers()}
    assert not any(b.is_meta for b in first.buffers())


@pytest.mark.parametrize("config", [NetworkConfig(N=64), FnoNetworkConfig(architecture="ffno", N=64)],
                         ids=["cnn", "ffno"])
def test_adoption_takes_the_tensors_themselves_as_load_state_dict_assign_does(config):
    """The adopted network's parameters are the state_dict's tensors (no copy), as Parameters keeping the module's
    requires_grad; its state_dict equals what ``load_state_dict(strict=True, assign=True)`` leaves."""
    from mlflow_ptycho_flavor.network import build_network

    torch.manual_seed(1)
    state = {k: v.clone() for k, v in build_network(config).state_dict().items()}
    adopted = network_from_state_dict(config, dict(state))
    with weightless_construction():
        reference = type(adopted)(config)
    reference.load_state_dict(dict(state), strict=True, assign=True)
    ours, theirs = adopted.state_dict(keep_vars=True), reference.state_dict(keep_vars=True)
    assert list(ours) == list(theirs)
    pointers = {t.data_ptr() for t in state.values()}
    for key, tensor in theirs.items():
        # the same memory as the reference (an FNO alias: the last alias's tensor), taken from the state_dict
        assert ours[key].data_ptr() == tensor.data_ptr() and ours[key].data_ptr() in pointers, key
        assert type(ours[key]) is type(tensor) and ours[key].requires_grad == tensor.requires_grad, key
    shared = {id(p) for p in adopted.parameters()}
    assert len(shared) == len({id(p) for p in reference.parameters()})  # aliases stay one parameter


def test_adoption_refuses_what_load_state_dict_refuses():
    config = NetworkConfig(N=64)
    from mlflow_ptycho_flavor.network import build_network

    state = dict(build_network(config).state_dict())
    first = next(iter(state))
    missing = {k: v for k, v in state.items() if k != first}
    with pytest.raises(RuntimeError, match=rf'Missing key\(s\) in state_dict: "{first}"'):
        network_from_state_dict(config, missing)
    with pytest.raises(RuntimeError, match=r'Unexpected key\(s\) in state_dict: "model\.extra"'):
        network_from_state_dict(config, {**state, "model.extra": torch.zeros(1)})
    with pytest.raises(RuntimeError, match=rf"size mismatch for {first}: copying a param with shape torch\.Size\(\[3\]\)"):
        network_from_state_dict(config, {**state, first: torch.zeros(3)})


def test_check_finite_after_fast_load(base, members, tmp_path):
    """NaN weights are still refused on the fast path (the C unpickler, stored member)."""
    state = torch.load(io.BytesIO(members[WEIGHTS]), weights_only=True)
    key = next(k for k, v in state.items() if v.is_floating_point() and v.numel() > 4)
    state[key] = state[key].clone()
    state[key].view(-1)[3] = float("nan")
    patched = dict(members)
    patched[WEIGHTS] = torch_bytes(state)
    manifest = pickle.loads(members[MANIFEST])
    manifest.pop("sha256", None)
    patched[MANIFEST] = pickle.dumps(manifest)
    path = tmp_path / "wts.h5.zip"
    _rezip(patched, path)
    with pytest.raises(BundleError, match=r"NaN or infinite"):
        load_torch_bundle(path, device="cpu")
    assert np.isnan(state[key].numpy()).sum() == 1


# ------------------------------------------------------------------------------------------------------------
# storages read in place: the same objects torch.load builds
# ------------------------------------------------------------------------------------------------------------
def _awkward_state() -> "OrderedDict[str, torch.Tensor]":
    """Shared storages, views with offsets and strides, several dtypes, a Parameter, module-version metadata."""
    generator = torch.Generator().manual_seed(7)
    base_tensor = torch.randn(6, 8, generator=generator)
    state = OrderedDict(
        weight=base_tensor,
        view=base_tensor[2:5, 1::2],  # storage offset and strides into `weight`'s storage
        transposed=base_tensor.t(),
        half=torch.randn(3, 3, generator=generator).half(),
        bf16=torch.randn(5, generator=generator).bfloat16(),
        counts=torch.arange(7, dtype=torch.int64),
        mask=torch.tensor([True, False, True]),
        complex=torch.randn(4, dtype=torch.complex64, generator=generator),
        empty=torch.zeros(0, 3),
        scalar=torch.tensor(2.5, dtype=torch.float64),
        parameter=torch.nn.Parameter(torch.ones(2, 2)),
    )
    state._metadata = OrderedDict({"": {"version": 1}, "model": {"version": 2}})
    return state


def _same_as_torch_load(ours, reference) -> None:
    assert list(ours) == list(reference)
    for key, tensor in reference.items():
        mine = ours[key]
        assert type(mine) is type(tensor) and mine.dtype == tensor.dtype, key
        assert mine.shape == tensor.shape and mine.stride() == tensor.stride(), key
        assert mine.storage_offset() == tensor.storage_offset() and mine.requires_grad == tensor.requires_grad, key
        assert torch.equal(mine, tensor), key
    assert ours._metadata == reference._metadata
    assert ours["view"].untyped_storage().data_ptr() == ours["weight"].untyped_storage().data_ptr()
    assert ours["transposed"].untyped_storage().data_ptr() == ours["weight"].untyped_storage().data_ptr()


@pytest.mark.parametrize("form", ["bytes", "view", "loaded view"])
def test_storages_read_in_place_give_what_torch_load_gives(tmp_path, monkeypatch, form):
    raw = torch_bytes(_awkward_state())
    reference = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)

    def not_called(*args, **kwargs):
        raise AssertionError("torch.load ran: the storages were not read in place")

    monkeypatch.setattr(torch, "load", not_called)
    if form == "bytes":
        ours = torch_load(raw, "m.pth")
    else:
        path = tmp_path / "outer.zip"
        with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
            archive.writestr("pad.txt", b"x" * 1234)  # the member does not start at offset 0
            archive.writestr("m.pth", raw)
        from mlflow_ptycho_flavor.bundle.archive import DEFAULT_LIMITS, ArchiveReader

        reader = ArchiveReader(path, DEFAULT_LIMITS)
        try:
            view = reader.view("m.pth", genuine_bytes=len(raw))
            assert view is not None
            buffer = np.empty(len(raw), np.uint8) if form == "loaded view" else None
            if buffer is not None:
                assert view.load(buffer) and bytes(view.memory) == raw
            ours = torch_load(view, "m.pth")
        finally:
            reader.close()  # a loaded view's tensors outlive the file
    _same_as_torch_load(ours, reference)
    if form == "loaded view":  # every non-empty storage lies in the loaded buffer: no weight was copied
        lo, hi = buffer.ctypes.data, buffer.ctypes.data + buffer.nbytes
        assert all(lo <= t.data_ptr() < hi for t in ours.values() if t.numel()), "a storage was copied"


def _misaligned_records(raw: bytes) -> bytes:
    """``raw`` rewritten by plain ``zipfile`` behind a 1-byte pad, so no record keeps torch.save's 64-byte alignment."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(raw)) as zin, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as zout:
        names = zin.namelist()
        prefix = names[0].split("/", 1)[0]
        zout.writestr(zipfile.ZipInfo(f"{prefix}/.pad", date_time=(1980, 1, 1, 0, 0, 0)), b"x")
        for name in names:
            zout.writestr(zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0)), zin.read(name))
    return out.getvalue()


def test_loaded_records_not_aligned_for_their_type_are_copied_into_aligned_storages(tmp_path):
    """A crafted torch zip whose records sit at odd offsets: tensors over the loaded bytes would be misaligned for
    float32 and wider types, so those records are copied; every tensor is aligned and equals torch.load's."""
    from mlflow_ptycho_flavor.bundle.archive import DEFAULT_LIMITS, ArchiveReader

    raw = _misaligned_records(torch_bytes(_awkward_state()))
    reference = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    spans = check_nested_zip(raw, "m.pth", max_inflated_bytes=len(raw), max_entries=64)
    assert any(span.start % 4 for name, span in spans.items() if "/data/" in name)  # the crafting worked
    path = tmp_path / "outer.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr("m.pth", raw)
    reader = ArchiveReader(path, DEFAULT_LIMITS)
    try:
        view = reader.view("m.pth", genuine_bytes=len(raw))
        buffer = np.empty(len(raw), np.uint8)
        assert view.load(buffer)
        ours = torch_load(view, "m.pth")
    finally:
        reader.close()
    _same_as_torch_load(ours, reference)
    assert all(t.data_ptr() % t.element_size() == 0 for t in ours.values() if t.numel())
    lo, hi = buffer.ctypes.data, buffer.ctypes.data + buffer.nbytes
    assert any(not lo <= t.data_ptr() < hi for t in ours.values() if t.numel())  # some were copied


def test_a_member_view_loads_once_whole_and_refuses_a_short_file(tmp_path):
    """``MemberView.load`` reads the view in one call and then serves every read from memory; where the file holds
    fewer bytes than the view spans (it shrank after the archive was opened) it returns False and keeps reading
    from the file."""
    from mlflow_ptycho_flavor.bundle.archive import MemberView

    payload = os.urandom(10_000)
    path = tmp_path / "blob"
    path.write_bytes(b"head" + payload)
    fd = os.open(path, os.O_RDONLY)
    try:
        view = MemberView(fd, 4, len(payload))
        buffer = bytearray(len(payload))
        assert view.load(buffer) and view.memory.obj is buffer and bytes(view.memory) == payload
        path.write_bytes(b"")  # the file is gone: reads now come from memory
        assert view.pread(5, 9_000) == payload[9_000:9_005] and view.read() == payload
        target = bytearray(20)
        assert view.readinto_at(target, len(payload) - 10) == 10 and bytes(target[:10]) == payload[-10:]
        short = MemberView(fd, 4, len(payload))
        assert not short.load(bytearray(len(payload))) and short.memory is None
        with pytest.raises(ValueError, match="needs a buffer of"):
            short.load(bytearray(3))
    finally:
        os.close(fd)


def test_a_member_view_load_resumes_after_short_reads(tmp_path, monkeypatch):
    """The kernel may return fewer bytes than asked (Linux: at most ~2 GiB per call): ``load`` asks again from
    where the read stopped, in requests of at most ``_LOAD_REQUEST_BYTES``, and gets the whole view."""
    from mlflow_ptycho_flavor.bundle import archive as bundle_archive
    from mlflow_ptycho_flavor.bundle.archive import MemberView

    payload = os.urandom(50_000)
    path = tmp_path / "blob"
    path.write_bytes(b"head" + payload + b"tail")
    real_preadv = os.preadv
    requests = []

    def stingy_preadv(fd, buffers, offset):
        requests.append(sum(len(memoryview(b)) for b in buffers))
        first = memoryview(buffers[0]).cast("B")
        return real_preadv(fd, [first[:7_777]], offset)  # never more than 7,777 bytes per call

    monkeypatch.setattr(bundle_archive, "_LOAD_REQUEST_BYTES", 20_000)
    monkeypatch.setattr(os, "preadv", stingy_preadv)
    fd = os.open(path, os.O_RDONLY)
    try:
        view = MemberView(fd, 4, len(payload))
        assert view.load(bytearray(len(payload))) and bytes(view.memory) == payload
    finally:
        os.close(fd)
    assert len(requests) == -(-len(payload) // 7_777) and max(requests) == 20_000


def test_a_bundle_that_shrinks_before_its_weights_are_read_is_refused(base, tmp_path, monkeypatch):
    """The weights read whole comes back short (the file was cut after the archive was opened): a typed error."""
    from mlflow_ptycho_flavor.bundle.archive import MemberView

    monkeypatch.setattr(MemberView, "load", lambda self, buffer: False)
    with pytest.raises(CorruptBundleError, match=rf"'{WEIGHTS}' of .* is cut short \(the file shrank\)"):
        read_bundle(base)


def test_loaded_weights_are_in_memory_once_and_hashed_before_the_load_returns(base):
    """The CPU load's state_dict tensors all lie in one buffer (the member read whole), each its own storage of
    exactly its bytes, as torch.load gives them; the digest worker has finished when read_bundle returns."""
    contents = read_bundle(base)
    tensors = [t for t in contents.state_dict.values() if t.numel()]
    assert all(t.untyped_storage().nbytes() == t.nbytes for t in tensors)
    owners = {id(t.untyped_storage()) for t in tensors}
    assert len(owners) == len(tensors)  # separate storages, not views of one
    lowest = min(t.data_ptr() for t in tensors)
    highest = max(t.data_ptr() + t.nbytes for t in tensors)
    assert highest - lowest <= contents.member_sizes[WEIGHTS]  # all inside the one member-sized buffer
    assert WEIGHTS in contents.hashes_verified
    assert not [t for t in threading.enumerate() if t.name == "ptycho-bundle-digest"]


def _rewrite_records(raw: bytes, change) -> bytes:
    """The torch zip ``raw`` with ``change(name, data) -> (data, compress_type) | None`` (None drops the record)."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(raw)) as zin, zipfile.ZipFile(out, "w") as zout:
        for info in zin.infolist():
            result = change(info.filename, zin.read(info))
            if result is not None:
                data, method = result
                zout.writestr(zipfile.ZipInfo(info.filename, date_time=(1980, 1, 1, 0, 0, 0)), data,
                              compress_type=method)
    return out.getvalue()


def test_big_endian_storages_are_byteswapped_like_torch_load_does():
    """A file written on a big-endian machine: byteorder record "big", every storage's elements byte-reversed."""
    state = OrderedDict(w=torch.randn(3, 4), i=torch.arange(5, dtype=torch.int32), h=torch.randn(2).half())
    raw = torch_bytes(state)
    sizes = {"0": 4, "1": 4, "2": 2}  # storage keys in the order torch.save met them

    def to_big(name, data):
        if name.endswith("/byteorder"):
            return b"big", zipfile.ZIP_STORED
        key = name.rsplit("/", 1)[-1]
        if "/data/" in name:
            width = sizes[key]
            return np.frombuffer(data, f"<u{width}").astype(f">u{width}").tobytes(), zipfile.ZIP_STORED
        return data, zipfile.ZIP_STORED

    big = _rewrite_records(raw, to_big)
    reference = torch.load(io.BytesIO(big), map_location="cpu", weights_only=True)
    ours = torch_load(big, "m.pth")
    for key, tensor in state.items():
        assert torch.equal(ours[key], tensor) and torch.equal(reference[key], tensor), key


def test_a_file_without_byteorder_record_is_read_as_little_endian_like_torch_load():
    """Files from torch < 1.10 carry no byteorder record; torch.load then takes the storages as little-endian."""
    state = OrderedDict(w=torch.randn(3, 4), i=torch.arange(5, dtype=torch.int32))
    raw = _rewrite_records(torch_bytes(state), lambda name, data: None if name.endswith("/byteorder") else
                           (data, zipfile.ZIP_STORED))
    assert not any(name.endswith("/byteorder") for name in zipfile.ZipFile(io.BytesIO(raw)).namelist())
    reference = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    ours = torch_load(raw, "m.pth")
    for key in state:
        assert torch.equal(ours[key], reference[key]), key
    # the order it assumes, whatever the host's: on a big-endian host these storages are byteswapped, as torch does
    spans = check_nested_zip(raw, "m.pth", max_inflated_bytes=len(raw), max_entries=64)
    prefix = next(name for name in spans if name.endswith("/data.pkl"))[: -len("data.pkl")]
    assert _StorageFile(raw, prefix, spans, "m.pth")._byteorder() == "little"
    with_record = torch_bytes(state)
    spans = check_nested_zip(with_record, "m.pth", max_inflated_bytes=len(with_record), max_entries=64)
    assert _StorageFile(with_record, prefix, spans, "m.pth")._byteorder() == sys.byteorder


def test_deflated_storage_records_are_left_to_torch_load():
    """Not what torch.save writes, but a valid torch file: storages are then decoded by torch's reader."""
    state = OrderedDict(w=torch.zeros(64, 64), b=torch.ones(64))
    raw = _rewrite_records(torch_bytes(state), lambda name, data: (data, zipfile.ZIP_DEFLATED))
    ours = torch_load(raw, "m.pth", max_inflated_bytes=10**6)
    assert all(torch.equal(ours[k], v) for k, v in state.items())


@pytest.mark.parametrize(
    "damage, match",
    [
        ("short", r"the storage '0' needs 48 bytes \(12 torch\.float32\) but the file has a record of 44 bytes"),
        ("missing", r"the storage '0' needs 48 bytes \(12 torch\.float32\) but the file has no such record"),
        ("byteorder", r"the byteorder record says 'middle', not little or big"),
    ],
)
def test_damaged_storage_records_are_refused_naming_the_storage(damage, match):
    raw = torch_bytes(OrderedDict(w=torch.randn(3, 4)))

    def change(name, data):
        if name.endswith("/data/0"):
            return None if damage == "missing" else ((data[:-4] if damage == "short" else data), zipfile.ZIP_STORED)
        if name.endswith("/byteorder") and damage == "byteorder":
            return b"middle", zipfile.ZIP_STORED
        return data, zipfile.ZIP_STORED

    with pytest.raises(CorruptBundleError, match=match):
        torch_load(_rewrite_records(raw, change), "m.pth")


@pytest.mark.parametrize(
    "persistent_id",
    [
        b"X\x01\x00\x00\x00x",  # a string
        b"(X\x07\x00\x00\x00storagectorch\nFloatStorage\nX\x01\x00\x00\x000X\x03\x00\x00\x00cpuG@\x08\x00\x00\x00\x00"
        b"\x00\x00t",  # numel as a float
        b"(X\x07\x00\x00\x00storagectorch\nfloat32\nX\x01\x00\x00\x000X\x03\x00\x00\x00cpuK\x0ct",  # a dtype, no class
    ],
    ids=["not-a-tuple", "float-numel", "dtype-for-class"],
)
def test_malformed_persistent_ids_are_refused(persistent_id):
    raw = torch_bytes(OrderedDict(w=torch.randn(3, 4)))
    pickled = b"\x80\x02" + persistent_id + b"Q."
    crafted = _rewrite_records(
        raw, lambda name, data: (pickled if name.endswith("/data.pkl") else data, zipfile.ZIP_STORED)
    )
    with pytest.raises(CorruptBundleError, match=r"m\.pth holds the (persistent id|malformed storage id)"):
        torch_load(crafted, "m.pth")


def test_channels_last_copies_are_what_module_to_gives_on_two_threads(monkeypatch):
    """The NHWC default's weights: every 4-D tensor as ``.to(memory_format=channels_last)`` gives it (strides too,
    including the ambiguous one-channel kernels), the rest the same objects, the order kept; half the bytes are
    copied on a worker thread."""
    import threading

    from mlflow_ptycho_flavor.bundle import io as bundle_io

    generator = torch.Generator().manual_seed(3)
    state = OrderedDict(
        big=torch.randn(256, 256, 3, 3, generator=generator),
        one_channel=torch.randn(64, 1, 3, 3, generator=generator),
        bias=torch.randn(256, generator=generator),
        other=torch.randn(128, 256, 3, 3, generator=generator),
    )
    threads = []
    start = threading.Thread.start

    def counting_start(self):
        threads.append(self.name)
        start(self)

    monkeypatch.setattr(threading.Thread, "start", counting_start)
    copies = bundle_io._channels_last_copies(state)
    assert list(copies) == list(state) and threads == ["ptycho-nhwc-copy"]
    assert copies["bias"] is state["bias"]
    for key in ("big", "one_channel", "other"):
        expected = state[key].to(memory_format=torch.channels_last)
        assert copies[key].stride() == expected.stride() and torch.equal(copies[key], expected), key
        assert copies[key].data_ptr() != state[key].data_ptr()


def _nhwc_state() -> "OrderedDict[str, torch.Tensor]":
    """A plain state_dict with 4-D tensors of every kind the NHWC read meets: convertible ones (float, one channel
    - NCHW strides ``.to`` changes -, one pixel per sample, half, complex, bool, int), and ones it must leave as read
    (sharing a storage, a view with an offset, transposed, already NHWC, conjugate and negative views, one that
    requires grad, empty); and a bias."""
    generator = torch.Generator().manual_seed(11)
    shared = torch.randn(8, 4, 3, 3, generator=generator)
    state = OrderedDict(
        conv=torch.randn(16, 8, 3, 3, generator=generator),
        one_channel=torch.randn(6, 1, 3, 3, generator=generator),
        one_pixel=torch.randn(5, 3, 1, 1, generator=generator),
        half=torch.randn(4, 2, 3, 3, generator=generator).half(),
        complex=torch.randn(3, 3, 4, 4, dtype=torch.complex64, generator=generator),
        mask=torch.randn(2, 3, 2, 2, generator=generator) > 0,
        counts=torch.randint(0, 9, (2, 3, 2, 2), generator=generator),
        shared=shared,
        shared_view=shared[2:6],
        transposed=torch.randn(3, 4, 5, 5, generator=generator).transpose(2, 3),
        nhwc=torch.randn(4, 3, 5, 5, generator=generator).to(memory_format=torch.channels_last),
        conjugate=torch.randn(3, 2, 4, 4, dtype=torch.complex64, generator=generator).conj(),
        negative=torch.randn(3, 2, 4, 4, dtype=torch.complex64, generator=generator).conj().imag,
        trainable=torch.randn(4, 2, 3, 3, generator=generator).requires_grad_(),
        empty=torch.zeros(0, 3, 3, 3),
        bias=torch.randn(16, generator=generator),
    )
    state._metadata = OrderedDict({"": {"version": 1}, "conv": {"version": 2}})
    return state


_NHWC_READ = {"conv", "one_channel", "one_pixel", "half", "complex", "mask", "counts"}


def _torch_load_both_forms(raw: bytes, tmp_path, form: str, **kwargs):
    if form == "bytes":
        return torch_load(raw, "m.pth", **kwargs)
    path = tmp_path / f"outer-{len(list(tmp_path.iterdir()))}.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr("pad.txt", b"x" * 777)  # the member does not start at offset 0
        archive.writestr("m.pth", raw)
    from mlflow_ptycho_flavor.bundle.archive import DEFAULT_LIMITS, ArchiveReader

    reader = ArchiveReader(path, DEFAULT_LIMITS)
    try:
        return torch_load(reader.view("m.pth", genuine_bytes=len(raw)), "m.pth", **kwargs)
    finally:
        reader.close()


def _equal_as_loaded(ours, reference) -> None:
    """Same keys, types, values and flags as torch.load's (conjugate/negative bits included)."""
    assert list(ours) == list(reference)
    for key, tensor in reference.items():
        mine = ours[key]
        assert type(mine) is type(tensor) and mine.dtype == tensor.dtype and mine.shape == tensor.shape, key
        assert mine.is_conj() == tensor.is_conj() and mine.is_neg() == tensor.is_neg(), key
        assert mine.requires_grad == tensor.requires_grad, key
        assert torch.equal(mine.resolve_conj().resolve_neg(), tensor.resolve_conj().resolve_neg()), key


@pytest.mark.parametrize("slice_bytes", [1 << 20, 100], ids=["one-slice", "a-row-per-slice"])
@pytest.mark.parametrize("form", ["bytes", "view"])
def test_channels_last_read_gives_what_to_channels_last_gives(tmp_path, monkeypatch, form, slice_bytes):
    """``torch_load(channels_last=True)`` of a plain state_dict: the tensors it can read into NHWC equal
    ``.to(memory_format=channels_last)`` of what torch.load gives, strides included, each on its own storage; the
    others exactly as the plain read gives them; order and ``_metadata`` kept. Slices of one output channel at a
    time (``a-row-per-slice``: a row is larger than the slice) give the same bytes as one slice for the whole."""
    from mlflow_ptycho_flavor.bundle import unpickle

    monkeypatch.setattr(unpickle, "_NHWC_SLICE_BYTES", slice_bytes)
    raw = torch_bytes(_nhwc_state())
    reference = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    plain = _torch_load_both_forms(raw, tmp_path, form)
    ours = _torch_load_both_forms(raw, tmp_path, form, channels_last=True)
    _equal_as_loaded(plain, reference)
    _equal_as_loaded(ours, reference)
    assert ours._metadata == reference._metadata
    for key, tensor in reference.items():
        if key in _NHWC_READ:
            expected = tensor.to(memory_format=torch.channels_last)
            assert ours[key].stride() == expected.stride(), (key, ours[key].stride(), expected.stride())
            assert ours[key].untyped_storage().nbytes() == ours[key].nbytes, key  # its own storage, nothing more
        else:  # read in place, like the plain read
            assert ours[key].stride() == plain[key].stride(), key
            assert ours[key].storage_offset() == plain[key].storage_offset(), key
    assert ours["shared_view"].untyped_storage().data_ptr() == ours["shared"].untyped_storage().data_ptr()


def _with_parameter(state):
    state["parameter"] = torch.nn.Parameter(state["conv"])  # shares conv's storage: one storage named once
    return state


def _with_nested(state):
    state["nested"] = [state["conv"]]  # the same tensor object, reachable a second way
    return state


def _with_tensor_metadata(state):
    state._metadata = OrderedDict({"": {"version": state["conv"][0, 0]}})
    return state


def _with_bare_storage(state):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TypedStorage is deprecated; torch.save still writes it
        state["storage"] = state["conv"].storage()
    return state


@pytest.mark.parametrize("change", [_with_parameter, _with_nested, _with_tensor_metadata, _with_bare_storage],
                         ids=lambda change: change.__name__[6:])
def test_channels_last_read_leaves_anything_but_a_plain_state_dict_as_torch_load_reads_it(change):
    """Where a tensor or its storage can be reached another way than as one value of a plain state_dict, replacing
    it would leave the other holder on an unread storage: nothing is read into NHWC then, and every value is
    torch.load's."""
    raw = torch_bytes(change(_nhwc_state()))
    reference = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=False)
    ours = torch_load(raw, "m.pth", channels_last=True)
    for key, value in reference.items():
        if isinstance(value, torch.Tensor):
            assert ours[key].stride() == value.stride(), key
            assert torch.equal(ours[key].resolve_conj().resolve_neg(), value.resolve_conj().resolve_neg()), key
    if "nested" in reference:
        assert torch.equal(ours["nested"][0], reference["conv"])
    if "storage" in reference:
        assert torch.equal(torch.tensor(ours["storage"].tolist()), torch.tensor(reference["storage"].tolist()))
    if change is _with_tensor_metadata:
        assert torch.equal(ours._metadata[""]["version"], reference._metadata[""]["version"])


def test_channels_last_read_of_a_big_endian_file_is_left_to_the_caller():
    """Byte-swapped storages are read in place (NCHW, swapped like torch.load): build_network converts them."""
    state = OrderedDict(w=torch.randn(4, 3, 3, 3))
    raw = torch_bytes(state)
    big = _rewrite_records(raw, lambda name, data: (
        (b"big" if name.endswith("/byteorder") else
         np.frombuffer(data, "<u4").astype(">u4").tobytes() if "/data/" in name else data), zipfile.ZIP_STORED))
    ours = torch_load(big, "m.pth", channels_last=True)
    assert torch.equal(ours["w"], state["w"]) and ours["w"].is_contiguous()


def test_the_cpu_default_load_copies_no_weight(base, monkeypatch):
    """``from_bundle`` on the CPU runs NHWC activations on the weights as read (NCHW): nothing is converted or read
    into NHWC, and the network predicts bit for bit what the whole network converted by torch's channels_last
    predicts (oneDNN reorders the weights for every convolution whatever their strides)."""
    from mlflow_ptycho_flavor.bundle import io as bundle_io
    from mlflow_ptycho_flavor.bundle import unpickle as bundle_unpickle
    from mlflow_ptycho_flavor.model.inference import PtychoTorchModel

    converted = read_bundle(base).build_network("cpu", adopt_weights=True).to(memory_format=torch.channels_last)
    conversions = []
    monkeypatch.setattr(bundle_io, "_channels_last_copies", lambda state_dict: conversions.append("copies"))
    monkeypatch.setattr(bundle_unpickle._StorageFile, "_read_channels_last",
                        lambda *args: conversions.append("nhwc read"))
    model = PtychoTorchModel.from_bundle(base, device="cpu")
    assert conversions == [] and model.network.channels_last
    four_d = [p for p in model.network.state_dict().values() if p.dim() == 4]
    assert four_d and all(p.is_contiguous() for p in four_d)
    x = np.random.default_rng(5).uniform(0, 2, (3, model.channels, model.N, model.N)).astype(np.float32)
    with torch.inference_mode():
        expected = converted(torch.from_numpy(x), torch.ones(3, 1, 1, 1)).numpy()
    assert np.array_equal(model.predict(x, np.ones(3, np.float32)), expected)


def test_contents_read_into_nhwc_build_the_contiguous_network_when_asked(base):
    """``read_bundle(channels_last=True)`` then ``build_network(channels_last=False)``: the eager layout asked for,
    the same values."""
    contents = read_bundle(base, channels_last=True)
    assert any(tensor.dim() == 4 and not tensor.is_contiguous() for tensor in contents.state_dict.values())
    network = contents.build_network("cpu", adopt_weights=True, channels_last=False)
    reference = read_bundle(base).state_dict
    for key, tensor in network.state_dict().items():
        assert tensor.is_contiguous(), key
        if key in reference:
            assert torch.equal(tensor, reference[key]), key


def test_is_channels_last_is_the_strides_to_channels_last_gives():
    for shape in [(4, 1, 3, 3), (4, 2, 1, 1), (1, 1, 1, 1), (8, 16, 3, 3), (4, 3, 1, 5)]:
        tensor = torch.randn(shape)
        nhwc = tensor.to(memory_format=torch.channels_last)
        assert is_channels_last(nhwc), shape
        assert is_channels_last(tensor) == (tensor.stride() == nhwc.stride()), shape
    assert not is_channels_last(torch.randn(4, 3, 3, 3))


def test_damage_anywhere_in_a_large_member_is_found(tmp_path):
    """A stored model.pth of 9 MB of weights, hashed whole on the worker thread: a flipped byte near its start, in
    its middle or near its end fails the manifest's sha256, and the intact file loads."""
    from conftest import make_perturbed_network

    path = save_torch_bundle(make_perturbed_network(seed=5, N=64, n_filters_scale=2), tmp_path / "wts.h5.zip")
    raw = path.read_bytes()
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo(WEIGHTS)
    assert info.compress_type == zipfile.ZIP_STORED and info.file_size > 8 << 20
    name_length, extra_length = struct.unpack("<HH", raw[info.header_offset + 26 : info.header_offset + 30])
    start = info.header_offset + 30 + name_length + extra_length  # the local header's own lengths
    load_torch_bundle(path, device="cpu", restore_params=False)
    for offset in (100, info.file_size // 2, info.file_size - 100):
        damaged = bytearray(raw)
        damaged[start + offset] ^= 0x01
        target = tmp_path / f"damaged_{offset}" / "wts.h5.zip"
        target.parent.mkdir()
        target.write_bytes(bytes(damaged))
        with pytest.raises(CorruptBundleError, match=rf"'{WEIGHTS}' does not match the sha256 recorded in manifest"):
            read_bundle(target)


# ------------------------------------------------------------------------------------------------------------
# read_and_build: the weights' digests checked while the network is built
# ------------------------------------------------------------------------------------------------------------
def _first_storage_offset(torch_file: bytes) -> int:
    """Where the first storage record's bytes start inside a torch zip file (stored records)."""
    with zipfile.ZipFile(io.BytesIO(torch_file)) as archive:
        info = next(i for i in archive.infolist() if "/data/" in i.filename)
    name_length, extra_length = struct.unpack_from("<HH", torch_file, info.header_offset + 26)
    return info.header_offset + 30 + name_length + extra_length


def test_weights_damaged_after_writing_are_refused_after_the_build_and_the_config_is_put_back(base, members, tmp_path):
    """A flipped low mantissa bit decodes to finite weights that fit, so only the sha256 (checked while the network
    is built) finds it: the load is refused and the global config is as it was before, keys the snapshot would have
    added included."""
    from mlflow_ptycho_flavor.bundle import params as params_module
    from mlflow_ptycho_flavor.bundle.io import read_and_build

    damaged = bytearray(members[WEIGHTS])
    damaged[_first_storage_offset(members[WEIGHTS])] ^= 0x01
    path = tmp_path / "wts.h5.zip"
    _rezip({**members, WEIGHTS: bytes(damaged)}, path)  # zipfile records the new CRC: the manifest's sha256 differs
    params_module.reset_cfg()
    params_module.cfg["N"] = 999
    params_module.cfg.pop("gridsize")
    before = dict(params_module.cfg)
    try:
        with pytest.raises(CorruptBundleError, match=rf"'{WEIGHTS}' does not match the sha256 recorded"):
            read_and_build(path, device="cpu")
        assert params_module.cfg == before
        with pytest.raises(CorruptBundleError, match="does not match the sha256"):
            load_torch_bundle(path, device="cpu")
        assert params_module.cfg == before
        # the same bytes with the damage undone load, restore the snapshot, and leave no digest thread behind
        contents, network = read_and_build(base, device="cpu")
        assert params_module.cfg["N"] == 64 and params_module.cfg["gridsize"] == 1
        assert WEIGHTS in contents.hashes_verified
        assert not [t for t in threading.enumerate() if t.name == "ptycho-bundle-digest"]
    finally:
        params_module.reset_cfg()


def test_a_failed_build_reports_damage_first_and_puts_the_config_back(base, members, tmp_path, monkeypatch):
    """When the build itself fails while the digests would refuse the weights, the damage is what the error says
    (it explains the failure); the config is put back either way."""
    from mlflow_ptycho_flavor.bundle import params as params_module
    from mlflow_ptycho_flavor.bundle.io import BundleContents, read_and_build
    from mlflow_ptycho_flavor.errors import StateDictMismatchError

    damaged = bytearray(members[WEIGHTS])
    damaged[_first_storage_offset(members[WEIGHTS])] ^= 0x01
    path = tmp_path / "wts.h5.zip"
    _rezip({**members, WEIGHTS: bytes(damaged)}, path)

    def failing_build(self, *args, **kwargs):
        raise StateDictMismatchError("the build failed")

    monkeypatch.setattr(BundleContents, "build_network", failing_build)
    params_module.reset_cfg()
    before = dict(params_module.cfg)
    try:
        with pytest.raises(CorruptBundleError, match="does not match the sha256"):
            read_and_build(path, device="cpu")
        assert params_module.cfg == before
        with pytest.raises(StateDictMismatchError, match="the build failed"):
            read_and_build(base, device="cpu")  # intact weights: the build's own error
        assert params_module.cfg == before
    finally:
        params_module.reset_cfg()


def test_params_restored_puts_back_only_what_the_snapshot_set():
    from mlflow_ptycho_flavor.bundle import params as params_module

    params_module.reset_cfg()
    params_module.cfg["label"] = "mine"
    before = dict(params_module.cfg)
    snapshot = {**params_module.BUNDLE_PARAM_DEFAULTS, "N": 64, "gridsize": 1, "label": "bundle", "new_key": 1}
    try:
        with pytest.raises(RuntimeError, match="later failure"):
            with params_module.params_restored(snapshot) as restored:
                assert restored["label"] == "bundle" and restored["new_key"] == 1 and restored["N"] == 64
                raise RuntimeError("later failure")
        assert params_module.cfg == before and "new_key" not in params_module.cfg
        with params_module.params_restored(snapshot):
            pass
        assert params_module.cfg["new_key"] == 1 and params_module.cfg["label"] == "bundle"  # kept on success
    finally:
        params_module.reset_cfg()


def test_every_module_of_a_loaded_network_is_in_eval_mode(base):
    """Adopted networks come from a blueprint pickled in eval mode (no walk per load); every module says so."""
    network, _ = load_torch_bundle(base, device="cpu")
    assert not any(module.training for module in network.modules())
    config = NetworkConfig(N=64, n_filters_scale=1)
    adopted = network_from_state_dict(config, {k: v.clone() for k, v in network.state_dict().items()})
    assert not any(module.training for module in adopted.modules())
