"""Bounded, in-memory access to zip archives, and the deterministic zip writer (docs/bundle-format.md §1, §5).

The reader never extracts to disk and never writes anything: it opens regular files only (no FIFOs, devices or
directories), reads named members into memory with size caps, and refuses path tricks, symlinks, duplicate
names, encrypted members and zip bombs. No cap trusts a number the archive declares: the central directory's
entry count and size are checked from the end-of-central-directory record before ``zipfile`` parses a single
entry, the compression ratio is computed against the bytes a member really occupies in the file (not its declared
compressed size), and members are inflated through a reader that stops at the cap. A zip nested in a member (the
torch zip inside ``model.pth``) gets the same checks (:func:`check_nested_zip`). The writer produces
byte-identical archives for identical members (fixed timestamps and modes) through the package's one atomic
writer, and refuses to write an archive the reader would refuse (:func:`size_problem`). Members that are zip files
themselves (torch's format: ``model.pth``, ``torch_scaling_metadata.pt``) are stored, the pickles deflated
(docs/bundle-format.md §1.3); stored members are read straight from the file, and an archive whose directory is not
the file's own (a file cut short after a stored zip member exposes that member's directory) is refused as
truncated.
"""

from __future__ import annotations

import bisect
import io
import os
import stat
import struct
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Callable

from mlflow_ptycho_flavor._io import PathLike, atomic_write
from mlflow_ptycho_flavor.bundle.identify import (
    FOREIGN_KINDS,
    ArtifactKind,
    directory_belongs_inside,
    directory_extent,
    identify_artifact,
    open_regular_file,
)
from mlflow_ptycho_flavor.errors import (
    BundleError,
    CorruptBundleError,
    NotABundleError,
    TensorFlowBundleError,
    UnsafeBundleError,
    UnsupportedBundleError,
    short_error,
    short_message,
    short_repr,
)

__all__ = [
    "BUNDLE_FILE_NAME",
    "BundleLimits",
    "DEFAULT_LIMITS",
    "looks_like_bundle_path",
    "ArchiveReader",
    "MemberView",
    "not_a_bundle_error",
    "check_nested_zip",
    "RecordSpan",
    "resolve_bundle_path",
    "size_problem",
    "write_zip",
]

BUNDLE_FILE_NAME = "wts.h5.zip"
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)
#: Central-directory bytes allowed per member the limits allow (an entry is 46 bytes plus its name and extras;
#: bundle names are a few dozen characters).
_DIRECTORY_BYTES_PER_ENTRY = 1024
_READ_CHUNK = 1 << 20
#: Largest directory a refused archive may have for the refusal to identify what the file is (identification
#: parses it); foreign files that reach the bundle reader (checkpoints, TensorFlow archives) list a few hundred.
_IDENTIFIABLE_ENTRIES = 4096
_LOCAL_HEADER = struct.Struct("<4s5H3L2H")


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


def _directory_problem(
    handle: io.BufferedIOBase | io.BytesIO, where: str, max_entries: int, usual: str
) -> tuple[str | None, tuple[int, int] | None]:
    """Why a central directory is too large to parse cheaply (or None), and its ``(entries, bytes)`` (None when
    there is no end record: then no reader parses anything).

    Read from the end record the way ``zipfile`` reads it (:func:`directory_extent`), before ``zipfile`` (or torch)
    parses anything: ``zipfile`` builds one ``ZipInfo`` per entry until it has consumed the directory size the end
    record declares, so a million entries cost seconds and hundreds of megabytes before any count could be checked.
    """
    extent = directory_extent(handle)
    handle.seek(0)
    if extent is None:
        return None, None
    entries, directory_bytes = extent
    if entries > max_entries:
        return (
            f"{where} lists {entries} members (limit {max_entries}); {usual} - refused before its central "
            "directory is parsed"
        ), extent
    if directory_bytes > max_entries * _DIRECTORY_BYTES_PER_ENTRY:
        return (
            f"{where} has a central directory of {directory_bytes} bytes, more than {max_entries} entries can need "
            f"({max_entries * _DIRECTORY_BYTES_PER_ENTRY}); refused before parsing it"
        ), extent
    return None, extent


