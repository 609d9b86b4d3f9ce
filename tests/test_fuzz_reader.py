"""Property-based fuzzing of the bundle reader (GitHub issue 7, part 2).

Property: whatever bytes a ``wts.h5.zip`` holds, :func:`read_bundle` / :func:`load_torch_bundle` either load it or
raise one of the package's own errors (:class:`PtychoFlavorError` subclasses). Nothing else may escape: no raw
``RuntimeError`` from ``torch.load``, ``struct.error``/``zlib.error`` from ``zipfile``, ``KeyError``,
``OverflowError`` or ``RecursionError`` from validation of odd values.

Mutations start from one small valid bundle (N=64, gs=1, n_filters_scale=1):

* whole-file: byte flips, insertions, deletions and truncations, positions biased towards the zip headers;
* structured: the archive re-zipped with one member's bytes mutated (manifest hashes dropped so the mutation
  reaches the decoder);
* pickles: mutated bytes of ``manifest.dill`` / ``params.dill`` (flips, splices, opcode insertions);
* values: arbitrary plain-data values (nested dicts/lists/tuples of odd numbers and strings) put into the manifest,
  the params snapshot and the torch metadata.

CI runs a modest, derandomized number of examples (well under 40 s). A longer run::

    PTYCHO_FUZZ_EXAMPLES=5000 python -m pytest tests/test_fuzz_reader.py -q -p no:cacheprovider

(``PTYCHO_FUZZ_RANDOM=1`` additionally draws fresh random examples instead of the fixed derandomized sequence.)
"""

from __future__ import annotations

import io
import math
import os
import pickle
import struct
import zipfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir

from mlflow_ptycho_flavor import load_torch_bundle, read_bundle, save_torch_bundle
from mlflow_ptycho_flavor.errors import PtychoFlavorError
from mlflow_ptycho_flavor.bundle.unpickle import ALLOW_PICKLE_ENV

_LONG_RUN = int(os.environ.get("PTYCHO_FUZZ_EXAMPLES", "0") or 0)
_RANDOM = os.environ.get("PTYCHO_FUZZ_RANDOM", "").strip().lower() in ("1", "true", "yes")

MANIFEST = "manifest.dill"
WEIGHTS = "diffraction_to_obj/model.pth"
PARAMS = "diffraction_to_obj/params.dill"
AE_PARAMS = "autoencoder/params.dill"
METADATA = "torch_scaling_metadata.pt"


def fuzz_settings(ci_examples: int):
    """Bounded in CI (``ci_examples``), ``PTYCHO_FUZZ_EXAMPLES`` for a long run; never writes a database."""
    return settings(
        max_examples=_LONG_RUN or ci_examples,
        deadline=None,
        derandomize=not _RANDOM,
        database=None,
        print_blob=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    )


@pytest.fixture(autouse=True)
def _no_unsafe_opt_in(monkeypatch):
    monkeypatch.delenv(ALLOW_PICKLE_ENV, raising=False)


# Hypothesis writes best-effort caches (source constants, unicode tables) to ./.hypothesis, already while pytest
# collects. Its home directory is pointed below this (regular) file, where no directory can be created: the cache
# writes fail silently, and the run writes nothing outside tmp_path (database=None covers the example database).
set_hypothesis_home_dir(Path(__file__).resolve() / "no-hypothesis-cache")


@pytest.fixture(scope="module", autouse=True)
def _restore_hypothesis_home():
    yield
    set_hypothesis_home_dir(None)


# ------------------------------------------------------------------------------------------------------------
# The base bundle (module-level so @given tests need no function-scoped fixtures)
# ------------------------------------------------------------------------------------------------------------
class _Base:
    def __init__(self, folder):
        from conftest import make_perturbed_network

        self.folder = folder
        network = make_perturbed_network(seed=7, N=64, n_filters_scale=1)
        self.path = save_torch_bundle(network, folder / "base" / "wts.h5.zip")
        self.bytes = self.path.read_bytes()
        with zipfile.ZipFile(self.path) as archive:
            self.members = {name: archive.read(name) for name in archive.namelist()}
            infos = archive.infolist()
        self.params = pickle.loads(self.members[PARAMS])  # our own file: trusted
        self.manifest = pickle.loads(self.members[MANIFEST])
        self.metadata = torch.load(io.BytesIO(self.members[METADATA]), weights_only=True)
        # Offsets worth hitting: local headers, data starts, central directory entries, end record.
        hot = {0, len(self.bytes) - 22}
        for info in infos:
            hot.update(range(info.header_offset, info.header_offset + 34))
        eocd = self.bytes.rfind(b"PK\x05\x06")
        cd = struct.unpack_from("<I", self.bytes, eocd + 16)[0]
        hot.update(range(cd, len(self.bytes)))
        self.hot = sorted(o for o in hot if 0 <= o < len(self.bytes))
        self.counter = 0

    def target(self):
        self.counter += 1
        return self.folder / f"case{self.counter % 8}.zip"


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return _Base(tmp_path_factory.mktemp("fuzz"))


