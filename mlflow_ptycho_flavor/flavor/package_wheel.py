"""A wheel of this package assembled from the code that is running, so a saved model can carry it.

``mlflow-ptycho-flavor`` is on no package index, so a model whose ``requirements.txt`` only pins it cannot have its
environment rebuilt from the model alone (``--env-manager virtualenv``/``uv``, ``mlflow models build-docker`` /
``generate-dockerfile``): the pin fails with "No matching distribution found". :func:`package_wheel` builds a wheel
that ``save_model`` stores in the model directory (``flavor/env.py`` points the requirements at it).

The wheel is assembled directly in the binary distribution format (PEP 427, with a PEP 376 ``RECORD``): no pip, no
build backend, no network, milliseconds. It holds

* every ``*.py`` file and ``py.typed`` of the package folder that is imported now (the files ``setup.cfg`` ships),
  so the model carries exactly the code that saved it, also from an editable install or a source checkout;
* ``METADATA`` and ``entry_points.txt`` of the installed distribution (name, summary, ``Requires-Dist``, the
  ``ptycho-flavor`` script), with the version given a local label naming the content:
  ``0.1.0+sha.<16 hex digits of the content digest>``. A pin ``mlflow-ptycho-flavor==0.1.0`` matches it (PEP 440
  ignores local labels when the pin has none), and because a local version sorts above its public one and package
  indexes refuse local versions, an installer offered both prefers the bundled wheel.

The same files give the same wheel bytes (sorted members, fixed timestamps, ``bundle.archive.write_zip``), and the
result is cached per process by content digest, so logging many models re-reads the package files but builds the
wheel once.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata
import os
import threading
from dataclasses import dataclass
from pathlib import Path

from packaging.version import InvalidVersion, Version

from mlflow_ptycho_flavor.bundle.archive import write_zip

__all__ = ["PACKAGE_NAME", "PackageWheel", "package_wheel"]

PACKAGE_NAME = "mlflow-ptycho-flavor"
_IMPORT_NAME = "mlflow_ptycho_flavor"
_PACKAGE_DIR = Path(__file__).resolve().parent.parent
#: Metadata headers dropped from the copied METADATA: license files are not shipped in the wheel.
_DROPPED_HEADERS = ("license-file:",)
_WHEEL_FILE = (
    "Wheel-Version: 1.0\n"
    "Generator: mlflow-ptycho-flavor (flavor.package_wheel)\n"
    "Root-Is-Purelib: true\n"
    "Tag: py3-none-any\n"
)


@dataclass(frozen=True)
class PackageWheel:
    """A built wheel of this package: its file name, version, content digest and archive members."""

    file_name: str
    version: str
    digest: str
    members: tuple[tuple[str, bytes], ...]

    def write(self, folder: str | os.PathLike) -> Path:
        """Write the wheel as ``folder/<file_name>`` (atomically; the folder is created when missing)."""
        return write_zip(Path(os.fspath(folder)) / self.file_name, list(self.members))


_cache: dict[str, PackageWheel] = {}
_cache_lock = threading.Lock()


def package_wheel() -> PackageWheel | None:
    """The wheel of the running package, or None when no installed distribution provides its metadata.

    Without ``mlflow_ptycho_flavor-*.dist-info`` (a plain checkout on ``sys.path``, never ``pip install``-ed) there
    is no ``Requires-Dist`` to declare, so no wheel is built; the caller says what to do instead.
    """
    try:
        distribution = importlib.metadata.distribution(PACKAGE_NAME)
    except importlib.metadata.PackageNotFoundError:
        return None
    metadata_text = distribution.read_text("METADATA") or distribution.read_text("PKG-INFO")
    if not metadata_text:
        return None
    public_version = _public_version(distribution.version)
    sources = _package_files()
    entry_points = distribution.read_text("entry_points.txt")
    digest = _content_digest(sources, metadata_text, entry_points)
    with _cache_lock:
        cached = _cache.get(digest)
        if cached is None:
            cached = _cache[digest] = _assemble(sources, metadata_text, entry_points, public_version, digest)
    return cached


def _public_version(raw: str) -> str:
    try:
        return Version(raw).public
    except InvalidVersion:
        return raw.split("+", 1)[0]


def _package_files() -> list[tuple[str, bytes]]:
    """``(archive name, bytes)`` of every ``*.py`` and ``py.typed`` in the imported package's folders, sorted.

    Like setuptools' ``packages = find:``, only folders with an ``__init__.py`` count; caches, hidden entries and
    symbolic links are skipped.
    """
    found = []
    for folder, subfolders, names in os.walk(_PACKAGE_DIR):
        subfolders[:] = sorted(d for d in subfolders if not d.startswith((".", "__pycache__")))
        if "__init__.py" not in names:
            subfolders[:] = []
            continue
        for name in sorted(names):
            path = Path(folder) / name
            if name.startswith(".") or path.is_symlink() or not (name.endswith(".py") or name == "py.typed"):
                continue
            archive_name = path.relative_to(_PACKAGE_DIR.parent).as_posix()
            found.append((archive_name, path.read_bytes()))
    return sorted(found)


def _content_digest(sources: list[tuple[str, bytes]], metadata_text: str, entry_points: str | None) -> str:
    digest = hashlib.sha256()
    for name, data in [*sources, ("METADATA", metadata_text.encode()), ("entry_points", (entry_points or "").encode())]:
        digest.update(name.encode() + b"\0" + hashlib.sha256(data).digest())
    return digest.hexdigest()


def _metadata_with_version(metadata_text: str, version: str) -> str:
    """The distribution's METADATA with its ``Version`` replaced and the license-file headers dropped.

    Only the header block (up to the first empty line) is rewritten; the description body stays byte for byte.
    """
    header, separator, body = metadata_text.partition("\n\n")
    lines = []
    for line in header.split("\n"):
        lowered = line.lower()
        if lowered.startswith("version:"):
            line = f"Version: {version}"
        elif lowered.startswith(_DROPPED_HEADERS):
            continue
        lines.append(line)
    return "\n".join(lines) + separator + body


def _record_line(name: str, data: bytes) -> str:
    hashed = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={hashed},{len(data)}"


def _assemble(
    sources: list[tuple[str, bytes]],
    metadata_text: str,
    entry_points: str | None,
    public_version: str,
    digest: str,
) -> PackageWheel:
    version = f"{public_version}+sha.{digest[:16]}"
    dist_info = f"{_IMPORT_NAME}-{version}.dist-info"
    members = list(sources)
    members.append((f"{dist_info}/METADATA", _metadata_with_version(metadata_text, version).encode()))
    members.append((f"{dist_info}/WHEEL", _WHEEL_FILE.encode()))
    if entry_points:
        members.append((f"{dist_info}/entry_points.txt", entry_points.encode()))
    record_name = f"{dist_info}/RECORD"
    record = "\n".join([*(_record_line(name, data) for name, data in members), f"{record_name},,"]) + "\n"
    members.append((record_name, record.encode()))
    return PackageWheel(
        file_name=f"{_IMPORT_NAME}-{version}-py3-none-any.whl",
        version=version,
        digest=digest,
        members=tuple(members),
    )
