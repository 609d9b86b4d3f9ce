"""A saved model carries this package, so an environment built from the model alone installs it (issue 16).

``mlflow-ptycho-flavor`` is on no package index: a model whose requirements only pin it cannot have its environment
rebuilt. ``save_model`` stores the package's wheel as ``wheels/<wheel>`` and writes ``--find-links wheels`` into
the requirements. Checked here:

* the model directory holds the wheel (the running package's files, a valid RECORD), the requirements reference it
  and every requirement naming the package is satisfied by it; the overrides (``pip_requirements``,
  ``extra_pip_requirements``, ``conda_env``, ``bundle_package=False``) and ``log_model`` keep it that way;
* the wheel is cached per process by content and rebuilt when a package file changes;
* pip installs the package from the model directory alone (``--no-index``), from another working directory, as
  the Docker image ``mlflow models generate-dockerfile`` writes does, and the installed package imports;
* (slow) ``mlflow models serve --env-manager virtualenv`` builds a fresh environment from the model and answers a
  request with the in-process numbers.

Every pip run here is offline (``--no-index``, the machine's pip configuration ignored) except the slow test's
environment build, which installs torch, mlflow & co. from the package registries (that is what it tests).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from base64 import urlsafe_b64encode
from pathlib import Path

import mlflow
import numpy as np
import pytest
import yaml
from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename

import mlflow_ptycho_flavor
from mlflow_ptycho_flavor.flavor import load_model, log_model, save_model
from mlflow_ptycho_flavor.flavor.package_wheel import package_wheel
from serving_tools import LOOPBACK, free_port, post_json

N = 64
PACKAGE = "mlflow-ptycho-flavor"
PACKAGE_DIR = Path(mlflow_ptycho_flavor.__file__).resolve().parent
FIND_LINKS = "--find-links wheels"


@pytest.fixture(scope="module")
def network(perturbed_network):
    return perturbed_network(seed=21, N=N, n_filters_scale=1)


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory, network) -> Path:
    path = tmp_path_factory.mktemp("fresh-env") / "model"
    save_model(network, path)
    return path


def _requirements(model_dir: Path) -> list[str]:
    return [line.strip() for line in (model_dir / "requirements.txt").read_text().splitlines() if line.strip()]


def _names_package(line: str) -> bool:
    try:
        return canonicalize_name(Requirement(line).name) == PACKAGE
    except InvalidRequirement:
        return False


def _package_pins(lines: list[str]) -> list[Requirement]:
    return [Requirement(line) for line in lines if _names_package(line)]


def _only_wheel(model_dir: Path) -> Path:
    wheels = sorted((model_dir / "wheels").iterdir())
    assert [w.suffix for w in wheels] == [".whl"], wheels
    return wheels[0]


def _offline_env(**extra: str) -> dict[str, str]:
    """The environment without this machine's pip settings (index URLs, find-links) and without PYTHONPATH."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_") and k != "PYTHONPATH"}
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_DISABLE_PIP_VERSION_CHECK="1", **extra)
    return env


def _package_only_requirements(model_dir: Path) -> Path:
    """Next to ``requirements.txt``: its lines that concern this package (the options and the package's pin).

    The other pins (torch, mlflow, ...) need an index; these lines alone must resolve from the model directory.
    """
    lines = [line for line in _requirements(model_dir) if line.startswith("--") or _names_package(line)]
    path = model_dir / "package-requirements.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


