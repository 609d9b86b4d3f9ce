#!/usr/bin/env bash
# The GPU check of issue 17: CUDA-marked tests, predict/load/serving benchmark rows on `cuda`, half precision /
# TF32 / torch.compile against fp32, written to benchmarks/RESULTS-gpu.md (benchmarks/gpu_check.py does the work).
#
#   bash benchmarks/gpu_check.sh [--dry-run] [--out FILE.md] [--records FILE.json] [--only tests,predict,...]
#
# The interpreter: $PYTHON (a path or a command name) if set, else the repository's .venv/bin/python; it is called
# by absolute path, never through an activated environment. The repository root comes from this file's location,
# and goes first on PYTHONPATH so that this checkout's package is the one measured. GPU_CHECK_DEVICE=cpu is the
# same as --dry-run (every step on the CPU with tiny sizes, output in a temporary folder).
set -euo pipefail

repo="$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd -P)"

if [[ -n "${PYTHON:-}" ]]; then
    python="$(command -v -- "$PYTHON" || true)"
    [[ -n "$python" ]] || { echo "gpu_check.sh: PYTHON=$PYTHON is not an executable" >&2; exit 2; }
elif [[ -x "$repo/.venv/bin/python" ]]; then
    python="$repo/.venv/bin/python"
else
    echo "gpu_check.sh: no $repo/.venv/bin/python; set PYTHON to the interpreter that has torch and mlflow" >&2
    exit 2
fi
# absolute, without resolving symbolic links (a venv's python is a link to the base interpreter)
[[ "$python" == /* ]] || python="$PWD/$python"

args=("$@")
if [[ "${GPU_CHECK_DEVICE:-cuda}" == "cpu" ]]; then
    args=(--dry-run "${args[@]}")
fi

missing="$("$python" - <<'PY'
import importlib.util
print(" ".join(m for m in ("torch", "mlflow", "pytest", "h5py", "numpy") if importlib.util.find_spec(m) is None))
PY
)"
if [[ -n "$missing" ]]; then
    echo "gpu_check.sh: $python lacks: $missing (install them, or point PYTHON at an interpreter that has them)" >&2
    exit 2
fi

cd -- "$repo"
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export MLFLOW_DISABLE_ENV_MANAGER_CONDA_WARNING=true
exec "$python" "$repo/benchmarks/gpu_check.py" "${args[@]}"
