"""Bounded loopback load on a real ``mlflow models serve`` process (issue 7.5 figures for the README).

Saves a small seeded ``ptycho_torch`` model under a temporary directory, serves it on 127.0.0.1, sends
``--requests`` POSTs from ``--concurrency`` threads (a fixed mix of valid and invalid payloads), checks every
answer (valid: the exact numbers of in-process prediction; invalid: a 4xx), and prints a markdown table.

    python scripts/load_test.py --requests 2000 --concurrency 8
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

import mlflow_ptycho_flavor  # noqa: F401

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the serving test tooling
from mlflow_ptycho_flavor.flavor import load_model, save_model
from mlflow_ptycho_flavor.network import NetworkConfig, PtychoPINNNetwork
from serving_tools import ModelServer, run_load  # noqa: E402

N = 64


def _cases(expected: np.ndarray, x: np.ndarray):
    def valid(status, body):
        if status != 200:
            return False
        got = np.asarray(body["predictions"]["real"], np.float32) + 1j * np.asarray(body["predictions"]["imag"], np.float32)
        return bool(np.array_equal(got, expected))

    def client_error(status, body):
        return 400 <= status < 500

    return [
        ({"inputs": x.tolist()}, valid),
        ({"inputs": np.zeros((1, 1, 32, 32)).tolist()}, client_error),   # wrong N
        ({"inputs": x.tolist()}, valid),
        ('{"inputs": [[[[NaN]]]]}', client_error),                     # NaN / wrong rank
        ({"inputs": x.tolist(), "params": {"output_format": "complex"}}, client_error),
        ({"unknown": []}, client_error),                                  # MLflow's own parser
        ({"inputs": x.astype(int).tolist()}, client_error),               # integer amplitudes
        ('{"inputs": ', client_error),                                    # malformed JSON
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--batch", type=int, default=1, help="patterns per valid request")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "model"
        save_model(PtychoPINNNetwork(NetworkConfig(N=N, C_model=1, n_filters_scale=1)).eval(), model_dir)
        x = np.random.default_rng(0).uniform(0, 2, (args.batch, 1, N, N)).astype(np.float32)
        expected = load_model(str(model_dir), device="cpu").predict(x)
        with ModelServer(str(model_dir), log_path=Path(tmp) / "server.log") as server:
            report = run_load(server, _cases(expected, x), requests=args.requests, concurrency=args.concurrency,
                              progress=True)
            alive = server.alive()
    row = report.as_row()
    print("| requests | concurrent | valid / invalid | wrong answers | 5xx or dropped | req/s | p50 ms | p99 ms | alive after |")
    print("|---|---|---|---|---|---|---|---|---|")
    ok = report.status_counts.get(200, 0)
    print(f"| {row['requests']} | {row['concurrency']} | {ok} / {row['requests'] - ok} | {row['wrong answers']} | "
          f"{row['unexpected status']} | {row['req/s']} | {row['p50 ms']} | {row['p99 ms']} | {alive} |")
    print(f"status counts: {row['status']}")
    return 0 if report.wrong_answers == 0 and report.unexpected_status == 0 and alive else 1


if __name__ == "__main__":
    sys.exit(main())
