"""Bounded loopback load on a real ``mlflow models serve`` process (figures for the README's reliability section).

Saves a small seeded ``ptycho_torch`` model under a temporary directory, serves it on 127.0.0.1, sends
``--requests`` POSTs from ``--concurrency`` threads (a fixed mix of valid and invalid payloads), checks every
answer, and prints a markdown table:

* valid payloads must get a 200 whose strict-JSON numbers equal in-process prediction bit for bit (same machine,
  same run);
* invalid payloads must get a 4xx whose strict-JSON body carries a message and not MLflow's generic "unexpected
  error" (and, where given, the message must name the field). The classes: wrong N, NaN input, ``complex``
  output, unknown keys, integer amplitudes, malformed JSON, deeply nested JSON (list, dict, records), a huge
  stitching canvas, positions as strings, string DataFrame columns, ``null`` inputs, zero / boolean ``scale``,
  and an input whose output would be NaN.

    python scripts/load_test.py --requests 600 --concurrency 4
"""

from __future__ import annotations

import argparse
import json
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


def _nest(depth: int, leaf: str = "1.0") -> str:
    return "[" * depth + leaf + "]" * depth


def _cases(expected: np.ndarray, x: np.ndarray):
    def valid(status, body):
        if status != 200 or not isinstance(body, dict):
            return False
        got = np.asarray(body["predictions"]["real"], np.float32) + 1j * np.asarray(body["predictions"]["imag"], np.float32)
        return bool(np.array_equal(got, expected))

    def client_error(needle: str = ""):
        def check(status, body):
            if not 400 <= status < 500 or not isinstance(body, dict):  # text: not (strict) JSON
                return False
            message = str(body.get("message", ""))
            return bool(message) and "unexpected error" not in message and needle in message
        return check

    inputs = json.dumps(x.tolist())
    row = json.dumps(x[0].ravel().tolist())
    two = np.concatenate([x, x])
    return [
        ({"inputs": x.tolist()}, valid),
        ({"inputs": np.zeros((1, 1, 32, 32)).tolist()}, client_error("N=64")),     # wrong N
        ('{"inputs": [[[[NaN]]]]}', client_error()),                                # NaN / wrong rank
        ({"inputs": x.tolist(), "params": {"output_format": "complex"}}, client_error("complex")),
        ({"unknown": []}, client_error()),                                          # MLflow's own parser
        ({"inputs": x.astype(int).tolist()}, client_error("dtype")),               # integer amplitudes
        ('{"inputs": ', client_error()),                                            # malformed JSON
        ({"inputs": x.tolist()}, valid),
        (_nest(100_000, ""), client_error("nested too deeply")),                    # RecursionError in json
        ('{"inputs": {"a": ' * 20_000 + "1" + "}" * 20_001, client_error("nested too deeply")),
        ('{"dataframe_records": [{"diffraction": ' + _nest(20_000) + "}]}", client_error("nested too deeply")),
        ({"inputs": {"diffraction": two.tolist(), "positions": [[0, 0], [1e6, 1e6]]}, "params": {"stitch": True}},
         client_error("max_canvas_pixels")),                                        # 1e12-pixel canvas
        ({"inputs": {"diffraction": two.tolist(), "positions": [["a", "b"], ["c", "d"]]},
          "params": {"stitch": True}}, client_error("positions")),
        ({"dataframe_split": {"columns": ["diffraction"], "data": [["abc"]]}}, client_error("`diffraction`")),
        ('{"dataframe_split": {"columns": ["diffraction", "scale"], "data": [[' + row + ', "abc"]]}}',
         client_error("`scale`")),
        ('{"inputs": null}', client_error("None")),
        ('{"inputs": {"diffraction": null}}', client_error("`diffraction`")),
        ('{"inputs": {"diffraction": ' + inputs + ', "scale": [0]}}', client_error("> 0")),
        ('{"inputs": {"diffraction": ' + inputs + ', "scale": true}}', client_error("boolean")),
        ('{"inputs": {"diffraction": ' + inputs + ', "scale": [1e38]}}', client_error("non-finite")),  # NaN out
        ({"inputs": x.tolist()}, valid),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=600)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--batch", type=int, default=1, help="patterns per valid request")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "model"
        save_model(PtychoPINNNetwork(NetworkConfig(N=N, C_model=1, n_filters_scale=1)).eval(), model_dir)
        x = np.random.default_rng(0).uniform(0, 2, (args.batch, 1, N, N)).astype(np.float32)
        expected = load_model(str(model_dir), device="cpu").predict(x)
        cases = _cases(expected, x)
        with ModelServer(str(model_dir), log_path=Path(tmp) / "server.log") as server:
            report = run_load(server, cases, requests=args.requests, concurrency=args.concurrency, progress=True)
            alive = server.alive()
    row = report.as_row()
    print("| requests | concurrent | valid / invalid | invalid classes | wrong answers | 5xx or dropped | req/s | "
          "p50 ms | p99 ms | alive after |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    ok = report.status_counts.get(200, 0)
    invalid_classes = sum(1 for _, check in cases if check.__name__ != "valid")
    print(f"| {row['requests']} | {row['concurrency']} | {ok} / {row['requests'] - ok} | {invalid_classes} | "
          f"{row['wrong answers']} | {row['unexpected status']} | {row['req/s']} | {row['p50 ms']} | {row['p99 ms']} | "
          f"{alive} |")
    print(f"status counts: {row['status']}")
    return 0 if report.wrong_answers == 0 and report.unexpected_status == 0 and alive else 1


if __name__ == "__main__":
    sys.exit(main())