# ------------------------------------------------------------------------------------------------------------
# the saved model directory
# ------------------------------------------------------------------------------------------------------------
def test_model_directory_holds_the_wheel_and_its_requirements_resolve_to_it(saved_model):
    wheel = _only_wheel(saved_model)
    name, version, build, tags = parse_wheel_filename(wheel.name)
    assert name == PACKAGE and build == () and {str(t) for t in tags} == {"py3-none-any"}
    assert version.public == mlflow_ptycho_flavor.__version__
    assert re.fullmatch(r"sha\.[0-9a-f]{16}", version.local), version

    lines = _requirements(saved_model)
    assert lines[0] == FIND_LINKS
    pins = _package_pins(lines)
    assert [str(p) for p in pins] == [f"{PACKAGE}=={mlflow_ptycho_flavor.__version__}"]
    # every requirement naming the package is satisfied by the bundled wheel: none is left to a registry
    assert all(pin.specifier.contains(version) for pin in pins)
    assert "+" not in "\n".join(lines)  # the pin stays public: the saving environment reports no mismatch

    conda = yaml.safe_load((saved_model / "conda.yaml").read_text())
    pip_section = next(d["pip"] for d in conda["dependencies"] if isinstance(d, dict))
    assert pip_section == lines
    python_env = yaml.safe_load((saved_model / "python_env.yaml").read_text())
    assert python_env["dependencies"] == ["-r requirements.txt"]


def test_wheel_holds_the_running_package_with_a_valid_record(saved_model):
    with zipfile.ZipFile(_only_wheel(saved_model)) as archive:
        members = {info.filename: archive.read(info) for info in archive.infolist()}
    sources = {
        path.relative_to(PACKAGE_DIR.parent).as_posix(): path.read_bytes()
        for path in PACKAGE_DIR.rglob("*")
        if (path.suffix == ".py" or path.name == "py.typed") and "__pycache__" not in path.parts
    }
    assert "mlflow_ptycho_flavor/flavor/__init__.py" in sources and len(sources) > 20
    assert {n: d for n, d in members.items() if not n.startswith("mlflow_ptycho_flavor-")} == sources

    version = parse_wheel_filename(_only_wheel(saved_model).name)[1]
    dist_info = f"mlflow_ptycho_flavor-{version}.dist-info"
    metadata = members[f"{dist_info}/METADATA"].decode()
    assert f"\nVersion: {version}\n" in metadata and "\nName: mlflow-ptycho-flavor\n" in metadata
    assert "Requires-Dist: torch" in metadata and "Requires-Dist: mlflow" in metadata
    assert "Root-Is-Purelib: true" in members[f"{dist_info}/WHEEL"].decode()
    assert "ptycho-flavor = mlflow_ptycho_flavor.cli:main" in members[f"{dist_info}/entry_points.txt"].decode()

    record = {}
    for row in members[f"{dist_info}/RECORD"].decode().splitlines():
        name, digest, size = row.rsplit(",", 2)
        record[name] = (digest, size)
    assert record.pop(f"{dist_info}/RECORD") == ("", "")
    assert set(record) == set(members) - {f"{dist_info}/RECORD"}
    for name, (digest, size) in record.items():
        data = members[name]
        expected = "sha256=" + urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        assert (digest, int(size)) == (expected, len(data)), name


def test_wheel_is_built_once_per_process_and_saved_byte_identical(saved_model, network, tmp_path):
    assert package_wheel() is package_wheel()
    save_model(network, tmp_path / "again")
    first, second = _only_wheel(saved_model), _only_wheel(tmp_path / "again")
    assert first.name == second.name and first.read_bytes() == second.read_bytes()