def _outcome(path) -> str:
    """Load ``path``; return 'loaded' or the PtychoFlavorError class name. Anything else propagates (= a bug)."""
    try:
        read_bundle(path)
    except PtychoFlavorError as exc:
        assert str(exc), "typed errors carry a message"
        return type(exc).__name__
    try:
        network, _ = load_torch_bundle(path, device="cpu")
    except PtychoFlavorError as exc:
        return type(exc).__name__
    assert network.config.N in (64, 128, 256)
    return "loaded"


def _rezip(base: _Base, replace: dict, *, drop_hashes: bool = True) -> bytes:
    members = dict(base.members)
    members.update(replace)
    if drop_hashes and MANIFEST not in replace:
        manifest = dict(base.manifest)
        manifest.pop("sha256", None)
        members[MANIFEST] = pickle.dumps(manifest, protocol=4)
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_STORED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return out.getvalue()


def _write(base: _Base, data: bytes):
    path = base.target()
    path.write_bytes(data)
    return path


# ------------------------------------------------------------------------------------------------------------
# Byte-level mutations
# ------------------------------------------------------------------------------------------------------------
@st.composite
def _byte_edits(draw, size: int, hot: list[int] | None = None):
    """A list of (kind, position, payload) edits applied in order to a buffer of ``size`` bytes."""
    edits = []
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate"]))
        if hot and draw(st.booleans()):
            position = draw(st.sampled_from(hot))
        else:
            position = draw(st.integers(0, max(size - 1, 0)))
        payload = draw(st.binary(min_size=1, max_size=8))
        edits.append((kind, position, payload))
    return edits


def _apply(data: bytes, edits) -> bytes:
    buffer = bytearray(data)
    for kind, position, payload in edits:
        position = min(position, len(buffer))
        if kind == "flip" and position < len(buffer):
            buffer[position] ^= payload[0] or 0x01
        elif kind == "set":
            buffer[position: position + len(payload)] = payload
        elif kind == "insert":
            buffer[position:position] = payload
        elif kind == "delete":
            del buffer[position: position + len(payload)]
        elif kind == "truncate":
            del buffer[position:]
    return bytes(buffer)


@fuzz_settings(60)
@given(data=st.data())
def test_whole_file_mutations(base, data):
    edits = data.draw(_byte_edits(len(base.bytes), base.hot), label="edits")
    _outcome(_write(base, _apply(base.bytes, edits)))


@fuzz_settings(40)
@given(data=st.data())
def test_mutated_member_bytes(base, data):
    name = data.draw(st.sampled_from(sorted(base.members)), label="member")
    original = base.members[name]
    edits = data.draw(_byte_edits(len(original)), label="edits")
    drop_hashes = data.draw(st.booleans(), label="drop_hashes") or name == MANIFEST
    _outcome(_write(base, _rezip(base, {name: _apply(original, edits)}, drop_hashes=drop_hashes)))


# ------------------------------------------------------------------------------------------------------------
# Pickle-level mutations of manifest.dill / params.dill
# ------------------------------------------------------------------------------------------------------------
_OPCODES = [bytes([c]) for c in b"()*.0123456789BCDEFGIJKLMNPQRSTUVXabcdeghijlmopqrstu}\x80\x81\x82\x83\x84"
            b"\x85\x86\x87\x88\x89\x8a\x8b\x8c\x8d\x8e\x8f\x90\x91\x92\x93\x94\x95\x96\x97\x98"]


@st.composite
def _pickle_mutation(draw, original: bytes):
    kind = draw(st.sampled_from(["edits", "opcode", "splice", "int"]))
    if kind == "edits":
        return _apply(original, draw(_byte_edits(len(original))))
    position = draw(st.integers(0, len(original)))
    if kind == "opcode":
        inserted = draw(st.sampled_from(_OPCODES)) + draw(st.binary(max_size=9))
        return original[:position] + inserted + original[position:]
    if kind == "splice":
        start = draw(st.integers(0, len(original)))
        length = draw(st.integers(1, 64))
        return original[:position] + original[start: start + length] + original[position:]
    # an integer opcode argument replaced by an extreme value
    value = draw(st.sampled_from([0, 1, 2**31 - 1, 2**32 - 1, 2**63 - 1, 2**64 - 1]))
    width = draw(st.sampled_from([1, 2, 4, 8]))
    return original[:position] + (value % (1 << (8 * width))).to_bytes(width, "little") + original[position + width:]


@fuzz_settings(80)
@given(data=st.data())
def test_mutated_pickles(base, data):
    name = data.draw(st.sampled_from([MANIFEST, PARAMS, AE_PARAMS]), label="member")
    mutated = data.draw(_pickle_mutation(base.members[name]), label="pickle")
    replace = {name: mutated}
    if name == PARAMS and data.draw(st.booleans(), label="both copies"):
        replace[AE_PARAMS] = mutated
    _outcome(_write(base, _rezip(base, replace)))


