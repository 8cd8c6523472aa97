"""The on-disk format: round trips, damaged files named, interrupted saves leaving the old index."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

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
