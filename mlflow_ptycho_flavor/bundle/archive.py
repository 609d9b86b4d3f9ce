"""Bounded, in-memory access to zip archives, and the deterministic zip writer (docs/bundle-format.md §1, §5).

The reader never extracts to disk and never writes anything: it opens regular files only (no FIFOs, devices or
directories), reads named members into memory with size caps, and refuses path tricks, symlinks, duplicate
names, encrypted members and zip bombs. The writer produces byte-identical archives for identical members
(fixed timestamps and modes) through the package's one atomic writer.
"""

from __future__ import annotations

import io
import os
import stat
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Callable

from mlflow_ptycho_flavor._io import PathLike, atomic_write
from mlflow_ptycho_flavor.bundle.identify import FOREIGN_KINDS, ArtifactKind, identify_artifact, open_regular_file
from mlflow_ptycho_flavor.errors import (
    BundleError,
    CorruptBundleError,
    NotABundleError,
    TensorFlowBundleError,
    UnsafeBundleError,
    UnsupportedBundleError,
    short_repr,
)

__all__ = [
    "BUNDLE_FILE_NAME",
    "BundleLimits",
    "DEFAULT_LIMITS",
    "looks_like_bundle_path",
    "ArchiveReader",
    "not_a_bundle_error",
    "resolve_bundle_path",
    "write_zip",
]

BUNDLE_FILE_NAME = "wts.h5.zip"
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)


@dataclass(frozen=True)
class BundleLimits:
    """Caps that keep a hostile archive from exhausting memory (all configurable).

    Attributes:
        max_members: most entries the central directory may list.
        max_member_bytes: largest uncompressed member.
        max_total_bytes: largest sum of uncompressed sizes of the members read.
        max_compression_ratio: largest uncompressed/compressed ratio for members above ``ratio_floor_bytes``.
        ratio_floor_bytes: members smaller than this are exempt from the ratio check (tiny pickles compress
            well legitimately).
    """

    max_members: int = 64
    max_member_bytes: int = 2 * 1024**3
    max_total_bytes: int = 4 * 1024**3
    max_compression_ratio: float = 200.0
    ratio_floor_bytes: int = 1024 * 1024


DEFAULT_LIMITS = BundleLimits()


def looks_like_bundle_path(target: str) -> bool:
    """True when ``target`` names a bundle file (``*.zip``, upstream's base ``*.h5``, or an existing file) rather
    than an MLflow model URI or model directory."""
    if "://" in target or target.startswith(("runs:", "models:")):
        return False
    path = Path(target)
    return path.suffix == ".zip" or path.name.endswith(".h5") or path.is_file()


def resolve_bundle_path(path: PathLike, *, for_writing: bool = False) -> Path:
    """Map the accepted path forms to the archive path.

    ``out/wts.h5`` (upstream's base path) -> ``out/wts.h5.zip``; a directory -> ``<dir>/wts.h5.zip``; a path
    ending in ``.zip`` is used as is.
    """
    p = Path(os.fspath(path)).expanduser()
    if p.suffix == ".zip":
        return p
    if p.is_dir():
        return p / BUNDLE_FILE_NAME
    if for_writing or not p.exists():
        return p.with_name(p.name + ".zip")
    return p


def _check_member_name(name: str) -> None:
    parts = name.replace("\\", "/").split("/")
    bad = (
        name.startswith(("/", "\\"))
        or "\\" in name
        or "\x00" in name
        or (len(name) >= 2 and name[1] == ":")
        or any(part in ("..", ".") for part in parts)
    )
    if bad:
        raise UnsafeBundleError(
            f"archive member name {short_repr(name)} is absolute or escapes the archive (.., drive letter, backslash); "
            "a bundle never needs such names, so the archive is refused"
        )


