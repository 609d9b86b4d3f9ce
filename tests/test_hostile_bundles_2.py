"""Hostile bundles, round 2 (GitHub issue 12 §3): bounded work and memory before any check can be skipped.

Complements ``test_hostile_bundles.py`` (which covers code execution, path tricks and plain zip bombs) with the
classes that probe found open: values a check sees less of than they hold, comparisons without a budget, caps
that trust a declared number, messages that quote an attacker's value in full, numbers cheap to store and costly
to use, NaN/inf weights, a huge central directory, reader and writer disagreeing on what fits, and a cache that
kept refused configurations.

Every refusal goes through :func:`refused`, which measures the load twice: once for CPU time (``process_time``)
and the growth of the process's peak resident memory (Linux: ``/proc/self/clear_refs`` resets the peak, so torch's
own allocations are seen too), once under ``tracemalloc`` for the peak of Python allocations. It asserts the exact
error class, the message (and its length: at most :data:`MAX_MESSAGE` characters whatever the file quotes), the
costs, and that the global config was not touched. Hazards that would hang or crash the interpreter itself
(hashing a shared or deeply nested tuple inside the unpickler) run in a subprocess with a timeout.

Bundles are derived in ``tmp_path`` from one small valid bundle (N=64, gs=1, n_filters_scale=1, 2.3 MB).
"""

from __future__ import annotations

import collections
import gc
import io
import math
import os
import pickle
import re
import struct
import subprocess
import sys
import textwrap
import time
import tracemalloc
import warnings
import zipfile
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch

from mlflow_ptycho_flavor import load_torch_bundle, read_bundle, save_torch_bundle
from mlflow_ptycho_flavor.bundle import BundleLimits
from mlflow_ptycho_flavor.bundle.params import LEGACY_DEFAULT_CFG, cfg
from mlflow_ptycho_flavor.bundle.unpickle import ALLOW_PICKLE_ENV
from mlflow_ptycho_flavor.errors import (
    BundleError,
    ConfigMismatchError,
    StateDictMismatchError,
    TensorFlowBundleError,
    UnsafeBundleError,
    UnsupportedBundleError,
)
from mlflow_ptycho_flavor.network import NetworkConfig, PtychoPINNNetwork
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

#: CPU seconds a refusal may take ("well under a second"; reading the valid 2.3 MB base bundle takes ~0.1 s).
CPU_CAP = 1.0
#: Peak Python allocation while refusing (the base bundle is 2.3 MB; every member is read into memory once).
MEMORY_CAP = 16 * MB
#: Growth of the process's peak resident memory while refusing (torch allocations included).
RSS_CAP = 64 * MB
#: Longest error message: paths and fixed text plus a few bounded quotes of ~300 characters.
MAX_MESSAGE = 1500


@pytest.fixture(autouse=True)
def _no_unsafe_opt_in(monkeypatch):
    monkeypatch.delenv(ALLOW_PICKLE_ENV, raising=False)


# ------------------------------------------------------------------------------------------------------------
# The cost oracle
# ------------------------------------------------------------------------------------------------------------
def _reset_peak_rss() -> int | None:
    """Reset the kernel's peak-RSS counter of this process and return the current peak (kB), or None where the
    platform cannot (then only tracemalloc bounds memory)."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return _peak_rss()
    except OSError:
        return None


def _peak_rss() -> int | None:
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _run(loader, *args, **kwargs):
    try:
        return loader(*args, **kwargs), None
    except BaseException as exc:  # noqa: BLE001 - the caller asserts what it was
        return None, exc


def refused(path, error, match, *, cpu=CPU_CAP, memory=MEMORY_CAP, rss=RSS_CAP, loader=None, **kwargs):
    """Load ``path`` expecting exactly ``error`` (``match`` on the message) within the CPU and memory caps."""
    loader = loader or (lambda p, **kw: load_torch_bundle(p, device="cpu", **kw))
    gc.collect()
    rss_before = _reset_peak_rss()
    cpu_before = time.process_time()
    _, exc = _run(loader, path, **kwargs)
    cpu_used = time.process_time() - cpu_before
    rss_growth = (_peak_rss() - rss_before) * 1024 if rss_before is not None else 0
    tracemalloc.start()
    try:
        _, second = _run(loader, path, **kwargs)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert exc is not None, "the hostile bundle loaded"
    assert type(exc) is error, f"expected {error.__name__}, got {type(exc).__name__}: {str(exc)[:500]}"
    assert type(second) is error
    message = str(exc)
    assert re.search(match, message), f"{match!r} not in {message[:500]!r}"
    assert len(message) <= MAX_MESSAGE, f"the message quotes {len(message)} characters"
    assert cpu_used < cpu, f"refusing took {cpu_used:.2f} s of CPU (cap {cpu} s)"
    assert peak < memory, f"peak Python allocation {peak / MB:.1f} MB (cap {memory / MB:.0f} MB)"
    assert rss_growth < rss, f"peak resident memory grew by {rss_growth / MB:.0f} MB (cap {rss / MB:.0f} MB)"
    assert cfg == LEGACY_DEFAULT_CFG, "a refused bundle changed the global config"
    return exc


# ------------------------------------------------------------------------------------------------------------
# The base bundle and minimal builders (as in test_hostile_bundles.py)
# ------------------------------------------------------------------------------------------------------------


_KEYS = {"manifest": MANIFEST, "weights": WEIGHTS, "params": PARAMS, "ae_params": AE_PARAMS, "metadata": METADATA}


def _zip(path: Path, entries, *, compression=zipfile.ZIP_STORED) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Duplicate name"
        with zipfile.ZipFile(path, "w", compression=compression) as archive:
            for name, data in entries:
                archive.writestr(name, data)
    return path


def _with(members: dict, *, remove=(), **replace) -> list:
    """Members with some replaced (keywords: see _KEYS) and the manifest's sha256 table dropped."""
    out = {k: v for k, v in members.items() if k not in {_KEYS.get(r, r) for r in remove}}
    for key, data in replace.items():
        out[_KEYS[key]] = data
    if "manifest" not in replace:
        manifest = pickle.loads(out[MANIFEST])
        manifest.pop("sha256", None)
        out[MANIFEST] = pickle.dumps(manifest, protocol=4)
    return list(out.items())