def test_wheel_is_rebuilt_when_a_package_file_changes(tmp_path):
    """In a subprocess importing a copy of the package: an edit changes the content label, unchanged files keep it."""
    copy = tmp_path / "src" / "mlflow_ptycho_flavor"
    shutil.copytree(PACKAGE_DIR, copy, ignore=shutil.ignore_patterns("__pycache__"))
    script = textwrap.dedent(
        """
        import json, sys
        from pathlib import Path
        import mlflow_ptycho_flavor
        from mlflow_ptycho_flavor.flavor.package_wheel import package_wheel
        before = package_wheel()
        assert package_wheel() is before
        edited = Path(mlflow_ptycho_flavor.__file__).parent / "errors.py"
        edited.write_text(edited.read_text() + "\\n# edited\\n")
        after = package_wheel()
        members = dict(after.members)
        print(json.dumps({"file": mlflow_ptycho_flavor.__file__, "before": before.version, "after": after.version,
                          "edit_in_wheel": members["mlflow_ptycho_flavor/errors.py"].endswith(b"# edited\\n")}))
        """
    )
    result = subprocess.run([sys.executable, "-c", script], env=_offline_env(PYTHONPATH=str(copy.parent)),
                            cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert Path(report["file"]).resolve().is_relative_to(copy.resolve())
    assert report["before"] == package_wheel().version  # same files, same wheel, in another process too
    assert report["after"] != report["before"] and report["edit_in_wheel"]


# ------------------------------------------------------------------------------------------------------------
# environment overrides, opting out, log_model
# ------------------------------------------------------------------------------------------------------------
def test_extra_pip_requirements_keep_the_defaults_and_the_bundled_package(network, tmp_path):
    save_model(network, tmp_path / "m", extra_pip_requirements=["scipy>=1.10"])
    lines = _requirements(tmp_path / "m")
    assert lines[0] == FIND_LINKS and "scipy>=1.10" in lines and any(l.startswith("torch==") for l in lines)
    assert [str(p) for p in _package_pins(lines)] == [f"{PACKAGE}=={mlflow_ptycho_flavor.__version__}"]
    _only_wheel(tmp_path / "m")


def test_pip_requirements_replace_the_defaults_and_gain_the_package_like_mlflow(network, tmp_path):
    save_model(network, tmp_path / "m", pip_requirements=["torch", "numpy<3"])
    lines = _requirements(tmp_path / "m")
    assert lines[0] == FIND_LINKS
    assert [l for l in lines if l.startswith(("torch", "numpy"))] == ["torch", "numpy<3"]  # no default torch== pin
    assert [str(p) for p in _package_pins(lines)] == [f"{PACKAGE}=={mlflow_ptycho_flavor.__version__}"]


def test_a_requirement_naming_the_package_is_kept_as_given(network, tmp_path):
    save_model(network, tmp_path / "m", pip_requirements=["torch", f"{PACKAGE}>=0.1"])
    lines = _requirements(tmp_path / "m")
    assert lines[0] == FIND_LINKS and [str(p) for p in _package_pins(lines)] == [f"{PACKAGE}>=0.1"]


def test_conda_env_override_gains_the_bundled_package(network, tmp_path):
    conda_env = {"name": "custom", "channels": ["conda-forge"], "dependencies": ["python=3.11", "pip", {"pip": ["torch"]}]}
    save_model(network, tmp_path / "m", conda_env=conda_env)
    lines = _requirements(tmp_path / "m")
    assert lines[0] == FIND_LINKS and "torch" in lines and _package_pins(lines)
    written = yaml.safe_load((tmp_path / "m" / "conda.yaml").read_text())
    assert written["name"] == "custom"
    assert next(d["pip"] for d in written["dependencies"] if isinstance(d, dict)) == lines


def test_bundle_package_false_keeps_the_plain_pin(network, tmp_path):
    save_model(network, tmp_path / "m", bundle_package=False)
    lines = _requirements(tmp_path / "m")
    assert not (tmp_path / "m" / "wheels").exists()
    assert FIND_LINKS not in lines
    assert [str(p) for p in _package_pins(lines)] == [f"{PACKAGE}=={mlflow_ptycho_flavor.__version__}"]


def test_logged_model_downloads_with_its_wheel(network, tmp_path):
    info = log_model(network, name="model")
    local = Path(mlflow.artifacts.download_artifacts(info.model_uri, dst_path=str(tmp_path / "downloaded")))
    assert _only_wheel(local).name == package_wheel().file_name
    assert _requirements(local)[0] == FIND_LINKS


# ------------------------------------------------------------------------------------------------------------
# installing from the model directory alone
# ------------------------------------------------------------------------------------------------------------
def test_package_installs_offline_from_the_model_directory_and_imports(saved_model, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(saved_model, model)
    elsewhere = tmp_path / "elsewhere"  # pip runs outside the model directory: --find-links is file-relative
    elsewhere.mkdir()
    target = tmp_path / "target"
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--target", str(target),
         "-r", str(_package_only_requirements(model))],
        env=_offline_env(), cwd=elsewhere, capture_output=True, text=True, timeout=300,
    )
    assert install.returncode == 0, install.stdout[-2000:] + install.stderr[-2000:]
    version = str(parse_wheel_filename(_only_wheel(model).name)[1])
    probe = subprocess.run(
        [sys.executable, "-c", "import importlib.metadata as m, json, mlflow_ptycho_flavor as p; "
         f"print(json.dumps([p.__file__, m.version('{PACKAGE}'), p.FLAVOR_NAME]))"],
        env=_offline_env(PYTHONPATH=str(target)), cwd=elsewhere, capture_output=True, text=True, timeout=300,
    )
    assert probe.returncode == 0, probe.stderr[-3000:]
    module_file, installed_version, flavor_name = json.loads(probe.stdout.strip().splitlines()[-1])
    assert Path(module_file).resolve().is_relative_to(target.resolve())
    assert (installed_version, flavor_name) == (version, "ptycho_torch")
    assert (target / "bin" / "ptycho-flavor").is_file()


