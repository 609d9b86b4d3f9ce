"""Batch inference on Spark: ``ptycho_torch`` models as Spark UDFs (``mlflow.pyfunc.spark_udf``).

Input layout (one row per diffraction pattern; :data:`INPUT_SCHEMA_DDL`):

==============  =================  ==========================================================================
column          Spark type         meaning
==============  =================  ==========================================================================
``diffraction``  ``array<float>``   the pattern flattened in C order: ``N*N`` floats (gridsize 1) or ``C*N*N``
                                   (a group of C neighbouring patterns); ``array<double>`` is accepted too
``scale``       ``double``         optional per-pattern input factor (upstream's ``forward_predict`` scale);
                                   1 when absent. Any numeric type.
``x``, ``y``    ``double``         optional scan position in object pixels; carried through untouched (the UDF
                                   works row by row, stitching is done afterwards on the collected patches)
any other       any                carried through untouched
==============  =================  ==========================================================================

Result layout: one struct column (``prediction`` by default) per row, of type :data:`REAL_IMAG_RESULT_TYPE`
``struct<real:array<float>,imag:array<float>>`` (``output_format="real_imag"``, the default, lossless) or
:data:`AMP_PHASE_RESULT_TYPE` ``struct<amplitude:array<float>,phase:array<float>>`` (``"amp_phase"``); each array
holds the ``C*N*N`` float32 values of the complex object patch, flattened in C order. ``complex`` cannot cross
Arrow, so it is not offered (inside a Spark task the pyfunc resolves ``output_format="auto"`` to ``real_imag``).

Batching: ``spark_udf`` is a pandas iterator UDF. Spark cuts every partition into Arrow record batches of at
most ``spark.sql.execution.arrow.maxRecordsPerBatch`` rows (default 10000), and MLflow calls the model's
``predict`` once per record batch, so that setting bounds the pyfunc batch (and the memory of one call); inside
``predict`` the network runs in chunks of the ``batch_size`` param (default 256). ``batch_size=`` in
:func:`spark_predict` / :func:`run_batch_inference` sets both. The model itself is loaded once per task (i.e.
per partition) in the Python worker; Python workers are reused between tasks, so ``torch``/``mlflow`` are
imported once per worker.

Only what is row-local can run on Spark: ``normalize="dataset"`` (a factor over the whole input) would be
computed per record batch, so the helpers compute it on the driver and pass it as the ``scale`` column, and
``stitch=True`` (one object from many rows) is refused.

Needs ``pyspark>=4.0`` (Arrow in and out: ``createDataFrame(pyarrow.Table)``, ``DataFrame.toArrow``) and Java
17+. Example::

    from mlflow_ptycho_flavor.flavor.spark import local_spark_session, spark_predict
    spark = local_spark_session("local[2]")
    patches = spark_predict(spark, "models:/ptycho@champion", amplitudes)   # complex64 (M, C, N, N)
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

from mlflow_ptycho_flavor.errors import PredictionInputError

__all__ = [
    "REAL_IMAG_RESULT_TYPE",
    "AMP_PHASE_RESULT_TYPE",
    "RESULT_TYPES",
    "RESULT_FIELDS",
    "SPARK_OUTPUT_FORMATS",
    "INPUT_SCHEMA_DDL",
    "RESULT_COLUMN",
    "INDEX_COLUMN",
    "ARROW_BATCH_CONF",
    "local_spark_session",
    "spark_udf",
    "model_input",
    "spark_predict",
]

_logger = logging.getLogger(__name__)

REAL_IMAG_RESULT_TYPE = "struct<real:array<float>,imag:array<float>>"
AMP_PHASE_RESULT_TYPE = "struct<amplitude:array<float>,phase:array<float>>"
RESULT_TYPES = {"real_imag": REAL_IMAG_RESULT_TYPE, "amp_phase": AMP_PHASE_RESULT_TYPE}
RESULT_FIELDS = {"real_imag": ("real", "imag"), "amp_phase": ("amplitude", "phase")}
SPARK_OUTPUT_FORMATS = tuple(RESULT_TYPES)
INPUT_SCHEMA_DDL = "diffraction array<float>, scale double, x double, y double"
DIFFRACTION_COLUMN = "diffraction"
SCALE_COLUMN = "scale"
MODEL_INPUT_COLUMNS = (DIFFRACTION_COLUMN, SCALE_COLUMN)
RESULT_COLUMN = "prediction"
INDEX_COLUMN = "index"
ARROW_BATCH_CONF = "spark.sql.execution.arrow.maxRecordsPerBatch"

_ROW_CHUNK = 8192  # rows per Arrow record batch when shipping numpy input (keeps int32 list offsets small)
_REFUSED_PARAMS = {
    "stitch": "stitching needs all patterns of a scan at once; collect the patches (with `x`/`y`) and call "
    "mlflow_ptycho_flavor.stitching.stitch_patches on the driver",
    "normalize": "a dataset factor would be computed per Arrow batch; pass normalize='dataset' to "
    "spark_predict/run_batch_inference (computed on the driver) or a `scale` column",
}


# ----------------------------------------------------------------------------------------------------------------
# Session and UDF
# ----------------------------------------------------------------------------------------------------------------


def local_spark_session(
    master: str = "local[2]",
    *,
    app_name: str = "ptycho-torch-batch",
    tmp_dir: str | os.PathLike | None = None,
    conf: dict[str, Any] | None = None,
    log_level: str = "WARN",
    python: str | None = None,
):
    """Start (or return the running) local SparkSession set up for ``ptycho_torch`` UDFs.

    Sets ``PYSPARK_PYTHON`` to ``python`` (default ``sys.executable``) so that the Python workers run this
    interpreter, with this package, torch and mlflow (``env_manager="local"``); binds to 127.0.0.1, disables the
    UI and enables Arrow. ``tmp_dir`` holds ``spark.local.dir`` and ``spark.sql.warehouse.dir``. ``conf`` adds or
    overrides settings. If a session already runs in this process it is returned as it is (Spark allows one).
    """
    os.environ["PYSPARK_PYTHON"] = python or sys.executable
    from pyspark.sql import SparkSession

    settings: dict[str, Any] = {
        "spark.ui.enabled": "false",
        "spark.ui.showConsoleProgress": "false",
        "spark.driver.host": "127.0.0.1",
        "spark.driver.bindAddress": "127.0.0.1",
        "spark.sql.execution.arrow.pyspark.enabled": "true",
        "spark.sql.shuffle.partitions": "8",
    }
    if tmp_dir is not None:
        root = Path(tmp_dir)
        settings["spark.local.dir"] = str(root / "spark-local")
        settings["spark.sql.warehouse.dir"] = str(root / "spark-warehouse")
        (root / "spark-local").mkdir(parents=True, exist_ok=True)
    settings.update(conf or {})
    builder = SparkSession.builder.master(master).appName(app_name)
    for key, value in settings.items():
        builder = builder.config(key, str(value))
    spark = builder.getOrCreate()
    running = spark.conf.get("spark.master")
    if running != master:
        _logger.warning(
            "A SparkSession with master %s was already running; it is returned instead of %s", running, master
        )
    spark.sparkContext.setLogLevel(log_level)
    return spark


def _check_format(output_format: str) -> str:
    if output_format not in RESULT_TYPES:
        hint = ""
        if output_format in ("complex", "auto"):
            hint = " (complex numbers cannot cross Arrow; 'real_imag' is lossless)"
        raise PredictionInputError(
            f"`output_format`={output_format!r} is not one of {SPARK_OUTPUT_FORMATS} on Spark{hint}"
        )
    return output_format


def _check_batch_size(batch_size: Any) -> int | None:
    if batch_size is None:
        return None
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise PredictionInputError(f"`batch_size` must be a positive integer or None, got {batch_size!r}")
    return int(batch_size)


def _udf_params(output_format: str, batch_size: int | None, params: dict[str, Any] | None) -> dict[str, Any]:
    merged = dict(params or {})
    for key, why in _REFUSED_PARAMS.items():
        value = merged.get(key)
        if value not in (None, False, "none"):
            raise PredictionInputError(f"param `{key}`={value!r} cannot be used on Spark: {why}")
    given = merged.get("output_format")
    if given not in (None, output_format):
        raise PredictionInputError(
            f"params['output_format']={given!r} contradicts output_format={output_format!r}; pass it once"
        )
    merged["output_format"] = output_format
    if batch_size is not None:
        merged["batch_size"] = batch_size
    return merged


def spark_udf(
    spark,
    model_uri: str | os.PathLike,
    *,
    output_format: str = "real_imag",
    env_manager: str = "local",
    params: dict[str, Any] | None = None,
    batch_size: int | None = None,
    **kwargs: Any,
):
    """``mlflow.pyfunc.spark_udf`` for a ``ptycho_torch`` model, with the matching ``result_type``.

    Apply it to :func:`model_input` (``struct(diffraction[, scale])``) of a DataFrame in the module's input
    layout: ``df.withColumn("prediction", udf(model_input(df)))``.

    Args:
        spark: the SparkSession.
        model_uri: any MLflow model URI (``models:/name@alias``, ``runs:/...``, a local directory).
        output_format: ``"real_imag"`` (lossless, default) or ``"amp_phase"``; picks the struct fields.
        env_manager: ``"local"`` (workers use the driver's environment: this package must be installed on
            every executor) or ``"virtualenv"``/``"uv"``/``"conda"`` (MLflow rebuilds the model's environment
            on each executor and scores through a local model server).
        params: other pyfunc params (``input_kind``, ...); ``stitch`` and ``normalize`` are refused.
        batch_size: the network's chunk size inside one ``predict`` call (the ``batch_size`` param); the
            Arrow batch itself is bounded by ``spark.sql.execution.arrow.maxRecordsPerBatch``.
        **kwargs: passed to ``mlflow.pyfunc.spark_udf`` (``model_config``, ``extra_env``, ...).
    """
    if "result_type" in kwargs:
        raise TypeError("`result_type` is chosen from `output_format`; do not pass it")
    fmt = _check_format(output_format)
    import mlflow.pyfunc

    return mlflow.pyfunc.spark_udf(
        spark,
        os.fspath(model_uri),
        result_type=RESULT_TYPES[fmt],
        env_manager=env_manager,
        params=_udf_params(fmt, _check_batch_size(batch_size), params),
        **kwargs,
    )


def model_input(df):
    """The UDF argument for a DataFrame in the input layout: ``struct(diffraction[, scale])``."""
    from pyspark.sql import functions as F

    return F.struct(*[F.col(name) for name in MODEL_INPUT_COLUMNS if name in df.columns])


def _validate_frame(df) -> None:
    from pyspark.sql.types import ArrayType, NumericType

    fields = {field.name: field.dataType for field in df.schema.fields}
    dtype = fields.get(DIFFRACTION_COLUMN)
    if dtype is None:
        raise PredictionInputError(
            f"the DataFrame needs a `{DIFFRACTION_COLUMN}` column (array<float>, one flattened N*N or C*N*N "
            f"pattern per row); got columns {list(fields)[:8]}"
        )
    if not (isinstance(dtype, ArrayType) and isinstance(dtype.elementType, NumericType)):
        raise PredictionInputError(
            f"column `{DIFFRACTION_COLUMN}` has type {dtype.simpleString()}; expected array<float> (one flattened "
            "pattern per row)"
        )
    for name in (SCALE_COLUMN, "x", "y"):
        if name in fields and not isinstance(fields[name], NumericType):
            raise PredictionInputError(f"column `{name}` has type {fields[name].simpleString()}; expected a number")


def _model_geometry(model_uri: str) -> tuple[int, int] | None:
    """(N, C) from the MLmodel's ``ptycho_torch`` section, or None when it cannot be read."""
    try:
        from mlflow.models import Model

        section = Model.load(os.fspath(model_uri)).flavors.get("ptycho_torch") or {}
        return int(section["N"]), int(section["C"])
    except Exception:  # noqa: BLE001 - only an early, friendlier check; the UDF validates anyway
        return None


