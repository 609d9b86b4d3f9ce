"""Section 3: ``mlflow models serve`` of ours and of ``mlflow.pytorch`` under the same load, and where an
in-process request's time goes (the scoring server's parse, predict and encode steps timed apart).
"""

from __future__ import annotations

import io
import json
import os
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from benchmarks.config import Context
from benchmarks.harness import REPO, env_var, inner_count, profile
from benchmarks.models import PICKLE_ENV, ModelSet, inputs
from benchmarks.records import Check, ProfileEntry, Ratio, RecordTable, SectionResult, Stats, Target, column

__all__ = ["KEY", "TITLE", "THROUGHPUT_TARGET", "ENCODE_TARGET", "ServedLoad", "ScoringSteps", "ServerPair",
           "start_early", "run"]

KEY = "serving"
TITLE = "3. Serving: mlflow models serve, ours vs mlflow.pytorch"
SERVING_ENV = "_MLFLOW_IS_IN_SERVING_ENVIRONMENT"  # what the scoring server sets; our pyfunc reads it
#: ours / mlflow.pytorch requests per second.
THROUGHPUT_TARGET = Target(low=1.0)
#: The response-encoding share of predict + encode.
ENCODE_TARGET = Target(high=0.20, unit="%")


@dataclass(frozen=True)
class ServedLoad:
    """One server under bounded concurrent load, all rounds of one batch size together."""

    batch: int = column("batch")
    server: str = column("server")
    requests: int = column("requests")
    requests_per_s: float = column("req/s", "g")
    samples_per_s: float = column("samples/s", "g")
    p50_seconds: float = column("p50", "time")
    p99_seconds: float = column("p99", "time")
    bad: int = column("wrong/5xx")
    vs_reference: Ratio | None = column("ours/mlflow.pytorch req/s [per-round range]")
    target: Target | None = column("target", "target")
    met: bool | None = column("met", "met")


@dataclass(frozen=True)
class ScoringSteps:
    """The scoring server's steps for one flavor, in process: parse, predict, encode, and the whole request."""

    batch: int = column("batch")
    flavor: str = column("flavor")
    parse: Stats = column("parse request")
    predict: Stats = column("predict")
    encode: Stats = column("encode response")
    whole: Stats = column("whole `invocations`")
    encode_share: float = column("encode / (predict + encode)", "percent")
    encode_of_whole: float = column("encode / whole", "percent")
    response_bytes: int = column("response bytes", "bytes")
    target: Target | None = column("target", "target")
    met: bool | None = column("met", "met")


def _serving_tools() -> Any:
    """The serving test tooling (a real ``mlflow models serve`` on loopback, a bounded load generator)."""
    tests = str(REPO / "tests")
    if tests not in sys.path:
        sys.path.insert(0, tests)
    import serving_tools

    return serving_tools


def _reference(ctx: Context, model_set: ModelSet) -> tuple[Any, str]:
    """The ``mlflow.pytorch`` model to serve and its format: pt2 on CPU, pickle elsewhere (pt2 stays on CPU)."""
    return (model_set.pt2_dir, "pt2") if ctx.cfg.device == "cpu" else (model_set.pickle_dir, "pickle")


class ServerPair:
    """Both scoring servers, started side by side in background threads; :meth:`wait` joins them."""

    def __init__(self, ctx: Context, model_set: ModelSet) -> None:
        serving_tools = _serving_tools()
        reference_dir, reference_format = _reference(ctx, model_set)
        # `mlflow models serve --env-manager local` runs `uvicorn` from PATH: this interpreter's environment
        env = {"MLFLOW_DEFAULT_PREDICTION_DEVICE": ctx.cfg.device, **ctx.threads.subprocess_env(),
               "PATH": os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])}
        if reference_format == "pickle":
            env[PICKLE_ENV] = "true"
        self.servers = {
            "ours": serving_tools.ModelServer(str(model_set.ours_dir), env=dict(env),
                                              log_path=ctx.work / "serve_ours.log"),
            "mlflow.pytorch": serving_tools.ModelServer(str(reference_dir), env=dict(env),
                                                        log_path=ctx.work / "serve_pytorch.log"),
        }
        self._errors: dict[str, BaseException] = {}
        self._started = time.perf_counter()
        self._threads = [threading.Thread(target=self._start, args=(name,), daemon=True) for name in self.servers]
        for thread in self._threads:
            thread.start()
        self.startup_seconds: float | None = None

    def _start(self, name: str) -> None:
        try:
            self.servers[name].start()
        except BaseException as exc:  # noqa: BLE001 - raised by wait()
            self._errors[name] = exc

    def wait(self) -> float:
        """Seconds until both answered ``/ping`` (counted from the start); raises if one failed."""
        for thread in self._threads:
            thread.join()
        if self.startup_seconds is None:
            self.startup_seconds = time.perf_counter() - self._started
        if self._errors:
            self.stop()
            raise RuntimeError(f"scoring server start-up failed: {self._errors}")
        return self.startup_seconds

    def stop(self) -> None:
        for server in self.servers.values():
            server.stop()


