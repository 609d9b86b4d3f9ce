"""The file-to-file Spark batch job behind ``ptycho-flavor spark-predict``: NPZ or Parquet in, Parquet out.

Built on :func:`mlflow_ptycho_flavor.flavor.spark.spark_predict` (the UDF layer); run it locally
(``--master 'local[*]'``) or under ``spark-submit`` (the session it configured is used).
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from mlflow_ptycho_flavor.errors import PredictionInputError
from mlflow_ptycho_flavor.flavor.spark import (
    ARROW_BATCH_CONF,
    DIFFRACTION_COLUMN,
    RESULT_COLUMN,
    RESULT_FIELDS,
    SCALE_COLUMN,
    _check_batch_size,
    _check_format,
    _ConfOverride,
    _dataset_factor,
    _frame_from_arrays,
    _model_geometry,
    local_spark_session,
    _validate_frame,
    spark_predict,
)

__all__ = ["run_batch_inference"]


def _session_for_run(master: str | None, conf: dict[str, Any] | None):
    """The session spark-submit configured (driver launched by it: ``PYSPARK_GATEWAY_PORT`` is set) when no
    master is asked for, else a :func:`local_spark_session`."""
    if master is None and "PYSPARK_GATEWAY_PORT" in os.environ:
        from pyspark.sql import SparkSession

        builder = SparkSession.builder.appName("ptycho-torch-batch")
        for key, value in (conf or {}).items():
            builder = builder.config(key, str(value))
        return builder.getOrCreate()
    return local_spark_session(master or "local[*]", conf=conf)


# ----------------------------------------------------------------------------------------------------------------
# Public entry points
# ----------------------------------------------------------------------------------------------------------------


def run_batch_inference(
    model_uri: str | os.PathLike,
    input_path: str | os.PathLike,
    output_path: str | os.PathLike,
    *,
    master: str | None = None,
    output_format: str = "real_imag",
    batch_size: int | None = None,
    normalize: str = "none",
    input_kind: str = "amplitude",
    env_manager: str = "local",
    overwrite: bool = False,
    spark=None,
    spark_conf: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Batch inference from an NPZ or Parquet input to a Parquet output, on a (local) Spark session.

    Input: an upstream NPZ (``diff3d`` (M, N, N), ``xcoords``, ``ycoords``; read with
    :func:`mlflow_ptycho_flavor.data.load_npz`, loaded on the driver - for data larger than the driver's memory
    write Parquet in the input layout), or a Parquet file/directory in the module's input layout.

    Output (a Parquet directory, as Spark writes it): every input column but ``diffraction`` (for NPZ input:
    ``index`` = pattern number in the NPZ, ``x``, ``y``, ``scan_index``) plus one flat float32 ``C*N*N`` array
    column per output component (``real``/``imag`` or ``amplitude``/``phase``). Row order follows the input
    partitions; sort by ``index`` when order matters.

    Args:
        master: Spark master of the session started here. ``None`` (default): the session ``spark-submit``
            configured when the script runs under it (``--master``, ``--conf`` of the submission), else
            ``local[*]``. Ignored when ``spark`` is given or a session already runs in this process (that
            session is used and left running).
        batch_size: rows per Arrow batch / pyfunc call (``spark.sql.execution.arrow.maxRecordsPerBatch``) and
            network chunk; restored afterwards.
        normalize: ``"dataset"`` computes upstream's factor over the whole NPZ on the driver (NPZ input only).
        input_kind: ``"amplitude"``, ``"counts"`` (photon counts, whole numbers, as ptychodus stores them) or
            ``"intensity"`` (any non-negative intensities); the last two are square-rooted in the UDF.
        overwrite: replace an existing output.
        spark_conf: extra settings for a session started here.

    Returns:
        Stats: ``n_patterns``, ``N``, ``C``, ``partitions``, ``seconds`` (total), ``inference_seconds`` (scoring
        and writing), ``patterns_per_s`` (over ``inference_seconds``), ``master``, ``columns``, paths, options.
    """
    started = time.perf_counter()
    fmt = _check_format(output_format)
    size = _check_batch_size(batch_size)
    source, target = Path(input_path), Path(output_path)
    if not source.exists():
        raise FileNotFoundError(f"input {source} does not exist")
    suffix = source.suffix.lower()
    kind = "npz" if suffix == ".npz" else "parquet" if suffix in (".parquet", ".pq") or source.is_dir() else None
    if kind is None:
        raise PredictionInputError(f"input {source} must be an .npz (upstream schema) or a Parquet file/directory")
    if target.exists() and not overwrite:
        raise FileExistsError(f"output {target} exists; pass overwrite=True (--overwrite) to replace it")
    if normalize not in ("none", "dataset"):
        raise PredictionInputError(f"`normalize`={normalize!r} is not one of ('none', 'dataset')")
    if normalize == "dataset" and kind != "npz":
        raise PredictionInputError(
            "normalize='dataset' is available for NPZ input; for Parquet put the factor in a `scale` column"
        )
    geometry = _model_geometry(os.fspath(model_uri))

    dataset = None
    if kind == "npz":
        from mlflow_ptycho_flavor.sim.dataset import load_npz

        dataset = load_npz(source)
        if geometry is not None and geometry != (dataset.N, 1):
            n_model, c_model = geometry
            hint = " (group neighbouring patterns into C*N*N rows and write Parquet)" if c_model > 1 else ""
            raise PredictionInputError(
                f"{source} holds single {dataset.N}x{dataset.N} patterns but the model takes C={c_model}, "
                f"N={n_model}{hint}"
            )

    from pyspark.sql import SparkSession
    from pyspark.sql import functions as F

    own = spark is None and SparkSession.getActiveSession() is None
    if spark is None:
        spark = SparkSession.getActiveSession() or _session_for_run(master, spark_conf)
    try:
        if dataset is not None:
            patterns = dataset.diff3d[:, None]
            columns: dict[str, np.ndarray] = {
                "x": dataset.xcoords,
                "y": dataset.ycoords,
                "scan_index": dataset.scan_index,
            }
            if normalize == "dataset":
                columns[SCALE_COLUMN] = np.full(dataset.n_patterns, _dataset_factor(patterns, input_kind))
            df = _frame_from_arrays(spark, patterns, columns, None)
            n_patterns = dataset.n_patterns
            n, c = dataset.N, 1
        else:
            df = spark.read.parquet(str(source))
            _validate_frame(df)
            n_patterns = df.count()
            n, c = geometry if geometry is not None else (None, None)
        fields = RESULT_FIELDS[fmt]
        clash = sorted(set(fields) & set(df.columns))
        if clash:
            raise PredictionInputError(f"input columns {clash} would collide with the output columns; rename them")
        inference_started = time.perf_counter()
        with _ConfOverride(spark, ARROW_BATCH_CONF, size):
            scored = spark_predict(
                spark,
                model_uri,
                df,
                output_format=fmt,
                batch_size=size,
                env_manager=env_manager,
                params={"input_kind": input_kind},
            )
            keep = [name for name in df.columns if name != DIFFRACTION_COLUMN]
            result = scored.select(*keep, *[F.col(f"{RESULT_COLUMN}.{name}").alias(name) for name in fields])
            result.write.mode("overwrite" if overwrite else "errorifexists").parquet(str(target))
        inference_seconds = time.perf_counter() - inference_started
        stats = {
            "input": str(source),
            "input_format": kind,
            "output": str(target),
            "model_uri": os.fspath(model_uri),
            "n_patterns": int(n_patterns),
            "N": n,
            "C": c,
            "output_format": fmt,
            "batch_size": size,
            "normalize": normalize,
            "input_kind": input_kind,
            "master": spark.conf.get("spark.master"),
            "partitions": df.rdd.getNumPartitions(),
            "columns": result.columns,
            "inference_seconds": round(inference_seconds, 3),
            "patterns_per_s": round(n_patterns / inference_seconds, 1) if inference_seconds > 0 else math.inf,
        }
    finally:
        if own:
            spark.stop()
    stats["seconds"] = round(time.perf_counter() - started, 3)
    return stats