def test_generate_dockerfile_image_installs_the_bundled_package(saved_model, tmp_path):
    out = tmp_path / "docker"
    result = subprocess.run(
        [sys.executable, "-m", "mlflow", "models", "generate-dockerfile", "-m", str(saved_model), "-d", str(out)],
        env=_offline_env(), capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    dockerfile = (out / "Dockerfile").read_text()
    copy = re.search(r"^COPY (\S+) /opt/ml/model$", dockerfile, flags=re.M)
    assert copy is not None, dockerfile
    install = dockerfile[copy.end():].lstrip().splitlines()[0]
    assert install.startswith("RUN python -c ") and "_install_pyfunc_deps('/opt/ml/model'" in install
    workdir = re.findall(r"^WORKDIR (\S+)$", dockerfile[: copy.start()], flags=re.M)
    assert workdir and workdir[-1] != "/opt/ml/model"  # the install runs pip from another directory

    copied = out / copy.group(1)
    assert (copied / "requirements.txt").read_bytes() == (saved_model / "requirements.txt").read_bytes()
    assert _only_wheel(copied).read_bytes() == _only_wheel(saved_model).read_bytes()
    # what that RUN step's pip does with the package's lines, from the image's working directory stand-in
    workdir_standin = tmp_path / "opt-mlflow"
    workdir_standin.mkdir()
    report_path = tmp_path / "report.json"
    dry_run = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--no-deps", "--no-index", "--ignore-installed",
         "--report", str(report_path), "-r", str(_package_only_requirements(copied))],
        env=_offline_env(), cwd=workdir_standin, capture_output=True, text=True, timeout=300,
    )
    assert dry_run.returncode == 0, dry_run.stdout[-2000:] + dry_run.stderr[-2000:]
    installs = json.loads(report_path.read_text())["install"]
    assert [(i["metadata"]["name"], i["metadata"]["version"]) for i in installs] == [
        (PACKAGE, str(parse_wheel_filename(_only_wheel(copied).name)[1]))
    ]
    source = urllib.request.url2pathname(urllib.parse.urlsplit(installs[0]["download_info"]["url"]).path)
    assert Path(source).resolve() == _only_wheel(copied).resolve()