def not_a_bundle_error(path: Path, problem: str, fallback: type[BundleError]) -> BundleError:
    """The error for a file the bundle reader cannot take: ``problem`` plus what the file is and what to do with it.

    The file is identified from bounded reads (:func:`~.identify.identify_artifact`, docs/bundle-format.md §11).
    A TensorFlow archive gives :class:`~mlflow_ptycho_flavor.errors.TensorFlowBundleError`; a Lightning
    checkpoint, a bare state_dict or an NPZ dataset gives :class:`~mlflow_ptycho_flavor.errors.NotABundleError`.
    For those the message names what the file is instead of ``problem`` (whichever bundle check tripped first -
    "lists 248 members" - would only mislead). Anything else gives ``fallback``: ``problem`` plus the description.
    """
    info = identify_artifact(path)
    if info.kind is ArtifactKind.TENSORFLOW_ARCHIVE:
        return TensorFlowBundleError(f"{path} is not a PyTorch bundle but {info.what_and_fix()}")
    if info.kind in FOREIGN_KINDS:
        return NotABundleError(f"{path} is not a PtychoPINN bundle but {info.what_and_fix()}")
    if info.kind is ArtifactKind.TORCH_BUNDLE:  # a damaged or tampered bundle: the problem says it all
        return fallback(problem)
    return fallback(f"{problem}. It is {info.what_and_fix()}")


