"""A generated corpus of hostile ``wts.h5.zip`` archives (GitHub issue 7, part 1).

The promise under test: opening a file never runs code, never writes anything, and uses bounded memory; every bad
input gets the documented typed error (a :class:`BundleError` subclass, asserted per case with ``match=``).

Every refusal goes through :func:`_refused`, which checks, besides the error class and message:

* no code ran: a Python audit hook armed only during the load records ``os.system``, ``subprocess.Popen``,
  ``exec``/``compile`` of non-file code, and every file write, rename, removal, ``mkdir`` or temp file;
  the payload marker files under ``tmp_path`` are never created;
* nothing was written: the tree under ``tmp_path`` is identical before and after, and ``tempfile`` (redirected to
  a private, empty directory for the test) stays empty;
* memory stayed bounded: the ``tracemalloc`` peak of the load is far below what the hostile input asks for.

The cases are built in ``tmp_path`` from one small valid bundle (N=64, gs=1, n_filters_scale=1). Cases that would
pass silently if the reader regressed are paired with a check that the payload is live (plain ``pickle.loads``,
``dill.loads`` or ``torch.load(weights_only=False)`` does create the marker), and that the corpus' base bundle
loads.

Complements ``test_bundle_errors.py`` (basic cases) rather than repeating it.
"""

from __future__ import annotations

import builtins
import codecs
import io
import math
import os
import pickle
import stat
import struct
import subprocess
import sys
import tempfile
import tracemalloc
import warnings
import zipfile
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch

from mlflow_ptycho_flavor import load_torch_bundle, read_bundle
from mlflow_ptycho_flavor.bundle import BundleLimits
from mlflow_ptycho_flavor.errors import (
    BundleError,
    ConfigMismatchError,
    CorruptBundleError,
    NotABundleError,
    StateDictMismatchError,
    UnsafeBundleError,
    UnsupportedBundleError,
)
from mlflow_ptycho_flavor.bundle.params import LEGACY_DEFAULT_CFG, cfg
from mlflow_ptycho_flavor.bundle.unpickle import ALLOW_PICKLE_ENV
from bundle_crafting import (  # noqa: F401 - module-scoped fixtures are used by name
    AE_PARAMS,
    BOMB,
    MANIFEST,
    MB,
    METADATA,
    PARAMS,
    WEIGHTS,
    Reduce,
    base,
    members,
    metadata,
    numpy_array_state,
    params,
    state_dict,
    torch_bytes,
)

AE_WEIGHTS = "autoencoder/model.pth"
#: Peak Python allocation allowed while refusing an ordinary hostile bundle (the base bundle is 2.2 MB).
MEMORY_CAP = 32 * MB


# ------------------------------------------------------------------------------------------------------------
# Oracle: an audit hook that records code execution and writes while armed
# ------------------------------------------------------------------------------------------------------------
_AUDIT: dict = {"armed": False, "events": []}
_RUN_EVENTS = {
    "os.system", "subprocess.Popen", "os.exec", "os.spawn", "os.posix_spawn", "os.fork", "os.forkpty",
    "pty.spawn", "ctypes.dlopen", "ctypes.call_function", "socket.connect", "builtins.input", "webbrowser.open",
}
_WRITE_EVENTS = {
    "os.remove", "os.rename", "os.mkdir", "os.rmdir", "os.truncate", "os.symlink", "os.link", "os.chmod",
    "os.chown", "os.utime", "shutil.copyfile", "shutil.copymode", "shutil.copystat", "shutil.move",
    "shutil.rmtree", "shutil.make_archive", "shutil.unpack_archive", "tempfile.mkstemp", "tempfile.mkdtemp",
    "os.putenv", "os.unsetenv", "os.mkfifo", "os.mknod",
}
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


def _module_file(filename) -> bool:
    """Code compiled/executed from a module file (an import), as opposed to a string from a payload."""
    return isinstance(filename, str) and (filename.endswith(".py") or filename.startswith("<frozen "))


def _audit_hook(event: str, args: tuple) -> None:
    if not _AUDIT["armed"]:
        return
    if event in _RUN_EVENTS or event in _WRITE_EVENTS:
        _AUDIT["events"].append((event, repr(args)[:200]))
    elif event == "open":
        path, mode, flags = (tuple(args) + (None, None, None))[:3]
        writes = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
            isinstance(flags, int) and flags & _WRITE_FLAGS
        )
        if writes:
            _AUDIT["events"].append((event, repr(args)[:200]))
    elif event == "compile":
        filename = args[1] if len(args) > 1 else None
        if not _module_file(filename):
            _AUDIT["events"].append((event, repr(args)[:200]))
    elif event == "exec":
        code = args[0] if args else None
        if not _module_file(getattr(code, "co_filename", None)):
            _AUDIT["events"].append((event, repr(args)[:200]))


sys.addaudithook(_audit_hook)  # hooks cannot be removed; this one is inert unless armed


