"""The package's layers import only downwards (docs/architecture.md), and the lower layers never need MLflow."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import textwrap
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "mlflow_ptycho_flavor"

#: Rank of every layer; a module may import from its own rank or below. The package root is the public facade.
RANKS = {
    "errors": 0, "_io": 0,
    "network": 1,
    "bundle": 2,
    "model": 3, "convert": 3,
    "sim": 4,
    "flavor": 5, "_mlflow_hook": 5, "fetch": 5,
    "cli": 6, "demo": 6, "__main__": 6, "__init__": 6,
}
LOWER_LAYERS = ("network", "bundle", "model", "convert", "sim")


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _modules() -> list[tuple[str, Path]]:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        name = ".".join(rel.parts)
        found.append((name[: -len(".__init__")] if name.endswith(".__init__") else name, path))
    return found


def _imports(path: Path) -> list[str]:
    """Every ``mlflow_ptycho_flavor...`` module a file imports, including lazy imports inside functions."""
    targets = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.startswith("mlflow_ptycho_flavor"):
                if node.module == "mlflow_ptycho_flavor":
                    targets.extend(f"mlflow_ptycho_flavor.{alias.name}" for alias in node.names)
                else:
                    targets.append(node.module)
        elif isinstance(node, ast.ImportFrom) and node.level:
            targets.append("<relative>")
        elif isinstance(node, ast.Import):
            targets.extend(a.name for a in node.names if a.name.startswith("mlflow_ptycho_flavor"))
    return targets


def test_every_module_imports_only_from_its_layer_or_below():
    violations = []
    for name, path in _modules():
        own = RANKS[_layer(name)] if name != "mlflow_ptycho_flavor" else RANKS["__init__"]
        for target in _imports(path):
            assert target != "<relative>", f"{name} uses a relative import; the package imports absolutely"
            layer = _layer(target)
            if layer == "FLAVOR_NAME":  # the facade's constant, defined before any submodule is imported
                continue
            if target == "mlflow_ptycho_flavor":
                continue
            if RANKS.get(layer, 99) > own:
                violations.append(f"{name} imports {target}")
    assert violations == []


def test_lower_layers_import_without_mlflow(tmp_path):
    modules = [name for name, _ in _modules() if _layer(name) in LOWER_LAYERS]
    assert {_layer(name) for name in modules} == set(LOWER_LAYERS)
    script = textwrap.dedent(
        f"""
        import importlib, sys
        sys.modules["mlflow"] = None  # any import of mlflow now raises ImportError
        failed = []
        for name in {modules!r}:
            try:
                importlib.import_module(name)
            except Exception as exc:
                failed.append(f"{{name}}: {{type(exc).__name__}}: {{exc}}")
        print("\\n".join(failed) or "ok")
        """
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, (str(PACKAGE.parent), os.environ.get("PYTHONPATH"))))}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env,
                            cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "ok", result.stdout[-3000:]
