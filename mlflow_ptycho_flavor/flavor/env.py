"""The one module that touches MLflow's private helpers, so an MLflow refactor breaks one file, not the flavor.

Wraps the ``mlflow.utils.*`` functions every built-in flavor uses to validate environment arguments, prepare
the target directory, copy ``code_paths``, and write ``conda.yaml`` / ``python_env.yaml`` /
``requirements.txt`` / ``constraints.txt``.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
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
from packaging.version import InvalidVersion, Version

__all__ = [
    "DEFAULT_AWAIT_MAX_SLEEP_SECONDS",
    "invalid_parameter",
    "CONDA_ENV_FILE_NAME",
    "PYTHON_ENV_FILE_NAME",
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
]

_logger = logging.getLogger(__name__)

CONDA_ENV_FILE_NAME = _CONDA_ENV_FILE_NAME
PYTHON_ENV_FILE_NAME = _PYTHON_ENV_FILE_NAME
PACKAGE_NAME = "mlflow-ptycho-flavor"


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
    """torch, mlflow, dill, numpy, pandas and this package, pinned to the installed public versions.

    This package itself is needed by the serving environment to import the pyfunc loader module. When it is not
    installed (a plain checkout), pass ``code_paths=["mlflow_ptycho_flavor"]`` instead; a warning says so.
    """
    requirements = []
    for package in ("torch", "mlflow", "dill", "numpy", "pandas", PACKAGE_NAME):
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


def flavor_configuration(local_path: str, flavor_name: str) -> dict[str, Any]:
    return _get_flavor_configuration(model_path=local_path, flavor_name=flavor_name)


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
) -> list[str]:
    """Write the environment files MLflow expects; returns the pip requirements written."""
    if conda_env is None:
        default_reqs = default_pip_requirements() if pip_requirements is None else None
        conda_env, pip_reqs, pip_constraints = _process_pip_requirements(
            default_reqs, pip_requirements, extra_pip_requirements
        )
    else:
        conda_env, pip_reqs, pip_constraints = _process_conda_env(conda_env)
    with open(os.path.join(path, _CONDA_ENV_FILE_NAME), "w") as handle:
        yaml.safe_dump(conda_env, stream=handle, default_flow_style=False)
    if pip_constraints:
        write_to(os.path.join(path, _CONSTRAINTS_FILE_NAME), "\n".join(pip_constraints))
    write_to(os.path.join(path, _REQUIREMENTS_FILE_NAME), "\n".join(pip_reqs))
    _PythonEnv.current().to_yaml(os.path.join(path, _PYTHON_ENV_FILE_NAME))
    return list(pip_reqs)
