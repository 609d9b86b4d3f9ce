"""Odd prediction inputs get the package's typed error, in process and as a 400 from the real server (issue 12 §4).

Classes, each tested in process (``PtychoTorchModel.predict`` / ``stitch_patches`` -> :class:`PredictionInputError`,
pyfunc -> ``MlflowException(INVALID_PARAMETER_VALUE)``) and against ``mlflow models serve`` on 127.0.0.1:

* deeply nested JSON (MLflow's decoder raises ``RecursionError``) -> 400 with a message, never a 500;
* a stitching canvas sized by request positions is bounded (``PYFUNC_MAX_CANVAS_PIXELS`` served,
  ``DEFAULT_MAX_CANVAS_PIXELS`` for ``stitch_patches``) and checked before the network runs;
* string columns, positions as strings, ``None``/``null``, meta and sparse tensors -> the error names the field;
* ``scale``: one rule for every input form (finite, real, > 0, never a boolean);
* an input that makes the network produce NaN/inf is refused: the answer is always strict JSON (no bare ``NaN``).

Every served error must be a 400 whose JSON body carries the package's message, not MLflow's generic
"unexpected error" with a stack trace. The request list is fixed (bounded), and the server must still give the
in-process answer after all of them.
"""

from __future__ import annotations

import json
import re
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch

from mlflow_ptycho_flavor.errors import PredictionInputError
from mlflow_ptycho_flavor.model.stitching import DEFAULT_MAX_CANVAS_PIXELS, stitch_patches

N = 64
FAR = 1.0e6  # pixels: two positions this far apart need a (2e6 + 32)^2 canvas, ~100 TB


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    from conftest import make_perturbed_network
    from mlflow_ptycho_flavor.flavor import save_model

    model_dir = tmp_path_factory.mktemp("serving-inputs") / "model"
    save_model(make_perturbed_network(seed=9, N=N, n_filters_scale=1), model_dir)
    return model_dir


@pytest.fixture(scope="module")
def native(saved):
    from mlflow_ptycho_flavor.flavor import load_model

    return load_model(str(saved), device="cpu")


@pytest.fixture(scope="module")
def pyfunc_model(saved):
    import mlflow.pyfunc

    return mlflow.pyfunc.load_model(str(saved), model_config={"device": "cpu"})


def _x(batch: int = 2, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 2, (batch, 1, N, N)).astype(np.float32)


def _frame(columns: dict):
    import pandas as pd

    return pd.DataFrame(columns)


def _flat_rows(x: np.ndarray) -> list:
    return [row.ravel() for row in x]


def _refused_by_pyfunc(pyfunc_model, data, params=None) -> str:
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE, ErrorCode

    with pytest.raises(MlflowException) as info:
        pyfunc_model.predict(data, params=params)
    assert info.value.error_code == ErrorCode.Name(INVALID_PARAMETER_VALUE)
    return info.value.message


# ----------------------------------------------------------------------------------------------------------------
# odd inputs in process: the field is named
# ----------------------------------------------------------------------------------------------------------------
ODD_DIFFRACTION = [
    ("none", lambda: None, r"`diffraction` is None"),
    ("meta-tensor", lambda: torch.empty((2, 1, N, N), device="meta"), r"`diffraction` .*meta device"),
    ("sparse-coo", lambda: torch.zeros((2, 1, N, N)).to_sparse(), r"`diffraction` .*sparse"),
    ("sparse-csr", lambda: torch.zeros((2 * N, N)).to_sparse_csr(), r"`diffraction` .*sparse"),
    ("strings", lambda: np.full((2, N, N), "a"), r"`diffraction` has dtype <U1"),
    ("object-of-none", lambda: np.array([None, None], dtype=object), r"`diffraction` holds None"),
    ("dict", lambda: {"a": 1}, r"`diffraction` .*dict"),
]


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")  # torch's, building the input
@pytest.mark.parametrize("make, match", [c[1:] for c in ODD_DIFFRACTION], ids=[c[0] for c in ODD_DIFFRACTION])
def test_odd_diffraction_names_the_field(make, match, native, pyfunc_model):
    with pytest.raises(PredictionInputError, match=match):
        native.predict(make())
    data = make()
    if not isinstance(data, dict):
        assert re.search(match, _refused_by_pyfunc(pyfunc_model, {"diffraction": data}))


