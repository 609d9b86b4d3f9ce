"""Say what a file or folder a user hands over actually is, from bounded reads only (docs/bundle-format.md §11).

PtychoPINN models and data travel in several containers that all look alike from the outside (most are zip
files): the PyTorch bundle ``wts.h5.zip``, the TensorFlow archive of the same name, Lightning checkpoints
(``*.ckpt``, a ``torch.save`` zip), bare state_dicts (``*.pth``), MLflow model directories and NPZ datasets.
A loader that only knows one of them otherwise refuses the others with a message about *its* format ("lists
248 members (limit 64)"), which sends the user looking in the wrong place. :func:`identify_artifact` names the
container and what to do with it; the bundle reader (:mod:`.archive`, :mod:`.io`) ends its refusals with that
sentence, and the converters (:mod:`mlflow_ptycho_flavor.convert`) dispatch on the kind it finds.

Everything is decided from what can be read cheaply and safely:

* the first bytes (magic numbers: zip, HDF5, NPY, pickle);
* for zips, the central directory only - its size and entry count are read from the end-of-central-directory
  record first and capped (:class:`DetectLimits`), so a crafted directory of millions of entries is described,
  not parsed; member names then decide (``manifest.dill`` + ``*/model.pth`` -> bundle, ``*/model.keras`` or
  ``*/saved_model.pb`` -> TensorFlow, ``<prefix>/data.pkl`` -> a ``torch.save`` file, ``*.npy`` -> NPZ);
* for ``torch.save`` files, a disassembly (:func:`pickletools.genops`, which executes nothing) of the size-capped
  ``data.pkl`` record: its string constants tell a Lightning checkpoint (``pytorch-lightning_version``,
  ``state_dict``) from a bare state_dict, and keys such as ``.merge_blocks.`` mark upstream's older
  architecture era (§10.5);
* for directories, the presence of ``MLmodel`` (flavors read from at most 64 KiB of it), ``wts.h5.zip`` (then
  that file is identified), or the loose files of an extracted or SavedModel-era TensorFlow archive.

Nothing is unpickled, extracted or written. This is the lowest module of :mod:`mlflow_ptycho_flavor.bundle`: it
imports neither torch nor MLflow nor the rest of the package.
"""

from __future__ import annotations

import enum
import errno
import io
import os
import pickletools
import stat
import struct
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Union

__all__ = [
    "ArtifactKind",
    "directory_extent",
    "directory_belongs_inside",
    "ArtifactInfo",
    "DetectLimits",
    "DEFAULT_DETECT_LIMITS",
    "FOREIGN_KINDS",
    "ZipDirectoryTooLarge",
    "identify_artifact",
    "describe_for_error",
    "open_regular_file",
    "open_bounded_zip",
    "torch_archive_prefix",
    "OLDER_ERA_DESCRIPTION",
    "SAVEDMODEL_ERA_DESCRIPTION",
]

PathLike = Union[str, os.PathLike]

#: How refusals name upstream's E1 architecture era (docs/bundle-format.md §3.6, §10.5).
OLDER_ERA_DESCRIPTION = (
    "upstream's older E1 architecture era (UNet skip merges 'merge_blocks', real/imag heads: upstream's "
    "latent_experimental branch, which ptychodus 1.7 trains)"
)
#: How refusals name TensorFlow archives of the SavedModel era (docs/bundle-format.md §9.4).
SAVEDMODEL_ERA_DESCRIPTION = (
    "upstream saved TF models as SavedModel directories until f32b85f (2025-07-28); their weights sit in TF "
    "checkpoint keys that this converter does not read. Re-save the model with current PtychoPINN "
    "(ptycho.model_manager, model.keras) and convert that archive"
)

_BUNDLE_FILE_NAME = "wts.h5.zip"
_ZIP_MAGIC = b"PK\x03\x04"
_EMPTY_ZIP_MAGIC = b"PK\x05\x06"
_HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
_NPY_MAGIC = b"\x93NUMPY"
#: The end-of-central-directory records, parsed the way ``zipfile`` parses them (one parser for the package).
_EOCD_RECORD = struct.Struct("<4s4H2LH")
_EOCD64_LOCATOR_RECORD = struct.Struct("<4sLQL")
_EOCD64_RECORD = struct.Struct("<4sQ2H2L4Q")

