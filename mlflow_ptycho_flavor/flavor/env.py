"""The one module that touches MLflow's private helpers, so an MLflow refactor breaks one file, not the flavor.

Wraps the ``mlflow.utils.*`` functions every built-in flavor uses to validate environment arguments, prepare
the target directory, copy ``code_paths``, and write ``conda.yaml`` / ``python_env.yaml`` /
``requirements.txt`` / ``constraints.txt``; makes those requirements resolvable from the model directory alone
by storing this package's wheel in it (:func:`write_environment_files`); and guards MLflow's scoring server
against JSON nested too deeply for Python's decoder and against answers that echo the request
(:func:`guard_scoring_server`).
"""

from __future__ import annotations

import functools
import importlib.metadata
import logging
import os
import sys
from typing import Any

import yaml
from mlflow.exceptions import MlflowException
from mlflow.models.utils import _save_example
from mlflow.tracking._model_registry import DEFAULT_AWAIT_MAX_SLEEP_SECONDS
from mlflow.tracking.artifact_utils import _download_artifact_from_uri
from mlflow.utils.environment import (
    _CONDA_ENV_FILE_NAME,
    _CONSTRAINTS_FILE_NAME,
    _PYTHON_ENV_FILE_NAME,
    _REQUIREMENTS_FILE_NAME,
    _mlflow_conda_env,
    _overwrite_pip_deps,
    _process_conda_env,
    _process_pip_requirements,
    _PythonEnv,
    _validate_env_arguments,
)
from mlflow.utils.file_utils import write_to
from mlflow.utils.model_utils import (
    _add_code_from_conf_to_system_path,
    _get_flavor_configuration,
    _validate_and_copy_code_paths,
)
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version

from mlflow_ptycho_flavor.flavor.package_wheel import PACKAGE_NAME, package_wheel

__all__ = [
    "DEFAULT_AWAIT_MAX_SLEEP_SECONDS",
    "invalid_parameter",
    "CONDA_ENV_FILE_NAME",
    "PYTHON_ENV_FILE_NAME",
    "WHEELS_DIR_NAME",
    "pinned_requirement",
    "default_pip_requirements",
    "default_conda_env",
    "validate_env_arguments",
    "copy_code_paths",
    "add_code_to_system_path",
    "flavor_configuration",
    "download_model",
    "save_input_example",
    "write_environment_files",
    "guard_scoring_server",
    "validate_registry_names",
]

_logger = logging.getLogger(__name__)

CONDA_ENV_FILE_NAME = _CONDA_ENV_FILE_NAME
PYTHON_ENV_FILE_NAME = _PYTHON_ENV_FILE_NAME
#: Folder of the model directory holding this package's wheel (the name MLflow's own wheeled models use).
WHEELS_DIR_NAME = "wheels"


def invalid_parameter(message: str) -> MlflowException:
    """The exception the flavor raises for a bad argument or input (the scoring server answers HTTP 400)."""
    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


def pinned_requirement(package: str) -> str | None:
    """``package==<installed public version>`` (local tags such as ``+cpu`` stripped), or None if absent."""
    try:
        raw = importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None
    try:
        public = Version(raw).public
    except InvalidVersion:
        public = raw.split("+", 1)[0]
    return f"{package}=={public}"


def default_pip_requirements() -> list[str]:
    """torch, mlflow and this package, pinned to the installed public versions.

    torch's kernels compute the outputs; this package itself is needed by the serving environment to import the
    pyfunc loader module. When it is not installed (a plain checkout), pass ``code_paths=["mlflow_ptycho_flavor"]``
    instead; a warning says so. Nothing else is pinned, as in MLflow's own pytorch flavor: numpy and dill come with
    this package's requirements (ranges), pandas with mlflow's, and none decides what the network computes, while
    every pinned requirement costs each ``mlflow.pyfunc.load_model`` a metadata lookup (0.5-2 ms) in MLflow's
    version check.
    """
    requirements = []
    for package in ("torch", "mlflow", PACKAGE_NAME):
        pinned = pinned_requirement(package)
        if pinned is None:
            if package == PACKAGE_NAME:
                _logger.warning(
                    "%s is not installed as a distribution; the logged model's requirements cannot name it. "
                    "Pass code_paths=[<path to mlflow_ptycho_flavor>] so serving environments can import it.",
                    PACKAGE_NAME,
                )
            continue
        requirements.append(pinned)
    return requirements


def default_conda_env() -> dict[str, Any]:
    return _mlflow_conda_env(additional_pip_deps=default_pip_requirements())


def validate_env_arguments(conda_env: Any, pip_requirements: Any, extra_pip_requirements: Any) -> None:
    _validate_env_arguments(conda_env, pip_requirements, extra_pip_requirements)