def _dataset_factor(amplitudes: np.ndarray, input_kind: str) -> float:
    from mlflow_ptycho_flavor.model.inference import dataset_normalization_factor, prepare_diffraction

    n, c = amplitudes.shape[-1], amplitudes.shape[1]
    return dataset_normalization_factor(prepare_diffraction(amplitudes, N=n, channels=c, input_kind=input_kind))


# ----------------------------------------------------------------------------------------------------------------
# numpy <-> Arrow <-> Spark
# ----------------------------------------------------------------------------------------------------------------


def _as_patterns(diffraction: Any) -> np.ndarray:
    """float32 (M, C, N, N) from (M, N, N) / (M, C, N, N) numpy input (no model needed)."""
    array = np.asarray(diffraction)
    if array.dtype.kind != "f":
        raise PredictionInputError(
            f"`diffraction` has dtype {array.dtype}; expected float amplitudes (M, N, N) or (M, C, N, N)"
        )
    if array.ndim == 3:
        array = array[:, None]
    if array.ndim != 4 or array.shape[-1] != array.shape[-2]:
        raise PredictionInputError(
            f"`diffraction` must be (M, N, N) or (M, C, N, N) with square patterns, got shape {array.shape}"
        )
    return np.ascontiguousarray(array, dtype=np.float32)


