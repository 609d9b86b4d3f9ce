"""The only library imports of the benchmarks that are not public top-level names of ``mlflow_ptycho_flavor``.

Kept in one place while the package moves to its layered layout: the serving test tools (``ModelServer``,
``run_load``), the device-dependent default chunk size and the local Spark session helper.
"""

from __future__ import annotations

from mlflow_ptycho_flavor import serving as serving_tools
from mlflow_ptycho_flavor.inference import default_batch_size
from mlflow_ptycho_flavor.spark import local_spark_session

__all__ = ["serving_tools", "default_batch_size", "local_spark_session"]
