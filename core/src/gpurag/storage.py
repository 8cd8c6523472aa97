"""The on-disk index format: a directory of ``.npy`` arrays and files under a checksummed JSON manifest.

Nothing is pickled. A save writes a temporary sibling directory and renames it into place, so an
interrupted save leaves the previous index loadable; a load verifies the manifest's own checksum
(SHA-256 of its canonical JSON), that every file it names lies inside the directory, and every
file's size and SHA-256, and names the file or key that is wrong.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import threading
import uuid
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from gpurag.errors import IndexFormatError, InvalidInputError

MANIFEST = "manifest.json"
FORMAT = "gpurag-index"
FORMAT_VERSION = 1
#: The manifest key holding the SHA-256 of the rest of the manifest in canonical form.
CHECKSUM_KEY = "manifest_sha256"
_UMASK_LOCK = threading.Lock()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def manifest_checksum(manifest: dict[str, Any]) -> str:
    """SHA-256 of ``manifest`` without its checksum key, as sorted, compact, ASCII JSON (its canonical form)."""
    body = {key: value for key, value in manifest.items() if key != CHECKSUM_KEY}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def _umask() -> int:
    with _UMASK_LOCK:
        mask = os.umask(0o077)
        os.umask(mask)
    return mask


def _backups(path: Path) -> list[Path]:
    return sorted(path.parent.glob(f".{path.name}.old-*"), key=lambda p: p.stat().st_mtime, reverse=True)


def check_index_target(path: str | os.PathLike[str]) -> Path:
    """Where a save to ``path`` writes (symbolic links followed), checked before any work is done.

    ``path`` may be missing, an empty directory or an index directory; a file or a directory of
    other things is an `InvalidInputError`.
    """
    target = Path(os.path.realpath(path))  # a symbolic link is followed: the index goes where it points
    if target.exists() and not target.is_dir():
        raise InvalidInputError(f"path {str(path)!r} exists and is not a directory")
    if target.is_dir() and any(target.iterdir()) and not (target / MANIFEST).exists():
        raise InvalidInputError(
            f"path {str(path)!r} is a non-empty directory that is not a gpurag index; refusing to replace it"
        )
    return target


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield an empty temporary directory; when the block ends without error it replaces ``path``.

    If the block raises, or the process dies before the end, ``path`` is left as it was.
    An existing ``path`` is replaced only if it is itself an index directory (holds a manifest).
    """
    target = check_index_target(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InvalidInputError(f"path {str(path)!r}: cannot create its parent directory ({exc})") from exc
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it 0700; honour the umask as mkdir would
        yield tmp
        for child in tmp.rglob("*"):
            if child.is_file():
                _fsync(child)
        _fsync(tmp)
        if target.exists():
            backup = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(target, backup)
            try:
                os.rename(tmp, target)
            except BaseException:
                os.rename(backup, target)
                raise
            shutil.rmtree(backup, ignore_errors=True)
        else:
            os.rename(tmp, target)
        _fsync(target.parent)
        for stale in _backups(target):  # left by a save that died between its two renames
            shutil.rmtree(stale, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_array(directory: Path, name: str, array: np.ndarray[Any, Any]) -> None:
    """Write ``array`` as ``directory/name`` in ``.npy`` format (no pickle)."""
    with (directory / name).open("wb") as handle:
        np.save(handle, np.ascontiguousarray(array), allow_pickle=False)


def write_manifest(directory: Path, manifest: dict[str, Any], files: Iterable[str]) -> dict[str, Any]:
    """Write ``manifest.json`` into ``directory``: ``manifest`` plus the size and SHA-256 of each of ``files``.

    ``files`` are paths relative to ``directory``; a nested index directory is covered by naming
    its manifest (its own manifest covers its files). Returns the manifest as written.
    """
    entries: dict[str, dict[str, Any]] = {}
    for name in files:
        file_path = directory / name
        entries[name] = {"bytes": file_path.stat().st_size, "sha256": _sha256(file_path)}
    full = {"format": FORMAT, "format_version": FORMAT_VERSION, **manifest, "files": entries}
    full[CHECKSUM_KEY] = manifest_checksum(full)
    with (directory / MANIFEST).open("w", encoding="utf-8") as handle:
        json.dump(full, handle, indent=2, sort_keys=True)
        handle.write("\n")
    return full


def resolve(path: str | os.PathLike[str]) -> Path:
    """The index directory at ``path``; if a save died between its two renames, the previous index."""
    target = Path(path)
    if target.is_dir():
        return target
    if not target.exists():
        for backup in _backups(Path(os.path.realpath(target))):
            if (backup / MANIFEST).is_file():
                warnings.warn(
                    f"index {str(target)!r} is missing; loading the previous version left by an interrupted save "
                    f"({backup.name})",
                    stacklevel=3,
                )
                return backup
        raise IndexFormatError(f"index directory {str(target)!r} does not exist")
    raise IndexFormatError(f"index path {str(target)!r} is not a directory")


def read_manifest(path: str | os.PathLike[str], *, kind: str | None = None) -> dict[str, Any]:
    """The manifest of the index at ``path``, after checking every file it lists.

    A missing or unreadable manifest, an unknown format or version, a ``kind`` other than the one
    asked for, or a file that is missing, truncated or altered is an `IndexFormatError` naming the file.
    """
    directory = resolve(path)
    manifest_path = directory / MANIFEST
    if not manifest_path.is_file():
        raise IndexFormatError(f"{manifest_path} is missing: {str(directory)!r} is not a gpurag index")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError) as exc:
        raise IndexFormatError(f"{manifest_path} is damaged: not valid JSON ({exc})") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise IndexFormatError(f"{manifest_path} is not a gpurag index manifest (key 'format' is not {FORMAT!r})")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise IndexFormatError(
            f"{manifest_path} has format version {version!r} (key 'format_version'); this gpurag reads "
            f"version {FORMAT_VERSION}: build or save the index again"
        )
    if CHECKSUM_KEY not in manifest:
        raise IndexFormatError(
            f"{manifest_path} has no checksum (key {CHECKSUM_KEY!r} is missing): it was edited, or saved by a "
            "gpurag older than the manifest checksum; build or save the index again"
        )
    recorded = manifest_field(manifest, CHECKSUM_KEY, str, where=manifest_path)
    try:
        actual = manifest_checksum(manifest)
    except ValueError as exc:  # NaN or infinity in the manifest
        raise IndexFormatError(f"{manifest_path} is damaged: {exc}") from exc
    if recorded != actual:
        raise IndexFormatError(
            f"{manifest_path} is damaged or was edited: its checksum (key {CHECKSUM_KEY!r}) does not match its content"
        )
    if kind is not None and manifest.get("kind") != kind:
        raise IndexFormatError(
            f"{manifest_path} describes a {manifest.get('kind')!r} index (key 'kind'), expected {kind!r}"
        )
    files = manifest_field(manifest, "files", dict, where=manifest_path)
    root = directory.resolve()
    for name, entry in files.items():
        file_path = _confined(root, name, manifest_path)
        if not isinstance(entry, dict):
            raise IndexFormatError(f"{manifest_path}: key 'files.{name}' must be an object; got {entry!r}")
        expected_bytes = manifest_field(entry, "bytes", int, where=manifest_path, prefix=f"files.{name}.")
        expected_sha = manifest_field(entry, "sha256", str, where=manifest_path, prefix=f"files.{name}.")
        if not file_path.is_file():
            raise IndexFormatError(f"{file_path} is missing")
        size = file_path.stat().st_size
        if size != expected_bytes:
            raise IndexFormatError(f"{file_path} is damaged: {size} bytes, the manifest says {expected_bytes}")
        if _sha256(file_path) != expected_sha:
            raise IndexFormatError(f"{file_path} is damaged: its checksum does not match the manifest")
    manifest["path"] = str(directory)
    return manifest


def _confined(root: Path, name: Any, manifest_path: Path) -> Path:
    """``root / name``, checked to be a relative path that stays inside ``root`` (links resolved)."""
    if not isinstance(name, str) or not name or "\x00" in name:
        raise IndexFormatError(f"{manifest_path}: key 'files' names an invalid file {name!r}")
    relative = Path(name)
    if relative.is_absolute() or ".." in relative.parts:
        raise IndexFormatError(f"{manifest_path}: file {name!r} (key 'files') lies outside the index directory")
    resolved = (root / relative).resolve()
    if not resolved.is_relative_to(root):
        raise IndexFormatError(f"{manifest_path}: file {name!r} (key 'files') resolves outside the index directory")
    return resolved


def manifest_field(
    manifest: dict[str, Any], key: str, kind: type | tuple[type, ...], *, where: Any = None, prefix: str = ""
) -> Any:
    """``manifest[key]``, checked to be present and of ``kind``; else an `IndexFormatError` naming the key.

    ``where`` names the manifest (default: ``manifest["path"]``); bool never counts as int.
    """
    location = where if where is not None else Path(str(manifest.get("path", "."))) / MANIFEST
    if key not in manifest:
        raise IndexFormatError(f"{location} is damaged: key {prefix + key!r} is missing")
    value = manifest[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if (isinstance(value, bool) and bool not in kinds) or not isinstance(value, kinds):
        names = " or ".join(k.__name__ for k in kinds)
        raise IndexFormatError(f"{location} is damaged: key {prefix + key!r} must be {names}; got {value!r}")
    return value


def read_array(manifest: dict[str, Any], name: str) -> np.ndarray[Any, Any]:
    """The ``.npy`` array ``name`` of an index whose manifest `read_manifest` returned."""
    if name not in manifest_field(manifest, "files", dict):
        raise IndexFormatError(f"{Path(manifest['path']) / MANIFEST} does not list {name}")
    file_path = Path(manifest["path"]) / name
    try:
        array: np.ndarray[Any, Any] = np.load(file_path, allow_pickle=False)
        return array
    except (ValueError, OSError, EOFError) as exc:
        raise IndexFormatError(f"{file_path} is damaged: {exc}") from exc
