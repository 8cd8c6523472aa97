"""The on-disk format: round trips, damaged files named, interrupted saves leaving the old index."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from gpurag import ExactRetriever, IndexFormatError, InvalidInputError, storage


def build(n: int = 50, d: int = 8, metric: str = "cosine", seed: int = 0) -> ExactRetriever:
    rng = np.random.default_rng(seed)
    index = ExactRetriever(metric=metric, backend="numpy")
    index.add(rng.standard_normal((n, d)), ids=rng.permutation(10 * n)[:n])
    return index


def test_save_load_round_trip(tmp_path: Path) -> None:
    index = build()
    index.save(tmp_path / "books.idx")
    loaded = ExactRetriever.load(tmp_path / "books.idx", backend="numpy")
    assert (len(loaded), loaded.dim, loaded.metric) == (len(index), index.dim, index.metric)
    np.testing.assert_array_equal(loaded.ids, index.ids)
    np.testing.assert_array_equal(loaded.vectors(), index.vectors())
    queries = np.random.default_rng(1).standard_normal((4, 8))
    np.testing.assert_array_equal(loaded.search(queries, 7).ids, index.search(queries, 7).ids)


def test_the_directory_holds_a_manifest_and_npy_files_only(tmp_path: Path) -> None:
    build().save(tmp_path / "ix")
    assert sorted(p.name for p in (tmp_path / "ix").iterdir()) == ["ids.npy", "manifest.json", "vectors.npy"]
    manifest = json.loads((tmp_path / "ix" / "manifest.json").read_text())
    assert manifest["format_version"] == storage.FORMAT_VERSION
    assert (manifest["metric"], manifest["dim"], manifest["dtype"], manifest["count"]) == ("cosine", 8, "float32", 50)
    assert set(manifest["files"]) == {"vectors.npy", "ids.npy"}
    assert all(len(entry["sha256"]) == 64 for entry in manifest["files"].values())


def test_saving_over_an_index_replaces_it(tmp_path: Path) -> None:
    build(n=10).save(tmp_path / "ix")
    build(n=20, seed=5).save(tmp_path / "ix")
    assert len(ExactRetriever.load(tmp_path / "ix", backend="numpy")) == 20
    assert [p.name for p in tmp_path.iterdir()] == ["ix"]  # no temporary or backup left


def test_an_empty_index_round_trips(tmp_path: Path) -> None:
    index = ExactRetriever(metric="l1", backend="numpy", dim=3)
    index.save(tmp_path / "empty")
    loaded = ExactRetriever.load(tmp_path / "empty", backend="numpy")
    assert (len(loaded), loaded.dim, loaded.metric.value) == (0, 3, "l1")


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda d: (d / "vectors.npy").write_bytes((d / "vectors.npy").read_bytes()[:-10]), r"vectors.npy is damaged"),
        (lambda d: (d / "ids.npy").write_bytes(b"\x00" * (d / "ids.npy").stat().st_size), r"ids.npy is damaged"),
        (lambda d: (d / "ids.npy").unlink(), r"ids.npy is missing"),
        (lambda d: (d / "manifest.json").unlink(), r"manifest.json is missing"),
        (lambda d: (d / "manifest.json").write_text("{not json"), r"manifest.json is damaged"),
        (
            lambda d: (d / "manifest.json").write_text(
                json.dumps({**json.loads((d / "manifest.json").read_text()), "format_version": 99})
            ),
            r"format version 99",
        ),
    ],
)
def test_a_damaged_index_fails_to_load_naming_the_file(tmp_path: Path, damage: object, message: str) -> None:
    build().save(tmp_path / "ix")
    damage(tmp_path / "ix")  # type: ignore[operator]
    with pytest.raises(IndexFormatError, match=message):
        ExactRetriever.load(tmp_path / "ix", backend="numpy")


def test_a_missing_index_is_named(tmp_path: Path) -> None:
    with pytest.raises(IndexFormatError, match="does not exist"):
        ExactRetriever.load(tmp_path / "nothing", backend="numpy")


def test_save_refuses_to_replace_a_directory_that_is_not_an_index(tmp_path: Path) -> None:
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "cat.jpg").write_bytes(b"meow")
    with pytest.raises(InvalidInputError, match="not a gpurag index; refusing to replace it"):
        build().save(tmp_path / "photos")
    assert (tmp_path / "photos" / "cat.jpg").read_bytes() == b"meow"


def test_a_save_that_fails_half_way_leaves_the_previous_index(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    build(n=10).save(tmp_path / "ix")

    def fail_after_vectors(directory: Path, manifest: dict[str, object], files: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(storage, "write_manifest", fail_after_vectors)
    with pytest.raises(OSError, match="disk full"):
        build(n=30).save(tmp_path / "ix")
    monkeypatch.undo()
    assert len(ExactRetriever.load(tmp_path / "ix", backend="numpy")) == 10
    assert [p.name for p in tmp_path.iterdir()] == ["ix"]


def test_a_process_killed_while_saving_leaves_the_previous_index(tmp_path: Path) -> None:
    build(n=10).save(tmp_path / "ix")
    script = textwrap.dedent(
        f"""
        import os, numpy as np
        from gpurag import ExactRetriever, storage
        real = storage.write_array
        def dying_write(directory, name, array):
            real(directory, name, array[: len(array) // 2])   # half the data is on disk...
            os._exit(9)                                        # ...when the process dies
        storage.write_array = dying_write
        index = ExactRetriever(backend="numpy")
        index.add(np.ones((1000, 8)))
        index.save({str(tmp_path / "ix")!r})
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 9, result.stderr
    assert len(ExactRetriever.load(tmp_path / "ix", backend="numpy")) == 10


def test_a_crash_between_the_two_renames_still_loads_the_previous_index(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    build(n=10).save(tmp_path / "ix")
    real_rename = os.rename
    calls = []

    def rename_then_crash(src: str, dst: str) -> None:
        calls.append(src)
        if len(calls) == 2:  # the old index was moved aside; the new one is not in place yet
            raise KeyboardInterrupt
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename_then_crash)
    monkeypatch.setattr(storage.os, "rename", rename_then_crash)
    with pytest.raises(KeyboardInterrupt):
        build(n=30).save(tmp_path / "ix")
    monkeypatch.undo()
    # The handler put the old index back; simulate the harder case, a process that died right there.
    assert len(ExactRetriever.load(tmp_path / "ix", backend="numpy")) == 10
    os.rename(tmp_path / "ix", tmp_path / ".ix.old-deadbeef")
    with pytest.warns(UserWarning, match="interrupted save"):
        assert len(ExactRetriever.load(tmp_path / "ix", backend="numpy")) == 10
    build(n=5).save(tmp_path / "ix")  # the next save puts an index back and clears the leftover
    assert [p.name for p in tmp_path.iterdir()] == ["ix"]
    assert len(ExactRetriever.load(tmp_path / "ix", backend="numpy")) == 5


# --- the manifest: checksummed, confined, every malformed key named -----------------------------
def _edit_manifest(index_dir: Path, edit: Any, *, rechecksum: bool) -> None:
    """Apply ``edit`` to the manifest; with ``rechecksum`` the checksum is recomputed as a forger would."""
    path = index_dir / storage.MANIFEST
    manifest = json.loads(path.read_text())
    edit(manifest)
    if rechecksum:
        manifest[storage.CHECKSUM_KEY] = storage.manifest_checksum(manifest)
    path.write_text(json.dumps(manifest))


def test_an_edited_metric_is_caught_by_the_manifest_checksum(tmp_path: Path) -> None:
    build(metric="cosine").save(tmp_path / "ix")
    _edit_manifest(tmp_path / "ix", lambda m: m.update(metric="l2"), rechecksum=False)
    with pytest.raises(IndexFormatError, match=r"manifest_sha256.*does not match"):
        ExactRetriever.load(tmp_path / "ix", backend="numpy")


def test_a_manifest_without_its_checksum_is_refused_naming_the_key(tmp_path: Path) -> None:
    build().save(tmp_path / "ix")
    _edit_manifest(tmp_path / "ix", lambda m: m.pop(storage.CHECKSUM_KEY), rechecksum=False)
    with pytest.raises(IndexFormatError, match="key 'manifest_sha256' is missing"):
        ExactRetriever.load(tmp_path / "ix", backend="numpy")


@pytest.mark.parametrize("name", ["/etc/hostname", "../outside.npy", "sub/../../outside.npy"])
def test_file_names_outside_the_index_directory_are_refused(tmp_path: Path, name: str) -> None:
    build().save(tmp_path / "ix")
    outside = tmp_path / "outside.npy"
    outside.write_bytes((tmp_path / "ix" / "ids.npy").read_bytes())

    def point_outside(manifest: dict[str, Any]) -> None:
        manifest["files"][name] = manifest["files"].pop("ids.npy")

    _edit_manifest(tmp_path / "ix", point_outside, rechecksum=True)
    with pytest.raises(IndexFormatError, match="outside the index directory"):
        storage.read_manifest(tmp_path / "ix")


def test_a_symbolic_link_inside_the_index_pointing_out_is_refused(tmp_path: Path) -> None:
    build().save(tmp_path / "ix")
    (tmp_path / "real_ids.npy").write_bytes((tmp_path / "ix" / "ids.npy").read_bytes())
    (tmp_path / "ix" / "ids.npy").unlink()
    (tmp_path / "ix" / "ids.npy").symlink_to(tmp_path / "real_ids.npy")
    with pytest.raises(IndexFormatError, match="resolves outside the index directory"):
        ExactRetriever.load(tmp_path / "ix", backend="numpy")


@pytest.mark.parametrize(
    ("edit", "key"),
    [
        (lambda m: m.pop("metric"), "metric"),
        (lambda m: m.update(metric=3), "metric"),
        (lambda m: m.update(metric="hamming"), "metric"),
        (lambda m: m.pop("count"), "count"),
        (lambda m: m.update(count="50"), "count"),
        (lambda m: m.update(count=True), "count"),
        (lambda m: m.update(dim=[8]), "dim"),
        (lambda m: m.pop("files"), "files"),
        (lambda m: m.update(files=["ids.npy"]), "files"),
        (lambda m: m["files"].update({"ids.npy": 7}), "files.ids.npy"),
        (lambda m: m["files"]["ids.npy"].pop("sha256"), "files.ids.npy.sha256"),
        (lambda m: m["files"]["ids.npy"].update(bytes="12"), "files.ids.npy.bytes"),
    ],
)
def test_every_malformed_manifest_is_an_index_format_error_naming_the_key(tmp_path: Path, edit: Any, key: str) -> None:
    build().save(tmp_path / "ix")
    _edit_manifest(tmp_path / "ix", edit, rechecksum=True)
    with pytest.raises(IndexFormatError, match=f"key '{re.escape(key)}'"):
        ExactRetriever.load(tmp_path / "ix", backend="numpy")


# --- where a save goes: links followed, the umask honoured ---------------------------------------
def test_saving_through_a_symbolic_link_writes_where_it_points_and_keeps_the_link(tmp_path: Path) -> None:
    (tmp_path / "store").mkdir()
    build(n=10).save(tmp_path / "store" / "ix")
    (tmp_path / "link").symlink_to(tmp_path / "store" / "ix")
    build(n=20, seed=3).save(tmp_path / "link")
    assert (tmp_path / "link").is_symlink(), "the link was replaced"
    assert len(ExactRetriever.load(tmp_path / "link", backend="numpy")) == 20
    assert len(ExactRetriever.load(tmp_path / "store" / "ix", backend="numpy")) == 20
    assert sorted(p.name for p in (tmp_path / "store").iterdir()) == ["ix"], "a backup or temporary was left"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "store"]


def test_saving_through_a_dangling_link_creates_the_index_where_it_points(tmp_path: Path) -> None:
    (tmp_path / "link").symlink_to(tmp_path / "later" / "ix")
    build(n=7).save(tmp_path / "link")
    assert (tmp_path / "link").is_symlink()
    assert len(ExactRetriever.load(tmp_path / "later" / "ix", backend="numpy")) == 7


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o077])
def test_a_saved_index_honours_the_umask(tmp_path: Path, umask: int) -> None:
    previous = os.umask(umask)
    try:
        build(n=5).save(tmp_path / "ix")
    finally:
        os.umask(previous)
    assert (tmp_path / "ix").stat().st_mode & 0o777 == 0o777 & ~umask
    for child in (tmp_path / "ix").iterdir():
        assert child.stat().st_mode & 0o777 == 0o666 & ~umask, child.name