def size_problem(name: str, size: int, compressed: int, limits: BundleLimits, *, genuine_bytes: int = 0) -> str | None:
    """Why a member of ``size`` bytes occupying ``compressed`` bytes of the file breaks ``limits``, or None.

    The one rule the reader applies before inflating a member and the writer applies before publishing a bundle.
    The compression-ratio cap applies to the bytes beyond ``max(limits.ratio_floor_bytes, genuine_bytes)``:
    ``genuine_bytes`` is what the member can legitimately hold (for ``model.pth``: what the configured network's
    weights need), so a zero-initialised network, which deflates ~1000:1, is not taken for a zip bomb.
    """
    if size > limits.max_member_bytes:
        return (
            f"member {short_repr(name)} expands to {size} bytes, over the per-member cap of "
            f"{limits.max_member_bytes} (BundleLimits.max_member_bytes)"
        )
    if size >= limits.ratio_floor_bytes and size > genuine_bytes:
        ratio = size / max(compressed, 1)
        if ratio > limits.max_compression_ratio:
            return (
                f"member {short_repr(name)} has a compression ratio of {ratio:.0f}:1, over the cap of "
                f"{limits.max_compression_ratio:.0f}:1 (a zip bomb?); raise BundleLimits.max_compression_ratio "
                "if the file is trusted"
            )
    return None


@dataclass(frozen=True)
class RecordSpan:
    """Where an entry's data lies in its zip: ``start`` (after the local header), the bytes it really ``occupies``
    (never more than it declares), its uncompressed ``size`` and its compression ``method``."""

    start: int
    occupies: int
    size: int
    method: int

    @property
    def stored_intact(self) -> bool:
        """Stored (not deflated), with every declared byte present before the next structure."""
        return self.method == zipfile.ZIP_STORED and self.occupies == self.size


def _span(handle: io.BufferedIOBase | io.BytesIO, info: zipfile.ZipInfo, end: int) -> RecordSpan:
    """The :class:`RecordSpan` of ``info``: its data runs from the local header's end to the next structure
    (``end``: the next local header or the central directory), never further than it declares."""
    unreadable = RecordSpan(0, 0, info.file_size, info.compress_type)
    if info.header_offset < 0:  # a directory offset pointing before the file: zipfile reports it when reading
        return unreadable
    handle.seek(info.header_offset)
    header = handle.read(_LOCAL_HEADER.size)
    if len(header) != _LOCAL_HEADER.size:
        return unreadable
    fields = _LOCAL_HEADER.unpack(header)
    data_start = info.header_offset + _LOCAL_HEADER.size + fields[9] + fields[10]
    return RecordSpan(data_start, max(0, min(info.compress_size, end - data_start)), info.file_size, info.compress_type)


def _spans(
    handle: io.BufferedIOBase | io.BytesIO, infos: list[zipfile.ZipInfo], directory_start: int
) -> dict[str, RecordSpan]:
    """:func:`_span` of every entry (the end of each is the next header offset above it)."""
    offsets = sorted({info.header_offset for info in infos} | {directory_start})
    result = {}
    for info in infos:
        following = bisect.bisect_right(offsets, info.header_offset)
        end = offsets[following] if following < len(offsets) else directory_start
        result[info.filename] = _span(handle, info, end)
    return result