class ArchiveReader:
    """In-memory, size-capped access to the members of a zip archive.

    Args:
        path: the archive file (opened as a regular file only), or with ``data`` the label used in messages.
        limits: the caps.
        data: read the archive from these bytes instead (e.g. a zip nested inside another archive).
    """

    def __init__(self, path: Path, limits: BundleLimits, *, data: bytes | None = None) -> None:
        self.path = path
        self.limits = limits
        self._total = 0
        self._in_memory = data is not None
        self._file: BinaryIO = io.BytesIO(data) if data is not None else self._open_regular_file(path)
        try:
            head = self._file.read(4)
            self._file.seek(0)
            self._zip = zipfile.ZipFile(self._file, "r")
        except zipfile.BadZipFile as exc:
            self._file.close()
            hint = (
                "it starts like one, so it is probably truncated or damaged - re-download or re-copy it"
                if head == b"PK\x03\x04"
                else "a PtychoPINN bundle is a wts.h5.zip written by save_torch_bundle or upstream's model manager - "
                "check the path"
            )
            raise self.refusal(f"{path} is not a zip archive ({exc}); {hint}", NotABundleError) from exc
        except Exception as exc:  # noqa: BLE001 - zipfile parsing untrusted bytes: anything is "damaged"
            self._file.close()
            raise CorruptBundleError(
                f"{path} cannot be read as a zip archive: {type(exc).__name__}: {exc}"
            ) from exc
        try:
            self._infos = self._index()
        except BaseException:
            self.close()
            raise

    def refusal(self, problem: str, fallback: type[BundleError]) -> BundleError:
        """The error for an archive that is not a readable bundle, naming what the file is
        (:func:`not_a_bundle_error`); archives read from memory have no file to identify and get ``fallback``."""
        if self._in_memory:
            return fallback(problem)
        return not_a_bundle_error(self.path, problem, fallback)

    @staticmethod
    def _open_regular_file(path: Path) -> BinaryIO:
        try:
            return open_regular_file(path)
        except FileNotFoundError as exc:
            raise NotABundleError(f"no bundle at {path}: the file does not exist") from exc
        except IsADirectoryError as exc:
            raise NotABundleError(f"{path} is a directory, not a wts.h5.zip archive") from exc
        except (OSError, ValueError) as exc:  # ValueError: a NUL byte in the path
            raise NotABundleError(f"{short_repr(str(path))} cannot be opened: {exc}") from exc

    def _index(self) -> dict[str, zipfile.ZipInfo]:
        infos = self._zip.infolist()
        if len(infos) > self.limits.max_members:
            raise self.refusal(
                f"{self.path} lists {len(infos)} members (limit {self.limits.max_members}); a bundle has 6",
                UnsafeBundleError,
            )
        index: dict[str, zipfile.ZipInfo] = {}
        for info in infos:
            _check_member_name(info.filename)
            if info.filename in index:
                raise UnsafeBundleError(
                    f"{self.path} holds the member {info.filename!r} twice; which copy a reader sees would be "
                    "ambiguous, so the archive is refused"
                )
            mode = (info.external_attr >> 16) & 0xFFFF
            if stat.S_ISLNK(mode):
                raise UnsafeBundleError(f"{self.path}: member {info.filename!r} is a symbolic link; refused")
            index[info.filename] = info
        return index

    @property
    def names(self) -> list[str]:
        return list(self._infos)

    def __contains__(self, name: str) -> bool:
        return name in self._infos

    def size(self, name: str) -> int:
        return self._infos[name].file_size

    def read(self, name: str) -> bytes:
        info = self._infos.get(name)
        if info is None:
            raise CorruptBundleError(
                f"{self.path} lacks the member {short_repr(name)}; members present: {sorted(self._infos)}"
            )
        limits = self.limits
        if info.file_size > limits.max_member_bytes:
            raise UnsafeBundleError(
                f"member {short_repr(name)} expands to {info.file_size} bytes, over the per-member cap of "
                f"{limits.max_member_bytes} (BundleLimits.max_member_bytes)"
            )
        if self._total + info.file_size > limits.max_total_bytes:
            raise UnsafeBundleError(
                f"members read so far expand past the total cap of {limits.max_total_bytes} bytes "
                "(BundleLimits.max_total_bytes)"
            )
        if info.file_size >= limits.ratio_floor_bytes:
            ratio = info.file_size / max(info.compress_size, 1)
            if ratio > limits.max_compression_ratio:
                raise UnsafeBundleError(
                    f"member {short_repr(name)} has a compression ratio of {ratio:.0f}:1, over the cap of "
                    f"{limits.max_compression_ratio:.0f}:1 (a zip bomb?); raise BundleLimits.max_compression_ratio "
                    "if the file is trusted"
                )
        if info.flag_bits & 0x1:
            raise UnsupportedBundleError(
                f"member {short_repr(name)} of {self.path} is encrypted; bundles are never encrypted, so it is not read"
            )
        try:
            # zipfile stops at the declared size and checks the CRC, so memory is bounded by the caps above.
            with self._zip.open(info) as handle:
                data = handle.read(info.file_size + 1)
        except zipfile.BadZipFile as exc:
            raise CorruptBundleError(f"member {short_repr(name)} of {self.path} is damaged: {exc}") from exc
        except NotImplementedError as exc:
            raise UnsupportedBundleError(f"member {short_repr(name)} uses an unsupported zip feature: {exc}") from exc
        except Exception as exc:  # noqa: BLE001 - zlib/bz2/lzma/struct errors on untrusted bytes: damaged
            raise CorruptBundleError(
                f"member {short_repr(name)} of {self.path} cannot be decompressed: {type(exc).__name__}: {exc}"
            ) from exc
        if len(data) != info.file_size:
            raise CorruptBundleError(
                f"member {short_repr(name)} of {self.path} decompressed to {len(data)} bytes, header says {info.file_size}"
            )
        self._total += len(data)
        return data

    def close(self) -> None:
        try:
            self._zip.close()
        finally:
            self._file.close()


def _zip_info(name: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name, date_time=_ZIP_DATE)
    # Every member deflated, as upstream writes them. (Storing model.pth uncompressed loads faster, but a file cut
    # short inside it would expose the nested torch zip's own directory to zip readers.)
    info.compress_type = zipfile.ZIP_DEFLATED
    info.external_attr = (stat.S_IFREG | 0o644) << 16
    return info


def write_zip(
    target: PathLike, members: list[tuple[str, bytes]], *, verify: Callable[[Path], Any] | None = None
) -> Path:
    """Write ``members`` (name, bytes) as a zip archive at ``target``, atomically and deterministically.

    ``verify`` (e.g. the bundle reader) is called on the finished temporary file; if it raises, ``target`` is
    left as it was.
    """

    def write(handle) -> None:
        with zipfile.ZipFile(handle, "w", compression=zipfile.ZIP_DEFLATED) as archive:
            for name, data in members:
                archive.writestr(_zip_info(name), data)

    return atomic_write(target, write, verify=verify)
