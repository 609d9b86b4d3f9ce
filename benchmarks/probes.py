"""Measurements that need a fresh interpreter, run as ``python -m benchmarks.probes <probe> '<json args>'``.

* ``rss``: the peak-RSS growth of model loads. The interpreter imports everything any loader needs, then forks
  one child per load; the child reads ``ru_maxrss`` before and after its load.
* ``compile``: ``torch.compile`` against eager on the same network and tensors, in a process of its own so that
  a slow compilation can be cut off by a timeout.

Each probe prints one JSON object on its last stdout line; :func:`run_probe` starts one and decodes it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Any

from benchmarks.harness import REPO

__all__ = ["run_probe"]


def run_probe(probe: str, args: dict[str, Any], *, timeout: float, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``probe`` in a fresh interpreter (this one's executable, the repository first on the path)."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    completed = subprocess.run([sys.executable, "-m", "benchmarks.probes", probe, json.dumps(args)], cwd=REPO,
                               env={**os.environ, "PYTHONPATH": path, **(env or {})}, capture_output=True,
                               text=True, timeout=timeout)
    if completed.returncode != 0:
        raise RuntimeError(f"probe {probe} failed ({completed.returncode}): {completed.stderr[-2000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def _peak_rss_bytes() -> int:
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


def _load(job: dict[str, Any]) -> Any:
    loader, path, device = job["loader"], job["path"], job["device"]
    if loader == "floor":
        from benchmarks.models import floor_load

        return floor_load(path, job["N"], job["C"], job["filters"], device)
    if loader == "load_torch_bundle":
        from mlflow_ptycho_flavor import load_torch_bundle

        return load_torch_bundle(path, device=device)
    if loader == "flavor.load_model":
        from mlflow_ptycho_flavor import load_model

        return load_model(path, device=device)
    if loader == "pyfunc.load_model":
        import mlflow.pyfunc

        return mlflow.pyfunc.load_model(path, model_config={"device": device})
    if loader.startswith("mlflow.pytorch.load_model"):
        import mlflow.pytorch

        return mlflow.pytorch.load_model(path, device=device)
    raise ValueError(f"unknown loader {loader!r}")


def probe_rss(args: dict[str, Any]) -> dict[str, Any]:
    """Peak-RSS growth of each load in ``args["jobs"]``, each in its own forked child of this interpreter.

    The parent imports every module any loader needs (torch, numpy, mlflow, mlflow.pyfunc, mlflow.pytorch,
    torch.export, this package and its flavor) and nothing else, so no loader pays for those imports; a child's
    ``ru_maxrss`` starts at its RSS at fork time.
    """
    import gc

    import mlflow  # noqa: F401
    import mlflow.pyfunc  # noqa: F401
    import mlflow.pytorch  # noqa: F401
    import numpy  # noqa: F401
    import torch
    import torch.export  # noqa: F401

    import mlflow_ptycho_flavor.flavor  # noqa: F401 - the MLflow layer, imported lazily by the package
    if args.get("threads"):
        torch.set_num_threads(int(args["threads"]))
    gc.collect()
    results = []
    for job in args["jobs"]:
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:  # child: load once, report, exit without running the parent's cleanup
            os.close(read_fd)
            code = 0
            try:
                before = _peak_rss_bytes()
                started = time.perf_counter()
                model = _load(job)
                payload = {"key": job["key"], "loader": job["loader"], "peak_delta": _peak_rss_bytes() - before,
                           "seconds": time.perf_counter() - started}
                del model
            except BaseException as exc:  # noqa: BLE001 - reported to the parent
                payload = {"key": job["key"], "loader": job["loader"], "error": f"{type(exc).__name__}: {exc}"}
                code = 1
            with os.fdopen(write_fd, "w") as handle:
                handle.write(json.dumps(payload))
            os._exit(code)
        os.close(write_fd)
        with os.fdopen(read_fd) as handle:
            data = handle.read()
        os.waitpid(pid, 0)
        results.append(json.loads(data) if data else {"key": job["key"], "loader": job["loader"], "error": "no output"})
    return {"results": results}


def probe_compile(args: dict[str, Any]) -> dict[str, Any]:
    """``torch.compile`` (default mode) against eager: first-call seconds, max |diff|, interleaved call times."""
    import warnings

    import torch

    from benchmarks.harness import Timer
    from benchmarks.models import build_network, inputs

    warnings.filterwarnings("ignore")
    if args.get("threads"):
        torch.set_num_threads(int(args["threads"]))
    device = args["device"]
    network = build_network(args["N"], args["gridsize"], args["filters"], args["seed"]).to(device)
    x = torch.from_numpy(inputs(args["batch"], args["gridsize"] ** 2, args["N"], seed=1)).to(device)
    factor = torch.ones(args["batch"], 1, 1, 1, device=device)
    compiled = torch.compile(network)
    timer = Timer(device)
    with torch.inference_mode():
        eager_out = network(x, factor).cpu().numpy()
        started = time.perf_counter()
        compiled_out = compiled(x, factor).cpu().numpy()
        compile_seconds = time.perf_counter() - started
        samples = timer.interleave({"eager": lambda: network(x, factor).cpu(),
                                    "compiled": lambda: compiled(x, factor).cpu()}, int(args["repeats"]))
    return {"compile_seconds": compile_seconds, "max_abs_diff": float(abs(compiled_out - eager_out).max()),
            "eager": list(samples["eager"].samples), "compiled": list(samples["compiled"].samples)}


def main(argv: list[str]) -> int:
    probe, raw = argv
    result = {"rss": probe_rss, "compile": probe_compile}[probe](json.loads(raw))
    sys.stdout.flush()
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