def copy_code_paths(code_paths: list[str] | None, path: str) -> str | None:
    return _validate_and_copy_code_paths(code_paths, path)


def add_code_to_system_path(local_path: str, flavor_conf: dict[str, Any]) -> None:
    _add_code_from_conf_to_system_path(local_path, flavor_conf)


#: PyYAML's C parser when it is built in (it is in PyYAML's wheels): ~10x faster than the pure-Python one MLflow's
#: ``Model.load`` uses, which took 3 ms of a 20 ms model load.
_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def flavor_configuration(local_path: str, flavor_name: str) -> dict[str, Any]:
    """The ``flavors[flavor_name]`` section of the MLmodel in ``local_path`` (a model directory).

    Read with the C YAML parser where available; anything unexpected (no MLmodel, no such flavor, YAML this
    reader rejects) goes to MLflow's own reader, which raises its usual ``MlflowException``.
    """
    try:
        with open(os.path.join(local_path, "MLmodel"), encoding="utf-8") as handle:
            section = (yaml.load(handle, Loader=_YAML_LOADER) or {}).get("flavors", {}).get(flavor_name)
        if isinstance(section, dict):
            return section
    except (OSError, yaml.YAMLError, AttributeError, TypeError):
        pass
    return _get_flavor_configuration(model_path=local_path, flavor_name=flavor_name)


def validate_registry_names(registered_model_name: str | None, alias: str | None) -> None:
    """Apply MLflow's own checks to a registered model name and an alias before anything is logged.

    Raises:
        MlflowException: the name or alias is one the registry refuses (``/`` or ``:`` in names, reserved
            aliases such as ``latest`` or ``v3``, characters outside the alias alphabet).
    """
    from mlflow.utils.validation import (
        _validate_model_alias_name,
        _validate_model_alias_name_reserved,
        _validate_model_name,
    )

    if registered_model_name is not None:
        _validate_model_name(registered_model_name)
    if alias is not None:
        _validate_model_alias_name(alias)
        _validate_model_alias_name_reserved(alias)


def download_model(model_uri: str, dst_path: str | None) -> str:
    return _download_artifact_from_uri(artifact_uri=model_uri, output_path=dst_path)


def save_input_example(mlflow_model: Any, input_example: Any, path: str) -> Any:
    return _save_example(mlflow_model, input_example, path)


def write_environment_files(
    path: str,
    *,
    conda_env: Any,
    pip_requirements: Any,
    extra_pip_requirements: Any,
    bundle_package: bool = True,
) -> list[str]:
    """Write the environment files MLflow expects; returns the pip requirements written.

    ``pip_requirements`` / ``extra_pip_requirements`` / ``conda_env`` behave as in ``mlflow.pytorch``. With
    ``bundle_package`` (the default) this package's wheel is stored as ``wheels/<wheel>`` and the requirements
    (``requirements.txt`` and ``conda.yaml``'s pip section) gain ``--find-links wheels``, plus the
    ``mlflow-ptycho-flavor==<version>`` pin when the given requirements do not name the package (as MLflow adds
    ``mlflow`` to a list that lacks it: the pyfunc loader module lives in this package).

    Why ``--find-links`` and not a path line: pip resolves a relative ``--find-links`` inside a requirements file
    against that file's folder, so the pin installs the bundled wheel however the file is used: by MLflow's
    virtualenv/uv builders (which run pip inside a mirror of the model directory), by the Docker image
    ``mlflow models generate-dockerfile`` writes (``pip install -r /opt/ml/model/requirements.txt`` from another
    working directory), or by a user running ``pip install -r <model>/requirements.txt`` from anywhere. A plain
    ``wheels/<file>.whl`` line resolves against the working directory only. The pin keeps its public version, so
    ``pyfunc.load_model`` in the environment that saved the model reports no mismatch.

    MLflow reuses a cached virtualenv when the requirement lines are unchanged, so a model saved after editing
    this package without changing its version is served from an environment built for the earlier code when the
    same ``MLFLOW_ENV_ROOT`` is reused; bump the version or use a fresh ``MLFLOW_ENV_ROOT``.
    """
    if conda_env is None:
        default_reqs = default_pip_requirements() if pip_requirements is None else None
        conda_env, pip_reqs, pip_constraints = _process_pip_requirements(
            default_reqs, pip_requirements, extra_pip_requirements
        )
    else:
        conda_env, pip_reqs, pip_constraints = _process_conda_env(conda_env)
    if bundle_package and _store_package_wheel(path):
        pip_reqs = _with_bundled_package(list(pip_reqs))
        conda_env = _overwrite_pip_deps(conda_env, pip_reqs)
    with open(os.path.join(path, _CONDA_ENV_FILE_NAME), "w") as handle:
        yaml.safe_dump(conda_env, stream=handle, default_flow_style=False)
    if pip_constraints:
        write_to(os.path.join(path, _CONSTRAINTS_FILE_NAME), "\n".join(pip_constraints))
    write_to(os.path.join(path, _REQUIREMENTS_FILE_NAME), "\n".join(pip_reqs))
    _PythonEnv.current().to_yaml(os.path.join(path, _PYTHON_ENV_FILE_NAME))
    return list(pip_reqs)


