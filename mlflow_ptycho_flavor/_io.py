"""The package's one atomic writer: files (zip, npz, png) and directories (MLflow models) appear whole or not at all.

Every writer in the package goes through here, so the same guarantees hold everywhere:

* the data is written to a temporary name in the target's own folder and renamed into place (``os.replace`` /
  ``os.rename``), so a reader never sees a half-written file and an existing target survives any failure;
* the temporary file or folder is removed on every failure, including ``KeyboardInterrupt``;
* the result gets the permissions an ordinary file or folder gets under the process's umask (``mkstemp`` and
  ``mkdtemp`` would leave 0600/0700);
* file contents and the rename are flushed to disk (``fsync``) before returning.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO, Union

__all__ = [
    "PathLike",
    "atomic_write",
    "atomic_write_bytes",
    "atomic_directory",
    "file_sha256",
    "stream_sha256",
    "umask_mode",
]

PathLike = Union[str, os.PathLike]


def umask_mode(base: int) -> int:
    """``base`` (0o666 for files, 0o777 for folders) reduced by the process umask, as ``open``/``mkdir`` would."""
    current = os.umask(0)
    os.umask(current)
    return base & ~current


def _fsync_directory(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(
    target: PathLike, write: Callable[[BinaryIO], None], *, verify: Callable[[Path], Any] | None = None
) -> Path:
    """Create or replace ``target`` with what ``write(handle)`` writes to a binary file handle.

    Args:
        target: the file to create or replace; its folder is created when missing.
        write: called once with an open binary handle on the temporary file.
        verify: called with the finished temporary file's path before the rename; if it raises, the temporary
            file is removed and ``target`` is left as it was (e.g. re-reading a written bundle).

    Returns:
        The target path.
    """
    path = Path(os.fspath(target))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, umask_mode(0o666))
        if verify is not None:
            verify(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)
    return path


def atomic_write_bytes(target: PathLike, data: bytes) -> Path:
    """:func:`atomic_write` for a ready ``bytes`` payload."""
    return atomic_write(target, lambda handle: handle.write(data))


@contextlib.contextmanager
def atomic_directory(target: PathLike) -> Iterator[Path]:
    """Yield a staging folder next to ``target``; on normal exit it is renamed onto ``target`` in one step.

    ``target`` must be absent or an empty folder (POSIX ``rename`` replaces an empty folder atomically, so a
    caller's empty target is never removed first). On any exception the staging folder is removed and ``target``
    is left as it was.
    """
    path = Path(os.fspath(target))
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        os.chmod(staging, umask_mode(0o777))
        yield staging
        _rename_directory(staging, path)
    except BaseException:
        import shutil

        shutil.rmtree(staging, ignore_errors=True)
        raise
    _fsync_directory(path.parent)


def _rename_directory(staging: Path, target: Path) -> None:
    try:
        os.rename(staging, target)
        return
    except OSError:
        if not target.is_dir() or any(target.iterdir()):
            raise
    # Platforms that refuse renaming onto an empty folder: remove it, and put it back if the rename still fails.
    target.rmdir()
    try:
        os.rename(staging, target)
    except BaseException:
        target.mkdir(exist_ok=True)
        raise


def stream_sha256(handle: BinaryIO) -> tuple[str, int]:
    """sha256 hex digest and byte count of an open binary file from its start, read in 1 MiB chunks (memory
    bounded whatever the size)."""
    digest = hashlib.sha256()
    handle.seek(0)
    size = 0
    for chunk in iter(lambda: handle.read(1 << 20), b""):
        digest.update(chunk)
        size += len(chunk)
    return digest.hexdigest(), size


def file_sha256(path: PathLike) -> str:
    """sha256 hex digest of the file at ``path`` (:func:`stream_sha256`)."""
    with open(path, "rb") as handle:
        return stream_sha256(handle)[0]
