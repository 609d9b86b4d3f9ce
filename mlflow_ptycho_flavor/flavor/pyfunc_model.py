"""The ``python_function`` wrapper of a ``ptycho_torch`` model: what ``mlflow.pyfunc.load_model`` returns.

Accepted inputs:
    * a numpy array (or torch tensor, or nested list) of diffraction amplitudes ``(B, N, N)`` / ``(B, C, N, N)``;
    * a dict ``{"diffraction": ..., "scale": ..., "positions": ...}`` (``scale`` and ``positions`` optional;
      ``positions`` ``(B, 2)`` pixel ``(x, y)`` scan positions are needed for ``stitch=True``) - this is what
      ``{"inputs": {...}}`` JSON requests to ``mlflow models serve`` become;
    * a pandas DataFrame, one row per pattern: column ``diffraction`` holding the pattern flattened
      (``N*N`` or ``C*N*N`` floats), optional ``scale``, optional ``x`` / ``y`` positions (the Spark layout).

Params (declared in the signature's ParamSchema, so they reach the model in Python and in serving):
    ``output_format``: ``auto`` (``complex`` in Python, ``real_imag`` when serving or inside a Spark task) |
    ``complex`` | ``real_imag`` | ``amp_phase``; ``batch_size`` (0 = 16 on CPU, 256 on a GPU); ``input_kind``: ``amplitude`` |
    ``counts`` (photon counts as ptychodus stores them: integers, e.g. JSON integer lists, or whole-valued floats) |
    ``intensity`` (any non-negative intensities), both square-rooted by
    :func:`~mlflow_ptycho_flavor.model.inference.counts_to_amplitudes`; ``normalize``: ``none`` | ``dataset``
    (upstream's factor, computed on the amplitudes); ``stitch`` (bool) and ``crop_size`` (0 = N/2).

Spark (``mlflow.pyfunc.spark_udf``, see :mod:`mlflow_ptycho_flavor.spark`): Arrow cannot carry complex numbers,
so inside a Spark task (``pyspark.TaskContext.get()`` is set) ``auto`` resolves to ``real_imag`` and an explicit
``complex`` is refused, as when serving. DataFrame input returns a DataFrame with one column per output
component (``real``/``imag`` or ``amplitude``/``phase``), each cell one flat float32 ``C*N*N`` array: exactly
what ``result_type="struct<real:array<float>,imag:array<float>>"`` expects.

Bad input raises ``MlflowException(INVALID_PARAMETER_VALUE)``, which the scoring server answers with HTTP 400
and the message: every odd input (``None``/``null``, strings, sparse or meta tensors, non-numeric DataFrame
columns, positions that are not numbers) names the field. Two more refusals keep a served answer bounded and valid:

* ``stitch=True`` builds a canvas sized by the request's positions; it is checked against ``max_canvas_pixels``
  (:data:`PYFUNC_MAX_CANVAS_PIXELS` = 1024 x 1024 unless ``model_config={"max_canvas_pixels": ...}`` at load)
  before the network runs;
* an input that makes the network produce NaN or inf is refused (JSON has no NaN: MLflow's encoder would write
  bare ``NaN`` tokens, which no strict JSON parser reads).
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

import numpy as np

from mlflow_ptycho_flavor.errors import PredictionInputError, PtychoFlavorError, short_repr
from mlflow_ptycho_flavor.flavor.env import invalid_parameter
from mlflow_ptycho_flavor.model.inference import OUTPUT_FORMATS, PtychoTorchModel, encode_output
from mlflow_ptycho_flavor.model.stitching import canvas_side, stitch_patches

__all__ = ["PtychoTorchPyfuncModel", "PARAM_DEFAULTS", "PYFUNC_MAX_CANVAS_PIXELS", "param_schema", "SERVING_ENV"]

_logger = logging.getLogger(__name__)

SERVING_ENV = "_MLFLOW_IS_IN_SERVING_ENVIRONMENT"
PARAM_DEFAULTS: dict[str, Any] = {
    "output_format": "auto",
    "batch_size": 0,
    "input_kind": "amplitude",
    "normalize": "none",
    "stitch": False,
    "crop_size": 0,
}
_DICT_KEYS = ("diffraction", "scale", "positions")
_SERVING_FORMAT = "real_imag"
#: Largest stitched canvas the pyfunc builds (pixels): 1024 x 1024, i.e. ~40 MB of JSON (real + imag) per answer
#: and ~40 MB of working arrays. A request's positions decide the canvas, so the bound is the operator's
#: (``model_config={"max_canvas_pixels": ...}``), never the request's. ``stitch_patches`` itself allows more.
PYFUNC_MAX_CANVAS_PIXELS = 1024 * 1024


def param_schema():
    """The ParamSchema every ``ptycho_torch`` signature carries (defaults are sentinels for "not given")."""
    from mlflow.types.schema import ParamSchema, ParamSpec

    return ParamSchema(
        [
            ParamSpec("output_format", "string", PARAM_DEFAULTS["output_format"]),
            ParamSpec("batch_size", "long", PARAM_DEFAULTS["batch_size"]),
            ParamSpec("input_kind", "string", PARAM_DEFAULTS["input_kind"]),
            ParamSpec("normalize", "string", PARAM_DEFAULTS["normalize"]),
            ParamSpec("stitch", "boolean", PARAM_DEFAULTS["stitch"]),
            ParamSpec("crop_size", "long", PARAM_DEFAULTS["crop_size"]),
            # Declared only so that a per-call device reaches the model and is refused with a clear message
            # (MLflow silently drops undeclared params); the device is fixed at load time.
            ParamSpec("device", "string", ""),
        ]
    )


def _in_serving() -> bool:
    return os.environ.get(SERVING_ENV, "").strip().lower() in ("1", "true")


def _in_spark_task() -> bool:
    """True inside a Spark task (a ``spark_udf`` Python worker); never imports pyspark itself."""
    if "pyspark" not in sys.modules:
        return False
    try:
        from pyspark import TaskContext
    except ImportError:  # pragma: no cover - a partial pyspark
        return False
    return TaskContext.get() is not None


def _row_error(name: str, row: Any, value: Any, expected: str) -> PredictionInputError:
    return PredictionInputError(
        f"DataFrame column `{name}` row {short_repr(row)} holds {short_repr(value)} ({type(value).__name__}); "
        f"{expected}"
    )


def _pattern_column(column: Any, name: str) -> np.ndarray:
    """One flattened pattern per row -> float ``(rows, N*N or C*N*N)`` (numeric columns pass through)."""
    values = column.to_numpy()
    if values.dtype != object:
        return np.array(values, copy=True)  # pandas 3 may hand out read-only views
    expected = "every row must hold one flattened pattern (N*N or C*N*N numbers)"
    rows = []
    for label, value in zip(column.index, values):
        if value is None or isinstance(value, (str, bytes, bool, dict)):
            raise _row_error(name, label, value, expected)
        try:
            rows.append(np.asarray(value, dtype=np.float64).ravel())
        except (ValueError, TypeError, OverflowError) as exc:
            raise _row_error(name, label, value, f"{expected} ({str(exc)[:100]})") from exc
    if len({row.shape for row in rows}) > 1:
        raise PredictionInputError(
            f"DataFrame column `{name}` holds rows of different lengths; {expected}"
        )
    return np.stack(rows) if rows else np.empty((0, 0), np.float64)


def _number_column(column: Any, name: str, *, allow_bool: bool = False,
                   expected: str = "every row must hold one number") -> np.ndarray:
    """One real number per row -> float64 (a bool column is returned as bool when ``allow_bool``, so that the
    caller's own rule refuses it with its own message)."""
    values = column.to_numpy()
    if values.dtype.kind == "b" and allow_bool:
        return np.array(values, copy=True)
    if values.dtype.kind in "iuf":
        return np.array(values, dtype=np.float64)
    if values.dtype != object:
        raise PredictionInputError(f"DataFrame column `{name}` has dtype {values.dtype}; {expected}")
    numbers = np.empty(len(values), dtype=np.float64)
    for i, (label, value) in enumerate(zip(column.index, values)):
        if value is None or isinstance(value, (str, bytes, bool, np.bool_)) or not np.isscalar(value):
            raise _row_error(name, label, value, expected)
        try:
            numbers[i] = float(value)
        except (ValueError, TypeError, OverflowError) as exc:
            raise _row_error(name, label, value, expected) from exc
    return numbers


def _refuse_non_finite(result: np.ndarray, amplitudes: np.ndarray, factors: np.ndarray) -> None:
    """Refuse outputs holding NaN/inf: JSON cannot carry them and they mean the input overflowed the network."""
    finite = np.isfinite(result)
    if finite.all():
        return
    bad = int(result.size - np.count_nonzero(finite))
    largest = float(np.abs(amplitudes).max(initial=0.0)) * float(np.abs(factors).max(initial=0.0))
    raise PredictionInputError(
        f"the network produced {bad} non-finite value(s) (NaN/inf) for this input: the scaled input reaches "
        f"{largest:.3g} (largest `diffraction` x `scale`), beyond what the network handles. The answer is refused "
        "rather than sent as NaN; check `scale` and that `diffraction` holds amplitudes (sqrt of counts)"
    )


class PtychoTorchPyfuncModel:
    """pyfunc wrapper around :class:`~mlflow_ptycho_flavor.inference.PtychoTorchModel`."""

    def __init__(self, model: PtychoTorchModel, *, max_canvas_pixels: int = PYFUNC_MAX_CANVAS_PIXELS) -> None:
        if isinstance(max_canvas_pixels, bool) or not isinstance(max_canvas_pixels, (int, np.integer)) \
                or max_canvas_pixels < 1:
            raise PredictionInputError(
                f"`max_canvas_pixels` must be a positive integer, got {short_repr(max_canvas_pixels)}"
            )
        self.model = model
        self.max_canvas_pixels = int(max_canvas_pixels)

    # MLflow's accessors for the underlying object --------------------------------------------------------------
    def get_raw_model(self):
        """The ``diffraction_to_obj`` torch module."""
        return self.model.network

    @property
    def python_model(self):
        """What ``PyFuncModel.unwrap_python_model()`` returns: the network."""
        return self.model.network

    # ------------------------------------------------------------------------------------------------------------
    def _parse_params(self, params: dict[str, Any] | None) -> dict[str, Any]:
        merged = dict(PARAM_DEFAULTS)
        for key, value in (params or {}).items():
            if key == "device" and value not in (None, ""):
                raise invalid_parameter(
                    "`device` cannot be chosen per call: the model is placed at load time. Use "
                    "mlflow.pyfunc.load_model(uri, model_config={'device': 'cuda:0'}) or set "
                    "MLFLOW_DEFAULT_PREDICTION_DEVICE"
                )
            if key in merged:
                merged[key] = value
        fmt = merged["output_format"]
        if fmt == "auto":
            fmt = _SERVING_FORMAT if _in_serving() or _in_spark_task() else "complex"
        elif fmt not in OUTPUT_FORMATS:
            raise invalid_parameter(f"`output_format`={short_repr(fmt)} is not one of {('auto',) + OUTPUT_FORMATS}")
        elif fmt == "complex" and _in_serving():
            raise invalid_parameter(
                "`output_format`='complex' cannot be sent as JSON; ask for 'real_imag' or 'amp_phase' "
                "(the serving default is 'real_imag')"
            )
        elif fmt == "complex" and _in_spark_task():
            raise invalid_parameter(
                "`output_format`='complex' cannot cross Arrow into Spark; ask for 'real_imag' (lossless) or "
                "'amp_phase' with a matching result_type (see mlflow_ptycho_flavor.spark.RESULT_TYPES)"
            )
        merged["output_format"] = fmt
        batch_size = merged["batch_size"]
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 0:
            raise invalid_parameter(f"`batch_size` must be an integer >= 0 (0 = default), got {short_repr(batch_size)}")
        merged["batch_size"] = int(batch_size) or None  # None: the device's default
        return merged

    def _split_input(self, data: Any) -> tuple[Any, Any, Any, Any]:
        """Return (diffraction, scale, raw positions, dataframe_index)."""
        try:
            import pandas as pd
        except ImportError:  # pragma: no cover - pandas ships with mlflow
            pd = None
        if pd is not None and isinstance(data, pd.DataFrame):
            return self._split_dataframe(data)
        if data is None:
            raise PredictionInputError(
                "input is None (null); pass diffraction amplitudes (B, N, N) / (B, C, N, N), a dict with "
                "`diffraction`, or a DataFrame with a `diffraction` column"
            )
        if isinstance(data, dict):
            unknown = sorted(map(str, set(data) - set(_DICT_KEYS)))
            if unknown:
                raise PredictionInputError(
                    f"dict input has unknown key(s) {short_repr(unknown)}; accepted keys: {list(_DICT_KEYS)}"
                )
            if "diffraction" not in data:
                raise PredictionInputError("dict input needs a `diffraction` entry (B, N, N) or (B, C, N, N)")
            return data["diffraction"], data.get("scale"), data.get("positions"), None
        if isinstance(data, (str, bytes)) or np.isscalar(data):
            raise PredictionInputError(
                f"input of type {type(data).__name__} is not accepted; pass a numpy array (B, N, N) / "
                "(B, C, N, N), a dict with `diffraction`, or a DataFrame with a `diffraction` column"
            )
        return data, None, None, None

    def _split_dataframe(self, frame: Any) -> tuple[Any, Any, Any, Any]:
        columns = [str(c) for c in frame.columns]
        frame = frame.set_axis(columns, axis=1)
        if "diffraction" in columns:
            diffraction = _pattern_column(frame["diffraction"], "diffraction")
        elif len(columns) >= 1 and columns[0] == "0":
            # spark_udf with positional columns: "0" diffraction, "1" scale
            diffraction = _pattern_column(frame["0"], "0")
            frame = frame.rename(columns={"1": "scale"})
            columns = list(frame.columns)
        else:
            raise PredictionInputError(
                f"DataFrame input needs a `diffraction` column (one flattened pattern per row); got columns "
                f"{columns[:8]}"
            )
        scale = None
        if "scale" in columns:
            scale = _number_column(frame["scale"], "scale", allow_bool=True,
                                   expected="every row must hold one real number > 0 (a boolean is not a factor)")
        # x/y are pass-through columns unless stitching: converted (and checked) only when used
        positions = (frame["x"], frame["y"]) if "x" in columns and "y" in columns else None
        return diffraction, scale, positions, frame.index

    @staticmethod
    def _positions(raw: Any) -> Any:
        """The positions to stitch: DataFrame ``x``/``y`` columns as ``(B, 2)``, anything else as given."""
        if raw is None:
            raise PredictionInputError(
                "stitch=True needs scan positions: pass {'diffraction': ..., 'positions': (B, 2) pixel (x, y)} "
                "or DataFrame columns `x` and `y`"
            )
        if isinstance(raw, tuple) and len(raw) == 2 and all(hasattr(c, "to_numpy") for c in raw):
            return np.stack([_number_column(raw[0], "x"), _number_column(raw[1], "y")], axis=1)
        if isinstance(raw, (str, bytes, dict)):
            raise PredictionInputError(
                f"`positions` is a {type(raw).__name__}; pass (B, 2) or (B, C, 2) pixel (x, y) numbers"
            )
        return raw

    def _prepare(self, data: Any, options: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, Any, Any]:
        """Validated amplitudes, factors, stitch positions (or None) and the DataFrame index; no network run."""
        try:
            diffraction, scale, raw_positions, index = self._split_input(data)
            amplitudes, factors = self.model.prepare(
                diffraction, scale, input_kind=options["input_kind"], normalize=options["normalize"]
            )
            positions = None
            if options["stitch"]:
                positions = self._positions(raw_positions)
                canvas_side(amplitudes.shape, positions, crop_size=self._crop(options),
                            max_canvas_pixels=self.max_canvas_pixels)
        except PtychoFlavorError:
            raise
        except (TypeError, ValueError, OverflowError, MemoryError) as exc:
            # A last line of defence: whatever an odd input breaks, the caller gets a 400 with the cause.
            raise PredictionInputError(f"input could not be read: {type(exc).__name__}: {str(exc)[:200]}") from exc
        return amplitudes, factors, positions, index

    @staticmethod
    def _crop(options: dict[str, Any]) -> int | None:
        crop = options["crop_size"]
        if isinstance(crop, bool) or not isinstance(crop, (int, np.integer)):
            raise PredictionInputError(f"`crop_size` must be an integer (0 = N/2), got {short_repr(crop)}")
        return int(crop) or None

    def predict(self, data: Any, params: dict[str, Any] | None = None) -> Any:
        """Reconstruct complex object patches (see the module docstring for inputs, params and outputs)."""
        options = self._parse_params(params)
        try:
            amplitudes, factors, positions, index = self._prepare(data, options)
            result = self.model.predict_prepared(amplitudes, factors, batch_size=options["batch_size"])
            _refuse_non_finite(result, amplitudes, factors)
            if options["stitch"]:
                return self._stitched(result, positions, options)
        except PtychoFlavorError as exc:
            raise invalid_parameter(str(exc)) from exc
        encoded = encode_output(result, options["output_format"])
        if index is not None:
            return self._as_frame(encoded, index)
        return encoded

    def _stitched(self, result: np.ndarray, positions: Any, options: dict[str, Any]) -> Any:
        stitched = stitch_patches(result, positions, crop_size=self._crop(options),
                                  max_canvas_pixels=self.max_canvas_pixels)
        return encode_output(stitched.obj, options["output_format"])

    @staticmethod
    def _as_frame(encoded: Any, index: Any) -> Any:
        import pandas as pd

        rows = len(index)
        if isinstance(encoded, dict):
            columns = {key: list(value.reshape(rows, -1)) for key, value in encoded.items()}
        else:
            columns = {"object": list(encoded.reshape(rows, -1))}
        return pd.DataFrame(columns, index=index)