#: String constants that only a Lightning checkpoint's top-level dict holds.
_LIGHTNING_KEYS = frozenset({"pytorch-lightning_version", "optimizer_states", "lr_schedulers", "hparams_name"})
#: Strings marking the E1 era in a checkpoint's pickle (state_dict keys, config fields, architecture name).
_OLDER_ERA_MARKERS = (".merge_blocks.", "use_reference_model", "object_representation")


class ArtifactKind(str, enum.Enum):
    """What :func:`identify_artifact` found (the value is the kind's name)."""

    TORCH_BUNDLE = "torch_bundle"
    TENSORFLOW_ARCHIVE = "tensorflow_archive"
    LIGHTNING_CHECKPOINT = "lightning_checkpoint"
    BARE_STATE_DICT = "bare_state_dict"
    MLFLOW_MODEL_DIR = "mlflow_model_dir"
    NPZ_DATASET = "npz_dataset"
    DIRECTORY = "directory"
    UNKNOWN = "unknown"


#: Kinds that are certainly not a PyTorch bundle: a bundle reader refuses them as "not a bundle" whatever limit
#: or member check tripped first.
FOREIGN_KINDS = frozenset({
    ArtifactKind.TENSORFLOW_ARCHIVE,
    ArtifactKind.LIGHTNING_CHECKPOINT,
    ArtifactKind.BARE_STATE_DICT,
    ArtifactKind.NPZ_DATASET,
})


@dataclass(frozen=True)
class DetectLimits:
    """Caps on what detection reads (a hostile file gets described as too large instead of being parsed).

    Attributes:
        max_entries: most zip entries whose names are listed.
        max_directory_bytes: largest zip central directory read.
        max_pickle_bytes: largest ``data.pkl`` record of a ``torch.save`` file disassembled.
        max_strings: most string constants collected from that pickle.
        max_text_bytes: bytes read from an ``MLmodel`` file.
    """

    max_entries: int = 100_000
    max_directory_bytes: int = 16 * 1024 * 1024
    max_pickle_bytes: int = 64 * 1024 * 1024
    max_strings: int = 200_000
    max_text_bytes: int = 64 * 1024


DEFAULT_DETECT_LIMITS = DetectLimits()


@dataclass(frozen=True)
class ArtifactInfo:
    """The verdict on one path.

    Attributes:
        kind: the container found.
        path: the file examined (for a folder holding ``wts.h5.zip``, that file).
        description: what it is ("a PyTorch Lightning checkpoint (242 stored tensors ...)").
        action: what to do with it in this package, or an empty string when it is what loaders read.
        details: small facts behind the verdict (member count, Lightning version, era, flavors, keys).
    """

    kind: ArtifactKind
    path: Path
    description: str
    action: str = ""
    details: Mapping[str, Any] = field(default_factory=dict, compare=False)

    @property
    def older_era(self) -> bool:
        """True for a checkpoint or state_dict of upstream's E1 era, or a SavedModel-era TensorFlow archive (both
        refused by the converters)."""
        return self.details.get("era") in ("E1", "savedmodel")

    def what_and_fix(self) -> str:
        """``"<what it is>; <what to do>"``, for the end of a refusal that has already named the path."""
        return f"{self.description}; {self.action}" if self.action else self.description

    def sentence(self) -> str:
        """``"<path> is <what it is>; <what to do>"`` with the path shortened to at most 200 characters."""
        shown = str(self.path)
        shown = shown if len(shown) <= 200 else shown[:197] + "..."
        return f"{shown} is {self.what_and_fix()}"


class ZipDirectoryTooLarge(Exception):
    """A zip directory or record exceeds :class:`DetectLimits` (reported, never parsed). Internal signal: callers
    turn it into their own typed error."""


