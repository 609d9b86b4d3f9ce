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
    ``intensity``; ``normalize``: ``none`` | ``dataset``; ``stitch`` (bool) and ``crop_size`` (0 = N/2).

Spark (``mlflow.pyfunc.spark_udf``, see :mod:`mlflow_ptycho_flavor.spark`): Arrow cannot carry complex numbers,
so inside a Spark task (``pyspark.TaskContext.get()`` is set) ``auto`` resolves to ``real_imag`` and an explicit
``complex`` is refused, as when serving. DataFrame input returns a DataFrame with one column per output
component (``real``/``imag`` or ``amplitude``/``phase``), each cell one flat float32 ``C*N*N`` array: exactly
what ``result_type="struct<real:array<float>,imag:array<float>>"`` expects.

Bad input raises ``MlflowException(INVALID_PARAMETER_VALUE)``, which the scoring server answers with HTTP 400
and the message.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

import numpy as np

from mlflow_ptycho_flavor.errors import PredictionInputError, PtychoFlavorError
from mlflow_ptycho_flavor.flavor.env import invalid_parameter
from mlflow_ptycho_flavor.model.inference import OUTPUT_FORMATS, PtychoTorchModel, encode_output

__all__ = ["PtychoTorchPyfuncModel", "PARAM_DEFAULTS", "param_schema", "SERVING_ENV"]

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


def _column_to_array(column: Any, name: str) -> np.ndarray:
    values = column.to_numpy()
    if values.dtype == object:
        try:
            values = np.stack([np.asarray(v, dtype=np.float64).ravel() for v in values])
        except (ValueError, TypeError) as exc:
            raise PredictionInputError(
                f"DataFrame column `{name}` must hold one flattened pattern per row (N*N or C*N*N floats): {exc}"
            ) from exc
    return np.array(values, copy=True)  # pandas 3 may hand out read-only views


class PtychoTorchPyfuncModel:
    """pyfunc wrapper around :class:`~mlflow_ptycho_flavor.inference.PtychoTorchModel`."""

    def __init__(self, model: PtychoTorchModel) -> None:
        self.model = model

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
            raise invalid_parameter(f"`output_format`={fmt!r} is not one of {('auto',) + OUTPUT_FORMATS}")
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
            raise invalid_parameter(f"`batch_size` must be an integer >= 0 (0 = default), got {batch_size!r}")
        merged["batch_size"] = int(batch_size) or None  # None: the device's default
        return merged

    def _split_input(self, data: Any) -> tuple[Any, Any, Any, Any]:
        """Return (diffraction, scale, positions, dataframe_index)."""
        try:
            import pandas as pd
        except ImportError:  # pragma: no cover - pandas ships with mlflow
            pd = None
        if pd is not None and isinstance(data, pd.DataFrame):
            return self._split_dataframe(data)
        if isinstance(data, dict):
            unknown = sorted(set(data) - set(_DICT_KEYS))
            if unknown:
                raise PredictionInputError(
                    f"dict input has unknown key(s) {unknown}; accepted keys: {list(_DICT_KEYS)}"
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
            diffraction = _column_to_array(frame["diffraction"], "diffraction")
        elif len(columns) >= 1 and columns[0] == "0":
            # spark_udf with positional columns: "0" diffraction, "1" scale
            diffraction = _column_to_array(frame["0"], "0")
            frame = frame.rename(columns={"1": "scale"})
            columns = list(frame.columns)
        else:
            raise PredictionInputError(
                f"DataFrame input needs a `diffraction` column (one flattened pattern per row); got columns "
                f"{columns[:8]}"
            )
        scale = _column_to_array(frame["scale"], "scale").astype(np.float64) if "scale" in columns else None
        positions = None
        if "x" in columns and "y" in columns:
            positions = np.stack([frame["x"].to_numpy(dtype=np.float64), frame["y"].to_numpy(dtype=np.float64)], 1)
        return diffraction, scale, positions, frame.index

    def predict(self, data: Any, params: dict[str, Any] | None = None) -> Any:
        """Reconstruct complex object patches (see the module docstring for inputs, params and outputs)."""
        options = self._parse_params(params)
        try:
            diffraction, scale, positions, index = self._split_input(data)
            amplitudes, factors = self.model.prepare(
                diffraction, scale, input_kind=options["input_kind"], normalize=options["normalize"]
            )
            result = self.model.predict_prepared(amplitudes, factors, batch_size=options["batch_size"])
            if options["stitch"]:
                return self._stitched(result, positions, options)
        except PtychoFlavorError as exc:
            raise invalid_parameter(str(exc)) from exc
        encoded = encode_output(result, options["output_format"])
        if index is not None:
            return self._as_frame(encoded, index)
        return encoded

    def _stitched(self, result: np.ndarray, positions: Any, options: dict[str, Any]) -> Any:
        from mlflow_ptycho_flavor.model.stitching import stitch_patches

        if positions is None:
            raise PredictionInputError(
                "stitch=True needs scan positions: pass {'diffraction': ..., 'positions': (B, 2) pixel (x, y)} "
                "or DataFrame columns `x` and `y`"
            )
        crop = int(options["crop_size"]) or None
        stitched = stitch_patches(result, np.asarray(positions, dtype=np.float64), crop_size=crop)
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