def test_pyfunc_input_none_is_named(pyfunc_model):
    assert "input is None" in _refused_by_pyfunc(pyfunc_model, None)


ODD_SCALE = [
    ("meta-tensor", lambda: torch.ones(2, device="meta"), r"`scale` .*meta device"),
    ("sparse", lambda: torch.ones(2).to_sparse(), r"`scale` .*sparse"),
    ("object-of-none", lambda: np.array(None, dtype=object), r"`scale` holds None"),
    ("strings", lambda: ["1", "2"], r"`scale` has dtype <U1"),
]


@pytest.mark.parametrize("make, match", [c[1:] for c in ODD_SCALE], ids=[c[0] for c in ODD_SCALE])
def test_odd_scale_names_the_field(make, match, native):
    with pytest.raises(PredictionInputError, match=match):
        native.predict(_x(), make())


DATAFRAMES = [
    ("diffraction-strings", lambda x: {"diffraction": ["abc", "def"]}, {}, "DataFrame column `diffraction`"),
    ("diffraction-none", lambda x: {"diffraction": [None, None]}, {}, "DataFrame column `diffraction`"),
    ("scale-strings", lambda x: {"diffraction": _flat_rows(x), "scale": ["a", "b"]}, {}, "DataFrame column `scale`"),
    ("scale-none", lambda x: {"diffraction": _flat_rows(x), "scale": [None, None]}, {}, "`scale`"),
    ("x-strings", lambda x: {"diffraction": _flat_rows(x), "x": ["a", "b"], "y": [1.0, 2.0]}, {"stitch": True},
     "DataFrame column `x`"),
    ("y-none", lambda x: {"diffraction": _flat_rows(x), "x": [1.0, 2.0], "y": [None, "b"]}, {"stitch": True},
     "DataFrame column `y`"),
]


@pytest.mark.parametrize("make, params, needle", [c[1:] for c in DATAFRAMES], ids=[c[0] for c in DATAFRAMES])
def test_odd_dataframe_columns_name_the_column(make, params, needle, pyfunc_model):
    assert needle in _refused_by_pyfunc(pyfunc_model, _frame(make(_x())), params)


@pytest.mark.parametrize("positions", [[["a", "b"], ["c", "d"]], "12", None, {"x": 1}],
                         ids=["strings", "string", "none", "dict"])
def test_odd_positions_name_the_field(positions, pyfunc_model):
    message = _refused_by_pyfunc(pyfunc_model, {"diffraction": _x(), "positions": positions}, {"stitch": True})
    assert "positions" in message


# ----------------------------------------------------------------------------------------------------------------
# scale: one rule for every form
# ----------------------------------------------------------------------------------------------------------------
BAD_SCALES = [
    ("zero", 0.0, "> 0"), ("negative", -1.0, "> 0"), ("negative-int", -3, "> 0"),
    ("zero-in-array", np.array([1.0, 0.0]), "> 0"), ("negative-in-list", [0.5, -0.5], "> 0"),
    ("python-bool", True, "boolean"), ("numpy-bool", np.bool_(True), "boolean"),
    ("bool-array", np.array([True, True]), "boolean"), ("bool-in-list", [True, 1.0], "boolean"),
    ("torch-bool", torch.tensor([True, False]), "boolean"),
]


@pytest.mark.parametrize("scale, needle", [c[1:] for c in BAD_SCALES], ids=[c[0] for c in BAD_SCALES])
def test_scale_rule_native_and_pyfunc_dict(scale, needle, native, pyfunc_model):
    with pytest.raises(PredictionInputError, match="`scale`") as info:
        native.predict(_x(), scale)
    assert needle in str(info.value)
    message = _refused_by_pyfunc(pyfunc_model, {"diffraction": _x(), "scale": scale})
    assert "`scale`" in message and needle in message


@pytest.mark.parametrize("column, needle", [([True, False], "boolean"), ([1.0, 0.0], "> 0"), ([-1, 2], "> 0")],
                         ids=["bool", "zero", "negative"])
def test_scale_rule_dataframe_column(column, needle, pyfunc_model):
    message = _refused_by_pyfunc(pyfunc_model, _frame({"diffraction": _flat_rows(_x()), "scale": column}))
    assert "`scale`" in message and needle in message