def _scale_column(scale: Any, rows: int) -> np.ndarray | None:
    if scale is None:
        return None
    values = np.asarray(scale, dtype=np.float64)
    if values.size == 1:
        return np.full(rows, float(values.reshape(())))
    if values.size != rows:
        raise PredictionInputError(f"`scale` has {values.size} values; expected a scalar or one per pattern ({rows})")
    return values.reshape(rows)


def _arrow_table(patterns: np.ndarray, columns: dict[str, np.ndarray]):
    """pyarrow Table ``index, diffraction list<float>, <columns...>`` in record batches of ``_ROW_CHUNK`` rows."""
    import pyarrow as pa

    rows = patterns.shape[0]
    flat = patterns.reshape(rows, -1)
    width = flat.shape[1]
    batches = []
    for start in range(0, max(rows, 1), _ROW_CHUNK):
        stop = min(start + _ROW_CHUNK, rows)
        offsets = pa.array(np.arange(stop - start + 1, dtype=np.int32) * width)
        arrays = {
            INDEX_COLUMN: pa.array(np.arange(start, stop, dtype=np.int64)),
            DIFFRACTION_COLUMN: pa.ListArray.from_arrays(offsets, pa.array(flat[start:stop].ravel())),
        }
        arrays.update({name: pa.array(values[start:stop]) for name, values in columns.items()})
        batches.append(pa.RecordBatch.from_pydict(arrays))
    return pa.Table.from_batches(batches)