# ------------------------------------------------------------------------------------------------------------
# Value-level mutations: odd plain data where the reader expects config values
# ------------------------------------------------------------------------------------------------------------
_ODD_NUMBERS = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, 1, -1, 2, 64, 128, 256, 10**400, 2**63]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.complex_numbers(allow_nan=True, allow_infinity=True),
)
_LEAVES = st.one_of(
    st.none(), st.booleans(), _ODD_NUMBERS, st.text(max_size=12),
    st.sampled_from(["sigmoid", "silu", "cnn", "fno", "pinn", "supervised", "2.0-pytorch", "1.0", "pytorch",
                     "diffraction_to_obj", "autoencoder", "Unsupervised", "Supervised", "amp_phase", "real_imag"]),
    st.binary(max_size=8),
)
_VALUES = st.recursive(
    _LEAVES,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.tuples(children, children),
        st.dictionaries(st.text(max_size=6), children, max_size=4),
        st.frozensets(st.integers(-3, 3), max_size=3),
    ),
    max_leaves=8,
)
_PARAM_KEYS = ["N", "gridsize", "n_filters_scale", "object.big", "probe.big", "amp_activation", "model_type",
               "architecture", "intensity_scale", "intensity_scale.trainable", "C", "_version", "nphotons"]


@fuzz_settings(60)
@given(data=st.data())
def test_odd_values_in_manifest_and_params(base, data):
    target = data.draw(st.sampled_from(["manifest", "params", "params-one-copy", "manifest-whole", "params-whole"]),
                       label="target")
    if target.endswith("-whole"):
        value = data.draw(_VALUES, label="value")
        replace = {MANIFEST if target == "manifest-whole" else PARAMS: pickle.dumps(value, protocol=4)}
    elif target == "manifest":
        manifest = {k: v for k, v in base.manifest.items() if k != "sha256"}
        key = data.draw(st.sampled_from(["models", "version", "backend", "sha256", "extra"]), label="key")
        manifest[key] = data.draw(_VALUES, label="value")
        replace = {MANIFEST: pickle.dumps(manifest, protocol=4)}
    else:
        params = dict(base.params)
        for _ in range(data.draw(st.integers(1, 3), label="count")):
            key = data.draw(st.sampled_from(_PARAM_KEYS), label="key")
            if data.draw(st.booleans(), label="delete"):
                params.pop(key, None)
            else:
                params[key] = data.draw(_VALUES, label="value")
        raw = pickle.dumps(params, protocol=4)
        replace = {PARAMS: raw} if target == "params-one-copy" else {PARAMS: raw, AE_PARAMS: raw}
        if data.draw(st.booleans(), label="drop metadata"):
            replace[METADATA] = None
    members = {k: v for k, v in replace.items() if v is not None}
    data_bytes = _rezip(base, members)
    if replace.get(METADATA, b"") is None:
        data_bytes = _without(data_bytes, METADATA)
    _outcome(_write(base, data_bytes))


def _without(zip_bytes: bytes, member: str) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(zip_bytes)) as zin, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as zout:
        for name in zin.namelist():
            if name != member:
                zout.writestr(name, zin.read(name))
    return out.getvalue()


_TENSOR_OR_VALUE = st.one_of(_VALUES, st.builds(lambda n: torch.zeros(n), st.integers(0, 4)))


@fuzz_settings(50)
@given(data=st.data())
def test_odd_values_in_torch_metadata(base, data):
    metadata = {k: (dict(v) if isinstance(v, dict) else v) for k, v in base.metadata.items()}
    for _ in range(data.draw(st.integers(1, 3), label="count")):
        section = data.draw(st.sampled_from(["model_config", "data_config", "training_config", "inference_config",
                                             "top"]), label="section")
        if section == "top":
            key = data.draw(st.sampled_from(["schema_version", "ci_statistics", "model_config", "extra"]),
                            label="key")
            metadata[key] = data.draw(_TENSOR_OR_VALUE, label="value")
            continue
        if not isinstance(metadata.get(section), dict) or not metadata[section]:
            continue
        key = data.draw(st.sampled_from(sorted(metadata[section])), label="key")
        metadata[section][key] = data.draw(_TENSOR_OR_VALUE, label="value")
    buffer = io.BytesIO()
    torch.save(metadata, buffer)
    _outcome(_write(base, _rezip(base, {METADATA: buffer.getvalue()})))


def test_fuzz_harness_sees_the_valid_bundle(base):
    """The oracle is not vacuous: the untouched bundle loads, and an unmutated re-zip does too."""
    assert _outcome(base.path) == "loaded"
    assert _outcome(_write(base, _rezip(base, {}))) == "loaded"
    assert math.isfinite(float(base.params["intensity_scale"]))