def _store_package_wheel(path: str) -> bool:
    """Write this package's wheel into ``path/wheels``; False (with a warning) when it cannot be built."""
    wheel = package_wheel()
    if wheel is None:
        _logger.warning(
            "%s is not installed as a distribution, so the model cannot carry its wheel and environments built "
            "from the model (virtualenv/uv env managers, docker images) cannot install it. Install the package "
            "(pip install -e <checkout>) or pass code_paths=[<path to mlflow_ptycho_flavor>].",
            PACKAGE_NAME,
        )
        return False
    wheel.write(os.path.join(path, WHEELS_DIR_NAME))
    return True


def _names_package(line: str) -> bool:
    try:
        return canonicalize_name(Requirement(line).name) == PACKAGE_NAME
    except InvalidRequirement:  # options, file paths, URLs
        return False


def _with_bundled_package(pip_reqs: list[str]) -> list[str]:
    """``--find-links wheels`` first, and the package's pin last unless a requirement already names it."""
    find_links = f"--find-links {WHEELS_DIR_NAME}"
    lines = [find_links, *(line for line in pip_reqs if line != find_links)]
    if not any(_names_package(line) for line in lines):
        pinned = pinned_requirement(PACKAGE_NAME)
        if pinned is not None:
            lines.append(pinned)
    return lines


_SCORING_SERVER = "mlflow.pyfunc.scoring_server"
_DEEP_JSON_MESSAGE = (
    "The request body is nested too deeply to decode (Python's JSON decoder stops near 1,000 levels); ptycho_torch "
    "inputs need at most 6 levels, e.g. {\"inputs\": {\"diffraction\": [[[[...]]]]}}. Send (B, N, N) or "
    "(B, C, N, N) arrays."
)
#: How MLflow's handler prefixes a failed prediction: f"Failed to predict data '{data}'. \nError: {message}".
_ECHO_PREFIX = "Failed to predict data '"
_ECHO_SEPARATOR = "'. \nError: "
#: Longest error message sent back; longer ones (MLflow's own checks may quote a whole request value) are cut.
_MAX_MESSAGE_CHARS = 2000


def _bounded_message(message: str) -> str:
    if message.startswith(_ECHO_PREFIX) and _ECHO_SEPARATOR in message:
        message = "Failed to predict: " + message.split(_ECHO_SEPARATOR, 1)[1]
    if len(message) > _MAX_MESSAGE_CHARS:
        cut = len(message) - _MAX_MESSAGE_CHARS
        message = f"{message[:1500]} [... {cut:,} characters cut ...] {message[-500:]}"
    return message


def guard_scoring_server() -> bool:
    """Keep MLflow's scoring server answers to bad requests a bounded 400 with the model's message.

    Two behaviours of MLflow's ``/invocations`` handler are corrected, by wrapping its ``invocations`` function
    once (the pyfunc loader runs in the server at start-up, after the scoring server module is imported):

    * the body is decoded with ``json.loads``, which raises ``RecursionError`` (not ``JSONDecodeError``) past
      about 1,000 nesting levels; the handler lets it escape and the client gets "500 Internal Server Error".
      It becomes ``MlflowException(BAD_REQUEST)`` with a message saying what is wrong;
    * a prediction error's message is prefixed with the ``str`` of the whole decoded input, which echoes the
      request back (a megabyte dict key comes back as a megabyte answer). The echo is dropped and the model's
      own message (which quotes at most ~100 characters of any value) is kept, with its error code; any message
      still longer than 2,000 characters (MLflow's parameter checks quote whole values) is cut in the middle.

    Everything else is untouched. Outside the scoring server (its module is not imported) nothing happens.

    Returns:
        True when the handler is guarded (now or before).
    """
    module = sys.modules.get(_SCORING_SERVER)
    original = getattr(module, "invocations", None) if module is not None else None
    if original is None:
        return False
    if getattr(original, "_ptycho_guard", False):
        return True
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import BAD_REQUEST

    @functools.wraps(original)
    def invocations(*args: Any, **kwargs: Any) -> Any:
        try:
            return original(*args, **kwargs)
        except RecursionError:
            raise MlflowException(_DEEP_JSON_MESSAGE, error_code=BAD_REQUEST) from None
        except MlflowException as exc:
            if isinstance(exc.message, str):
                exc.message = _bounded_message(exc.message)
            raise

    invocations._ptycho_guard = True  # type: ignore[attr-defined]
    module.invocations = invocations
    return True