def _frame_from_arrays(spark, patterns: np.ndarray, columns: dict[str, np.ndarray], num_partitions: int | None):
    df = spark.createDataFrame(_arrow_table(patterns, columns))
    if num_partitions:
        df = df.repartition(int(num_partitions))
    return df


def _components(table, fields: tuple[str, ...], rows: int, width: int) -> list[np.ndarray]:
    import pyarrow.compute as pc

    out = []
    for name in fields:
        column = table.column(name).combine_chunks()
        lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False)
        if column.null_count or lengths.size != rows or (lengths != width).any():
            raise PredictionInputError(f"the UDF returned `{name}` arrays of unexpected length (expected {width})")
        out.append(column.flatten().to_numpy(zero_copy_only=False).reshape(rows, width))
    return out


def _to_complex(parts: list[np.ndarray], output_format: str) -> np.ndarray:
    first, second = parts
    if output_format == "real_imag":
        result = np.empty(first.shape, dtype=np.complex64)
        result.real, result.imag = first, second  # exact: the same float32 halves
        return result
    return (first.astype(np.float64) * np.exp(1j * second.astype(np.float64))).astype(np.complex64)


class _ConfOverride:
    """Set a Spark SQL conf for a block and restore the previous value (or unset it)."""

    def __init__(self, spark, key: str, value: Any) -> None:
        self.spark, self.key, self.value, self.previous = spark, key, value, None

    def __enter__(self):
        if self.value is not None:
            self.previous = self.spark.conf.get(self.key, None)
            self.spark.conf.set(self.key, str(self.value))
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.value is None:
            return
        if self.previous is None:
            self.spark.conf.unset(self.key)
        else:
            self.spark.conf.set(self.key, self.previous)