def check_nested_zip(
    data: bytes | MemberView, member: str, *, max_inflated_bytes: int, max_entries: int
) -> dict[str, RecordSpan]:
    """Check a zip held in a member (torch's format inside ``model.pth``) before another reader parses it.

    Refused: a central directory over ``max_entries`` entries; encrypted records; stored records whose declared
    size differs from what they occupy; and records whose inflated sizes add up to more than
    ``max_inflated_bytes``, which torch's reader would allocate (its records may be deflated like any zip's).

    Returns:
        Every record's :class:`RecordSpan` by name (empty when the bytes hold no zip directory at all, which
        torch's reader refuses in turn).

    Raises:
        UnsafeBundleError: over a cap. CorruptBundleError: not a readable zip.
    """
    handle: Any = io.BytesIO(data) if isinstance(data, (bytes, bytearray, memoryview)) else data
    problem, extent = _directory_problem(handle, member, max_entries, "a torch file has one per tensor plus six")
    if problem:
        raise UnsafeBundleError(problem)
    if extent is None:
        return {}  # no end record: torch's reader finds no directory either and refuses the file
    try:
        with zipfile.ZipFile(handle) as nested:
            infos = nested.infolist()
            spans = _spans(handle, infos, nested.start_dir)
    except (zipfile.BadZipFile, OSError, ValueError, struct.error, EOFError) as exc:
        raise CorruptBundleError(f"{member} is not a valid torch file: {short_error(exc)}") from exc
    total = 0
    for info in infos:
        if info.flag_bits & 0x1:
            raise UnsupportedBundleError(f"{member} holds the encrypted record {short_repr(info.filename)}")
        if info.compress_type == zipfile.ZIP_STORED and spans[info.filename].occupies != info.file_size:
            raise CorruptBundleError(
                f"{member}: the stored record {short_repr(info.filename)} declares {info.file_size} bytes but "
                f"occupies {spans[info.filename].occupies}; the file is damaged"
            )
        total += info.file_size
    if total > max_inflated_bytes:
        raise UnsafeBundleError(
            f"{member}'s records expand to {total} bytes, more than the {max_inflated_bytes} it can genuinely "
            "need (records deflated inside the torch file: a zip bomb?); refused before torch reads them"
        )
    return spans


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


#: Most bytes :meth:`MemberView.load` asks one ``preadv`` for (Linux returns at most 0x7ffff000 per call; macOS
#: refuses requests over 2**31 - 1).
_LOAD_REQUEST_BYTES = 1 << 30


