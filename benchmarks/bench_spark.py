"""Throughput of Spark batch inference (``mlflow_ptycho_flavor.flavor.spark``) against in-process pyfunc predict.

:func:`benchmark_spark` returns one row (a dict) per backend: in-process ``pyfunc.predict``, then
``spark_predict`` on each local master. Every Spark row is checked against the in-process result
(``max_abs_diff``). Run ``python benchmarks/bench_spark.py [--model-uri URI] [--n-patterns 512]``.

Where the Spark overhead goes (measured separately in the rows):

* ``session_start_s``: starting the SparkContext, plus launching the JVM for the first session of the process
  (``jvm_launched``; tens of seconds on a busy machine, below a second for later sessions).
* ``cold_s`` - the first ``spark_predict``: each Python worker (one per core of ``local[k]``) is forked and
  imports pyspark, pandas, mlflow and torch, then every task loads the model (``spark_udf`` with
  ``env_manager="local"`` calls ``mlflow.pyfunc.load_model`` once per task, i.e. per partition).
* ``warm_s`` - a second call: workers are reused (``spark.python.worker.reuse``), so imports are gone, but the
  model is still loaded once per task, and every pattern crosses the JVM twice as Arrow (numpy -> JVM ->
  worker in, worker -> JVM -> driver out; 2 x 4 bytes per float each way, plus the copies MLflow makes
  when it converts the pandas result into the struct column).
* CPU contention: torch in each worker uses all cores by default, so ``local[2]`` runs 2 workers x N threads;
  on a small machine Spark adds processes, not compute. Spark pays off when executors sit on other
  machines (or GPUs); on one box in-process ``predict`` is the upper bound.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np


def _make_model(directory: Path, n: int = 64, n_filters_scale: int = 1) -> str:
    import torch

    from mlflow_ptycho_flavor.flavor import save_model
    from mlflow_ptycho_flavor.network import NetworkConfig, PtychoPINNNetwork

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        network = PtychoPINNNetwork(NetworkConfig(N=n, n_filters_scale=n_filters_scale)).eval()
    path = directory / "model"
    save_model(network, path)
    return str(path)


def _row(backend: str, n_patterns: int, seconds: float, **extra: Any) -> dict[str, Any]:
    return {
        "backend": backend,
        "n_patterns": n_patterns,
        "seconds": round(seconds, 3),
        "patterns_per_s": round(n_patterns / seconds, 1) if seconds > 0 else math.inf,
        **extra,
    }


def benchmark_spark(
    model_uri: str,
    n_patterns: int = 512,
    masters: tuple[str, ...] = ("local[1]", "local[2]"),
    *,
    batch_size: int | None = None,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Patterns/s of in-process pyfunc ``predict`` and of ``spark_predict`` on each local master.

    Starts (and stops) one local SparkSession per master, so no other session may run in this process.
    Rows: ``backend``, ``n_patterns``, ``seconds`` / ``patterns_per_s`` (the warm run), and for Spark
    ``session_start_s``, ``cold_s`` (first call: worker start, imports, model load), ``cold_patterns_per_s``,
    ``partitions`` and ``max_abs_diff`` against the in-process result; for pyfunc ``load_s``.
    """
    import mlflow.pyfunc
    from mlflow.models import Model
    from pyspark.sql import SparkSession

    from mlflow_ptycho_flavor.flavor.spark import local_spark_session, spark_predict

    if SparkSession.getActiveSession() is not None:
        raise RuntimeError("stop the running SparkSession first: the benchmark starts one per master")
    section = Model.load(model_uri).flavors["ptycho_torch"]
    n, c = int(section["N"]), int(section["C"])
    shape = (n_patterns, n, n) if c == 1 else (n_patterns, c, n, n)
    amplitudes = np.random.default_rng(seed).random(shape, dtype=np.float32)

    rows = []
    started = time.perf_counter()
    model = mlflow.pyfunc.load_model(model_uri)
    load_s = time.perf_counter() - started
    params = {"batch_size": batch_size} if batch_size else None
    started = time.perf_counter()
    reference = model.predict(amplitudes, params=params)
    cold_s = time.perf_counter() - started
    started = time.perf_counter()
    model.predict(amplitudes, params=params)
    rows.append(_row("pyfunc in-process", n_patterns, time.perf_counter() - started, load_s=round(load_s, 3),
                     cold_s=round(cold_s, 3)))

    for master in masters:
        with tempfile.TemporaryDirectory(prefix="bench-spark-") as tmp:
            from pyspark import SparkContext

            jvm_launched = SparkContext._gateway is None  # later sessions reuse this process's JVM
            started = time.perf_counter()
            spark = local_spark_session(master, tmp_dir=tmp, log_level="ERROR")
            session_s = time.perf_counter() - started
            try:
                started = time.perf_counter()
                spark_predict(spark, model_uri, amplitudes, batch_size=batch_size)
                cold_s = time.perf_counter() - started
                started = time.perf_counter()
                result = spark_predict(spark, model_uri, amplitudes, batch_size=batch_size)
                warm_s = time.perf_counter() - started
                partitions = spark.sparkContext.defaultParallelism
            finally:
                spark.stop()
        rows.append(
            _row(
                f"spark {master}",
                n_patterns,
                warm_s,
                session_start_s=round(session_s, 3),
                jvm_launched=jvm_launched,
                cold_s=round(cold_s, 3),
                cold_patterns_per_s=round(n_patterns / cold_s, 1),
                partitions=partitions,
                max_abs_diff=float(np.abs(result - reference.reshape(result.shape)).max()),
            )
        )
    return rows


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-uri", help="model to run (default: a fresh N=64, n_filters_scale=1 network)")
    parser.add_argument("--n-patterns", type=int, default=512)
    parser.add_argument("--masters", nargs="+", default=["local[1]", "local[2]"])
    parser.add_argument("--batch-size", type=int, default=None)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-spark-model-") as tmp:
        uri = args.model_uri or _make_model(Path(tmp))
        rows = benchmark_spark(uri, args.n_patterns, tuple(args.masters), batch_size=args.batch_size)
    for row in rows:
        print(json.dumps(row))
    return rows


if __name__ == "__main__":
    main()