def _pk(obj, protocol=4) -> bytes:
    return pickle.dumps(obj, protocol=protocol)


def _both_params(data) -> dict:
    data = data if isinstance(data, bytes) else _pk(data)
    return {"params": data, "ae_params": data}


def _bundle(tmp_path, members, *, name="wts.h5.zip", compression=zipfile.ZIP_STORED, remove=(), **replace) -> Path:
    return _zip(tmp_path / name, _with(members, remove=remove, **replace), compression=compression)


class _OrderedDictWithState:
    """Pickles as an ``OrderedDict`` holding ``items`` whose instance ``__dict__`` is then set to ``state`` (the
    ``BUILD`` opcode), e.g. ``{'items': frozenset}``: ``od.items()`` then answers ``frozenset()``."""

    def __init__(self, items: dict, state: dict):
        self.contents, self.state = items, state

    def __reduce__(self):
        return (collections.OrderedDict, (), self.state, None, iter(self.contents.items()))


def _billion_laughs(levels: int, leaf=("lol",), pair=list):
    value = list(leaf) if pair is list else tuple(leaf)
    for _ in range(levels):
        value = pair((value, value))
    return value


def _rezip(torch_file: bytes, compression: int) -> bytes:
    """The zip ``torch_file`` with every record rewritten with ``compression`` (torch's reader inflates them)."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(torch_file)) as zin, zipfile.ZipFile(out, "w", compression) as zout:
        for info in zin.infolist():
            zout.writestr(info.filename, zin.read(info.filename))
    return out.getvalue()


def _replace_data_pkl(torch_file: bytes, data_pkl: bytes) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(torch_file)) as zin, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as zout:
        for name in zin.namelist():
            zout.writestr(name, data_pkl if name.endswith("/data.pkl") else zin.read(name))
    return out.getvalue()


@pytest.mark.parametrize(
    "storage, count",
    [("FloatStorage", b"J\xff\xff\xff\x7f"), ("LongStorage", b"\x8a\x06\x00\x00\x00\x00\x00\x01")],
    ids=["float-8GiB", "long-2TiB"],
)
@pytest.mark.parametrize("member", ["weights", "metadata"])
def test_torch_pickle_calling_a_storage_class_is_refused(members, tmp_path, storage, count, member):
    """``torch.FloatStorage`` is on the allow-list as the dtype marker of persistent ids; called, it allocates
    whatever count a few bytes name (2**31 floats: 8 GiB). Refused where the call would happen, nothing allocated."""
    data_pkl = b"\x80\x02ctorch\n" + storage.encode() + b"\nq\x00(" + count + b"tq\x01Rq\x02."
    path = _bundle(tmp_path, members, **{member: _replace_data_pkl(torch_bytes({}), data_pkl)})
    refused(path, UnsafeBundleError, rf"calls torch\.{storage} to build a storage of a size the pickle chooses")


@pytest.mark.parametrize("member", ["weights", "metadata"])
def test_torch_pickle_applying_state_to_a_storage_class_is_refused(members, tmp_path, member):
    """``BUILD`` on the storage class's marker (``torch.FloatStorage.__setstate__({...})``) would be the one way to
    alter the marker every unpickler shares; it is refused as what torch.save never writes, and the shared marker is
    unchanged afterwards."""
    from mlflow_ptycho_flavor.bundle.unpickle import STORAGE_MARKERS

    data_pkl = b"\x80\x02ctorch\nFloatStorage\nq\x00}q\x01X\x05\x00\x00\x00dtypeq\x02K\x01sb."
    path = _bundle(tmp_path, members, **{member: _replace_data_pkl(torch_bytes({}), data_pkl)})
    refused(path, UnsafeBundleError, r"applies state \(BUILD\) to torch\.FloatStorage, which torch\.save never does")
    assert STORAGE_MARKERS["FloatStorage"].dtype is torch.float32


def _with_extra_directory_entries(data: bytes, extra: int, *, declared: int | None = None, prefix: str = "junk/"):
    """``data`` (a zip) with ``extra`` more central-directory entries (named ``<prefix><i>``, pointing at the first
    local header) and a new end record, zip64 when the count needs it; ``declared`` overrides the entry count the
    end record states (the directory size stays true)."""
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        start, count = archive.start_dir, len(archive.infolist())
    end = start
    for _ in range(count):  # the existing entries (a zip64 end record may follow them: not copied)
        name_len, extra_len, comment_len = struct.unpack_from("<HHH", data, end + 28)
        end += 46 + name_len + extra_len + comment_len
    entries = [data[start:end]]
    for i in range(extra):
        name = f"{prefix}{i}".encode()
        entries.append(struct.pack("<4s6H3L5HLL", b"PK\x01\x02", 20, 20, 0, 0, 0, 0x21, 0, 0, 0, len(name), 0, 0,
                                   0, 0, 0, 0) + name)
    directory = b"".join(entries)
    total = declared if declared is not None else count + extra
    if total > 0xFFFF:
        zip64_at = start + len(directory)
        tail = struct.pack("<4sQ2H2L4Q", b"PK\x06\x06", 44, 45, 45, 0, 0, total, total, len(directory), start)
        tail += struct.pack("<4sLQL", b"PK\x06\x07", 0, zip64_at, 1)
        tail += struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, 0xFFFF, 0xFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0)
    else:
        tail = struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, total, total, len(directory), start, 0)
    return data[:start] + directory + tail


def _patch_both_headers(data: bytes, member: str, field: int, fmt: str, value) -> bytes:
    """Patch a central-directory field (offset ``field`` in the entry) of ``member`` and its local copy."""
    out = bytearray(data)
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        offset = archive.start_dir
        for info in archive.infolist():
            name_len, extra_len, comment_len = struct.unpack_from("<HHH", data, offset + 28)
            if info.filename == member:
                struct.pack_into(fmt, out, offset + field, value)
                struct.pack_into(fmt, out, info.header_offset + field - 2, value)  # no 'version made by' locally
                return bytes(out)
            offset += 46 + name_len + extra_len + comment_len
    raise KeyError(member)


# ------------------------------------------------------------------------------------------------------------
# 1. Structure checks that a pickle can make see less than it holds; comparisons without a budget
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shadowed", ["items", "keys"])
def test_ordered_dict_whose_instance_state_hides_its_contents(params, members, tmp_path, shadowed):
    """``BUILD`` puts ``items = frozenset`` into an OrderedDict's ``__dict__``: ``od.items()`` answered nothing, so
    the walk never saw the billion-laughs value inside. ``keys = frozenset`` made ``cfg.update(snapshot)`` (CONFIG-001)
    copy nothing, so a bundle "loaded" with the global config left at upstream's defaults (N=128, not 64)."""
    contents = {**params, "x": _billion_laughs(40)} if shadowed == "items" else dict(params)
    path = _bundle(tmp_path, members, **_both_params(_OrderedDictWithState(contents, {shadowed: frozenset})))
    refused(path, UnsafeBundleError, rf"params\.dill holds an OrderedDict carrying the instance attributes "
                                     rf"\['{shadowed}'\], which plain data never has")


