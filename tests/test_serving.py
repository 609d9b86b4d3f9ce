"""The real ``mlflow models serve`` process on loopback: every output form, bad payloads, bounded load.

One server is started for the module (start-up costs seconds); it serves a saved gridsize-2 model.
"""

from __future__ import annotations

import re

import numpy as np
import pytest

import mlflow_ptycho_flavor  # noqa: F401  (registers mlflow.ptycho_torch)
from mlflow_ptycho_flavor.flavor import load_model, save_model
from serving_tools import ModelServer, run_load

pytestmark = pytest.mark.slow

N, C = 64, 4


@pytest.fixture(scope="module")
def served(tmp_path_factory, perturbed_network):
    root = tmp_path_factory.mktemp("serving")
    network = perturbed_network(seed=11, N=N, C_model=C, n_filters_scale=1)
    save_model(network, root / "model")
    native = load_model(str(root / "model"), device="cpu")
    server = ModelServer(str(root / "model"), log_path=root / "server.log")
    with server:
        yield server, native


def _inputs(batch: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 2, (batch, C, N, N)).astype(np.float32)


def test_default_output_is_real_imag_and_matches_in_process(served):
    server, native = served
    x = _inputs(3)
    status, body = server.invoke({"inputs": x.tolist()})
    assert status == 200, body
    expected = native.predict(x)
    real = np.asarray(body["predictions"]["real"], dtype=np.float32)
    imag = np.asarray(body["predictions"]["imag"], dtype=np.float32)
    np.testing.assert_array_equal(real + 1j * imag, expected)  # float32 survives JSON's float64 exactly


def test_amp_phase_and_scale_via_dict_input(served):
    server, native = served
    x = _inputs(2, seed=1)
    scale = [0.5, 1.5]
    status, body = server.invoke({"inputs": {"diffraction": x.tolist(), "scale": scale},
                                  "params": {"output_format": "amp_phase"}})
    assert status == 200, body
    expected = native.predict(x, np.asarray(scale), output_format="amp_phase")
    np.testing.assert_array_equal(np.asarray(body["predictions"]["amplitude"], np.float32), expected["amplitude"])
    np.testing.assert_array_equal(np.asarray(body["predictions"]["phase"], np.float32), expected["phase"])


def test_dataframe_split_rows_of_flattened_patterns(served):
    server, native = served
    x = _inputs(2, seed=2)
    payload = {"dataframe_split": {"columns": ["diffraction", "scale"],
                                   "data": [[x[i].ravel().tolist(), 1.0 + i] for i in range(2)]}}
    status, body = server.invoke(payload)
    assert status == 200, body
    expected = native.predict(x, np.asarray([1.0, 2.0]))
    for i, row in enumerate(body["predictions"]):
        got = np.asarray(row["real"], np.float32) + 1j * np.asarray(row["imag"], np.float32)
        np.testing.assert_array_equal(got, expected[i].ravel())


def test_stitched_object_with_positions(served):
    server, native = served
    x = _inputs(4, seed=3)
    positions = np.random.default_rng(3).uniform(0, 20, (4, C, 2))
    status, body = server.invoke({"inputs": {"diffraction": x.tolist(), "positions": positions.tolist()},
                                  "params": {"stitch": True}})
    assert status == 200, body
    from mlflow_ptycho_flavor.model.stitching import stitch_patches

    expected = stitch_patches(native.predict(x), positions).obj
    got = np.asarray(body["predictions"]["real"], np.float32) + 1j * np.asarray(body["predictions"]["imag"], np.float32)
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ({"inputs": np.zeros((2, C, 32, 32)).tolist()}, "trained on N=64"),
        ({"inputs": np.zeros((2, 1, N, N)).tolist()}, "this model takes C=4"),
        ({"inputs": [[[[1] * N] * N] * C]}, "dtype int64; expected floating point"),
        ({"inputs": np.zeros((N, N)).tolist()}, "rank 3"),
        ('{"inputs": [[[[NaN]]]]}', "NaN or infinite|rank|trained on"),
        ({"inputs": {"diffraction": np.zeros((1, C, N, N)).tolist(), "bogus": 1}}, "unknown key"),
        ({"inputs": np.zeros((1, C, N, N)).tolist(), "params": {"output_format": "complex"}}, "cannot be sent as JSON"),
        ({"inputs": np.zeros((1, C, N, N)).tolist(), "params": {"output_format": "polar"}}, "is not one of"),
        ({"inputs": (-np.ones((1, C, N, N))).tolist(), "params": {"input_kind": "intensity"}}, "negative counts"),
        ({"inputs": [[[[-1] * N] * N] * C], "params": {"input_kind": "intensity"}}, "negative counts"),
        ({"nonsense": 1}, "input fields"),
        ("{not json", ""),
    ],
)
def test_bad_payloads_get_400_with_a_message_and_the_server_stays_up(served, payload, message):
    server, _ = served
    status, body = server.invoke(payload)
    assert status == 400, body
    assert re.search(message, str(body)), body
    assert server.alive()


def test_bounded_mixed_load_gives_zero_wrong_answers(served):
    """Issue 7.5 in CI size: mixed valid/invalid requests, 8 concurrent; every invalid one a 4xx."""
    server, native = served
    valid_x = _inputs(1, seed=7)
    expected = native.predict(valid_x)

    def check_valid(status, body):
        if status != 200:
            return False
        got = np.asarray(body["predictions"]["real"], np.float32) + 1j * np.asarray(body["predictions"]["imag"], np.float32)
        return np.array_equal(got, expected)

    def check_4xx(status, body):
        return 400 <= status < 500

    cases = [
        ({"inputs": valid_x.tolist()}, check_valid),
        ({"inputs": np.zeros((1, 1, N, N)).tolist()}, check_4xx),
        ({"inputs": valid_x.tolist()}, check_valid),
        ('{"inputs": [[[[NaN]]]]}', check_4xx),
        ({"inputs": valid_x.tolist(), "params": {"output_format": "complex"}}, check_4xx),
        ({"oops": []}, check_4xx),
    ]
    report = run_load(server, cases, requests=400, concurrency=8)
    assert report.wrong_answers == 0, report.as_row()
    assert report.unexpected_status == 0, report.as_row()
    assert report.status_counts.get(200, 0) == sum(1 for i in range(400) if i % len(cases) in (0, 2))
    assert server.alive()