def test_good_scales_still_work(native, pyfunc_model):
    x = _x()
    want = native.predict(x, np.array([0.5, 2.0], np.float32))
    np.testing.assert_array_equal(native.predict(x, [0.5, 2]), want)
    np.testing.assert_array_equal(pyfunc_model.predict({"diffraction": x, "scale": [0.5, 2.0]}), want)
    frame = pyfunc_model.predict(_frame({"diffraction": _flat_rows(x), "scale": [0.5, 2]}),
                                 params={"output_format": "real_imag"})
    np.testing.assert_array_equal(np.stack(frame["real"].to_list()).reshape(want.shape), want.real)


# ----------------------------------------------------------------------------------------------------------------
# bounded canvas
# ----------------------------------------------------------------------------------------------------------------
def test_stitch_patches_refuses_a_canvas_above_its_limit_before_allocating():
    patches = np.ones((2, N, N), np.complex64)
    started = time.perf_counter()
    with pytest.raises(PredictionInputError, match="max_canvas_pixels") as info:
        stitch_patches(patches, np.array([[0.0, 0.0], [FAR, FAR]]))
    assert time.perf_counter() - started < 1.0
    assert f"{DEFAULT_MAX_CANVAS_PIXELS:,}" in str(info.value)
    # the limit is the caller's to raise: a 200 px span with a 100x100 limit is refused, with 300x300 it works
    positions = np.array([[0.0, 0.0], [200.0, 0.0]])
    with pytest.raises(PredictionInputError, match="max_canvas_pixels"):
        stitch_patches(patches, positions, max_canvas_pixels=100 * 100)
    assert stitch_patches(patches, positions, max_canvas_pixels=300 * 300).obj.shape == (232, 232)


def test_pyfunc_stitch_refuses_a_huge_canvas_before_running_the_network(pyfunc_model, native, monkeypatch):
    calls = []
    # the pyfunc holds its own network; patching the class records any forward pass of either
    monkeypatch.setattr(type(native.network), "forward", lambda self, *a: calls.append(1) or 1 / 0)
    message = _refused_by_pyfunc(pyfunc_model, {"diffraction": _x(), "positions": [[0.0, 0.0], [FAR, FAR]]},
                                 {"stitch": True})
    assert "max_canvas_pixels" in message and "positions" in message
    assert calls == []


# ----------------------------------------------------------------------------------------------------------------
# non-finite outputs
# ----------------------------------------------------------------------------------------------------------------
def test_pyfunc_refuses_an_input_whose_output_is_not_finite(pyfunc_model, native):
    x = _x(1)
    assert not np.isfinite(native.predict(x, 1e38)).all()  # the input really overflows the network
    message = _refused_by_pyfunc(pyfunc_model, {"diffraction": x, "scale": [1e38]}, {"output_format": "real_imag"})
    assert "non-finite" in message and "`scale`" in message


# ----------------------------------------------------------------------------------------------------------------
# the real server
# ----------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(saved, tmp_path_factory):
    from serving_tools import ModelServer

    log = tmp_path_factory.mktemp("serving-inputs-log") / "server.log"
    with ModelServer(str(saved), log_path=log) as running:
        yield running


def _post_raw(url: str, body: bytes, timeout: float = 120.0) -> tuple[int, str]:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")


def _strict_json(text: str):
    def refuse(token):
        raise ValueError(f"invalid JSON token {token}")

    return json.loads(text, parse_constant=refuse)


def _nest(depth: int, leaf: str = "1.0") -> str:
    return "[" * depth + leaf + "]" * depth