# --- one snapshot per save --------------------------------------------------------------------
def _vector_of(user_id: int, dim: int = 4) -> np.ndarray[Any, Any]:
    return np.full((1, dim), float(user_id), np.float32) + np.arange(dim, dtype=np.float32)


def test_an_index_saved_during_add_remove_churn_loads_with_every_id_on_its_own_vector(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    index = ExactRetriever(metric="l2", backend="numpy")
    for user_id in range(200):
        index.add(_vector_of(user_id), ids=[user_id])
    copy_vectors = index.vectors

    def slow_to_return() -> Any:  # widens any gap between reading the vectors and reading the ids
        vectors = copy_vectors()
        time.sleep(0.005)
        return vectors

    monkeypatch.setattr(index, "vectors", slow_to_return)
    stop = threading.Event()
    errors: list[BaseException] = []

    def churn() -> None:
        rng = np.random.default_rng(0)
        next_id = 200
        try:
            while not stop.is_set():
                index.add(np.concatenate([_vector_of(next_id + i) for i in range(3)]), ids=range(next_id, next_id + 3))
                next_id += 3
                index.remove(rng.choice(next_id, size=3, replace=False))
        except BaseException as exc:  # reported below
            errors.append(exc)

    worker = threading.Thread(target=churn)
    worker.start()
    try:
        for attempt in range(15):
            index.save(tmp_path / f"ix{attempt}")
    finally:
        stop.set()
        worker.join()
    assert not errors, errors
    for attempt in range(15):
        loaded = ExactRetriever.load(tmp_path / f"ix{attempt}", backend="numpy")
        expected = np.concatenate([_vector_of(int(i)) for i in loaded.ids]) if len(loaded) else None
        if expected is not None:
            np.testing.assert_array_equal(loaded.vectors(), expected, err_msg=f"save {attempt}: ids on wrong vectors")