def _tree(root: Path) -> dict:
    return {
        str(p.relative_to(root)): (p.is_dir(), p.stat().st_size if p.is_file() else 0, p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
    }


@pytest.fixture(autouse=True)
def _no_unsafe_opt_in(monkeypatch):
    monkeypatch.delenv(ALLOW_PICKLE_ENV, raising=False)
    monkeypatch.delenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", raising=False)


@pytest.fixture
def private_tmp(tmp_path, monkeypatch):
    """``tempfile`` of this process redirected to an empty folder that must stay empty."""
    folder = tmp_path / "_tempfile"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    monkeypatch.setenv("TMPDIR", str(folder))
    return folder


@pytest.fixture
def refused(tmp_path, private_tmp):
    """``refused(path, error, match, *, markers=(), memory_cap=MEMORY_CAP, loader=load_torch_bundle, **kw)``.

    Loads and expects exactly ``error`` (``match`` on the message); then asserts no code ran, nothing was written
    and the tracemalloc peak stayed under ``memory_cap``. Returns the exception.
    """

    def check(path, error, match, *, markers=(), memory_cap=MEMORY_CAP, loader=None, **kwargs):
        loader = loader or (lambda p, **kw: load_torch_bundle(p, device="cpu", **kw))
        before = _tree(tmp_path)
        _AUDIT["events"].clear()
        tracemalloc.start()
        _AUDIT["armed"] = True
        try:
            with pytest.raises(error, match=match) as info:
                loader(path, **kwargs)
        finally:
            _AUDIT["armed"] = False
            _, peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
        assert type(info.value) is error, f"expected exactly {error.__name__}, got {type(info.value).__name__}"
        assert isinstance(info.value, BundleError)
        assert _AUDIT["events"] == [], f"code ran or something was written while loading: {_AUDIT['events']}"
        for marker in markers:
            assert not Path(marker).exists(), f"payload ran: {marker} exists"
        assert _tree(tmp_path) == before, "the load wrote under tmp_path"
        assert list(private_tmp.iterdir()) == [], "the load created temp files"
        assert peak < memory_cap, f"peak Python allocation {peak / MB:.1f} MB >= {memory_cap / MB:.1f} MB"
        assert cfg == LEGACY_DEFAULT_CFG, "a refused bundle changed the global config"
        return info.value

    return check


# ------------------------------------------------------------------------------------------------------------
# The valid base bundle and helpers to derive hostile ones
# ------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def base_bytes(base) -> bytes:
    return base.read_bytes()


@pytest.fixture(scope="module")
def deflated_bytes(base_bytes) -> bytes:
    """The base bundle with every member deflated, as upstream writes bundles (ours stores the torch files)."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(base_bytes)) as source, zipfile.ZipFile(out, "w") as target:
        for info in source.infolist():
            data = source.read(info.filename)
            info.compress_type = zipfile.ZIP_DEFLATED
            target.writestr(info, data)
    return out.getvalue()


def _zip(path: Path, entries, *, compression=zipfile.ZIP_STORED) -> Path:
    """Write ``entries`` ((name or ZipInfo, bytes) pairs; duplicates allowed) as a zip at ``path``.

    Stored, not deflated, unless asked: the reader accepts both, and it keeps building ~200 archives cheap.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Duplicate name"
        with zipfile.ZipFile(path, "w", compression=compression) as archive:
            for name, data in entries:
                archive.writestr(name, data)
    return path


def _with(members: dict, *, drop_hashes: bool = True, remove=(), **replace) -> list:
    """Members with some replaced (keyword names: see _MEMBER_KEYS) and the manifest's sha256 table dropped."""
    out = dict(members)
    for key in remove:
        out.pop(key)
    for key, data in replace.items():
        out[_MEMBER_KEYS[key]] = data
    if drop_hashes and "manifest" not in replace:
        manifest = pickle.loads(out[MANIFEST])
        manifest.pop("sha256", None)
        out[MANIFEST] = pickle.dumps(manifest, protocol=4)
    return list(out.items())


_MEMBER_KEYS = {"manifest": MANIFEST, "weights": WEIGHTS, "params": PARAMS, "ae_params": AE_PARAMS,
                "metadata": METADATA, "ae_weights": AE_WEIGHTS}


def _pk(obj) -> bytes:
    return pickle.dumps(obj, protocol=4)


def _both_params(obj) -> dict:
    data = obj if isinstance(obj, bytes) else _pk(obj)
    return {"params": data, "ae_params": data}


class EvilInTest:
    """A class defined in the test: unpickling it needs this module importable."""

    def __init__(self):
        self.value = 1


def _cd_entries(data: bytes) -> list[tuple[int, str]]:
    """(offset, name) of every central directory entry of a zip held in ``data``."""
    eocd = data.rfind(b"PK\x05\x06")
    count = struct.unpack_from("<H", data, eocd + 10)[0]
    offset = struct.unpack_from("<I", data, eocd + 16)[0]
    entries = []
    for _ in range(count):
        name_len, extra_len, comment_len = struct.unpack_from("<HHH", data, offset + 28)
        entries.append((offset, data[offset + 46: offset + 46 + name_len].decode()))
        offset += 46 + name_len + extra_len + comment_len
    return entries


def _patch(data: bytes, member: str, field: int, fmt: str, value, *, local: bool = True) -> bytes:
    """Patch a central-directory field (offset ``field`` in the entry) of ``member``, and the local copy."""
    out = bytearray(data)
    for offset, name in _cd_entries(data):
        if name == member:
            struct.pack_into(fmt, out, offset + field, value)
            if local:
                header = struct.unpack_from("<I", data, offset + 42)[0]
                struct.pack_into(fmt, out, header + field - 2, value)  # local header lacks 'version made by'
            return bytes(out)
    raise KeyError(member)


def _data_offset(data: bytes, member: str) -> tuple[int, int]:
    """(start, compressed size) of ``member``'s compressed bytes."""
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        info = archive.getinfo(member)
    name_len, extra_len = struct.unpack_from("<HH", data, info.header_offset + 26)
    return info.header_offset + 30 + name_len + extra_len, info.compress_size


# ------------------------------------------------------------------------------------------------------------
# Payloads: each would create its marker file if unpickled without restrictions
# ------------------------------------------------------------------------------------------------------------
PAYLOAD_KINDS = ["os.system", "builtins.eval", "subprocess.Popen", "open-writer", "dill-function"]
PAYLOAD_GLOBALS = {
    "os.system": rf"{os.system.__module__}\.system",
    "builtins.eval": r"builtins\.eval",
    "subprocess.Popen": r"subprocess\.Popen",
    "open-writer": r"(io|_io|builtins)\.open",
    "dill-function": r"dill\._dill\._\w+",
}


def _payload(kind: str, marker: Path):
    if kind == "os.system":
        return Reduce(os.system, (f"touch {marker}",))
    if kind == "builtins.eval":
        return Reduce(builtins.eval, (f"__import__('pathlib').Path({str(marker)!r}).touch()",))
    if kind == "subprocess.Popen":
        return Reduce(subprocess.Popen, (["touch", str(marker)],))
    if kind == "open-writer":
        return Reduce(open, (str(marker), "w"))
    raise ValueError(kind)


def _payload_bytes(kind: str, marker: Path, wrap=lambda p: p) -> bytes:
    """The pickled payload (wrapped into a container by ``wrap``); dill for the by-value function payload."""
    if kind == "dill-function":
        import dill

        target = str(marker)
        return dill.dumps(wrap(Reduce(lambda: Path(target).touch(), ())))
    return _pk(wrap(_payload(kind, marker)))


@pytest.mark.parametrize("kind", PAYLOAD_KINDS)
def test_payloads_are_live(tmp_path, kind):
    """Guard against a vacuous corpus: unrestricted unpickling of each payload DOES create its marker."""
    import dill

    marker = tmp_path / f"live-{kind}"
    result = dill.loads(_payload_bytes(kind, marker))
    if isinstance(result, subprocess.Popen):
        result.wait(timeout=30)
    if hasattr(result, "close"):
        result.close()
    assert marker.exists()


def test_torch_payload_is_live(tmp_path):
    marker = tmp_path / "live-torch"
    torch.load(io.BytesIO(torch_bytes({"x": _payload("os.system", marker)})), weights_only=False)
    assert marker.exists()


def test_base_bundle_loads_under_the_oracle(base):
    """The oracle itself is quiet for a valid bundle (no false positives from the loader)."""
    _AUDIT["events"].clear()
    _AUDIT["armed"] = True
    try:
        network, snapshot = load_torch_bundle(base, device="cpu")
    finally:
        _AUDIT["armed"] = False
    assert _AUDIT["events"] == []
    assert snapshot["N"] == 64 and network.config.n_filters_scale == 1


# ------------------------------------------------------------------------------------------------------------
# .dill and torch members carrying code
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", PAYLOAD_KINDS)
@pytest.mark.parametrize(
    "where", ["manifest-whole", "manifest-value", "params-value", "ae-params-only", "params-key", "params-nested"]
)
def test_dill_payload_refused(members, params, tmp_path, refused, kind, where):
    marker = tmp_path / "marker"
    manifest = {"models": ["diffraction_to_obj", "autoencoder"], "version": "2.0-pytorch"}
    if where == "manifest-whole":
        replace = {"manifest": _payload_bytes(kind, marker)}
        member = MANIFEST
    elif where == "manifest-value":
        replace = {"manifest": _payload_bytes(kind, marker, lambda p: {**manifest, "backend": p})}
        member = MANIFEST
    elif where == "params-value":
        replace = _both_params(_payload_bytes(kind, marker, lambda p: {**params, "intensity_scale": p}))
        member = PARAMS
    elif where == "ae-params-only":  # the second copy is decoded just as carefully
        replace = {"ae_params": _payload_bytes(kind, marker, lambda p: {**params, "nphotons": p})}
        member = AE_PARAMS
    elif where == "params-key":
        replace = _both_params(_payload_bytes(kind, marker, lambda p: {**params, "k": (1, [p])}))
        member = PARAMS
    else:
        replace = _both_params(_payload_bytes(kind, marker, lambda p: {**params, "deep": {"a": [{"b": (p,)}]}}))
        member = PARAMS
    path = _zip(tmp_path / "wts.h5.zip", _with(members, **replace))
    refused(path, UnsafeBundleError, rf"{member} references the global {PAYLOAD_GLOBALS[kind]}, which the safe "
                                     "loader refuses", markers=[marker])


@pytest.mark.parametrize("kind", ["os.system", "builtins.eval", "subprocess.Popen", "open-writer"])
@pytest.mark.parametrize("member", ["metadata", "weights"])
def test_torch_member_payload_refused(members, state_dict, metadata, tmp_path, refused, kind, member):
    marker = tmp_path / "marker"
    payload = _payload(kind, marker)
    if member == "metadata":
        obj = {**metadata, "ci_statistics": {"rms_input_scale": [payload]}}
    else:
        obj = OrderedDict(state_dict)
        obj["model.autoencoder.decoder_amp.amp.conv2.bias"] = payload
    path = _zip(tmp_path / "wts.h5.zip", _with(members, **{member: torch_bytes(obj)}))
    name = _MEMBER_KEYS[member].replace(".", r"\.")
    refused(path, UnsafeBundleError, rf"{name} needs arbitrary Python objects to unpickle \(the global "
                                     rf"{PAYLOAD_GLOBALS[kind]}\)", markers=[marker])


def test_autoencoder_weights_are_never_unpickled(members, tmp_path, private_tmp):
    """autoencoder/model.pth (upstream's weightless sentinel) is never decoded: a payload there is inert."""
    marker = tmp_path / "marker"
    path = _zip(tmp_path / "wts.h5.zip", _with(members, ae_weights=torch_bytes({"_sentinel": _payload(
        "os.system", marker)})))
    _AUDIT["events"].clear()
    _AUDIT["armed"] = True
    try:
        network, _ = load_torch_bundle(path, device="cpu")
    finally:
        _AUDIT["armed"] = False
    assert _AUDIT["events"] == [] and not marker.exists() and network.config.N == 64


def test_torch_member_with_class_defined_in_test(members, state_dict, tmp_path, refused):
    obj = OrderedDict(state_dict)
    obj["model.extra"] = EvilInTest()
    path = _zip(tmp_path / "wts.h5.zip", _with(members, weights=torch_bytes(obj)))
    refused(path, UnsafeBundleError, r"model\.pth needs arbitrary Python objects to unpickle \(the global "
                                     r"(tests\.)?test_hostile_bundles\.EvilInTest\)")


def test_crafted_torch_pickle_with_os_system(members, tmp_path, refused):
    """A hand-written data.pkl (not produced by torch.save of an object) inside a valid torch zip."""
    marker = tmp_path / "marker"
    command = f"touch {marker}".encode()
    data_pkl = b"\x80\x02c" + os.system.__module__.encode() + b"\nsystem\nq\x00X" + struct.pack("<I", len(command))
    data_pkl += command + b"q\x01\x85q\x02Rq\x03."
    torch_file = _replace_torch_record(torch_bytes({}), data_pkl)
    pickle.loads(data_pkl)  # noqa: S301 - the crafted pickle is valid and live ...
    assert marker.exists()
    marker.unlink()  # ... and the reader must not run it
    path = _zip(tmp_path / "wts.h5.zip", _with(members, weights=torch_file))
    refused(path, UnsafeBundleError, rf"global {os.system.__module__}\.system\) and was refused by "
                                     r"torch\.load\(weights_only=True\) rules", markers=[marker])


def _replace_torch_record(torch_file: bytes, data_pkl: bytes) -> bytes:
    """The torch zip ``torch_file`` with its ``data.pkl`` record replaced."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(torch_file)) as zin, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as zout:
        for name in zin.namelist():
            zout.writestr(name, data_pkl if name.endswith("/data.pkl") else zin.read(name))
    return out.getvalue()


def _nested_hex(levels: int):
    value = b"x"
    obj = value
    for _ in range(levels):
        obj = Reduce(codecs.encode, (obj, "hex"))
    return obj


@pytest.mark.parametrize(
    "payload, name",
    [
        (lambda: Reduce(bytearray, (200 * MB,)), r"builtins\.bytearray"),
        (lambda: _nested_hex(24), r"_codecs\.encode"),
        (lambda: Reduce(torch.Tensor, (4000, 4000)), r"torch\.Tensor"),
    ],
    ids=["bytearray-200MB", "hex-encode-x24", "legacy-tensor-constructor"],
)
def test_torch_allowed_allocation_bombs_refused(members, metadata, tmp_path, refused, payload, name):
    """Globals torch's weights_only loader DOES allow, turned into allocation bombs from a few bytes."""
    data = torch_bytes({**metadata, "ci_statistics": {"rms_input_scale": payload()}})
    assert len(data) < 20_000
    path = _zip(tmp_path / "wts.h5.zip", _with(members, metadata=data))
    refused(path, UnsafeBundleError, rf"references the global {name}, which torch\.load\(weights_only=True\) would "
                                     "call but a state_dict or metadata dict never needs", memory_cap=16 * MB)


def test_allow_unsafe_runs_dill_payloads(members, params, tmp_path):
    """Documents the opt-in: allow_unsafe=True unpickles .dill members with dill, so the payload runs."""
    marker = tmp_path / "marker"
    replace = _both_params(_payload_bytes("open-writer", marker, lambda p: {**params, "x": p}))
    path = _zip(tmp_path / "wts.h5.zip", _with(members, **replace))
    network, snapshot = load_torch_bundle(path, device="cpu", allow_unsafe=True)
    snapshot["x"].close()
    assert marker.exists() and network.config.N == 64


def test_allow_unsafe_does_not_relax_torch_weights_only(members, state_dict, tmp_path, refused):
    marker = tmp_path / "marker"
    obj = OrderedDict(state_dict)
    obj["model.extra"] = _payload("os.system", marker)
    path = _zip(tmp_path / "wts.h5.zip", _with(members, weights=torch_bytes(obj)))
    refused(path, UnsafeBundleError, r"refused by torch\.load\(weights_only=True\)", markers=[marker],
            allow_unsafe=True)


# ------------------------------------------------------------------------------------------------------------
# Pickles of plain data that ask for unbounded memory or crash numpy
# ------------------------------------------------------------------------------------------------------------
def _billion_laughs(levels: int = 40):
    value: list = ["lol"]
    for _ in range(levels):
        value = [value, value]
    return value


def _deep_list_pickle(depth: int) -> bytes:
    return b"\x80\x04" + b"]" * depth + b"a" * (depth - 1) + b"."


@pytest.mark.parametrize(
    "case, error, match",
    [
        ("bytearray-10GB", UnsafeBundleError, r"asks for bytearray\(int\)"),
        ("set-of-range", UnsafeBundleError, r"asks for a range of 1000000000 items"),
        ("ndarray-call", UnsafeBundleError, r"numpy\.ndarray\(\.\.\.\) to be called directly"),
        ("reconstruct-huge", UnsafeBundleError, r"numpy _reconstruct\(numpy\.ndarray, \(1000000000,\)\)"),
        ("object-subarray-dtype", UnsafeBundleError, r"numpy dtype 'V80'; only plain numeric dtypes"),
        ("object-array", UnsafeBundleError, r"numpy dtype 'O8'; only plain numeric dtypes"),
        ("array-short-data", CorruptBundleError, r"needs 8000000 bytes, holds 0"),
        ("billion-laughs", UnsafeBundleError, r"expands to more than \d+ objects from \d+ bytes"),
        ("cycle", UnsafeBundleError, r"nests containers more than 64 levels deep"),
        ("deep-nesting", UnsafeBundleError, r"nests containers more than 64 levels deep"),
        ("persistent-id", UnsafeBundleError, r"uses persistent ids"),
        ("garbage-opcodes", CorruptBundleError, r"is not a valid pickle of plain data"),
        ("empty", CorruptBundleError, r"is not a valid pickle of plain data: ValueError: pickle exhausted"),
        ("bytes8-8GB-declared", CorruptBundleError, r"is not a valid pickle of plain data: ValueError: expected "
                                                    r"8589934592 bytes in a bytes8"),
        ("bytearray8-8GB-declared", CorruptBundleError, r"expected 8589934592 bytes in a bytearray8"),
        ("memo-slot-1GB", UnsafeBundleError, r"stores into pickle memo slot 67108864, past anything its 9 bytes"),
        ("memo-slot-text", UnsafeBundleError, r"stores into pickle memo slot 99999999, past anything its 13 bytes"),
    ],
)
def test_plain_data_bombs_in_params(members, params, tmp_path, refused, case, error, match):
    if case == "bytearray-10GB":
        data = _pk({**params, "x": Reduce(bytearray, (10 * 1024 * MB,))})
    elif case == "set-of-range":
        data = _pk({**params, "x": Reduce(set, (Reduce(range, (10**9,)),))})
    elif case == "ndarray-call":
        data = _pk({**params, "x": Reduce(np.ndarray, ((10**9,),))})
    elif case == "reconstruct-huge":
        from numpy._core.multiarray import _reconstruct

        data = _pk({**params, "x": Reduce(_reconstruct, (np.ndarray, (10**9,), b"b"))})
    elif case == "object-subarray-dtype":  # numpy's own __setstate__ segfaults on this one
        data = _pk({**params, "x": numpy_array_state((1,), np.dtype(("O", (10,))), [])})
    elif case == "object-array":
        data = _pk({**params, "x": np.array([1, "two"], dtype=object)})
    elif case == "array-short-data":
        data = _pk({**params, "x": numpy_array_state((10**6,), np.dtype("f8"), b"")})
    elif case == "billion-laughs":
        data = _pk({**params, "x": _billion_laughs()})
    elif case == "cycle":
        loop: list = []
        loop.append(loop)
        data = _pk({**params, "x": loop})
    elif case == "deep-nesting":
        data = _deep_list_pickle(20_000)
    elif case == "persistent-id":
        data = b"\x80\x04X\x01\x00\x00\x00xQ."
    elif case == "garbage-opcodes":
        data = b"\x80\x04\xff\xfe\xfd."
    elif case == "bytes8-8GB-declared":  # the C unpickler allocates the declared size before reading
        data = b"\x80\x05\x8e" + struct.pack("<Q", 8 * 1024 * MB) + b"x."
    elif case == "bytearray8-8GB-declared":
        data = b"\x80\x05\x96" + struct.pack("<Q", 8 * 1024 * MB) + b"x."
    elif case == "memo-slot-1GB":  # the C unpickler sizes its memo to twice the index: 2**27 slots, 1 GiB
        data = b"\x80\x04}r" + struct.pack("<I", 2**26) + b"."
    elif case == "memo-slot-text":  # protocol 0's PUT, the index as text
        data = b"(dp99999999\n."
    else:
        data = b""
    path = _zip(tmp_path / "wts.h5.zip", _with(members, **_both_params(data)))
    refused(path, error, rf"^diffraction_to_obj/params\.dill[: ].*{match}")


def test_numpy_values_in_params_still_load(members, params, tmp_path):
    """Hardening kept the legitimate numpy cases working (scalars and numeric arrays, any protocol)."""
    for protocol in (3, 4, 5):
        extra = {"intensity_scale": np.float64(2.5), "x": np.arange(6, dtype=">i2").reshape(2, 3),
                 "y": np.zeros((2, 3), order="F"), "z": np.bool_(True)}
        data = pickle.dumps({**params, **extra}, protocol=protocol)
        path = _zip(tmp_path / f"p{protocol}.zip", _with(members, **_both_params(data)))
        contents = read_bundle(path)
        assert contents.params["intensity_scale"] == 2.5
        np.testing.assert_array_equal(contents.params["x"], extra["x"])
        assert contents.params["x"].dtype == np.dtype(">i2") and contents.params["y"].flags.f_contiguous


# ------------------------------------------------------------------------------------------------------------
# Not a zip / truncated / flipped bytes
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "content",
    [b"", b"\x00" * 4096, b"not a zip\n" * 100, b"\x1f\x8b\x08\x00" + bytes(200), b"\x89PNG\r\n\x1a\n" + bytes(100),
     b"PK\x05\x06" + bytes(18)],
    ids=["empty", "zeros", "text", "gzip", "png", "empty-zip-eocd-only"],
)
def test_not_a_zip(tmp_path, refused, content):
    path = tmp_path / "wts.h5.zip"
    path.write_bytes(content)
    if content.startswith(b"PK\x05\x06"):  # a valid empty zip: a zip, but not a bundle
        refused(path, CorruptBundleError, r"has no manifest\.dill: not a PtychoPINN bundle")
    else:
        refused(path, NotABundleError, r"is not a zip archive")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_fifo_is_refused_without_blocking(tmp_path, refused):
    path = tmp_path / "wts.h5.zip"
    os.mkfifo(path)
    refused(path, NotABundleError, r"not a regular file \(device, FIFO or socket\)")