# ----------------------------------------------------------------------------------------------------------------
# Bounded file and zip access (shared with the bundle reader and the checkpoint reader)
# ----------------------------------------------------------------------------------------------------------------
def open_regular_file(path: PathLike) -> BinaryIO:
    """Open ``path`` read-only, refusing FIFOs, devices, sockets and directories without blocking on them.

    ``O_NONBLOCK`` keeps a FIFO from hanging the open; the type is checked with ``fstat`` on the open descriptor,
    so there is no check-then-use race.

    Raises:
        FileNotFoundError: nothing at ``path``.
        IsADirectoryError: ``path`` is a directory.
        OSError: it cannot be opened, or is not a regular file (the message says which).
        ValueError: the path holds a NUL byte.
    """
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise IsADirectoryError(errno.EISDIR, "is a directory", os.fspath(path))
        if not stat.S_ISREG(mode):
            raise OSError(f"{os.fspath(path)} is not a regular file (device, FIFO or socket)")
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _end_record(handle: BinaryIO) -> tuple[int, int, int, int] | None:
    """``(entries, directory bytes, directory offset, end record position)`` (zip64 when present), found the way
    ``zipfile`` finds it, reading at most the last 64 KiB; None when there is none."""
    handle.seek(0, os.SEEK_END)
    file_size = handle.tell()
    tail_start = max(file_size - (1 << 16) - _EOCD_RECORD.size, 0)
    handle.seek(tail_start)
    tail = handle.read()
    if len(tail) >= _EOCD_RECORD.size and tail[-_EOCD_RECORD.size:-_EOCD_RECORD.size + 4] == b"PK\x05\x06" and tail[-2:] == b"\0\0":
        start = len(tail) - _EOCD_RECORD.size
    else:
        start = tail.rfind(b"PK\x05\x06")
        if start < 0 or len(tail) - start < _EOCD_RECORD.size:
            return None
    fields = _EOCD_RECORD.unpack_from(tail, start)
    entries, directory_bytes, directory_offset = fields[4], fields[5], fields[6]
    position = tail_start + start
    locator_at = position - _EOCD64_LOCATOR_RECORD.size
    if locator_at - _EOCD64_RECORD.size >= 0:
        handle.seek(locator_at)
        locator = handle.read(_EOCD64_LOCATOR_RECORD.size)
        if len(locator) == _EOCD64_LOCATOR_RECORD.size and locator[:4] == b"PK\x06\x07":
            handle.seek(locator_at - _EOCD64_RECORD.size)
            record = handle.read(_EOCD64_RECORD.size)
            if len(record) == _EOCD64_RECORD.size and record[:4] == b"PK\x06\x06":
                zip64 = _EOCD64_RECORD.unpack(record)
                entries, directory_bytes, directory_offset = zip64[7], zip64[8], zip64[9]
                position = locator_at - _EOCD64_RECORD.size
    return entries, directory_bytes, directory_offset, position


def directory_extent(handle: BinaryIO) -> tuple[int, int] | None:
    """``(entries, directory bytes)`` from the end-of-central-directory record (zip64 when present), found the way
    ``zipfile`` finds it, reading at most the last 64 KiB; None when there is none (``zipfile`` then says why)."""
    record = _end_record(handle)
    return None if record is None else (record[0], record[1])


def directory_belongs_inside(handle: BinaryIO) -> bool:
    """Whether the zip directory at the end of a file that starts with a local file header begins past offset 0:
    the directory of a zip stored *inside* one of the file's members (a torch file stored in a bundle), which is all
    a reader finds once the file is cut short after that member. ``zipfile`` reads such a file as that inner zip
    with the bytes before it skipped (its "concatenated" case). Self-extracting archives, whose stub precedes the
    first local header, are not affected.
    """
    handle.seek(0)
    starts_with_header = handle.read(4) == _ZIP_MAGIC
    record = _end_record(handle)
    handle.seek(0)
    if not starts_with_header or record is None:
        return False
    _, directory_bytes, directory_offset, position = record
    return position - directory_bytes - directory_offset > 0


def open_bounded_zip(handle: BinaryIO, limits: DetectLimits = DEFAULT_DETECT_LIMITS) -> zipfile.ZipFile | None:
    """A :class:`zipfile.ZipFile` over ``handle`` once its directory is known to fit the caps; None if not a zip.

    Raises:
        ZipDirectoryTooLarge: the directory lists more entries or bytes than ``limits`` allow (nothing parsed).
    """
    counted = directory_extent(handle)
    if counted is None:
        return None
    entries, directory_bytes = counted
    if entries > limits.max_entries or directory_bytes > limits.max_directory_bytes:
        raise ZipDirectoryTooLarge(f"its zip directory lists {entries} entries in {directory_bytes} bytes")
    handle.seek(0)
    try:
        return zipfile.ZipFile(handle, "r")
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, struct.error, NotImplementedError):
        return None


