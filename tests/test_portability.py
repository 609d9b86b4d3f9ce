"""Nothing depends on the virtual environment being activated (issue 12 §1).

``mlflow models serve --env-manager local`` starts ``uvicorn`` by name through ``bash -c``, so a server started by
``/path/to/venv/bin/python`` or ``/path/to/venv/bin/ptycho-flavor`` from a shell whose ``PATH`` lacks the venv's
``bin`` folder used to die at start-up ("uvicorn: command not found"). Both ways of starting a server are tested
here as a user would run them: a fresh interpreter, called by its absolute path, with ``PATH`` reduced to system
folders that hold neither ``uvicorn`` nor ``mlflow``. Servers bind to 127.0.0.1 only and answer one request each.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from serving_tools import free_port, post_json

pytestmark = pytest.mark.slow

REPO_ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
STARTUP_S = 240


def _bare_path() -> str:
    """System folders only: no venv, and nothing that provides ``uvicorn`` or ``mlflow``."""
    folders = [d for d in ("/usr/local/bin", "/usr/bin", "/bin") if Path(d).is_dir()]
    folders = [d for d in folders if not (Path(d) / "uvicorn").exists() and not (Path(d) / "mlflow").exists()]
    path = os.pathsep.join(folders)
    assert shutil.which("bash", path=path), "the test needs bash on the reduced PATH"
    assert shutil.which("uvicorn", path=path) is None and str(VENV_BIN) not in path.split(os.pathsep)
    return path


def _bare_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "MLFLOW_TRACKING_URI")}
    env["PATH"] = _bare_path()
    # the repository (the package) and tests/ (serving_tools), as pytest puts them on sys.path
    parts = (str(REPO_ROOT), str(REPO_ROOT / "tests"), os.environ.get("PYTHONPATH"))
    env["PYTHONPATH"] = os.pathsep.join(p for p in parts if p)
    return env


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A saved N=64 model and its in-process answer to one request."""
    from conftest import make_perturbed_network
    from mlflow_ptycho_flavor.flavor import load_model, save_model

    model_dir = tmp_path_factory.mktemp("portability") / "model"
    save_model(make_perturbed_network(seed=4, N=64, n_filters_scale=1), model_dir)
    x = np.random.default_rng(4).uniform(0, 2, (1, 1, 64, 64)).astype(np.float32)
    return model_dir, x, load_model(str(model_dir), device="cpu").predict(x)


def _matches(body, expected) -> bool:
    got = np.asarray(body["predictions"]["real"], np.float32) + 1j * np.asarray(body["predictions"]["imag"], np.float32)
    return bool(np.array_equal(got, expected))  # same machine, same run: bit for bit


MODEL_SERVER_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    from serving_tools import ModelServer

    model_dir, x_path, log_path = sys.argv[1:4]
    x = np.load(x_path)
    with ModelServer(model_dir, log_path=log_path, startup_timeout=%d) as server:
        status, body = server.invoke({"inputs": x.tolist()})
    print(json.dumps({"status": status, "body": body}))
    """
    % STARTUP_S
)


def test_model_server_starts_from_an_interpreter_whose_venv_is_not_on_path(model, tmp_path):
    model_dir, x, expected = model
    np.save(tmp_path / "x.npy", x)
    script = tmp_path / "serve.py"
    script.write_text(MODEL_SERVER_SCRIPT)
    done = subprocess.run(
        [sys.executable, str(script), str(model_dir), str(tmp_path / "x.npy"), str(tmp_path / "server.log")],
        env=_bare_env(), cwd=tmp_path, capture_output=True, text=True, timeout=STARTUP_S + 120,
    )
    log = (tmp_path / "server.log").read_text(errors="replace") if (tmp_path / "server.log").exists() else ""
    assert done.returncode == 0, done.stderr[-3000:] + "\n--- server log ---\n" + log[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["status"] == 200, report
    assert _matches(report["body"], expected)


def _entry_point() -> list[str]:
    """The console script by absolute path (what a user of the venv types), else the module entry point."""
    script = VENV_BIN / "ptycho-flavor"
    return [str(script)] if script.exists() else [sys.executable, "-m", "mlflow_ptycho_flavor"]


def _wait_for_ping(url: str, process: subprocess.Popen, deadline: float) -> None:
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"ptycho-flavor serve exited with {process.returncode} during start-up")
        try:
            with urllib.request.urlopen(f"{url}/ping", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"no answer on {url}/ping within {STARTUP_S} s")


def test_ptycho_flavor_serve_called_by_absolute_path_without_the_venv_on_path(model, tmp_path):
    model_dir, x, expected = model
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = tmp_path / "serve.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen([*_entry_point(), "serve", str(model_dir), "--port", str(port)], env=_bare_env(),
                                   cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        try:
            _wait_for_ping(url, process, time.monotonic() + STARTUP_S)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n--- log ---\n{log_path.read_text(errors='replace')[-3000:]}") from None
        status, body = post_json(f"{url}/invocations", {"inputs": x.tolist()}, timeout=60)
        assert status == 200, body
        assert _matches(body, expected)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=10)