def test_path_with_nul_byte(tmp_path, refused):
    refused(str(tmp_path / "wts\x00.h5.zip"), NotABundleError, r"cannot be opened: embedded null byte")


def test_directory_named_like_the_archive(tmp_path, refused):
    (tmp_path / "wts.h5.zip").mkdir()
    refused(tmp_path / "wts.h5.zip", NotABundleError, r"is a directory")


def _truncation_offsets(size: int) -> list[int]:
    return sorted({1, 2, 3, 4, 30, size - 22, size - 21, size - 1} | {size * i // 40 for i in range(40)})


def test_truncated_at_many_offsets(base_bytes, tmp_path, refused):
    """40+ cut points over the whole file; the class follows from what the stdlib zipfile makes of the bytes."""
    path = tmp_path / "wts.h5.zip"
    offsets = _truncation_offsets(len(base_bytes))
    assert len(offsets) >= 40
    for cut in offsets:
        data = base_bytes[:cut]
        path.write_bytes(data)
        try:
            zipfile.ZipFile(io.BytesIO(data)).close()
            opens = True
        except zipfile.BadZipFile:
            opens = False
        if opens:  # an embedded end-of-central-directory record was found: the members are damaged/missing
            refused(path, CorruptBundleError, r"wts\.h5\.zip|manifest")
        else:
            hint = "probably truncated" if data.startswith(b"PK\x03\x04") else "check the path"
            refused(path, NotABundleError, rf"is not a zip archive \(.*\); .*{hint}")


@pytest.mark.parametrize("member", [MANIFEST, WEIGHTS, PARAMS, AE_PARAMS, METADATA, AE_WEIGHTS])
@pytest.mark.parametrize("where", [0.1, 0.5, 0.9])
def test_flipped_compressed_bytes(base_bytes, tmp_path, refused, member, where):
    """A flipped byte in any member's data: deflated members fail their CRC (or inflation) in zipfile; stored ones
    (the torch files, read straight from the file) fail the manifest's sha256, checked beside the decoding."""
    start, size = _data_offset(base_bytes, member)
    data = bytearray(base_bytes)
    data[start + int(size * where)] ^= 0x55
    path = tmp_path / "wts.h5.zip"
    path.write_bytes(bytes(data))
    refused(path, CorruptBundleError,
            rf"member '{member}' of .* (is damaged: Bad CRC-32|cannot be decompressed)|'{member}' .*decompressed to"
            rf"|member '{member}' does not match the sha256 recorded in manifest\.dill")


#: How the stored model.pth (read straight from the file) reports the damage where its wording differs.
_STORED_OUTCOMES = {
    "size-smaller": (CorruptBundleError, r"stored member 'diffraction_to_obj/model\.pth' .* declares \d+ bytes but occupies"),
    "size-larger": (CorruptBundleError, r"stored member 'diffraction_to_obj/model\.pth' .* declares \d+ bytes but occupies"),
    "method-flipped": (CorruptBundleError, r"cannot be decompressed|is damaged"),
    "header-offset-out-of-file": (CorruptBundleError, r"declares \d+ bytes but occupies 0 .*the file is damaged"),
    # the torch file's own end record, stored in the bundle, is the last one a reader finds
    "eocd-signature": (CorruptBundleError, r"is cut short or damaged: the zip directory at its end belongs to a zip "
                                           r"stored inside one of its members"),
}


@pytest.mark.parametrize(
    "target, error, match",
    [
        ("local-signature", CorruptBundleError, r"is damaged: Bad magic number for file header"),
        ("local-name", CorruptBundleError, r"is damaged: File name in directory .* and header .* differ"),
        ("local-name-length", CorruptBundleError, r"is damaged"),
        ("central-signature", NotABundleError, r"is not a zip archive \(Bad magic number for central directory\)"),
        ("central-name", CorruptBundleError, r"lacks the member 'diffraction_to_obj/model\.pth'"),
        ("central-crc", CorruptBundleError, r"is damaged: Bad CRC-32 for file 'diffraction_to_obj/model\.pth'"),
        ("crc-both", CorruptBundleError, r"is damaged: Bad CRC-32 for file 'diffraction_to_obj/model\.pth'"),
        ("size-smaller", CorruptBundleError, r"is damaged: Bad CRC-32"),
        ("size-larger", CorruptBundleError, r"decompressed to \d+ bytes, header says \d+"),
        ("compressed-size-smaller", CorruptBundleError, r"diffraction_to_obj/model\.pth"),
        ("encrypted-flag", UnsupportedBundleError, r"is encrypted; bundles are never encrypted"),
        ("method-unknown", UnsupportedBundleError, r"unsupported zip feature: That compression method"),
        ("method-bzip2", CorruptBundleError, r"cannot be decompressed: OSError: Invalid data stream"),
        ("method-lzma", CorruptBundleError, r"cannot be decompressed|is damaged"),
        ("method-flipped", CorruptBundleError, r"is damaged"),
        ("header-offset-out-of-file", CorruptBundleError, r"is damaged: Truncated file header"),
        ("eocd-signature", NotABundleError, r"is not a zip archive"),
        ("eocd-cd-offset", CorruptBundleError, r"manifest\.dill' of .* cannot be decompressed: OSError"),
    ],
)
@pytest.mark.parametrize("layout", ["deflated", "stored"])
def test_flipped_header_fields(base_bytes, deflated_bytes, tmp_path, refused, layout, target, error, match):
    """Damaged zip fields on diffraction_to_obj/model.pth, deflated (upstream's layout, read through zipfile) and
    stored (ours, read straight from the file); where the stored path words it differently, _STORED_OUTCOMES says so."""
    base_bytes = deflated_bytes if layout == "deflated" else base_bytes
    if layout == "stored":
        error, match = _STORED_OUTCOMES.get(target, (error, match))
    data = bytearray(base_bytes)
    entries = dict((name, offset) for offset, name in _cd_entries(base_bytes))
    cd = entries[WEIGHTS]
    local = struct.unpack_from("<I", base_bytes, cd + 42)[0]
    info_crc = struct.unpack_from("<I", base_bytes, cd + 16)[0]
    usize = struct.unpack_from("<I", base_bytes, cd + 24)[0]
    eocd = base_bytes.rfind(b"PK\x05\x06")
    if target == "local-signature":
        data[local] ^= 0x01
    elif target == "local-name":
        data[local + 30 + 3] ^= 0x01
    elif target == "local-name-length":
        struct.pack_into("<H", data, local + 26, 200)
    elif target == "central-signature":
        data[cd + 1] ^= 0x01
    elif target == "central-name":
        data[cd + 46] ^= 0x01
    elif target == "central-crc":
        struct.pack_into("<I", data, cd + 16, info_crc ^ 1)
    elif target == "crc-both":
        data = bytearray(_patch(base_bytes, WEIGHTS, 16, "<I", info_crc ^ 0xFFFF))
    elif target == "size-smaller":
        data = bytearray(_patch(base_bytes, WEIGHTS, 24, "<I", usize - 1000))
    elif target == "size-larger":
        data = bytearray(_patch(base_bytes, WEIGHTS, 24, "<I", usize + 1000))
    elif target == "compressed-size-smaller":
        csize = struct.unpack_from("<I", base_bytes, cd + 20)[0]
        data = bytearray(_patch(base_bytes, WEIGHTS, 20, "<I", csize // 2))
    elif target == "encrypted-flag":
        data = bytearray(_patch(base_bytes, WEIGHTS, 8, "<H", 0x1))
    elif target == "method-unknown":
        data = bytearray(_patch(base_bytes, WEIGHTS, 10, "<H", 99))
    elif target == "method-bzip2":
        data = bytearray(_patch(base_bytes, WEIGHTS, 10, "<H", zipfile.ZIP_BZIP2))
    elif target == "method-lzma":
        data = bytearray(_patch(base_bytes, WEIGHTS, 10, "<H", zipfile.ZIP_LZMA))
    elif target == "method-flipped":
        method = zipfile.ZIP_STORED if layout == "deflated" else zipfile.ZIP_DEFLATED
        data = bytearray(_patch(base_bytes, WEIGHTS, 10, "<H", method))
    elif target == "header-offset-out-of-file":
        struct.pack_into("<I", data, cd + 42, 0x7FFFFFFF)
    elif target == "eocd-signature":
        data[eocd] ^= 0x01
    else:
        struct.pack_into("<I", data, eocd + 16, len(data) + 10)
    path = tmp_path / "wts.h5.zip"
    path.write_bytes(bytes(data))
    refused(path, error, match)


def test_flipped_bytes_sweep(base_bytes, state_dict, tmp_path):
    """40 positions over the whole file: either the same weights load or a BundleError; nothing else escapes."""
    path = tmp_path / "wts.h5.zip"
    loaded = refused_count = 0
    for i in range(40):
        data = bytearray(base_bytes)
        position = (len(data) - 1) * i // 39
        data[position] ^= 0xA5
        path.write_bytes(bytes(data))
        try:
            contents = read_bundle(path)
        except BundleError:
            refused_count += 1
            continue
        for key, tensor in state_dict.items():
            assert torch.equal(contents.state_dict[key], tensor), f"flip at {position} changed {key} silently"
        loaded += 1
    assert refused_count >= 30  # most flips hit compressed data or a header field that matters


# ------------------------------------------------------------------------------------------------------------
# Member names, duplicates, symlinks
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name",
    ["diffraction_to_obj/../manifest.dill", "..", "../", "/etc/passwd", "//server/share/x", "\\\\server\\share\\x",
     "D:evil", "c:\\windows\\evil", "diffraction_to_obj\\model.pth", "a/./b", "./", "diffraction_to_obj/.."],
)
def test_member_names_escaping_the_archive(members, tmp_path, refused, name):
    path = _zip(tmp_path / "wts.h5.zip", list(members.items()) + [(name, b"payload")])
    refused(path, UnsafeBundleError, r"is absolute or escapes the archive")
    assert not (tmp_path.parent / "evil").exists() and not (tmp_path / "x").exists()


def test_member_name_with_nul_byte_shadowing_the_manifest(members, tmp_path, refused):
    """zipfile cuts names at NUL: 'manifest.dill\\0evil' becomes a second manifest.dill - a duplicate."""
    info = zipfile.ZipInfo("manifest.dill\x00evil")
    path = _zip(tmp_path / "wts.h5.zip", list(members.items()) + [(info, _pk({"models": ["x"], "version": "0"}))])
    refused(path, UnsafeBundleError, r"holds the member 'manifest\.dill' twice")


@pytest.mark.parametrize("member", [MANIFEST, WEIGHTS, METADATA])
def test_duplicate_member_with_different_content(members, params, tmp_path, refused, member):
    second = {MANIFEST: _pk({"models": ["diffraction_to_obj"], "version": "2.0-pytorch"}),
              WEIGHTS: torch_bytes({}), METADATA: torch_bytes({"schema_version": "x"})}[member]
    path = _zip(tmp_path / "wts.h5.zip", list(members.items()) + [(member, second)])
    refused(path, UnsafeBundleError, rf"holds the member '{member}' twice")


@pytest.mark.parametrize("member", [WEIGHTS, MANIFEST, "unrelated-link"])
def test_symlink_members(members, tmp_path, refused, member):
    """A symlink entry (S_IFLNK in external_attr) is refused even where it replaces a needed member."""
    entries = [(n, d) for n, d in members.items() if n != member]
    link = zipfile.ZipInfo(member)
    link.external_attr = (stat.S_IFLNK | 0o777) << 16
    entries.append((link, b"/etc/passwd"))
    path = _zip(tmp_path / "wts.h5.zip", entries)
    refused(path, UnsafeBundleError, rf"member '{member}' is a symbolic link; refused")


def test_too_many_members(members, tmp_path, refused):
    entries = list(members.items()) + [(f"junk/{i}", b"") for i in range(100)]
    path = _zip(tmp_path / "wts.h5.zip", entries)
    refused(path, UnsafeBundleError, r"lists 106 members \(limit 64\); a bundle has 6")


# ------------------------------------------------------------------------------------------------------------
# Size caps and zip bombs
# ------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bomb_zip(members, tmp_path_factory) -> Path:
    """The bundle with diffraction_to_obj/model.pth replaced by 50 MB of zeros (deflates ~1000:1)."""
    path = tmp_path_factory.mktemp("bomb") / "wts.h5.zip"
    _zip(path, _with(members, weights=bytes(BOMB)), compression=zipfile.ZIP_DEFLATED)
    assert path.stat().st_size < 2 * MB
    return path


@pytest.mark.parametrize(
    "limits, match",
    [
        (BundleLimits(), r"compression ratio of \d+:1, over the cap of 200:1"),
        (BundleLimits(max_member_bytes=10 * MB, max_compression_ratio=1e9), r"over the per-member cap of 10485760"),
        (BundleLimits(max_total_bytes=20 * MB, max_compression_ratio=1e9), r"past the total cap of 20971520 bytes"),
        (BundleLimits(max_compression_ratio=50), r"over the cap of 50:1 \(a zip bomb\?\)"),
        (BundleLimits(max_compression_ratio=50, ratio_floor_bytes=10**12, max_member_bytes=BOMB - 1),
         r"over the per-member cap"),
    ],
    ids=["default-ratio", "member-cap", "total-cap", "ratio-cap", "ratio-exempt-member-cap"],
)
def test_zip_bomb_refused_before_inflating(bomb_zip, refused, limits, match):
    refused(bomb_zip, UnsafeBundleError, match, memory_cap=BOMB // 8, limits=limits)


def test_zip_bomb_with_lying_sizes(members, bomb_zip, tmp_path, refused):
    """Declared sizes small (passes every cap): inflation stops at the declared size, the CRC then fails."""
    data = bomb_zip.read_bytes()
    data = _patch(data, WEIGHTS, 24, "<I", 1 * MB)  # uncompressed size: 1 MB instead of 50 MB
    path = tmp_path / "wts.h5.zip"
    path.write_bytes(data)
    refused(path, CorruptBundleError, r"model\.pth' of .* is damaged: Bad CRC-32", memory_cap=BOMB // 8)


def test_zip_bomb_with_lying_compressed_size(bomb_zip, tmp_path, refused):
    """A compressed size inflated to dodge the ratio check still meets the per-member cap."""
    data = _patch(bomb_zip.read_bytes(), WEIGHTS, 20, "<I", 40 * MB)
    path = tmp_path / "wts.h5.zip"
    path.write_bytes(data)
    refused(path, UnsafeBundleError, r"over the per-member cap of 10485760", memory_cap=BOMB // 8,
            limits=BundleLimits(max_member_bytes=10 * MB))


def test_zip_bomb_in_an_unrelated_member_is_never_inflated(members, tmp_path):
    """Only named members are read: a bomb beside them costs nothing and the bundle loads."""
    path = _zip(tmp_path / "wts.h5.zip", list(members.items()) + [("extra/bomb.bin", bytes(BOMB))],
                compression=zipfile.ZIP_DEFLATED)
    tracemalloc.start()
    try:
        contents = read_bundle(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert contents.member_sizes["extra/bomb.bin"] == BOMB
    assert peak < BOMB // 4


# ------------------------------------------------------------------------------------------------------------
# Manifest and params content
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "manifest, error, match",
    [
        ("a string", CorruptBundleError, r"manifest\.dill must hold a dict .*, got str"),
        (42, CorruptBundleError, r"got int"),
        (None, CorruptBundleError, r"got NoneType"),
        (("diffraction_to_obj",), CorruptBundleError, r"got tuple"),
        ({"diffraction_to_obj"}, CorruptBundleError, r"got set"),
        ({"models": ["diffraction_to_obj", "autoencoder"], "version": 2.0}, CorruptBundleError,
         r"\['version'\] must be a str, got 2\.0"),
        ({"models": [], "version": "2.0-pytorch"}, CorruptBundleError, r"\['models'\] must be a non-empty list"),
        ({"models": [1, 2], "version": "2.0-pytorch"}, CorruptBundleError, r"\['models'\] must be a non-empty list"),
        ({"models": ["diffraction_to_obj"] * 3, "version": "2.0-pytorch"}, CorruptBundleError,
         r"must list distinct model names"),
        ({"models": ["diffraction_to_obj"] + [f"m{i}" for i in range(1000)], "version": "2.0-pytorch"},
         CorruptBundleError, r"must list distinct model names \(at most 64\), got \['diffraction_to_obj', 'm0'"),
        ({"models": ["diffraction_to_obj", "../../etc"], "version": "2.0-pytorch"}, CorruptBundleError,
         r"lacks '\.\./\.\./etc/params\.dill'"),
        ({"models": ["diffraction_to_obj"], "version": "x" * 100_000}, UnsupportedBundleError,
         r"manifest version 'x{10,200}\.\.\.x*' is not supported"),
        ({"models": ["diffraction_to_obj"], "version": "2.0-pytorch", "backend": ["pytorch"]},
         UnsupportedBundleError, r"manifest backend \['pytorch'\] is not supported"),
        ({"models": ["diffraction_to_obj"], "version": "2.0-pytorch", "sha256": {"a": 1}}, CorruptBundleError,
         r"\['sha256'\] must map member names to hex digests"),
    ],
    ids=["str", "int", "none", "tuple", "set", "version-float", "models-empty", "models-ints", "models-dupes",
         "models-1001", "models-path", "version-huge", "backend-list", "sha-values"],
)
def test_manifest_wrong_shape(members, tmp_path, refused, manifest, error, match):
    path = _zip(tmp_path / "wts.h5.zip", _with(members, manifest=_pk(manifest)))
    refused(path, error, match)


@pytest.mark.parametrize("key", ["N", "gridsize"])
def test_params_missing_architecture_key(members, params, tmp_path, refused, key):
    snapshot = {k: v for k, v in params.items() if k != key}
    path = _zip(tmp_path / "wts.h5.zip", _with(members, **_both_params(snapshot)))
    refused(path, ConfigMismatchError, rf"params\.dill lacks the required key '{key}'")


@pytest.mark.parametrize(
    "patch, error, match",
    [
        ({"N": "64"}, ConfigMismatchError, r"\['N'\] must be int, got str '64'"),
        ({"N": 64.0}, ConfigMismatchError, r"\['N'\] must be int, got float"),
        ({"N": True}, ConfigMismatchError, r"\['N'\] must be int, got bool"),
        ({"N": 96}, ConfigMismatchError, r"\['N'\] = 96 is not a supported patch size"),
        ({"gridsize": 1.0}, ConfigMismatchError, r"\['gridsize'\] must be int, got float"),
        ({"gridsize": 0}, ConfigMismatchError, r"\['gridsize'\] must be >= 1, got 0"),
        ({"gridsize": -3}, ConfigMismatchError, r"\['gridsize'\] must be >= 1"),
        ({"n_filters_scale": "2"}, ConfigMismatchError, r"\['n_filters_scale'\] must be int, got str"),
        ({"object.big": 1}, ConfigMismatchError, r"\['object\.big'\] must be bool, got int"),
        ({"amp_activation": None}, ConfigMismatchError, r"\['amp_activation'\] must be str, got NoneType"),
        ({"intensity_scale": "1e4"}, ConfigMismatchError, r"\['intensity_scale'\] must be a finite number"),
        ({"intensity_scale": float("nan")}, ConfigMismatchError, r"\['intensity_scale'\] must be a finite number"),
        ({"intensity_scale": 10**400}, ConfigMismatchError,
         r"invalid configuration value \(OverflowError: int too large to convert to float"),
    ],
    ids=["N-str", "N-float", "N-bool", "N-96", "gs-float", "gs-0", "gs-neg", "s-str", "big-int", "act-none",
         "scale-str", "scale-nan", "scale-huge-int"],
)
def test_params_wrong_types(members, params, tmp_path, refused, patch, error, match):
    path = _zip(tmp_path / "wts.h5.zip", _with(members, **_both_params({**params, **patch})))
    refused(path, error, match)


@pytest.mark.parametrize(
    "patch, error, match",
    [
        ({"n_filters_scale": 10**6}, StateDictMismatchError, r"has shape \(32, 1, 3, 3\), the configuration needs "
                                                             r"\(32000000, 1, 3, 3\)"),
        ({"n_filters_scale": 10**12}, ConfigMismatchError,
         r"invalid configuration value \(RuntimeError: Storage size calculation overflowed"),
        ({"gridsize": 300}, ConfigMismatchError, r"invalid configuration value \(RuntimeError: Trying to create tensor "
                                                 "with negative dimension"),
        ({"gridsize": 2}, StateDictMismatchError, r"has shape \(32, 1, 3, 3\), the configuration needs "
                                                  r"\(32, 4, 3, 3\)"),
        ({"C": 0}, ConfigMismatchError, r"C_model must be a positive int, got 0"),
    ],
    ids=["s-1e6", "s-1e12", "gs-300", "gs-2", "C-0"],
)
def test_params_describing_a_huge_network_allocate_nothing(members, params, tmp_path, refused, patch, error, match):
    """Without metadata the params decide the network: a hostile one is checked on the meta device first."""
    path = _zip(tmp_path / "wts.h5.zip", _with(members, remove=[METADATA], **_both_params({**params, **patch})))
    refused(path, error, match)


def test_params_copies_that_differ_only_in_numpy_values(members, params, tmp_path, refused):
    first = _pk({**params, "x": np.arange(3)})
    second = _pk({**params, "x": np.arange(4)})
    path = _zip(tmp_path / "wts.h5.zip", _with(members, params=first, ae_params=second))
    refused(path, ConfigMismatchError, r"autoencoder/params\.dill differs from diffraction_to_obj/params\.dill in "
                                       r"keys \['x'\]")


@pytest.mark.parametrize(
    "patch, error, match",
    [
        ({"intensity_scale": -5.0, "intensity_scale_trainable": True}, ConfigMismatchError,
         r"intensity_scale=-5\.0 with a trainable \(fixed\) input scale"),
        ({"intensity_scale": float("nan"), "intensity_scale_trainable": True}, ConfigMismatchError,
         r"intensity_scale=nan with a trainable"),
        ({"intensity_scale": 0.0, "intensity_scale_trainable": True}, ConfigMismatchError,
         r"intensity_scale=0\.0 with a trainable"),
        ({"decoder_last_c_outer_fraction": float("nan"), "use_legacy_decoder_channel_override": True},
         ConfigMismatchError, r"invalid configuration value \(ValueError: cannot convert float NaN to integer"),
        ({"decoder_spatial_kernel": 10**9, "spatial_decoder": True}, StateDictMismatchError,
         r"missing keys \['model\.autoencoder\.decoder_amp\.attention_blocks"),
        ({"n_filters_scale": 2**40}, ConfigMismatchError, r"params\.dill\['n_filters_scale'\]=1 disagrees"),
    ],
    ids=["scale-negative", "scale-nan", "scale-zero", "fraction-nan", "kernel-1e9", "s-2e40"],
)
def test_metadata_values_that_break_construction(members, metadata, tmp_path, refused, patch, error, match):
    meta = {**metadata, "model_config": {**metadata["model_config"], **patch}}
    path = _zip(tmp_path / "wts.h5.zip", _with(members, metadata=torch_bytes(meta)))
    refused(path, error, match)


def test_metadata_billion_laughs(members, metadata, tmp_path, refused):
    meta = {**metadata, "ci_statistics": {"rms_input_scale": _billion_laughs(40)}}
    path = _zip(tmp_path / "wts.h5.zip", _with(members, metadata=torch_bytes(meta)))
    refused(path, UnsafeBundleError, r"torch_scaling_metadata\.pt expands to more than \d+ objects")


# ------------------------------------------------------------------------------------------------------------
# state_dict tricks the key/shape diff alone would not catch
# ------------------------------------------------------------------------------------------------------------
def test_expanded_view_weights_for_a_big_network(members, params, tmp_path, refused):
    """Stride-0 tensors match any shape from a few bytes; the network they describe would need ~1 GB."""
    from mlflow_ptycho_flavor.network import NetworkConfig, PtychoPINNNetwork

    config = NetworkConfig(N=256, C_model=4, n_filters_scale=16)
    with torch.device("meta"):
        shapes = {k: (tuple(v.shape), v.dtype) for k, v in PtychoPINNNetwork(config).state_dict().items()}
    needed = sum(math.prod(shape) * torch.empty((), dtype=dtype).element_size() for shape, dtype in shapes.values())
    assert needed > 500 * MB
    fake = OrderedDict((k, torch.zeros(1, dtype=dtype).expand(*shape) if shape else torch.zeros((), dtype=dtype))
                       for k, (shape, dtype) in shapes.items())
    weights = torch_bytes(fake)
    assert len(weights) < 200_000
    snapshot = {**params, "N": 256, "gridsize": 2, "n_filters_scale": 16}
    path = _zip(tmp_path / "wts.h5.zip", _with(members, remove=[METADATA], weights=weights,
                                               **_both_params(snapshot)))
    refused(path, StateDictMismatchError, rf"needs {needed} bytes of weights but diffraction_to_obj/model\.pth "
                                          r"holds only \d+: its tensors are expanded views")


def test_sparse_tensor_in_state_dict(members, state_dict, tmp_path, refused):
    fake = OrderedDict(state_dict)
    fake["model.forward_model.alpha"] = torch.zeros(1).to_sparse()
    path = _zip(tmp_path / "wts.h5.zip", _with(members, weights=torch_bytes(fake)))
    refused(path, UnsafeBundleError, r"the global torch\._utils\._rebuild_sparse_tensor")


def test_meta_tensor_in_state_dict(members, state_dict, tmp_path, refused):
    fake = OrderedDict(state_dict)
    fake["model.forward_model.alpha"] = torch.empty(10**6, 10**6, device="meta")
    path = _zip(tmp_path / "wts.h5.zip", _with(members, weights=torch_bytes(fake)))
    refused(path, UnsafeBundleError, r"the global torch\._utils\._rebuild_meta_tensor_no_storage")


@pytest.mark.parametrize(
    "weights, match",
    [
        ([torch.zeros(1)], r"must hold a state_dict \(a dict of tensors\)"),
        ({1: torch.zeros(1)}, r"must hold a state_dict \(a dict of tensors\)"),
        ("model.pth", r"must hold a state_dict"),
        (b"PK\x03\x04" + bytes(100), r"is not a valid torch file: RuntimeError"),
        (b"\x80\x02}q\x00.", r"is not a valid torch file: not in torch's zip serialization format"),
    ],
    ids=["list", "int-keys", "str", "zip-garbage", "legacy-pickle"],
)
def test_weights_member_not_a_state_dict(members, tmp_path, refused, weights, match):
    raw = weights if isinstance(weights, bytes) else torch_bytes(weights)
    path = _zip(tmp_path / "wts.h5.zip", _with(members, weights=raw))
    refused(path, CorruptBundleError, match)


def test_torch_file_with_malformed_data_pkl(members, tmp_path, refused):
    torch_file = _replace_torch_record(torch_bytes({}), b"\x80\x02\xff garbage")
    path = _zip(tmp_path / "wts.h5.zip", _with(members, weights=torch_file))
    refused(path, CorruptBundleError, r"model\.pth holds a malformed pickle")


@pytest.mark.parametrize("member", ["weights", "metadata"])
def test_torch_pickle_asking_for_a_huge_memo(members, tmp_path, refused, member):
    """One LONG_BINPUT of 2**26 in a nine-byte data.pkl: the C unpickler would size its memo to 2**27 slots (1 GiB)
    before storing anything; the scan refuses the index first (a real one stays below the pickle's length)."""
    torch_file = _replace_torch_record(torch_bytes({}), b"\x80\x02}r" + struct.pack("<I", 2**26) + b".")
    path = _zip(tmp_path / "wts.h5.zip", _with(members, **{member: torch_file}))
    refused(path, UnsafeBundleError, r"\(data\.pkl\) stores into pickle memo slot 67108864, past anything its 9 bytes")