def test_metadata_section_whose_instance_state_hides_its_values(metadata, members, tmp_path):
    """torch's weights-only unpickler lets BUILD fill an OrderedDict's ``__dict__`` too: ``keys = set`` made
    ``dict(section)`` see an empty model_config, i.e. every knob at its default."""
    hidden = _OrderedDictWithState(dict(metadata["model_config"]), {"keys": set})
    path = _bundle(tmp_path, members, metadata=torch_bytes({**metadata, "model_config": hidden}))
    refused(path, UnsafeBundleError, r"torch_scaling_metadata\.pt holds an OrderedDict carrying the instance "
                                     r"attributes \['keys'\]")


def test_state_dict_whose_instance_state_hides_its_tensors(state_dict, members, tmp_path):
    """An ``items`` attribute on the state_dict would make the dense/finite checks see no tensor at all."""
    poisoned = OrderedDict(state_dict)
    poisoned["model.forward_model.alpha"] = torch.full_like(state_dict["model.forward_model.alpha"], float("nan"))
    hidden = _OrderedDictWithState(poisoned, {"items": set})
    path = _bundle(tmp_path, members, weights=torch_bytes(hidden))
    refused(path, UnsafeBundleError, r"model\.pth sets the Python attributes \['items'\] on its state_dict")


def test_slice_holding_a_billion_laughs(params, members, tmp_path):
    """``slice`` is an allowed constructor and holds three arbitrary objects the walk never looked into."""
    path = _bundle(tmp_path, members, **_both_params({**params, "x": slice(_billion_laughs(40), None, None)}))
    refused(path, UnsafeBundleError, r"params\.dill expands to more than \d+ objects")


def _append_dict_item(pickled_dict: bytes, key_ops: bytes) -> bytes:
    """A protocol-2 pickle of a dict with one more item whose key is built by the raw opcodes ``key_ops``."""
    assert pickled_dict.endswith(b".")
    return pickled_dict[:-1] + key_ops + b"K\x01s."  # BININT1 1, SETITEM, STOP


