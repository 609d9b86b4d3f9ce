"""Helpers for ``benchmarks/run.py``: the benchmark network, the ``mlflow.pytorch`` wrapper, subprocess probes.

Run as ``python -m benchmarks._support <probe> '<json args>'`` from the repository root (``run.py`` does this):

* ``rss``: peak RSS growth of model loads: a fresh interpreter imports everything, then forks one child per load
  (``ru_maxrss`` before vs after the load, in the child);
* ``compile``: ``torch.compile`` vs eager on the same network and tensors (run in a subprocess so that a slow
  compilation can be cut off by a timeout).

Each probe prints one JSON object on its last stdout line.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

import torch
from torch import nn

from mlflow_ptycho_flavor.network import NetworkConfig, PtychoPINNNetwork

__all__ = ["build_network", "RealImagWrapper", "peak_rss_bytes", "current_rss_bytes"]


def build_network(N: int = 64, gridsize: int = 1, n_filters_scale: int = 2, seed: int = 0) -> PtychoPINNNetwork:
    """The benchmark network: seeded default initialisation, eval mode, on the CPU (same seed -> same weights)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        network = PtychoPINNNetwork(NetworkConfig(N=N, C_model=gridsize * gridsize, n_filters_scale=n_filters_scale))
    return network.eval()


class RealImagWrapper(nn.Module):
    """What ``mlflow.pytorch`` needs to serve the network: ``forward(x)`` with a JSON-friendly real output.

    ``forward(x) = torch.view_as_real(network(x, None))``: float32 ``(B, C, N, N, 2)`` (real, imag last), the
    same numbers as the flavor's complex64 output. ``None`` means a unit input factor, as the flavor's default.
    """

    def __init__(self, network: PtychoPINNNetwork) -> None:
        super().__init__()
        self.network = network

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.view_as_real(self.network(x, None))


def peak_rss_bytes() -> int:
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


def current_rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


# ----------------------------------------------------------------------------------------------------------------
# Probes (fresh interpreters)
# ----------------------------------------------------------------------------------------------------------------
def _load(loader: str, args: dict[str, Any]) -> Any:
    device = args.get("device", "cpu")
    path = args["path"]
    if loader == "floor":
        state = torch.load(path, map_location="cpu", weights_only=True)
        network = PtychoPINNNetwork(NetworkConfig(N=args["N"], C_model=args["C"], n_filters_scale=args["filters"]))
        network.load_state_dict(state, strict=True)
        return network.to(device).eval()
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
    """Peak RSS growth of each load in ``args["jobs"]``, each in its own forked child of this fresh interpreter.

    The parent imports every module any loader needs (torch, numpy, mlflow, mlflow.pyfunc, mlflow.pytorch,
    torch.export, this package) and nothing else, then forks one child per job; a child reads ``ru_maxrss``
    (which starts at its RSS at fork time), loads, reads it again and reports the difference.
    """
    import gc

    import mlflow  # noqa: F401
    import mlflow.pyfunc  # noqa: F401
    import mlflow.pytorch  # noqa: F401
    import numpy  # noqa: F401
    import torch.export  # noqa: F401

    import mlflow_ptycho_flavor  # noqa: F401
    import mlflow_ptycho_flavor.flavor  # noqa: F401

    if args.get("threads"):
        torch.set_num_threads(int(args["threads"]))
    gc.collect()
    results = []
    for job in args["jobs"]:
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:  # child
            os.close(read_fd)
            code = 0
            try:
                if job.get("env"):
                    os.environ.update(job["env"])
                peak_before, current_before = peak_rss_bytes(), current_rss_bytes()
                started = time.perf_counter()
                model = _load(job["loader"], job)
                seconds = time.perf_counter() - started
                payload = {
                    **{k: job[k] for k in ("loader", "key")},
                    "peak_before": peak_before,
                    "peak_after": peak_rss_bytes(),
                    "current_delta": current_rss_bytes() - current_before,
                    "seconds": seconds,
                }
                payload["peak_delta"] = payload["peak_after"] - peak_before
                del model
            except BaseException as exc:  # noqa: BLE001 - reported to the parent
                payload = {"loader": job["loader"], "key": job.get("key"), "error": f"{type(exc).__name__}: {exc}"}
                code = 1
            with os.fdopen(write_fd, "w") as handle:
                handle.write(json.dumps(payload))
            os._exit(code)
        os.close(write_fd)
        with os.fdopen(read_fd) as handle:
            data = handle.read()
        os.waitpid(pid, 0)
        results.append(json.loads(data) if data else {"loader": job["loader"], "error": "no output"})
    return {"results": results}


def probe_compile(args: dict[str, Any]) -> dict[str, Any]:
    """``torch.compile`` (default mode) vs eager: compile time, max |diff|, interleaved per-call times."""
    import warnings

    import numpy as np

    warnings.filterwarnings("ignore")
    if args.get("threads"):
        torch.set_num_threads(int(args["threads"]))
    device = torch.device(args.get("device", "cpu"))
    network = build_network(args["N"], args["gridsize"], args["filters"], args.get("seed", 0)).to(device)
    batch, channels = args["batch"], args["gridsize"] ** 2
    x = torch.from_numpy(
        np.random.default_rng(1).uniform(0, 2, (batch, channels, args["N"], args["N"])).astype(np.float32)
    ).to(device)
    factor = torch.ones(batch, 1, 1, 1, device=device)
    compiled = torch.compile(network)
    with torch.inference_mode():
        eager_out = network(x, factor).cpu().numpy()
        started = time.perf_counter()
        compiled_out = compiled(x, factor).cpu().numpy()
        compile_seconds = time.perf_counter() - started
        compiled(x, factor).cpu()  # second call: any recompilation shows up here, not in the timings
        times: dict[str, list[float]] = {"eager": [], "compiled": []}
        for repeat in range(int(args["repeats"])):
            order = ["eager", "compiled"] if repeat % 2 == 0 else ["compiled", "eager"]
            for name in order:
                module = network if name == "eager" else compiled
                started = time.perf_counter()
                module(x, factor).cpu()
                times[name].append(time.perf_counter() - started)
    return {
        "compile_seconds": compile_seconds,
        "max_abs_diff": float(np.max(np.abs(compiled_out - eager_out))),
        "times": times,
    }


def main(argv: list[str]) -> int:
    probe, raw = argv[0], argv[1]
    args = json.loads(raw)
    result = {"rss": probe_rss, "compile": probe_compile}[probe](args)
    sys.stdout.flush()
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