class MemberView(io.RawIOBase):
    """Read-only, seekable bytes ``[start, start + size)`` of an open file, read with ``os.pread`` (no shared file
    position: a worker thread can hash the same bytes meanwhile). Reading past the end returns nothing.

    After :meth:`load` the bytes are in memory (:attr:`memory`) and every read is served from there.
    """

    def __init__(self, fd: int, start: int, size: int) -> None:
        super().__init__()
        self._fd, self._start, self._size, self._position = fd, start, size, 0
        self._memory: memoryview | None = None

    @property
    def size(self) -> int:
        return self._size

    @property
    def memory(self) -> memoryview | None:
        """The view's bytes once :meth:`load` read them: a writable byte view of the buffer it was given, which it
        keeps alive (``torch.frombuffer`` takes it as it is)."""
        return self._memory

    def load(self, buffer: Any) -> bool:
        """Read the whole view into ``buffer`` (a writable buffer of exactly :attr:`size` bytes), in one ``preadv``
        up to :data:`_LOAD_REQUEST_BYTES` (the kernel returns at most ~2 GiB per call, some systems refuse larger
        requests); from then on reads are served from it. Returns False, leaving the view as it was, where the file
        ends first (it shrank since the archive was opened)."""
        target = memoryview(buffer).cast("B")
        if len(target) != self._size:
            raise ValueError(f"load needs a buffer of {self._size} bytes, got {len(target)}")
        received = 0
        while received < self._size:
            count = min(self._size - received, _LOAD_REQUEST_BYTES)
            got = os.preadv(self._fd, [target[received : received + count]], self._start + received)
            if got <= 0:
                return False
            received += got
        self._memory = target
        return True

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._position, os.SEEK_END: self._size}[whence]
        if base + offset < 0:
            raise ValueError("negative seek position")
        self._position = base + offset
        return self._position

    def pread(self, count: int, offset: int) -> bytes:
        """Up to ``count`` bytes at ``offset`` within the view."""
        count = max(0, min(count, self._size - offset))
        if not count:
            return b""
        if self._memory is not None:
            return bytes(self._memory[offset : offset + count])
        return os.pread(self._fd, count, self._start + offset)

    def read(self, count: int = -1) -> bytes:
        data = self.pread(self._size - self._position if count is None or count < 0 else count, self._position)
        self._position += len(data)
        return data

    def readinto(self, buffer: Any) -> int:
        received = self.readinto_at(buffer, self._position)
        self._position += received
        return received

    def readinto_at(self, buffer: Any, offset: int) -> int:
        """Fill ``buffer`` from ``offset`` within the view (straight from the file, no copy in between); returns the
        bytes read, fewer only at the view's end."""
        target = memoryview(buffer).cast("B")
        count = max(0, min(len(target), self._size - offset))
        if not count:
            return 0
        if self._memory is not None:
            target[:count] = self._memory[offset : offset + count]
            return count
        return os.preadv(self._fd, [target[:count]], self._start + offset)

    def startswith(self, prefix: bytes) -> bool:
        return self.pread(len(prefix), 0) == prefix


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
            if directory_belongs_inside(self._file):
                raise CorruptBundleError(
                    f"{path} is cut short or damaged: the zip directory at its end belongs to a zip stored inside one "
                    "of its members (what a copy truncated after its weights shows); re-download or re-copy it"
                )
            problem, extent = _directory_problem(self._file, str(path), limits.max_members, "a bundle has 6")
            if problem:
                # A foreign file with a modest directory (a Lightning checkpoint: hundreds of records) is named for
                # what it is; identifying parses that directory, so a huge one is refused as it stands.
                entries, directory_bytes = extent
                small = entries <= _IDENTIFIABLE_ENTRIES and directory_bytes <= _IDENTIFIABLE_ENTRIES * 1024
                raise self.refusal(problem, UnsafeBundleError) if small else UnsafeBundleError(problem)
            self._zip = zipfile.ZipFile(self._file, "r")
        except BundleError:
            self._file.close()
            raise
        except zipfile.BadZipFile as exc:
            self._file.close()
            hint = (
                "it starts like one, so it is probably truncated or damaged - re-download or re-copy it"
                if head == b"PK\x03\x04"
                else "a PtychoPINN bundle is a wts.h5.zip written by save_torch_bundle or upstream's model manager - "
                "check the path"
            )
            raise self.refusal(f"{path} is not a zip archive ({short_message(exc)}); {hint}", NotABundleError) from exc
        except Exception as exc:  # noqa: BLE001 - zipfile parsing untrusted bytes: anything is "damaged"
            self._file.close()
            raise CorruptBundleError(f"{path} cannot be read as a zip archive: {short_error(exc)}") from exc
        try:
            self._infos = self._index()
            self._occupied = {
                name: span.occupies
                for name, span in _spans(self._file, list(self._infos.values()), self._zip.start_dir).items()
            }
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
            raise NotABundleError(f"{short_repr(str(path))} cannot be opened: {short_message(exc)}") from exc

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
                    f"{self.path} holds the member {short_repr(info.filename)} twice; which copy a reader sees "
                    "would be ambiguous, so the archive is refused"
                )
            mode = (info.external_attr >> 16) & 0xFFFF
            if stat.S_ISLNK(mode):
                raise UnsafeBundleError(f"{self.path}: member {short_repr(info.filename)} is a symbolic link; refused")
            index[info.filename] = info
        return index

    @property
    def names(self) -> list[str]:
        return list(self._infos)

    def __contains__(self, name: str) -> bool:
        return name in self._infos

    def size(self, name: str) -> int:
        return self._infos[name].file_size

    def stored(self, name: str) -> bool:
        """Whether the member is stored uncompressed (read straight from the file; its CRC is the caller's to check
        when read with ``verify_crc=False``)."""
        return self._infos[name].compress_type == zipfile.ZIP_STORED

    def crc(self, name: str) -> int:
        """The CRC-32 the central directory records for the member."""
        return self._infos[name].CRC

    def read(self, name: str, *, genuine_bytes: int = 0, verify_crc: bool = True) -> bytes:
        """The member's bytes, inflated through a reader that stops at the caps whatever the headers declare.

        Args:
            name: the member.
            genuine_bytes: what the member can legitimately hold (see :func:`size_problem`).
            verify_crc: check a stored member's CRC-32 here (default). ``False`` leaves it to a caller that verifies
                the bytes some other way (a sha256 from the manifest, or :meth:`crc` on a worker thread); deflated
                members are always checked while they inflate.
        """
        info = self._readable(name, genuine_bytes)
        if info.compress_type == zipfile.ZIP_STORED:
            data = self._read_stored(info, verify_crc)
            self._total += len(data)
            return data
        chunks = []
        received = 0
        try:
            # zipfile checks the CRC at the end; the loop stops one byte past the declared (capped) size itself.
            with self._zip.open(info) as handle:
                while received <= info.file_size:
                    chunk = handle.read(min(_READ_CHUNK, info.file_size + 1 - received))
                    if not chunk:
                        break
                    chunks.append(chunk)
                    received += len(chunk)
        except zipfile.BadZipFile as exc:
            raise CorruptBundleError(
                f"member {short_repr(name)} of {self.path} is damaged: {short_message(exc)}"
            ) from exc
        except NotImplementedError as exc:
            raise UnsupportedBundleError(
                f"member {short_repr(name)} uses an unsupported zip feature: {short_message(exc)}"
            ) from exc
        except Exception as exc:  # noqa: BLE001 - zlib/bz2/lzma/struct errors on untrusted bytes: damaged
            raise CorruptBundleError(
                f"member {short_repr(name)} of {self.path} cannot be decompressed: {short_error(exc)}"
            ) from exc
        if received != info.file_size:
            raise CorruptBundleError(
                f"member {short_repr(name)} of {self.path} decompressed to {received} bytes, header says "
                f"{info.file_size}"
            )
        self._total += received
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def _readable(self, name: str, genuine_bytes: int) -> zipfile.ZipInfo:
        """The member's entry once it passes the caps (size, ratio, total) and is not encrypted."""
        info = self._infos.get(name)
        if info is None:
            raise CorruptBundleError(
                f"{self.path} lacks the member {short_repr(name)}; members present: {short_repr(sorted(self._infos))}"
            )
        limits = self.limits
        problem = size_problem(name, info.file_size, self._occupied[name], limits, genuine_bytes=genuine_bytes)
        if problem:
            raise UnsafeBundleError(problem)
        if self._total + info.file_size > limits.max_total_bytes:
            raise UnsafeBundleError(
                f"members read so far expand past the total cap of {limits.max_total_bytes} bytes "
                "(BundleLimits.max_total_bytes)"
            )
        if info.flag_bits & 0x1:
            raise UnsupportedBundleError(
                f"member {short_repr(name)} of {self.path} is encrypted; bundles are never encrypted, so it is not read"
            )
        return info

    def view(self, name: str, *, genuine_bytes: int = 0) -> "MemberView | None":
        """A read-only file over a stored member's bytes in the archive file, or None where there is none to give
        (a deflated member, an archive read from memory, a platform without ``os.preadv``): then :meth:`read` it.

        Consumers read the member once, straight from the file (or :meth:`MemberView.load` it whole and build on
        those bytes), instead of from a copy of it in memory: one copy of the weights instead of two. The checks
        :meth:`read` makes apply (caps, local header); the CRC is the caller's (:meth:`crc`). Its file reads are
        valid until :meth:`close`; a loaded view's memory outlives it.
        """
        info = self._readable(name, genuine_bytes)
        if info.compress_type != zipfile.ZIP_STORED or self._in_memory or not hasattr(os, "preadv"):
            return None
        start = self._stored_data_start(info)
        self._total += info.file_size
        return MemberView(self._file.fileno(), start, info.file_size)

    def _stored_data_start(self, info: zipfile.ZipInfo) -> int:
        """Where a stored member's bytes start, after the checks ``zipfile`` makes (local header signature and
        name); its extent was checked against the next structure when the archive was opened."""
        name = info.filename
        if info.compress_size != info.file_size or self._occupied[name] != info.file_size:
            raise CorruptBundleError(
                f"the stored member {short_repr(name)} of {self.path} declares {info.file_size} bytes but occupies "
                f"{self._occupied[name]} (compressed size {info.compress_size}); the file is damaged"
            )
        self._file.seek(info.header_offset)
        header = self._file.read(_LOCAL_HEADER.size)
        fields = _LOCAL_HEADER.unpack(header) if len(header) == _LOCAL_HEADER.size else None
        if fields is None or fields[0] != b"PK\x03\x04":
            raise CorruptBundleError(f"member {short_repr(name)} of {self.path} is damaged: Bad magic number for file header")
        encoding = "utf-8" if info.flag_bits & 0x800 else "cp437"
        local_name = self._file.read(fields[9])
        if local_name != info.orig_filename.encode(encoding, "replace"):
            raise CorruptBundleError(
                f"member {short_repr(name)} of {self.path} is damaged: File name in directory {short_repr(name)} and "
                f"header {short_repr(local_name)} differ"
            )
        return info.header_offset + _LOCAL_HEADER.size + fields[9] + fields[10]

    def _read_stored(self, info: zipfile.ZipInfo, verify_crc: bool) -> bytes:
        """A stored member in one read from the file (see :meth:`_stored_data_start`)."""
        name = info.filename
        self._file.seek(self._stored_data_start(info))
        data = self._file.read(info.file_size)
        if len(data) != info.file_size:
            raise CorruptBundleError(f"member {short_repr(name)} of {self.path} is cut short")
        if verify_crc and zlib.crc32(data) != info.CRC:
            raise self.crc_error(name)
        return data

    def crc_error(self, name: str) -> CorruptBundleError:
        """The error for a member whose bytes do not match the directory's CRC-32 (``zipfile``'s wording)."""
        return CorruptBundleError(f"member {short_repr(name)} of {self.path} is damaged: Bad CRC-32 for file {short_repr(name)}")

    def close(self) -> None:
        try:
            self._zip.close()
        finally:
            self._file.close()