_CONSTRUCTION_HAZARDS = {
    # a tuple key shared 2**40 times: the unpickler hashes it without memoisation (hours)
    "laughs-tuple-key": lambda: pickle.dumps(_billion_laughs(40, pair=tuple), protocol=2)[2:-1],
    # a tuple key nested 200000 deep: hashing it recurses in C until the interpreter segfaults
    "deep-tuple-key": lambda: b"N" + b"\x85" * 200_000,
}


@pytest.mark.parametrize("member", ["params", "metadata"])
@pytest.mark.parametrize("hazard", sorted(_CONSTRUCTION_HAZARDS))
def test_keys_whose_hashing_never_finishes_or_crashes(params, metadata, members, tmp_path, hazard, member):
    """Refused before any unpickler builds anything (before: a hang for hours, or a segfault)."""
    key_ops = _CONSTRUCTION_HAZARDS[hazard]()
    if member == "params":
        data = _append_dict_item(_pk(params, protocol=2), key_ops)
        path = _bundle(tmp_path, members, **_both_params(data))
    else:
        original = torch_bytes(metadata)
        with zipfile.ZipFile(io.BytesIO(original)) as archive:
            data_pkl = archive.read(next(n for n in archive.namelist() if n.endswith("/data.pkl")))
        path = _bundle(tmp_path, members, metadata=_replace_data_pkl(original, _append_dict_item(data_pkl, key_ops)))
    script = textwrap.dedent(
        """
        import sys, time
        from mlflow_ptycho_flavor import read_bundle
        from mlflow_ptycho_flavor.errors import BundleError
        start = time.process_time()
        try:
            read_bundle(sys.argv[1])
        except BundleError as exc:
            print(type(exc).__name__, round(time.process_time() - start, 3), str(exc)[:300])
        else:
            print("LOADED")
        """
    )
    try:
        result = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True, text=True,
                                timeout=60, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    except subprocess.TimeoutExpired:
        pytest.fail(f"{hazard}: the load still ran after 60 s")
    assert result.returncode == 0, f"the interpreter died (rc {result.returncode}): {result.stderr[-500:]}"
    kind, seconds, message = result.stdout.strip().split(" ", 2)
    assert kind == "UnsafeBundleError", result.stdout
    assert float(seconds) < CPU_CAP
    expected = "nests tuples more than 64 levels deep" if hazard == "deep-tuple-key" else (
        "uses dict keys or set elements that expand to more than")
    assert expected in message and "refused before unpickling" in message


def test_params_copies_with_a_large_array_shared_many_times(params, members, tmp_path):
    """Two copies that differ in key order are compared; 200 000 references to one 256 KB array made that
    200 000 array comparisons (50 GB of reads) although the walk counted each reference as one node."""
    shared = np.zeros(32_768)
    first = _pk({**params, "x": [shared] * 200_000})
    second = _pk({"x": [shared] * 200_000, **params})
    assert first != second and len(first) < 2 * MB
    path = _bundle(tmp_path, members, params=first, ae_params=second)
    refused(path, UnsafeBundleError, r"params\.dill expands to more than \d+ objects", memory=64 * MB)


def test_unchecked_params_copies_are_compared_within_a_budget(params, members, tmp_path):
    """With allow_unsafe the decoded values are not walked, so the comparison alone must stay bounded: two
    distinct billion-laughs values of 2**24 leaves took the recursive comparison many seconds."""
    first = _pk({**params, "x": _billion_laughs(24)})
    second = _pk({"x": _billion_laughs(24), **params})
    path = _bundle(tmp_path, members, params=first, ae_params=second)
    refused(path, UnsafeBundleError, r"comparing autoencoder/params\.dill with diffraction_to_obj/params\.dill "
                                     r"would visit more than \d+ objects", allow_unsafe=True)


def test_plain_equal_and_differences_take_a_budget():
    from mlflow_ptycho_flavor.bundle.budget import plain_differences, plain_equal

    laughs_a, laughs_b = _billion_laughs(30), _billion_laughs(30)
    with pytest.raises(UnsafeBundleError, match=r"would visit more than 1000 objects"):
        plain_equal(laughs_a, laughs_b, budget=1000)
    with pytest.raises(UnsafeBundleError, match=r"comparing the copies would visit more than 1000 objects"):
        plain_differences({"x": laughs_a}, {"x": laughs_b}, budget=1000, what="the copies")
    small_a = {"a": [1, 2.0, (3, "x")], "b": np.arange(4), "c": {1, 2}, "d": slice(1, 2)}
    small_b = {"a": [1, 2.0, (3, "x")], "b": np.arange(4), "c": {1, 2}, "d": slice(1, 2)}
    assert plain_equal(small_a, small_b, budget=1000)
    assert plain_differences(small_a, {**small_b, "b": np.arange(5), "e": 1}, budget=1000, what="x") == ["b", "e"]
    assert plain_equal(1, 1.0, budget=10) and not plain_equal(1, "1", budget=10)
    assert not plain_equal([1, 2], [1, 3], budget=100) and not plain_equal({"a": 1}, {"b": 1}, budget=100)