def _read_member(archive: zipfile.ZipFile, name: str, cap: int) -> bytes:
    """Read one member, refusing one whose declared size exceeds ``cap`` (zipfile stops at the declared size)."""
    info = archive.getinfo(name)
    if info.file_size > cap:
        raise ZipDirectoryTooLarge(f"{name} is {info.file_size} bytes (cap {cap})")
    with archive.open(info) as member:
        return member.read(cap + 1)[:cap]


def torch_archive_prefix(names: list[str]) -> str | None:
    """The top folder of a ``torch.save`` zip (``archive`` for Lightning, the file stem for ``torch.save(path)``).

    A ``torch.save`` file holds every record under one folder, with ``<folder>/data.pkl`` among them.
    """
    if not names:
        return None
    prefix = names[0].split("/", 1)[0]
    if not prefix or any(not n.startswith(prefix + "/") for n in names):
        return None
    return prefix if f"{prefix}/data.pkl" in names else None


# ----------------------------------------------------------------------------------------------------------------
# Pickle summary (disassembly only)
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class _PickleSummary:
    globals: set[str]
    strings: set[str]
    persistent_ids: int
    lightning_version: str | None = None


def _summarize_pickle(data: bytes, limits: DetectLimits) -> _PickleSummary | None:
    """Globals, string constants and persistent ids (one per stored tensor) of a pickle, by disassembly only.

    Returns None for a malformed stream.
    """
    summary = _PickleSummary(globals=set(), strings=set(), persistent_ids=0)
    previous_string: str | None = None  # the dict key a string value follows (memo opcodes in between are skipped)
    try:
        for opcode, arg, _ in pickletools.genops(io.BytesIO(data)):
            name = opcode.name
            if name in ("GLOBAL", "INST"):
                summary.globals.add(str(arg).replace(" ", ".", 1))
            elif name == "STACK_GLOBAL":
                summary.globals.add("<STACK_GLOBAL>")
            elif name in ("BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8", "UNICODE"):
                text = str(arg)
                if previous_string == "pytorch-lightning_version" and summary.lightning_version is None:
                    summary.lightning_version = text[:40]
                previous_string = text
                if len(summary.strings) < limits.max_strings:
                    summary.strings.add(text)
                continue
            elif name in ("BINPERSID", "PERSID"):
                summary.persistent_ids += 1
            if name not in ("BINPUT", "LONG_BINPUT", "PUT", "MEMOIZE"):
                previous_string = None
    except Exception:  # noqa: BLE001 - a malformed stream is simply "not recognised"
        return None
    return summary


# ----------------------------------------------------------------------------------------------------------------
# Classifiers
# ----------------------------------------------------------------------------------------------------------------
def _info(kind: ArtifactKind, path: Path, description: str, action: str = "", **details: Any) -> ArtifactInfo:
    return ArtifactInfo(kind=kind, path=path, description=description, action=action, details=details)


def _short_list(items: list[str], limit: int = 8) -> str:
    shown = [repr(i[:60]) for i in items[:limit]]
    return ", ".join(shown) + (f", ... ({len(items)} in all)" if len(items) > limit else "")


def _quote(path: Path) -> str:
    """The path as a shell word: as is when it holds only safe characters, else its ``repr``."""
    text = str(path)
    return text if text and all(c.isalnum() or c in "._-/+=:," for c in text) else repr(text)


def _convert_action(path: Path, what: str) -> str:
    return (
        f"convert it with `ptycho-flavor convert {_quote(path)} out/wts.h5.zip` "
        f"(mlflow_ptycho_flavor.convert.convert_any), or log it directly with "
        f"mlflow.ptycho_torch.log_model({str(path)!r}), which converts {what} on the way in"
    )


