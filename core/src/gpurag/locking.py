"""A readers-writer lock: many searches at once, or one change to an index."""

from __future__ import annotations

import threading


class ReadWriteLock:
    """Shared reads, exclusive writes; a waiting writer holds back new readers (no writer starves).

    A thread that holds the write lock may take it, or the read lock, again. ``with lock.read():``
    and ``with lock.write():`` hold it for a block.
    """

    def __init__(self) -> None:
        self._condition = threading.Condition(threading.Lock())
        self._readers = 0
        self._writer: int | None = None
        self._writer_depth = 0
        self._writers_waiting = 0

    def read(self) -> _ReadSide:
        """The lock, shared, as a context manager."""
        return _ReadSide(self)

    def write(self) -> _WriteSide:
        """The lock, exclusive, as a context manager."""
        return _WriteSide(self)

    def _acquire_read(self) -> bool:
        """Take a shared hold; True when the calling thread already writes (a nested hold)."""
        me = threading.get_ident()
        with self._condition:
            if self._writer == me:
                self._writer_depth += 1
                return True
            while self._writer is not None or self._writers_waiting:
                self._condition.wait()
            self._readers += 1
            return False

    def _release_read(self, nested: bool) -> None:
        with self._condition:
            if nested:
                self._writer_depth -= 1
                return
            self._readers -= 1
            if self._readers == 0:
                self._condition.notify_all()

    def _acquire_write(self) -> None:
        me = threading.get_ident()
        with self._condition:
            if self._writer == me:
                self._writer_depth += 1
                return
            self._writers_waiting += 1
            try:
                while self._writer is not None or self._readers:
                    self._condition.wait()
            finally:
                self._writers_waiting -= 1
            self._writer = me
            self._writer_depth = 1

    def _release_write(self) -> None:
        with self._condition:
            self._writer_depth -= 1
            if self._writer_depth == 0:
                self._writer = None
                self._condition.notify_all()


class _ReadSide:
    __slots__ = ("_lock", "_nested")

    def __init__(self, lock: ReadWriteLock) -> None:
        self._lock = lock
        self._nested = False

    def __enter__(self) -> None:
        self._nested = self._lock._acquire_read()

    def __exit__(self, *exc: object) -> None:
        self._lock._release_read(self._nested)


class _WriteSide:
    __slots__ = ("_lock",)

    def __init__(self, lock: ReadWriteLock) -> None:
        self._lock = lock

    def __enter__(self) -> None:
        self._lock._acquire_write()

    def __exit__(self, *exc: object) -> None:
        self._lock._release_write()