# ------------------------------------------------------------------------------------------------------------
# 2. Size limits that trusted a declared number
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("member", ["params", "metadata", "weights"])
def test_lying_compressed_size_does_not_dodge_the_ratio_cap(members, tmp_path, member):
    """50 MB of zeros deflate to 50 KB; a compressed size of 40 MB declared in both headers made the ratio look
    like 1.25:1, and the member was inflated in full."""
    replace = _both_params(bytes(BOMB)) if member == "params" else {member: bytes(BOMB)}
    path = _bundle(tmp_path, members, compression=zipfile.ZIP_DEFLATED, **replace)
    name = _KEYS[member]
    data = _patch_both_headers(path.read_bytes(), name, 20, "<I", 40 * MB)
    path.write_bytes(data)
    refused(path, UnsafeBundleError, rf"member '{name}' has a compression ratio of \d+:1, over the cap of 200:1",
            memory=8 * MB, rss=32 * MB)


@pytest.fixture(scope="module")
def deflated_tensor_file() -> bytes:
    """A torch file holding a 100 MB tensor of zeros, its records deflated (~100 KB)."""
    data = _rezip(torch_bytes(OrderedDict({"model.forward_model.alpha": torch.zeros(25_000_000)})),
                  zipfile.ZIP_DEFLATED)
    assert len(data) < 1 * MB
    return data


def test_records_deflated_inside_model_pth(members, deflated_tensor_file, tmp_path):
    """torch's reader inflates deflated records: a 100 KB model.pth made torch allocate 100 MB before the key
    check ran. The nested zip's real record sizes are checked before torch.load."""
    path = _bundle(tmp_path, members, weights=deflated_tensor_file)
    refused(path, UnsafeBundleError, r"model\.pth's records expand to 100\d{6} bytes, more than the \d+ it can "
                                     r"genuinely need")


def test_records_deflated_inside_the_metadata(members, metadata, tmp_path):
    """The same inside torch_scaling_metadata.pt, where a tensor in ci_statistics loaded without complaint."""
    data = _rezip(torch_bytes({**metadata, "ci_statistics": {"probe": torch.zeros(25_000_000)}}),
                  zipfile.ZIP_DEFLATED)
    path = _bundle(tmp_path, members, metadata=data)
    refused(path, UnsafeBundleError, r"torch_scaling_metadata\.pt's records expand to 100\d{6} bytes")


def test_torch_file_with_a_huge_directory(members, tmp_path):
    """70 000 extra records (zip64 end record) in model.pth: torch's reader parsed them all and loaded."""
    data = _with_extra_directory_entries(members[WEIGHTS], 70_000, prefix="archive/junk/")
    path = _bundle(tmp_path, members, weights=data)
    refused(path, UnsafeBundleError, r"model\.pth lists 70\d{3} members \(limit 4096\); a torch file has one per "
                                     r"tensor", memory=32 * MB)


# ------------------------------------------------------------------------------------------------------------
# 3. A huge central directory is refused before zipfile parses it
# ------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def huge_directory(base) -> Path:
    """The base bundle plus 300 000 directory entries (15 MB): zipfile took seconds and ~150 MB to parse them."""
    path = base.parent / "huge-directory.zip"
    path.write_bytes(_with_extra_directory_entries(base.read_bytes(), 300_000))
    return path


def test_huge_central_directory_refused_before_parsing(huge_directory):
    # (the count was checked before too, but only after zipfile had parsed every entry: the costs are the test)
    refused(huge_directory, UnsafeBundleError, r"lists 300006 members \(limit 64\); a bundle has 6", cpu=0.2,
            memory=2 * MB)


def test_huge_central_directory_behind_a_small_count(base, tmp_path):
    """The end record claims 6 entries; zipfile reads entries until the declared directory *size* is consumed."""
    path = tmp_path / "wts.h5.zip"
    path.write_bytes(_with_extra_directory_entries(base.read_bytes(), 300_000, declared=6))
    refused(path, UnsafeBundleError, r"has a central directory of \d+ bytes, more than 64 entries can need",
            cpu=0.2, memory=2 * MB)


# ------------------------------------------------------------------------------------------------------------
# 4. Error messages quote attacker values in bounded form
# ------------------------------------------------------------------------------------------------------------


_HUGE = 100_000