def _classify_torch_file(path: Path, archive: zipfile.ZipFile, prefix: str, names: list[str],
                         limits: DetectLimits) -> ArtifactInfo:
    try:
        data = _read_member(archive, f"{prefix}/data.pkl", limits.max_pickle_bytes)
    except ZipDirectoryTooLarge as exc:
        return _info(ArtifactKind.UNKNOWN, path, f"a torch.save file whose pickle is too large to inspect ({exc})",
                     "load it with torch itself if you trust it", members=len(names))
    except Exception as exc:  # noqa: BLE001 - damaged member
        return _info(ArtifactKind.UNKNOWN, path, f"a damaged torch.save file ({type(exc).__name__}: {str(exc)[:120]})",
                     "re-copy or re-download it", members=len(names))
    summary = _summarize_pickle(data, limits)
    if summary is None:
        return _info(ArtifactKind.UNKNOWN, path, "a torch.save file whose pickle is malformed",
                     "re-copy or re-download it", members=len(names))
    storages = sum(1 for n in names if n.startswith(f"{prefix}/data/"))
    older = any(marker in s for s in summary.strings for marker in _OLDER_ERA_MARKERS) or "unet" in summary.strings
    era = "E1" if older else None
    if _LIGHTNING_KEYS & summary.strings and "state_dict" in summary.strings:
        version = summary.lightning_version
        training_state = " incl. optimizer state" if "optimizer_states" in summary.strings else ""
        what = f"a PyTorch Lightning checkpoint ({storages} stored tensors{training_state}"
        what += f", written by Lightning {version})" if version else ")"
        if older:
            return _info(
                ArtifactKind.LIGHTNING_CHECKPOINT, path, f"{what} of {OLDER_ERA_DESCRIPTION}",
                "it cannot become a current bundle: its network differs from the one this package builds; "
                "re-train it with current upstream PtychoPINN (main)",
                era=era, lightning_version=version, members=len(names),
            )
        return _info(
            ArtifactKind.LIGHTNING_CHECKPOINT, path, what, _convert_action(path, "the checkpoint"),
            era=era, lightning_version=version, members=len(names),
        )
    weights_only = summary.globals <= {"collections.OrderedDict", "torch._utils._rebuild_tensor_v2"} | {
        g for g in summary.globals if g.startswith("torch.") and g.endswith("Storage")}
    if weights_only and any(g.endswith("_rebuild_tensor_v2") for g in summary.globals):
        what = f"a bare PyTorch state_dict ({summary.persistent_ids} tensor(s), weights only, no model configuration)"
        if older:
            what += f" of {OLDER_ERA_DESCRIPTION}"
        return _info(
            ArtifactKind.BARE_STATE_DICT, path, what,
            "a bundle also needs the configuration the network was built with: convert the Lightning checkpoint "
            "(.ckpt) it came from, or load it into a PtychoPINNNetwork of the right NetworkConfig and save that "
            "with save_torch_bundle",
            era=era, tensors=summary.persistent_ids, members=len(names),
        )
    foreign = sorted(summary.globals - {"collections.OrderedDict", "torch._utils._rebuild_tensor_v2"})
    return _info(
        ArtifactKind.UNKNOWN, path,
        f"a torch.save file that pickles Python objects (globals {_short_list(foreign, 4)}), not a state_dict",
        "this package never unpickles such files; save the module's state_dict() or a bundle instead",
        globals=foreign, members=len(names),
    )


def _tensorflow_info(path: Path, names: list[str], how: str) -> ArtifactInfo:
    if any(n.endswith("saved_model.pb") for n in names) and not any(n.endswith("model.keras") for n in names):
        return _info(
            ArtifactKind.TENSORFLOW_ARCHIVE, path, f"a SavedModel-era TensorFlow PtychoPINN archive ({how})",
            f"it cannot be converted exactly: {SAVEDMODEL_ERA_DESCRIPTION}", era="savedmodel", members=len(names),
        )
    return _info(
        ArtifactKind.TENSORFLOW_ARCHIVE, path, f"a TensorFlow PtychoPINN archive ({how})",
        _convert_action(path, "the TensorFlow network exactly (no TensorFlow needed)"), members=len(names),
    )