_X1 = json.dumps(_x(1).tolist())
_ROW = json.dumps(_x(1).ravel().tolist())
SERVED_BAD = [
    ("deep-list", _nest(100_000, ""), "nested"),
    ("deep-inputs", '{"inputs": ' + _nest(50_000) + "}", "nested"),
    ("deep-dict", '{"inputs": ' + '{"a": ' * 50_000 + "1" + "}" * 50_000 + "}", "nested"),
    ("deep-diffraction-900", '{"inputs": {"diffraction": ' + _nest(900) + "}}", ""),
    ("deep-params-900", '{"inputs": ' + _X1 + ', "params": {"output_format": ' + _nest(900, '"x"') + "}}", ""),
    ("deep-records", '{"dataframe_records": [{"diffraction": ' + _nest(20_000) + "}]}", "nested"),
    ("huge-canvas", json.dumps({"inputs": {"diffraction": _x(2).tolist(), "positions": [[0, 0], [FAR, FAR]]},
                                "params": {"stitch": True}}), "max_canvas_pixels"),
    ("string-positions", json.dumps({"inputs": {"diffraction": _x(2).tolist(), "positions": [["a", "b"], ["c", "d"]]},
                                     "params": {"stitch": True}}), "positions"),
    ("string-column", json.dumps({"dataframe_split": {"columns": ["diffraction"], "data": [["abc"]]}}),
     "`diffraction`"),
    ("string-scale-column", '{"dataframe_split": {"columns": ["diffraction", "scale"], "data": [[' + _ROW +
     ', "abc"]]}}', "`scale`"),
    ("string-x-column", '{"dataframe_split": {"columns": ["diffraction", "x", "y"], "data": [[' + _ROW +
     ', "a", "b"]]}, "params": {"stitch": true}}', "`x`"),
    ("inputs-null", '{"inputs": null}', "None"),
    ("diffraction-null", '{"inputs": {"diffraction": null}}', "`diffraction`"),
    ("scale-null", '{"inputs": {"diffraction": ' + _X1 + ', "scale": null}}', "`scale`"),
    ("records-null", '{"dataframe_records": [{"diffraction": null}]}', "`diffraction`"),
    ("scale-zero", '{"inputs": {"diffraction": ' + _X1 + ', "scale": [0]}}', "> 0"),
    ("scale-negative", '{"inputs": {"diffraction": ' + _X1 + ', "scale": -1.5}}', "> 0"),
    ("scale-true", '{"inputs": {"diffraction": ' + _X1 + ', "scale": true}}', "boolean"),
    ("scale-true-list", '{"inputs": {"diffraction": ' + _X1 + ', "scale": [true]}}', "boolean"),
    ("scale-bool-column", '{"dataframe_split": {"columns": ["diffraction", "scale"], "data": [[' + _ROW +
     ', true]]}}', "boolean"),
    ("nan-producing", '{"inputs": {"diffraction": ' + _X1 + ', "scale": [1e38]}}', "non-finite"),
    ("megabyte-param", '{"inputs": ' + _X1 + ', "params": {"output_format": "' + "a" * 1_000_000 + '"}}',
     "output_format"),
    ("megabyte-key", '{"inputs": {"diffraction": ' + _X1 + ', "' + "k" * 1_000_000 + '": 1}}', "unknown key"),
    ("long-list-param", '{"inputs": ' + _X1 + ', "params": {"output_format": [' + ", ".join(["7"] * 200_000) + "]}}",
     "output_format"),
]


def test_bad_payloads_get_a_400_with_the_packages_message_and_strict_json(server, native):
    url = f"{server.url}/invocations"
    failures = []
    for name, body, needle in SERVED_BAD:
        started = time.perf_counter()
        status, text = _post_raw(url, body.encode())
        elapsed = time.perf_counter() - started
        try:
            payload = _strict_json(text)
        except ValueError as exc:
            failures.append(f"{name}: answer is not strict JSON ({exc}): {text[:200]!r}")
            continue
        message = payload.get("message", "") if isinstance(payload, dict) else ""
        if status != 400:
            failures.append(f"{name}: status {status}: {text[:300]!r}")
        elif "unexpected error" in message or "stack_trace" in payload or "Traceback" in message:
            failures.append(f"{name}: MLflow's generic error instead of the package's: {message[:300]!r}")
        elif needle and needle not in message:
            failures.append(f"{name}: message lacks {needle!r}: {message[-300:]!r}")
        elif len(text) > 4_000 or elapsed > 60:  # messages quote at most ~100 characters of a value
            failures.append(f"{name}: {len(text)} bytes in {elapsed:.1f} s")
    assert not failures, "\n".join(failures)
    assert server.alive()
    x = _x(1, seed=5)
    status, text = _post_raw(url, json.dumps({"inputs": x.tolist()}).encode())
    assert status == 200
    body = _strict_json(text)["predictions"]
    got = np.asarray(body["real"], np.float32) + 1j * np.asarray(body["imag"], np.float32)
    np.testing.assert_array_equal(got, native.predict(x))  # same machine, same run