def _message_case(case, params, metadata):
    """(members to replace, error, match) for one message case."""
    long_text = "A" * _HUGE
    if case == "params-N-str":
        return _both_params({**params, "N": long_text}), ConfigMismatchError, r"\['N'\] must be int, got str 'AAA"
    if case == "params-activation-list":
        distinct = ["A" * 200 + str(i) for i in range(1000)]  # distinct: a shared string would count 1000 times
        return (_both_params({**params, "amp_activation": distinct}), ConfigMismatchError,
                r"\['amp_activation'\] must be str, got list \['AAA")
    if case == "params-vs-metadata":
        return (_both_params({**params, "amp_activation": long_text}), ConfigMismatchError,
                r"params\.dill\['amp_activation'\]='AAA.*disagrees with torch_scaling_metadata\.pt")
    if case == "metadata-schema":
        return ({"metadata": torch_bytes({**metadata, "schema_version": long_text})}, UnsupportedBundleError,
                r"has schema_version='AAA")
    if case == "metadata-unknown-keys":
        knobs = {f"knob_{i}_" + "x" * 100: 1 for i in range(5000)}
        return ({"metadata": torch_bytes({**metadata, "model_config": {**metadata["model_config"], **knobs}})},
                UnsupportedBundleError, r"model_config has unknown key\(s\) \['knob_0_x")
    if case == "manifest-version":
        manifest = {"models": ["diffraction_to_obj"], "version": long_text}
        return {"manifest": _pk(manifest)}, TensorFlowBundleError, r"manifest version 'AAA"
    if case == "numpy-dtype":
        dtype = Reduce(np.dtype, (long_text,))
        return (_both_params({**params, "x": numpy_array_state((1,), dtype, b"")}), UnsafeBundleError,
                r"numpy dtype 'AAA")
    if case == "numpy-shape":
        from numpy._core.multiarray import _reconstruct

        return (_both_params({**params, "x": Reduce(_reconstruct, (np.ndarray, (7,) * _HUGE, b"b"))}),
                UnsafeBundleError, r"numpy _reconstruct\(numpy\.ndarray, \(7, 7")
    if case == "persistent-id":
        pid = b"X" + struct.pack("<I", _HUGE) + long_text.encode()
        return _both_params(b"\x80\x04" + pid + b"Q."), UnsafeBundleError, r"uses persistent ids \('AAA"
    raise ValueError(case)


_MESSAGE_CASES = ["params-N-str", "params-activation-list", "params-vs-metadata", "metadata-schema",
                  "metadata-unknown-keys", "manifest-version", "numpy-dtype", "numpy-shape", "persistent-id"]


@pytest.mark.parametrize("case", _MESSAGE_CASES)
def test_messages_quote_attacker_values_in_bounded_form(members, params, metadata, tmp_path, case):
    """Each value is 100 000+ characters long; before, the message quoted it whole."""
    replace, error, match = _message_case(case, params, metadata)
    entries = _with(members, **replace)
    if case == "manifest-version":  # a model.keras member makes it a TensorFlow archive
        entries.append(("diffraction_to_obj/model.keras", b"keras"))
    path = _zip(tmp_path / "wts.h5.zip", entries)
    refused(path, error, match, memory=48 * MB)


def test_duplicate_member_with_a_long_name(members, tmp_path):
    name = "d/" + "x" * 20_000  # two of them fit the directory-size cap (64 KiB for 64 members)
    path = _zip(tmp_path / "wts.h5.zip", list(members.items()) + [(name, b"1"), (name, b"2")])
    refused(path, UnsafeBundleError, r"holds the member 'd/x+\.\.\.x+' twice")


def test_save_messages_quote_the_callers_values_in_bounded_form(tmp_path):
    network = PtychoPINNNetwork(NetworkConfig(N=64, n_filters_scale=1))
    with pytest.raises(ConfigMismatchError, match=r"config\['N'\]='xxx") as info:
        save_torch_bundle(network, tmp_path / "wts.h5.zip", config={"N": "x" * _HUGE})
    assert len(str(info.value)) <= MAX_MESSAGE and not list(tmp_path.iterdir())


# ------------------------------------------------------------------------------------------------------------
# 5. Numbers cheap to store and expensive to use
# ------------------------------------------------------------------------------------------------------------
def _huge_int(nbytes: int) -> int:
    return int.from_bytes(np.random.default_rng(0).bytes(nbytes), "little") | (1 << (8 * nbytes - 1))


@pytest.mark.parametrize("with_metadata", [True, False], ids=["metadata", "params-only"])
def test_two_megabyte_gridsize(params, members, tmp_path, with_metadata):
    """``gridsize ** 2`` (metadata cross-check) or ``gridsize * gridsize`` (params-only) of a 2 MB int took ~4 s."""
    data = _pk({**params, "gridsize": _huge_int(2 * MB)})
    remove = () if with_metadata else (METADATA,)
    path = _bundle(tmp_path, members, remove=remove, **_both_params(data))
    refused(path, ConfigMismatchError, r"params\.dill\['gridsize'\] is an int of 16777216 bits; config values fit "
                                       r"in 64 bits", memory=48 * MB)


def test_huge_int_in_an_unused_metadata_knob(metadata, members, tmp_path):
    """decoder_spatial_kernel is unused without spatial_decoder: a 2032-bit int there (about the largest torch's
    weights-only unpickler decodes: LONG1) loaded, and its configuration was cached."""
    meta = {**metadata, "model_config": {**metadata["model_config"], "decoder_spatial_kernel": _huge_int(254)}}
    path = _bundle(tmp_path, members, metadata=torch_bytes(meta))
    refused(path, ConfigMismatchError, r"model_config\['decoder_spatial_kernel'\] is an int of 2032 bits; config "
                                       r"values fit in 64 bits")