def _classify_zip(path: Path, archive: zipfile.ZipFile, limits: DetectLimits) -> ArtifactInfo:
    names = archive.namelist()
    name_set = set(names)
    if not names:
        return _info(ArtifactKind.UNKNOWN, path, "an empty zip archive", "check the path", members=0)
    keras = any(n.endswith("/model.keras") or n == "model.keras" for n in names)
    saved_model = any(n.endswith("/saved_model.pb") for n in names)
    if "manifest.dill" in name_set:
        if keras:
            return _tensorflow_info(path, names, "manifest.dill with model.keras members")
        if any(n.endswith("/model.pth") for n in names):
            return _info(
                ArtifactKind.TORCH_BUNDLE, path,
                "a PyTorch PtychoPINN bundle (wts.h5.zip layout: manifest.dill, */model.pth, */params.dill"
                + (", torch_scaling_metadata.pt)" if "torch_scaling_metadata.pt" in name_set else ")"),
                members=len(names),
            )
        if saved_model:
            return _tensorflow_info(path, names, "manifest.dill with SavedModel directories")
        return _info(ArtifactKind.UNKNOWN, path,
                     f"a zip with a manifest.dill but no model members ({_short_list(sorted(names))})",
                     "it is not a complete PtychoPINN bundle; re-export it", members=len(names))
    if keras or saved_model:
        return _tensorflow_info(path, names, "model folders without manifest.dill")
    prefix = torch_archive_prefix(names)
    if prefix is not None:
        return _classify_torch_file(path, archive, prefix, names, limits)
    if all(n.endswith(".npy") for n in names):
        keys = sorted(n[:-4] for n in names)
        role = ("a ptychography dataset" if {"xcoords", "ycoords"} <= set(keys)
                and ({"diff3d", "diffraction"} & set(keys)) else "arrays")
        return _info(
            ArtifactKind.NPZ_DATASET, path, f"a NumPy .npz archive of {role} (keys {_short_list(keys)})",
            "it is data, not a model: pass it as the data argument (e.g. `ptycho-flavor predict MODEL DATA.npz`)",
            keys=keys,
        )
    return _info(ArtifactKind.UNKNOWN, path, f"a zip archive of another kind (members {_short_list(sorted(names))})",
                 "check the path", members=len(names))


def _mlflow_flavors(text: str) -> list[str]:
    """Flavor names of an ``MLmodel`` file: the keys indented once under its top-level ``flavors:``."""
    flavors: list[str] = []
    inside = False
    indent: int | None = None
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        depth = len(line) - len(line.lstrip(" "))
        if depth == 0:
            inside = line.rstrip() == "flavors:"
            indent = None
            continue
        if inside:
            if indent is None:
                indent = depth
            if depth == indent and line.rstrip().endswith(":"):
                flavors.append(line.strip()[:-1])
    return flavors


def _classify_directory(path: Path, limits: DetectLimits) -> ArtifactInfo:
    mlmodel = path / "MLmodel"
    if mlmodel.is_file():
        try:
            with open_regular_file(mlmodel) as handle:
                text = handle.read(limits.max_text_bytes).decode("utf-8", errors="replace")
        except OSError:
            text = ""
        flavors = _mlflow_flavors(text)
        ours = "ptycho_torch" in flavors
        return _info(
            ArtifactKind.MLFLOW_MODEL_DIR, path,
            f"an MLflow model directory (flavors {', '.join(flavors) or 'unknown'})",
            ("load it with mlflow_ptycho_flavor.load_model(path) or mlflow.pyfunc.load_model(path); its bundle is "
             f"{_quote(path / _BUNDLE_FILE_NAME)} (give that file to convert, log or copy it)") if ours else
            "it is not a ptycho_torch model; load it with the flavor it names",
            flavors=flavors,
        )
    bundle = path / _BUNDLE_FILE_NAME
    if bundle.is_file():
        inner = identify_artifact(bundle, limits=limits)
        return ArtifactInfo(kind=inner.kind, path=inner.path, description=inner.description, action=inner.action,
                            details={**inner.details, "directory": str(path)})
    model_dir = path / "diffraction_to_obj"
    if (model_dir / "saved_model.pb").is_file() or (path / "saved_model.pb").is_file():
        return _info(ArtifactKind.TENSORFLOW_ARCHIVE, path, "a TensorFlow SavedModel directory",
                     f"it cannot be converted exactly: {SAVEDMODEL_ERA_DESCRIPTION}", era="savedmodel")
    if (model_dir / "model.keras").is_file():
        return _info(ArtifactKind.DIRECTORY, path, "an extracted TensorFlow PtychoPINN archive (loose model.keras files)",
                     "pass the wts.h5.zip archive itself; the converter reads the zip, never loose files")
    try:
        entries = sorted(e.name for _, e in zip(range(50), os.scandir(path)))
    except OSError:
        entries = []
    return _info(ArtifactKind.DIRECTORY, path,
                 f"a directory without wts.h5.zip or MLmodel (entries {_short_list(entries) or 'none'})",
                 "give the bundle file itself or an MLflow model directory", entries=entries)