def spark_predict(
    spark,
    model_uri: str | os.PathLike,
    diffraction: Any,
    *,
    scale: Any = None,
    output_format: str = "real_imag",
    batch_size: int | None = None,
    normalize: str = "none",
    env_manager: str = "local",
    params: dict[str, Any] | None = None,
    num_partitions: int | None = None,
    result_column: str = RESULT_COLUMN,
    **udf_kwargs: Any,
):
    """Run a ``ptycho_torch`` model over diffraction patterns with a Spark UDF.

    Args:
        spark: the SparkSession (e.g. :func:`local_spark_session`).
        model_uri: any MLflow model URI.
        diffraction: a numpy array ``(M, N, N)`` / ``(M, C, N, N)`` of float amplitudes, or a Spark DataFrame in
            the module's input layout.
        scale: numpy input: a scalar or ``(M,)`` per-pattern factor; DataFrame input: a scalar added as the
            ``scale`` column (a per-row factor belongs in the DataFrame).
        output_format: ``"real_imag"`` (lossless) or ``"amp_phase"``: the struct carried through Arrow.
        batch_size: bounds one pyfunc batch (sets ``spark.sql.execution.arrow.maxRecordsPerBatch``) and the
            network chunk. For numpy input the conf is restored afterwards; for DataFrame input it stays set on
            the session, because the returned DataFrame is evaluated lazily.
        normalize: ``"none"`` or ``"dataset"`` (numpy input only: upstream's factor over the whole array,
            computed here on the driver and sent as the ``scale`` column, so it does not depend on batching).
        env_manager: see :func:`spark_udf`.
        params: other pyfunc params (``input_kind``); ``stitch``/``normalize`` are refused.
        num_partitions: repartition the input first (default: as it comes; numpy input gets Spark's default
            parallelism).
        result_column: name of the struct column added to a DataFrame.
        **udf_kwargs: passed to ``mlflow.pyfunc.spark_udf`` (``model_config``, ``extra_env``).

    Returns:
        numpy input: complex64 ``(M, C, N, N)`` in input order - bit-identical to in-process ``predict`` with
        ``real_imag`` (rows carry an ``index`` column and are put back in place, since Spark does not keep
        order). ``amp_phase`` rebuilds ``amplitude * exp(1j * phase)`` (float32 rounding).
        DataFrame input: the DataFrame with ``result_column`` added (struct of two ``array<float>``).
    """
    fmt = _check_format(output_format)
    size = _check_batch_size(batch_size)
    if normalize not in ("none", "dataset"):
        raise PredictionInputError(f"`normalize`={normalize!r} is not one of ('none', 'dataset')")
    from pyspark.sql import DataFrame

    if isinstance(diffraction, DataFrame):
        df = diffraction
        if normalize != "none":
            raise PredictionInputError(
                "normalize='dataset' needs the whole input on the driver; for a DataFrame compute the factor "
                "(mlflow_ptycho_flavor.inference.dataset_normalization_factor) and pass it as `scale`"
            )
        if scale is not None:
            if SCALE_COLUMN in df.columns:
                raise PredictionInputError("the DataFrame already has a `scale` column; do not pass `scale` too")
            if np.size(scale) != 1:
                raise PredictionInputError(
                    "for DataFrame input `scale` must be a scalar; put per-row factors in a `scale` column"
                )
            from pyspark.sql import functions as F

            df = df.withColumn(SCALE_COLUMN, F.lit(float(np.asarray(scale, dtype=np.float64).reshape(()))))
        _validate_frame(df)
        if result_column in df.columns:
            raise PredictionInputError(
                f"the DataFrame already has a `{result_column}` column; pick another `result_column`"
            )
        if num_partitions:
            df = df.repartition(int(num_partitions))
        if size is not None:
            spark.conf.set(ARROW_BATCH_CONF, str(size))
        udf = spark_udf(
            spark, model_uri, output_format=fmt, env_manager=env_manager, params=params, batch_size=size, **udf_kwargs
        )
        return df.withColumn(result_column, udf(model_input(df)))

    patterns = _as_patterns(diffraction)
    rows, channels, n = patterns.shape[0], patterns.shape[1], patterns.shape[-1]
    geometry = _model_geometry(os.fspath(model_uri))
    if geometry is not None and geometry != (n, channels):
        raise PredictionInputError(
            f"`diffraction` has shape {tuple(patterns.shape)} (C={channels}, N={n}) but the model takes "
            f"C={geometry[1]}, N={geometry[0]}"
        )
    if rows == 0:
        return np.empty((0, channels, n, n), dtype=np.complex64)
    factors = _scale_column(scale, rows)
    if normalize == "dataset":
        if factors is not None:
            raise PredictionInputError("give either `scale` or normalize='dataset', not both")
        input_kind = (params or {}).get("input_kind", "amplitude")
        factors = np.full(rows, _dataset_factor(patterns, input_kind))
    columns = {} if factors is None else {SCALE_COLUMN: factors}
    df = _frame_from_arrays(spark, patterns, columns, num_partitions)
    udf = spark_udf(
        spark, model_uri, output_format=fmt, env_manager=env_manager, params=params, batch_size=size, **udf_kwargs
    )
    fields = RESULT_FIELDS[fmt]
    from pyspark.sql import functions as F

    scored = df.withColumn(result_column, udf(model_input(df))).select(
        INDEX_COLUMN, *[F.col(f"{result_column}.{name}").alias(name) for name in fields]
    )
    with _ConfOverride(spark, ARROW_BATCH_CONF, size):
        table = scored.toArrow()
    index = table.column(INDEX_COLUMN).to_numpy()
    order = np.argsort(index, kind="stable")
    if not np.array_equal(index[order], np.arange(rows)):
        raise PredictionInputError(f"Spark returned {index.size} rows for {rows} patterns (rows lost or repeated)")
    parts = [part[order] for part in _components(table, fields, rows, channels * n * n)]
    return _to_complex(parts, fmt).reshape(rows, channels, n, n)