@pytest.mark.parametrize("scale, becomes", [(1e300, "inf"), (1e-300, "0.0"), (3.5e38, "inf")])
def test_trainable_intensity_scale_that_overflows_float32(metadata, members, tmp_path, scale, becomes):
    """The network multiplies its input by exp(float32(ln scale)): finite in float64, inf or 0 in float32."""
    assert math.isfinite(math.log(scale))
    meta = {**metadata, "model_config": {**metadata["model_config"], "intensity_scale_trainable": True,
                                         "intensity_scale": scale}}
    path = _bundle(tmp_path, members, metadata=torch_bytes(meta))
    refused(path, ConfigMismatchError, rf"intensity_scale={re.escape(repr(scale))} with a trainable \(fixed\) input "
                                       rf"scale becomes {becomes} in float32")


def test_trainable_intensity_scale_that_overflows_float32_in_legacy_scaling(params, members, tmp_path):
    snapshot = {**params, "intensity_scale": 1e300, "intensity_scale.trainable": True}
    path = _bundle(tmp_path, members, remove=(METADATA,), **_both_params(snapshot))
    refused(path, ConfigMismatchError, r"intensity_scale=1e\+300 with a trainable \(fixed\) input scale becomes inf",
            legacy_scaling=True)


def test_saving_a_network_whose_input_scale_overflows_float32_is_refused(tmp_path):
    """What the loader refuses is not written either (a model that can be saved can be loaded)."""
    network = PtychoPINNNetwork(NetworkConfig(N=64, n_filters_scale=1, intensity_scale_trainable=True,
                                              intensity_scale=1e300))
    with pytest.raises(ConfigMismatchError, match=r"becomes inf in float32"):
        save_torch_bundle(network, tmp_path / "wts.h5.zip")
    assert not list(tmp_path.iterdir())


# ------------------------------------------------------------------------------------------------------------
# 6. NaN/inf weights
# ------------------------------------------------------------------------------------------------------------
def _poisoned_network(value: float) -> PtychoPINNNetwork:
    from conftest import make_perturbed_network

    network = make_perturbed_network(seed=5, N=64, n_filters_scale=1)
    with torch.no_grad():
        network.state_dict()["model.autoencoder.encoder.blocks.0.conv1.weight"].view(-1)[:3] = value
    return network


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])
def test_nonfinite_weights_refused_at_save_and_load(tmp_path, value):
    network = _poisoned_network(value)
    target = tmp_path / "out" / "wts.h5.zip"
    with pytest.raises(BundleError, match=r"the network being saved: 'model\.autoencoder\.encoder\.blocks\.0\.conv1\."
                                          r"weight' holds 3 NaN or infinite value\(s\) of") as info:
        save_torch_bundle(network, target)
    from mlflow_ptycho_flavor.errors import NonFiniteWeightsError

    assert type(info.value) is NonFiniteWeightsError and isinstance(info.value, ValueError)
    assert not target.parent.exists() or not list(target.parent.iterdir())
    save_torch_bundle(network, target, allow_nonfinite=True)  # forensics: written on request
    for loader in (read_bundle, lambda p, **kw: load_torch_bundle(p, device="cpu", **kw)):
        refused(target, NonFiniteWeightsError, r"model\.pth: '.*' holds 3 NaN or infinite value\(s\) of \d+ .*"
                                               r"allow_nonfinite=True", loader=loader, memory=32 * MB)
    model, _ = load_torch_bundle(target, device="cpu", allow_nonfinite=True)
    loaded = model.state_dict()["model.autoencoder.encoder.blocks.0.conv1.weight"].view(-1)[:3]
    assert torch.equal(loaded, torch.full((3,), value)) if not math.isnan(value) else bool(loaded.isnan().all())


def test_large_finite_weights_whose_sum_overflows_are_genuine(tmp_path):
    """The fast path (a finite sum proves every value finite) falls back to an exact count, never to refusal."""
    network = PtychoPINNNetwork(NetworkConfig(N=64, n_filters_scale=1))
    with torch.no_grad():
        network.state_dict()["model.autoencoder.encoder.blocks.0.conv1.weight"].fill_(3e38)
    path = save_torch_bundle(network, tmp_path / "wts.h5.zip")
    assert not math.isfinite(float(network.state_dict()["model.autoencoder.encoder.blocks.0.conv1.weight"].sum()))
    loaded = read_bundle(path).state_dict["model.autoencoder.encoder.blocks.0.conv1.weight"]
    assert torch.equal(loaded, network.state_dict()["model.autoencoder.encoder.blocks.0.conv1.weight"])


def test_flavor_save_model_refuses_nonfinite_weights(tmp_path):
    from mlflow.exceptions import MlflowException

    from mlflow_ptycho_flavor.flavor import save_model

    network = _poisoned_network(float("nan"))
    with pytest.raises((BundleError, MlflowException), match=r"NaN or infinite value"):
        save_model(network, tmp_path / "model")
    assert not (tmp_path / "model").exists()
    bundle = save_torch_bundle(network, tmp_path / "nan" / "wts.h5.zip", allow_nonfinite=True)
    with pytest.raises(MlflowException, match=r"NaN or infinite value"):
        save_model(str(bundle), tmp_path / "model-from-path")  # logging a bundle path reads it with the defaults
    assert not (tmp_path / "model-from-path").exists()