def _classify_bytes(path: Path, head: bytes) -> ArtifactInfo:
    if not head:
        return _info(ArtifactKind.UNKNOWN, path, "an empty file", "re-copy or re-download it")
    if head.startswith(_ZIP_MAGIC):
        return _info(ArtifactKind.UNKNOWN, path,
                     "a zip file without a readable central directory (probably truncated)",
                     "re-copy or re-download it")
    if head.startswith(_HDF5_MAGIC):
        return _info(ArtifactKind.UNKNOWN, path,
                     "an HDF5 file (Keras .h5 weights, or a ptychodus product/diffraction file), not a bundle",
                     "bundles are wts.h5.zip zip archives despite the name; check the path")
    if head.startswith(_NPY_MAGIC):
        return _info(ArtifactKind.UNKNOWN, path, "a single NumPy .npy array",
                     "datasets are .npz archives with named keys (diff3d, xcoords, ycoords, probeGuess)")
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return _info(ArtifactKind.UNKNOWN, path,
                     "a plain pickle (or a legacy pre-1.6 torch.save file), which this package never unpickles",
                     "re-save the weights with a current torch (zip format) or as a bundle")
    return _info(ArtifactKind.UNKNOWN, path, f"not a recognised format (first bytes {head[:8]!r})", "check the path")


def identify_artifact(path: PathLike, *, limits: DetectLimits = DEFAULT_DETECT_LIMITS) -> ArtifactInfo:
    """Identify what ``path`` holds: a bundle, a TensorFlow archive, a Lightning checkpoint, a bare state_dict, an
    MLflow model directory, an NPZ dataset, another directory, or something unknown.

    Reads are bounded by ``limits`` (see the module docstring); nothing is unpickled or executed and nothing is
    written. Never raises for the file's contents: unreadable or missing paths come back as ``unknown`` with a
    description saying why. A folder holding ``wts.h5.zip`` (and no ``MLmodel``) is identified by that file, as
    every reader resolves it.

    Args:
        path: the file or directory to examine.
        limits: read caps.

    Returns:
        An :class:`ArtifactInfo` whose ``description`` and ``action`` can be quoted to the user.
    """
    p = Path(os.fspath(path)).expanduser()
    try:
        if p.is_dir():
            return _classify_directory(p, limits)
        if not p.exists():
            return _info(ArtifactKind.UNKNOWN, p, "a path that does not exist", "check the path")
        handle = open_regular_file(p)
    except (OSError, ValueError) as exc:
        return _info(ArtifactKind.UNKNOWN, p, f"a path that cannot be read ({str(exc)[:160]})", "check the path")
    with handle:
        head = handle.read(16)
        if head.startswith((_ZIP_MAGIC, _EMPTY_ZIP_MAGIC)):
            try:
                archive = open_bounded_zip(handle, limits)
            except ZipDirectoryTooLarge as exc:
                return _info(ArtifactKind.UNKNOWN, p, f"a zip archive too large to inspect ({exc})",
                             "check that this is the file you meant")
            if archive is not None and directory_belongs_inside(handle):
                archive.close()
                return _info(ArtifactKind.UNKNOWN, p,
                             "a truncated or damaged zip archive (the directory at its end belongs to a zip stored "
                             "inside one of its members)", "re-copy or re-download it")
            if archive is not None:
                with archive:
                    try:
                        return _classify_zip(p, archive, limits)
                    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
                        return _info(ArtifactKind.UNKNOWN, p,
                                     f"a damaged zip archive ({type(exc).__name__}: {str(exc)[:120]})",
                                     "re-copy or re-download it")
        return _classify_bytes(p, head)


def describe_for_error(path: PathLike, *, limits: DetectLimits = DEFAULT_DETECT_LIMITS) -> str:
    """One sentence for the end of a refusal: ``"<path> is <what it is>; <what to do>"``.

    Example: ``"model.ckpt is a PyTorch Lightning checkpoint (242 stored tensors incl. optimizer state, written by
    Lightning 2.6.6); convert it with `ptycho-flavor convert model.ckpt out/wts.h5.zip` ..."``. The path is quoted
    as given, at most 200 characters of it.
    """
    return identify_artifact(path, limits=limits).sentence()
