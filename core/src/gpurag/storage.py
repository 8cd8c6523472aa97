"""The on-disk index format: a directory of ``.npy`` arrays and files under a checksummed JSON manifest.

Nothing is pickled. A save writes a temporary sibling directory and renames it into place, so an
interrupted save leaves the previous index loadable; a load verifies every file's size and SHA-256
and names the file that is damaged.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
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


def _backups(path: Path) -> list[Path]:
    return sorted(path.parent.glob(f".{path.name}.old-*"), key=lambda p: p.stat().st_mtime, reverse=True)


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield an empty temporary directory; when the block ends without error it replaces ``path``.

    If the block raises, or the process dies before the end, ``path`` is left as it was.
    An existing ``path`` is replaced only if it is itself an index directory (holds a manifest).
    """
    target = Path(path)
    if target.exists() and not target.is_dir():
        raise InvalidInputError(f"path {str(target)!r} exists and is not a directory")
    if target.is_dir() and any(target.iterdir()) and not (target / MANIFEST).exists():
        raise InvalidInputError(
            f"path {str(target)!r} is a non-empty directory that is not a gpurag index; refusing to replace it"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
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
        for backup in _backups(target):
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
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise IndexFormatError(f"{manifest_path} is damaged: not valid JSON ({exc})") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise IndexFormatError(f"{manifest_path} is not a gpurag index manifest")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise IndexFormatError(
            f"{manifest_path} has format version {version!r}; this gpurag reads version {FORMAT_VERSION}"
        )
    if kind is not None and manifest.get("kind") != kind:
        raise IndexFormatError(f"{manifest_path} describes a {manifest.get('kind')!r} index, expected {kind!r}")
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise IndexFormatError(f"{manifest_path} is damaged: no file list")
    for name, entry in files.items():
        file_path = directory / name
        if not file_path.is_file():
            raise IndexFormatError(f"{file_path} is missing")
        size = file_path.stat().st_size
        if size != entry.get("bytes"):
            raise IndexFormatError(f"{file_path} is damaged: {size} bytes, the manifest says {entry.get('bytes')}")
        if _sha256(file_path) != entry.get("sha256"):
            raise IndexFormatError(f"{file_path} is damaged: its checksum does not match the manifest")
    manifest["path"] = str(directory)
    return manifest


def read_array(manifest: dict[str, Any], name: str) -> np.ndarray[Any, Any]:
    """The ``.npy`` array ``name`` of an index whose manifest `read_manifest` returned."""
    if name not in manifest["files"]:
        raise IndexFormatError(f"{Path(manifest['path']) / MANIFEST} does not list {name}")
    file_path = Path(manifest["path"]) / name
    try:
        array: np.ndarray[Any, Any] = np.load(file_path, allow_pickle=False)
        return array
    except (ValueError, OSError, EOFError) as exc:
        raise IndexFormatError(f"{file_path} is damaged: {exc}") from exc
