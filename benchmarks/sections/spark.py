"""Section 8 (``--spark``): throughput of Spark batch inference (``spark_predict``) against in-process predict.

Where the Spark overhead goes (each is a column of its own):

* ``session start``: starting the SparkContext, plus launching the JVM for the first session of the process
  (``JVM launched``; tens of seconds on a busy machine, below a second for later sessions).
* ``cold``: the first ``spark_predict``: each Python worker (one per core of ``local[k]``) is forked and imports
  pyspark, pandas, mlflow and torch, then every task loads the model (``spark_udf`` with ``env_manager="local"``
  calls ``mlflow.pyfunc.load_model`` once per task, i.e. per partition).
* ``warm``: a second call: workers are reused (``spark.python.worker.reuse``), so the imports are gone, but the
  model is still loaded once per task, and every pattern crosses the JVM twice as Arrow.
* CPU contention: torch in each worker uses all cores by default, so ``local[2]`` runs 2 workers x N threads; on
  one small machine Spark adds processes, not compute. It pays off when executors sit on other machines.
"""

from __future__ import annotations

import importlib.util
import tempfile
import time
from dataclasses import dataclass

import numpy as np

from benchmarks.config import Context
from benchmarks.records import RecordTable, SectionResult, column

__all__ = ["KEY", "TITLE", "SparkRun", "benchmark_spark", "run"]

KEY = "spark"
TITLE = "8. Spark: spark_predict vs in-process predict"


@dataclass(frozen=True)
class SparkRun:
    """One backend over the same patterns: the warm run, the cold (first) run, and the set-up costs."""

    backend: str = column("backend")
    n_patterns: int = column("patterns")
    warm_seconds: float = column("warm", "time")
    patterns_per_s: float = column("patterns/s (warm)", "g")
    cold_seconds: float = column("cold (first call)", "time")
    cold_patterns_per_s: float = column("patterns/s (cold)", "g")
    load_seconds: float | None = column("model load", "time")
    session_start_seconds: float | None = column("session start", "time")
    jvm_launched: bool | None = column("JVM launched")
    partitions: int | None = column("partitions")
    max_abs_diff: float | None = column("max abs diff vs in-process", "g")


def benchmark_spark(model_uri: str, n_patterns: int, masters: tuple[str, ...] = ("local[1]", "local[2]"), *,
                    batch_size: int | None = None, seed: int = 0) -> list[SparkRun]:
    """In-process pyfunc ``predict``, then ``spark_predict`` on each local master, over the same patterns.

    Starts (and stops) one local SparkSession per master, so no other session may run in this process.
    """
    import mlflow.pyfunc
    from mlflow.models import Model
    from pyspark import SparkContext
    from pyspark.sql import SparkSession

    from mlflow_ptycho_flavor import spark_predict
    from mlflow_ptycho_flavor.flavor.spark import local_spark_session

    if SparkSession.getActiveSession() is not None:
        raise RuntimeError("stop the running SparkSession first: the benchmark starts one per master")
    section = Model.load(model_uri).flavors["ptycho_torch"]
    n, c = int(section["N"]), int(section["C"])
    amplitudes = np.random.default_rng(seed).random((n_patterns, n, n) if c == 1 else (n_patterns, c, n, n),
                                                    dtype=np.float32)
    params = {"batch_size": batch_size} if batch_size else None
    started = time.perf_counter()
    model = mlflow.pyfunc.load_model(model_uri)
    load_seconds = time.perf_counter() - started
    started = time.perf_counter()
    reference = model.predict(amplitudes, params=params)
    cold = time.perf_counter() - started
    started = time.perf_counter()
    model.predict(amplitudes, params=params)
    warm = time.perf_counter() - started
    runs = [SparkRun("pyfunc in-process", n_patterns, warm, n_patterns / warm, cold, n_patterns / cold, load_seconds,
                     None, None, None, None)]
    for master in masters:
        with tempfile.TemporaryDirectory(prefix="bench-spark-") as tmp:
            jvm_launched = SparkContext._gateway is None  # later sessions reuse this process's JVM
            started = time.perf_counter()
            spark = local_spark_session(master, tmp_dir=tmp, log_level="ERROR")
            session_seconds = time.perf_counter() - started
            try:
                started = time.perf_counter()
                spark_predict(spark, model_uri, amplitudes, batch_size=batch_size)
                cold = time.perf_counter() - started
                started = time.perf_counter()
                result = spark_predict(spark, model_uri, amplitudes, batch_size=batch_size)
                warm = time.perf_counter() - started
                partitions = spark.sparkContext.defaultParallelism
            finally:
                spark.stop()
        runs.append(SparkRun(f"spark {master}", n_patterns, warm, n_patterns / warm, cold, n_patterns / cold, None,
                             session_seconds, jvm_launched, partitions,
                             float(np.abs(result - reference.reshape(result.shape)).max())))
    return runs


def run(ctx: Context) -> SectionResult:
    if importlib.util.find_spec("pyspark") is None:
        return SectionResult(KEY, TITLE, notes=["pyspark is not installed (`pip install mlflow-ptycho-flavor[spark]`): "
                                                "skipped."])
    model_set = ctx.models[ctx.main_gridsize]
    runs = benchmark_spark(str(model_set.ours_dir), ctx.cfg.spark_patterns)
    intro = (f"Our N={model_set.N} gridsize-{model_set.gridsize} model over {ctx.cfg.spark_patterns} seeded patterns, "
             "run in this process after any other section: in-process `mlflow.pyfunc` predict, then `spark_predict` "
             "on `local[1]` and `local[2]` (one SparkSession each). No target is set for Spark: on one machine "
             "in-process predict is the upper bound; the columns say where Spark's fixed costs go (JVM, worker "
             "imports, one model load per task, Arrow copies).")
    return SectionResult(KEY, TITLE, intro, [RecordTable(SparkRun, runs)])