def start_early(ctx: Context) -> ServerPair:
    """Start both servers now (``--quick`` overlaps their start-up with the earlier sections)."""
    return ServerPair(ctx, ctx.models[ctx.main_gridsize])


def _complex(payload: Any, ours: bool) -> np.ndarray:
    predictions = payload["predictions"]
    if ours:
        return np.asarray(predictions["real"]) + 1j * np.asarray(predictions["imag"])
    pairs = np.asarray(predictions)
    return pairs[..., 0] + 1j * pairs[..., 1]


def measure_served(ctx: Context, pair: ServerPair, model_set: ModelSet) -> tuple[list[ServedLoad], list[Check], str]:
    """Interleaved load rounds against both servers per batch size; the table note states start-up and agreement."""
    serving_tools = _serving_tools()
    cfg, servers = ctx.cfg, pair.servers
    startup = pair.wait()
    body = json.dumps({"inputs": inputs(2, model_set.channels, model_set.N, seed=5).tolist()}).encode()
    answers = {name: server.invoke(body) for name, server in servers.items()}
    for name, (status, payload) in answers.items():
        if status != 200:
            raise RuntimeError(f"{name} server answered {status}: {str(payload)[:300]}")
    served_diff = float(np.max(np.abs(_complex(answers["ours"][1], True) - _complex(answers["mlflow.pytorch"][1],
                                                                                    False))))
    rows: list[ServedLoad] = []
    checks: list[Check] = []
    for batch in cfg.serving_batches:
        body = json.dumps({"inputs": inputs(batch, model_set.channels, model_set.N, seed=batch).tolist()}).encode()
        checks_by_server: dict[str, Callable[[int, Any], bool]] = {
            "ours": lambda status, payload, b=batch: status == 200 and len(payload["predictions"]["real"]) == b,
            "mlflow.pytorch": lambda status, payload, b=batch: status == 200 and len(payload["predictions"]) == b,
        }
        for name, server in servers.items():  # one uncounted request each: the first call at this shape
            status, payload = server.invoke(body, timeout=600)
            if not checks_by_server[name](status, payload):
                raise RuntimeError(f"{name} server answered {status} at batch {batch}: {str(payload)[:300]}")
        per_round = max(1, cfg.serving_requests.get(batch, 10) // cfg.serving_rounds)
        reports: dict[str, list[Any]] = {name: [] for name in servers}
        for round_index in range(cfg.serving_rounds):
            for name in (list(servers) if round_index % 2 == 0 else list(servers)[::-1]):
                reports[name].append(serving_tools.run_load(servers[name], [(body, checks_by_server[name])],
                                                            requests=per_round, concurrency=cfg.serving_concurrency,
                                                            timeout=600))
        per_round_ratio = Ratio.of([o.throughput / r.throughput
                                    for o, r in zip(reports["ours"], reports["mlflow.pytorch"])])
        throughput = {name: sum(r.requests for r in rounds) / sum(r.seconds for r in rounds)
                      for name, rounds in reports.items()}
        ratio = throughput["ours"] / throughput["mlflow.pytorch"]
        for name, rounds in reports.items():
            latencies = np.concatenate([np.asarray(r.latencies_ms, dtype=np.float64) for r in rounds]) / 1e3
            p50, p99 = np.percentile(latencies, [50, 99])
            ours = name == "ours"
            rows.append(ServedLoad(
                batch, name, sum(r.requests for r in rounds), throughput[name], batch * throughput[name], float(p50),
                float(p99), sum(r.wrong_answers + r.unexpected_status for r in rounds),
                per_round_ratio if ours else None, THROUGHPUT_TARGET if ours else None,
                THROUGHPUT_TARGET.holds(ratio) if ours else None))
        checks.append(Check.of("3 Serving", f"ours/mlflow.pytorch req/s, B={batch}", ratio, THROUGHPUT_TARGET))
    note = (f"Both servers answered `/ping` {startup:.1f} s after they were started (side by side"
            + (", in the background while the earlier sections ran" if cfg.quick else "")
            + f"). Served outputs agree: max |ours − mlflow.pytorch| = {served_diff:.3g} (complex, B=2).")
    return rows, checks, note


def measure_steps(ctx: Context, model_set: ModelSet) -> tuple[list[ScoringSteps], list[Check], list[ProfileEntry]]:
    """In process: ``_parse_json_data``, ``predict``, ``predictions_to_json`` and the whole ``invocations``."""
    import mlflow.pyfunc
    from mlflow.pyfunc.scoring_server import _parse_json_data, invocations, predictions_to_json

    cfg = ctx.cfg
    reference_dir, reference_format = _reference(ctx, model_set)
    with env_var(PICKLE_ENV, "true" if reference_format == "pickle" else None):
        reference = mlflow.pyfunc.load_model(str(reference_dir), model_config={
            "device": cfg.device if reference_format == "pickle" else "cpu"})
    flavors = {"ours": ctx.pyfuncs[model_set.gridsize], f"mlflow.pytorch ({reference_format})": reference}
    steps = ("parse", "predict", "encode", "whole")
    rows: list[ScoringSteps] = []
    checks: list[Check] = []
    entries: list[ProfileEntry] = []
    with env_var(SERVING_ENV, "true"):
        for batch in cfg.serving_batches:
            body = json.dumps({"inputs": inputs(batch, model_set.channels, model_set.N, seed=batch).tolist()}).encode()
            candidates: dict[str, Callable[[], Any]] = {}
            response_bytes: dict[str, int] = {}
            for name, model in flavors.items():
                schema = model.metadata.get_input_schema()
                parsed = _parse_json_data(body, model.metadata, schema)
                prediction = model.predict(parsed.data, params=parsed.params)
                encoded = io.StringIO()
                predictions_to_json(prediction, encoded)
                response_bytes[name] = len(encoded.getvalue().encode())

                def whole(model: Any = model, schema: Any = schema) -> None:
                    result = invocations(body, "application/json", model, schema)
                    if result.status != 200:
                        raise RuntimeError(f"in-process invocation failed: {result.response[:300]}")

                candidates[f"{name}:parse"] = lambda model=model, schema=schema: _parse_json_data(body, model.metadata,
                                                                                                 schema)
                candidates[f"{name}:predict"] = lambda model=model, parsed=parsed: model.predict(parsed.data,
                                                                                                 params=parsed.params)
                candidates[f"{name}:encode"] = lambda prediction=prediction: predictions_to_json(prediction,
                                                                                                 io.StringIO())
                candidates[f"{name}:whole"] = whole
                if name == "ours" and not entries:
                    entries = profile(whole, calls=3, top=14)
            inner = inner_count(ctx.timer.once(candidates["ours:whole"]), cfg.sample_seconds)
            samples = ctx.timer.interleave(candidates, max(cfg.repeats, 3), inner=inner)
            for name in flavors:
                got = {step: samples[f"{name}:{step}"] for step in steps}
                predict, encode = got["predict"].median, got["encode"].median
                share = encode / (predict + encode)
                ours = name == "ours"
                rows.append(ScoringSteps(batch, name, got["parse"], got["predict"], got["encode"], got["whole"], share,
                                         encode / got["whole"].median, response_bytes[name],
                                         ENCODE_TARGET if ours else None, ENCODE_TARGET.holds(share) if ours else None))
                if ours:
                    checks.append(Check.of("3 Serving", f"JSON encode share of predict+encode, B={batch}", share,
                                           ENCODE_TARGET, unit="%"))
    return rows, checks, entries


def run(ctx: Context) -> SectionResult:
    cfg = ctx.cfg
    model_set = ctx.models[ctx.main_gridsize]
    pair = ctx.take_early(KEY) or start_early(ctx)
    try:
        served, served_checks, note = measure_served(ctx, pair, model_set)
    finally:
        pair.stop()
    steps, step_checks, entries = measure_steps(ctx, model_set)
    C, N = model_set.channels, model_set.N
    _, reference_format = _reference(ctx, model_set)
    intro = (f"`mlflow models serve --env-manager local -w 1` on loopback for both, started side by side; the same "
             f"pre-encoded `{{\"inputs\": (B, {C}, {N}, {N}) list}}` bodies. Ours answers `{{\"predictions\": "
             f"{{\"real\": ..., \"imag\": ...}}}}`; mlflow.pytorch ({reference_format}, wrapper returning "
             f"`view_as_real`) answers `{{\"predictions\": (B, {C}, {N}, {N}, 2)}}`. Load runs in "
             f"{cfg.serving_rounds} interleaved rounds per batch size (order alternating), concurrency "
             f"{cfg.serving_concurrency}; req/s = all requests / all round seconds; percentiles (`numpy.percentile`) "
             "over all requests. Target: ours >= mlflow.pytorch throughput.")
    tables = [
        RecordTable(ServedLoad, served, note=note),
        RecordTable(ScoringSteps, steps, "In-process scoring-server steps: `_parse_json_data` (JSON -> arrays), "
                    "`model.predict`, `predictions_to_json` (the server's own `_get_jsonable_obj` + "
                    "`json.dump(cls=NumpyEncoder)`), and the whole `scoring_server.invocations`"),
        RecordTable(ProfileEntry, entries, f"Where an in-process request goes for ours (cProfile of `invocations`, "
                    f"B={cfg.serving_batches[0]}, sorted by self time)"),
    ]
    return SectionResult(KEY, TITLE, intro, tables, served_checks + step_checks)