# ------------------------------------------------------------------------------------------------------------
# a fresh virtualenv built from the model alone
# ------------------------------------------------------------------------------------------------------------
#: Start-up bound: pyenv's interpreter + ``python -m venv`` + pip installing torch (local CPU wheel), mlflow and
#: their dependencies took 110-140 s on a busy 2-core machine; 20 minutes leaves room for a much busier one.
#: Removing the 1.7 GB environment afterwards took another ~2 minutes there (printed with ``-s``).
SERVE_STARTUP_S = 1200.0


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)


def _wait_for_ping(process: subprocess.Popen, url: str, log: Path) -> float:
    started = time.monotonic()
    while time.monotonic() - started < SERVE_STARTUP_S:
        if process.poll() is not None:
            pytest.fail(f"mlflow models serve exited with {process.returncode}; log tail:\n{log.read_text()[-4000:]}")
        if _answers_ping(url):
            return time.monotonic() - started
        time.sleep(2)
    pytest.fail(f"no /ping answer within {SERVE_STARTUP_S:.0f} s; log tail:\n{log.read_text()[-4000:]}")


def _answers_ping(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/ping", timeout=5) as response:
            return response.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return False


@pytest.mark.slow
@pytest.mark.timeout(SERVE_STARTUP_S + 300)
def test_virtualenv_serving_builds_the_environment_from_the_model_alone(saved_model, tmp_path):
    env_root = tmp_path / "envs"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the served code must come from the wheel
    env.update(MLFLOW_ENV_ROOT=str(env_root),
               PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    port = free_port()
    url = f"http://{LOOPBACK}:{port}"
    log = tmp_path / "serve.log"
    with open(log, "wb") as log_handle:
        process = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "models", "serve", "-m", str(saved_model), "--env-manager",
             "virtualenv", "-h", LOOPBACK, "-p", str(port), "-w", "1"],
            env=env, stdout=log_handle, stderr=subprocess.STDOUT, start_new_session=True, cwd=tmp_path,
        )
    try:
        startup_s = _wait_for_ping(process, url, log)
        print(f"\nfresh virtualenv built and serving after {startup_s:.0f} s")
        x = np.random.default_rng(5).uniform(0, 2, (3, 1, N, N)).astype(np.float32)
        status, body = post_json(f"{url}/invocations", {"inputs": x.tolist()}, timeout=120)
        assert status == 200, body
        _stop(process)

        served = np.asarray(body["predictions"]["real"], np.float32) + 1j * np.asarray(
            body["predictions"]["imag"], np.float32
        )
        expected = load_model(str(saved_model), device="cpu").predict(x)
        # Another process (same torch release, possibly other CPU kernels): float32 rounding differs by ~1e-7
        # relative; 1e-5 of the output's scale leaves two orders of magnitude of margin.
        scale = float(np.abs(expected).max())
        np.testing.assert_allclose(served, expected, rtol=1e-5, atol=1e-5 * scale)

        # the environment holds the bundled wheel as a regular install, not this checkout
        version = str(parse_wheel_filename(_only_wheel(saved_model).name)[1])
        site_packages = list(env_root.glob("*/lib/python*/site-packages"))
        assert len(site_packages) == 1, site_packages
        assert (site_packages[0] / f"mlflow_ptycho_flavor-{version}.dist-info" / "RECORD").is_file()
        installed = site_packages[0] / "mlflow_ptycho_flavor" / "flavor" / "__init__.py"
        assert installed.read_bytes() == (PACKAGE_DIR / "flavor" / "__init__.py").read_bytes()
        assert not list(site_packages[0].glob("__editable__*mlflow_ptycho_flavor*"))
    finally:
        _stop(process)
        # ~1.7 GB (torch, mlflow and their dependencies): deleting it takes minutes on a busy disk, so it is moved
        # aside (one rename) and removed by a detached process while the suite goes on.
        if env_root.exists():
            trash = env_root.with_name(env_root.name + ".deleting")
            env_root.rename(trash)
            subprocess.Popen(["rm", "-rf", str(trash)], start_new_session=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
