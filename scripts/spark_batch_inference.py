#!/usr/bin/env python
"""Batch inference of a ``ptycho_torch`` model on Spark: NPZ or Parquet in, Parquet out.

Examples::

    python scripts/spark_batch_inference.py --model-uri models:/ptycho@champion \\
        --input scan.npz --output recon.parquet --master 'local[*]' --batch-size 512
    spark-submit scripts/spark_batch_inference.py --model-uri models:/ptycho@champion \\
        --input s3a://bucket/patterns.parquet --output s3a://bucket/recon.parquet --env-manager virtualenv

Input: an upstream NPZ (``diff3d``, ``xcoords``, ``ycoords``, ``probeGuess``; loaded on the driver) or Parquet in
the layout of :mod:`mlflow_ptycho_flavor.spark` (``diffraction`` array<float> of N*N or C*N*N, optional
``scale``, ``x``, ``y``). Output: a Parquet directory with the input's other columns (``index``, ``x``, ``y``
for NPZ) and one flat float32 array column per output component. Prints the run's stats as JSON.
The logic is :func:`mlflow_ptycho_flavor.spark.run_batch_inference`.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="spark_batch_inference",
        description="Batch inference of a ptycho_torch MLflow model on Spark (NPZ/Parquet in, Parquet out).",
    )
    parser.add_argument(
        "--model-uri", required=True, help="MLflow model URI (models:/name@alias, runs:/..., a directory)"
    )
    parser.add_argument("--input", required=True, help="data.npz (upstream schema) or data.parquet (documented layout)")
    parser.add_argument("--output", required=True, help="output Parquet directory")
    parser.add_argument(
        "--master",
        default=None,
        help="Spark master of the session started here, e.g. 'local[4]' (default: the master spark-submit was "
        "given when run under it, else local[*])",
    )
    parser.add_argument("--output-format", default="real_imag", choices=("real_imag", "amp_phase"),
                        help="result columns: real/imag (lossless, default) or amplitude/phase")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="rows per pyfunc call (spark.sql.execution.arrow.maxRecordsPerBatch) and network chunk")
    parser.add_argument("--normalize", default="none", choices=("none", "dataset"),
                        help="dataset: upstream's normalization factor over the whole NPZ (computed on the driver)")
    parser.add_argument("--input-kind", default="amplitude", choices=("amplitude", "intensity"),
                        help="intensity: the patterns are raw counts (square-rooted before the network)")
    parser.add_argument("--env-manager", default="local", choices=("local", "virtualenv", "uv", "conda"),
                        help="local: executors use this Python environment; otherwise MLflow rebuilds the model's")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output")
    return parser


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    if args.batch_size is not None and args.batch_size < 1:
        raise SystemExit("--batch-size must be a positive integer")
    from mlflow_ptycho_flavor.spark import run_batch_inference

    stats = run_batch_inference(
        args.model_uri,
        args.input,
        args.output,
        master=args.master,
        output_format=args.output_format,
        batch_size=args.batch_size,
        normalize=args.normalize,
        input_kind=args.input_kind,
        env_manager=args.env_manager,
        overwrite=args.overwrite,
    )
    json.dump(stats, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return stats


if __name__ == "__main__":
    main()
