"""Bad inference input gets a clear, typed error (GitHub issue 7, part 5).

Every case runs twice: natively (``PtychoTorchModel.predict`` -> :class:`PredictionInputError`, a ``ValueError``)
and through the pyfunc wrapper of a model saved under ``tmp_path`` and loaded with ``mlflow.pyfunc.load_model``
(-> ``MlflowException`` with ``INVALID_PARAMETER_VALUE``, which the scoring server turns into HTTP 400). The model
is N=64, gridsize 2 (C=4 channels), n_filters_scale=1, so channel-count errors are visible.

Documented edge: an empty batch is not an error; it returns an empty complex64 ``(0, C, N, N)`` array.

MLflow is imported inside the fixtures so this module does not need the per-test tracking store.
"""

from __future__ import annotations

import numpy as np
import pytest

from mlflow_ptycho_flavor.errors import PredictionInputError

N, C = 64, 4


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(native PtychoTorchModel, pyfunc model) of the same saved gridsize-2 model."""
    import mlflow.pyfunc

    from conftest import make_perturbed_network
    from mlflow_ptycho_flavor.flavor import load_model, save_model

    model_dir = tmp_path_factory.mktemp("prediction-inputs") / "model"
    save_model(make_perturbed_network(seed=5, N=N, C_model=C, n_filters_scale=1), model_dir)
    native = load_model(str(model_dir), device="cpu")
    pyfunc_model = mlflow.pyfunc.load_model(str(model_dir), model_config={"device": "cpu"})
    return native, pyfunc_model


def _good(batch: int = 2) -> np.ndarray:
    return (2.0 * np.random.default_rng(7).random((batch, C, N, N))).astype(np.float32)


def _with(value, index=(1, 2, 3, 4)) -> np.ndarray:
    x = _good()
    x[index] = value
    return x


# (id, diffraction, scale, options, message regex). ``options`` are predict keywords natively and pyfunc params.
CASES = [
    ("rank-1", np.ones(N, np.float32), None, {},
     r"must have rank 3 \(B, N, N\) or 4 \(B, C, N, N\), got shape \(64,\)"),
    ("rank-2", np.ones((N, N), np.float32), None, {}, r"must have rank 3 .* got shape \(64, 64\)"),
    ("rank-5", _good()[:, None], None, {}, r"must have rank 3 .* got shape \(2, 1, 4, 64, 64\)"),
    ("scalar", np.float32(1.0), None, {}, r"must have rank 3|is not accepted"),
    ("wrong-N-32", _good()[..., :32, :32], None, {}, r"patterns are 32x32 but this model was trained on N=64"),
    ("wrong-N-128", np.ones((2, C, 128, 128), np.float32), None, {}, r"128x128 but this model was trained on N=64"),
    ("non-square", _good()[..., :40], None, {}, r"patterns are 64x40 but this model was trained on N=64"),
    ("channels-1-of-4", _good()[:, :1], None, {}, r"has 1 channel\(s\) but this model takes C=4 \(gridsize 2\)"),
    ("channels-9-of-4", np.ones((2, 9, N, N), np.float32), None, {}, r"has 9 channel\(s\) but this model takes C=4"),
    ("rank-3-for-gridsize-2", _good()[:, 0], None, {}, r"\(B, N, N\) but this model takes C=4 channels \(gridsize 2\)"),
    ("dtype-int", np.ones((2, C, N, N), np.int64), None, {}, r"has dtype int64; expected floating point"),
    ("dtype-uint8", np.ones((2, C, N, N), np.uint8), None, {}, r"has dtype uint8; expected floating point"),
    ("dtype-bool", np.ones((2, C, N, N), bool), None, {}, r"has dtype bool; expected floating point"),
    ("dtype-complex", _good().astype(np.complex64), None, {}, r"has dtype complex64; expected floating point "
                                                             r"\(complex input: pass amplitudes \|psi\|"),
    ("dtype-str", np.full((2, C, N, N), "1.0"), None, {}, r"has dtype <U3; expected floating point"),
    ("dtype-object", _good().astype(object), None, {}, r"has dtype object; expected floating point"),
    ("ragged-list", [np.ones((C, N, N)), np.ones((C, N, N - 1))], None, {}, r"is ragged|could not be read"),
    ("nan", _with(np.nan), None, {}, r"holds 1 NaN or infinite value\(s\); clean the data first"),
    ("inf", _with(np.inf), None, {}, r"holds 1 NaN or infinite value\(s\)"),
    ("minus-inf", _with(-np.inf, (0, 0, 0, 0)), None, {"input_kind": "intensity"}, r"holds 1 NaN or infinite"),
    ("negative-counts", _with(-0.5), None, {"input_kind": "intensity"},
     r"holds negative counts with input_kind='intensity'; counts must be >= 0"),
    ("unknown-input-kind", _good(), None, {"input_kind": "photons"}, r"`input_kind`='photons' is not one of"),
    ("scale-too-many", _good(), np.ones(3, np.float32), {}, r"`scale` has shape \(3,\); expected a scalar or one "
                                                           r"value per sample \(B=2\)"),
    ("scale-2d", _good(), np.ones((2, 2), np.float32), {}, r"`scale` has shape \(2, 2\)"),
    ("scale-nan", _good(), np.array([1.0, np.nan], np.float32), {}, r"`scale` holds NaN or infinite values"),
    ("scale-inf-scalar", _good(), np.float64(np.inf), {}, r"`scale` holds NaN or infinite values"),
    ("scale-str", _good(), np.array(["1", "2"]), {}, r"`scale` has dtype <U1; expected a real number per sample"),
    ("scale-bool", _good(), np.array([True, False]), {}, r"`scale` has dtype bool"),
    ("scale-and-normalize", _good(), np.ones(2, np.float32), {"normalize": "dataset"},
     r"give either `scale` or normalize='dataset', not both"),
    ("unknown-normalize", _good(), None, {"normalize": "max"}, r"`normalize`='max' is not one of"),
    ("unknown-output-format", _good(), None, {"output_format": "hdf5"}, r"`output_format`='hdf5' is not one of"),
]


def _ids():
    return [case[0] for case in CASES]


@pytest.mark.parametrize("case", CASES, ids=_ids())
def test_native_predict_rejects(models, case):
    _, diffraction, scale, options, match = case
    native, _ = models
    with pytest.raises(PredictionInputError, match=match) as info:
        native.predict(diffraction, scale, **options)
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("case", CASES, ids=_ids())
def test_pyfunc_predict_rejects(models, case):
    from mlflow.exceptions import MlflowException

    name, diffraction, scale, options, match = case
    _, pyfunc_model = models
    data = diffraction if scale is None else {"diffraction": diffraction, "scale": scale}
    with pytest.raises(MlflowException, match=match) as info:
        pyfunc_model.predict(data, params=options or None)
    assert info.value.error_code == "INVALID_PARAMETER_VALUE", name


@pytest.mark.parametrize(
    "data, match",
    [
        ({"diffraction": _good(), "probe": np.ones((N, N))}, r"dict input has unknown key\(s\) \['probe'\]; "
                                                            r"accepted keys: \['diffraction', 'scale', 'positions'\]"),
        ({"diffraction": _good(), "Scale": 1.0, "x": 0}, r"unknown key\(s\) \['Scale', 'x'\]"),
        ({"scale": np.ones(2)}, r"dict input needs a `diffraction` entry"),
        ("patterns.npy", r"input of type str is not accepted"),
        (b"\x00\x01", r"input of type bytes is not accepted"),
    ],
    ids=["unknown-key", "two-unknown-keys", "no-diffraction", "str", "bytes"],
)
def test_pyfunc_rejects_bad_containers(models, data, match):
    from mlflow.exceptions import MlflowException

    _, pyfunc_model = models
    with pytest.raises(MlflowException, match=match) as info:
        pyfunc_model.predict(data)
    assert info.value.error_code == "INVALID_PARAMETER_VALUE"


@pytest.mark.parametrize("batch_size", [0, -1, 2.5, True])
def test_native_batch_size_must_be_a_positive_integer(models, batch_size):
    native, _ = models
    with pytest.raises(PredictionInputError, match=r"`batch_size` must be a positive integer"):
        native.predict(_good(), batch_size=batch_size)


@pytest.mark.parametrize("options", [{}, {"output_format": "real_imag"}, {"input_kind": "intensity"}])
def test_empty_batch_returns_an_empty_result(models, options):
    """Documented: (0, C, N, N) in, an empty complex64 (0, C, N, N) out (or empty real/imag arrays)."""
    native, pyfunc_model = models
    empty = np.zeros((0, C, N, N), np.float32)
    for result in (native.predict(empty, **options), pyfunc_model.predict(empty, params=options or None)):
        if options.get("output_format") == "real_imag":
            assert set(result) == {"real", "imag"}
            assert result["real"].shape == result["imag"].shape == (0, C, N, N)
            assert result["real"].dtype == np.float32
        else:
            assert isinstance(result, np.ndarray)
            assert result.shape == (0, C, N, N) and result.dtype == np.complex64


def test_empty_batch_of_rank_3_for_a_gridsize_2_model(models):
    """(0, N, N) carries no patterns to group: also the empty (0, C, N, N) result, not an error."""
    native, _ = models
    result = native.predict(np.zeros((0, N, N), np.float32))
    assert result.shape == (0, C, N, N) and result.dtype == np.complex64


def test_valid_input_still_predicts(models):
    """Control for the cases above: the same model accepts well-formed input both ways, identically."""
    native, pyfunc_model = models
    x = _good()
    scale = np.array([1.0, 0.5], np.float32)
    expected = native.predict(x, scale)
    assert expected.shape == (2, C, N, N) and np.isfinite(expected).all()
    np.testing.assert_array_equal(pyfunc_model.predict({"diffraction": x, "scale": scale}), expected)
    np.testing.assert_array_equal(native.predict(x.astype(np.float64), scale), expected)  # float64 is fine
    counts = native.predict(np.square(x), scale, input_kind="intensity")
    np.testing.assert_allclose(counts, expected, rtol=1e-5, atol=1e-6)