# ------------------------------------------------------------------------------------------------------------
# 7. read_bundle, save_torch_bundle and the loaders agree on what fits
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("config", [dict(N=64, C_model=4, n_filters_scale=2), dict(N=128, n_filters_scale=2)],
                         ids=["N64-gs2", "N128"])
def test_zero_initialised_network_saves_and_loads(tmp_path, config):
    """All-zero weights deflate 300-750:1; the ratio cap took them for a zip bomb. model.pth may now inflate to
    what the configured network's weights need, and no further."""
    network = PtychoPINNNetwork(NetworkConfig(**config)).eval()
    with torch.no_grad():
        for tensor in network.state_dict().values():
            tensor.zero_()
    stored = save_torch_bundle(network, tmp_path / "wts.h5.zip")
    # ours stores the weights; upstream deflates every member, which is where the ratio cap bites
    deflated = tmp_path / "deflated" / "wts.h5.zip"
    deflated.parent.mkdir()
    with zipfile.ZipFile(stored) as source, zipfile.ZipFile(deflated, "w", zipfile.ZIP_DEFLATED) as target:
        for name in source.namelist():
            target.writestr(name, source.read(name))
    with zipfile.ZipFile(deflated) as archive:
        info = archive.getinfo(WEIGHTS)
    assert info.file_size / info.compress_size > 200  # over the default ratio cap, as the test intends
    x = torch.rand(2, network.config.channels, config["N"], config["N"])
    scale = torch.ones(2, 1, 1, 1)
    for path in (stored, deflated):
        loaded, _ = load_torch_bundle(path, device="cpu")
        with torch.no_grad():
            assert torch.equal(loaded(x, scale), network(x, scale))  # same process: bitwise


def test_save_refuses_what_the_reader_would_refuse(tmp_path):
    from conftest import make_perturbed_network

    network = make_perturbed_network(seed=1, N=64, n_filters_scale=1)
    limits = BundleLimits(max_member_bytes=1 * MB)
    with pytest.raises(UnsafeBundleError, match=r"would be refused by read_bundle with these limits \(member "
                                                r"'diffraction_to_obj/model\.pth' expands to \d+ bytes, over the "
                                                r"per-member cap of 1048576.*nothing was written"):
        save_torch_bundle(network, tmp_path / "wts.h5.zip", limits=limits)
    assert not list(tmp_path.iterdir())
    path = save_torch_bundle(network, tmp_path / "wts.h5.zip", limits=BundleLimits(max_member_bytes=4 * MB))
    assert read_bundle(path, limits=BundleLimits(max_member_bytes=4 * MB)).network_config.n_filters_scale == 1


# ------------------------------------------------------------------------------------------------------------
# 8. No cache keeps memory for refused bundles
# ------------------------------------------------------------------------------------------------------------
def _retained_after(load_many) -> int:
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        load_many()
        gc.collect()
        return tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()


def test_refused_configurations_are_not_cached(params, members, tmp_path):
    """16 bundles whose params describe 16 different (too wide) networks: each is refused, and none of their
    layouts stays in memory (the lru_cache kept up to 32 of them, ~50 KB each)."""
    path = tmp_path / "wts.h5.zip"

    def write(scale: int) -> None:
        _bundle(tmp_path, members, remove=(METADATA,), **_both_params({**params, "n_filters_scale": scale}))

    def refuse_all() -> None:
        for scale in range(1001, 1017):
            write(scale)
            with pytest.raises(StateDictMismatchError, match=r"the configuration needs"):
                read_bundle(path)

    write(1000)
    with pytest.raises(StateDictMismatchError):
        read_bundle(path)  # warm-up: first-time allocations are not what is measured
    assert _retained_after(refuse_all) < 384 * 1024


def test_absurd_configurations_are_never_cached(metadata, members, tmp_path):
    """12 bundles, each with a distinct 2032-bit int in an unused knob: before, each loaded and its configuration
    and layout (~50 KB) stayed in the layout cache; now each is refused before a layout is built."""
    path = tmp_path / "wts.h5.zip"

    def refuse_all() -> None:
        for i in range(12):
            model_config = {**metadata["model_config"], "decoder_spatial_kernel": _huge_int(254) + i}
            _bundle(tmp_path, members, metadata=torch_bytes({**metadata, "model_config": model_config}))
            with pytest.raises(ConfigMismatchError, match=r"is an int of 2032 bits"):
                read_bundle(path)

    assert _retained_after(refuse_all) < 256 * 1024


def test_base_bundle_still_loads_within_the_caps(base):
    """The oracle is not vacuous: the valid bundle loads, cheaply, under the same measurement."""
    gc.collect()
    cpu_before = time.process_time()
    network, snapshot = load_torch_bundle(base, device="cpu")
    assert time.process_time() - cpu_before < CPU_CAP
    assert snapshot["N"] == 64 and network.config.n_filters_scale == 1
    assert isinstance(network, PtychoPINNNetwork)