def _zip_info(name: str, data: bytes) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name, date_time=_ZIP_DATE)
    # Zip files inside the archive (torch's format) are stored: float32 weights deflate to ~0.91x at most, and
    # inflating them was half the load time; any zip reader takes stored members (upstream's included). A file cut
    # short after one would show its directory as the archive's: ArchiveReader refuses that as truncated.
    # Pickles are deflated as upstream writes them (docs/bundle-format.md §1.3).
    info.compress_type = zipfile.ZIP_STORED if data.startswith(b"PK\x03\x04") else zipfile.ZIP_DEFLATED
    info.external_attr = (stat.S_IFREG | 0o644) << 16
    return info


def write_zip(
    target: PathLike,
    members: list[tuple[str, bytes]],
    *,
    verify: Callable[[Path], Any] | None = None,
    limits: BundleLimits | None = None,
    genuine_bytes: dict[str, int] | None = None,
) -> Path:
    """Write ``members`` (name, bytes) as a zip archive at ``target``, atomically and deterministically.

    With ``limits``, the archive is checked before it replaces ``target`` with the rules :class:`ArchiveReader`
    applies (:func:`size_problem`, ``genuine_bytes`` per member), so nothing is published that the reader would
    refuse. ``verify`` (e.g. the bundle reader) is then called on the finished temporary file; if it raises,
    ``target`` is left as it was.

    Raises:
        UnsafeBundleError: the archive breaks ``limits``; nothing was written.
    """

    def write(handle) -> None:
        with zipfile.ZipFile(handle, "w", compression=zipfile.ZIP_DEFLATED) as archive:
            for name, data in members:
                archive.writestr(_zip_info(name, data), data)
            if limits is not None:
                _check_written(archive.infolist(), limits, genuine_bytes or {})

    return atomic_write(target, write, verify=verify)


def _check_written(infos: list[zipfile.ZipInfo], limits: BundleLimits, genuine_bytes: dict[str, int]) -> None:
    problems = [
        size_problem(i.filename, i.file_size, i.compress_size, limits, genuine_bytes=genuine_bytes.get(i.filename, 0))
        for i in infos
    ]
    if len(infos) > limits.max_members:
        problems.append(f"{len(infos)} members, over BundleLimits.max_members={limits.max_members}")
    if sum(i.file_size for i in infos) > limits.max_total_bytes:
        problems.append(f"members expand past the total cap of {limits.max_total_bytes} bytes")
    problems = [p for p in problems if p]
    if problems:
        raise UnsafeBundleError(
            f"the bundle being written would be refused by read_bundle with these limits ({'; '.join(problems)}); "
            "nothing was written"
        )
